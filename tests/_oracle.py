"""A slow, independent oracle for surface distances: plain loops and brute force.

It shares no code with oarbench.metrics: neighbourhood codes come from explicit
loops over corners, surfel areas from the reference library's own table, distances
from the full pairwise distance matrix, the percentile from a loop.
"""

from __future__ import annotations

import itertools

import numpy as np


def surfels(mask: np.ndarray, spacing, area_table) -> tuple[np.ndarray, np.ndarray]:
    nd = mask.ndim
    shape = mask.shape
    points, areas = [], []
    full = 2 ** (2**nd) - 1
    for corner in itertools.product(*(range(s + 1) for s in shape)):
        code = 0
        for k, offset in enumerate(itertools.product((0, 1), repeat=nd)):
            voxel = tuple(c - 1 + o for c, o in zip(corner, offset))
            inside = all(0 <= v < s for v, s in zip(voxel, shape)) and bool(mask[voxel])
            if inside:
                code |= 1 << (2**nd - 1 - k)
        if code not in (0, full):
            points.append([c * s for c, s in zip(corner, spacing)])
            areas.append(area_table[code])
    return np.array(points, dtype=float).reshape(-1, nd), np.array(areas, dtype=float)


def nearest(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(b) == 0:
        return np.full(len(a), np.inf)
    diff = a[:, None, :] - b[None, :, :]
    return np.sqrt((diff**2).sum(axis=2)).min(axis=1)


def percentile(d: np.ndarray, a: np.ndarray, p: float) -> float:
    if len(d) == 0:
        return np.inf
    order = np.argsort(d, kind="stable")
    d, a = d[order], a[order]
    total = a.sum()
    running = 0.0
    for i in range(len(d)):
        running += a[i]
        if running / total >= p / 100.0:
            return float(d[i])
    return float(d[-1])


def metrics(ref: np.ndarray, pred: np.ndarray, spacing, area_table, tol: float) -> dict[str, float]:
    pr, ar = surfels(ref, spacing, area_table)
    pp, ap = surfels(pred, spacing, area_table)
    drp = nearest(pr, pp)
    dpr = nearest(pp, pr)
    mean_rp = float((drp * ar).sum() / ar.sum())
    mean_pr = float((dpr * ap).sum() / ap.sum())
    return {
        "hd": max(float(drp.max()), float(dpr.max())),
        "hd95": max(percentile(drp, ar, 95), percentile(dpr, ap, 95)),
        "msd": (mean_rp + mean_pr) / 2,
        "assd": float(((drp * ar).sum() + (dpr * ap).sum()) / (ar.sum() + ap.sum())),
        "sdsc": float((ar[drp <= tol].sum() + ap[dpr <= tol].sum()) / (ar.sum() + ap.sum())),
        "area_ref": float(ar.sum()),
        "area_pred": float(ap.sum()),
    }
