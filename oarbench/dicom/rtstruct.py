"""RTSTRUCT contours <-> label maps on a CT grid.

Contours -> voxels (docs/dicom.md has the measured accuracy):

* **inclusion**: a voxel belongs to a contour when its *centre* lies inside the
  closed polygon or on its boundary (:func:`skimage.draw.polygon` on the slice's
  pixel-index coordinates, where pixel ``(r, c)`` has its centre at ``(r, c)``);
* **several polygons and holes**: all closed polygons of one ROI on one slice are
  combined by *even-odd* (XOR): a polygon inside another of the same ROI cuts a
  hole, a polygon inside that hole is filled again. ``CLOSED_PLANAR`` and
  ``CLOSED_PLANAR_XOR`` contours are read; ``POINT`` and ``OPEN_*`` contours
  carry no area and are counted as skipped;
* **planes**: each contour must lie on one CT slice: its points' distance along
  the slice normal from the nearest slice centre must be at most
  :data:`PLANE_TOL_FRACTION` of the slice spacing; a contour on a plane that
  matches no slice (between slices, or beyond the first or last) is an error;
* **off the image**: contour points outside the image (in plane) are counted;
  the polygon is clipped to the image.

Voxels -> contours: each axial slice of a mask is traced with
:func:`skimage.measure.find_contours` at level 0.5 on the zero-padded slice. The
traced polygons pass through the midpoints between inside and outside voxel
centres, so rasterising them by the rule above gives back exactly the same voxels;
the boundaries of holes are traced as separate polygons (even-odd).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oarbench.dicom._deps import dcmread, require_skimage_draw, require_skimage_measure

__all__ = [
    "PLANE_TOL_FRACTION",
    "Grid",
    "Roi",
    "RoiMask",
    "read_rtstruct",
    "rasterise",
    "check_contours",
    "trace_mask",
    "index_to_patient",
    "patient_to_index",
]

#: A contour's points may lie this fraction of the slice spacing off a slice centre.
PLANE_TOL_FRACTION = 0.1
_AREA_TYPES = {"CLOSED_PLANAR", "CLOSED_PLANAR_XOR"}


@dataclass(frozen=True)
class Grid:
    """A CT grid: ``shape`` (z, y, x), ``spacing`` (z, y, x) mm, ``origin`` (x, y, z) mm,
    ``direction`` row-major 3x3 with the x, y, z axes as columns (SimpleITK)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, volume) -> "Grid":
        return cls(tuple(volume.array.shape), tuple(volume.spacing), tuple(volume.origin),  # type: ignore[arg-type]
                   tuple(volume.direction))

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, float).reshape(3, 3)

    @property
    def spacing_xyz(self) -> np.ndarray:
        return np.asarray(self.spacing[::-1], float)


def patient_to_index(points: np.ndarray, grid: Grid) -> np.ndarray:
    """Patient coordinates (n, 3) mm -> continuous voxel indices (n, 3) as (x, y, z) = (column, row, slice)."""
    return ((np.asarray(points, float) - np.asarray(grid.origin)) @ grid.matrix) / grid.spacing_xyz


def index_to_patient(index: np.ndarray, grid: Grid) -> np.ndarray:
    """Continuous voxel indices (n, 3) as (x, y, z) -> patient coordinates (n, 3) mm."""
    return np.asarray(grid.origin) + (np.asarray(index, float) * grid.spacing_xyz) @ grid.matrix.T


@dataclass(frozen=True)
class Roi:
    """One ROI of an RTSTRUCT: its number, name, frame of reference and contours
    (each an (n, 3) array in mm, with its ContourGeometricType)."""

    number: int
    name: str
    frame_of_reference_uid: str
    contours: tuple[tuple[str, np.ndarray], ...]


@dataclass(frozen=True)
class RoiMask:
    """A rasterised ROI: flat indices (C order on the grid) of its voxels, and what was counted."""

    indices: np.ndarray
    contours: int
    skipped_contours: int
    points: int
    points_off_image: int


