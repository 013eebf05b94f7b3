"""Label maps -> DICOM for the treatment planning system: RTSTRUCT (pydicom) and DICOM-SEG
(highdicom), both referencing the CT series the label map was drawn on; and CT series
writing for the synthetic study.

An exported RTSTRUCT holds one ROI per structure present in the label map, named with
its TG-263 name and drawn in a fixed colour (:data:`COLOURS`), with closed planar
contours traced per axial slice (:func:`oarbench.dicom.rtstruct.trace_mask`; holes as
separate polygons, even-odd) along the voxel edges (:data:`DEFAULT_CONTOUR`, for planning
systems) or through the boundary voxel centres (for rt-utils and platipy); docs/dicom.md
has the measured table. The DICOM-SEG codes each structure in SNOMED CT with a Left/Right
modifier for paired organs. Every object is built before any file is written. The RTSTRUCT
references the CT's frame of reference, study and series, and every contour names the CT
slice it lies on (ContourImageSequence).
"""

from __future__ import annotations

import csv
import io as _stdio
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from oarbench import __version__
from oarbench.dicom._deps import dcmread, require_highdicom, require_pydicom
from oarbench.dicom.ct import SeriesGeometry, read_geometry
from oarbench.dicom.discover import scan
from oarbench.dicom.rtstruct import CONTOUR_CONVENTIONS, Grid, trace_mask
from oarbench.io import Volume, atomic_write_bytes, atomic_write_text, check_same_grid, find_cases, read_volume
from oarbench.labels import LabelMap
from oarbench.tables import csv_row, restore_cell

__all__ = ["COLOURS", "colour_of", "new_uid", "write_ct_series", "build_rtstruct", "build_seg",
           "ExportResult", "export_predictions", "save_dataset"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: The contour convention of exported RTSTRUCTs (docs/dicom.md, "Which contour convention").
DEFAULT_CONTOUR = "edges"
#: ROIGenerationDescription of each convention: what a reader of the file needs to know.
_CONTOUR_WORDS = {"edges": "oarbench: polygons along the voxel edges",
                  "centres": "oarbench: polygons through the boundary voxel centres"}
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, as RTReferencedStudySequence names it

#: Display colour (R, G, B) of each default structure; other names get a colour derived from the name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "Liver": (165, 80, 55), "Spleen": (157, 108, 162), "Kidney_L": (185, 102, 83), "Kidney_R": (205, 122, 103),
    "Glnd_Adrenal_L": (244, 214, 49), "Glnd_Adrenal_R": (224, 194, 29), "Pancreas": (249, 180, 111),
    "Stomach": (216, 132, 105), "Duodenum": (255, 253, 229), "Bowel": (205, 167, 142),
    "Gallbladder": (139, 150, 98), "Esophagus": (211, 171, 143), "Heart": (206, 110, 84),
    "Lung_L": (172, 221, 255), "Lung_R": (152, 201, 235), "SpinalCord": (244, 214, 49),
    "A_Aorta": (224, 97, 76), "VenaCava_I": (0, 151, 206), "Vertebrae": (241, 214, 145),
}


def colour_of(name: str) -> tuple[int, int, int]:
    """The fixed display colour of a structure name."""
    if name in COLOURS:
        return COLOURS[name]
    h = zlib.crc32(name.encode("utf-8"))
    return (64 + h % 192, 64 + (h >> 8) % 192, 64 + (h >> 16) % 192)


def new_uid(*entropy: object) -> str:
    """A valid DICOM UID (2.25 root); deterministic when ``entropy`` is given, random otherwise."""
    pydicom = require_pydicom()
    if entropy:
        return str(pydicom.uid.generate_uid(prefix=None, entropy_srcs=[str(e) for e in entropy]))
    return str(pydicom.uid.generate_uid(prefix=None))


def save_dataset(ds, path: str | Path) -> Path:
    """Write a pydicom dataset as a DICOM file (preamble, file meta), atomically."""
    buf = _stdio.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return atomic_write_bytes(path, buf.getvalue())


