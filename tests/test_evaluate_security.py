"""Numbers no one can bend: authenticated cache entries, predictions that are the reference,
decompression bombs refused from the header, spreadsheet formulas in CSV cells (docs/evaluate.md,
"Guarantees").

Every attack is built by hand here (an edited cache entry, a copied or linked reference, a NIfTI
header that claims a huge grid, a file named like a formula), and the expected outcome follows
from the attack itself: the DSC of the test arrays is worked out below from their overlap.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from oarbench.cli import main

LABELS_TOML = "[labels]\nLiver = 1\nKidney_L = 2\n"
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@pytest.fixture(autouse=True)
def _own_key(tmp_path, monkeypatch):
    """Each test has its own cache key (never the user's)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def _ref_array() -> np.ndarray:
    a = np.zeros((12, 16, 16), np.uint8)
    a[2:10, 2:10, 2:10] = 1  # 512 voxels
    a[3:7, 11:15, 11:15] = 2  # 64 voxels
    return a


def _pred_array() -> np.ndarray:
    a = _ref_array()
    a[2:10, 2:10, 8:10] = 0  # Liver: 128 voxels removed -> tp 384, fp 0, fn 128
    return a


# DSC of the prediction, from the construction: 2 tp / (2 tp + fp + fn).
LIVER_DSC = 2 * 384 / (2 * 384 + 0 + 128)


def _write(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    return path


@pytest.fixture
def data(tmp_path):
    for case in ("c1", "c2"):
        _write(tmp_path / "ref" / f"{case}.nii.gz", _ref_array())
        _write(tmp_path / "pred" / f"{case}.nii.gz", _pred_array())
    labels = tmp_path / "labels.toml"
    labels.write_text(LABELS_TOML)
    return tmp_path


def _evaluate(root: Path, *extra: str, ref: str = "ref", pred: str = "pred", out: str = "out"):
    return CliRunner().invoke(main, ["evaluate", "--reference", str(root / ref), "--prediction", str(root / pred),
                                     "--labels", str(root / "labels.toml"), "--out", str(root / out), "--quiet",
                                     "--no-progress", *extra])


def _refused(result, *needles):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def _entries(out: Path) -> dict[str, Path]:
    return {p.stem: p for p in (out / "cache").rglob("*.json")}


# --- 1. cache entries ---------------------------------------------------------------------------

def _set_dsc(value):
    def forge(entry):
        entry["rows"][0]["dsc"] = value
    return forge


def _rename(entry):
    entry["case"] = "c9"


def _duplicate(entry):
    entry["rows"].append(dict(entry["rows"][0]))


def _rows_five(entry):
    entry["rows"] = 5


def _no_mac(entry):
    entry.pop("mac")


def _consistent_forgery(entry):
    # A forger who knows the formula: DSC and counts agree, the MAC does not.
    row = entry["rows"][0]
    row.update(tp=511, fn=1, fp=0, dsc=2 * 511 / (2 * 511 + 1))


FORGERIES = {
    "dsc 0.999": _set_dsc(0.999),
    "dsc 7.5": _set_dsc(7.5),
    "dsc -3": _set_dsc(-3.0),
    "dsc as text": _set_dsc("1"),
    "case renamed": _rename,
    "duplicate row": _duplicate,
    "rows is 5": _rows_five,
    "mac removed": _no_mac,
    "counts and dsc consistent": _consistent_forgery,
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_forged_cache_entry_is_recomputed_with_a_warning(data, forgery):
    assert _evaluate(data).exit_code == 0
    entry_path = _entries(data / "out")["c1"]
    entry = json.loads(entry_path.read_text())
    FORGERIES[forgery](entry)
    entry_path.write_text(json.dumps(entry))

    result = _evaluate(data)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert f"{entry_path}: cache entry not used" in result.output
    table = pd.read_csv(data / "out" / "metrics.csv")
    assert len(table) == 4  # 2 cases x 2 structures, no extra row
    assert sorted(set(table["case"])) == ["c1", "c2"]
    liver = table[table["structure"] == "Liver"]
    assert np.allclose(liver["dsc"], LIVER_DSC, rtol=0, atol=1e-9)
    assert np.allclose(table[table["structure"] == "Kidney_L"]["dsc"], 1.0)
    run = json.loads((data / "out" / "run.json").read_text())
    assert run["cases_computed"] == 1 and run["cases_from_cache"] == 1
    assert any(str(entry_path) in w for w in run["warnings"])
    # The entry was rewritten from the recomputed case and is used without a word next time.
    third = _evaluate(data)
    assert third.exit_code == 0 and "cache entry not used" not in third.output


def test_entry_of_another_case_is_not_used(data):
    """A genuine entry copied over another case's entry: its MAC binds it to its own case."""
    _write(data / "pred" / "c2.nii.gz", _ref_array())  # c2's numbers now differ from c1's
    assert _evaluate(data).exit_code == 0
    entries = _entries(data / "out")
    entries["c2"].write_text(entries["c1"].read_text())
    result = _evaluate(data)
    assert result.exit_code == 0 and f"{entries['c2']}: cache entry not used" in result.output
    table = pd.read_csv(data / "out" / "metrics.csv")
    got = table[(table["case"] == "c2") & (table["structure"] == "Liver")]["dsc"].item()
    assert got == 1.0  # c2's own prediction is the reference, not c1's 0.857


def test_entry_signed_with_another_key_is_not_used(data, tmp_path, monkeypatch):
    """The key lives outside OUT: a writer of OUT without it cannot sign entries."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "attacker"))
    _write(data / "pred" / "c1.nii.gz", _ref_array())
    assert _evaluate(data).exit_code == 0  # the attacker's run: entries signed with the attacker's key
    _write(data / "pred" / "c1.nii.gz", _pred_array())
    forged = _entries(data / "out")["c1"]
    entry = json.loads(forged.read_text())
    import hashlib
    entry["sha256"][1] = hashlib.sha256((data / "pred" / "c1.nii.gz").read_bytes()).hexdigest()
    forged.write_text(json.dumps(entry))  # claims the real prediction, rows of the reference (DSC 1)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    result = _evaluate(data)
    assert result.exit_code == 0 and f"{forged}: cache entry not used" in result.output
    table = pd.read_csv(data / "out" / "metrics.csv")
    assert table[(table["case"] == "c1") & (table["structure"] == "Liver")]["dsc"].item() == pytest.approx(LIVER_DSC)


@pytest.mark.parametrize("backend, device", [
    ("numpy", None), ("torch", "cpu"), pytest.param("torch", "cuda", marks=pytest.mark.cuda)])
def test_genuine_entries_of_every_status_pass_the_checks(tmp_path, backend, device):
    """Entries as each backend writes them (ok, missed, hallucinated, absent, missing) are reused silently."""
    if backend == "torch":
        torch = pytest.importorskip("torch")
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("no CUDA GPU")
    from oarbench.evaluate import EvalOptions, jobs_from_folders, evaluate_jobs
    from oarbench.labels import LabelMap

    labels = LabelMap({1: "Liver", 2: "Kidney_L", 3: "Kidney_R", 4: "Spleen", 5: "Pancreas"})  # Pancreas: absent
    ref = _ref_array()
    ref[8:11, 11:15, 2:6] = 3  # Kidney_R: missed by the prediction
    pred = _pred_array()
    pred[8:11, 2:6, 11:15] = 4  # Spleen: hallucinated
    _write(tmp_path / "ref" / "c1.nii.gz", ref)
    _write(tmp_path / "ref" / "c2.nii.gz", ref)  # c2 has no prediction: missing
    _write(tmp_path / "pred" / "c1.nii.gz", pred)
    options = EvalOptions(labels=labels, backend=backend, device=device,
                          allow_missing=True, tolerances=(("Spleen", 1.5),))
    jobs = jobs_from_folders(tmp_path / "ref", tmp_path / "pred")
    first, _ = evaluate_jobs(jobs, options, tmp_path / "out", progress=False)
    assert set(first["status"]) == {"ok", "missed", "hallucinated", "absent", "missing"}
    second, prov = evaluate_jobs(jobs, options, tmp_path / "out", progress=False)
    assert prov["cases_from_cache"] == 2 and prov["cases_computed"] == 0
    assert not [w for w in prov["warnings"] if "cache entry" in w]
    pd.testing.assert_frame_equal(first, second)


@pytest.mark.parametrize("plant", ["fifo", "huge", "link"])
def test_cache_entry_that_is_no_plain_file_is_never_opened(data, plant):
    """A FIFO would block a reader forever, a huge file fill its memory, a link point anywhere."""
    assert _evaluate(data).exit_code == 0
    entry = _entries(data / "out")["c1"]
    entry.unlink()
    if plant == "fifo":
        os.mkfifo(entry)
    elif plant == "huge":
        with open(entry, "wb") as fh:
            fh.truncate(17 << 20)  # sparse: 17 MiB of zeros
    else:
        entry.symlink_to(data / "labels.toml")
    result = _evaluate(data)
    assert result.exit_code == 0, result.output
    assert f"{entry}: cache entry not used" in result.output
    assert (data / "labels.toml").read_text() == LABELS_TOML  # the link's target is untouched


def test_key_folder_that_cannot_be_made_runs_with_a_warning(data, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(data / "labels.toml"))  # a file: no folder can be made in it
    result = _evaluate(data)
    assert result.exit_code == 0, result.output
    assert "cannot keep a cache key there" in result.output
    second = _evaluate(data)  # the first run's entries were signed with a key of that run only
    assert second.exit_code == 0 and "cache entry not used" in second.output


def test_cache_key_file_is_private(data, tmp_path):
    assert _evaluate(data).exit_code == 0
    key = tmp_path / "config" / "oarbench" / "cache.key"
    assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_size == 32
    assert not any(p.name == "cache.key" for p in (data / "out").rglob("*"))
    key.chmod(0o644)
    _refused(_evaluate(data), f"{key}: the cache key must belong to this user")


def _rows(**change):
    ok = {"label": 1, "structure": "Liver", "status": "ok", "dsc": LIVER_DSC, "hd95": 2.0, "hd": 3.0, "msd": 0.5,
          "assd": 0.4, "sdsc": 0.9, "ref_ml": 0.512, "pred_ml": 0.384, "tp": 384, "fp": 0, "fn": 128,
          "tolerance_mm": 2.0, "vs": 0.86, "centroid_mm": 1.0, "apl_mm": 3.0, "apl_mm_per_slice": 0.4,
          "spacing_max_mm": 1.0, "spacing_inplane_max_mm": 1.0}
    ok.update(change)
    absent = dict(ok, label=2, structure="Kidney_L", status="absent", dsc=float("nan"), tp=0, fp=0, fn=0)
    return [ok, absent]


@pytest.mark.parametrize("change, reason", [
    ({}, None),
    ({"dsc": 0.9}, "is not 2 tp / (2 tp + fp + fn)"),
    ({"dsc": 1.5}, "outside [0, 1]"),
    ({"hd95": -1.0}, "negative"),
    ({"tp": 2.5}, "not a whole number"),
    ({"fn": -128}, "not a whole number >= 0"),
    ({"status": "great"}, "status"),
    ({"structure": "Spleen"}, "was expected"),
    ({"sdsc": 1.2}, "above 1"),
    ({"hd95": 4.0}, "above hd"),
    ({"tolerance_mm": 5.0}, "tolerance"),
    ({"msd": None}, "not a number"),
])
def test_cached_rows_are_checked_against_the_formulas(change, reason):
    from oarbench.evaluate import EvalOptions, check_cached_rows
    from oarbench.labels import LabelMap

    options = EvalOptions(labels=LabelMap({1: "Liver", 2: "Kidney_L"}))
    why = check_cached_rows(_rows(**change), options, has_prediction=True)
    if reason is None:
        assert why is None
    else:
        assert why is not None and reason in why


# --- 2. predictions that are the reference, links out of the folder -----------------------------

def test_prediction_identical_to_reference_is_warned_per_case(data):
    import shutil

    shutil.copyfile(data / "ref" / "c2.nii.gz", data / "pred" / "c2.nii.gz")  # a byte-identical copy
    result = _evaluate(data)
    assert result.exit_code == 0, result.output
    pred = data / "pred" / "c2.nii.gz"
    assert f"warning: {pred}: has the same content as its reference" in result.output
    assert "1 of 2 predictions have the same content as their reference" in result.output
    assert f"{data / 'pred' / 'c1.nii.gz'}: has the same content" not in result.output
    run = json.loads((data / "out" / "run.json").read_text())
    assert [(e["case"], e["prediction"]) for e in run["same_as_reference"]] == [("c2", str(pred))]
    summary = pd.read_csv(data / "out" / "summary.csv")
    assert (summary["n_same_as_reference"] == 1).all()


def test_prediction_identical_to_reference_is_refused_with_strict(data):
    import shutil

    shutil.copyfile(data / "ref" / "c1.nii.gz", data / "pred" / "c1.nii.gz")
    _refused(_evaluate(data, "--strict"), f"{data / 'pred' / 'c1.nii.gz'}: has the same content as its reference",
             "--strict")
    assert not (data / "out" / "metrics.csv").exists()


def test_links_out_of_the_folder_are_not_followed_unless_asked(data):
    links = data / "links"
    links.mkdir()
    for case in ("c1", "c2"):
        (links / f"{case}.nii.gz").symlink_to(data / "ref" / f"{case}.nii.gz")
    _refused(_evaluate(data, pred="links"), f"{links / 'c1.nii.gz'}: symbolic link to", "outside",
             "--follow-links")
    assert not (data / "out" / "metrics.csv").exists()
    result = _evaluate(data, "--follow-links", pred="links")
    assert result.exit_code == 0, result.output
    assert "2 of 2 predictions have the same content as their reference" in result.output
    _refused(_evaluate(data, "--follow-links", "--strict", pred="links"), "same content as its reference")


def test_links_inside_the_folder_and_a_linked_folder_are_read(data):
    inside = data / "inside"
    (inside / "store").mkdir(parents=True)
    for case in ("c1", "c2"):
        _write(inside / "store" / f"x{case}.nii.gz", _pred_array())
        (inside / f"{case}.nii.gz").symlink_to(Path("store") / f"x{case}.nii.gz")
    (data / "pred_link").symlink_to(data / "pred", target_is_directory=True)
    assert _evaluate(data, pred="inside").exit_code == 0
    result = _evaluate(data, pred="pred_link", out="out2")
    assert result.exit_code == 0, result.output


# --- 3. decompression bombs -------------------------------------------------------------------

def _nifti_header(dims: tuple[int, ...], datatype: int = 2, bitpix: int = 8) -> bytes:
    """A NIfTI-1 header (348 bytes + 4-byte extension flag) built from the standard's byte layout."""
    h = bytearray(352)
    struct.pack_into("<i", h, 0, 348)
    struct.pack_into("<8h", h, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<hh", h, 70, datatype, bitpix)
    struct.pack_into("<8f", h, 76, 1.0, 1.0, 1.0, 1.0, 1, 1, 1, 1)
    struct.pack_into("<f", h, 108, 352.0)  # vox_offset
    struct.pack_into("<f", h, 112, 1.0)  # scl_slope
    h[344:348] = b"n+1\0"
    return bytes(h)


def _bomb(path: Path, dims: tuple[int, ...], data_bytes: int) -> Path:
    """A .nii.gz of ``dims`` uint8 zeros: gzip members of 16 MiB of zeros, each compressed once."""
    chunk = 16 << 20
    zeros = gzip.compress(bytes(chunk), compresslevel=9)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(_nifti_header(dims)))
        for _ in range(data_bytes // chunk):
            fh.write(zeros)
        fh.write(gzip.compress(bytes(data_bytes % chunk)))
    return path


def test_bomb_header_is_read_without_decompressing_the_voxels(data, monkeypatch):
    from oarbench import io as oio
    from oarbench.evaluate import EvalOptions, evaluate_case
    from oarbench.labels import LabelMap

    bomb = _bomb(data / "bomb.nii.gz", (1024, 1024, 1024), 64 << 20)  # header claims 1 GiB; 64 MiB given

    def never(*args, **kwargs):
        raise AssertionError("voxels decompressed")

    monkeypatch.setattr(oio, "_scan_payload", never)
    monkeypatch.setattr(oio.sitk, "ReadImage", never)
    options = EvalOptions(labels=LabelMap({1: "Liver", 2: "Kidney_L"}))
    with pytest.raises(ValueError, match=r"bomb\.nii\.gz is not on the grid of .*c1\.nii\.gz: size \(16, 16, 12\) "
                                         r"vs \(1024, 1024, 1024\)"):
        evaluate_case(data / "ref" / "c1.nii.gz", bomb, options)
    with pytest.raises(ValueError, match=r"bomb\.nii\.gz: the header announces a 1024 x 1024 x 1024 grid, 1\.00 GiB"):
        evaluate_case(bomb, data / "ref" / "c1.nii.gz", EvalOptions(labels=options.labels, max_image_bytes=1 << 29))


def test_bomb_prediction_is_refused_in_bounded_memory(data):
    """The attack as reported: a ~1 MB .nii.gz whose header and stream hold 1024^3 voxels."""
    _bomb(data / "pred" / "c1.nii.gz", (1024, 1024, 1024), 1 << 30)
    assert (data / "pred" / "c1.nii.gz").stat().st_size < 4 << 20
    code = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from oarbench.cli import main
        r = CliRunner().invoke(main, ["evaluate", "--reference", {str(data / "ref")!r}, "--prediction",
                                      {str(data / "pred")!r}, "--labels", {str(data / "labels.toml")!r},
                                      "--out", {str(data / "out")!r}, "--quiet", "--no-progress"])
        print(r.exit_code, r.output.strip().splitlines()[-1])
        # VmHWM: this address space's peak, reset by exec (ru_maxrss keeps the forking parent's size)
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
        print(int(hwm.split()[1]) // 1024)
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    status, peak_mib = proc.stdout.strip().splitlines()
    assert status.startswith("1 Error: ") and "is not on the grid of" in status, proc.stdout + proc.stderr
    assert "(1024, 1024, 1024)" in status
    assert int(peak_mib) < 600, f"peak memory {peak_mib} MiB"  # 1 GiB of voxels was never held


def test_header_over_the_memory_cap_is_refused_naming_the_file(data):
    _bomb(data / "ref" / "c1.nii.gz", (2048, 2048, 1024), 0)  # 4 GiB claimed, above the 2 GiB default
    _refused(_evaluate(data), f"{data / 'ref' / 'c1.nii.gz'}: the header announces a 2048 x 2048 x 1024 grid",
             "above the limit of 2.00 GiB")


def test_memory_cap_option_and_other_formats(data):
    for case in ("c1", "c2"):
        os.remove(data / "pred" / f"{case}.nii.gz")
        _write(data / "pred" / f"{case}.mha", _pred_array())  # 3072 bytes of voxel data
    assert _evaluate(data).exit_code == 0
    _refused(_evaluate(data, "--max-image-gib", str(2000 / 2**30), "--force"),
             "the header announces a 16 x 16 x 12 grid", "c1.")


def test_stream_running_far_past_its_voxel_data_is_refused(data):
    raw = gzip.decompress((data / "pred" / "c1.nii.gz").read_bytes())
    (data / "pred" / "c1.nii.gz").write_bytes(gzip.compress(raw + bytes(24 << 20), compresslevel=1))
    _refused(_evaluate(data), "c1.nii.gz: cannot read image", "refusing to read on")


# --- 4. spreadsheet formulas in CSV cells -----------------------------------------------------

NASTY = ['=HYPERLINK("http:x")', "-2+3", "+1+1", "@SUM(A1)", "=1+1"]


def _cells(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _assert_no_formula(path: Path) -> None:
    for row in _cells(path):
        for cell in row:
            if cell.startswith(FORMULA_START):
                try:
                    float(cell)
                except ValueError:
                    raise AssertionError(f"{path}: live formula cell {cell!r}") from None


def test_case_ids_like_formulas_are_neutralised_and_read_back(data):
    model = data / "=cmd"
    for name in NASTY:
        _write(data / "ref" / f"{name}.nii.gz", _ref_array())
        _write(model / f"{name}.nii.gz", _pred_array())
    for case in ("c1", "c2"):
        _write(model / f"{case}.nii.gz", _pred_array())
    result = _evaluate(data, pred="=cmd")
    assert result.exit_code == 0, result.output
    for name in ("metrics.csv", "summary.csv"):
        _assert_no_formula(data / "out" / name)
    cells = {c for row in _cells(data / "out" / "metrics.csv") for c in row}
    assert "'=HYPERLINK(\"http:x\")" in cells and "'-2+3" in cells and "'=cmd" in cells
    from oarbench.tables import read_table

    back = read_table(data / "out" / "metrics.csv")
    assert set(back["case"]) == set(NASTY) | {"c1", "c2"}
    assert set(back["model"]) == {"=cmd"}
    if (data / "out" / "metrics.parquet").exists():
        pq = read_table(data / "out" / "metrics.parquet")
        pd.testing.assert_frame_equal(back[["case", "model"]], pq[["case", "model"]])


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "bell\x07"])
def test_control_characters_in_case_names_are_refused(data, name):
    _write(data / "ref" / f"{name}.nii.gz", _ref_array())
    result = _evaluate(data)
    _refused(result, "holds a control character", "rename the file")
    assert len(result.output.strip().splitlines()) == 2  # the labels note and one error line


def test_csv_cell_round_trip():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from oarbench.tables import csv_cell, restore_cell

    fixed = ["=x", "'=x", "''=x", "-2.5", "-inf", "", "'s heart", "'", "-", "+", "@", "\tx", "\rx", "a=b", "-2+3"]

    def check(text: str) -> None:
        safe = csv_cell(text)
        assert restore_cell(safe) == text
        if safe.startswith(FORMULA_START):
            float(safe)  # only a plain number may start like a formula

    for text in fixed:
        check(text)
    assert csv_cell("=x") == "'=x" and csv_cell("-2.5") == "-2.5" and csv_cell(3) == 3

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet="=+-@'\t\r\n1.e xA", max_size=8))
    def prop(text):
        check(text)

    prop()


def test_every_table_writer_neutralises_formulas(tmp_path):
    from oarbench.absent import AbsentResult, write_absent
    from oarbench.robustness.run import RobustnessResult, write_robustness
    from oarbench.stats.comparisons import write_stats

    df = pd.DataFrame({"model": ["=HYPERLINK(\"http:x\")", "ok"], "case": ["@a", "-1+2"], "value": [-1.5, 2.0]})
    written = [write_stats(df, tmp_path / "stats.csv")]
    written += list(write_absent(AbsentResult(df, df, df, df, df), tmp_path).values())
    written += list(write_robustness(RobustnessResult(df, df, df, df), tmp_path).values())
    for path in written:
        _assert_no_formula(Path(path))
        assert pd.read_csv(path)["value"].tolist() == [-1.5, 2.0]  # numbers stay numbers


def test_no_csv_is_written_around_the_shared_writer():
    """Every CSV writer goes through oarbench.tables (csv_text / csv_row), the report's downloads too."""
    root = Path(__file__).resolve().parents[1] / "oarbench"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "tables.py":
            continue
        text = path.read_text()
        for needle in (".to_csv(", "csv.writer(", ".writerow(r)", ".writerows(rows)"):
            if needle in text:
                offenders.append(f"{path.relative_to(root)}: {needle}")
        if "DictWriter(" in text and "csv_row" not in text:
            offenders.append(f"{path.relative_to(root)}: DictWriter without csv_row")
    assert not offenders, offenders


def test_dicom_roi_names_like_formulas_are_neutralised_in_import_csv(tmp_path):
    pytest.importorskip("pydicom")
    pytest.importorskip("skimage")
    from oarbench.dicom.importer import ImportOptions, import_dicom
    from oarbench.labels import DEFAULT_LABELS
    from tests._dicom import ct_series, rtstruct, square

    s = ct_series(tmp_path / "in" / "ct")
    roi = '=HYPERLINK("http:x","Liver")'
    rtstruct(tmp_path / "in" / "rs.dcm", s, {"Lever": [square(10.5, -19.5, 14.5, -16.5, 32.5)],
                                             roi: [square(10.5, -19.5, 12.5, -17.5, 32.5)]})
    import_dicom(tmp_path / "in", tmp_path / "out", ImportOptions(DEFAULT_LABELS))
    for name in ("import.csv", "metadata.csv", "cases.csv"):
        _assert_no_formula(tmp_path / "out" / name)
    names = [row[2] for row in _cells(tmp_path / "out" / "import.csv")[1:]]
    assert "Lever" in names and not any(roi in n for n in names)  # an unmapped name is withheld by default
    # asked to keep the names of ROIs not imported, the formula is written neutralised
    import_dicom(tmp_path / "in", tmp_path / "kept", ImportOptions(DEFAULT_LABELS, keep_unmapped_names=True))
    _assert_no_formula(tmp_path / "kept" / "import.csv")
    names = [row[2] for row in _cells(tmp_path / "kept" / "import.csv")[1:]]
    assert "'" + roi in names and "Lever" in names


def test_metadata_written_neutralised_is_read_back_exactly(tmp_path):
    """metadata.csv as the DICOM import writes it (cells through csv_row) gives the original names back."""
    from oarbench.absent import read_nephrectomy
    from oarbench.evaluate import read_patients
    from oarbench.tables import csv_row

    rows = [{"case": "=c1", "patient": "@p1", "nephrectomy": "left"}, {"case": "c2", "patient": "-p2", "nephrectomy": "none"}]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["case", "patient", "nephrectomy"], lineterminator="\n")
    w.writeheader()
    w.writerows(map(csv_row, rows))
    (tmp_path / "metadata.csv").write_text(buf.getvalue())
    assert "'=c1" in buf.getvalue()
    assert read_patients(tmp_path / "metadata.csv") == (("=c1", "@p1"), ("c2", "-p2"))
    assert read_nephrectomy(tmp_path / "metadata.csv") == {"=c1": "left", "c2": "none"}


def test_report_names_predictions_equal_to_the_reference_and_the_observer(data):
    """The report says, at the top of its accuracy section, which predictions were the reference
    itself and which model is a second observer (from run.json, not from the scores)."""
    import shutil

    shutil.copyfile(data / "ref" / "c2.nii.gz", data / "pred" / "c2.nii.gz")
    result = _evaluate(data, "--observer", str(data / "pred"), "--observer-name", "second-reader")
    assert result.exit_code == 0, result.output
    report = CliRunner().invoke(main, ["report", str(data / "out"), "--no-box-plots", "--no-progress"])
    assert report.exit_code == 0, report.output
    html = (data / "out" / "report.html").read_text()
    accuracy = html[html.index("<section id='accuracy'>"):]
    assert "have the same content as their reference (pred/c2" in accuracy
    assert "second-reader: a second observer" in accuracy
