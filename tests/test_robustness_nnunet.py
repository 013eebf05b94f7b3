"""The nnU-Net v2 predictor end to end on CPU (and on CUDA where a GPU exists), with a randomly initialised small network.

The model folder (plans.json, dataset.json, fold_0/checkpoint_final.pth) is built here by
hand: a 3-stage PlainConvUNet with 4-8-16 features and random weights. That tests the
plumbing (loading without nnU-Net's trainer lookup, preprocessing, sliding window, export,
mapping back onto the reference grid), not segmentation quality.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests._unet import plain_conv_unet

from oarbench.io import Volume, read_volume, write_volume
from oarbench.labels import LabelMap

pytestmark = [pytest.mark.nnunet, pytest.mark.slow]


def _plans() -> dict:
    arch = plain_conv_unet([4, 8, 16], dim=3, convs=1)
    resample = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset999_Tiny",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 2.0, 2.0],
        "original_median_shape_after_transp": [16, 16, 16],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 1,
                "patch_size": [16, 16, 16],
                "median_image_size_in_voxels": [16, 16, 16],
                "spacing": [2.0, 2.0, 2.0],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resample,
                "resampling_fn_seg_kwargs": {**resample, "is_seg": True},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": resample,
                "architecture": arch,
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 300.0, "mean": 100.0, "median": 100.0, "min": -100.0,
                  "percentile_00_5": -50.0, "percentile_99_5": 250.0, "std": 50.0}
        },
    }


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("nnunetv2")
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    root = tmp_path_factory.mktemp("nnunet") / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (root / "fold_0").mkdir(parents=True)
    plans = _plans()
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "Kidney_L": 1, "Kidney_R": 2},
               "numTraining": 1, "file_ending": ".nii.gz"}
    (root / "plans.json").write_text(json.dumps(plans))
    (root / "dataset.json").write_text(json.dumps(dataset))
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(0)
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                 1, 3, allow_init=True, deep_supervision=False)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               root / "fold_0" / "checkpoint_final.pth")
    return root


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_nnunet_predictor_end_to_end(model_folder, tmp_path, device):
    import torch

    from oarbench.robustness import parse_predictor, run_robustness

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA run skipped: torch sees no CUDA GPU on this machine")

    rng = np.random.default_rng(3)
    # 20 x 18 x 22 voxels at (2.5, 2, 1.5) mm: not the plans' spacing, so nnU-Net resamples
    ct = rng.normal(40, 20, size=(20, 18, 22)).astype(np.int16)
    ref = np.zeros(ct.shape, np.uint8)
    ref[5:12, 4:10, 2:8] = 1
    ref[5:12, 4:10, 13:19] = 2
    spacing, origin, direction = (2.5, 2.0, 1.5), (5.0, -3.0, 12.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    images, reference = tmp_path / "img", tmp_path / "ref"
    write_volume(Volume(ct, spacing, origin, direction), images / "T001_0000.nii.gz")
    write_volume(Volume(ref, spacing, origin, direction), reference / "T001.nii.gz")

    pred = parse_predictor(f"nnunet:{model_folder}:0", device=device, use_mirroring=False)
    outputs = pred.predict([images / "T001_0000.nii.gz"], tmp_path / "pred")
    out = read_volume(outputs["T001"])
    img = read_volume(images / "T001_0000.nii.gz")
    # a label file on the input's grid, values within the label set
    assert out.array.shape == img.array.shape
    assert np.allclose(out.spacing, img.spacing) and np.allclose(out.origin, img.origin)
    assert np.allclose(out.direction, img.direction)
    assert set(np.unique(out.array)) <= {0, 1, 2}
    labels = LabelMap({1: "Kidney_L", 2: "Kidney_R"})
    res = run_robustness(images, reference, pred, ["flip_lr", "rot_z+10"], labels)
    # the small rotation brings its control (its own resampling and label mapping, no rotation)
    assert set(res.table["condition"]) == {"original", "flip_lr", "rot_z+10", "resample_z+10"}
    assert len(res.table) == 4 * 2 and set(res.table["status"]) <= {"ok", "missed", "hallucinated"}