def _ds(text: float, decimals: int = 4) -> str:
    s = f"{text:.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _ds_point(value: float) -> str:
    """A contour coordinate as a decimal string of at most 16 characters (the DS limit) with as
    many decimals as fit, up to 8: a vertex on a voxel centre or edge stays within 1e-8 mm of it."""
    for decimals in range(8, -1, -1):
        s = _ds(value, decimals)
        if len(s) <= 16:
            return s
    raise ValueError(f"contour coordinate {value} does not fit a DICOM decimal string")


def _file_meta(sop_class: str, sop_uid: str):
    pydicom = require_pydicom()
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    return meta


def write_ct_series(volume: Volume, folder: str | Path, header: dict[str, Any], *, uid_seed: str = "") -> list[Path]:
    """Write a HU volume as a single-frame CT series (one file per slice, ``CT_NNNN.dcm``).

    ``header`` holds the patient/study attributes (PatientName, PatientID, PatientSex,
    PatientAge, PatientBirthDate, PatientPosition, StudyInstanceUID, SeriesInstanceUID,
    FrameOfReferenceUID, StudyDate, ...). Pixels are stored unsigned with
    RescaleIntercept -1024. A volume whose slice axis points against row x column is
    written in reverse slice order (the same physical image).
    """
    pydicom = require_pydicom()
    folder = Path(folder)
    d = np.asarray(volume.direction, float).reshape(3, 3)
    row, col, axis = d[:, 0], d[:, 1], d[:, 2]
    normal = np.cross(row, col)
    array = np.asarray(volume.array)
    origin = np.asarray(volume.origin, float)
    dz = float(volume.spacing[0])
    if float(axis @ normal) < 0:
        origin = origin + (array.shape[0] - 1) * dz * axis
        array = array[::-1]
    elif not np.allclose(axis, normal, atol=1e-6):
        raise ValueError("the slice axis of the volume is not perpendicular to its rows and columns")
    stored = np.clip(np.rint(array.astype(np.float64)) + 1024, 0, 65535).astype(np.uint16)
    series_uid = header.get("SeriesInstanceUID") or new_uid(uid_seed, "series")
    paths = []
    now = header.get("StudyDate", "20260101")
    for k in range(stored.shape[0]):
        sop = new_uid(uid_seed, series_uid, k) if uid_seed else new_uid()
        ds = pydicom.Dataset()
        ds.file_meta = _file_meta(CT_IMAGE_STORAGE, sop)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        for key, value in header.items():
            setattr(ds, key, value)
        _fill_type2(ds)
        for key in _CT_TYPE2:  # Frame of Reference and CT Image modules: present, may be empty
            if key not in ds:
                setattr(ds, key, "")
        ds.SeriesInstanceUID = series_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.Manufacturer = header.get("Manufacturer", "oarbench")
        ds.SeriesNumber = header.get("SeriesNumber", 1)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in origin + k * dz * normal]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
        ds.PixelSpacing = [_ds(volume.spacing[1]), _ds(volume.spacing[2])]
        ds.SliceThickness = _ds(dz)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        paths.append(save_dataset(ds, folder / f"CT_{k + 1:04d}.dcm"))
    return paths


def _copy(src, dst, keys: Iterable[str]) -> None:
    for key in keys:
        if key in src:
            setattr(dst, key, src.get(key))


_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID",
                  "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
                  "StudyDescription")


_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")


_CT_TYPE2 = ("PositionReferenceIndicator", "KVP", "AcquisitionNumber")


def _fill_type2(ds) -> None:
    """Type 2 attributes (present, may be empty) that some CT exports leave out."""
    for key in _TYPE2:
        if key not in ds:
            setattr(ds, key, "")


def _check_grid(labels: Volume, geometry: SeriesGeometry, name: str) -> None:
    ct = Volume(np.zeros(geometry.shape_zyx, np.uint8), geometry.spacing_zyx, geometry.origin, geometry.direction)
    check_same_grid(ct, labels, f"CT series {geometry.series_uid}", name)


