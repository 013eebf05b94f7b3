"""Measure two proposed speed-ups of the numpy surface-distance path (not a test).

Run by hand after ``make_case.py``::

    python benchmarks/bench_numpy_variants.py --case /tmp/oarbench-bench [--repeats 5]

Times ``evaluate_labels(backend="numpy")`` as it is, and with
``oarbench.metrics._surface.surface_distances_cropped`` replaced (in this process
only) by a variant that

1. skips the KD-tree for surfels that are surfels of both masks (the same corner
   of the same crop grid: distance exactly 0), and
2. builds the KD-tree with ``balanced_tree=False, compact_nodes=False`` (faster
   to build for these grid-aligned point sets; the query is exact either way),

and checks that every row stays identical. Rounds alternate between the two so
that changes of machine load hit both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.spatial import cKDTree

import oarbench.metrics._multilabel as multilabel
import oarbench.metrics._surface as surface
from oarbench.labels import DEFAULT_LABELS
from oarbench.metrics import evaluate_labels


def _nearest_fast(points: np.ndarray, targets: np.ndarray, target_grid: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """As ``_surface._nearest``, but corners that are targets themselves get 0 without a query."""
    out = np.zeros(len(points), dtype=np.float64)
    if len(points) == 0:
        return out
    if len(targets) == 0:
        return np.full(len(points), np.inf)
    todo = np.flatnonzero(~target_grid[tuple(points.T)])
    if len(todo) == 0:
        return out
    tree = cKDTree(targets * spacing, balanced_tree=False, compact_nodes=False)
    _, nearest = tree.query(points[todo] * spacing, k=1, workers=-1)
    delta = (targets[nearest] - points[todo]).astype(np.float64)
    delta *= spacing
    np.multiply(delta, delta, out=delta)
    total = delta[:, 0].copy()
    for axis in range(1, delta.shape[1]):
        total += delta[:, axis]
    out[todo] = np.sqrt(total)
    return out


def surface_distances_variant(reference: np.ndarray, prediction: np.ndarray, spacing: tuple[float, ...]):
    table = surface.contour_length_table(spacing) if reference.ndim == 2 else surface.surfel_area_table(spacing)
    box = surface._bounding_box(reference | prediction)
    if box is None:
        empty = np.zeros(0)
        return surface.SurfaceDistances(empty, empty, empty, empty)
    sp = np.asarray(spacing, dtype=np.float64)
    full = len(table) - 1
    grids, idx, areas = [], [], []
    for mask in (reference[box], prediction[box]):
        codes = surface.neighbour_codes(mask)
        border = (codes != 0) & (codes != full)
        where = np.nonzero(border)
        grids.append(border)
        idx.append(np.stack(where, axis=1))
        areas.append(table[codes[where]])
    d_rp = _nearest_fast(idx[0], idx[1], grids[1], sp)
    d_pr = _nearest_fast(idx[1], idx[0], grids[0], sp)
    return surface.SurfaceDistances(*surface._sorted(d_rp, areas[0]), *surface._sorted(d_pr, areas[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=Path("/tmp/oarbench-bench"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(args.case / "reference.nii.gz")))
    img = sitk.ReadImage(str(args.case / "prediction.nii.gz"))
    pred = sitk.GetArrayFromImage(img)
    spacing = tuple(float(s) for s in reversed(img.GetSpacing()))
    original = multilabel.surface_distances_cropped

    def run(variant: bool):
        multilabel.surface_distances_cropped = surface_distances_variant if variant else original
        try:
            return evaluate_labels(ref, pred, spacing, DEFAULT_LABELS, backend="numpy")
        finally:
            multilabel.surface_distances_cropped = original

    base, fast = run(False), run(True)
    assert [r.as_dict() for r in base] == [r.as_dict() for r in fast], "the variant changed a value"
    samples: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for variant in (False, True):
            t0 = time.perf_counter()
            run(variant)
            samples[variant].append(time.perf_counter() - t0)
    t0, t1 = statistics.median(samples[False]), statistics.median(samples[True])
    print(f"evaluate_labels numpy as is:     {[round(t, 3) for t in samples[False]]} median {t0:.3f} s")
    print(f"with the two proposed changes:   {[round(t, 3) for t in samples[True]]} median {t1:.3f} s")
    print(f"speed-up {t0 / t1:.2f}x; all rows identical")


if __name__ == "__main__":
    main()