def read_rtstruct(path: str | Path) -> tuple[list[Roi], object]:
    """Read the ROIs and contours of an RTSTRUCT file; returns ``(rois, dataset)``."""
    path = Path(path)
    try:
        ds = dcmread(path)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read RTSTRUCT: {exc}") from exc
    names: dict[int, tuple[str, str]] = {}
    for item in ds.get("StructureSetROISequence", []) or []:
        try:
            number = int(item.ROINumber)
        except (AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: StructureSetROISequence item without a valid ROINumber") from exc
        names[number] = (str(item.get("ROIName", "") or "").strip() or f"ROI {number}",
                         str(item.get("ReferencedFrameOfReferenceUID", "") or ""))
    rois: dict[int, list[tuple[str, np.ndarray]]] = {n: [] for n in names}
    for item in ds.get("ROIContourSequence", []) or []:
        number = int(item.get("ReferencedROINumber", -1))
        if number not in names:
            raise ValueError(f"{path}: ROIContourSequence refers to ROI number {number}, which "
                             "StructureSetROISequence does not define")
        for k, contour in enumerate(item.get("ContourSequence", []) or []):
            data = contour.get("ContourData", None)
            kind = str(contour.get("ContourGeometricType", "") or "").upper()
            values = np.asarray([float(v) for v in (data or [])], float)
            if values.size % 3:
                raise ValueError(f"{path}: ROI {names[number][0]!r} contour {k + 1}: ContourData holds "
                                 f"{values.size} numbers, not a multiple of 3")
            rois[number].append((kind, values.reshape(-1, 3)))
    out = [Roi(n, names[n][0], names[n][1], tuple(rois[n])) for n in sorted(names)]
    return out, ds


def _slice_of(roi: Roi, k: int, pts: np.ndarray, grid: Grid, source: str | Path) -> tuple[int, np.ndarray]:
    """The slice a contour lies on and its continuous indices; ValueError when it matches none."""
    idx = patient_to_index(pts, grid)
    z = idx[:, 2]
    z0 = int(np.rint(np.median(z)))
    dz = grid.spacing[0]
    tol = PLANE_TOL_FRACTION * dz
    where = f"{source}: ROI {roi.name!r} contour {k + 1}"
    if float(np.ptp(z)) * dz > tol:
        raise ValueError(f"{where} is not in a slice plane: its points spread {float(np.ptp(z)) * dz:.2f} mm "
                         "along the slice normal")
    if float(np.max(np.abs(z - z0))) * dz > tol or not 0 <= z0 < grid.shape[0]:
        raise ValueError(f"{where} lies on a plane that matches no CT slice ({float(np.mean(z)) * dz:.2f} mm from "
                         f"the first slice along the normal; slices every {dz:.2f} mm, {grid.shape[0]} slices)")
    return z0, idx


def _area_contours(roi: Roi):
    for k, (kind, pts) in enumerate(roi.contours):
        if kind in _AREA_TYPES and len(pts) >= 3:
            yield k, pts


def check_contours(roi: Roi, grid: Grid, source: str | Path = "") -> None:
    """Raise the errors :func:`rasterise` would raise, without drawing anything."""
    for k, pts in _area_contours(roi):
        _slice_of(roi, k, pts, grid, source)


def rasterise(roi: Roi, grid: Grid, source: str | Path = "") -> RoiMask:
    """Voxels of one ROI on ``grid`` by the rules of the module docstring.

    Raises ValueError naming ``source`` and the ROI when a contour is not planar on a
    CT slice or lies on a plane that matches no slice.
    """
    draw = require_skimage_draw()
    nz, ny, nx = grid.shape
    planes: dict[int, np.ndarray] = {}
    points = off = used = 0
    for k, pts in _area_contours(roi):
        z0, idx = _slice_of(roi, k, pts, grid, source)
        x, y = idx[:, 0], idx[:, 1]
        points += len(pts)
        off += int(np.count_nonzero((x < -0.5) | (x > nx - 0.5) | (y < -0.5) | (y > ny - 0.5)))
        rr, cc = draw.polygon(y, x, shape=(ny, nx))
        plane = planes.get(z0)
        if plane is None:
            plane = planes[z0] = np.zeros((ny, nx), bool)
        plane[rr, cc] ^= True
        used += 1
    chunks = [z * ny * nx + np.flatnonzero(plane) for z, plane in sorted(planes.items())]
    indices = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    return RoiMask(indices.astype(np.int64), used, len(roi.contours) - used, points, off)


def _drop_collinear(poly: np.ndarray) -> np.ndarray:
    """The same closed polygon without vertices that lie on the straight line through their
    neighbours (the traced vertices sit on quarter-pixel multiples, so the test is exact)."""
    prev, nxt = np.roll(poly, 1, axis=0), np.roll(poly, -1, axis=0)
    a, b = poly - prev, nxt - poly
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    keep = np.abs(cross) > 1e-9
    return poly[keep] if keep.sum() >= 3 else poly


def trace_mask(mask: np.ndarray, grid: Grid) -> list[tuple[int, np.ndarray]]:
    """Closed polygons of a boolean mask (z, y, x), per slice: ``[(slice, points (n, 3) mm), ...]``.

    Outer boundaries and hole boundaries are separate polygons (even-odd); the
    closing point is not repeated.
    """
    measure = require_skimage_measure()
    mask = np.asarray(mask, bool)
    if mask.shape != grid.shape:
        raise ValueError(f"mask of shape {mask.shape} is not on the grid {grid.shape}")
    out: list[tuple[int, np.ndarray]] = []
    for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        padded = np.pad(mask[z], 1).astype(np.float32)
        for c in measure.find_contours(padded, 0.5):
            if len(c) > 1 and np.allclose(c[0], c[-1]):
                c = c[:-1]
            if len(c) < 3:
                continue
            c = _drop_collinear(c)
            rows, cols = c[:, 0] - 1.0, c[:, 1] - 1.0
            idx = np.column_stack([cols, rows, np.full(len(c), float(z))])
            out.append((int(z), index_to_patient(idx, grid)))
    return out