def build_rtstruct(labels: Volume, geometry: SeriesGeometry, label_map: LabelMap, *,
                   roi_names: dict[int, str] | None = None, label: str = "oarbench",
                   uid_seed: str = "", source: str = "label map", contour: str = DEFAULT_CONTOUR):
    """An RTSTRUCT dataset for ``labels`` (on the CT grid of ``geometry``).

    ``roi_names`` overrides the ROI name per label value (the synthetic study writes
    centre spellings this way); by default the label map's names are used. ``contour``
    is the convention of :func:`oarbench.dicom.rtstruct.trace_mask` (``edges`` or
    ``centres``, docs/dicom.md).
    """
    if contour not in CONTOUR_CONVENTIONS:
        raise ValueError(f"unknown contour convention {contour!r}; choose {' or '.join(CONTOUR_CONVENTIONS)}")
    pydicom = require_pydicom()
    _check_grid(labels, geometry, source)
    ct0 = dcmread(geometry.slices[0].path, stop_before_pixels=True)
    grid = Grid(geometry.shape_zyx, geometry.spacing_zyx, geometry.origin, geometry.direction)
    frame = str(ct0.get("FrameOfReferenceUID", "")) or new_uid(uid_seed, "frame")
    sop = new_uid(uid_seed, "rtstruct") if uid_seed else new_uid()
    ds = pydicom.Dataset()
    ds.file_meta = _file_meta(RTSTRUCT_STORAGE, sop)
    ds.SOPClassUID = RTSTRUCT_STORAGE
    ds.SOPInstanceUID = sop
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: centre names such as "Dünndarm" and any patient name
    ds.Modality = "RTSTRUCT"
    _copy(ct0, ds, _PATIENT_STUDY)
    _fill_type2(ds)
    ds.OperatorsName = ""
    if "StudyInstanceUID" not in ds:
        raise ValueError(f"{geometry.slices[0].path}: CT slice without StudyInstanceUID")
    now = datetime.now(timezone.utc)
    ds.SeriesInstanceUID = new_uid(uid_seed, "rtstruct series") if uid_seed else new_uid()
    ds.SeriesNumber = 901
    ds.InstanceNumber = 1
    ds.Manufacturer = "oarbench"
    ds.ManufacturerModelName = "oarbench"
    ds.SoftwareVersions = __version__
    ds.SeriesDescription = label
    ds.StructureSetLabel = label[:16]
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    ds.FrameOfReferenceUID = frame
    ds.PositionReferenceIndicator = ""
    ds.ApprovalStatus = "UNAPPROVED"

    slice_refs = []
    for s in geometry.slices:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        item.ReferencedSOPInstanceUID = s.sop_instance_uid
        slice_refs.append(item)
    ser = pydicom.Dataset()
    ser.SeriesInstanceUID = geometry.series_uid
    ser.ContourImageSequence = slice_refs
    study = pydicom.Dataset()
    study.ReferencedSOPClassUID = STUDY_COMPONENT
    study.ReferencedSOPInstanceUID = ds.StudyInstanceUID
    study.RTReferencedSeriesSequence = [ser]
    ref_frame = pydicom.Dataset()
    ref_frame.FrameOfReferenceUID = frame
    ref_frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [ref_frame]

    array = np.asarray(labels.array)
    rois, contours_seq, observations = [], [], []
    number = 0
    for value, name in label_map:
        mask = array == value
        if not mask.any():
            continue
        number += 1
        roi_name = (roi_names or {}).get(value, name)
        roi = pydicom.Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame
        roi.ROIName = roi_name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = _CONTOUR_WORDS[contour]
        rois.append(roi)
        items = []
        for z, pts in trace_mask(mask, grid, contour):
            c = pydicom.Dataset()
            ref = pydicom.Dataset()
            ref.ReferencedSOPClassUID = CT_IMAGE_STORAGE
            ref.ReferencedSOPInstanceUID = geometry.slices[z].sop_instance_uid
            c.ContourImageSequence = [ref]
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(pts)
            c.ContourData = [_ds_point(v) for v in pts.ravel()]
            items.append(c)
        rc = pydicom.Dataset()
        rc.ROIDisplayColor = list(colour_of(name))
        rc.ReferencedROINumber = number
        rc.ContourSequence = items
        contours_seq.append(rc)
        obs = pydicom.Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = "ORGAN"
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = contours_seq
    ds.RTROIObservationsSequence = observations
    return ds


