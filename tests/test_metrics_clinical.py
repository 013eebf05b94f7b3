"""Added path length, volumetric similarity, centroid distance, per-structure tolerances and
resolution warnings: worked cases by hand, a brute-force slice-wise oracle, SimpleITK's
contour and dilation filters (the primitives platipy's APL is built from)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from oarbench.labels import LabelMap
from oarbench.metrics import (
    added_path_length,
    centroid_distance,
    compute_surface_distances,
    contour_pixels,
    evaluate_labels,
    resolution_warning,
    surface_dice,
    volumetric_similarity,
)
from tests._shapes import random_mask


def _square(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[..., rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


# ---------------------------------------------------------------------------
# Worked cases by hand
# ---------------------------------------------------------------------------


def test_apl_worked_case_shifted_square():
    # Reference: 4x4 pixel square, rows 2-5, cols 2-5 (1 mm pixels): its contour is the 12
    # border pixels. Prediction: the same square at cols 5-8; its left edge (col 5, rows 2-5)
    # coincides with the reference's right edge.
    ref = _square((1, 10, 12), (2, 6), (2, 6))
    pred = _square((1, 10, 12), (2, 6), (5, 9))
    sp = (3.0, 1.0, 1.0)
    # tolerance 0: 12 - 4 coinciding pixels = 8 added pixels -> 8 mm
    assert added_path_length(ref, pred, sp, 0.0).apl_mm == 8.0
    # 1 mm: col 4's contour pixels (rows 2 and 5) are 1 mm from (row, 5) -> accepted; left:
    # col 2 (4 pixels) + col 3 (rows 2, 5) = 6 -> 6 mm
    assert added_path_length(ref, pred, sp, 1.0).apl_mm == 6.0
    # 2 mm: col 3 is 2 mm away -> accepted; col 2 is 3 mm away: 4 pixels -> 4 mm
    assert added_path_length(ref, pred, sp, 2.0).apl_mm == 4.0
    assert added_path_length(ref, pred, sp, 3.0).apl_mm == 0.0
    # anisotropic pixels 1 x 2 mm (rows x cols): the length of a pixel is the mean, 1.5 mm;
    # at 2 mm col 4 (2 mm away) is accepted, col 3 (4 mm) and col 2 (6 mm) are not: 6 pixels
    res = added_path_length(ref, pred, (3.0, 1.0, 2.0), 2.0)
    assert res.n_pixels == 6 and res.apl_mm == 9.0
    # two identical slices: twice the length, the same per slice
    ref2, pred2 = np.concatenate([ref, ref]), np.concatenate([pred, pred])
    two = added_path_length(ref2, pred2, sp, 1.0)
    assert two.apl_mm == 12.0 and two.n_slices == 2 and two.apl_mm_per_slice == 6.0


def test_apl_empty_masks_and_missing_slices():
    ref = _square((3, 10, 10), (2, 6), (2, 6))
    sp = (2.0, 0.5, 0.5)
    # empty prediction: the whole reference contour, 12 pixels x 0.5 mm x 3 slices
    assert added_path_length(ref, np.zeros_like(ref), sp, 5.0).apl_mm == 3 * 12 * 0.5
    # prediction on slice 0 only (identical there): slices 1 and 2 add their whole contour
    pred = np.zeros_like(ref)
    pred[0] = ref[0]
    assert added_path_length(ref, pred, sp, 5.0).apl_mm == 2 * 12 * 0.5
    # empty reference: nothing to add
    empty = added_path_length(np.zeros_like(ref), ref, sp, 1.0)
    assert empty.apl_mm == 0.0 and empty.n_slices == 0 and empty.apl_mm_per_slice == 0.0


def test_apl_platipy_convention_rounds_the_tolerance_up_to_pixels():
    # pixel 0.8 mm, tolerance 1 mm: platipy dilates by ceil(1 / 0.8) = 2 pixels with ITK's ball
    # (pixel distance <= 2.5), the exact convention accepts <= 1 mm = 1.25 pixels.
    ref = _square((1, 12, 16), (2, 6), (2, 6))
    pred = _square((1, 12, 16), (2, 6), (5, 9))
    sp = (3.0, 0.8, 0.8)
    exact = added_path_length(ref, pred, sp, 1.0)
    plat = added_path_length(ref, pred, sp, 1.0, convention="platipy")
    # exact: accepted are col 5 (4 px) and col 4 (rows 2, 5; 0.8 mm) -> 12 - 6 = 6 pixels
    assert exact.n_pixels == 6
    # platipy: also col 3 (2 px from col 5) -> only col 2 remains: 4 pixels
    assert plat.n_pixels == 4 and plat.apl_mm == pytest.approx(4 * 0.8)


def test_volumetric_similarity_and_centroid_by_hand():
    # 10 reference voxels, 6 predicted inside: VS = 1 - |6 - 10| / 16 = 0.75
    assert volumetric_similarity(10, 6) == 0.75
    assert volumetric_similarity(5, 0) == 0.0 and math.isnan(volumetric_similarity(0, 0))
    # a 3x4x5 box shifted by 2 slices and 3 columns, spacing (2.5, 0.8, 0.6) mm:
    # centroid distance = sqrt((2 * 2.5)^2 + (3 * 0.6)^2) = sqrt(25 + 3.24)
    ref = np.zeros((12, 12, 12), bool)
    ref[2:5, 3:7, 1:6] = True
    pred = np.roll(np.roll(ref, 2, axis=0), 3, axis=2)
    assert centroid_distance(ref, pred, (2.5, 0.8, 0.6)) == pytest.approx(math.sqrt(28.24), rel=1e-12)
    assert centroid_distance(ref, np.zeros_like(ref), (1, 1, 1)) == math.inf


# ---------------------------------------------------------------------------
# Oracles: brute force per slice, SimpleITK's filters
# ---------------------------------------------------------------------------


def _brute_contour(mask2d):
    ys, xs = np.nonzero(mask2d)
    out = []
    h, w = mask2d.shape
    for y, x in zip(ys, xs):
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            yy, xx = y + dy, x + dx
            if not (0 <= yy < h and 0 <= xx < w) or not mask2d[yy, xx]:
                out.append((y, x))
                break
    return np.array(out, dtype=float).reshape(-1, 2)


def _brute_apl(ref, pred, sp, tol, convention):
    pixel = (sp[1] + sp[2]) / 2
    n = 0
    for z in range(ref.shape[0]):
        cr, cp = _brute_contour(ref[z]), _brute_contour(pred[z])
        for y, x in cr:
            if cp.size == 0:
                n += 1
                continue
            if convention == "exact":
                d = np.sqrt(((cp[:, 0] - y) * sp[1]) ** 2 + ((cp[:, 1] - x) * sp[2]) ** 2).min()
                n += d > tol
            else:
                r = math.ceil(tol / pixel) + 0.5 if tol > 0 else 0.0
                d = np.sqrt((cp[:, 0] - y) ** 2 + (cp[:, 1] - x) ** 2).min()
                n += d > r
    return n * pixel


@pytest.mark.parametrize("convention", ["exact", "platipy"])
def test_apl_equals_brute_force_slice_oracle(rng, convention):
    for i in range(12):
        kind_a, kind_b = ("blob", "blob") if i < 8 else ("border", "scatter")
        ref = random_mask(rng, (4, 14, 15), kind_a)
        pred = random_mask(rng, (4, 14, 15), kind_b)
        sp = tuple(rng.uniform(0.4, 3.0, 3))
        tol = float(rng.choice([0.0, 0.7, 1.5, 2.0, 4.0]))
        got = added_path_length(ref, pred, sp, tol, convention=convention).apl_mm
        assert got == pytest.approx(_brute_apl(ref, pred, sp, tol, convention), abs=1e-9)


def test_contour_equals_simpleitk_label_contour(rng):
    # Away from the image border the contour is ITK's LabelContour (fullyConnected off). At the
    # border ITK does not treat the outside as background; oarbench does (a structure cut by the
    # field of view gets its contour along the cut, as a closed RTSTRUCT polygon would).
    for _ in range(10):
        m = np.pad(random_mask(rng, (16, 17), "blob"), 1)
        expected = sitk.GetArrayFromImage(sitk.LabelContour(sitk.GetImageFromArray(m.astype(np.uint8)))) > 0
        np.testing.assert_array_equal(contour_pixels(m), expected)
    full = np.ones((4, 5), bool)
    assert contour_pixels(full).sum() == 4 * 5 - 2 * 3  # the ring along the image border


def test_platipy_convention_equals_simpleitk_pipeline(rng):
    # platipy's APL per slice: LabelContour of both, BinaryDilate (ITK ball, radius
    # ceil(tol / mean pixel)) of one contour, MaskNegated of the other, pixels x mean spacing.
    # With the prediction's contour dilated and the reference's counted, this is our convention.
    for _ in range(8):
        ref = np.pad(random_mask(rng, (3, 18, 18), "blob"), ((0, 0), (1, 1), (1, 1)))
        pred = np.pad(random_mask(rng, (3, 18, 18), "blob"), ((0, 0), (1, 1), (1, 1)))
        sp = (2.0, 0.7, 0.9)
        tol = float(rng.choice([0.5, 1.0, 2.5]))
        radius = math.ceil(tol / 0.8)
        n = 0
        for z in range(3):
            cr = sitk.LabelContour(sitk.GetImageFromArray(ref[z].astype(np.uint8)))
            cp = sitk.LabelContour(sitk.GetImageFromArray(pred[z].astype(np.uint8)))
            cp = sitk.BinaryDilate(cp, [radius, radius])
            n += int(sitk.GetArrayFromImage(sitk.MaskNegated(cr, cp)).sum())
        got = added_path_length(ref, pred, sp, tol, convention="platipy")
        assert got.n_pixels == n and got.apl_mm == pytest.approx(n * 0.8)


# ---------------------------------------------------------------------------
# In evaluate_labels: statuses, per-structure tolerances, resolution
# ---------------------------------------------------------------------------


def test_evaluate_labels_new_columns_and_per_structure_tolerance():
    labels = LabelMap({1: "Liver", 2: "Spleen", 3: "Kidney_L", 4: "Kidney_R"})
    ref = np.zeros((6, 20, 20), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:5, 2:8, 2:8] = 1
    pred[1:5, 2:8, 3:9] = 1          # Liver shifted one column
    ref[1:5, 12:16, 12:16] = 2       # Spleen missed
    pred[1:3, 12:14, 2:4] = 3        # Kidney_L hallucinated; Kidney_R absent
    sp = (2.0, 1.0, 1.0)
    rows = {r.structure: r for r in evaluate_labels(ref, pred, sp, labels, tolerance_mm=1.0,
                                                    tolerances={"Liver": 0.0}, backend="numpy")}
    liver = rows["Liver"]
    assert liver.tolerance_mm == 0.0 and rows["Spleen"].tolerance_mm == 1.0
    sd = compute_surface_distances(ref == 1, pred == 1, sp)
    assert liver.sdsc == surface_dice(sd, 0.0)
    assert liver.vs == 1.0 and liver.centroid_mm == pytest.approx(1.0)
    # per slice: the reference square (rows/cols 2-7) has 20 contour pixels; the prediction's
    # contour (cols 3-8) shares rows 2 and 7 at cols 3-7 (10 pixels); the reference's left column
    # and its right column rows 3-6 (inside the prediction) are added: 10 pixels = 10 mm per
    # slice at tolerance 0, over 4 slices
    assert liver.apl_mm == 40.0 and liver.apl_mm_per_slice == 10.0
    sp_row = rows["Spleen"]
    assert sp_row.status == "missed" and sp_row.vs == 0.0 and sp_row.centroid_mm == math.inf
    assert sp_row.apl_mm == 4 * 12 * 1.0  # whole contour: 4 slices x 12 pixels x 1 mm
    hal = rows["Kidney_L"]
    assert hal.status == "hallucinated" and hal.apl_mm == 0.0 and hal.vs == 0.0
    absent = rows["Kidney_R"]
    assert absent.status == "absent" and math.isnan(absent.apl_mm) and math.isnan(absent.vs)
    assert all(r.spacing_max_mm == 2.0 for r in rows.values())
    with pytest.raises(ValueError, match="not in the label map"):
        evaluate_labels(ref, pred, sp, labels, tolerances={"Heart": 1.0})


def test_surface_dice_below_the_coarsest_spacing_is_degenerate():
    # On a grid with 3 mm slices, a one-slice shift: surface Dice is the same at 0, 1, 2 and
    # 2.99 mm and jumps at 3.0 mm, because the smallest non-zero distance along z is 3 mm.
    ref = np.zeros((10, 12, 12), bool)
    ref[3:6, 3:9, 3:9] = True
    pred = np.roll(ref, 1, axis=0)
    sd = compute_surface_distances(ref, pred, (3.0, 1.0, 1.0))
    # in-plane distances of 1 mm exist too (the surfels are offset by half a voxel), so compare
    # the 2 mm and 2.99 mm values, then the jump at 3 mm
    assert surface_dice(sd, 2.0) == surface_dice(sd, 2.99) < surface_dice(sd, 3.0)
    assert resolution_warning(2.0, (3.0, 1.0, 1.0)) is not None
    assert resolution_warning(3.0, (3.0, 1.0, 1.0)) is None


def test_apl_resolves_in_plane_and_warns_by_its_own_spacing():
    # 0.8 x 1.1 mm pixels, 2.5 mm slices. APL measures in-plane distances, so tolerances below the
    # 2.5 mm slice thickness do resolve: a prediction shifted one row (1.1 mm) and one column
    # (0.8 mm) has reference contour pixels at 0, 0.8, 1.1 and 1.36 mm from its contour.
    from oarbench.metrics import resolution_limit

    ref = np.zeros((3, 20, 20), bool)
    ref[:, 5:15, 5:15] = True
    pred = np.roll(np.roll(ref, 1, axis=1), 1, axis=2)
    sp = (2.5, 1.1, 0.8)
    apl = [added_path_length(ref, pred, sp, t).apl_mm for t in (0.0, 0.8, 1.1, 1.4)]
    assert apl[0] > apl[1] > apl[2] > apl[3] == 0.0
    assert resolution_limit(sp, "apl_mm") == 1.1 and resolution_limit(sp, "sdsc") == 2.5
    # the APL warning names its own limit: 1.1 mm in-plane, not the 2.5 mm slices
    assert resolution_warning(2.0, sp, "apl_mm") is None
    assert resolution_warning(2.0, sp, "sdsc") is not None and "2.5 mm" in resolution_warning(2.0, sp, "sdsc")
    msg = resolution_warning(0.8, sp, "apl_mm")
    assert msg is not None and "APL" in msg and "in-plane spacing 1.1 mm" in msg
    assert resolution_warning(1.1, sp, "apl_mm") is None


def test_evaluate_records_tolerances_and_resolution_warnings(tmp_path):
    from tests.test_evaluate import _case, _write

    rng = np.random.default_rng(0)
    for i in range(2):
        ref, pred = _case(rng, i)
        _write(tmp_path / "ref" / f"c{i}.nii.gz", ref)  # spacing (x, y, z) = (0.9, 0.8, 2.5)
        _write(tmp_path / "pred" / f"c{i}.nii.gz", pred)
    (tmp_path / "labels.toml").write_text("[labels]\nLiver = 1\nKidney_L = 2\nKidney_R = 3\n\n"
                                          "[tolerances_mm]\nKidney_L = 3.0\n")
    (tmp_path / "study.toml").write_text(
        '[study]\nname = "s"\nlabels = "labels.toml"\ntolerance_mm = 2.0\n\n[tolerances_mm]\nLiver = 4.0\n\n'
        '[[centres]]\nname = "A"\nreference = "ref"\n\n[[models]]\nname = "m"\npredictions = "pred"\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(__import__("oarbench.cli", fromlist=["main"]).main,
                             ["evaluate", str(tmp_path / "study.toml"), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    import pandas as pd

    table = pd.read_csv(out / "metrics.csv")
    tol = table.drop_duplicates("structure").set_index("structure")["tolerance_mm"].to_dict()
    assert tol == {"Liver": 4.0, "Kidney_L": 3.0, "Kidney_R": 2.0}
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["tolerances_mm"] == {"Kidney_L": 3.0, "Liver": 4.0}
    # 2.0 mm (Kidney_R) is below the 2.5 mm slices (surface Dice); 3.0 and 4.0 are not; APL is
    # limited by the 0.9 mm in-plane spacing, which no tolerance is below
    assert len(run["resolution_warnings"]) == 1 and "tolerance 2 mm (Kidney_R)" in run["resolution_warnings"][0]
    assert run["resolution_warnings"][0].startswith("surface Dice:")
    assert np.allclose(table["spacing_inplane_max_mm"], 0.9) and np.allclose(table["spacing_max_mm"], 2.5)
    assert "below the coarsest voxel spacing" in res.output
    for col in ("vs", "centroid_mm", "apl_mm", "apl_mm_per_slice"):
        assert table[col].notna().all()


def test_torch_backend_gives_the_same_new_columns(rng):
    pytest.importorskip("torch")
    labels = LabelMap({1: "Liver", 2: "Spleen"})
    ref = np.zeros((8, 24, 24), np.uint8)
    pred = np.zeros_like(ref)
    ref[random_mask(rng, (8, 24, 24), "blob")] = 1
    pred[random_mask(rng, (8, 24, 24), "blob")] = 1
    ref[1:4, 2:6, 2:6] = 2
    kw = dict(tolerance_mm=1.5, tolerances={"Spleen": 0.5})
    a = evaluate_labels(ref, pred, (2.0, 0.8, 0.9), labels, backend="numpy", **kw)
    b = evaluate_labels(ref, pred, (2.0, 0.8, 0.9), labels, backend="torch", device="cpu", **kw)
    for x, y in zip(a, b):
        for col in ("tolerance_mm", "vs", "centroid_mm", "apl_mm", "apl_mm_per_slice", "spacing_max_mm"):
            assert getattr(x, col) == pytest.approx(getattr(y, col), nan_ok=True), col
