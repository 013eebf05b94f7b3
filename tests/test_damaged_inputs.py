"""Damaged or hostile inputs are refused with a clear error, never scored (docs/evaluate.md, "Guarantees").

Each test builds the damage by hand (cut bytes, a gzip stream of a shortened payload,
NaN voxels in the raw payload, a symlink to nowhere ...) so that the expected outcome
follows from the damage itself, not from oarbench's output.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from oarbench.cli import main
from oarbench.io import check_image_file, find_cases, read_volume
from oarbench.labels import LabelMap
from oarbench.metrics import evaluate_labels

LABELS_TOML = "[labels]\nLiver = 1\nKidney_L = 2\n"


def _labels_array() -> np.ndarray:
    a = np.zeros((12, 16, 16), np.uint8)
    a[2:10, 2:10, 2:10] = 1
    a[3:7, 11:15, 11:15] = 2
    return a


def _write(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    return path


@pytest.fixture
def study(tmp_path):
    """Identical reference and prediction (every DSC is exactly 1 when read correctly)."""
    arr = _labels_array()
    ref = _write(tmp_path / "ref" / "c1.nii.gz", arr)
    pred = _write(tmp_path / "pred" / "c1.nii.gz", arr)
    labels = tmp_path / "labels.toml"
    labels.write_text(LABELS_TOML)
    return ref, pred, labels


def _evaluate(ref_dir, pred_dir, labels, out, *extra):
    return CliRunner().invoke(main, ["evaluate", "--reference", str(ref_dir), "--prediction", str(pred_dir),
                                     "--labels", str(labels), "--out", str(out), "--quiet", *extra])


def _refused(result, *needles):
    """Exit code 1, a one-line message with every needle, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    for needle in needles:
        assert needle in result.output, result.output
    assert "Traceback" not in result.output


# --- truncated and damaged images ---------------------------------------------------------------

def _gzip_member_without_trailer(data: bytes) -> bytes:
    return data[:-8]  # the last 8 bytes of a gzip member are CRC-32 and ISIZE (RFC 1952)


DAMAGES = {
    "cut at 90 %": lambda data: data[: int(len(data) * 0.9)],
    "cut at 50 %": lambda data: data[: int(len(data) * 0.5)],
    "gzip trailer cut": _gzip_member_without_trailer,
    "gzip trailer cut by 4 bytes": lambda data: data[:-4],
    "complete gzip, voxel data 1000 bytes short": lambda data: gzip.compress(gzip.decompress(data)[:-1000]),
    "crc damaged": lambda data: data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:],
    "deflate data damaged": lambda data: data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:],
}


@pytest.fixture(params=["isal", "gzip"])
def inflate(request, monkeypatch):
    """Each damage is read through both gzip readers oarbench may use (ISA-L's where installed)."""
    from oarbench import io

    if request.param == "isal":
        igzip = pytest.importorskip("isal.igzip")
        monkeypatch.setattr(io, "_GZIP", igzip)
    else:
        monkeypatch.setattr(io, "_GZIP", gzip)
    return request.param


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_prediction_is_refused_not_scored(study, tmp_path, damage, inflate):
    ref, pred, labels = study
    # Large enough that SimpleITK reads every cut below without complaint (the missing voxels as 0).
    big = np.zeros((24, 48, 48), np.uint8)
    big[2:22, 2:24, 2:24] = 1
    big[3:7, 40:46, 40:46] = 2
    _write(ref, big)
    _write(pred, big)
    pred.write_bytes(DAMAGES[damage](pred.read_bytes()))
    out = tmp_path / "out"
    _refused(_evaluate(ref.parent, pred.parent, labels, out), str(pred), "cannot read image")
    assert not (out / "metrics.csv").exists()


@pytest.mark.parametrize("threads", [1, 2])
def test_both_files_damaged_the_reference_is_named(study, threads):
    # with two threads the two files are read at the same time; the message still names the reference
    from oarbench.evaluate import EvalOptions, evaluate_case

    ref, pred, _ = study
    for path in (ref, pred):
        path.write_bytes(DAMAGES["cut at 50 %"](path.read_bytes()))
    with pytest.raises(ValueError) as err:
        evaluate_case(ref, pred, EvalOptions(labels=LabelMap({1: "Liver", 2: "Kidney_L"}), threads=threads))
    assert str(err.value).startswith(f"{ref}: cannot read image"), str(err.value)


