"""RTSTRUCT contours <-> label maps on a CT grid.

Contours -> voxels (docs/dicom.md has the measured accuracy):

* **snapping**: a vertex written on a voxel centre comes back off it by the writer's
  arithmetic (rt-utils: up to 7e-6 voxels, measured) and the round-off of ContourData's
  decimal strings (5e-7 mm with 6 decimals, 5e-3 mm with 2); without a snap about half
  of such boundary centres would fall outside. After the mm -> index transform, an
  in-plane vertex coordinate is moved onto a whole index (a line of voxel centres) when
  it is within :data:`SNAP_TOL` voxels of it, or within the round-off of its decimal
  strings where that is larger (half a unit in the last written decimal place, mapped
  into voxel units), never more than :data:`SNAP_MAX` voxels;
* **inclusion**: a voxel belongs to a contour when its *centre* lies strictly inside the
  closed polygon or on its boundary. After the snap, centres on an edge between two
  snapped vertices (or on an axis-parallel edge at a whole index) are found exactly by
  integer arithmetic; the interior test is :func:`skimage.draw.polygon` on the slice's
  pixel-index coordinates, where pixel ``(r, c)`` has its centre at ``(r, c)``. Both
  conventions writers use are read exactly: polygons through the boundary voxel
  centres (rt-utils, platipy, TotalSegmentator's DICOM RT output) and polygons along
  voxel edges (centres half a voxel inside);
* **several polygons and holes**: the strict interiors of all closed polygons of one
  ROI on one slice are combined by *even-odd* (XOR): a polygon inside another of the
  same ROI cuts a hole, a polygon inside that hole is filled again; centres on any of
  the polygons are inside (so the voxels a hole contour runs through stay). A closed
  contour of one or two points marks the centres it passes through.
  ``CLOSED_PLANAR`` and ``CLOSED_PLANAR_XOR`` contours are read; ``POINT`` and
  ``OPEN_*`` contours carry no area and are counted as skipped;
* **planes**: each contour must lie on one CT slice: its points' distance along
  the slice normal from the nearest slice centre must be at most
  :data:`PLANE_TOL_FRACTION` of the slice spacing; a contour on a plane that
  matches no slice (between slices, or beyond the first or last) is an error;
* **off the image**: contour points outside the image (in plane) are counted;
  the polygon is clipped to the image;
* **caps**: an RTSTRUCT file larger than :data:`MAX_RTSTRUCT_BYTES` is refused before it
  is read, one holding more than :data:`MAX_CONTOUR_POINTS` contour points is refused
  before its numbers are converted, and a non-finite number (NaN, infinity) in
  ContourData is an error naming the file, the ROI and the contour.

Voxels -> contours (:func:`trace_mask`), two conventions:

* ``edges`` (the export default): polygons along the voxel edges, the outline of the
  union of the voxel squares; area = voxel area, and every voxel centre lies half a
  voxel inside (or outside) the polygon;
* ``centres``: polygons through the centres of the boundary voxels (8-connected), the
  convention of rt-utils and platipy, whose readers round vertices to voxel indices.

Both are read back exactly by the rules above; the boundaries of holes are traced as
separate polygons (even-odd).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oarbench.dicom._deps import dcmread, require_skimage_draw, require_skimage_measure

__all__ = [
    "CONTOUR_CONVENTIONS",
    "MAX_CONTOUR_POINTS",
    "MAX_RTSTRUCT_BYTES",
    "PLANE_TOL_FRACTION",
    "SNAP_MAX",
    "SNAP_TOL",
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
#: Snap tolerance (voxels): a vertex coordinate this close to a whole index is moved onto it.
SNAP_TOL = 1e-3
#: The largest snap (voxels), whatever the decimal strings' round-off.
SNAP_MAX = 0.05
#: Contour points (vertices) one RTSTRUCT may hold; more is refused before the numbers are converted.
MAX_CONTOUR_POINTS = 5_000_000
#: An RTSTRUCT file larger than this is refused before it is read.
MAX_RTSTRUCT_BYTES = 512 * 1024 * 1024
#: The contour conventions :func:`trace_mask` writes.
CONTOUR_CONVENTIONS = ("edges", "centres")
_AREA_TYPES = {"CLOSED_PLANAR", "CLOSED_PLANAR_XOR"}
_CONTOUR_DATA = 0x30060050


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
    #: per contour, the round-off (mm) of each coordinate's decimal string, (n, 3); empty: numbers
    round_off: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class RoiMask:
    """A rasterised ROI: flat indices (C order on the grid) of its voxels, and what was counted."""

    indices: np.ndarray
    contours: int
    skipped_contours: int
    points: int
    points_off_image: int


def _contour_numbers(item, where: str) -> tuple[np.ndarray, int, np.ndarray]:
    """The numbers of one contour's ContourData, converted without pydicom's per-value objects,
    their count and their round-off (:func:`_round_off`)."""
    elem = item.get_item(_CONTOUR_DATA) if _CONTOUR_DATA in item else None
    value = None if elem is None else elem.value
    if value is None or (isinstance(value, (bytes, str)) and not value.strip()):
        return np.zeros(0, float), 0, np.zeros(0, float)
    if isinstance(value, (bytes, bytearray)):
        parts = bytes(value).split(b"\\")
    elif isinstance(value, str):
        parts = value.split("\\")
    else:
        try:
            parts = list(value)
        except TypeError:
            parts = [value]
    try:
        if parts and isinstance(parts[0], (bytes, str)):
            text = np.array(parts)
            values = text.astype(np.float64)
            round_off = _round_off(text)
        else:
            values = np.asarray([float(v) for v in parts], np.float64)
            round_off = _round_off(np.array([str(v) for v in parts]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: ContourData is not a list of numbers ({str(exc)[:80]})") from None
    return values, values.size, round_off


def _round_off(text: np.ndarray) -> np.ndarray:
    """Half a unit in the last decimal place of each decimal string (mm): ``-249.511719`` -> 5e-7.
    Strings without a decimal point, or in exponent notation, count as exact (0)."""
    if text.dtype.kind == "U":
        text = np.char.encode(text, "ascii", "replace")
    width = text.dtype.itemsize
    if text.size == 0 or width == 0:
        return np.zeros(text.shape, float)
    b = np.frombuffer(text.tobytes(), np.uint8).reshape(text.size, width)  # one row of bytes per string
    dot = b == ord(".")
    after = np.arange(width)[None, :] > dot.argmax(axis=1)[:, None]
    decimals = (after & (b >= ord("0")) & (b <= ord("9"))).sum(axis=1)
    exact = ~dot.any(axis=1) | ((b == ord("e")) | (b == ord("E"))).any(axis=1)
    return np.where(exact, 0.0, 0.5 * 10.0 ** -np.minimum(decimals, 30).astype(float))


def _raw_count(item) -> int:
    """How many numbers a contour's ContourData holds, counted on the raw bytes (no conversion)."""
    elem = item.get_item(_CONTOUR_DATA) if _CONTOUR_DATA in item else None
    value = None if elem is None else elem.value
    if value is None:
        return 0
    if isinstance(value, (bytes, bytearray, str)):
        sep = b"\\" if isinstance(value, (bytes, bytearray)) else "\\"
        return value.count(sep) + 1 if value.strip() else 0
    try:
        return len(value)
    except TypeError:
        return 1


