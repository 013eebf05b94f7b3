"""The compiled kernels of the metric core (oarbench/metrics/_ckernels.c) against the numpy code
they replace, the brute-force oracle, scipy and the reference library.

Setting ``oarbench.metrics._kernels.ckernels`` to None selects the numpy code, which is what an
install without a C compiler runs.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from scipy import ndimage

from oarbench.labels import DEFAULT_LABELS, LabelMap
from oarbench.metrics import _kernels, compute_surface_distances, evaluate_labels, hausdorff, msd
from oarbench.metrics._multilabel import _label_boxes
from oarbench.metrics._surface import _local_offsets, neighbour_codes
from tests import _oracle
from tests._shapes import random_pair

kernels = _kernels.ckernels
needs_kernels = pytest.mark.skipif(kernels is None, reason="the compiled kernels are not built here")


def test_the_kernels_are_built_where_ci_runs():
    # CI builds the package with a C compiler; there the kernels must be what the tests exercise.
    if os.environ.get("CI") != "true":
        pytest.skip("only asserted under CI=true")
    assert kernels is not None
    assert _kernels.surface_kernel() == "c"


def _both_ways(monkeypatch, fn):
    """fn() with the compiled kernels, then with the numpy code."""
    compiled = fn()
    with monkeypatch.context() as m:
        m.setattr(_kernels, "ckernels", None)
        plain = fn()
    return compiled, plain


@needs_kernels
def test_corner_codes_equal_neighbour_codes():
    rng = np.random.default_rng(7)
    for _ in range(20):
        shape = tuple(int(v) for v in rng.integers(1, 12, size=3))
        mask = rng.random(shape) < rng.uniform(0.2, 0.8)
        pad = tuple(int(v) for v in rng.integers(0, 4, size=3))
        padded = np.zeros(tuple(s + 2 for s in shape), dtype=np.uint8)
        padded[1:-1, 1:-1, 1:-1] = mask
        codes = np.zeros(tuple(s + 1 + 2 * p for s, p in zip(shape, pad)), dtype=np.uint8)
        count = kernels.corner_codes(padded, *shape, codes, *pad)
        want = neighbour_codes(mask)
        inner = codes[tuple(slice(p, p + s + 1) for p, s in zip(pad, shape))]
        np.testing.assert_array_equal(inner, want)
        assert codes.sum() == want.astype(np.int64).sum()  # nothing written into the padding
        surface = (want != 0) & (want != 255)
        assert count == int(np.count_nonzero(surface))
        index = np.empty(count, dtype=np.int64)
        kernels.border_index(codes, index)
        np.testing.assert_array_equal(index, np.flatnonzero((codes != 0) & (codes != 255)))


@needs_kernels
def test_surface_distances_equal_the_numpy_code_on_random_shapes(monkeypatch):
    rng = np.random.default_rng(11)
    for i in range(60):
        shape = tuple(int(v) for v in rng.integers(4, 26, size=3))
        spacing = tuple(float(v) for v in np.round(rng.uniform(0.3, 4.0, size=3), 3))
        ref, pred = random_pair(rng, shape)
        compiled, plain = _both_ways(monkeypatch, lambda: compute_surface_distances(ref, pred, spacing))
        for name in ("distances_ref_to_pred", "areas_ref", "distances_pred_to_ref", "areas_pred"):
            a, b = getattr(compiled, name), getattr(plain, name)
            assert a.shape == b.shape, (i, name)
            # the two searches may pick different ones of equidistant surfels (1e-15 mm)
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, err_msg=f"{i} {name} {shape} {spacing}")


@needs_kernels
def test_far_surfaces_go_to_the_kd_tree_and_match_brute_force(sd_lib):
    # Two small blocks 70 voxels apart on a 1 mm grid: beyond every local offset, so every
    # distance comes from the KD-tree stage.
    offsets, dist = _local_offsets((1.0, 1.0, 1.0), 2000)
    assert dist.max() < 60
    ref = np.zeros((6, 8, 90), dtype=bool)
    pred = np.zeros_like(ref)
    ref[1:4, 2:6, 2:6] = True
    pred[2:5, 1:5, 75:80] = True
    spacing = (1.0, 1.0, 1.0)
    table = sd_lib.lookup_tables.create_table_neighbour_code_to_surface_area(np.array(spacing))
    want = _oracle.metrics(ref, pred, spacing, table, 1.0)
    sd = compute_surface_distances(ref, pred, spacing)
    assert hausdorff(sd, 100) == pytest.approx(want["hd"], abs=1e-9)
    assert hausdorff(sd, 95) == pytest.approx(want["hd95"], abs=1e-9)
    assert msd(sd) == pytest.approx(want["msd"], abs=1e-9)
    assert sd.distances_ref_to_pred.min() > 60


@needs_kernels
def test_sorted_like_the_reference_library(sd_lib):
    # Ties of distance are ordered by area, as the reference library sorts them.
    rng = np.random.default_rng(5)
    for _ in range(10):
        shape = tuple(int(v) for v in rng.integers(8, 24, size=3))
        spacing = (2.5, 0.8, 0.8)
        ref, pred = random_pair(rng, shape)
        ours = compute_surface_distances(ref, pred, spacing)
        theirs = sd_lib.compute_surface_distances(ref, pred, spacing)
        for d, a, d2, a2 in (
            (ours.distances_ref_to_pred, ours.areas_ref, theirs["distances_gt_to_pred"], theirs["surfel_areas_gt"]),
            (ours.distances_pred_to_ref, ours.areas_pred, theirs["distances_pred_to_gt"], theirs["surfel_areas_pred"]),
        ):
            assert np.all(np.diff(d) >= 0)
            same_d = np.diff(d) == 0
            assert np.all(np.diff(a)[same_d] >= 0)
            np.testing.assert_allclose(np.sort(d), np.sort(d2), rtol=0, atol=1e-9)


def _random_labels(rng, shape, n_labels, dtype):
    vol = np.zeros(shape, dtype=dtype)
    for value in rng.choice(np.arange(1, n_labels + 1), size=min(n_labels, 5), replace=False):
        lo = [int(rng.integers(0, s)) for s in shape]
        hi = [int(rng.integers(l + 1, s + 1)) for l, s in zip(lo, shape)]
        block = tuple(slice(a, b) for a, b in zip(lo, hi))
        vol[block] = np.where(rng.random(vol[block].shape) < 0.7, value, vol[block])
    return vol


@needs_kernels
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("ndim", [2, 3])
def test_label_boxes_equal_find_objects_and_counts(dtype, ndim):
    rng = np.random.default_rng(3 + ndim)
    n_labels = 9
    for _ in range(25):
        shape = tuple(int(v) for v in rng.integers(1, 20, size=ndim))
        ref = _random_labels(rng, shape, n_labels, dtype)
        pred = _random_labels(rng, shape, n_labels, dtype)
        ref_boxes, pred_boxes, (n_ref, n_pred, tp) = _label_boxes(ref, pred, n_labels)
        for vol, boxes in ((ref, ref_boxes), (pred, pred_boxes)):
            want = ndimage.find_objects(vol, max_label=n_labels)
            assert boxes == want
        # counts of the structures' values (background is not counted)
        np.testing.assert_array_equal(n_ref[1:], np.bincount(ref.ravel(), minlength=n_labels + 1)[1:])
        np.testing.assert_array_equal(n_pred[1:], np.bincount(pred.ravel(), minlength=n_labels + 1)[1:])
        both = np.where(ref == pred, ref, 0)
        np.testing.assert_array_equal(tp[1:], np.bincount(both.ravel(), minlength=n_labels + 1)[1:])


@needs_kernels
def test_kernels_refuse_what_they_cannot_index():
    ref = np.zeros((2, 3, 4), dtype=np.uint8)
    ref[1, 1, 1] = 7
    boxes = np.empty((5, 6), dtype=np.int64)
    counts = np.empty((3, 6), dtype=np.int64)
    with pytest.raises(ValueError, match="value 7 is above the 5 labels"):
        kernels.label_boxes(ref, ref, 1, 2, 3, 4, 5, boxes, boxes.copy(), counts)
    with pytest.raises(ValueError, match="bytes"):
        kernels.label_boxes(ref, ref, 1, 2, 3, 5, 5, boxes, boxes.copy(), counts)
    codes = np.zeros((4, 4, 4), dtype=np.uint8)
    rank = np.empty(1, dtype=np.int32)
    with pytest.raises(ValueError, match="outside the code map"):
        kernels.nearest_rank(codes, np.array([60], dtype=np.int64), np.array([0, 5], dtype=np.int64), rank)
    with pytest.raises(ValueError, match="bytes"):
        kernels.corner_codes(np.zeros(10, dtype=np.uint8), 1, 1, 1, codes, 0, 0, 0)


def _same(a, b):
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@needs_kernels
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int64])
def test_evaluate_labels_equals_the_numpy_code(monkeypatch, dtype):
    rng = np.random.default_rng(17)
    labels = LabelMap({v: n for v, n in DEFAULT_LABELS if v <= 6})
    shape = (14, 40, 36)
    ref = _random_labels(rng, shape, 6, dtype)
    pred = ref.copy()
    pred[:, 2:, :] = ref[:, :-2, :]  # shifted: distances of 2 voxels and more
    pred[pred == 3] = 0  # one structure missed
    ref[ref == 5] = 0
    pred[4:7, 5:9, 5:9] = 5  # one hallucinated
    spacing = (2.5, 0.8, 0.8)
    for threads in (1, 2):
        compiled, plain = _both_ways(
            monkeypatch, lambda: evaluate_labels(ref, pred, spacing, labels, threads=threads, backend="numpy")
        )
        for x, y in zip(compiled, plain):
            for field, value in x.as_dict().items():
                other = y.as_dict()[field]
                if isinstance(value, float) and field not in ("ref_ml", "pred_ml"):
                    assert value == pytest.approx(other, abs=1e-12, nan_ok=True), (x.structure, field)
                else:
                    assert _same(value, other), (x.structure, field, value, other)
    assert {r.status for r in compiled} >= {"ok", "missed", "hallucinated"}
