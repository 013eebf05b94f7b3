"""Surface distances on the corner grid (numpy/scipy backend) and the metrics derived from them.

Definitions: docs/metrics.md (the reference library's, DeepMind surface-distance).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, overload

import numpy as np

from oarbench.metrics import _kernels
from oarbench.metrics._tables import contour_length_table, surfel_area_table

__all__ = [
    "SurfaceDistances",
    "compute_surface_distances",
    "hausdorff",
    "hd",
    "directed_means",
    "hd95",
    "msd",
    "assd",
    "surface_dice",
    "surface_overlap",
    "as_bool_mask",
    "check_spacing",
    "check_pair",
]


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class SurfaceDistances:
    """Sorted surface distances of two masks, each way, with their surfel areas.

    Attributes
    ----------
    distances_ref_to_pred:
        For every surface element of the reference, the distance (mm) to the
        nearest surface element of the prediction; ascending.
    areas_ref:
        Area (mm^2; length in mm for 2D) of each reference surface element, in
        the same order.
    distances_pred_to_ref, areas_pred:
        The same from the prediction's side.

    An empty mask has no surface elements: its arrays are empty and the other
    side's distances are ``inf``.
    """

    distances_ref_to_pred: np.ndarray
    areas_ref: np.ndarray
    distances_pred_to_ref: np.ndarray
    areas_pred: np.ndarray

    def __post_init__(self) -> None:
        for name in ("distances_ref_to_pred", "areas_ref", "distances_pred_to_ref", "areas_pred"):
            object.__setattr__(self, name, _readonly(np.asarray(getattr(self, name), dtype=np.float64)))
        if self.distances_ref_to_pred.shape != self.areas_ref.shape:
            raise ValueError("distances_ref_to_pred and areas_ref differ in length")
        if self.distances_pred_to_ref.shape != self.areas_pred.shape:
            raise ValueError("distances_pred_to_ref and areas_pred differ in length")

    @property
    def area_ref(self) -> float:
        """Total reference surface area in mm^2 (contour length in mm for 2D)."""
        return float(np.sum(self.areas_ref))

    @property
    def area_pred(self) -> float:
        """Total predicted surface area in mm^2 (contour length in mm for 2D)."""
        return float(np.sum(self.areas_pred))


def as_bool_mask(mask: Any, name: str) -> np.ndarray:
    """A boolean numpy array from a bool / 0-1 array or a torch tensor.

    Raises ValueError for other values, naming the argument.
    """
    if type(mask).__module__.startswith("torch"):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected a boolean or 0/1 array, got dtype {arr.dtype}")
    if np.any((arr != 0) & (arr != 1)):
        raise ValueError(f"{name}: expected a boolean or 0/1 array, found values other than 0 and 1")
    return arr != 0


def check_spacing(spacing: Any, ndim: int) -> tuple[float, ...]:
    """Spacing as a tuple of positive floats, one per array axis."""
    sp = tuple(float(s) for s in np.ravel(np.asarray(spacing, dtype=np.float64)))
    if len(sp) != ndim:
        raise ValueError(f"spacing {sp} has {len(sp)} values for a {ndim}D array")
    if not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be positive and finite, got {sp}")
    return sp


def check_pair(reference: np.ndarray, prediction: np.ndarray, spacing: Any) -> tuple[float, ...]:
    """Check that two arrays share a 2D/3D shape; return the checked spacing."""
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} differs from prediction shape {prediction.shape}")
    if reference.ndim not in (2, 3):
        raise ValueError(f"arrays must be 2D or 3D, got {reference.ndim}D with shape {reference.shape}")
    return check_spacing(spacing, reference.ndim)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tightest slices holding all true voxels, or None for an empty mask."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        proj = np.flatnonzero(mask.any(axis=other))
        if proj.size == 0:
            return None
        box.append(slice(int(proj[0]), int(proj[-1]) + 1))
    return tuple(box)


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbourhood code of every corner of the voxel grid.

    For a mask of shape ``n`` the corner grid has shape ``n + 1``: corner ``p``
    sits between voxels ``p - 1`` and ``p`` on every axis (outside voxels count
    as background). Voxel offset ``(a, b, c)`` of the 2x2x2 neighbourhood sets
    bit ``7 - (4a + 2b + c)`` (2D: ``3 - (2a + b)``).
    """
    padded = np.zeros(tuple(s + 2 for s in mask.shape), dtype=np.uint8)
    padded[tuple(slice(1, -1) for _ in mask.shape)] = mask
    out_shape = tuple(s + 1 for s in mask.shape)
    codes = np.zeros(out_shape, dtype=np.uint8)
    nbits = 2**mask.ndim
    for offset in np.ndindex(*(2,) * mask.ndim):
        bit = nbits - 1 - int(sum(o << (mask.ndim - 1 - k) for k, o in enumerate(offset)))
        window = padded[tuple(slice(o, o + s) for o, s in zip(offset, out_shape))]
        codes |= window << np.uint8(bit)
    return codes