def read_rtstruct(path: str | Path) -> tuple[list[Roi], object]:
    """Read the ROIs and contours of an RTSTRUCT file; returns ``(rois, dataset)``.

    Raises ValueError naming the file (and the ROI and contour where there is one)
    for an unreadable file, a file over :data:`MAX_RTSTRUCT_BYTES`, more than
    :data:`MAX_CONTOUR_POINTS` points, or ContourData that is not finite numbers in threes.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ValueError(f"{path}: cannot read RTSTRUCT: {exc}") from exc
    if size > MAX_RTSTRUCT_BYTES:
        raise ValueError(f"{path}: RTSTRUCT of {size:,} bytes is larger than the "
                         f"{MAX_RTSTRUCT_BYTES:,} bytes oarbench reads")
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
    offs: dict[int, list[np.ndarray]] = {n: [] for n in names}
    items = list(ds.get("ROIContourSequence", []) or [])
    total = 0
    for item in items:
        try:
            number = int(item.get("ReferencedROINumber", -1))
        except (TypeError, ValueError):
            number = -1
        if number not in names:
            raise ValueError(f"{path}: ROIContourSequence refers to ROI number {number}, which "
                             "StructureSetROISequence does not define")
        for contour in item.get("ContourSequence", []) or []:
            total += _raw_count(contour)
            if total > 3 * MAX_CONTOUR_POINTS:
                raise ValueError(f"{path}: more than {MAX_CONTOUR_POINTS:,} contour points (reached in ROI "
                                 f"{names[number][0]!r}); oarbench reads at most that many per RTSTRUCT")
    for item in items:
        number = int(item.get("ReferencedROINumber", -1))
        for k, contour in enumerate(item.get("ContourSequence", []) or []):
            where = f"{path}: ROI {names[number][0]!r} contour {k + 1}"
            kind = str(contour.get("ContourGeometricType", "") or "").upper()
            values, n, round_off = _contour_numbers(contour, where)
            if n % 3:
                raise ValueError(f"{where}: ContourData holds {n} numbers, not a multiple of 3")
            if not np.all(np.isfinite(values)):
                raise ValueError(f"{where}: ContourData holds a number that is not finite (NaN or infinity)")
            rois[number].append((kind, values.reshape(-1, 3)))
            offs[number].append(round_off.reshape(-1, 3))
    out = [Roi(n, names[n][0], names[n][1], tuple(rois[n]), tuple(offs[n])) for n in sorted(names)]
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
        if kind in _AREA_TYPES and len(pts) >= 1:
            yield k, pts


def _snap_tolerance(roi: Roi, k: int, grid: Grid) -> np.ndarray:
    """Per point, the round-off of contour ``k`` in voxel units along x and y (n, 2)."""
    n = len(roi.contours[k][1])
    if k >= len(roi.round_off) or roi.round_off[k].shape != (n, 3):
        return np.full((n, 2), SNAP_TOL)
    # an error of e_j mm along patient axis j moves index i by at most sum_j |M_ji| e_j / spacing_i
    tol = (roi.round_off[k] @ np.abs(grid.matrix)) / grid.spacing_xyz
    return np.clip(tol[:, :2] + 1e-9, SNAP_TOL, SNAP_MAX)


def check_contours(roi: Roi, grid: Grid, source: str | Path = "") -> None:
    """Raise the errors :func:`rasterise` would raise, without drawing anything."""
    for k, pts in _area_contours(roi):
        _slice_of(roi, k, pts, grid, source)


def _snap(v: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """Coordinates within ``tol`` of a whole index, moved onto it."""
    r = np.rint(v)
    return np.where(np.abs(v - r) <= tol, r, v)


def _on_boundary(x: np.ndarray, y: np.ndarray, nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the voxel centres inside the image that lie exactly on the closed
    polygon (x, y): on edges between two whole-index vertices (lattice walk, integer steps) and
    on axis-parallel edges at a whole index. Coordinates must be snapped."""
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    big = 2.0 ** 40  # a whole index this far off the image is no lattice point worth walking
    xi, yi = (x == np.rint(x)) & (np.abs(x) < big), (y == np.rint(y)) & (np.abs(y) < big)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    # edges between two lattice points
    sel = xi & yi & np.roll(xi, -1) & np.roll(yi, -1)
    if sel.any():
        ax, ay = x[sel].astype(np.int64), y[sel].astype(np.int64)
        dx, dy = x1[sel].astype(np.int64) - ax, y1[sel].astype(np.int64) - ay
        g = np.gcd(np.abs(dx), np.abs(dy))
        g1 = np.maximum(g, 1)
        sx, sy = dx // g1, dy // g1
        lo = np.zeros_like(g)
        hi = g.copy()
        for a0, s, n in ((ax, sx, nx), (ay, sy, ny)):  # keep 0 <= a0 + i * s <= n - 1
            pos, neg, zero = s > 0, s < 0, s == 0
            lo = np.where(pos, np.maximum(lo, -(a0 // np.where(pos, s, 1))), lo)
            hi = np.where(pos, np.minimum(hi, (n - 1 - a0) // np.where(pos, s, 1)), hi)
            lo = np.where(neg, np.maximum(lo, -((n - 1 - a0) // np.where(neg, -s, 1))), lo)
            hi = np.where(neg, np.minimum(hi, a0 // np.where(neg, -s, 1)), hi)
            hi = np.where(zero & ((a0 < 0) | (a0 > n - 1)), -1, hi)
        counts = np.maximum(hi - lo + 1, 0)
        if counts.sum():
            edge = np.repeat(np.arange(len(g)), counts)
            step = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts) + lo[edge]
            cols.append(ax[edge] + step * sx[edge])
            rows.append(ay[edge] + step * sy[edge])
    # axis-parallel edges at a whole index whose ends are not both lattice points
    for const, c1, a, b, n_const, n_run, vertical in ((x, x1, y, y1, nx, ny, True), (y, y1, x, x1, ny, nx, False)):
        par = ((const == c1) & (const == np.rint(const)) & ~sel & (const >= 0) & (const <= n_const - 1)
               & np.isfinite(a) & np.isfinite(b))
        for c, u, v in zip(const[par], a[par], b[par]):
            start, stop = max(int(np.ceil(min(u, v))), 0), min(int(np.floor(max(u, v))), n_run - 1)
            if stop >= start:
                run = np.arange(start, stop + 1)
                fixed = np.full(run.size, int(c))
                rows.append(run if vertical else fixed)
                cols.append(fixed if vertical else run)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def rasterise(roi: Roi, grid: Grid, source: str | Path = "") -> RoiMask:
    """Voxels of one ROI on ``grid`` by the rules of the module docstring.

    Raises ValueError naming ``source`` and the ROI when a contour is not planar on a
    CT slice or lies on a plane that matches no slice.
    """
    draw = require_skimage_draw()
    nz, ny, nx = grid.shape
    planes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    points = off = used = 0
    for k, pts in _area_contours(roi):
        z0, idx = _slice_of(roi, k, pts, grid, source)
        tol = _snap_tolerance(roi, k, grid)
        x, y = _snap(idx[:, 0], tol[:, 0]), _snap(idx[:, 1], tol[:, 1])
        points += len(pts)
        off += int(np.count_nonzero((x < -0.5) | (x > nx - 0.5) | (y < -0.5) | (y > ny - 0.5)))
        if z0 not in planes:
            planes[z0] = (np.zeros((ny, nx), bool), np.zeros((ny, nx), bool))
        parity, edge = planes[z0]
        br, bc = _on_boundary(x, y, nx, ny)
        if len(pts) >= 3:
            inside = np.zeros((ny, nx), bool)
            rr, cc = draw.polygon(y, x, shape=(ny, nx))
            inside[rr, cc] = True
            inside[br, bc] = False  # strictly inside only; the boundary is added below
            parity ^= inside
        edge[br, bc] = True
        used += 1
    chunks = [z * ny * nx + np.flatnonzero(parity | edge) for z, (parity, edge) in sorted(planes.items())]
    indices = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    return RoiMask(indices.astype(np.int64), used, len(roi.contours) - used, points, off)


def _drop_collinear(poly: np.ndarray) -> np.ndarray:
    """The same closed polygon without vertices that lie on the straight line through their
    neighbours and between them (a vertex where the polygon turns back, the tip of a
    one-voxel spur, stays); the traced vertices sit on half-voxel multiples, so the test is exact."""
    prev, nxt = np.roll(poly, 1, axis=0), np.roll(poly, -1, axis=0)
    a, b = poly - prev, nxt - poly
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    dot = a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1]
    keep = (np.abs(cross) > 1e-9) | (dot <= 0)
    return poly[keep] if keep.sum() >= 3 else poly


def _dedupe(poly: np.ndarray) -> np.ndarray:
    """The closed polygon without consecutive repeated vertices (the closing one included)."""
    if len(poly) < 2:
        return poly
    keep = np.any(poly != np.roll(poly, 1, axis=0), axis=1)
    if not keep.any():
        return poly[:1]
    return poly[keep]


def trace_mask(mask: np.ndarray, grid: Grid, convention: str = "edges") -> list[tuple[int, np.ndarray]]:
    """Closed polygons of a boolean mask (z, y, x), per slice: ``[(slice, points (n, 3) mm), ...]``.

    ``convention`` ``edges``: along the voxel edges (area = voxel area); ``centres``: through
    the centres of the boundary voxels (8-connected; a lone voxel is one point, a one-voxel-wide
    line a polygon that runs there and back). Outer boundaries and hole boundaries are separate
    polygons (even-odd); the closing point is not repeated. Both come from the marching-squares
    contours at level 0.5 of the zero-padded slice: each of their vertices lies midway between
    an inside and an outside voxel centre, on the voxel edge between them; ``edges`` takes the
    corner that two consecutive such edges share, ``centres`` the inside voxel of each vertex.
    """
    if convention not in CONTOUR_CONVENTIONS:
        raise ValueError(f"unknown contour convention {convention!r}; choose {' or '.join(CONTOUR_CONVENTIONS)}")
    measure = require_skimage_measure()
    mask = np.asarray(mask, bool)
    if mask.shape != grid.shape:
        raise ValueError(f"mask of shape {mask.shape} is not on the grid {grid.shape}")
    out: list[tuple[int, np.ndarray]] = []
    for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        padded = np.pad(mask[z], 1)
        level = "high" if convention == "centres" else "low"
        for c in measure.find_contours(padded.astype(np.float32), 0.5, fully_connected=level):
            if len(c) > 1 and np.allclose(c[0], c[-1]):
                c = c[:-1]
            if len(c) < 2:
                continue
            c = np.rint(c * 2) / 2  # vertices are on half-voxel multiples
            if convention == "edges":
                # the marching-squares cell of the segment (c[i], c[i+1]) has its centre at the
                # voxel corner shared by the two voxel edges that the segment's ends lie on
                nxt = np.roll(c, -1, axis=0)
                poly = np.floor(np.minimum(c, nxt)) + 0.5
            else:
                # the inside voxel of each vertex: the end of its half-voxel step whose value is 1
                lo, hi = np.floor(c).astype(int), np.ceil(c).astype(int)
                lo_in = padded[lo[:, 0], lo[:, 1]]
                poly = np.where(lo_in[:, None], lo, hi).astype(float)
            poly = _dedupe(poly)
            if convention == "edges" and len(poly) < 3:
                continue
            if len(poly) >= 3:
                poly = _drop_collinear(poly)
            rows, cols = poly[:, 0] - 1.0, poly[:, 1] - 1.0
            idx = np.column_stack([cols, rows, np.full(len(poly), float(z))])
            out.append((int(z), index_to_patient(idx, grid)))
    return out
