"""Site harmonisation: a case stored flipped, rotated by 90 degrees or feet-first predicts the same
label map in physical space as its canonical twin, voxel for voxel.

The twins are made with SimpleITK's ``DICOMOrient`` (an independent implementation of the
re-orientation); the predictor is a deterministic toy that reads only the voxel array (as
nnU-Net does), so without harmonisation the twins' predictions differ. The last test runs the
real nnU-Net prediction path with a small random network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oarbench.io import Volume, read_volume, write_volume

# stored orientations of the same patient: (name, DICOMOrient code). LPS is the canonical twin.
TWINS = [
    ("canonical", "LPS"),
    ("flipped_xy", "RAS"),     # x and y flipped (the demo's centre B)
    ("rotated_90", "PRS"),     # x and y axes swapped: a 90-degree in-plane rotation of the storage
    ("feet_first", "LPI"),     # slices stored from head to feet
    ("all_three", "ARI"),
]


def _canonical_case() -> Volume:
    rng = np.random.default_rng(7)
    arr = rng.normal(0, 30, size=(9, 11, 13)).astype(np.float32)  # z, y, x: every axis a different length
    arr[2:6, 3:8, 1:5] += 200.0  # an object off centre, on the patient's right
    arr[5:8, 6:10, 8:12] += 250.0  # another one, on the left
    return Volume(arr, (3.0, 1.25, 0.75), (-20.0, 7.5, 3.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def _store(volume: Volume, code: str, path: Path) -> Path:
    import SimpleITK as sitk

    image = sitk.DICOMOrient(volume.to_image(), code)
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()) == code
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _toy_run(inputs: list[Path], stems: list[Path]) -> None:
    """A model that sees only the array: label 1 where bright in the first half of array axis x,
    2 where bright in the second half, 3 in the first 3 slices; written on the input's grid."""
    for p, stem in zip(inputs, stems):
        v = read_volume(p)
        a = v.array
        lab = np.zeros(a.shape, np.uint8)
        half = a.shape[2] // 2
        bright = a > 100
        lab[:, :, :half][bright[:, :, :half]] = 1
        lab[:, :, half:][bright[:, :, half:]] = 2
        lab[:3][lab[:3] == 0] = 3
        write_volume(v.with_array(lab), Path(str(stem) + ".nii.gz"))


def _in_lps(path: Path) -> tuple[np.ndarray, tuple, tuple]:
    """A label file in LPS index order with its grid, by SimpleITK (physical-space comparison)."""
    import SimpleITK as sitk

    image = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    return sitk.GetArrayFromImage(image), image.GetOrigin(), image.GetSpacing()


def _twins(tmp_path: Path) -> dict[str, Path]:
    case = _canonical_case()
    return {name: _store(case, code, tmp_path / name / "T001_0000.nii.gz") for name, code in TWINS}


def test_twins_predict_the_same_in_physical_space(tmp_path):
    from oarbench.train.harmonise import predict_in_canonical

    twins = _twins(tmp_path)
    got = {}
    for name, img in twins.items():
        out = predict_in_canonical([img], ["T001"], tmp_path / "pred" / name, _toy_run)["T001"]
        pred, image = read_volume(out), read_volume(img)
        # written on the input's own grid
        assert pred.array.shape == image.array.shape
        assert np.allclose(pred.spacing, image.spacing) and np.allclose(pred.origin, image.origin, atol=1e-4)
        assert np.allclose(pred.direction, image.direction)
        got[name] = _in_lps(out)
    ref, origin, spacing = got["canonical"]
    assert set(np.unique(ref)) == {0, 1, 2, 3}
    for name, (arr, o, s) in got.items():
        assert np.allclose(o, origin, atol=1e-4) and np.allclose(s, spacing), name
        assert int(np.count_nonzero(arr != ref)) == 0, name


def test_without_harmonisation_the_twins_differ(tmp_path):
    """The control: the same toy model on the arrays as stored gives other label maps in physical space."""
    twins = _twins(tmp_path)
    got = {}
    for name, img in twins.items():
        stem = tmp_path / "raw" / name / "T001"
        stem.parent.mkdir(parents=True)
        _toy_run([img], [stem])
        got[name] = _in_lps(Path(str(stem) + ".nii.gz"))[0]
    for name in ("flipped_xy", "rotated_90", "feet_first", "all_three"):
        assert np.count_nonzero(got[name] != got["canonical"]) > 0, name


