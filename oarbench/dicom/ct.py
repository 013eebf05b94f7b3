"""A CT series -> :class:`oarbench.io.Volume` (HU), with the geometry taken exactly from the headers.

* slices are sorted along the slice normal ``n = row x column`` of
  ImageOrientationPatient (never by InstanceNumber or file name);
* spacing: PixelSpacing (rows, columns) in plane, the distance between the first and
  last slice position along ``n`` divided by the number of gaps between slices;
* origin: ImagePositionPatient of the first slice along ``n``; direction: the columns
  (row direction, column direction, ``n``);
* HU = stored value x RescaleSlope + RescaleIntercept (int16 when that is exact, else
  float32).

Refused with an error naming the series and a file: a modality other than CT,
enhanced (multi-frame) CT, which is not supported, mixed image sizes, orientations or pixel spacings, gantry tilt
(a non-zero GantryDetectorTilt, or slice positions that do not move along ``n``), two
slices at one position, and missing slices or unequal slice spacing (the gap is named).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oarbench.dicom._deps import dcmread
from oarbench.io import Volume

__all__ = ["SliceGeometry", "SeriesGeometry", "series_geometry", "read_ct"]

# Tolerances (docs/dicom.md)
ORIENTATION_ATOL = 1e-4      # direction cosines
SPACING_RTOL = 1e-3          # slice gaps and pixel spacings, relative ...
SPACING_ATOL_MM = 0.01       # ... plus absolute, mm
IN_PLANE_ATOL_MM = 0.05      # slice positions off the normal through the first slice (tilt)


@dataclass(frozen=True)
class SliceGeometry:
    path: Path
    rows: int
    columns: int
    orientation: tuple[float, ...]
    position: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    modality: str
    frames: int
    tilt: float
    sop_instance_uid: str


@dataclass(frozen=True)
class SeriesGeometry:
    """The checked grid of a series; ``slices`` sorted along the normal."""

    series_uid: str
    slices: tuple[SliceGeometry, ...]
    spacing_zyx: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # row-major 3x3, columns = row dir, column dir, normal

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return (len(self.slices), self.slices[0].rows, self.slices[0].columns)

    @property
    def sop_uids(self) -> list[str]:
        return [s.sop_instance_uid for s in self.slices]

    def volume(self, array: np.ndarray) -> Volume:
        return Volume(array, self.spacing_zyx, self.origin, self.direction)


def _floats(value, n: int, what: str, path: Path) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != n:
        raise ValueError(f"{path}: {what} must hold {n} numbers, got {value!r}")
    return out


ENHANCED_CT = {"1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT",
               "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT"}


def _frames(ds) -> int:
    try:
        return int(str(ds.get("NumberOfFrames", 1) or 1).strip() or 1)
    except ValueError:
        return 1


def _slice(ds, path: Path, series_uid: str = "") -> SliceGeometry:
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in ENHANCED_CT or _frames(ds) > 1:
        kind = ENHANCED_CT.get(sop_class, "multi-frame image")
        raise ValueError(f"{path}: {kind} ({_frames(ds)} frames) in series {series_uid or '?'}: "
                         "enhanced (multi-frame) CT is not supported; "
                         "only single-frame CT slices are imported (convert the series to single-frame CT images "
                         "first)")
    for key in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns"):
        if key not in ds:
            raise ValueError(f"{path}: no {key} (needed to place the image)")
    return SliceGeometry(
        path=path, rows=int(ds.Rows), columns=int(ds.Columns),
        orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", path),
        position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", path),  # type: ignore[arg-type]
        pixel_spacing=_floats(ds.PixelSpacing, 2, "PixelSpacing", path),  # type: ignore[arg-type]
        modality=str(ds.get("Modality", "")).upper(), frames=_frames(ds),
        tilt=float(ds.get("GantryDetectorTilt", 0.0) or 0.0), sop_instance_uid=str(ds.SOPInstanceUID))


def series_geometry(series_uid: str, slices: list[SliceGeometry]) -> SeriesGeometry:
    """Check and sort one series' slices (see the module docstring); ValueError on any problem."""
    if not slices:
        raise ValueError(f"series {series_uid}: no images")
    first = min(slices, key=lambda s: str(s.path))
    where = f"series {series_uid} ({first.path.parent})"
    bad = [s for s in slices if s.modality != "CT"]
    if bad:
        raise ValueError(f"{where}: modality {bad[0].modality or 'missing'} in {bad[0].path}; only CT is imported")
    multi = [s for s in slices if s.frames > 1]
    if multi:
        raise ValueError(f"{multi[0].path}: multi-frame image ({multi[0].frames} frames) in {where}; "
                         "only single-frame CT slices are supported")
    sizes = sorted({(s.columns, s.rows) for s in slices})
    if len(sizes) > 1:
        odd = next(s for s in slices if (s.columns, s.rows) != (first.columns, first.rows))
        raise ValueError(f"{where}: mixed image sizes {sizes} (columns x rows), e.g. {first.path.name} is "
                         f"{first.columns}x{first.rows} and {odd.path.name} is {odd.columns}x{odd.rows}")
    for s in slices:
        if not np.allclose(s.orientation, first.orientation, atol=ORIENTATION_ATOL, rtol=0):
            raise ValueError(f"{where}: mixed ImageOrientationPatient: {first.path.name} {list(first.orientation)} "
                             f"vs {s.path.name} {list(s.orientation)}")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=SPACING_RTOL, atol=0):
            raise ValueError(f"{where}: mixed PixelSpacing: {first.path.name} {list(first.pixel_spacing)} "
                             f"vs {s.path.name} {list(s.pixel_spacing)}")
    tilted = [s for s in slices if abs(s.tilt) > 1e-6]
    if tilted:
        raise ValueError(f"{tilted[0].path}: gantry tilt {tilted[0].tilt} degrees in {where}; "
                         "tilted acquisitions are not supported (resample the series first)")
    row = np.asarray(first.orientation[:3])
    col = np.asarray(first.orientation[3:])
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise ValueError(f"{first.path}: ImageOrientationPatient {list(first.orientation)} is not two orthonormal "
                         "direction cosines")
    row /= np.linalg.norm(row)
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    if len(slices) < 2:
        raise ValueError(f"{where}: a single slice; a CT volume needs at least two")
    ordered = sorted(slices, key=lambda s: float(np.dot(s.position, normal)))
    pos = np.asarray([s.position for s in ordered])
    along = pos @ normal
    off = pos - pos[0] - np.outer(along - along[0], normal)
    off_mm = np.linalg.norm(off, axis=1)
    worst = int(np.argmax(off_mm))
    if off_mm[worst] > IN_PLANE_ATOL_MM:
        raise ValueError(f"{where}: slice positions do not line up along the slice normal ({off_mm[worst]:.2f} mm "
                         f"off at {ordered[worst].path.name}): gantry tilt or a sheared series is not supported")
    gaps = np.diff(along)
    dup = np.flatnonzero(gaps <= SPACING_ATOL_MM)
    if dup.size:
        i = int(dup[0])
        raise ValueError(f"{where}: two slices at position {along[i]:.2f} mm: {ordered[i].path.name} and "
                         f"{ordered[i + 1].path.name}")
    step = float((along[-1] - along[0]) / (len(ordered) - 1))
    nominal = float(np.median(gaps))
    bad_gap = np.flatnonzero(np.abs(gaps - nominal) > SPACING_ATOL_MM + SPACING_RTOL * nominal)
    if bad_gap.size:
        i = int(bad_gap[0])
        missing = gaps[i] / nominal - 1
        hint = f" ({round(missing)} slice(s) missing?)" if gaps[i] > nominal and abs(missing - round(missing)) < 0.1 else ""
        raise ValueError(f"{where}: unequal slice spacing: gap of {gaps[i]:.3f} mm between {ordered[i].path.name} "
                         f"(at {along[i]:.2f} mm) and {ordered[i + 1].path.name} (at {along[i + 1]:.2f} mm), "
                         f"the other gaps are {nominal:.3f} mm{hint}")
    direction = tuple(float(v) for v in np.column_stack([row, col, normal]).ravel())
    return SeriesGeometry(series_uid, tuple(ordered),
                          (step, float(first.pixel_spacing[0]), float(first.pixel_spacing[1])),
                          tuple(float(v) for v in ordered[0].position), direction)  # type: ignore[arg-type]


