"""Metrics a radiotherapy reader expects beside Dice and surface distances.

* **Added path length** (APL; Vaassen et al. 2020, Phys Imaging Radiat Oncol 13:1-6): per axial
  slice, the length of the reference contour that lies farther than a tolerance from the
  predicted contour, i.e. the contour a clinician would have to draw to correct the prediction.
* **Volumetric similarity** ``VS = 1 - |V_pred - V_ref| / (V_pred + V_ref)``.
* **Centroid distance**: Euclidean distance in mm between the centres of mass of the two masks.

Arrays are (z, y, x) with spacing (z, y, x) in mm; axis 0 is the slice axis (axial for images
stored axially, as CT is). Conventions and worked cases are in docs/metrics.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from oarbench.metrics import _kernels

__all__ = [
    "APL_CONVENTIONS",
    "AddedPathLength",
    "added_path_length",
    "contour_pixels",
    "volumetric_similarity",
    "centroid_distance",
    "resolution_warning",
    "resolution_limit",
    "RESOLUTION_LIMITS",
]

#: ``exact``: in-plane Euclidean distance in mm <= tolerance; ``platipy``: the tolerance turned
#: into a dilation by ITK's ball of ``n = ceil(tolerance / mean in-plane spacing)`` pixels (the disc
#: of radius ``n + 1/2`` in pixel units).
APL_CONVENTIONS: tuple[str, ...] = ("exact", "platipy")



@dataclass(frozen=True)
class AddedPathLength:
    """Added path length of one structure.

    Attributes
    ----------
    apl_mm : length (mm) of reference contour farther than the tolerance from the predicted
        contour in the same axial slice, summed over slices: added contour pixels times the mean
        in-plane spacing (the pixel-count length of platipy and of Vaassen et al.'s voxel form).
    n_pixels : added contour pixels.
    n_slices : axial slices holding reference contour.
    tolerance_mm : the tolerance used.
    convention : ``exact`` or ``platipy`` (:data:`APL_CONVENTIONS`).
    """

    apl_mm: float
    n_pixels: int
    n_slices: int
    tolerance_mm: float
    convention: str

    @property
    def apl_mm_per_slice(self) -> float:
        """APL divided by the slices holding reference contour (0 when there are none)."""
        return self.apl_mm / self.n_slices if self.n_slices else 0.0


def contour_pixels(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with an in-plane 4-neighbour outside it, slice by slice along axis 0.

    Away from the image border this is the contour SimpleITK's ``LabelContour`` (default
    ``fullyConnected=False``) marks on each 2D slice; at the border oarbench counts the outside as
    background (a structure cut by the field of view has its contour along the cut, as a closed
    RTSTRUCT polygon would), ITK does not.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim == 2:
        return contour_pixels(m[None])[0]
    if m.ndim != 3:
        raise ValueError(f"mask must be 2D or 3D, got shape {m.shape}")
    inner = m.copy()
    inner[:, 1:, :] &= m[:, :-1, :]
    inner[:, :-1, :] &= m[:, 1:, :]
    inner[:, :, 1:] &= m[:, :, :-1]
    inner[:, :, :-1] &= m[:, :, 1:]
    inner[:, 0, :] = inner[:, -1, :] = False
    inner[:, :, 0] = inner[:, :, -1] = False
    return m & ~inner


def added_path_length(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 0.0,
    convention: str = "exact",
) -> AddedPathLength:
    """Added path length of ``prediction`` against ``reference`` (boolean masks, (z, y, x)).

    A reference contour pixel is *added* when no predicted contour pixel of the same slice lies
    within the tolerance: ``exact``: in-plane Euclidean distance between pixel centres in mm
    ``<= tolerance_mm`` (to 1e-9 relative); ``platipy``: within ITK's ball of ``n =
    ceil(tolerance_mm / mean(s_y, s_x))`` pixels (pixel distance ``<= n + 1/2``), the dilation of
    platipy's ``compute_metric_total_apl``. A slice without predicted contour adds its whole
    reference contour; an empty prediction adds the whole reference contour; an empty reference
    adds nothing. The in-plane offsets within the tolerance are tried nearest first against the
    predicted contour (a KD-tree when there are many), so the cost grows with the contour, not the
    volume.

    Parameters
    ----------
    reference, prediction : boolean masks of the same shape, (z, y, x) or (y, x).
    spacing : voxel size in mm, same axis order.
    tolerance_mm : accepted distance in mm (>= 0).
    convention : ``exact`` (default) or ``platipy``.
    """
    if convention not in APL_CONVENTIONS:
        raise ValueError(f"APL convention must be one of {', '.join(APL_CONVENTIONS)}, got {convention!r}")
    if not (tolerance_mm >= 0 and math.isfinite(tolerance_mm)):
        raise ValueError(f"tolerance must be a finite number >= 0 mm, got {tolerance_mm}")
    r = np.asarray(reference, dtype=bool)
    p = np.asarray(prediction, dtype=bool)
    sp = tuple(float(s) for s in spacing)
    if r.shape != p.shape:
        raise ValueError(f"reference and prediction differ in shape: {r.shape} and {p.shape}")
    if r.ndim == 2:
        r, p, sp = r[None], p[None], (1.0, *sp)
    if r.ndim != 3 or len(sp) != 3:
        raise ValueError(f"masks must be 2D or 3D with one spacing per axis, got {r.shape} and {spacing}")
    pixel = (sp[1] + sp[2]) / 2.0
    cr = contour_pixels(r)
    n_slices = int(np.count_nonzero(cr.any(axis=(1, 2))))
    if n_slices == 0:
        return AddedPathLength(0.0, 0, 0, float(tolerance_mm), convention)
    cp = contour_pixels(p)
    if not cp.any():
        n = int(np.count_nonzero(cr))
    else:
        if convention == "exact":
            scale = np.array([1.0, sp[1], sp[2]])
            limit = tolerance_mm * (1.0 + 1e-9)
        else:
            # ITK's ball of radius k (sitk.BinaryDilate's default kernel) is the disc of radius k + 1/2
            scale = np.array([1.0, 1.0, 1.0])
            limit = math.ceil(tolerance_mm / pixel) + 0.5 if tolerance_mm > 0 else 0.0
        # pixels on both contours are at distance 0: only the others are looked up
        todo = np.argwhere(cr & ~cp)
        n = _count_farther(todo, cp, scale, limit) if todo.size else 0
    return AddedPathLength(n * pixel, n, n_slices, float(tolerance_mm), convention)


_MAX_OFFSETS = 400  # above this many in-plane offsets within the limit, a KD-tree is faster


def _count_farther(todo: np.ndarray, cp: np.ndarray, scale: np.ndarray, limit: float) -> int:
    """How many pixels ``todo`` (z, y, x indices) have no pixel of ``cp`` in the same slice within
    ``limit`` (in-plane distance with ``scale`` = (_, s_y, s_x) per index step).

    The in-plane offsets within the limit are tried nearest first against ``cp``; a pixel is done
    at its first hit. Many offsets (a tolerance of many pixels): a KD-tree over ``cp`` instead,
    with slices kept apart by an offset larger than any in-plane distance.
    """
    sy, sx = float(scale[1]), float(scale[2])
    ry, rx = int(math.floor(limit / sy)), int(math.floor(limit / sx))
    dy, dx = np.mgrid[-ry:ry + 1, -rx:rx + 1]
    dist = np.sqrt((dy * sy) ** 2 + (dx * sx) ** 2)
    keep = dist <= limit
    if int(keep.sum()) > _MAX_OFFSETS:
        from scipy.spatial import cKDTree

        far = 2.0 * (limit + 1.0) + max(cp.shape[1] * sy, cp.shape[2] * sx) + 1.0
        sc = np.array([far, sy, sx])
        tree = cKDTree(np.argwhere(cp) * sc)
        d, _ = tree.query(todo * sc, k=1, distance_upper_bound=limit + 1e-12 * max(1.0, limit))
        return int(np.count_nonzero(d > limit))
    order = np.argsort(dist[keep], kind="stable")
    offsets = np.stack([dy[keep][order], dx[keep][order]], axis=1)
    kernels = _kernels.ckernels
    if kernels is not None:
        # the compiled search of the surface core: the first offset that meets the contour
        padded = np.pad(cp.astype(np.uint8), ((0, 0), (ry, ry), (rx, rx)))
        h, w = padded.shape[1:]
        where = (todo[:, 0] * h + todo[:, 1] + ry) * w + todo[:, 2] + rx
        rank = np.empty(len(todo), dtype=np.int32)
        kernels.nearest_rank(padded, where.astype(np.int64), (offsets[:, 0] * w + offsets[:, 1]).astype(np.int64), rank)
        return int(np.count_nonzero(rank < 0))
    padded = np.pad(cp, ((0, 0), (ry, ry), (rx, rx)))
    z, y, x = todo[:, 0], todo[:, 1] + ry, todo[:, 2] + rx
    for oy, ox in offsets:
        hit = padded[z, y + oy, x + ox]
        if hit.any():
            miss = ~hit
            z, y, x = z[miss], y[miss], x[miss]
            if z.size == 0:
                break
    return int(z.size)


def volumetric_similarity(n_ref: int, n_pred: int) -> float:
    """``1 - |n_pred - n_ref| / (n_pred + n_ref)`` from voxel counts (same grid); NaN when both
    are empty, 0 when exactly one is."""
    total = n_ref + n_pred
    if total == 0:
        return math.nan
    return 1.0 - abs(n_pred - n_ref) / total


def centroid_distance(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float]) -> float:
    """Distance in mm between the centres of mass of two masks on one grid.

    Computed in voxel indices scaled by the spacing. The direction cosines of an image are
    orthonormal, so this is also the distance between the two centroids in patient
    coordinates. ``inf`` when exactly one mask is empty, NaN when both are.
    """
    r = np.asarray(reference, dtype=bool)
    p = np.asarray(prediction, dtype=bool)
    has_r, has_p = bool(r.any()), bool(p.any())
    if not has_r and not has_p:
        return math.nan
    if not (has_r and has_p):
        return math.inf
    cr, cp = _centroid(r), _centroid(p)
    return float(np.sqrt(np.sum(((cr - cp) * np.asarray(spacing, dtype=float)) ** 2)))


def _centroid(m: np.ndarray) -> np.ndarray:
    """Centre of mass in voxel indices, from the projections onto each axis (exact counts)."""
    m = m.view(np.uint8)
    total = float(np.count_nonzero(m))
    if m.ndim == 1:
        return np.array([float(np.dot(m.astype(np.float64), np.arange(m.size))) / total])
    rest = m.sum(axis=0, dtype=np.int64)  # projection onto the last axes: one pass
    first = m.reshape(m.shape[0], -1).sum(axis=1, dtype=np.int64)
    out = [float(np.dot(first, np.arange(m.shape[0], dtype=np.float64))) / total]
    out.extend(_centroid_counts(rest, total))
    return np.array(out)


def _centroid_counts(counts: np.ndarray, total: float) -> list[float]:
    out = []
    for axis in range(counts.ndim):
        other = tuple(a for a in range(counts.ndim) if a != axis)
        c = counts.sum(axis=other) if other else counts
        out.append(float(np.dot(c.astype(np.float64), np.arange(counts.shape[axis], dtype=np.float64))) / total)
    return out


#: The spacing that limits each tolerance-based metric: the surface Dice compares 3D surfel
#: distances (the coarsest voxel spacing), APL in-plane distances within a slice (the coarsest
#: in-plane spacing, array axes 1 and 2).
RESOLUTION_LIMITS: dict[str, str] = {"sdsc": "coarsest voxel spacing", "apl_mm": "coarsest in-plane spacing"}
_RESOLUTION_NAMES = {"sdsc": "surface Dice", "apl_mm": "APL"}


def resolution_limit(spacing: Sequence[float], metric: str = "sdsc") -> float:
    """The spacing (mm) below which ``metric``'s tolerance is not resolved (:data:`RESOLUTION_LIMITS`)."""
    if metric not in RESOLUTION_LIMITS:
        raise ValueError(f"metric must be one of {', '.join(RESOLUTION_LIMITS)}, got {metric!r}")
    sp = [float(s) for s in spacing]
    if metric == "apl_mm" and len(sp) == 3:
        sp = sp[1:]
    return max(sp)


def resolution_warning(tolerance_mm: float, spacing: Sequence[float], metric: str = "sdsc") -> str | None:
    """A message when ``metric``'s tolerance is below the spacing that limits it, else ``None``.

    ``sdsc``: the smallest non-zero surfel distance is about one voxel along the coarse axis, so
    surface Dice at a tolerance below the coarsest spacing cannot tell that tolerance from 0 mm:
    on a 3 mm grid, 2 mm behaves like 0, 1 or 2.99 mm and jumps at 3.0 mm. ``apl_mm``: APL
    measures in-plane distances within a slice, so only the in-plane spacing limits it (on 0.8 x
    1.1 x 2.5 mm voxels it changes between 0, 0.8, 1.1 and 2.49 mm); it warns below the coarsest
    in-plane spacing. Pure: the caller decides what to do with the message.
    """
    limit = resolution_limit(spacing, metric)
    if tolerance_mm < limit:
        name = _RESOLUTION_NAMES[metric]
        return (f"{name}: tolerance {tolerance_mm:g} mm is below the {RESOLUTION_LIMITS[metric]} {limit:g} mm: "
                f"{name} does not resolve distances below one voxel there")
    return None
