"""Build small DICOM CT series and RTSTRUCTs with pydicom, independently of oarbench's writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

pydicom = __import__("pytest").importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


def _save(ds: Dataset, path: Path, sop_class: str, bare: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if bare:  # no preamble, no file meta: a bare implicit-VR data set, as some exports hold
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
        return path
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_series(folder: Path, *, rows: int = 6, cols: int = 8, positions=None, row_dir=(1, 0, 0), col_dir=(0, 1, 0),
              pixel_spacing=(1.5, 1.0), slope: float = 1.0, intercept: float = -1024.0, modality: str = "CT",
              tilt: float | None = None, sizes=None, pixels=None, patient_id: str = "P-SECRET-1",
              patient_name: str = "Doe^Jane", patient_position: str = "HFS", age: str = "007Y", sex: str = "F",
              study_uid: str | None = None, frame_uid: str | None = None, names=None, bare: bool = False) -> dict:
    """Write a CT series, one file per position; returns its UIDs and paths (in the order given).

    ``positions`` are ImagePositionPatient triples; ``pixels[k]`` the stored values of slice k
    (default: 10 * k + column index); ``names[k]`` the file name of slice k.
    """
    if positions is None:
        normal = np.cross(row_dir, col_dir)
        positions = [tuple(np.asarray([10.0, -20.0, 30.0]) + 2.5 * k * normal) for k in range(4)]
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    series_uid = generate_uid()
    paths, sops = [], []
    for k, pos in enumerate(positions):
        r, c = sizes[k] if sizes else (rows, cols)
        ds = Dataset()
        ds.SOPClassUID = CT
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = modality
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientAge = age
        ds.PatientSex = sex
        ds.PatientPosition = patient_position
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = len(positions) - k  # deliberately against the geometry
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = list(pixel_spacing)
        if tilt is not None:
            ds.GantryDetectorTilt = tilt
        ds.Rows, ds.Columns = r, c
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        values = pixels[k] if pixels is not None else 10 * k + np.tile(np.arange(c), (r, 1))
        ds.PixelData = np.asarray(values, np.uint16).tobytes()
        name = names[k] if names else f"img_{ds.SOPInstanceUID[-6:]}.dcm"
        paths.append(_save(ds, folder / name, CT, bare))
        sops.append(ds.SOPInstanceUID)
    return {"study": study_uid, "frame": frame_uid, "series": series_uid, "paths": paths, "sops": sops,
            "positions": positions}


def rtstruct(path: Path, series: dict, rois: dict[str, list[np.ndarray]], *, kinds=None,
             reference_series: bool = True, frame_uid: str | None = None) -> Path:
    """Write an RTSTRUCT with ``rois`` (name -> list of (n, 3) contour arrays in mm)."""
    ds = Dataset()
    ds.SOPClassUID = RTSTRUCT
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.PatientID = "P-SECRET-1"
    ds.StudyInstanceUID = series["study"]
    ds.SeriesInstanceUID = generate_uid()
    frame = frame_uid or series["frame"]
    ref_frame = Dataset()
    ref_frame.FrameOfReferenceUID = frame
    if reference_series:
        ser = Dataset()
        ser.SeriesInstanceUID = series["series"]
        study = Dataset()
        study.ReferencedSOPInstanceUID = series["study"]
        study.RTReferencedSeriesSequence = [ser]
        ref_frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [ref_frame]
    ss_rois, contours = [], []
    for number, (name, polys) in enumerate(rois.items(), 1):
        item = Dataset()
        item.ROINumber = number
        item.ROIName = name
        item.ReferencedFrameOfReferenceUID = frame
        ss_rois.append(item)
        rc = Dataset()
        rc.ReferencedROINumber = number
        seq = []
        for poly in polys:
            c = Dataset()
            c.ContourGeometricType = (kinds or {}).get(name, "CLOSED_PLANAR")
            c.NumberOfContourPoints = len(poly)
            c.ContourData = [float(f"{v:.6f}") for v in np.asarray(poly, float).ravel()]
            seq.append(c)
        rc.ContourSequence = seq
        contours.append(rc)
    ds.StructureSetROISequence = ss_rois
    ds.ROIContourSequence = contours
    return _save(ds, path, RTSTRUCT)


def square(x0: float, y0: float, x1: float, y1: float, z: float) -> np.ndarray:
    return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], float)


def circle(cx: float, cy: float, r: float, z: float, n: int = 720) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t), np.full(n, float(z))])
