"""metrics.parquet beside metrics.csv: partitioned layout, same table back, read by stats/report/gallery."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

pytest.importorskip("pyarrow")

from oarbench.cli import main  # noqa: E402
from oarbench.evaluate import TABLE_COLUMNS, EvalOptions, Job, evaluate_jobs, write_outputs  # noqa: E402
from oarbench.labels import LabelMap  # noqa: E402
from oarbench.tables import read_table, write_parquet  # noqa: E402

LABELS = LabelMap({1: "Liver", 2: "Kidney_L", 3: "Kidney_R"})


def _write(path: Path, arr: np.ndarray) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.9, 0.8, 2.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Two centres x two models (one with a missed kidney), evaluated and written."""
    root = tmp_path_factory.mktemp("tables")
    jobs = []
    for centre in ("A", "B"):
        for i in range(5):
            ref = np.zeros((12, 20, 24), np.uint8)
            ref[2:9, 3:12, 3:14] = 1
            ref[4:8, 13:17, 4:8] = 2
            ref[4:8, 13:17, 15:19] = 3
            _write(root / centre / "ref" / f"{centre}{i}.nii.gz", ref)
            _write(root / centre / "good" / f"{centre}{i}.nii.gz", np.roll(ref, i % 2, axis=2))
            bad = np.roll(ref, 1 + i % 3, axis=1)
            if i == 0:
                bad[bad == 3] = 0  # missed: DSC 0, infinite distances
            _write(root / centre / "bad" / f"{centre}{i}.nii.gz", bad)
        for model in ("good", "bad"):
            jobs.append(Job(root / centre / "ref", root / centre / model, study="s", centre=centre, model=model))
    table, prov = evaluate_jobs(jobs, EvalOptions(labels=LABELS), root / "out", progress=False)
    write_outputs(root / "out", table, prov)
    return root / "out"


def test_partitioned_layout_and_same_table(results: Path) -> None:
    parquet = results / "metrics.parquet"
    parts = sorted(str(p.relative_to(parquet)) for p in parquet.rglob("*.parquet"))
    assert parts == [f"centre={c}/model={m}/condition=original/part-0.parquet" for c in "AB" for m in ("bad", "good")]
    csv = read_table(results / "metrics.csv")
    pq = read_table(parquet)
    assert list(pq.columns) == list(TABLE_COLUMNS) == list(csv.columns)
    assert len(pq) == 2 * 2 * 5 * 3
    text = ["study", "centre", "model", "condition", "case", "structure", "status", "label", "tp", "fp", "fn"]
    pd.testing.assert_frame_equal(pq[text], csv[text])
    num = ["dsc", "hd95", "hd", "msd", "assd", "sdsc", "ref_ml", "pred_ml"]
    # the CSV keeps 10 significant digits, Parquet all of them
    pd.testing.assert_frame_equal(pq[num], csv[num], check_exact=False, rtol=1e-9)
    missed = pq[(pq["case"] == "A0") & (pq["model"] == "bad") & (pq["structure"] == "Kidney_R")].iloc[0]
    assert missed["status"] == "missed" and missed["dsc"] == 0 and math.isinf(missed["hd95"])


def test_empty_and_special_partition_values_round_trip(tmp_path: Path) -> None:
    nan = math.nan
    table = pd.DataFrame([
        {"study": "own-data", "centre": "all", "model": "NA", "condition": "rot_z+10", "case": "c1", "label": 1, "structure": "Liver",
         "status": "ok", "dsc": 0.5, "hd95": math.inf, "hd": 1.0, "msd": nan, "assd": 2.0, "sdsc": 0.25,
         "ref_ml": 1.0, "pred_ml": 2.0, "tp": 3, "fp": 4, "fn": 5},
        {"study": "own-data", "centre": "x y/z", "model": "m=1", "condition": "original", "case": "c0", "label": 2,
         "structure": "Kidney_L", "status": "absent", "dsc": nan, "hd95": nan, "hd": nan, "msd": nan,
         "assd": nan, "sdsc": nan, "ref_ml": 0.0, "pred_ml": 0.0, "tp": 0, "fp": 0, "fn": 0},
    ], columns=list(TABLE_COLUMNS))
    write_parquet(table, tmp_path / "m.parquet")
    write_parquet(table, tmp_path / "m.parquet")  # replaces, leaves no temporary folders
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]
    back = read_table(tmp_path / "m.parquet")
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    assert back["tp"].dtype == np.int64 and back["dsc"].dtype == np.float64
    with pytest.raises(ValueError, match="reserved"):
        write_parquet(table.assign(centre="_"), tmp_path / "n.parquet")
    # an empty key never comes back as a group key: the reader refuses it
    write_parquet(table.assign(centre=["", "x"]), tmp_path / "e.parquet")
    with pytest.raises(ValueError, match="1 row\\(s\\) with an empty 'centre'"):
        read_table(tmp_path / "e.parquet")


def test_stats_report_gallery_read_either(results: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for name in ("metrics.csv", "metrics.parquet"):
        r = runner.invoke(main, ["stats", str(results / name), "--out", str(tmp_path / name), "--no-table"])
        assert r.exit_code == 0, r.output
    a = pd.read_csv(tmp_path / "metrics.csv" / "stats.csv")
    b = pd.read_csv(tmp_path / "metrics.parquet" / "stats.csv")
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)
    # the report of a folder with only metrics.parquet
    only = tmp_path / "only"
    only.mkdir()
    (results / "metrics.parquet").rename(only / "metrics.parquet")
    try:
        r = runner.invoke(main, ["report", str(only), "--no-box-plots"])
        assert r.exit_code == 0, r.output
        html = (only / "report.html").read_text()
        assert "Kidney_R" in html
        from oarbench.cli.report_cmd import _read_table

        pd.testing.assert_frame_equal(_read_table(only / "metrics.parquet", "results table"),
                                      read_table(only / "metrics.parquet"))
    finally:
        (only / "metrics.parquet").rename(results / "metrics.parquet")


def test_bad_parquet_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "metrics.parquet"
    bad.mkdir()
    (bad / "part-0.parquet").write_bytes(b"not parquet")
    r = CliRunner().invoke(main, ["stats", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "metrics.parquet: cannot read the results table as Parquet" in r.output
    assert "Traceback" not in r.output