def test_undamaged_control_scores_exactly_one(study, tmp_path):
    ref, pred, labels = study
    result = _evaluate(ref.parent, pred.parent, labels, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (pd.read_csv(tmp_path / "out" / "metrics.csv")["dsc"] == 1.0).all()


def test_uncompressed_nifti_short_payload_is_refused(tmp_path):
    path = _write(tmp_path / "c.nii", _labels_array())
    data = path.read_bytes()
    # 12*16*16 voxels of 1 byte after the 352-byte NIfTI-1 header (vox_offset 352)
    assert len(data) >= 352 + 12 * 16 * 16
    path.write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=r"c\.nii: cannot read image: incomplete voxel data.*2072 bytes.*needs 3072"):
        read_volume(path)


def test_check_image_file_passes_complete_nifti_of_every_width(tmp_path):
    for dtype in (np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64):
        for name in ("a.nii", "a.nii.gz"):
            path = _write(tmp_path / dtype.__name__ / name, _labels_array().astype(dtype))
            check_image_file(path)
            assert np.array_equal(read_volume(path).array, _labels_array())


def test_truncated_training_image_refused_before_nnunet(tmp_path):
    from oarbench.train.nnunet import NnunetPaths, link_dataset

    ds = tmp_path / "Dataset001_Tiny"
    _write(ds / "imagesTr" / "c1_0000.nii.gz", _labels_array().astype(np.int16))
    lab = _write(ds / "labelsTr" / "c1.nii.gz", _labels_array())
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "Liver": 1, "Kidney_L": 2},
                                                 "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                 "numTraining": 1}))
    good = lab.read_bytes()
    lab.write_bytes(good[:-20])
    with pytest.raises(ValueError, match=r"labelsTr/c1\.nii\.gz: cannot read image"):
        link_dataset(ds, NnunetPaths.under(tmp_path / "work"))
    lab.write_bytes(good)
    nan_image = _labels_array().astype(np.float32)
    nan_image[1, 1, 1] = np.nan
    _write(ds / "imagesTr" / "c1_0000.nii.gz", nan_image)
    with pytest.raises(ValueError, match=r"imagesTr/c1_0000\.nii\.gz: 1 voxel\(s\) are NaN"):
        link_dataset(ds, NnunetPaths.under(tmp_path / "work"))
    (ds / "imagesTr" / "c1_0000.nii.gz").unlink()
    (ds / "imagesTr" / "c1_0000.nii.gz").symlink_to(tmp_path / "elsewhere.nii.gz")
    with pytest.raises(ValueError, match=r"c1_0000\.nii\.gz: broken symbolic link"):
        link_dataset(ds, NnunetPaths.under(tmp_path / "work"))


# --- label values -------------------------------------------------------------------------------

def test_nan_voxels_in_a_float_label_image_are_refused(study, tmp_path):
    ref, pred, labels = study
    arr = _labels_array().astype(np.float32)
    arr[5, 5, 5] = np.nan  # inside the liver
    arr[0, 0, 0] = np.nan
    _write(pred, arr)
    _refused(_evaluate(ref.parent, pred.parent, labels, tmp_path / "out"), str(pred), "2 voxel(s) are NaN")


def test_float_labels_beyond_int32_do_not_wrap(study, tmp_path):
    ref, pred, labels = study
    arr = _labels_array().astype(np.float64)
    arr[0, 0, 0] = 2.0**32 + 1  # int32 cast would wrap this to 1 (Liver)
    arr[0, 0, 1] = 2.0**31  # ... and this to a negative value
    _write(pred, arr)
    _refused(_evaluate(ref.parent, pred.parent, labels, tmp_path / "out"), str(pred),
             "2147483648", "4294967297", "not in the label map")


