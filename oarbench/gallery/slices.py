"""Slice geometry: orient to LPS, choose the most telling slice, crop it into a :class:`Tile`.

Display conventions (docs/report.md): every volume is reoriented with
SimpleITK ``DICOMOrient(image, "LPS")`` so that, in the array (z, y, x), x grows
toward the patient's Left, y toward Posterior and z toward Superior. Tiles are
shown in radiological convention: axial slices seen from the feet (patient
left on image right, anterior up), coronal slices seen from the front (patient
left on image right, superior up), sagittal slices seen from the patient's left
(anterior on image left, superior up).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from oarbench.gallery.windows import window_for
from oarbench.tiles import Tile, tile_title

__all__ = ["PLANES", "Tile", "orient_lps", "disagreement_per_slice", "choose_slice", "island_sizes", "tile_title", "make_tile"]

#: Planes in tie-break order: the first wins when two show equal disagreement.
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")

def orient_lps(image: Any) -> Any:
    """Reorient a SimpleITK image so that its direction is the identity (LPS).

    After this, ``GetArrayFromImage`` gives axes (z, y, x) with x toward the
    patient's Left, y toward Posterior, z toward Superior. Oblique directions are
    snapped to the closest axis-aligned orientation (ITK's DICOMOrient rule),
    which is exact for a permutation/flip of axes and an approximation otherwise.
    """
    import SimpleITK as sitk

    return sitk.DICOMOrient(image, "LPS")


def disagreement_per_slice(reference: np.ndarray, prediction: np.ndarray) -> dict[str, np.ndarray]:
    """FP + FN voxel counts per slice for each plane.

    ``reference`` and ``prediction`` are bool arrays (z, y, x) in LPS orientation.
    Returns ``{"axial": counts over z, "coronal": counts over y, "sagittal": counts over x}``.
    """
    diff = np.logical_xor(reference, prediction)
    return {
        "axial": diff.sum(axis=(1, 2)),
        "coronal": diff.sum(axis=(0, 2)),
        "sagittal": diff.sum(axis=(0, 1)),
    }


def island_sizes(mask: np.ndarray) -> np.ndarray:
    """Voxel counts of the connected components of a mask, smallest first.

    26-connectivity: voxels touching by a face, an edge or a corner belong to
    one component (``scipy.ndimage.label`` with a 3x3x3 structure). An empty
    mask gives an empty array.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros(0, dtype=np.int64)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
    labelled, n = ndimage.label(mask[box], structure=np.ones((3,) * mask.ndim, dtype=bool))
    return np.sort(np.bincount(labelled.ravel())[1:]).astype(np.int64)


def _plane_pixel_mm(plane: str, spacing: tuple[float, float, float]) -> tuple[float, float]:
    sz, sy, sx = spacing
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[plane]


def choose_slice(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: tuple[float, float, float],
    plane: str = "auto",
) -> tuple[str, int, int]:
    """The plane and slice that show the disagreement best.

    Within a plane, the slice with the most FP + FN voxels (lowest index on
    ties). With ``plane="auto"`` the plane whose best slice shows the largest
    disagreement *area* in mm^2 (voxel count times in-plane pixel area, so a
    thick-slice coronal view does not win just by having few, large pixels
    counted once), ties going to axial, then coronal, then sagittal. When the
    masks agree everywhere (or one is empty and the other too), the slice with
    the most voxels of reference OR prediction is used instead.

    Returns ``(plane, slice_index, disagreement_voxels)``.
    """
    if reference.shape != prediction.shape or reference.ndim != 3:
        raise ValueError(f"reference {reference.shape} and prediction {prediction.shape} must be 3D arrays of one shape")
    if plane != "auto" and plane not in PLANES:
        raise ValueError(f"plane must be 'auto' or one of {', '.join(PLANES)}, got {plane!r}")
    counts = disagreement_per_slice(reference, prediction)
    if not any(c.any() for c in counts.values()):
        union = np.logical_or(reference, prediction)
        counts = {"axial": union.sum(axis=(1, 2)), "coronal": union.sum(axis=(0, 2)), "sagittal": union.sum(axis=(0, 1))}
    candidates = PLANES if plane == "auto" else (plane,)
    best: tuple[float, str, int] | None = None
    for p in candidates:
        idx = int(np.argmax(counts[p]))
        rows_mm, cols_mm = _plane_pixel_mm(p, spacing)
        area = float(counts[p][idx]) * rows_mm * cols_mm
        if best is None or area > best[0]:
            best = (area, p, idx)
    assert best is not None
    _, p, idx = best
    diff = np.logical_xor(reference, prediction)
    return p, idx, int(_extract(diff, p, idx).sum())


def _extract(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """A 2D slice of an LPS (z, y, x) array in display orientation.

    axial: rows y (anterior at top), columns x (patient right at left);
    coronal: rows z flipped (superior at top), columns x;
    sagittal: rows z flipped (superior at top), columns y (anterior at left).
    """
    if plane == "axial":
        return volume[index, :, :]
    if plane == "coronal":
        return volume[::-1, index, :]
    if plane == "sagittal":
        return volume[::-1, :, index]
    raise ValueError(f"unknown plane {plane!r}")


def _crop_box(mask: np.ndarray, pixel_mm: tuple[float, float], margin_mm: float, min_size_mm: float) -> tuple[slice, slice]:
    rows, cols = mask.shape
    if not mask.any():
        return slice(0, rows), slice(0, cols)
    r = np.flatnonzero(mask.any(axis=1))
    c = np.flatnonzero(mask.any(axis=0))
    out = []
    for lo, hi, n, mm in ((r[0], r[-1], rows, pixel_mm[0]), (c[0], c[-1], cols, pixel_mm[1])):
        pad = int(math.ceil(margin_mm / mm))
        start, stop = lo - pad, hi + 1 + pad
        min_px = int(math.ceil(min_size_mm / mm))
        if stop - start < min_px:
            extra = min_px - (stop - start)
            start -= extra // 2
            stop += extra - extra // 2
        start, stop = max(start, 0), min(stop, n)
        out.append(slice(int(start), int(stop)))
    return out[0], out[1]


def make_tile(
    image: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    structure: str,
    meta: Mapping[str, Any] | None = None,
    plane: str = "auto",
    margin_mm: float = 15.0,
    min_size_mm: float = 60.0,
) -> Tile:
    """Cut the most telling 2D view out of one case.

    Parameters
    ----------
    image:
        CT in HU, axes (z, y, x), LPS orientation (see :func:`orient_lps`).
    reference, prediction:
        Masks of one structure on the same grid (bool or 0/1).
    spacing:
        Voxel size in mm, (z, y, x).
    structure:
        Structure name (chooses the window).
    meta:
        Row fields for the title (case, structure, model, centre, condition,
        status, dsc, hd95).
    plane:
        ``auto`` (see :func:`choose_slice`) or a fixed plane.
    margin_mm:
        Margin around the union of both masks in the crop, in mm.
    min_size_mm:
        Smallest crop side in mm (small structures keep some context).
    """
    image = np.asarray(image)
    reference = np.asarray(reference).astype(bool)
    prediction = np.asarray(prediction).astype(bool)
    if not (image.shape == reference.shape == prediction.shape):
        raise ValueError(
            f"image {image.shape}, reference {reference.shape} and prediction {prediction.shape} must share one grid"
        )
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing}")
    spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    p, idx, n_diff = choose_slice(reference, prediction, spacing, plane)
    img2 = _extract(image, p, idx)
    ref2 = _extract(reference, p, idx)
    pred2 = _extract(prediction, p, idx)
    pixel_mm = _plane_pixel_mm(p, spacing)
    rs, cs = _crop_box(ref2 | pred2, pixel_mm, margin_mm, min_size_mm)
    meta = dict(meta or {})
    meta.setdefault("structure", structure)
    return Tile(
        image=np.ascontiguousarray(img2[rs, cs]),
        reference=np.ascontiguousarray(ref2[rs, cs]),
        prediction=np.ascontiguousarray(pred2[rs, cs]),
        aspect=pixel_mm[0] / pixel_mm[1],
        pixel_mm=pixel_mm,
        plane=p,
        slice_index=idx,
        disagreement=n_diff,
        window=window_for(structure),
        title=tile_title(meta),
        meta=meta,
    )

