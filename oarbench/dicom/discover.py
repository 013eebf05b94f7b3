"""Walk a folder tree of DICOM files in any layout; group images by series and pair
each RTSTRUCT with the CT series it was drawn on.

Pairing (docs/dicom.md): an RTSTRUCT names the series it references in
``ReferencedFrameOfReferenceSequence > RTReferencedStudySequence >
RTReferencedSeriesSequence``; that series is used when it is in the tree. Otherwise
the frame of reference is used when exactly one CT series (or, without CT, one
image series) of the tree shares it.
An RTSTRUCT that neither rule pairs is reported, never attached by guess.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from oarbench.dicom._deps import OversizeError, dcmread, require_pydicom

__all__ = ["DicomFile", "Series", "StructureSet", "Inventory", "scan"]

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class DicomFile:
    """Header facts of one file (no pixel data). ``patient_id`` stays in memory: it is never written."""

    path: Path
    modality: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    patient_id: str


@dataclass
class Series:
    """The image files of one SeriesInstanceUID."""

    uid: str
    files: list[DicomFile] = field(default_factory=list)

    @property
    def modality(self) -> str:
        return self.files[0].modality

    @property
    def frame_of_reference_uid(self) -> str:
        return self.files[0].frame_of_reference_uid

    @property
    def study_instance_uid(self) -> str:
        return self.files[0].study_instance_uid

    @property
    def first_path(self) -> Path:
        return min(f.path for f in self.files)


@dataclass(frozen=True)
class StructureSet:
    """One RTSTRUCT file and the series / frame of reference it references."""

    file: DicomFile
    referenced_series: tuple[str, ...]
    referenced_frames: tuple[str, ...]


@dataclass
class Inventory:
    """What a folder tree holds: image series, RTSTRUCTs, and how they pair."""

    root: Path
    series: dict[str, Series]
    structures: list[StructureSet]
    pairs: dict[str, list[StructureSet]]  # series uid -> its RTSTRUCTs
    unpaired: list[tuple[StructureSet, str]]  # RTSTRUCTs that match no series, with the reason
    not_dicom: int
    other: list[DicomFile]  # DICOM files that are neither images of a series nor RTSTRUCT (SEG, RTPLAN, ...)
    notes: list[str] = field(default_factory=list)  # how RTSTRUCTs were paired, where it was not by series


def _walk(root: Path) -> Iterable[Path]:
    """Every visible file under ``root``; anything that is not a regular file (a FIFO, a device, a
    socket, a link to one) is refused by name before it is opened: reading a FIFO blocks forever."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            try:
                mode = os.stat(path).st_mode
            except OSError as exc:
                raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
            if not stat.S_ISREG(mode):
                kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or
                        stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
                raise ValueError(f"{path}: {kind}, not a file; refused without opening it (remove it from the tree)")
            yield path


def _read_header(path: Path):
    pydicom = require_pydicom()
    try:
        return dcmread(path, stop_before_pixels=True)
    except OversizeError:
        raise
    except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError):
        return None


def _str(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _referenced(ds) -> tuple[tuple[str, ...], tuple[str, ...]]:
    series: list[str] = []
    frames: list[str] = []
    for ref_frame in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
        uid = _str(ref_frame, "FrameOfReferenceUID")
        if uid:
            frames.append(uid)
        for study in ref_frame.get("RTReferencedStudySequence", []) or []:
            for ser in study.get("RTReferencedSeriesSequence", []) or []:
                uid = _str(ser, "SeriesInstanceUID")
                if uid:
                    series.append(uid)
    for roi in ds.get("StructureSetROISequence", []) or []:
        uid = _str(roi, "ReferencedFrameOfReferenceUID")
        if uid and uid not in frames:
            frames.append(uid)
    return tuple(dict.fromkeys(series)), tuple(dict.fromkeys(frames))


def scan(root: str | Path, progress: Callable[[int], None] | None = None,
         on_total: Callable[[int], None] | None = None) -> Inventory:
    """Read the header of every file under ``root`` (recursively; hidden files and
    folders are skipped; files that are not DICOM are counted, not read further).
    ``on_total`` gets the number of files once the tree is listed, ``progress`` the
    number read so far.

    Raises ValueError when ``root`` is no folder or holds no DICOM file.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: DICOM folder not found")
    series: dict[str, Series] = {}
    structures: list[StructureSet] = []
    other: list[DicomFile] = []
    seen_sop: dict[str, Path] = {}
    not_dicom = 0
    paths = list(_walk(root))  # every file is checked to be a regular file before any is opened
    if on_total is not None:
        on_total(len(paths))
    for n, path in enumerate(paths, 1):
        if progress is not None:
            progress(n)
        ds = _read_header(path)
        if ds is None or "SOPInstanceUID" not in ds:
            not_dicom += 1
            continue
        f = DicomFile(path=path, modality=_str(ds, "Modality").upper(), sop_class_uid=_str(ds, "SOPClassUID"),
                      sop_instance_uid=_str(ds, "SOPInstanceUID"),
                      series_instance_uid=_str(ds, "SeriesInstanceUID"),
                      study_instance_uid=_str(ds, "StudyInstanceUID"),
                      frame_of_reference_uid=_str(ds, "FrameOfReferenceUID"), patient_id=_str(ds, "PatientID"))
        if f.sop_instance_uid in seen_sop:
            # the same object twice in an export (copies): keep the first
            continue
        seen_sop[f.sop_instance_uid] = path
        if f.modality == "RTSTRUCT" or f.sop_class_uid == RTSTRUCT_SOP_CLASS:
            ref_series, ref_frames = _referenced(ds)
            structures.append(StructureSet(f, ref_series, ref_frames))
        elif f.sop_class_uid != SEG_SOP_CLASS and f.modality != "SEG" and "Rows" in ds:
            if not f.series_instance_uid:
                raise ValueError(f"{path}: image without SeriesInstanceUID")
            series.setdefault(f.series_instance_uid, Series(f.series_instance_uid)).files.append(f)
        else:
            other.append(f)
    if not series and not structures:
        raise ValueError(f"{root}: no DICOM images or RTSTRUCTs found ({not_dicom} other files)")

    pairs: dict[str, list[StructureSet]] = {}
    unpaired: list[tuple[StructureSet, str]] = []
    notes: list[str] = []
    for ss in sorted(structures, key=lambda s: str(s.file.path)):
        target = next((uid for uid in ss.referenced_series if uid in series), None)
        if target is None:
            frames = set(ss.referenced_frames) | ({ss.file.frame_of_reference_uid} - {""})
            candidates = sorted(uid for uid, s in series.items() if s.frame_of_reference_uid in frames)
            ct_only = [uid for uid in candidates if series[uid].modality == "CT"]
            if ct_only:  # a dose grid or an MR in the same frame does not compete with the CT
                candidates = ct_only
            if len(candidates) == 1:
                target = candidates[0]
                if ss.referenced_series:
                    notes.append(f"{ss.file.path}: references series {', '.join(ss.referenced_series)}, which is "
                                 f"not in {root}; paired by its frame of reference with series {target} "
                                 f"({series[target].first_path.parent})")
            elif len(candidates) > 1:
                unpaired.append((ss, f"its frame of reference holds {len(candidates)} image series and it names "
                                     "none of them"))
                continue
            else:
                refs = ", ".join(ss.referenced_series) or "none"
                unpaired.append((ss, f"references series {refs}, which is not in {root}"))
                continue
        pairs.setdefault(target, []).append(ss)
    return Inventory(root, series, structures, pairs, unpaired, not_dicom, other, notes)
