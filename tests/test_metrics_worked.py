"""The worked cases of docs/metrics.md (from the reference library's own tests), with derivations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oarbench.metrics import (
    compute_surface_distances,
    dice,
    directed_means,
    hausdorff,
    hd,
    hd95,
    surface_dice,
    surface_overlap,
    surfel_area_table,
)


def test_2d_single_pixels_two_apart():
    # gt pixel (50, 70), pred pixel (50, 72), spacing (2, 1) mm. Each pixel's contour is
    # four corner cuts of length d = 0.5 * sqrt(2^2 + 1^2) (a single pixel touches four
    # corners, each with one inside neighbour). Surfels sit on corners x = 70, 71 (gt) and
    # 72, 73 (pred), so each gt surfel is 1 or 2 columns (1 mm per column) away from the
    # nearest pred surfel: distances [1, 1, 2, 2] both ways.
    gt = np.zeros((128, 128), bool)
    pred = np.zeros((128, 128), bool)
    gt[50, 70] = True
    pred[50, 72] = True
    sd = compute_surface_distances(gt, pred, (2, 1))
    d = 0.5 * math.sqrt(2**2 + 1**2)
    assert d == pytest.approx(1.118033988749895, abs=1e-15)
    np.testing.assert_allclose(sd.distances_ref_to_pred, [1, 1, 2, 2])
    np.testing.assert_allclose(sd.distances_pred_to_ref, [1, 1, 2, 2])
    np.testing.assert_allclose(sd.areas_ref, [d] * 4, rtol=0, atol=1e-15)
    np.testing.assert_allclose(sd.areas_pred, [d] * 4, rtol=0, atol=1e-15)
    assert directed_means(sd) == pytest.approx((1.5, 1.5), abs=1e-15)
    # HD = max = 2; HD95: cumulative fractions 0.25, 0.5, 0.75, 1.0 -> first >= 0.95 is the last.
    assert hd(sd) == 2.0
    assert hd95(sd) == 2.0
    assert surface_overlap(sd, 1.0) == pytest.approx((0.5, 0.5), abs=1e-15)
    assert surface_dice(sd, 1.0) == pytest.approx(0.5, abs=1e-15)
    assert dice(gt, pred) == 0.0


def test_2d_two_by_two_square_vs_three_by_two():
    gt = np.zeros((6, 6), bool)
    pred = np.zeros((6, 6), bool)
    gt[1:3, 1:3] = True
    pred[1:4, 1:3] = True
    sd = compute_surface_distances(gt, pred, (2, 1))
    m_gt, m_pred = directed_means(sd)
    assert m_gt == pytest.approx(0.09549150281252629, abs=1e-15)
    assert m_pred == pytest.approx(0.4472135954999579, abs=1e-15)
    assert hausdorff(sd, 100) == 2.0
    assert hausdorff(sd, 95) == 2.0
    assert surface_overlap(sd, 1.0) == pytest.approx((1.0, 0.7763932022500211), abs=1e-15)
    assert surface_dice(sd, 1.0) == pytest.approx(0.8702680924431961, abs=1e-15)
    # DSC = 2 * 4 / (4 + 6)
    assert dice(gt, pred) == pytest.approx(0.8, abs=1e-15)


def test_3d_single_voxels_two_apart():
    # Each voxel has 8 corner surfels with code "one inside corner": area sqrt(3)/8 at unit
    # spacing; scaled by spacing (3, 2, 1) the corner triangle has normal
    # (1/8)(s1 s2, s0 s2, s0 s1) = (1/8)(2, 3, 6) -> area 7/8 = 0.875.
    gt = np.zeros((128, 128, 128), bool)
    pred = np.zeros((128, 128, 128), bool)
    gt[50, 60, 70] = True
    pred[50, 60, 72] = True
    sd = compute_surface_distances(gt, pred, (3, 2, 1))
    np.testing.assert_allclose(sd.areas_ref, [0.875] * 8, rtol=0, atol=1e-15)
    np.testing.assert_allclose(sd.areas_pred, [0.875] * 8, rtol=0, atol=1e-15)
    np.testing.assert_allclose(sd.distances_ref_to_pred, [1, 1, 1, 1, 2, 2, 2, 2])
    np.testing.assert_allclose(sd.distances_pred_to_ref, [1, 1, 1, 1, 2, 2, 2, 2])
    assert directed_means(sd) == pytest.approx((1.5, 1.5), abs=1e-15)
    assert hd(sd) == 2.0
    assert hd95(sd) == 2.0
    assert surface_dice(sd, 1.0) == pytest.approx(0.5, abs=1e-15)
    assert dice(gt, pred) == 0.0


def test_3d_slabs_touching_the_border():
    gt = np.zeros((100, 100, 100), bool)
    pred = np.zeros((100, 100, 100), bool)
    gt[0:50] = True
    pred[0:51] = True
    sd = compute_surface_distances(gt, pred, (2, 1, 1))
    assert len(sd.areas_ref) == 40002
    assert len(sd.areas_pred) == 40402
    assert sd.area_ref == pytest.approx(59575.66877731504, rel=1e-13)
    assert sd.area_pred == pytest.approx(60373.325631564534, rel=1e-13)
    m_gt, m_pred = directed_means(sd)
    assert m_gt == pytest.approx(0.32244707267666795, rel=1e-13)
    assert m_pred == pytest.approx(0.3393962930605405, rel=1e-13)
    assert hd(sd) == 2.0
    assert hd95(sd) == 2.0
    overlap = surface_overlap(sd, 1.0)
    assert overlap[0] == pytest.approx(0.8420663973547753, rel=1e-13)
    assert overlap[1] == pytest.approx(0.8303018534697297, rel=1e-13)
    assert surface_dice(sd, 1.0) == pytest.approx(0.8361450084979621, rel=1e-13)
    # DSC = 2 * 50 / (50 + 51) slabs of equal cross-section
    assert dice(gt, pred) == pytest.approx(100 / 101, rel=1e-15)


def test_surfel_area_table_unit_spacing():
    table = surfel_area_table((1.0, 1.0, 1.0))
    # code 1: one corner cut off, an equilateral triangle with sides sqrt(2)/2:
    # area = sqrt(3)/4 * (sqrt(2)/2)^2 = sqrt(3)/8
    assert table[1] == pytest.approx(math.sqrt(3) / 8, abs=1e-16)
    assert table[1] == pytest.approx(0.21650635094610965, abs=1e-16)
    # code 3: two adjacent corners: a rectangle 1 x sqrt(2)/2
    assert table[3] == pytest.approx(0.7071067811865476, abs=1e-16)
    # code 15: half the cube: a unit square parallel to a face
    assert table[15] == pytest.approx(1.0, abs=1e-16)
    assert table[0] == 0.0
    assert table[255] == 0.0


def test_hd95_weighted_percentile_rule():
    # Distances [0, 1, 2, 10] with areas [1, 1, 1, 0.1]: cumulative fractions
    # 1/3.1, 2/3.1, 3/3.1 = 0.9677 >= 0.95 -> HD95 = 2, although the unweighted
    # 95th percentile of [0, 1, 2, 10] would interpolate towards 10.
    from oarbench.metrics import SurfaceDistances

    sd = SurfaceDistances(
        np.array([0.0, 1.0, 2.0, 10.0]), np.array([1.0, 1.0, 1.0, 0.1]), np.array([0.0]), np.array([1.0])
    )
    assert hausdorff(sd, 95) == 2.0
    assert hausdorff(sd, 100) == 10.0
    # 96.8 % lies above 3/3.1 = 0.96774...: the next index
    assert hausdorff(sd, 96.8) == 10.0


def test_mask_forms_equal_the_surface_distance_forms():
    gt = np.zeros((6, 6), bool)
    pred = np.zeros((6, 6), bool)
    gt[1:3, 1:3] = True
    pred[1:4, 1:3] = True
    sd = compute_surface_distances(gt, pred, (2, 1))
    from oarbench.metrics import assd, msd

    assert hd95(gt, pred, (2, 1)) == hd95(sd) == 2.0
    assert hd(gt.astype(np.uint8), pred.astype(np.uint8), (2, 1)) == 2.0
    # MSD = mean of the directed means of the worked case above
    assert msd(gt, pred, (2, 1)) == pytest.approx((0.09549150281252629 + 0.4472135954999579) / 2, abs=1e-15)
    assert assd(gt, pred, (2, 1)) == assd(sd)


def test_bad_input_raises_value_error_naming_the_problem():
    ok = np.zeros((4, 5, 6), bool)
    ok[1:3, 1:3, 1:3] = True
    with pytest.raises(ValueError, match="shape"):
        compute_surface_distances(ok, ok[:, :, :5], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        compute_surface_distances(ok, ok, (1, 1))
    with pytest.raises(ValueError, match="positive"):
        compute_surface_distances(ok, ok, (1, 0, 1))
    with pytest.raises(ValueError, match="0 and 1"):
        compute_surface_distances(ok.astype(np.uint8) * 2, ok, (1, 1, 1))
    with pytest.raises(ValueError, match="2D or 3D"):
        compute_surface_distances(ok[None], ok[None], (1, 1, 1, 1))
    from oarbench.labels import LabelMap
    from oarbench.metrics import evaluate_labels

    labels = LabelMap({1: "Liver"})
    with pytest.raises(ValueError, match="not in the label map"):
        evaluate_labels(ok.astype(np.uint8) * 2, ok.astype(np.uint8), (1, 1, 1), labels)
    with pytest.raises(ValueError, match=">= 0"):
        evaluate_labels(ok.astype(np.int8) - 1, ok.astype(np.uint8), (1, 1, 1), labels)


def test_threads_do_not_change_the_numbers():
    from oarbench.labels import DEFAULT_LABELS
    from oarbench.metrics import evaluate_labels

    rng = np.random.default_rng(3)
    ref = np.zeros((20, 30, 30), np.uint8)
    for value in range(1, 8):
        z, y, x = rng.integers(2, 16), rng.integers(2, 24), rng.integers(2, 24)
        ref[z : z + 4, y : y + 5, x : x + 5] = value
    pred = np.roll(ref, 1, axis=2)
    one = evaluate_labels(ref, pred, (2.5, 0.8, 0.8), DEFAULT_LABELS, threads=1, backend="numpy")
    two = evaluate_labels(ref, pred, (2.5, 0.8, 0.8), DEFAULT_LABELS, threads=2, backend="numpy")
    # repr compares every field, NaN (absent structures) included
    assert [repr(r) for r in one] == [repr(r) for r in two]
    assert {r.status for r in one} == {"ok", "absent"}
