"""Cross-checks of the metric core against independent oracles.

1. A brute-force oracle (tests/_oracle.py: loops over corners, the reference library's
   area table, full pairwise distances) on a few hundred random small shapes.
2. The reference library itself (surface-distance 0.1) on larger random shapes.
3. nnU-Net v2's Dice.
"""

from __future__ import annotations

import numpy as np
import pytest

from oarbench.metrics import (
    compute_surface_distances,
    contour_length_table,
    dice,
    directed_means,
    hausdorff,
    msd,
    assd,
    surface_dice,
    surface_overlap,
    surfel_area_table,
)
from tests import _oracle
from tests._shapes import random_pair

TOL_MM = 1.5


def _spacing(rng, nd):
    return tuple(float(v) for v in np.round(rng.uniform(0.4, 3.5, size=nd), 3))


@pytest.mark.parametrize("nd,count", [(2, 150), (3, 150)])
def test_random_shapes_against_brute_force_oracle(sd_lib, nd, count):
    rng = np.random.default_rng(1000 + nd)
    for i in range(count):
        shape = tuple(int(v) for v in rng.integers(3, 14 if nd == 2 else 9, size=nd))
        spacing = _spacing(rng, nd)
        ref, pred = random_pair(rng, shape)
        table = (
            sd_lib.lookup_tables.create_table_neighbour_code_to_contour_length(np.array(spacing))
            if nd == 2
            else sd_lib.lookup_tables.create_table_neighbour_code_to_surface_area(np.array(spacing))
        )
        want = _oracle.metrics(ref, pred, spacing, table, TOL_MM)
        sd = compute_surface_distances(ref, pred, spacing)
        got = {
            "hd": hausdorff(sd, 100),
            "hd95": hausdorff(sd, 95),
            "msd": msd(sd),
            "assd": assd(sd),
            "sdsc": surface_dice(sd, TOL_MM),
            "area_ref": sd.area_ref,
            "area_pred": sd.area_pred,
        }
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-9), (i, key, shape, spacing)


def test_area_tables_equal_the_reference_library(sd_lib):
    for spacing in [(1.0, 1.0, 1.0), (3.0, 2.0, 1.0), (2.5, 0.8, 0.8), (0.7, 1.9, 3.3)]:
        np.testing.assert_allclose(
            surfel_area_table(spacing),
            sd_lib.lookup_tables.create_table_neighbour_code_to_surface_area(np.array(spacing)),
            rtol=0,
            atol=1e-14,
        )
    for spacing in [(1.0, 1.0), (2.0, 1.0), (0.7, 3.1)]:
        np.testing.assert_allclose(
            contour_length_table(spacing),
            sd_lib.lookup_tables.create_table_neighbour_code_to_contour_length(np.array(spacing)),
            rtol=0,
            atol=1e-14,
        )


@pytest.mark.parametrize("nd", [2, 3])
def test_random_shapes_against_reference_library(sd_lib, nd):
    rng = np.random.default_rng(2000 + nd)
    for i in range(40):
        shape = tuple(int(v) for v in rng.integers(10, 60 if nd == 2 else 28, size=nd))
        spacing = _spacing(rng, nd)
        ref, pred = random_pair(rng, shape)
        theirs = sd_lib.compute_surface_distances(ref, pred, spacing)
        ours = compute_surface_distances(ref, pred, spacing)
        # Same multiset of (distance, area) pairs. Distances equal to the last bits may
        # come out in another order among near-ties (KD-tree vs EDT rounding), so both
        # sides are compared after sorting by (distance rounded to 1e-9 mm, area).
        for d_ours, a_ours, d_theirs, a_theirs in (
            (ours.distances_ref_to_pred, ours.areas_ref, theirs["distances_gt_to_pred"], theirs["surfel_areas_gt"]),
            (ours.distances_pred_to_ref, ours.areas_pred, theirs["distances_pred_to_gt"], theirs["surfel_areas_pred"]),
        ):
            o1 = np.lexsort((a_ours, np.round(d_ours, 9)))
            o2 = np.lexsort((a_theirs, np.round(d_theirs, 9)))
            np.testing.assert_allclose(d_ours[o1], d_theirs[o2], rtol=0, atol=1e-9)
            np.testing.assert_allclose(a_ours[o1], a_theirs[o2], rtol=0, atol=1e-12)
        for pct in (95, 100, 50):
            assert hausdorff(ours, pct) == pytest.approx(sd_lib.compute_robust_hausdorff(theirs, pct), abs=1e-9)
        assert directed_means(ours) == pytest.approx(sd_lib.compute_average_surface_distance(theirs), abs=1e-9)
        for tol in (0.0, 1.0, 2.5):
            assert surface_overlap(ours, tol) == pytest.approx(
                sd_lib.compute_surface_overlap_at_tolerance(theirs, tol), abs=1e-12
            )
            assert surface_dice(ours, tol) == pytest.approx(
                sd_lib.compute_surface_dice_at_tolerance(theirs, tol), abs=1e-12
            )
        assert dice(ref, pred) == pytest.approx(sd_lib.compute_dice_coefficient(ref, pred), abs=1e-15)


