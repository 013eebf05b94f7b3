"""Lazy imports of the optional DICOM dependencies, with a one-line hint when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

_HINT = "DICOM support needs the 'dicom' extra: pip install 'oarbench[dicom]'"


def _require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{_HINT} ({module} is missing: {exc})") from None


def require_pydicom() -> ModuleType:
    return _require("pydicom")


def require_highdicom() -> ModuleType:
    return _require("highdicom")


def require_skimage_draw() -> ModuleType:
    return _require("skimage.draw")


def require_skimage_measure() -> ModuleType:
    return _require("skimage.measure")


def dcmread(path, *, stop_before_pixels: bool = False):
    """Read a DICOM file; also one written without the 128-byte preamble and file meta
    (a bare data set, as some exports hold), recognised by its first group number 0x0008.

    Raises pydicom's InvalidDicomError (or the reader's error) for anything else.
    """
    pydicom = require_pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except pydicom.errors.InvalidDicomError:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head[:2] != b"\x08\x00":
            raise
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            # name the encoding the reader found, so that the pixel data can be decoded
            implicit, little = ds.original_encoding
            uid = pydicom.uid
            syntax = (uid.ImplicitVRLittleEndian if implicit else
                      uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
            ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = syntax
        return ds
