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


#: Bytes of pixel data one image (all its frames) may declare (Rows x Columns x frames x samples x bits).
MAX_IMAGE_BYTES = 256 * 1024 * 1024
#: Bytes a deflated data set may inflate to before its pixel data (its header; all of an RTSTRUCT).
MAX_INFLATED_BYTES = 512 * 1024 * 1024
DEFLATED = "1.2.840.10008.1.2.1.99"
_PIXEL_DATA = 0x7FE00010


class OversizeError(ValueError):
    """A file that declares more than oarbench reads (refused from its header, before decoding)."""


def _declared_bytes(ds) -> int:
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(str(ds.get("NumberOfFrames", 1) or 1).strip() or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError):
        return 0
    return rows * cols * max(frames, 1) * max(samples, 1) * max(bits, 1) // 8


def _check_size(ds, path) -> None:
    n = _declared_bytes(ds)
    if n > MAX_IMAGE_BYTES:
        raise OversizeError(f"{path}: image claims {ds.get('Columns')} x {ds.get('Rows')} pixels"
                            f"{' x ' + str(ds.get('NumberOfFrames')) + ' frames' if 'NumberOfFrames' in ds else ''} "
                            f"({n / 2**20:,.0f} MiB of pixel data); oarbench reads images of at most "
                            f"{MAX_IMAGE_BYTES // 2**20} MiB (refused from the header, nothing decoded)")


def _read_deflated(path, stop_before_pixels: bool):
    """A Deflated Explicit VR Little Endian file, inflated step by step: up to its pixel data for the
    header (never more than :data:`MAX_INFLATED_BYTES`), and for the pixels no further than the
    image its header declares."""
    import zlib
    from io import BytesIO

    require_pydicom()
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

    pixel_tag = b"\xe0\x7f\x10\x00"
    chunk = 1 << 20
    with open(path, "rb") as fh:
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)

        def inflate(buf: bytearray, limit: int) -> bool:
            """Inflate into ``buf`` up to ``limit`` bytes; True at the end of the stream."""
            if inflater.eof:  # bytes after the stream's end (a padding byte) are never inflated
                return True
            data = inflater.unconsumed_tail or fh.read(chunk)
            if not data:
                return True
            buf += inflater.decompress(data, min(max(limit - len(buf), 1), chunk))  # <= 1 MiB a step
            return False

        head = bytearray()
        ended = False
        while not ended:  # the header: up to the pixel data tag, or all of a data set without one
            start = max(len(head) - 3, 0)
            ended = inflate(head, MAX_INFLATED_BYTES + 1)
            if pixel_tag in head[start:]:
                break
            if len(head) > MAX_INFLATED_BYTES:
                raise OversizeError(f"{path}: deflated data set inflates to more than "
                                    f"{MAX_INFLATED_BYTES // 2**20} MiB before any pixel data; refused")
        stop = (lambda tag, vr, length: tag == _PIXEL_DATA)  # noqa: E731
        ds = read_dataset(BytesIO(bytes(head)), False, True, stop_when=stop)
        _check_size(ds, path)
        if stop_before_pixels:
            ds.file_meta = meta
            return ds
        limit = len(head) + _declared_bytes(ds) + (1 << 20)
        while not ended:
            ended = inflate(head, limit + 1)
            if len(head) > limit:
                raise OversizeError(f"{path}: deflated data set inflates to more than its header declares "
                                    f"({limit / 2**20:.0f} MiB); refused")
    ds = read_dataset(BytesIO(bytes(head)), False, True)
    ds.file_meta = meta
    ds.set_original_encoding(False, True)
    return ds


def dcmread(path, *, stop_before_pixels: bool = False):
    """Read a DICOM file; also one written without the 128-byte preamble and file meta
    (a bare data set, as some exports hold), recognised by its first group number 0x0008.

    An image whose header declares more than :data:`MAX_IMAGE_BYTES` of pixel data raises
    :class:`OversizeError` before anything is decoded; a deflated file is inflated no further
    than its header (``stop_before_pixels``) or the pixel data it declares.
    Raises pydicom's InvalidDicomError (or the reader's error) for anything else.
    """
    pydicom = require_pydicom()
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - no file meta: the reader below decides
        meta = None
    if meta is not None and str(meta.get("TransferSyntaxUID", "")) == DEFLATED:
        try:
            return _read_deflated(path, stop_before_pixels)
        except OversizeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise pydicom.errors.InvalidDicomError(f"cannot inflate deflated data set: {exc}") from exc
    ds = _dcmread(path, stop_before_pixels)
    _check_size(ds, path)
    return ds


def _dcmread(path, stop_before_pixels: bool):
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