def test_huge_integer_label_is_refused_without_allocating_per_value():
    ref = np.zeros((8, 8, 8), np.int32)
    ref[2:6, 2:6, 2:6] = 1
    pred = ref.copy()
    pred[0, 0, 0] = 2**31 - 1  # find_objects would allocate 2^31 - 1 entries (about 16 GiB)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"prediction: label values \[2147483647\] are not in the label map"):
        evaluate_labels(ref, pred, (1.0, 1.0, 1.0), LabelMap({1: "Liver"}))
    assert time.perf_counter() - t0 < 5.0


def test_all_unexpected_values_in_one_message(study, tmp_path):
    ref, pred, labels = study
    arr = _labels_array().astype(np.uint16)
    arr[0, 0, 0] = 7  # below the largest value of a bigger map, above this one
    arr[0, 0, 1] = 300
    _write(pred, arr)
    _refused(_evaluate(ref.parent, pred.parent, labels, tmp_path / "out"), str(pred), "[7, 300]", "known: 1, 2")


def test_plain_dict_label_maps_in_either_direction():
    ref = _labels_array()
    pred = np.roll(ref, 1, axis=2)
    expected = evaluate_labels(ref, pred, (1.0, 1.0, 1.0), LabelMap({1: "Liver", 2: "Kidney_L"}))
    for mapping in ({"Liver": 1, "Kidney_L": 2}, {1: "Liver", 2: "Kidney_L"},
                    {"background": 0, "Liver": 1, "Kidney_L": 2}, {np.int64(1): "Liver", np.int64(2): "Kidney_L"}):
        assert evaluate_labels(ref, pred, (1.0, 1.0, 1.0), mapping) == expected
    # The liver (8x8x8 cube) shifted by one voxel: overlap 8*8*7, DSC = 2*448/(512+512) = 0.875
    assert expected[0].dsc == pytest.approx(0.875)
    for bad in ({"1": "Liver"}, {1: 2}, {"Liver": [1, 2]}, [("Liver", 1)], {True: "Liver"}):
        with pytest.raises(TypeError, match=r"pass a LabelMap, a \{value: name\} mapping"):
            evaluate_labels(ref, pred, (1.0, 1.0, 1.0), bad)


# --- stale cache --------------------------------------------------------------------------------

