"""APL against platipy 0.7.2 itself (a test-only dependency in its own environment, run in a
subprocess): which argument order of ``compute_metric_total_apl`` gives oarbench's value."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from oarbench.metrics import added_path_length
from tests._platipy import require_platipy
from tests._shapes import random_mask

_SCRIPT = """
import json, sys
import SimpleITK as sitk
from platipy.imaging.label.comparison import compute_metric_total_apl
jobs = json.loads(sys.argv[1])
out = []
for ref, pred, t in jobs:
    r, p = sitk.ReadImage(ref), sitk.ReadImage(pred)
    out.append([float(compute_metric_total_apl(r, p, t)), float(compute_metric_total_apl(p, r, t))])
print(json.dumps(out))
"""


def _write(path, mask, spacing_zyx):
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(img, str(path))
    return str(path)


def _platipy(jobs):
    python = require_platipy()
    res = subprocess.run([python, "-c", _SCRIPT, json.dumps(jobs)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_platipy_argument_order_is_reference_then_prediction(tmp_path):
    # a 10 x 10 reference square with a 4 x 4 prediction inside, 1 mm pixels, t = 1 mm: every
    # reference contour pixel (36) is 3 pixels from the prediction's contour (12 pixels)
    ref = np.zeros((3, 16, 16), bool)
    ref[:, 3:13, 3:13] = True
    pred = np.zeros_like(ref)
    pred[:, 6:10, 6:10] = True
    sp = (2.5, 1.0, 1.0)
    ours = {c: added_path_length(ref, pred, sp, 1.0, convention=c).apl_mm for c in ("exact", "platipy")}
    assert ours == {"exact": 3 * 36.0, "platipy": 3 * 36.0}
    (ref_pred, pred_ref), = _platipy([[_write(tmp_path / "r.nrrd", ref, sp), _write(tmp_path / "p.nrrd", pred, sp), 1.0]])
    assert ref_pred == 3 * 36.0  # platipy(reference, prediction): oarbench's value
    assert pred_ref == 3 * 12.0  # platipy(prediction, reference): the prediction's contour instead


def test_platipy_convention_equals_platipy_on_random_shapes(tmp_path, rng):
    jobs, ours = [], []
    for i in range(6):
        ref = np.zeros((6, 40, 40), bool)
        pred = np.zeros_like(ref)
        ref[:, 4:36, 4:36] = random_mask(rng, (6, 32, 32), "blob")
        pred[:, 4:36, 4:36] = random_mask(rng, (6, 32, 32), "blob")
        pred[i % 6] = False  # a slice without prediction: the whole reference contour is added
        sp = (2.5, 0.8, 1.1) if i % 2 else (3.0, 0.7, 0.7)
        t = (0.0, 0.8, 1.5, 2.0, 3.0, 4.0)[i]
        jobs.append([_write(tmp_path / f"r{i}.nrrd", ref, sp), _write(tmp_path / f"p{i}.nrrd", pred, sp), t])
        ours.append(added_path_length(ref, pred, sp, t, convention="platipy").apl_mm)
    theirs = _platipy(jobs)
    assert [r for r, _ in theirs] == pytest.approx(ours, rel=1e-12)