def _surfels(mask: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Surface elements of a mask: corner-grid indices (n x ndim), areas, and the
    boolean surfel map on the corner grid."""
    codes = neighbour_codes(mask)
    full = len(table) - 1
    border = (codes != 0) & (codes != full)
    idx = np.nonzero(border)
    return np.stack(idx, axis=1), table[codes[idx]], border


def _offset_distance(delta: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """sqrt(sum_k (delta_k * spacing_k)^2) for integer offsets (rows), summed over
    the axes in order: bit for bit what scipy's exact EDT computes."""
    d = delta.astype(np.float64) * spacing
    np.multiply(d, d, out=d)
    total = d[:, 0].copy()
    for axis in range(1, d.shape[1]):
        total += d[:, axis]
    return np.sqrt(total)


#: How many of the grid offsets nearest in mm the local search tries before the KD-tree.
LOCAL_OFFSETS = 200
#: The same for the compiled search, whose cost per point stops at its first hit.
LOCAL_OFFSETS_C = 2000
#: Threads of the KD-tree queries (scipy's ``workers``).
KDTREE_WORKERS = 1


@lru_cache(maxsize=32)
def _local_offsets(spacing: tuple[float, ...], count: int) -> tuple[np.ndarray, np.ndarray]:
    """The (at most) ``count`` integer offsets nearest to the origin in mm, ascending by distance
    (ties in a fixed order), and their distances; an offset is left out only with every other
    offset at its distance."""
    sp = np.asarray(spacing, dtype=np.float64)
    # A box certainly holding the `count` nearest offsets: the ball of radius r
    # holds at least the cube of half-side r / sqrt(ndim) (in mm).
    radius = max(sp) * (count ** (1.0 / len(sp)))
    half = np.ceil(radius / sp).astype(int)
    grids = np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    dist = _offset_distance(offsets, sp)
    order = np.lexsort(tuple(offsets[:, k] for k in reversed(range(offsets.shape[1]))) + (dist,))
    order = order[: count + 1]
    # Whole groups of equal distance only: a point that meets no target at these offsets
    # then lies farther than every one of them.
    order = order[: count][dist[order[:count]] < dist[order[count]]]
    offsets, dist = offsets[order], dist[order]
    offsets.flags.writeable = False
    dist.flags.writeable = False
    return offsets, dist


def _nearest(points: np.ndarray, targets: np.ndarray, target_map: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) from each corner index to the nearest target (inf if none).

    Exact in two stages. First the :data:`LOCAL_OFFSETS` grid offsets nearest in
    mm are tried in ascending order of distance against
    the target map: the first offset that lands on a target is the nearest one
    (every closer offset was tried before). Points with no target among those offsets go to a
    KD-tree over the targets. Every distance is computed from the integer index
    difference as sqrt(sum((delta_k * spacing_k)^2)), as scipy's exact EDT (and
    so the reference library) computes it.
    """
    n = len(points)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if len(targets) == 0:
        return np.full(n, np.inf)
    offsets, offset_dist = _local_offsets(tuple(float(v) for v in spacing), LOCAL_OFFSETS)
    reach = np.abs(offsets).max(axis=0)
    padded = np.pad(target_map, [(int(r), int(r)) for r in reach])
    strides = np.array([int(np.prod(padded.shape[k + 1 :])) for k in range(padded.ndim)], dtype=np.int64)
    flat_map = padded.ravel()
    dist = np.full(n, np.inf)
    todo = np.arange(n)
    where = (points + reach) @ strides
    for off, d in zip(offsets @ strides, offset_dist):
        hit = flat_map[where + off]
        if hit.any():
            dist[todo[hit]] = d
            keep = ~hit
            todo, where = todo[keep], where[keep]
            if len(todo) == 0:
                return dist
    from scipy.spatial import cKDTree

    tree = cKDTree(targets * spacing, balanced_tree=False, compact_nodes=False)
    _, nearest = tree.query(points[todo] * spacing, k=1, workers=KDTREE_WORKERS)
    dist[todo] = _offset_distance(targets[nearest] - points[todo], spacing)
    return dist


def _surfels_c(mask: np.ndarray, pad: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_surfels` for a 3D mask with the compiled kernels: the surface corners as flat
    indices into the code map padded by ``pad`` corners on each side, their codes, and that
    code map (uint8, 0 in the padding)."""
    padded = np.zeros(tuple(s + 2 for s in mask.shape), dtype=np.uint8)
    padded[1:-1, 1:-1, 1:-1] = mask
    codes = np.zeros(tuple(int(s + 1 + 2 * p) for s, p in zip(mask.shape, pad)), dtype=np.uint8)
    n = _kernels.ckernels.corner_codes(padded, *mask.shape, codes, *(int(p) for p in pad))
    index = np.empty(n, dtype=np.int64)
    _kernels.ckernels.border_index(codes, index)
    return index, codes.ravel()[index], codes


