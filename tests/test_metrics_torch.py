"""The torch backend (oarbench.metrics._torch): same numbers as the numpy backend, on CPU and CUDA.

Every test runs once per device of the ``device`` fixture; the CUDA run is skipped
(with the reason) where torch sees no GPU. Expected values are either derived in
the test or come from the independent numpy backend, which tests/test_metrics_oracle.py
checks against a brute-force oracle and the reference library.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from oarbench.labels import LabelMap  # noqa: E402
from oarbench.metrics import (  # noqa: E402
    directed_means,
    evaluate_labels,
    hausdorff,
    msd,
    neighbour_codes,
    surface_dice,
    surface_overlap,
)
from oarbench.metrics import _torch as backend  # noqa: E402
from oarbench.metrics._surface import surface_distances_cropped  # noqa: E402
from oarbench.metrics._torch import neighbour_codes_torch, surface_distances_torch  # noqa: E402
from tests._shapes import random_pair  # noqa: E402

FIELDS = ("distances_ref_to_pred", "areas_ref", "distances_pred_to_ref", "areas_pred")


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.cuda),
    ]
)
def device(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA run skipped: torch sees no CUDA GPU on this machine")
    return request.param


def assert_same_distances(a, b, atol: float) -> None:
    """Two SurfaceDistances hold the same sorted distances and areas (to ``atol`` mm)."""
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == np.float64 and y.dtype == np.float64, name
        assert x.shape == y.shape, (name, x.shape, y.shape)
        finite = np.isfinite(x)
        assert np.array_equal(finite, np.isfinite(y)), name
        assert np.array_equal(x[~finite], y[~finite]), name
        if finite.any():
            assert np.max(np.abs(x[finite] - y[finite])) <= atol, (name, np.max(np.abs(x[finite] - y[finite])))


# --- the worked cases of docs/metrics.md ------------------------------------------------


def test_2d_single_pixels_two_apart(device):
    # Pixels (50, 70) and (50, 72), spacing (2, 1) mm: each pixel touches four corners with
    # one inside neighbour, a corner cut of length d = 0.5 * sqrt(2^2 + 1^2). Surfels sit
    # on corner columns 70, 71 (gt) and 72, 73 (pred), 1 mm per column: distances
    # [1, 1, 2, 2] both ways, directed means 1.5, HD = HD95 = 2, half of each contour
    # within 1 mm.
    gt = np.zeros((128, 128), bool)
    pred = np.zeros((128, 128), bool)
    gt[50, 70] = True
    pred[50, 72] = True
    sd = surface_distances_torch(gt, pred, (2.0, 1.0), device=device)
    d = 0.5 * math.sqrt(2**2 + 1**2)
    np.testing.assert_array_equal(sd.distances_ref_to_pred, [1, 1, 2, 2])
    np.testing.assert_array_equal(sd.distances_pred_to_ref, [1, 1, 2, 2])
    np.testing.assert_allclose(sd.areas_ref, [d] * 4, rtol=0, atol=1e-15)
    np.testing.assert_allclose(sd.areas_pred, [d] * 4, rtol=0, atol=1e-15)
    assert directed_means(sd) == pytest.approx((1.5, 1.5), abs=1e-15)
    assert hausdorff(sd, 100) == 2.0
    assert hausdorff(sd, 95) == 2.0
    assert surface_overlap(sd, 1.0) == pytest.approx((0.5, 0.5), abs=1e-15)
    assert surface_dice(sd, 1.0) == pytest.approx(0.5, abs=1e-15)


def test_2d_two_by_two_square_vs_three_by_two(device):
    # Values of docs/metrics.md (the reference library's own test of this case).
    gt = np.zeros((6, 6), bool)
    pred = np.zeros((6, 6), bool)
    gt[1:3, 1:3] = True
    pred[1:4, 1:3] = True
    sd = surface_distances_torch(gt, pred, (2.0, 1.0), device=device)
    m_gt, m_pred = directed_means(sd)
    assert m_gt == pytest.approx(0.09549150281252629, abs=1e-15)
    assert m_pred == pytest.approx(0.4472135954999579, abs=1e-15)
    assert hausdorff(sd, 100) == 2.0
    assert hausdorff(sd, 95) == 2.0
    assert surface_overlap(sd, 1.0) == pytest.approx((1.0, 0.7763932022500211), abs=1e-15)
    assert surface_dice(sd, 1.0) == pytest.approx(0.8702680924431961, abs=1e-15)


def test_3d_single_voxels_two_apart(device):
    # Spacing (3, 2, 1): each voxel has 8 corner surfels "one inside corner", a triangle
    # with normal (1/8)(s1 s2, s0 s2, s0 s1) = (1/8)(2, 3, 6), area 7/8. The voxels are
    # 2 columns (1 mm each) apart: four corners at 1 mm, four at 2 mm, both ways.
    gt = np.zeros((128, 128, 128), bool)
    pred = np.zeros((128, 128, 128), bool)
    gt[50, 60, 70] = True
    pred[50, 60, 72] = True
    sd = surface_distances_torch(gt, pred, (3.0, 2.0, 1.0), device=device)
    np.testing.assert_allclose(sd.areas_ref, [0.875] * 8, rtol=0, atol=1e-15)
    np.testing.assert_allclose(sd.areas_pred, [0.875] * 8, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(sd.distances_ref_to_pred, [1, 1, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(sd.distances_pred_to_ref, [1, 1, 1, 1, 2, 2, 2, 2])
    assert directed_means(sd) == pytest.approx((1.5, 1.5), abs=1e-15)
    assert hausdorff(sd, 100) == 2.0
    assert hausdorff(sd, 95) == 2.0
    assert surface_dice(sd, 1.0) == pytest.approx(0.5, abs=1e-15)


def test_3d_slabs_touching_the_border(device):
    # Values of docs/metrics.md (the reference library's own test of this case).
    gt = np.zeros((100, 100, 100), bool)
    pred = np.zeros((100, 100, 100), bool)
    gt[0:50, :, :] = True
    pred[0:51, :, :] = True
    sd = surface_distances_torch(gt, pred, (2.0, 1.0, 1.0), device=device)
    assert len(sd.areas_ref) == 40002
    assert len(sd.areas_pred) == 40402
    assert sd.area_ref == pytest.approx(59575.66877731504, rel=1e-12)
    assert sd.area_pred == pytest.approx(60373.325631564534, rel=1e-12)
    m_gt, m_pred = directed_means(sd)
    assert m_gt == pytest.approx(0.32244707267666795, abs=1e-12)
    assert m_pred == pytest.approx(0.3393962930605405, abs=1e-12)
    assert hausdorff(sd, 100) == 2.0
    assert hausdorff(sd, 95) == 2.0
    ov_gt, ov_pred = surface_overlap(sd, 1.0)
    assert ov_gt == pytest.approx(0.8420663973547753, abs=1e-12)
    assert ov_pred == pytest.approx(0.8303018534697297, abs=1e-12)
    assert surface_dice(sd, 1.0) == pytest.approx(0.8361450084979621, abs=1e-12)


def test_far_apart_voxels_need_more_than_the_first_window(device):
    # Voxels (2, 5, 3) and (9, 5, 33) at spacing (2.5, 0.8, 0.8) mm. Their corners are
    # z in {2, 3}, y in {5, 6}, x in {3, 4} and z in {9, 10}, y in {5, 6}, x in {33, 34}.
    # The nearest partner of a corner is the other voxel's corner closest along every
    # axis: same y, and dz in {6, 7}, dx in {29, 30} voxels, each combination for two
    # corners (y = 5, 6), the same both ways. Even the nearest pair (27.6 mm) lies
    # beyond the first search window, so the later rounds or the exact search must run.
    gt = np.zeros((20, 10, 40), bool)
    pred = np.zeros((20, 10, 40), bool)
    gt[2, 5, 3] = True
    pred[9, 5, 33] = True
    sd = surface_distances_torch(gt, pred, (2.5, 0.8, 0.8), device=device)
    expected = sorted(math.sqrt((2.5 * dz) ** 2 + (0.8 * dx) ** 2) for dz in (6, 7) for dx in (29, 30) for _ in (0, 1))
    np.testing.assert_allclose(sd.distances_ref_to_pred, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sd.distances_pred_to_ref, expected, rtol=0, atol=1e-12)
    assert min(expected) > backend._FIRST_RADIUS_MM


# --- agreement with the numpy backend -----------------------------------------------


def _random_cases(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        nd = 2 + int(rng.integers(2))
        shape = tuple(int(v) for v in rng.integers(3, 26 if nd == 3 else 60, size=nd))
        spacing = tuple(float(v) for v in rng.uniform(0.3, 3.0, size=nd))
        ref, pred = random_pair(rng, shape)
        yield ref, pred, spacing


def test_random_shapes_equal_numpy_backend(device):
    # ~100 random 2D/3D pairs (blobs, single voxels, thin sheets, boxes touching the
    # border, scattered voxels; perturbed copies and unrelated shapes) with anisotropic
    # spacing. The numpy backend is the independent computation here (a KD-tree).
    atol = 1e-9 if device == "cpu" else 1e-4
    for ref, pred, spacing in _random_cases(100, seed=20261128):
        expected = surface_distances_cropped(ref, pred, spacing)
        got = surface_distances_torch(ref, pred, spacing, device=device)
        assert_same_distances(expected, got, atol)
        for p in (95.0, 100.0):
            assert hausdorff(got, p) == pytest.approx(hausdorff(expected, p), abs=atol)
        assert msd(got) == pytest.approx(msd(expected), abs=atol)
        assert surface_dice(got, 1.5) == pytest.approx(surface_dice(expected, 1.5), abs=1e-12)


def test_every_search_path_is_exact(device, monkeypatch):
    # A first window of 0.3 mm leaves most surfels unresolved after the first round, so
    # the widened rounds and the exact plane search both run; results must not change.
    monkeypatch.setattr(backend, "_FIRST_RADIUS_MM", 0.3)
    atol = 1e-9 if device == "cpu" else 1e-4
    for ref, pred, spacing in _random_cases(30, seed=7):
        expected = surface_distances_cropped(ref, pred, spacing)
        got = surface_distances_torch(ref, pred, spacing, device=device)
        assert_same_distances(expected, got, atol)


def test_neighbour_codes_equal_numpy(device):
    rng = np.random.default_rng(3)
    for shape in [(5, 7), (1, 9), (4, 5, 6), (1, 3, 8)]:
        mask = rng.random(shape) < 0.5
        got = neighbour_codes_torch(torch.from_numpy(mask).to(device)).cpu().numpy()
        np.testing.assert_array_equal(got, neighbour_codes(mask))


def test_one_or_both_masks_empty(device):
    # Nothing on one side: its arrays are empty and the other side's distances are inf
    # (sorted by area); nothing on either side: all four arrays empty.
    ref = np.zeros((6, 7, 8), bool)
    pred = np.zeros((6, 7, 8), bool)
    ref[2:4, 2:5, 3:6] = True
    sd = surface_distances_torch(ref, pred, (1.0, 2.0, 3.0), device=device)
    expected = surface_distances_cropped(ref, pred, (1.0, 2.0, 3.0))
    assert_same_distances(expected, sd, 0.0)
    assert np.all(np.isinf(sd.distances_ref_to_pred)) and len(sd.areas_pred) == 0
    sd = surface_distances_torch(pred, pred, (1.0, 2.0, 3.0), device=device)
    assert all(len(getattr(sd, name)) == 0 for name in FIELDS)


def test_tensor_inputs_stay_on_their_device(device):
    # 0/1 integer tensors are accepted; with no device argument the computation runs on
    # the tensors' device (a CUDA tensor is not copied to the host first).
    ref = torch.zeros((9, 10, 11), dtype=torch.uint8, device=device)
    pred = torch.zeros((9, 10, 11), dtype=torch.int64, device=device)
    ref[2:6, 3:8, 1:5] = 1
    pred[3:7, 3:8, 2:6] = 1
    assert backend._resolve_device(ref, pred, None) == ref.device
    sd = surface_distances_torch(ref, pred, (2.0, 1.0, 0.5))
    expected = surface_distances_cropped(ref.cpu().numpy() == 1, pred.cpu().numpy() == 1, (2.0, 1.0, 0.5))
    assert_same_distances(expected, sd, 1e-9)


def test_bad_input_raises_value_error(device):
    ok = np.zeros((4, 5, 6), bool)
    with pytest.raises(ValueError, match="reference: expected a boolean or 0/1 array"):
        surface_distances_torch(np.full((4, 5, 6), 2), ok, (1, 1, 1), device=device)
    with pytest.raises(ValueError, match="prediction: expected a boolean or 0/1 array"):
        surface_distances_torch(ok, np.full((4, 5, 6), "a"), (1, 1, 1), device=device)
    with pytest.raises(ValueError, match="differs from prediction shape"):
        surface_distances_torch(ok, np.zeros((4, 5, 7), bool), (1, 1, 1), device=device)
    with pytest.raises(ValueError, match="2D or 3D"):
        surface_distances_torch(np.zeros((2, 2, 2, 2), bool), np.zeros((2, 2, 2, 2), bool), (1, 1, 1, 1), device=device)
    with pytest.raises(ValueError, match="spacing"):
        surface_distances_torch(ok, ok, (1, 1), device=device)


def test_evaluate_labels_torch_equals_numpy_row_by_row(device):
    # A multi-label case with every status: ok (blobs, a perturbed copy), missed,
    # hallucinated, absent.
    rng = np.random.default_rng(11)
    shape = (30, 40, 44)
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    ref[2:12, 3:20, 4:25] = 1
    pred[3:12, 5:21, 4:23] = 1
    a, b = random_pair(rng, (12, 15, 16))
    ref[15:27, 22:37, 25:41][a] = 2
    pred[15:27, 22:37, 25:41][b] = 2
    ref[5:9, 25:30, 5:9] = 3  # missed
    pred[20:24, 2:6, 2:6] = 4  # hallucinated; 5 is absent
    labels = LabelMap({1: "Liver", 2: "Spleen", 3: "Kidney_L", 4: "Kidney_R", 5: "Pancreas"})
    spacing = (2.5, 0.8, 0.9)
    expected = evaluate_labels(ref, pred, spacing, labels, backend="numpy")
    assert [r.status for r in expected] == ["ok", "ok", "missed", "hallucinated", "absent"]
    # Equal up to ties between equidistant surfels (a few units in the last place).
    atol = 1e-9
    # On a GPU, structures also run on several host threads, each with its own CUDA stream.
    runs = [evaluate_labels(ref, pred, spacing, labels, backend="torch", device=device, threads=n)
            for n in ((1,) if device == "cpu" else (1, 4))]
    for e, g in ((e, g) for got in runs for e, g in zip(expected, got)):
        for key, value in e.as_dict().items():
            other = g.as_dict()[key]
            if isinstance(value, float) and math.isfinite(value):
                assert other == pytest.approx(value, abs=atol), (e.structure, key)
            elif isinstance(value, float) and math.isnan(value):
                assert math.isnan(other), (e.structure, key)
            else:
                assert other == value, (e.structure, key)


def test_label_statistics_equal_find_objects_and_counts(device):
    """Boxes equal scipy's find_objects and counts equal numpy's, value by value."""
    from scipy import ndimage

    from oarbench.metrics._torch import label_statistics_torch

    rng = np.random.default_rng(11)
    for trial in range(6):
        shape = tuple(int(n) for n in rng.integers(3, 14, size=3 if trial % 2 else 2))
        # sparse labels: values 1..7, some absent from one or both volumes (gaps in the values)
        ref = np.where(rng.random(shape) < 0.15, rng.choice([1, 2, 5], size=shape), 0).astype(np.uint8)
        pred = np.where(rng.random(shape) < 0.15, rng.choice([2, 5, 7], size=shape), 0).astype(np.uint8)
        stats = label_statistics_torch(torch.from_numpy(ref).to(device), torch.from_numpy(pred).to(device))
        assert stats.ref_boxes == ndimage.find_objects(ref)
        assert stats.pred_boxes == ndimage.find_objects(pred)
        for v in range(8):
            n_ref = stats.n_ref[v] if v < len(stats.n_ref) else 0
            n_pred = stats.n_pred[v] if v < len(stats.n_pred) else 0
            tp = stats.tp[v] if v < len(stats.tp) else 0
            assert n_ref == np.count_nonzero(ref == v)
            assert n_pred == np.count_nonzero(pred == v)
            assert tp == np.count_nonzero((ref == v) & (pred == v))


def test_label_statistics_of_empty_volumes(device):
    from oarbench.metrics._torch import label_statistics_torch

    zeros = torch.zeros((4, 5, 6), dtype=torch.uint8, device=device)
    stats = label_statistics_torch(zeros, zeros)
    assert stats.ref_boxes == [] and stats.pred_boxes == []
    assert list(stats.n_ref) == [120] and list(stats.tp) == [120]