def test_cache_follows_content_not_size_and_mtime(tmp_path):
    arr = _labels_array()
    ref = _write(tmp_path / "ref" / "c1.nii", arr)  # uncompressed: equal size for equal shape
    pred = _write(tmp_path / "pred" / "c1.nii", arr)
    labels = tmp_path / "l.toml"
    labels.write_text(LABELS_TOML)
    out = tmp_path / "out"
    assert _evaluate(ref.parent, pred.parent, labels, out).exit_code == 0
    st = pred.stat()
    other = arr.copy()
    other[:, :, :5] = 0  # removes 8*8*3 liver voxels and no kidney voxel
    replacement = _write(tmp_path / "other" / "c1.nii", other)
    data = replacement.read_bytes()
    assert len(data) == st.st_size
    pred.write_bytes(data)
    os.utime(pred, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p / rsync would
    result = _evaluate(ref.parent, pred.parent, labels, out)
    assert result.exit_code == 0, result.output
    assert "1 cases computed, 0 from cache" in result.output
    table = pd.read_csv(out / "metrics.csv").set_index("structure")
    # overlap 8*8*5 = 320 of 512 reference voxels: DSC = 2*320/(512+320)
    assert table.loc["Liver", "dsc"] == pytest.approx(640 / 832)
    run = json.loads((out / "run.json").read_text())
    assert run["input_sha256"][str(pred)] == hashlib.sha256(data).hexdigest()


# --- outputs as one set, lock, leftovers, full disk, long names -----------------------------------

def test_run_json_names_the_tables_and_a_mixed_set_is_refused(study, tmp_path):
    ref, pred, labels = study
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert _evaluate(ref.parent, pred.parent, labels, out_a).exit_code == 0
    run = json.loads((out_a / "run.json").read_text())
    for name in ("metrics.csv", "summary.csv"):
        assert run["outputs"][name] == hashlib.sha256((out_a / name).read_bytes()).hexdigest()
    # A second run with other numbers; mix its metrics.csv into the first set (as a kill
    # between two renames would leave it).
    _write(pred, np.roll(_labels_array(), 1, axis=2))
    assert _evaluate(ref.parent, pred.parent, labels, out_b).exit_code == 0
    (out_a / "metrics.csv").write_bytes((out_b / "metrics.csv").read_bytes())
    from oarbench.stats import read_results

    with pytest.raises(ValueError, match=r"metrics\.csv: does not match .*run\.json.*not one set"):
        read_results(out_a / "metrics.csv")
    result = CliRunner().invoke(main, ["report", str(out_a)])
    _refused(result, "not one set")
    read_results(out_b / "metrics.csv")  # the intact set reads


def test_parquet_dataset_is_part_of_the_set(study, tmp_path):
    pytest.importorskip("pyarrow")
    import shutil

    from oarbench.stats import read_results

    ref, pred, labels = study
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert _evaluate(ref.parent, pred.parent, labels, out_a).exit_code == 0
    dataset = out_a / "metrics.parquet"
    h = hashlib.sha256()
    for f in sorted(p for p in dataset.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(dataset).as_posix()}\t{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    assert json.loads((out_a / "run.json").read_text())["outputs"]["metrics.parquet"] == h.hexdigest()
    read_results(dataset)
    _write(pred, np.roll(_labels_array(), 1, axis=2))
    assert _evaluate(ref.parent, pred.parent, labels, out_b).exit_code == 0
    shutil.rmtree(dataset)
    shutil.copytree(out_b / "metrics.parquet", dataset)
    with pytest.raises(ValueError, match=r"metrics\.parquet: does not match .*not one set"):
        read_results(dataset)
    # a killed run's temporary dataset folder is removed by the next run
    leftover = out_b / ".metrics.parquet.partial-1234abcd" / "centre=_"
    leftover.mkdir(parents=True)
    (leftover / "part-0.parquet").write_bytes(b"half")
    assert _evaluate(ref.parent, pred.parent, labels, out_b).exit_code == 0
    assert not leftover.parent.exists()


def test_kill_between_renames_leaves_a_detectable_set(study, tmp_path, monkeypatch):
    ref, pred, labels = study
    out = tmp_path / "out"
    assert _evaluate(ref.parent, pred.parent, labels, out).exit_code == 0
    _write(pred, np.roll(_labels_array(), 1, axis=2))
    real_replace = os.replace

    def dies_after_first(src, dst):
        if Path(dst).name == "summary.csv":
            raise KeyboardInterrupt  # stands for a kill after metrics.csv was renamed
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_after_first)
    result = _evaluate(ref.parent, pred.parent, labels, out, "--force")
    assert result.exit_code != 0  # click reports the interrupt as "Aborted!"
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads((out / "run.json").read_text())["outputs"]["metrics.csv"] != hashlib.sha256(
        (out / "metrics.csv").read_bytes()).hexdigest()  # the new metrics.csv sits beside the old run.json
    from oarbench.io import check_output_set

    with pytest.raises(ValueError, match="not one set"):
        check_output_set(out / "metrics.csv")
    assert [p for p in out.rglob("*") if ".partial" in p.name] == []


def test_leftover_partial_files_of_a_killed_run_are_removed(study, tmp_path):
    ref, pred, labels = study
    out = tmp_path / "out"
    assert _evaluate(ref.parent, pred.parent, labels, out).exit_code == 0
    cache_dir = next(p.parent for p in (out / "cache").rglob("c1.json"))
    leftovers = [out / ".metrics.abc123.partial.csv", out / ".run.xyz.partial.json",
                 cache_dir / ".c1.q1w2e3.partial.json"]
    for p in leftovers:
        p.write_text("half")
    assert _evaluate(ref.parent, pred.parent, labels, out).exit_code == 0
    assert [p for p in leftovers if p.exists()] == []


def test_second_run_on_the_same_out_refuses_clearly(study, tmp_path):
    ref, pred, labels = study
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / '.oarbench.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
         "print('locked', flush=True); time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        in_flight = out / ".metrics.inflight.partial.csv"
        in_flight.write_text("being written by the first run")
        result = _evaluate(ref.parent, pred.parent, labels, out)
        _refused(result, str(out), "another oarbench run", str(holder.pid))
        assert in_flight.exists()  # the first run's temporary file is left alone
        assert not (out / "metrics.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    assert _evaluate(ref.parent, pred.parent, labels, out).exit_code == 0


def test_full_disk_is_a_clean_error(study, tmp_path, monkeypatch):
    ref, pred, labels = study
    out = tmp_path / "out"

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    result = _evaluate(ref.parent, pred.parent, labels, out)
    _refused(result, os.strerror(errno.ENOSPC))
    monkeypatch.undo()
    assert not (out / "metrics.csv").exists()
    assert [p for p in out.rglob("*") if ".partial" in p.name] == []


def test_over_long_case_names_are_scored(tmp_path):
    name = "c" * 240  # 247 bytes with .nii.gz; a cache or temporary name built from it would exceed 255
    arr = _labels_array()
    _write(tmp_path / "ref" / f"{name}.nii.gz", arr)
    _write(tmp_path / "pred" / f"{name}.nii.gz", arr)
    labels = tmp_path / "l.toml"
    labels.write_text(LABELS_TOML)
    out = tmp_path / "out"
    result = _evaluate(tmp_path / "ref", tmp_path / "pred", labels, out)
    assert result.exit_code == 0, result.output
    assert set(pd.read_csv(out / "metrics.csv")["case"]) == {name}
    again = _evaluate(tmp_path / "ref", tmp_path / "pred", labels, out)
    assert "0 cases computed, 1 from cache" in again.output


# --- names from a study file, broken symlinks ---------------------------------------------------

@pytest.mark.parametrize("field,value", [("centre", "../../../escaped"), ("model", "../up"),
                                         ("centre", "a/b"), ("model", ".hidden"), ("centre", "")])
def test_study_names_that_would_leave_out_are_refused(study, tmp_path, field, value):
    ref, pred, labels = study
    centre = value if field == "centre" else "A"
    model = value if field == "model" else "m"
    toml = tmp_path / "s.toml"
    toml.write_text(f'[study]\nname = "s"\nlabels = "{labels}"\n\n[[centres]]\nname = "{centre}"\n'
                    f'reference = "{ref.parent}"\n\n[[models]]\nname = "{model}"\npredictions = "{pred.parent}"\n')
    out = tmp_path / "deep" / "er" / "out"
    result = CliRunner().invoke(main, ["evaluate", str(toml), "--out", str(out), "--quiet"])
    _refused(result, str(toml), "name")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "deep" / "escaped").exists()
    assert not out.exists()


def test_reference_that_is_a_broken_symlink_is_an_error(study, tmp_path):
    ref, pred, labels = study
    (ref.parent / "c2.nii.gz").symlink_to(tmp_path / "gone" / "c2.nii.gz")
    with pytest.raises(ValueError, match=r"c2\.nii\.gz: broken symbolic link"):
        find_cases(ref.parent)
    _refused(_evaluate(ref.parent, pred.parent, labels, tmp_path / "out"), "c2.nii.gz", "broken symbolic link")


# --- optional dependencies ----------------------------------------------------------------------

def test_missing_nnunet_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nnunetv2" else real(name, *a))
    ds = tmp_path / "Dataset001_Tiny"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "Liver": 1},
                                                 "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                 "numTraining": 0}))
    result = CliRunner().invoke(main, ["train", "local", "--dataset", str(ds), "--out", str(tmp_path / "w")])
    _refused(result, "pip install 'oarbench[nnunet]'")
    assert len(result.output.strip().splitlines()) == 1


def test_missing_torch_for_the_predictor_is_one_line(tmp_path, monkeypatch):
    from oarbench.robustness.predictors import NnUNetModelPredictor

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "plans.json").write_text("{}")
    (folder / "dataset.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    from oarbench._optional import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=r"needs torch, which is not installed: pip install 'oarbench\[torch\]'"):
        NnUNetModelPredictor(folder).load()