def _nearest_c(
    where: np.ndarray, targets: np.ndarray, target_codes: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_nearest` for flat corner indices into padded code maps (:func:`_surfels_c`):
    the compiled local search over the offsets of :func:`_local_offsets`, then the same
    KD-tree for the rest. Returns the distances and, per point, the index of the offset
    that found its target (-1 for the points left to the KD-tree)."""
    n = len(where)
    rank = np.full(n, -1, dtype=np.int32)
    if n == 0:
        return np.zeros(0, dtype=np.float64), rank
    if len(targets) == 0:
        return np.full(n, np.inf), rank
    offsets, offset_dist = _local_offsets(tuple(float(v) for v in spacing), LOCAL_OFFSETS_C)
    strides = np.array([int(np.prod(target_codes.shape[k + 1 :])) for k in range(target_codes.ndim)], dtype=np.int64)
    _kernels.ckernels.nearest_rank(target_codes, where, np.ascontiguousarray(offsets @ strides), rank)
    found = rank >= 0
    dist = np.empty(n, dtype=np.float64)
    dist[found] = offset_dist[rank[found]]
    todo = np.flatnonzero(~found)
    if len(todo):
        shape = target_codes.shape
        points = np.stack(np.unravel_index(where[todo], shape), axis=1)
        target_points = np.stack(np.unravel_index(targets, shape), axis=1)
        from scipy.spatial import cKDTree

        tree = cKDTree(target_points * spacing, balanced_tree=False, compact_nodes=False)
        _, nearest = tree.query(points * spacing, k=1, workers=KDTREE_WORKERS)
        dist[todo] = _offset_distance(target_points[nearest] - points, spacing)
    return dist, rank


@lru_cache(maxsize=32)
def _value_ranks(values: tuple[float, ...]) -> tuple[np.ndarray, int]:
    """The rank of each value among the distinct values (equal values, equal rank), and how
    many distinct values there are."""
    distinct, inverse = np.unique(np.asarray(values, dtype=np.float64), return_inverse=True)
    inverse = inverse.astype(np.int64)
    inverse.flags.writeable = False
    return inverse, len(distinct)


def _sorted_ranked(
    distances: np.ndarray, rank: np.ndarray, codes: np.ndarray, table: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_sorted` for the compiled search's output, in linear time where it can.

    A distance found at offset ``rank`` is one of the offset table's values and an area one of
    the area table's, so (distance, area) order is the order of a small integer key: rank of the
    distance among the table's distinct distances times the number of distinct areas, plus the
    rank of the area. A stable sort of 16-bit keys is a radix sort in numpy. The points left to
    the KD-tree lie farther than every offset (:func:`_local_offsets`) and follow, sorted by
    :func:`_sorted`. The order is the same as :func:`_sorted`'s up to ties of equal (distance,
    area), which are interchangeable."""
    areas = table[codes]
    _, offset_dist = _local_offsets(tuple(float(v) for v in spacing), LOCAL_OFFSETS_C)
    dist_rank, n_dist = _value_ranks(tuple(offset_dist.tolist()))
    area_rank, n_area = _value_ranks(tuple(table.tolist()))
    if n_dist * n_area > 1 << 16:
        return _sorted(distances, areas)
    found = rank >= 0
    if found.all():
        key = (dist_rank[rank] * n_area + area_rank[codes]).astype(np.uint16)
        order = np.argsort(key, kind="stable")
    else:
        near = np.flatnonzero(found)
        far = np.flatnonzero(~found)
        key = (dist_rank[rank[near]] * n_area + area_rank[codes[near]]).astype(np.uint16)
        order = np.concatenate([near[np.argsort(key, kind="stable")], far[np.lexsort((areas[far], distances[far]))]])
    return distances[order], areas[order]


def _offset_reach(spacing: np.ndarray) -> np.ndarray:
    """How far (grid steps per axis) the local offsets reach."""
    offsets, _ = _local_offsets(tuple(float(v) for v in spacing), LOCAL_OFFSETS_C)
    return np.abs(offsets).max(axis=0)


def _sorted(distances: np.ndarray, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Sort by distance, ties by area, as the reference library does.
    order = np.lexsort((areas, distances))
    return distances[order], areas[order]


def surface_distances_cropped(
    reference: np.ndarray, prediction: np.ndarray, spacing: tuple[float, ...], *, tight: bool = False
) -> SurfaceDistances:
    """:func:`compute_surface_distances` for boolean masks already validated.

    ``tight``: the caller guarantees that ``reference | prediction`` touches every face of the
    arrays (they are cut to the union of the two masks' bounding boxes), so the crop to that
    box is skipped."""
    table = contour_length_table(spacing) if reference.ndim == 2 else surfel_area_table(spacing)
    box = tuple(slice(None) for _ in reference.shape) if tight else _bounding_box(reference | prediction)
    if box is None:
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty, empty, empty)
    sp = np.asarray(spacing, dtype=np.float64)
    if reference.ndim == 3 and _kernels.ckernels is not None:
        pad = _offset_reach(sp)
        idx_ref, code_ref, map_ref = _surfels_c(reference[box], pad)
        idx_pred, code_pred, map_pred = _surfels_c(prediction[box], pad)
        d_rp, rank_rp = _nearest_c(idx_ref, idx_pred, map_pred, sp)
        d_pr, rank_pr = _nearest_c(idx_pred, idx_ref, map_ref, sp)
        return SurfaceDistances(*_sorted_ranked(d_rp, rank_rp, code_ref, table, sp),
                                *_sorted_ranked(d_pr, rank_pr, code_pred, table, sp))
    pts_ref, area_ref, map_ref = _surfels(reference[box], table)
    pts_pred, area_pred, map_pred = _surfels(prediction[box], table)
    d_rp = _nearest(pts_ref, pts_pred, map_pred, sp)
    d_pr = _nearest(pts_pred, pts_ref, map_ref, sp)
    return SurfaceDistances(*_sorted(d_rp, area_ref), *_sorted(d_pr, area_pred))


def compute_surface_distances(reference: Any, prediction: Any, spacing: Any) -> SurfaceDistances:
    """Surface distances between two masks, both ways.

    Parameters
    ----------
    reference, prediction:
        Boolean (or 0/1) arrays of the same 2D or 3D shape, axes (z, y, x)
        (or (y, x)); numpy arrays or torch tensors.
    spacing:
        Voxel size in mm along the same axes.

    The masks are cropped to the bounding box of ``reference | prediction``
    (exact: the corner grid beyond it holds no surface). Distances are exact
    Euclidean distances in mm between surface-element positions.
    """
    ref = as_bool_mask(reference, "reference")
    pred = as_bool_mask(prediction, "prediction")
    return surface_distances_cropped(ref, pred, check_pair(ref, pred, spacing))


def _resolve(sd_or_ref: Any, prediction: Any, spacing: Any) -> SurfaceDistances:
    if isinstance(sd_or_ref, SurfaceDistances):
        if prediction is not None or spacing is not None:
            raise ValueError("pass either a SurfaceDistances or (reference, prediction, spacing), not both")
        return sd_or_ref
    if prediction is None or spacing is None:
        raise ValueError("masks need both a prediction and a spacing")
    return compute_surface_distances(sd_or_ref, prediction, spacing)


def _directed_percentile(distances: np.ndarray, areas: np.ndarray, percentile: float) -> float:
    if len(distances) == 0:
        return np.inf
    if percentile >= 100:
        return float(distances[-1])
    cumulative = np.cumsum(areas) / np.sum(areas)
    idx = int(np.searchsorted(cumulative, percentile / 100.0))
    return float(distances[min(idx, len(distances) - 1)])


def hausdorff(sd: SurfaceDistances, percentile: float = 100.0) -> float:
    """Hausdorff distance (mm) at a percentile of the area-weighted distances.

    Per direction: distances ascending, cumulative area over total area, the
    first index whose fraction is >= ``percentile / 100`` (clipped to the last);
    the larger of the two directions. ``percentile=100`` is the maximum.
    """
    if not isinstance(sd, SurfaceDistances):
        raise TypeError("hausdorff() takes a SurfaceDistances; for masks use hd() or hd95()")
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
    return max(
        _directed_percentile(sd.distances_ref_to_pred, sd.areas_ref, percentile),
        _directed_percentile(sd.distances_pred_to_ref, sd.areas_pred, percentile),
    )


def hd(sd: Any, prediction: Any = None, spacing: Any = None) -> float:
    """Hausdorff distance (maximum) in mm.

    Call as ``hd(sd)`` or ``hd(reference, prediction, spacing)``.
    """
    return hausdorff(_resolve(sd, prediction, spacing), 100.0)


def hd95(sd: Any, prediction: Any = None, spacing: Any = None) -> float:
    """95th-percentile Hausdorff distance in mm (see :func:`hausdorff`).

    Call as ``hd95(sd)`` or ``hd95(reference, prediction, spacing)``.
    """
    return hausdorff(_resolve(sd, prediction, spacing), 95.0)


def _directed_mean(distances: np.ndarray, areas: np.ndarray) -> float:
    if len(distances) == 0:
        return np.nan
    return float(np.sum(distances * areas) / np.sum(areas))


def directed_means(sd: SurfaceDistances) -> tuple[float, float]:
    """Area-weighted mean distance ref->pred and pred->ref (mm)."""
    return (
        _directed_mean(sd.distances_ref_to_pred, sd.areas_ref),
        _directed_mean(sd.distances_pred_to_ref, sd.areas_pred),
    )


def msd(sd: Any, prediction: Any = None, spacing: Any = None) -> float:
    """Mean surface distance (mm): the mean of the two directed area-weighted means.

    ``inf`` when exactly one mask is empty, NaN when both are.
    """
    s = _resolve(sd, prediction, spacing)
    if len(s.areas_ref) == 0 and len(s.areas_pred) == 0:
        return np.nan
    if len(s.areas_ref) == 0 or len(s.areas_pred) == 0:
        return np.inf
    a, b = directed_means(s)
    return (a + b) / 2.0


def assd(sd: Any, prediction: Any = None, spacing: Any = None) -> float:
    """Average symmetric surface distance (mm): area-pooled over both surfaces."""
    s = _resolve(sd, prediction, spacing)
    if len(s.areas_ref) == 0 and len(s.areas_pred) == 0:
        return np.nan
    if len(s.areas_ref) == 0 or len(s.areas_pred) == 0:
        return np.inf
    total = np.sum(s.distances_ref_to_pred * s.areas_ref) + np.sum(s.distances_pred_to_ref * s.areas_pred)
    return float(total / (np.sum(s.areas_ref) + np.sum(s.areas_pred)))


def surface_overlap(sd: SurfaceDistances, tolerance_mm: float) -> tuple[float, float]:
    """Fraction of each surface within ``tolerance_mm`` of the other: (ref, pred).

    NaN for a side without surface.
    """

    def frac(d: np.ndarray, a: np.ndarray) -> float:
        if len(d) == 0:
            return np.nan
        return float(np.sum(a[d <= tolerance_mm]) / np.sum(a))

    return frac(sd.distances_ref_to_pred, sd.areas_ref), frac(sd.distances_pred_to_ref, sd.areas_pred)


def surface_dice(sd: SurfaceDistances, tolerance_mm: float) -> float:
    """Surface Dice at ``tolerance_mm``: surface area within tolerance over total area.

    NaN when both masks are empty, 0 when exactly one is.
    """
    if tolerance_mm < 0:
        raise ValueError(f"tolerance must be >= 0 mm, got {tolerance_mm}")
    total = np.sum(sd.areas_ref) + np.sum(sd.areas_pred)
    if total == 0:
        return np.nan
    close = np.sum(sd.areas_ref[sd.distances_ref_to_pred <= tolerance_mm]) + np.sum(
        sd.areas_pred[sd.distances_pred_to_ref <= tolerance_mm]
    )
    return float(close / total)
