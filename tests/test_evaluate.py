"""`oarbench evaluate`: pairing, outputs, resume, and clear errors on bad input."""

from __future__ import annotations

import json
import math
import os
import signal
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
from oarbench.labels import LabelMap

SPACING_XYZ = (0.9, 0.8, 2.5)  # SimpleITK order (x, y, z)
LABELS = LabelMap({1: "Liver", 2: "Kidney_L", 3: "Kidney_R"})


def _write(path: Path, arr: np.ndarray, spacing=SPACING_XYZ, origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def _case(rng, shift: int) -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((12, 20, 24), np.uint8)
    ref[2:9, 3:12, 3:14] = 1
    ref[4:8, 13:17, 4:8] = 2
    ref[4:8, 13:17, 15:19] = 3
    pred = np.roll(ref, shift, axis=2)
    return ref, pred


@pytest.fixture
def folders(tmp_path, rng):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    for i in range(4):
        ref, pred = _case(rng, i % 3)
        _write(ref_dir / f"case{i:02d}.nii.gz", ref)
        _write(pred_dir / f"case{i:02d}.nii.gz", pred)
    labels = tmp_path / "labels.toml"
    labels.write_text("[labels]\nLiver = 1\nKidney_L = 2\nKidney_R = 3\n")
    return ref_dir, pred_dir, labels


def _run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


def test_evaluate_folders_writes_tidy_table(folders, tmp_path):
    ref_dir, pred_dir, labels = folders
    out = tmp_path / "out"
    result = _run(["evaluate", "--reference", str(ref_dir), "--prediction", str(pred_dir),
                   "--labels", str(labels), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "metrics.csv")
    assert len(table) == 4 * 3
    assert list(table.columns[:5]) == ["study", "centre", "model", "condition", "case"]
    assert set(table["status"]) == {"ok"}
    # case00 is an identical copy: DSC 1, distances 0
    c0 = table[table["case"] == "case00"]
    assert (c0["dsc"] == 1.0).all() and (c0["hd95"] == 0.0).all()
    # case01: every structure shifted by one voxel along x (0.9 mm): HD = 0.9 mm;
    # liver 7x9x11 voxels -> DSC = 2 * 7*9*10 / (2 * 7*9*11) = 10/11
    c1 = table[(table["case"] == "case01") & (table["structure"] == "Liver")].iloc[0]
    assert c1["hd"] == pytest.approx(0.9)
    assert c1["dsc"] == pytest.approx(10 / 11)
    assert c1["ref_ml"] == pytest.approx(7 * 9 * 11 * 0.9 * 0.8 * 2.5 / 1000)
    assert c1["tp"] == 7 * 9 * 10 and c1["fp"] == 7 * 9 and c1["fn"] == 7 * 9
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 3 and (summary["n_ok"] == 4).all()
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["tolerance_mm"] == 2.0
    assert len(run["input_sha256"]) == 8
    assert "Liver" in result.output  # the printed summary


def test_resume_and_force(folders, tmp_path):
    ref_dir, pred_dir, labels = folders
    out = tmp_path / "out"
    args = ["evaluate", "--reference", str(ref_dir), "--prediction", str(pred_dir), "--labels", str(labels), "--out", str(out)]
    first = _run(args)
    before = (out / "metrics.csv").read_bytes()
    assert "4 cases computed, 0 from cache" in first.output
    second = _run(args)
    assert "0 cases computed, 4 from cache" in second.output
    assert (out / "metrics.csv").read_bytes() == before
    # A changed prediction file invalidates its cached case only.
    ref, pred = _case(None, 2)
    _write(pred_dir / "case00.nii.gz", pred)
    third = _run(args)
    assert "1 cases computed, 3 from cache" in third.output
    forced = _run(args + ["--force"])
    assert "4 cases computed, 0 from cache" in forced.output


def test_study_toml_adds_centre_and_model(folders, tmp_path):
    ref_dir, pred_dir, labels = folders
    study = tmp_path / "study.toml"
    study.write_text(
        f"""
[study]
name = "mini"
labels = "{labels.name}"
tolerance_mm = 1.0

[[centres]]
name = "A"
reference = "ref"

[[models]]
name = "m1"
predictions = "pred"

[[models]]
name = "m2"
predictions = "pred"
"""
    )
    out = tmp_path / "out"
    result = _run(["evaluate", str(study), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "metrics.csv")
    assert set(table["model"]) == {"m1", "m2"} and set(table["centre"]) == {"A"}
    assert set(table["study"]) == {"mini"}
    # both models scored the same files: identical numbers
    a = table[table.model == "m1"].drop(columns="model").reset_index(drop=True)
    b = table[table.model == "m2"].drop(columns="model").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert json.loads((out / "run.json").read_text())["options"]["tolerance_mm"] == 1.0


def test_nnunet_dataset_json_labels_and_image_suffix(tmp_path):
    ref = np.zeros((6, 8, 8), np.uint8)
    ref[1:4, 2:5, 2:6] = 2
    _write(tmp_path / "ref" / "abc_001.nii.gz", ref)
    _write(tmp_path / "pred" / "abc_001.nii.gz", ref)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}}))
    out = tmp_path / "out"
    result = _run(["evaluate", "--reference", str(tmp_path / "ref"), "--prediction", str(tmp_path / "pred"),
                   "--labels", str(tmp_path / "dataset.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "metrics.csv")
    assert table.set_index("structure").loc["liver", "status"] == "absent"
    assert table.set_index("structure").loc["spleen", "dsc"] == 1.0
    from oarbench.io import find_cases

    (tmp_path / "img").mkdir()
    for name in ("abc_001_0000.nii.gz", "abc_001_0001.nii.gz"):
        _write(tmp_path / "img" / name, ref)
    assert list(find_cases(tmp_path / "img", images=True)) == ["abc_001"]


def _expect_error(args, *needles):
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    for needle in needles:
        assert needle in result.output, result.output
    return result


def test_errors_name_the_file_and_write_nothing(folders, tmp_path):
    ref_dir, pred_dir, labels = folders
    base = ["evaluate", "--reference", str(ref_dir), "--prediction", str(pred_dir), "--labels", str(labels)]

    # corrupt file
    bad = pred_dir / "case01.nii.gz"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 3])
    out = tmp_path / "o1"
    _expect_error(base + ["--out", str(out)], "case01.nii.gz", "cannot read")
    assert not (out / "metrics.csv").exists()
    bad.write_bytes(good)

    # different grid: spacing
    ref, pred = _case(None, 0)
    _write(pred_dir / "case02.nii.gz", pred, spacing=(1.0, 0.8, 2.5))
    out = tmp_path / "o2"
    _expect_error(base + ["--out", str(out)], "case02.nii.gz", "spacing")
    assert not (out / "metrics.csv").exists()
    # ... resampled on request: same voxels, nearly the same grid -> identical labels
    result = _run(base + ["--out", str(out), "--resample-prediction"])
    assert result.exit_code == 0
    # different origin and direction are reported too
    _write(pred_dir / "case02.nii.gz", pred, origin=(5.0, 0.0, 0.0))
    _expect_error(base + ["--out", str(tmp_path / "o3")], "origin")
    _write(pred_dir / "case02.nii.gz", pred, direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    _expect_error(base + ["--out", str(tmp_path / "o3")], "direction")
    _write(pred_dir / "case02.nii.gz", pred)

    # non-integer, negative, unknown labels
    _write(pred_dir / "case03.nii.gz", pred.astype(np.float32) * 0.5)
    _expect_error(base + ["--out", str(tmp_path / "o4")], "case03.nii.gz", "non-integer")
    _write(pred_dir / "case03.nii.gz", pred.astype(np.int16) - 1)
    _expect_error(base + ["--out", str(tmp_path / "o4")], "case03.nii.gz", ">= 0")
    p7 = pred.copy()
    p7[0, 0, 0] = 7
    _write(pred_dir / "case03.nii.gz", p7)
    _expect_error(base + ["--out", str(tmp_path / "o4")], "case03.nii.gz", "[7]", "not in the label map")
    _write(pred_dir / "case03.nii.gz", pred)

    # 4D image
    four = sitk.JoinSeries([sitk.GetImageFromArray(ref), sitk.GetImageFromArray(ref)])
    sitk.WriteImage(four, str(pred_dir / "case03.nii.gz"))
    _expect_error(base + ["--out", str(tmp_path / "o5")], "case03.nii.gz", "4D")
    _write(pred_dir / "case03.nii.gz", pred)

    # empty folder, missing folder
    (tmp_path / "empty").mkdir()
    _expect_error(["evaluate", "--reference", str(tmp_path / "empty"), "--prediction", str(pred_dir)], "empty", "no images")
    _expect_error(["evaluate", "--reference", str(ref_dir), "--prediction", str(tmp_path / "nope")], "nope", "not found")


def test_missing_prediction_is_error_unless_allowed(folders, tmp_path):
    ref_dir, pred_dir, labels = folders
    (pred_dir / "case03.nii.gz").unlink()
    base = ["evaluate", "--reference", str(ref_dir), "--prediction", str(pred_dir), "--labels", str(labels)]
    _expect_error(base + ["--out", str(tmp_path / "o")], "case03", "--allow-missing")
    out = tmp_path / "o2"
    result = _run(base + ["--out", str(out), "--allow-missing"])
    assert result.exit_code == 0
    table = pd.read_csv(out / "metrics.csv")
    missing = table[table.case == "case03"]
    assert len(missing) == 3 and set(missing.status) == {"missing"} and missing.dsc.isna().all()
    summary = pd.read_csv(out / "summary.csv")
    assert (summary["n_missing"] == 1).all() and (summary["n_ok"] == 3).all()


def test_statuses_in_the_table(tmp_path):
    ref = np.zeros((6, 10, 10), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:4, 1:4, 1:4] = 1  # Liver: missed
    pred[1:4, 6:9, 6:9] = 2  # Kidney_L: hallucinated; Kidney_R: absent
    _write(tmp_path / "r" / "c.nii.gz", ref)
    _write(tmp_path / "p" / "c.nii.gz", pred)
    labels = tmp_path / "l.toml"
    labels.write_text("[labels]\nLiver = 1\nKidney_L = 2\nKidney_R = 3\n")
    out = tmp_path / "o"
    _run(["evaluate", "--reference", str(tmp_path / "r"), "--prediction", str(tmp_path / "p"), "--labels", str(labels), "--out", str(out)])
    t = pd.read_csv(out / "metrics.csv").set_index("structure")
    assert t.loc["Liver", "status"] == "missed" and t.loc["Liver", "dsc"] == 0 and math.isinf(t.loc["Liver", "hd95"])
    assert t.loc["Kidney_L", "status"] == "hallucinated" and math.isinf(t.loc["Kidney_L", "msd"]) and t.loc["Kidney_L", "sdsc"] == 0
    assert t.loc["Kidney_L", "fp"] == 27 and t.loc["Liver", "fn"] == 27
    assert t.loc["Kidney_R", "status"] == "absent" and np.isnan(t.loc["Kidney_R", "dsc"]) and np.isnan(t.loc["Kidney_R", "hd95"])


def test_interrupted_run_resumes_to_identical_outputs(tmp_path):
    # Enough cases that a run can be killed part way; then a re-run must finish the
    # rest from the cache and give byte-identical files to an uninterrupted run.
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref = np.zeros((40, 64, 64), np.uint8)
    ref[5:35, 10:50, 10:50] = 1
    n_cases = 40
    for i in range(n_cases):
        _write(ref_dir / f"c{i:02d}.nii.gz", ref)
        _write(pred_dir / f"c{i:02d}.nii.gz", np.roll(ref, i % 4, axis=2))
    labels = tmp_path / "l.toml"
    labels.write_text("[labels]\nLiver = 1\n")
    cmd = [sys.executable, "-m", "oarbench.cli", "evaluate", "--reference", str(ref_dir), "--prediction", str(pred_dir),
           "--labels", str(labels), "--quiet"]
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cache = out / "cache"
    deadline = time.time() + 60

    def complete() -> int:  # finished cache files, not temporary ones being written
        return len([p for p in cache.rglob("*.json") if ".partial" not in p.name]) if cache.exists() else 0

    while time.time() < deadline and complete() < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.csv").exists()
    partial = complete()
    assert 2 <= partial < n_cases
    resumed = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, check=True)
    assert f"{n_cases - partial} cases computed, {partial} from cache" in resumed.stdout
    clean = tmp_path / "clean"
    subprocess.run(cmd + ["--out", str(clean)], capture_output=True, check=True)
    assert (out / "metrics.csv").read_bytes() == (clean / "metrics.csv").read_bytes()
    assert (out / "summary.csv").read_bytes() == (clean / "summary.csv").read_bytes()
    leftovers = [p for p in out.rglob("*") if ".partial" in p.name]
    assert leftovers == []
