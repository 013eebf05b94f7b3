"""A small plain folder pair as a user brings it: CT images, references, two models' predictions.

Values follow the default 19-OAR numbering (1 Liver, 2 Spleen, 3 Kidney_L,
4 Kidney_R). The CT holds each organ at its own HU, so the ``segment.py``
predictor (a thresholding "model") reproduces the reference exactly from the
image: under a flip or rotation its prediction, mapped back, is the
reference again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SPACING_XYZ = (1.5, 1.5, 3.0)
HU = {1: 60, 2: 45, 3: 30, 4: 20}  # organ value -> HU (distinct, so thresholds separate them)
N_CASES = 6

SEGMENT_SCRIPT = '''
import argparse, pathlib, sys
import numpy as np
import SimpleITK as sitk
HU = {1: 60, 2: 45, 3: 30, 4: 20}

def segment(path_in, path_out):
    img = sitk.ReadImage(str(path_in))
    ct = sitk.GetArrayFromImage(img)
    seg = np.zeros(ct.shape, np.uint8)
    for value, hu in HU.items():
        seg[np.abs(ct - hu) < 4] = value
    out = sitk.GetImageFromArray(seg)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path_out))

p = argparse.ArgumentParser()
p.add_argument("--in", "--image", dest="inp", required=True)
p.add_argument("--out", required=True)
p.add_argument("--fail", action="store_true")
a = p.parse_args()
if a.fail:
    print("Traceback (most recent call last):", file=sys.stderr)
    for i in range(30):
        print(f'  File "/opt/tool/layer{i}.py", line {i + 1}, in forward', file=sys.stderr)
    print("RuntimeError: CUDA out of memory (simulated)", file=sys.stderr)
    sys.exit(3)
inp, out = pathlib.Path(a.inp), pathlib.Path(a.out)
if inp.is_dir():
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(inp.glob("*_0000.nii.gz")):
        segment(f, out / f.name.replace("_0000.nii.gz", ".nii.gz"))
else:
    segment(inp, out)
'''


def _write(path: Path, arr: np.ndarray) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING_XYZ)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def reference_case(i: int) -> np.ndarray:
    """Label map (z, y, x) of case ``i``: liver, spleen and two kidneys as boxes."""
    ref = np.zeros((14, 28, 32), np.uint8)
    ref[2:11, 4:14, 3:15 + i % 2] = 1
    ref[3:9, 5:10, 20:26] = 2
    ref[4:10, 17:23, 6:11] = 4   # patient right is image left (LPS, x increasing to the left)
    ref[4:10, 17:23, 21:26 - i % 2] = 3
    return ref


def make_folder_pair(root: Path, *, dataset_json: bool = True) -> dict[str, Path]:
    """Write ``root/imagesTs``, ``root/labelsTs``, ``root/model_a``, ``root/model_b``, ``root/segment.py``.

    model_a shifts every organ by one voxel along x in odd cases; model_b by
    two voxels in every case and misses Spleen in case 0.
    """
    rng = np.random.default_rng(7)
    paths = {"images": root / "imagesTs", "reference": root / "labelsTs",
             "model_a": root / "model_a", "model_b": root / "model_b"}
    for i in range(N_CASES):
        case = f"case{i:03d}"
        ref = reference_case(i)
        ct = rng.normal(-100.0, 1.0, ref.shape).astype(np.float32)
        for value, hu in HU.items():
            ct[ref == value] = hu + rng.normal(0, 0.5, int((ref == value).sum()))
        _write(paths["images"] / f"{case}_0000.nii.gz", ct.astype(np.int16))
        _write(paths["reference"] / f"{case}.nii.gz", ref)
        a = np.roll(ref, i % 2, axis=2)
        b = np.roll(ref, 2, axis=2)
        if i == 0:
            b[b == 2] = 0
        _write(paths["model_a"] / f"{case}.nii.gz", a)
        _write(paths["model_b"] / f"{case}.nii.gz", b)
    if dataset_json:
        (root / "dataset.json").write_text(json.dumps({
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "Liver": 1, "Spleen": 2, "Kidney_L": 3, "Kidney_R": 4},
            "numTraining": 0, "file_ending": ".nii.gz"}))
        paths["dataset_json"] = root / "dataset.json"
    script = root / "segment.py"
    script.write_text(SEGMENT_SCRIPT)
    paths["script"] = script
    paths["python"] = Path(sys.executable)
    return paths