def test_canonical_matches_dicomorient_lps(tmp_path):
    import SimpleITK as sitk

    from oarbench.train.harmonise import from_canonical, orientation_code, to_canonical

    for name, img in _twins(tmp_path).items():
        vol = read_volume(img)
        assert orientation_code(vol.direction) == dict(TWINS)[name]
        canon = to_canonical(vol)
        ref = sitk.DICOMOrient(sitk.ReadImage(str(img)), "LPS")
        np.testing.assert_array_equal(canon.array, sitk.GetArrayFromImage(ref))
        assert np.allclose(canon.origin, ref.GetOrigin(), atol=1e-4)
        assert np.allclose(canon.spacing, ref.GetSpacing()[::-1])
        assert canon.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        back = from_canonical(canon, vol)
        np.testing.assert_array_equal(back.array, vol.array)
        assert back.origin == vol.origin and back.direction == vol.direction


def _oblique(tmp_path: Path) -> Path:
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    vol = _canonical_case()
    vol = Volume(vol.array, vol.spacing, vol.origin, (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return write_volume(vol, tmp_path / "oblique" / "T009_0000.nii.gz")


def test_oblique_is_refused_naming_the_file(tmp_path):
    from oarbench.train.harmonise import predict_in_canonical

    img = _oblique(tmp_path)
    with pytest.raises(ValueError, match=r"T009_0000\.nii\.gz: oblique image direction"):
        predict_in_canonical([img], ["T009"], tmp_path / "pred", _toy_run)
    assert not (tmp_path / "pred" / "T009.nii.gz").exists()


def _dataset(root: Path, codes: list[str]) -> Path:
    d = root / "Dataset777_Mixed"
    case = _canonical_case()
    lab = case.with_array((case.array > 100).astype(np.uint8))
    for i, code in enumerate(codes):
        _store(case, code, d / "imagesTr" / f"c{i}_0000.nii.gz")
        _store(lab, code, d / "labelsTr" / f"c{i}.nii.gz")
    (d / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1},
                                                "numTraining": len(codes), "file_ending": ".nii.gz"}))
    return d


def test_harmonise_dataset_and_its_record(tmp_path):
    from oarbench.train.harmonise import RECORD, harmonise_dataset, record_summary

    src = _dataset(tmp_path / "raw", ["LPS", "RAS", "LPI"])
    out = harmonise_dataset(src, tmp_path / "harmonised")
    assert out == tmp_path / "harmonised" / "Dataset777_Mixed"
    first = read_volume(out / "imagesTr" / "c0_0000.nii.gz")
    assert (out / "imagesTr" / "c0_0000.nii.gz").is_symlink()  # already canonical: linked, not copied
    for sub, stem in (("imagesTr", "c{}_0000"), ("labelsTr", "c{}")):
        ref = read_volume(out / sub / (stem.format(0) + ".nii.gz"))
        for i in (1, 2):
            v = read_volume(out / sub / (stem.format(i) + ".nii.gz"))
            assert v.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
            np.testing.assert_array_equal(v.array, ref.array)
            assert np.allclose(v.origin, first.origin, atol=1e-4)
    record = json.loads((out / RECORD).read_text())
    assert record["canonical"] == "LPS"
    assert {k: v["stored"] for k, v in record["files"].items() if k.startswith("imagesTr")} == \
        {"imagesTr/c0_0000.nii.gz": "LPS", "imagesTr/c1_0000.nii.gz": "RAS", "imagesTr/c2_0000.nii.gz": "LPI"}
    assert record_summary(record) == {"orientation": "LPS", "images_by_stored_orientation":
                                      {"LPI": 1, "LPS": 1, "RAS": 1}, "images_reoriented": 2}
    assert record_summary(None) == {"orientation": "as stored"}
    # done again only where a source changed
    stamp = (out / "imagesTr" / "c1_0000.nii.gz").stat().st_mtime_ns
    harmonise_dataset(src, tmp_path / "harmonised")
    assert (out / "imagesTr" / "c1_0000.nii.gz").stat().st_mtime_ns == stamp


def test_harmonise_dataset_refuses_oblique(tmp_path):
    from oarbench.train.harmonise import harmonise_dataset

    src = _dataset(tmp_path / "raw", ["LPS"])
    _oblique(tmp_path)
    (tmp_path / "oblique" / "T009_0000.nii.gz").rename(src / "imagesTr" / "c5_0000.nii.gz")
    with pytest.raises(ValueError, match=r"c5_0000\.nii\.gz: oblique image direction"):
        harmonise_dataset(src, tmp_path / "harmonised")


def test_link_dataset_harmonises_by_default(tmp_path):
    from oarbench.train.nnunet import NnunetPaths, TrainerOptions, link_dataset

    src = _dataset(tmp_path / "raw", ["RAS", "LPS"])
    paths = NnunetPaths.under(tmp_path / "work")
    name = link_dataset(src, paths)
    assert (Path(paths.raw) / name).resolve() == (tmp_path / "work" / "harmonised" / name).resolve()
    plain = NnunetPaths.under(tmp_path / "plain")
    assert link_dataset(src, plain, harmonise=False) == name
    assert (Path(plain.raw) / name).resolve() == src.resolve()
    assert TrainerOptions().harmonise is True
    with pytest.raises(ValueError, match="harmonise"):
        TrainerOptions(harmonise="yes")