def test_one_empty_mask_against_reference_library(sd_lib):
    ref = np.zeros((20, 20, 20), bool)
    ref[5:9, 6:10, 7:12] = True
    empty = np.zeros_like(ref)
    theirs = sd_lib.compute_surface_distances(ref, empty, (1.0, 2.0, 3.0))
    ours = compute_surface_distances(ref, empty, (1.0, 2.0, 3.0))
    assert np.all(np.isinf(ours.distances_ref_to_pred))
    assert len(ours.distances_pred_to_ref) == 0
    assert hausdorff(ours, 95) == sd_lib.compute_robust_hausdorff(theirs, 95) == np.inf
    assert surface_dice(ours, 2.0) == sd_lib.compute_surface_dice_at_tolerance(theirs, 2.0) == 0.0
    # Both empty: the reference library says HD = inf; oarbench says NaN for MSD/ASSD/surface DSC
    # because nothing was there to segment (docs/metrics.md).
    both = compute_surface_distances(empty, empty, (1.0, 2.0, 3.0))
    assert np.isnan(msd(both)) and np.isnan(assd(both)) and np.isnan(surface_dice(both, 2.0))
    assert np.isnan(dice(empty, empty))


def test_dice_equals_nnunet():
    nnunet_eval = pytest.importorskip("nnunetv2.evaluation.evaluate_predictions")
    rng = np.random.default_rng(7)
    for _ in range(30):
        ref, pred = random_pair(rng, (12, 15, 17))
        tp, fp, fn, tn = nnunet_eval.compute_tp_fp_fn_tn(ref, pred)
        theirs = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) > 0 else np.nan
        assert dice(ref, pred) == pytest.approx(theirs, abs=1e-15)
    empty = np.zeros((4, 4, 4), bool)
    tp, fp, fn, tn = nnunet_eval.compute_tp_fp_fn_tn(empty, empty)
    assert tp + fp + fn == 0 and np.isnan(dice(empty, empty))


def _sphere(shape, spacing, centre_mm, radius_mm):
    grids = np.meshgrid(*[np.arange(n) * s - (n - 1) * s / 2 for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm**2


@pytest.mark.slow
def test_two_spheres_converge_to_closed_form(sd_lib):
    # MeshMetrics' analytic case (docs/metrics.md): A radius 30 mm at the origin, B radius 20 mm
    # at (0, 0, 9) mm. Closed form: HD 19.0, HD95 18.3014, MSD 9.775, ASSD 10.2077.
    exact = {"hd": 19.0, "hd95": 18.3014, "msd": 9.775, "assd": 10.2077}
    errors = {}
    for spacing in (1.0, 0.5):
        n = int(round(64 / spacing)) + 1
        shape = (n, n, n)
        a = _sphere(shape, (spacing,) * 3, (0.0, 0.0, 0.0), 30.0)
        b = _sphere(shape, (spacing,) * 3, (9.0, 0.0, 0.0), 20.0)
        sd = compute_surface_distances(a, b, (spacing,) * 3)
        got = {"hd": hausdorff(sd, 100), "hd95": hausdorff(sd, 95), "msd": msd(sd), "assd": assd(sd)}
        errors[spacing] = {k: abs(got[k] - exact[k]) for k in exact}
        if spacing == 1.0:
            theirs = sd_lib.compute_surface_distances(a, b, (spacing,) * 3)
            assert got["hd95"] == pytest.approx(sd_lib.compute_robust_hausdorff(theirs, 95), abs=1e-9)
            assert got["msd"] == pytest.approx(np.mean(sd_lib.compute_average_surface_distance(theirs)), abs=1e-9)
    for key in ("hd95", "msd", "assd"):
        assert errors[0.5][key] < errors[1.0][key], (key, errors)
    # At 0.5 mm the voxel answer is within a voxel of the closed form.
    for key in exact:
        assert errors[0.5][key] < 0.5, (key, errors)
