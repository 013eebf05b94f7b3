"""Random test shapes: blobs, single voxels, thin sheets, shapes touching the border."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def random_mask(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    nd = len(shape)
    m = np.zeros(shape, bool)
    if kind == "blob":
        field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(0.8, 2.0))
        m = field > np.quantile(field, rng.uniform(0.5, 0.9))
    elif kind == "voxel":
        m[tuple(rng.integers(0, s) for s in shape)] = True
    elif kind == "sheet":
        axis = int(rng.integers(nd))
        idx = [slice(None)] * nd
        idx[axis] = int(rng.integers(shape[axis]))
        m[tuple(idx)] = True
        # cut it to a random sub-rectangle so it has edges
        for a in range(nd):
            if a != axis:
                lo = int(rng.integers(0, shape[a] // 2))
                hi = int(rng.integers(shape[a] // 2 + 1, shape[a] + 1))
                sl = [slice(None)] * nd
                sl[a] = slice(0, lo)
                m[tuple(sl)] = False
                sl[a] = slice(hi, None)
                m[tuple(sl)] = False
    elif kind == "border":
        # a box that touches at least one image border
        lo = [int(rng.integers(0, 2)) * 0 for _ in shape]
        hi = [int(rng.integers(s // 2, s + 1)) for s in shape]
        m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    elif kind == "scatter":
        m = rng.random(shape) < 0.08
    else:
        raise ValueError(kind)
    if not m.any():
        m[tuple(s // 2 for s in shape)] = True
    return m


def random_pair(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    kinds = ["blob", "voxel", "sheet", "border", "scatter"]
    ref = random_mask(rng, shape, kinds[int(rng.integers(len(kinds)))])
    mode = int(rng.integers(3))
    if mode == 0:  # a perturbed copy
        pred = ndimage.binary_dilation(ref) if rng.random() < 0.5 else ndimage.binary_erosion(ref)
        pred = np.roll(pred, int(rng.integers(-2, 3)), axis=int(rng.integers(len(shape))))
        if not pred.any():
            pred = ref.copy()
    else:  # an unrelated shape
        pred = random_mask(rng, shape, kinds[int(rng.integers(len(kinds)))])
    return ref, pred
