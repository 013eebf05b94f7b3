"""Tests of the synthetic two-centre study (oarbench.phantoms, `oarbench phantoms`).

One small study (2 training + 4 test cases per centre, about 64 x 64 x 32 voxels) is generated
once per module; determinism and the CLI generate their own (smaller) ones.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from oarbench.labels import DEFAULT_LABELS
from oarbench.phantoms import (
    CONTRAST_PHASES,
    DEFAULT_DEMO_CONFIG,
    draw_cases,
    generate_study,
    load_demo_config,
    parse_demo_config,
    render_case,
)
from oarbench.phantoms.study import to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SEED = 11
DIR_A = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
DIR_B = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def small_config_dict(seed: int = SEED, test_cases: int = 4, train_cases: int = 2) -> dict:
    demo = tomllib.loads(DEFAULT_DEMO_CONFIG.read_text())
    demo["phantoms"] = {
        "seed": seed,
        "test_cases_per_centre": test_cases,
        "train_cases_per_centre": train_cases,
        "age_range": [0.5, 5.0],
        "prone_fraction": 0.5,
        "renal_tumour_fraction": 1.0,
        "nephrectomy_fraction": 0.75,
        "centres": {
            "A": {"dataset_id": 901, "size_xyz": [64, 64, 32], "spacing_xyz_mm": [2.8, 2.8, 4.0],
                  "direction": list(DIR_A), "phase": "portal_venous", "noise_hu": 12.0, "blur_mm": 1.0},
            "B": {"dataset_id": 902, "size_xyz": [48, 48, 24], "spacing_xyz_mm": [4.0, 4.0, 6.0],
                  "direction": list(DIR_B), "phase": "arterial", "noise_hu": 20.0, "blur_mm": 1.5},
        },
    }
    demo["error_model"]["fp_kidney_probability"] = 0.5
    demo["error_model"]["lr_swap_probability"] = 0.5
    return demo


def write_config(path: Path, data: dict) -> Path:
    path.write_text(to_toml(data))
    return path


def sha_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def physical_centroid(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """Centroid (x, y, z) in mm of a (z, y, x) mask, through the header (origin, spacing, direction)."""
    kji = np.argwhere(mask).mean(axis=0)
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(kji[2]), float(kji[1]), float(kji[0])]))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    config = parse_demo_config(small_config_dict(), "test")
    out = tmp_path_factory.mktemp("study")
    paths = generate_study(out, config)
    return config, paths


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path, study):
    config, paths = study
    again = generate_study(tmp_path / "again", config)
    assert again.generated
    first, second = sha_tree(paths.root), sha_tree(again.root)
    # images+labels, predictions of 3 models and the second observer, json, csv, toml/manifest/errors
    assert len(first) == 2 * (2 + 4) * 2 + (3 + 1) * 2 * 4 + 2 + 2 + 3
    assert first == second

    other = generate_study(tmp_path / "other", config.with_overrides(seed=SEED + 1))
    third = sha_tree(other.root)
    images = [k for k in first if "/imagesT" in k]
    assert images and all(first[k] != third[k] for k in images)


def test_existing_study_is_skipped_conflicts_refused_and_force_regenerates(tmp_path):
    config = parse_demo_config(small_config_dict(test_cases=1, train_cases=0), "test")
    paths = generate_study(tmp_path, config)
    before = sha_tree(tmp_path)
    assert not generate_study(tmp_path, config).generated
    assert sha_tree(tmp_path) == before
    with pytest.raises(ValueError, match="other settings"):
        generate_study(tmp_path, config.with_overrides(seed=99))
    (tmp_path / "mine.txt").write_text("user file")
    forced = generate_study(tmp_path, config.with_overrides(seed=99), force=True)
    assert forced.generated and (tmp_path / "mine.txt").read_text() == "user file"
    assert sha_tree(tmp_path) != before
    assert paths.study_toml.is_file()


# --------------------------------------------------------------------------- centres and files


@pytest.mark.parametrize("centre, size, spacing, direction", [
    ("A", (64, 64, 32), (2.8, 2.8, 4.0), DIR_A),
    ("B", (48, 48, 24), (4.0, 4.0, 6.0), DIR_B),
])
def test_centre_grids_are_as_configured(study, centre, size, spacing, direction):
    _, paths = study
    ds = paths.datasets[centre]
    files = sorted((ds / "imagesTs").glob("*_0000.nii.gz")) + sorted((ds / "imagesTr").glob("*_0000.nii.gz"))
    assert len(files) == 6
    for f in files:
        ct, image = read(f)
        label_dir = "labelsTs" if f.parent.name == "imagesTs" else "labelsTr"
        lab, label = read(ds / label_dir / f.name.replace("_0000", ""))
        assert image.GetSize() == size and label.GetSize() == size
        assert np.allclose(image.GetSpacing(), spacing) and np.allclose(label.GetSpacing(), spacing)
        assert np.allclose(image.GetDirection(), direction) and np.allclose(label.GetDirection(), direction)
        assert np.allclose(image.GetOrigin(), label.GetOrigin())
        assert ct.dtype == np.int16 and lab.dtype == np.uint8
        assert set(np.unique(lab)) <= set(range(20))
        # The field of view is centred on the isocentre (0, 0, 0): origin = -D (size - 1) / 2 * spacing.
        d = np.asarray(direction).reshape(3, 3)
        expected_origin = -d @ ((np.asarray(size) - 1) / 2.0 * np.asarray(spacing))
        assert np.allclose(image.GetOrigin(), expected_origin)


def test_dataset_json_and_metadata(study):
    config, paths = study
    for centre in ("A", "B"):
        ds = json.loads((paths.datasets[centre] / "dataset.json").read_text())
        assert ds["channel_names"] == {"0": "CT"}
        assert ds["labels"] == DEFAULT_LABELS.to_dataset_json_labels()
        assert ds["numTraining"] == 2 and ds["file_ending"] == ".nii.gz"
        rows = read_csv(paths.metadata[centre])
        assert list(rows[0]) == ["case", "centre", "age", "sex", "diagnosis", "nephrectomy", "position", "split"]
        test_cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (paths.datasets[centre] / "imagesTs").iterdir())
        assert sorted(r["case"] for r in rows if r["split"] == "test") == test_cases
        test_rows = [r for r in rows if r["split"] == "test"]
        # Exact shares, ceil(fraction * n) with n = 4: prone 0.5 -> 2; renal 1.0 -> 4; nephrectomy 0.75 * 4 -> 3.
        assert sum(r["position"] == "prone" for r in test_rows) == 2
        assert all(r["diagnosis"] == "renal tumour" for r in test_rows)
        assert sum(r["nephrectomy"] != "none" for r in test_rows) == 3
        assert all(0.5 <= float(r["age"]) <= 5.0 and r["centre"] == centre for r in rows)


@pytest.mark.nnunet
def test_nnunet_integrity_check_passes(study):
    pytest.importorskip("nnunetv2")
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    _, paths = study
    for centre in ("A", "B"):
        verify_dataset_integrity(str(paths.datasets[centre]), num_processes=1)


# --------------------------------------------------------------------------- anatomy vs metadata


def test_removed_kidney_is_absent_from_reference_and_image(study):
    config, paths = study
    centres = {c.name: c for c in config.phantoms.centres}
    cases = [c for c in draw_cases(config.phantoms) if c.nephrectomy != "none"]
    assert cases
    for spec in cases:
        sub = "Ts" if spec.split == "test" else "Tr"
        ds = paths.datasets[spec.centre]
        lab, _ = read(ds / f"labels{sub}" / f"{spec.case}.nii.gz")
        ct, _ = read(ds / f"images{sub}" / f"{spec.case}_0000.nii.gz")
        gone = DEFAULT_LABELS.value("Kidney_L" if spec.nephrectomy == "left" else "Kidney_R")
        kept = DEFAULT_LABELS.value("Kidney_R" if spec.nephrectomy == "left" else "Kidney_L")
        assert np.count_nonzero(lab == gone) == 0
        assert np.count_nonzero(lab == kept) > 0
        # The same patient without the operation (same anatomy and noise) shows where the kidney was.
        ct_intact, lab_intact = render_case(spec, centres[spec.centre], config.phantoms.seed, nephrectomy="none")
        fossa = lab_intact.array == gone
        assert fossa.sum() > 0
        kidney_hu = CONTRAST_PHASES[centres[spec.centre].phase]["Kidney"]  # 160 (PV) / 175 (arterial)
        assert ct_intact.array[fossa].mean() > kidney_hu - 60
        assert ct[fossa].mean() < kidney_hu - 100  # fat, soft tissue or bowel, not renal parenchyma
        # Nothing else changed: far (> 3 voxels) from the kidney the two images are identical.
        from scipy import ndimage

        near = ndimage.binary_dilation(fossa, iterations=3)
        assert np.array_equal(ct[~near], ct_intact.array[~near])
        assert np.array_equal(lab[~fossa], lab_intact.array[~fossa])


def test_prone_cases_are_rotated_in_patient_coordinates(study):
    config, paths = study
    seen = set()
    for spec in draw_cases(config.phantoms):
        sub = "Ts" if spec.split == "test" else "Tr"
        lab, image = read(paths.datasets[spec.centre] / f"labels{sub}" / f"{spec.case}.nii.gz")
        spine = physical_centroid(image, lab == DEFAULT_LABELS.value("Vertebrae"))
        organs = physical_centroid(image, (lab > 0) & (lab != DEFAULT_LABELS.value("Vertebrae")))
        spleen = physical_centroid(image, lab == DEFAULT_LABELS.value("Spleen"))
        liver = physical_centroid(image, lab == DEFAULT_LABELS.value("Liver"))
        # LPS: +y is posterior, +x is the patient's left (for a supine patient).
        if spec.position == "supine":
            assert spine[1] > organs[1] and spleen[0] > liver[0], spec.case
        else:
            assert spine[1] < organs[1] and spleen[0] < liver[0], spec.case
        seen.add((spec.centre, spec.position))
    assert seen == {("A", "supine"), ("A", "prone"), ("B", "supine"), ("B", "prone")}


# --------------------------------------------------------------------------- error model


def _contralateral(name: str) -> str:
    return name[:-1] + ("R" if name.endswith("L") else "L")


def test_error_model_produces_what_it_claims(study):
    config, paths = study
    errors = read_csv(paths.injected_errors)
    specs = {c.case: c for c in draw_cases(config.phantoms) if c.split == "test"}
    swaps = {(e["model"], e["case"]) for e in errors if e["error"] == "lr_swap"}
    fps = {(e["model"], e["case"]): e for e in errors if e["error"] == "fp_kidney"}
    missed = {(e["model"], e["case"], e["structure"]) for e in errors if e["error"] == "missed"}
    assert all(specs[c].position == "prone" for _, c in swaps)
    assert all(specs[c].nephrectomy != "none" and e["structure"] == ("Kidney_L" if specs[c].nephrectomy == "left"
               else "Kidney_R") for (_, c), e in fps.items())
    assert fps, "the test configuration should produce at least one false-positive fragment"
    lateral = {"Kidney_L", "Kidney_R", "Glnd_Adrenal_L", "Glnd_Adrenal_R", "Lung_L", "Lung_R"}
    for model in ("local-A", "local-B", "fl"):
        for case, spec in specs.items():
            ds = paths.datasets[spec.centre]
            ref, ref_img = read(ds / "labelsTs" / f"{case}.nii.gz")
            pred, pred_img = read(paths.prediction_dir(model, spec.centre) / f"{case}.nii.gz")
            assert pred.shape == ref.shape
            assert np.allclose(pred_img.GetSpacing(), ref_img.GetSpacing())
            assert np.allclose(pred_img.GetOrigin(), ref_img.GetOrigin())
            assert np.allclose(pred_img.GetDirection(), ref_img.GetDirection())
            swapped = (model, case) in swaps
            for value, name in DEFAULT_LABELS:
                source = _contralateral(name) if swapped and name in lateral else name
                in_source = np.any(ref == DEFAULT_LABELS.value(source))
                n_pred = int(np.count_nonzero(pred == value))
                if spec.nephrectomy != "none" and name == ("Kidney_L" if spec.nephrectomy == "left" else "Kidney_R"):
                    # The removed kidney: predicted exactly when a fragment or a swap was injected.
                    assert (n_pred > 0) == ((model, case) in fps or swapped), (model, case, name)
                    if (model, case) in fps and not swapped:
                        fp = fps[(model, case)]
                        assert n_pred == int(fp["voxels"])
                        voxel_ml = np.prod(ref_img.GetSpacing()) / 1000.0
                        assert float(fp["volume_ml"]) == pytest.approx(n_pred * voxel_ml, abs=1e-6)
                        # painted inside a ball of fp_kidney_volume_ml (3 mL), so never more than it holds,
                        # allowing for voxel centres on the sphere: (r + half the voxel diagonal)^3 / r^3
                        r = (3 * 3000.0 / (4 * np.pi)) ** (1 / 3)
                        diag = 0.5 * np.linalg.norm(ref_img.GetSpacing())
                        assert n_pred * voxel_ml <= 3.0 * ((r + diag) / r) ** 3
                    continue
                expected_empty = (not in_source) or (model, case, name) in missed
                assert (n_pred == 0) == expected_empty, (model, case, name)


def _mean_dice(paths, model: str, centre: str) -> float:
    """Mean Dice 2|A&B|/(|A|+|B|) over the structures present in reference and prediction."""
    values = []
    for ref_path in sorted((paths.datasets[centre] / "labelsTs").glob("*.nii.gz")):
        ref, _ = read(ref_path)
        pred, _ = read(paths.prediction_dir(model, centre) / ref_path.name)
        for value, _ in DEFAULT_LABELS:
            a, b = ref == value, pred == value
            if a.any() and b.any():
                values.append(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))
    return float(np.mean(values))


def test_local_models_degrade_across_centres_and_federated_is_stable(study):
    _, paths = study
    d = {(m, c): _mean_dice(paths, m, c) for m in ("local-A", "local-B", "fl") for c in ("A", "B")}
    gap_a = d[("local-A", "A")] - d[("local-A", "B")]
    gap_b = d[("local-B", "B")] - d[("local-B", "A")]
    assert gap_a > 0.05 and gap_b > 0.05, d
    assert abs(d[("fl", "A")] - d[("fl", "B")]) < 0.5 * min(gap_a, gap_b), d


def test_second_observer_disagrees_at_boundaries_only(study):
    # The second observer: every structure the reference has is drawn (no misses, no false
    # positive kidney, no left/right swap), never where the reference has nothing, and its
    # disagreement is larger for low-contrast hollow structures than for solid organs.
    from oarbench.study import load_study

    config, paths = study
    assert config.observers == ("observer-2",)
    assert [o.name for o in load_study(paths.study_toml).observers] == ["observer-2"]
    specs = [c for c in draw_cases(config.phantoms) if c.split == "test"]
    dice: dict[str, list[float]] = {}
    for spec in specs:
        ref, _ = read(paths.datasets[spec.centre] / "labelsTs" / f"{spec.case}.nii.gz")
        obs, _ = read(paths.prediction_dir("observer-2", spec.centre) / f"{spec.case}.nii.gz")
        for value, name in DEFAULT_LABELS:
            a, b = ref == value, obs == value
            assert a.any() == b.any(), (spec.case, name)
            if a.any():
                dice.setdefault(name, []).append(2.0 * np.count_nonzero(a & b) / (a.sum() + b.sum()))
    mean = {k: float(np.mean(v)) for k, v in dice.items()}
    # not a copy of the reference, and not a failing model either
    assert min(mean.values()) > 0.3 and np.mean(list(mean.values())) < 0.97, mean
    assert mean["Liver"] > mean["Duodenum"] and mean["Kidney_L"] > mean["Pancreas"], mean


# --------------------------------------------------------------------------- study.toml, config, CLI


def test_written_study_toml_resolves_against_its_folder(study):
    config, paths = study
    data = tomllib.loads(paths.study_toml.read_text())
    assert [c["name"] for c in data["centres"]] == ["A", "B"]
    for c in data["centres"]:
        assert (paths.root / c["images"]).is_dir() and (paths.root / c["reference"]).is_dir()
        assert (paths.root / c["metadata"]).is_file()
    for m in data["models"]:
        for c in ("A", "B"):
            assert (paths.root / m["predictions"].format(model=m["name"], centre=c)).is_dir()
    assert load_demo_config(paths.study_toml).as_dict() == config.as_dict()


def test_bad_config_values_raise_value_error_naming_the_file(tmp_path):
    data = small_config_dict()
    data["phantoms"]["centres"]["B"]["direction"] = [1, 0, 0, 0, 1, 0, 0, 0, 2]
    with pytest.raises(ValueError, match=r"bad\.toml.*direction"):
        load_demo_config(write_config(tmp_path / "bad.toml", data))
    data = small_config_dict()
    data["error_model"]["miss_probability"] = 1.5
    with pytest.raises(ValueError, match=r"bad2\.toml"):
        load_demo_config(write_config(tmp_path / "bad2.toml", data))
    data = small_config_dict()
    data["models"][0]["trained_on"] = ["C"]
    with pytest.raises(ValueError, match="trained_on"):
        load_demo_config(write_config(tmp_path / "bad3.toml", data))
    with pytest.raises(ValueError, match="not found"):
        load_demo_config(tmp_path / "missing.toml")


def test_demo_toml_defaults_are_the_documented_protocols():
    config = load_demo_config()
    a, b = config.phantoms.centres
    assert (a.name, a.size_xyz, a.spacing_xyz_mm) == ("A", (128, 128, 64), (2.8, 2.8, 4.0))
    assert (b.name, b.spacing_xyz_mm, b.direction[0], b.direction[4]) == ("B", (4.0, 4.0, 6.0), -1.0, -1.0)
    assert a.dataset_name == "Dataset901_CentreA" and b.dataset_name == "Dataset902_CentreB"
    assert [m.name for m in config.models] == ["local-A", "local-B", "fl"]
    assert config.phantoms.test_cases_per_centre == 20


def test_cli_generates_then_skips_and_reports_errors(tmp_path):
    from oarbench.cli import main

    cfg = write_config(tmp_path / "small.toml", small_config_dict(test_cases=2, train_cases=0))
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(main, ["phantoms", "--out", str(out), "--config", str(cfg), "--cases-per-centre", "1",
                                  "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert "wrote synthetic study (seed 5)" in result.output
    assert sorted(p.name for p in (out / "nnUNet_raw" / "Dataset901_CentreA" / "imagesTs").iterdir()) == ["A_ts_001_0000.nii.gz"]
    assert len(list((out / "predictions" / "fl" / "B").glob("*.nii.gz"))) == 1
    assert tomllib.loads((out / "study.toml").read_text())["phantoms"]["seed"] == 5
    again = runner.invoke(main, ["phantoms", "--out", str(out), "--config", str(cfg), "--cases-per-centre", "1",
                                 "--seed", "5"])
    assert again.exit_code == 0 and "already present" in again.output
    clash = runner.invoke(main, ["phantoms", "--out", str(out), "--config", str(cfg), "--cases-per-centre", "1"])
    assert clash.exit_code != 0 and "--force" in clash.output
    missing = runner.invoke(main, ["phantoms", "--out", str(out), "--config", str(tmp_path / "nope.toml")])
    assert missing.exit_code != 0 and "nope.toml" in missing.output
