"""Which label map a command uses: shipped maps, dataset.json found near the data, --structures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from oarbench.cli import main
from oarbench.labels import DEFAULT_LABELS, canonical_name, resolve_labels, shipped_label_map


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(img, str(path))


def _totalseg_case() -> np.ndarray:
    """A TotalSegmentator-numbered case: 1 spleen, 3 kidney_left, 5 liver, 90 brain, 117 costal cartilages."""
    a = np.zeros((8, 20, 20), np.uint8)
    a[1:4, 2:6, 2:6] = 1
    a[1:4, 10:14, 2:6] = 3
    a[4:7, 2:10, 10:18] = 5
    a[6:8, 15:18, 15:18] = 90
    a[0, 0:2, 0:2] = 117
    return a


@pytest.fixture
def totalseg(tmp_path):
    ref, pred = tmp_path / "ts" / "reference", tmp_path / "ts" / "totalseg_fast"
    for case in ("ct001", "ct002"):
        _write(ref / f"{case}.nii.gz", _totalseg_case())
        _write(pred / f"{case}.nii.gz", _totalseg_case())
    return ref, pred


def _run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_totalsegmentator_map_matches_its_class_list():
    ts = shipped_label_map("totalsegmentator")
    assert len(ts) == 117 and ts.values == list(range(1, 118))
    # values of the v2 'total' task (TotalSegmentator's totalsegmentator/map_to_binary.py, class_map["total"])
    expected = {1: "Spleen", 2: "Kidney_R", 3: "Kidney_L", 4: "Gallbladder", 5: "Liver", 6: "Stomach", 7: "Pancreas",
                8: "Glnd_Adrenal_R", 9: "Glnd_Adrenal_L", 15: "Esophagus", 51: "Heart", 52: "A_Aorta",
                62: "VenaCava_S", 63: "VenaCava_I", 79: "SpinalCord", 90: "Brain", 26: "vertebrae_S1",
                92: "rib_left_1", 104: "rib_right_1", 116: "sternum", 117: "costal_cartilages"}
    for value, name in expected.items():
        assert ts.name(value) == name
    # every TG-263 name given agrees with the alias table on the organs both know
    text = Path(__file__).parents[1].joinpath("oarbench", "data", "totalsegmentator_total_v2.csv").read_text()
    rows = pd.read_csv(pd.io.common.StringIO(text))
    for _, r in rows.iterrows():
        canon = canonical_name(r["totalsegmentator_name"])
        if canon != r["totalsegmentator_name"]:  # the alias table knows this organ
            assert canonical_name(r["name"]) == canon, r.to_dict()
    assert shipped_label_map("default") == DEFAULT_LABELS and len(DEFAULT_LABELS) == 19


def test_dataset_json_beside_the_reference_is_used(totalseg, tmp_path):
    ref, pred = totalseg
    labels = {"background": 0, **{name: v for v, name in shipped_label_map("totalsegmentator")}}
    (ref.parent / "dataset.json").write_text(json.dumps({"labels": labels}))
    r = _run(["evaluate", "--reference", ref, "--prediction", pred, "--out", tmp_path / "o", "--quiet"])
    assert r.exit_code == 0, r.output
    assert f"labels: {(ref.parent / 'dataset.json').resolve()}" in r.output
    table = pd.read_csv(tmp_path / "o" / "metrics.csv")
    assert table.loc[table["label"] == 1, "structure"].unique().tolist() == ["Spleen"]
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["labels_source"] == str((ref.parent / "dataset.json").resolve())


def test_default_map_only_when_nothing_else_and_said(totalseg, tmp_path):
    ref, pred = totalseg
    # values 90 and 117 are outside the 19-OAR map: an error naming --labels and docs/labels.md
    r = _run(["evaluate", "--reference", ref, "--prediction", pred, "--out", tmp_path / "o", "--quiet"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "the default 19-OAR map (no --labels and no dataset.json" in r.output
    assert "are not in the label map" in r.output and "--labels" in r.output and "docs/labels.md" in r.output
    assert "ct001.nii.gz" in r.output
    # in-range values scored with the default map: said in the terminal and in run.json
    small = tmp_path / "small"
    _write(small / "ref" / "c1.nii.gz", np.minimum(_totalseg_case(), 5))
    r = _run(["evaluate", "--reference", small / "ref", "--prediction", small / "ref", "--out", tmp_path / "d", "--quiet"])
    assert r.exit_code == 0 and "labels: the default 19-OAR map" in r.output
    run = json.loads((tmp_path / "d" / "run.json").read_text())
    assert run["labels_source"] == "default" and "default 19-OAR map" in run["labels_note"]


def test_totalsegmentator_labels_and_structures(totalseg, tmp_path):
    ref, pred = totalseg
    r = _run(["evaluate", "--reference", ref, "--prediction", pred, "--labels", "totalsegmentator",
              "--structures", "Liver,kidney_left,Spleen", "--out", tmp_path / "o", "--quiet"])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(tmp_path / "o" / "metrics.csv")
    # only the three named structures, at TotalSegmentator's values; brain/cartilage values are ignored
    got = table[["label", "structure"]].drop_duplicates().sort_values("label").to_records(index=False).tolist()
    assert got == [(1, "Spleen"), (3, "Kidney_L"), (5, "Liver")]
    assert (table["dsc"] == 1.0).all() and len(table) == 2 * 3
    assert "scoring 3 structure(s)" in r.output


def test_label_option_errors(totalseg, tmp_path):
    ref, pred = totalseg
    r = _run(["evaluate", "--reference", ref, "--prediction", pred, "--labels", "totalseg", "--out", tmp_path / "o"])
    assert r.exit_code == 1 and "docs/labels.md" in r.output and "totalsegmentator" in r.output
    r = _run(["evaluate", "--reference", ref, "--prediction", pred, "--labels", "totalsegmentator",
              "--structures", "Liver,Parotid_L", "--out", tmp_path / "o"])
    assert r.exit_code == 1 and "Parotid_L" in r.output and "docs/labels.md" in r.output


def test_resolve_labels_search_stops_two_levels_up(tmp_path):
    deep = tmp_path / "a" / "b" / "c" / "labelsTs"
    deep.mkdir(parents=True)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "X": 1}}))
    assert resolve_labels(None, deep).source == "default"  # four levels up: not this dataset's
    (deep.parent.parent / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "Y": 1}}))
    assert resolve_labels(None, deep).labels.names == ["Y"]