def _property_type(name: str):
    """SNOMED CT type of a structure and its side (Left / Right modifier, or None)."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    stems = {"Liver": "Liver", "Spleen": "Spleen", "Kidney": "Kidney", "Glnd_Adrenal": "AdrenalGland",
             "Pancreas": "Pancreas", "Stomach": "Stomach", "Duodenum": "Duodenum",
             "Gallbladder": "Gallbladder", "Esophagus": "Esophagus", "Heart": "Heart", "Lung": "Lung",
             "SpinalCord": "SpinalCord", "A_Aorta": "Aorta", "VenaCava_I": "InferiorVenaCava",
             "Vertebrae": "Vertebra"}
    side = {"_L": codes.SCT.Left, "_R": codes.SCT.Right}.get(name[-2:])
    stem = name[:-2] if side is not None else name
    if stem == "Bowel":  # TG-263 Bowel: the small and the large bowel (docs/dicom.md)
        return Code("113276009", "SCT", "Intestinal structure"), side
    try:
        return getattr(codes.SCT, stems[stem]), side
    except (KeyError, AttributeError):
        return codes.SCT.Organ, side


def build_seg(labels: Volume, geometry: SeriesGeometry, label_map: LabelMap, *, uid_seed: str = "",
              source: str = "label map"):
    """A DICOM-SEG (highdicom, BINARY, one segment per structure present) for ``labels``."""
    hd = require_highdicom()
    from pydicom.sr.codedict import codes

    _check_grid(labels, geometry, source)
    sources = [dcmread(s.path) for s in geometry.slices]
    for src in sources:  # in-memory copies: what highdicom needs and some CT exports leave out
        _fill_type2(src)
        if not str(src.get("SliceThickness", "") or "").strip():
            src.SliceThickness = _ds(geometry.spacing_zyx[0])
    array = np.asarray(labels.array)
    present = [(v, n) for v, n in label_map if np.any(array == v)]
    if not present:
        raise ValueError(f"{source}: empty label map, nothing to write as DICOM-SEG")
    seg_array = np.zeros(array.shape, np.uint16 if len(present) > 255 else np.uint8)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(name="oarbench", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    for i, (value, name) in enumerate(present, 1):
        seg_array[array == value] = i
        prop, side = _property_type(name)
        desc = hd.seg.SegmentDescription(
            segment_number=i, segment_label=name, segmented_property_category=codes.SCT.Organ,
            segmented_property_type=prop,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=new_uid(uid_seed, "track", name) if uid_seed else new_uid(), tracking_id=name)
        if side is not None:  # Left / Right, inside the property type item (PS3.3 C.8.20.2)
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(side.value, side.scheme_designator, side.meaning)]
        descriptions.append(desc)
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=seg_array, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=new_uid(uid_seed, "seg series") if uid_seed else new_uid(), series_number=902,
        sop_instance_uid=new_uid(uid_seed, "seg") if uid_seed else new_uid(), instance_number=1,
        manufacturer="oarbench", manufacturer_model_name="oarbench", software_versions=__version__,
        device_serial_number="0", series_description="oarbench")


@dataclass
class ExportResult:
    rows: list[dict]
    files: list[Path]


EXPORT_COLUMNS = ("case", "series_instance_uid", "structure", "label", "voxels", "rtstruct", "seg")


def _cases_table(path: Path) -> dict[str, str]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read cases table: {exc}") from exc
    if rows and ("case" not in rows[0] or "series_instance_uid" not in rows[0]):
        raise ValueError(f"{path}: a cases table needs columns case and series_instance_uid "
                         "(the cases.csv written by oarbench dicom import)")
    return {restore_cell(r["case"]): r["series_instance_uid"] for r in rows}


def export_predictions(pred_dir: str | Path, dicom_dir: str | Path, out: str | Path, label_map: LabelMap, *,
                       formats: Sequence[str] = ("rtstruct", "seg"), cases_csv: str | Path | None = None,
                       progress: Callable[[str], None] | None = None, contour: str = DEFAULT_CONTOUR,
                       on_plan: Callable[[int], None] | None = None) -> ExportResult:
    """Write ``OUT/CASE/RTSTRUCT.dcm`` and/or ``OUT/CASE/SEG.dcm`` for every prediction in ``pred_dir``.

    Predictions are matched to the CT series of ``dicom_dir`` through ``cases_csv``
    (case -> SeriesInstanceUID, from ``oarbench dicom import``); without it, a single
    prediction maps to the single CT series of ``dicom_dir``. Everything is checked and
    every object built before anything is written. ``contour`` is the RTSTRUCT contour
    convention (``edges`` or ``centres``); ``on_plan`` is called with the number of cases
    once they are known, ``progress`` after each case is built.
    """
    if contour not in CONTOUR_CONVENTIONS:
        raise ValueError(f"unknown contour convention {contour!r}; choose {' or '.join(CONTOUR_CONVENTIONS)}")
    unknown = sorted(set(formats) - {"rtstruct", "seg"})
    if unknown or not formats:
        raise ValueError(f"unknown export format(s) {unknown or list(formats)}; choose rtstruct and/or seg")
    preds = find_cases(pred_dir)
    inventory = scan(dicom_dir)
    ct_series = {uid: s for uid, s in inventory.series.items() if s.modality == "CT"}
    if cases_csv is not None:
        table = _cases_table(Path(cases_csv))
        missing = sorted(set(preds) - set(table))
        if missing:
            raise ValueError(f"{cases_csv}: no row for the predicted case(s) {missing}")
        targets = {c: table[c] for c in preds}
        absent = {c: u for c, u in targets.items() if u not in ct_series}
        if absent:
            c, u = next(iter(absent.items()))
            raise ValueError(f"{dicom_dir}: holds no CT series {u} (case {c} in {cases_csv})")
    else:
        if len(preds) != 1 or len(ct_series) != 1:
            raise ValueError(f"{dicom_dir}: {len(ct_series)} CT series and {len(preds)} predictions in {pred_dir}; "
                             "without --cases (the cases.csv of oarbench dicom import) exactly one of each is needed")
        targets = {next(iter(preds)): next(iter(ct_series))}
    plan = []
    for case, uid in sorted(targets.items()):
        geometry = read_geometry(uid, [f.path for f in ct_series[uid].files])
        volume = read_volume(preds[case])
        _check_grid(volume, geometry, preds[case])
        values = set(np.unique(volume.array).tolist()) - {0}
        extra = sorted(values - set(label_map.values))
        if extra:
            raise ValueError(f"{preds[case]}: label values {extra} are not in the label map ({label_map.values})")
        plan.append((case, uid, geometry, volume))
    if on_plan is not None:
        on_plan(len(plan))
    out = Path(out)
    # every object is built (and so checked) before any file is written
    built = []
    for case, uid, geometry, volume in plan:
        rs = seg = None
        try:
            if "rtstruct" in formats:
                rs = build_rtstruct(volume, geometry, label_map, source=str(preds[case]), contour=contour)
            if "seg" in formats and np.any(volume.array):
                seg = build_seg(volume, geometry, label_map, source=str(preds[case]))
        except (ValueError, ImportError):
            raise
        except Exception as exc:  # noqa: BLE001 - a writer library refusing the CT headers
            raise ValueError(f"{preds[case]}: cannot build DICOM objects on CT series {uid} "
                             f"({geometry.slices[0].path.parent}): {exc}") from exc
        built.append((case, uid, volume, rs, seg))
        if progress is not None:
            progress(case)
    rows, files = [], []
    for case, uid, volume, rs, seg in built:
        rs_path = seg_path = None
        if rs is not None:
            rs_path = save_dataset(rs, out / case / "RTSTRUCT.dcm")
            files.append(rs_path)
        if seg is not None:
            seg_path = save_dataset(seg, out / case / "SEG.dcm")
            files.append(seg_path)
        for value, name in label_map:
            n = int(np.count_nonzero(volume.array == value))
            if n:
                rows.append({"case": case, "series_instance_uid": uid, "structure": name, "label": value,
                             "voxels": n, "rtstruct": rs_path.relative_to(out).as_posix() if rs_path else "",
                             "seg": seg_path.relative_to(out).as_posix() if seg_path else ""})
    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(EXPORT_COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows(map(csv_row, rows))
    atomic_write_text(out / "export.csv", buf.getvalue())
    return ExportResult(rows, files)