def _body(orientation):
    fp = {"spacings": [[1.0, 1.0, 1.0]], "shapes_after_crop": [[4, 4, 4]],
          "foreground_intensity_properties_per_channel": {"0": {k: 1.0 for k in (
              "mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5")}},
          "median_relative_size_after_cropping": 1.0}
    if orientation is not None:
        fp["oarbench_orientation"] = orientation
    return {"fingerprint": fp, "dataset": {"labels": {"background": 0, "x": 1}, "channel_names": {"0": "CT"},
                                           "file_ending": ".nii.gz"}, "num_cases": 1}


def test_federation_carries_or_refuses_the_orientation():
    from oarbench.train.federated import merge_site_messages

    merged, _ = merge_site_messages({"A": _body("LPS"), "B": _body("LPS")})
    assert merged["oarbench_orientation"] == "LPS"
    merged, _ = merge_site_messages({"A": _body(None), "B": _body(None)})
    assert "oarbench_orientation" not in merged
    for other in (None, ["LPS"], "RAS"):
        with pytest.raises(ValueError, match="disagree on the orientation"):
            merge_site_messages({"A": _body("LPS"), "B": _body(other)})


def test_install_plans_refuses_another_orientation(tmp_path):
    from oarbench.train.nnunet import NnunetPaths, install_plans, link_dataset

    src = _dataset(tmp_path / "raw", ["RAS"])
    paths = NnunetPaths.under(tmp_path / "work")
    name = link_dataset(src, paths)
    install_plans(paths, name, {"configurations": {}, "oarbench_orientation": "LPS"})
    with pytest.raises(ValueError, match="orientation as stored"):
        install_plans(paths, name, {"configurations": {}})


# ----------------------------------------------------------------------------- the real nnU-Net path


@pytest.mark.slow
@pytest.mark.nnunet
def test_nnunet_model_twins_predict_the_same(tmp_path):
    """A small random nnU-Net network whose plans say it was trained in LPS: every twin's
    prediction, through NnUNetModelPredictor, is the canonical twin's in physical space."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("nnunetv2")
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from oarbench.robustness.predictors import NnUNetModelPredictor
    from tests.test_robustness_nnunet import _plans

    folder = tmp_path / "model"
    (folder / "fold_0").mkdir(parents=True)
    plans = dict(_plans(), oarbench_orientation="LPS")
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 1,
        "file_ending": ".nii.gz"}))
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(0)
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                 1, 3, allow_init=True, deep_supervision=False)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               folder / "fold_0" / "checkpoint_final.pth")
    model = NnUNetModelPredictor(folder, folds=(0,), use_mirroring=False)
    assert model.describe()["orientation"] == "LPS"
    got = {}
    for name, img in _twins(tmp_path / "in").items():
        out = model.predict([img], tmp_path / "pred" / name)["T001"]
        pred, image = read_volume(out), read_volume(img)
        assert pred.array.shape == image.array.shape and np.allclose(pred.direction, image.direction)
        got[name] = _in_lps(out)[0]
    assert len(np.unique(got["canonical"])) > 1  # the network does not predict one label everywhere
    for name, arr in got.items():
        assert int(np.count_nonzero(arr != got["canonical"])) == 0, name


def test_cli_train_local_harmonise_switch(tmp_path, monkeypatch):
    """`oarbench train local` passes --harmonise/--no-harmonise to train_local and prints what was done."""
    from click.testing import CliRunner

    from oarbench.cli import main
    from oarbench.train import nnunet

    got = []

    def fake_train_local(dataset_dir, out, **kw):
        got.append(kw["options"].harmonise)
        h = ({"orientation": "LPS", "images_by_stored_orientation": {"LPS": 1, "RAS": 2}, "images_reoriented": 2}
             if kw["options"].harmonise else {"orientation": "as stored"})
        return {"model_folder": str(out / "m"), "fold": "all", "plan_preprocess_s": 1.0, "train_s": 2.0,
                "s_per_iteration": 0.5, "num_cases": 3, "harmonisation": h}

    monkeypatch.setattr(nnunet, "train_local", fake_train_local)
    ds = _dataset(tmp_path / "raw", ["RAS"])
    res = CliRunner().invoke(main, ["train", "local", "--dataset", str(ds), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "harmonisation: 2 of 3 images reoriented to LPS" in res.output
    res = CliRunner().invoke(main, ["train", "local", "--dataset", str(ds), "--out", str(tmp_path / "o"),
                                    "--no-harmonise"])
    assert res.exit_code == 0, res.output
    assert "harmonisation: off" in res.output and got == [True, False]