def read_geometry(series_uid: str, paths: list[Path]) -> SeriesGeometry:
    """Read the headers of ``paths`` (one series) and check them."""
    slices = []
    for p in paths:
        try:
            ds = dcmread(p, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file
            raise ValueError(f"{p}: cannot read DICOM header: {exc}") from exc
        slices.append(_slice(ds, Path(p), series_uid))
    return series_geometry(series_uid, slices)


def read_ct(geometry: SeriesGeometry) -> Volume:
    """Read the pixels of a checked series into a HU volume (axes z, y, x)."""
    planes = []
    exact = True
    for s in geometry.slices:
        try:
            ds = dcmread(s.path)
            raw = ds.pixel_array
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{s.path}: cannot read pixel data: {exc}") from exc
        if raw.shape != (s.rows, s.columns):
            raise ValueError(f"{s.path}: pixel data of shape {raw.shape}, expected {(s.rows, s.columns)}")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        hu = raw.astype(np.float64) * slope + intercept
        exact = exact and slope == round(slope) and intercept == round(intercept)
        planes.append(hu)
    array = np.stack(planes)
    if exact and array.min() >= np.iinfo(np.int16).min and array.max() <= np.iinfo(np.int16).max:
        array = array.astype(np.int16)
    else:
        array = array.astype(np.float32)
    return geometry.volume(array)
