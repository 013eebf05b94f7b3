"""Image input/output with SimpleITK, grid checks and case discovery.

Arrays follow SimpleITK's ``GetArrayFromImage`` order (z, y, x); ``Volume.spacing``
is given in the same order, in mm (the reverse of ``image.GetSpacing()``), while
``origin`` and ``direction`` stay in SimpleITK's physical (x, y, z) convention.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import SimpleITK as sitk

# Atomic writes live in storage (below io): io re-exports atomic_write_bytes.
from oarbench.storage import PARTIAL_MARK, _atomic, _atomic_target, atomic_write_bytes

__all__ = [
    "Volume",
    "read_volume",
    "check_image_file",
    "write_volume",
    "same_grid",
    "check_same_grid",
    "resample_nearest",
    "find_cases",
    "case_id",
    "IMAGE_SUFFIXES",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_output_set",
    "content_sha256",
    "check_output_set",
    "OutputLock",
    "safe_name",
    "sha256_file",
    "check_case_name",
    "check_inside",
    "ImageHeader",
    "read_header",
    "MAX_IMAGE_BYTES",
    "check_header_size",
]

#: File endings recognised as images, longest first.
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

# Grid tolerances (docs/metrics.md): spacing relative, origin absolute in mm, direction absolute.
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D (or 2D) image on a physical grid.

    Attributes
    ----------
    array:
        Voxel values, axes (z, y, x).
    spacing:
        Voxel size in mm, axes (z, y, x).
    origin:
        Physical position of voxel (0, 0, 0) in mm, (x, y, z) as in SimpleITK.
    direction:
        Direction cosines, row-major 3x3 (or 2x2) as in SimpleITK.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def from_image(cls, image: sitk.Image) -> "Volume":
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=tuple(float(s) for s in reversed(image.GetSpacing())),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    def to_image(self) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing(tuple(reversed(self.spacing)))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same grid with other voxel values (shape must match)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (mm^3 / 1000)."""
        return float(np.prod(self.spacing)) / 1000.0


def case_id(path: str | Path, *, channel: bool = False) -> str | None:
    """Case identifier of an image file name, or ``None`` if it is no image.

    ``CASE.nii.gz`` -> ``CASE``. With ``channel=True`` (nnU-Net image folders such
    as imagesTs) the four-digit channel suffix is dropped: ``CASE_0000.nii.gz`` ->
    ``CASE``. Label files carry no channel suffix, so it is kept by default.
    """
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            stem = name[: -len(suffix)]
            if channel:
                return re.sub(r"_\d{4}$", "", stem)
            return stem
    return None


def find_cases(folder: str | Path, *, images: bool = False, follow_links: bool = True) -> dict[str, Path]:
    """Map case id -> file for every image in ``folder`` (not recursive).

    ``images=True`` reads an nnU-Net image folder: ``CASE_0000.nii.gz`` is case
    ``CASE``; further channels (``_0001``, ...) are not oarbench's business and
    are left out. Raises ValueError when the folder does not exist, holds no
    images, holds an image name that is a broken symbolic link, an image name
    with a control character (a line feed, a tab ...), or two files claim the
    same case id. ``follow_links=False``: an image that is a symbolic link to a
    file outside ``folder`` is refused too (:func:`check_inside`).

    ``folder`` may be an fsspec URL (``s3://bucket/study/labelsTs``); the
    values are then URL strings (:mod:`oarbench.storage`).
    """
    from oarbench import storage

    folder = storage.as_location(folder)  # type: ignore[assignment]
    if not storage.is_dir(folder):
        raise ValueError(f"{folder}: folder not found")
    cases: dict[str, Path] = {}
    if isinstance(folder, Path):
        for link in sorted(folder.iterdir()):
            if link.is_symlink() and not link.exists() and not link.name.startswith(".") and case_id(link):
                raise ValueError(f"{link}: broken symbolic link (points to {os.readlink(link)})")
    for path in storage.list_files(folder):
        fname = storage.name(path)
        stem = case_id(fname)
        if stem is None:
            continue
        check_case_name(stem, path)
        if not follow_links and isinstance(path, Path):
            check_inside(path, folder)  # type: ignore[arg-type]
        if images:
            match = re.search(r"_(\d{4})$", stem)
            if match and match.group(1) != "0000":
                continue
        cid = re.sub(r"_\d{4}$", "", stem) if images else stem
        if cid in cases:
            raise ValueError(f"{folder}: two files for case {cid!r}: {storage.name(cases[cid])} and {fname}")
        cases[cid] = path  # type: ignore[assignment]
    if not cases:
        raise ValueError(f"{folder}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    return cases


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_case_name(case: str, path: Any) -> str:
    """``case`` unless it holds a control character (a line feed, tab, ...): ValueError naming ``path``."""
    bad = _CONTROL.search(case)
    if bad:
        shown = repr(str(path))[1:-1]
        raise ValueError(f"{shown}: the case name {case!r} holds a control character ({bad.group()!r}); rename the file")
    return case


def check_inside(path: Path, folder: Path) -> None:
    """Raise ValueError when ``path`` is (or goes through) a symbolic link that leaves ``folder``."""
    real = Path(os.path.realpath(path))
    base = Path(os.path.realpath(folder))
    if real != base and base not in real.parents:
        raise ValueError(
            f"{path}: symbolic link to {real}, outside {folder}; not followed (use --follow-links to read it)"
        )


# NIfTI datatype codes of floating-point voxels -> numpy type (docs/evaluate.md, "Damaged files").
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_CHUNK = 1 << 22
#: The module :func:`_gzip_module` chose (set on first use; tests set it to compare the two).
_GZIP: Any = None


def _gzip_module() -> Any:
    """The module that opens .gz files: ``isal.igzip`` where installed, else the standard ``gzip``.

    ISA-L's inflate gives the same bytes and checks the same CRC-32 and length trailer as zlib's,
    several times faster on label maps (docs/performance.md, "After reading .nii.gz through ISA-L's
    inflate"). A truncated stream raises EOFError and a bad trailer or magic number
    ``gzip.BadGzipFile`` in both; a damaged deflate block raises zlib's or ISA-L's own error
    (:func:`_gzip_errors`). tests/test_damaged_inputs.py reads every damage through both modules.
    """
    global _GZIP
    if _GZIP is None:
        try:
            from isal import igzip

            _GZIP = igzip
        except ImportError:
            _GZIP = gzip
    return _GZIP


def _gzip_errors() -> tuple[type[BaseException], ...]:
    """What a damaged or incomplete gzip stream raises, from either module of :func:`_gzip_module`."""
    errors: tuple[type[BaseException], ...] = (EOFError, gzip.BadGzipFile, zlib.error)
    if _gzip_module() is not gzip:
        from isal import isal_zlib

        errors += (isal_zlib.error,)
    return errors


def _nifti_layout(header: bytes, path: Path) -> tuple[int, int, int, str | None]:
    """(voxel offset, payload bytes, bytes per voxel, float numpy dtype or None) of a NIfTI-1/2 header."""
    if len(header) < 4:
        raise ValueError(f"{path}: truncated NIfTI header ({len(header)} bytes)")
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0]
        if size in (348, 540):
            break
    else:
        raise ValueError(f"{path}: not a NIfTI file (header size field {struct.unpack('<i', header[:4])[0]})")
    if len(header) < size:
        raise ValueError(f"{path}: truncated NIfTI header ({len(header)} of {size} bytes)")
    if size == 348:
        dims = struct.unpack(order + "8h", header[40:56])
        datatype, bitpix = struct.unpack(order + "hh", header[70:74])
        vox_offset = struct.unpack(order + "f", header[108:112])[0]
    else:
        datatype, bitpix = struct.unpack(order + "hh", header[12:16])
        dims = struct.unpack(order + "8q", header[16:80])
        vox_offset = struct.unpack(order + "q", header[168:176])[0]
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1 : ndim + 1]):
        raise ValueError(f"{path}: invalid NIfTI dimensions {list(dims[1 : max(ndim, 0) + 1])}")
    if bitpix <= 0 or not math.isfinite(vox_offset) or vox_offset < size:
        raise ValueError(f"{path}: invalid NIfTI header (bitpix {bitpix}, voxel offset {vox_offset})")
    n = math.prod(dims[1 : ndim + 1])
    dtype = _NIFTI_FLOATS.get(datatype)
    return int(vox_offset), (n * bitpix + 7) // 8, max(bitpix // 8, 1), (order + dtype) if dtype else None


def _scan_payload(stream: Any, path: Path, what: str, into: np.ndarray | None = None) -> None:
    """Read a NIfTI byte stream to its end: the voxel data must be complete and hold no NaN.

    ``into`` (uint8, as many bytes as the header announces) receives the voxel data."""
    header = stream.read(540)
    offset, need, item, float_dtype = _nifti_layout(header, path)
    seen = len(header)
    nan = 0
    carry = header[offset:] if seen > offset else b""
    filled = 0

    def keep(data: bytes) -> None:
        nonlocal filled
        if into is not None and filled < need and data:
            k = min(len(data), need - filled)
            into[filled:filled + k] = np.frombuffer(data, dtype=np.uint8, count=k)
            filled += k

    keep(carry)
    while True:
        block = stream.read(_CHUNK)
        if not block:
            break
        block_data = block[offset - seen:] if seen < offset else block
        seen += len(block)
        keep(block_data)
        if seen - offset > need + _TRAILING_SLACK:
            raise ValueError(
                f"{path}: cannot read image: {what} holds more than {need + _TRAILING_SLACK} bytes after the header, "
                f"which announces {need} bytes of voxel data; refusing to read on"
            )
        if float_dtype is not None and block_data:
            carry += block_data
            usable = len(carry) - len(carry) % item
            nan += int(np.count_nonzero(np.isnan(np.frombuffer(carry[:usable], dtype=float_dtype))))
            carry = carry[usable:]
    if float_dtype is not None and carry and len(carry) >= item:
        usable = len(carry) - len(carry) % item
        nan += int(np.count_nonzero(np.isnan(np.frombuffer(carry[:usable], dtype=float_dtype))))
    have = max(0, seen - offset)
    if have < need:
        raise ValueError(
            f"{path}: cannot read image: incomplete voxel data: {what} holds {have} bytes of voxel data, the header needs {need} "
            "(an interrupted copy?)"
        )
    if nan:
        raise ValueError(f"{path}: {nan} voxel(s) are NaN (not a number); refusing to read them as 0")


#: Largest voxel data one image may hold, as its header states (dimensions x bytes per voxel): 2 GiB,
#: checked before any voxel is read (docs/evaluate.md, "Guarantees"). A 1000 x 1024 x 1024 int16 CT is 2 GiB.
MAX_IMAGE_BYTES = 2 << 30
# A decompressed NIfTI stream may run on past its voxel data by at most this much before it is refused.
_TRAILING_SLACK = 16 << 20


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without its voxels.

    ``size`` is in SimpleITK's (x, y, z) order with trailing dimensions of 1
    dropped; ``nbytes`` is the voxel data the header announces (all voxels x
    bytes per voxel).
    """

    size: tuple[int, ...]
    nbytes: int

    def shape_text(self) -> str:
        return " x ".join(str(d) for d in self.size)


def _nifti_dims(header: bytes) -> tuple[int, ...]:
    """Dimensions (x, y, z, ...) of a NIfTI-1/2 header already checked by :func:`_nifti_layout`."""
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0]
        if size in (348, 540):
            break
    if size == 348:
        dims = struct.unpack(order + "8h", header[40:56])
    else:
        dims = struct.unpack(order + "8q", header[16:80])
    return tuple(int(d) for d in dims[1 : dims[0] + 1])


def _sitk_pixel_bytes(pixel_id: int) -> int:
    return sitk.Image([1, 1], pixel_id).GetSizeOfPixelComponent()


def read_header(path: Any) -> ImageHeader:
    """The grid size and voxel data size an image file's header announces, without reading its voxels.

    ``.nii`` / ``.nii.gz``: the NIfTI header (348 bytes, NIfTI-2: 540) from the
    start of the (decompressed) stream; only those bytes are decompressed.
    Other formats: SimpleITK's ``ReadImageInformation``. ``path`` may be an
    fsspec URL: a NIfTI header is read from the start of the remote stream,
    other formats from a temporary local copy. Raises ValueError naming the
    file when the header cannot be read.
    """
    from oarbench import storage

    remote = storage.is_remote(path)
    name = str(path).lower()
    if remote and not name.endswith((".nii.gz", ".nii")):
        with storage.local_copy(str(path)) as local:
            try:
                return read_header(local)
            except ValueError as exc:
                raise ValueError(str(exc).replace(str(local), str(path))) from None
    if not remote:
        path = Path(path)
    if name.endswith((".nii.gz", ".nii")):
        try:
            if remote:
                import fsspec

                with fsspec.open(str(path), "rb") as raw:
                    head = (gzip.GzipFile(fileobj=raw) if name.endswith(".gz") else raw).read(540)
            else:
                with (_gzip_module().open if name.endswith(".gz") else open)(path, "rb") as stream:
                    head = stream.read(540)
        except FileNotFoundError:
            raise ValueError(f"{path}: file not found") from None
        except _gzip_errors() as exc:
            raise ValueError(f"{path}: cannot read image: damaged or incomplete gzip stream ({exc}); an interrupted copy?") from None
        _offset, nbytes, _item, _float = _nifti_layout(head, path)
        dims = _nifti_dims(head)
    else:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            detail = next((ln for ln in lines if "ERROR" in ln or "Unable" in ln), lines[0] if lines else "")
            raise ValueError(f"{path}: cannot read image header ({detail})") from None
        dims = tuple(int(d) for d in reader.GetSize())
        nbytes = math.prod(dims) * reader.GetNumberOfComponents() * _sitk_pixel_bytes(reader.GetPixelID())
    while len(dims) > 1 and dims[-1] == 1:
        dims = dims[:-1]
    return ImageHeader(dims, int(nbytes))


def check_header_size(header: ImageHeader, path: Any, max_bytes: int | None = MAX_IMAGE_BYTES) -> None:
    """Raise ValueError naming ``path`` when ``header`` announces more voxel data than ``max_bytes``."""
    if max_bytes is not None and header.nbytes > max_bytes:
        raise ValueError(
            f"{path}: the header announces a {header.shape_text()} grid, {header.nbytes / 2**30:.2f} GiB of voxel "
            f"data, above the limit of {max_bytes / 2**30:.2f} GiB for one image; not read"
        )


def check_image_file(path: str | Path, *, into: np.ndarray | None = None) -> None:
    """Check that an image file is complete before any number is read from it.

    SimpleITK reads a truncated NIfTI file without complaint, filling the
    missing voxels with 0, and reads NaN voxels as 0. For ``.nii`` and
    ``.nii.gz`` files this reads the whole payload and raises ValueError naming
    the file when the gzip stream is damaged or incomplete (end-of-stream
    marker, CRC-32 and length trailer), when the voxel data after the header's
    voxel offset is shorter than its dimensions x bytes per voxel, or when a
    floating-point image holds NaN voxels. Other formats are checked by their
    SimpleITK readers, which refuse incomplete data. ``into`` (NIfTI only; uint8, the voxel data's
    size) receives the voxel data as the check reads it.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        try:
            with _gzip_module().open(path, "rb") as stream:
                _scan_payload(stream, path, "the decompressed file", into)
        except _gzip_errors() as exc:
            raise ValueError(f"{path}: cannot read image: damaged or incomplete gzip stream ({exc}); an interrupted copy?") from None
    elif name.endswith(".nii"):
        with open(path, "rb") as stream:
            _scan_payload(stream, path, "the file", into)


#: NIfTI datatype code -> numpy type of the scalar images :func:`_read_nifti_direct` reads.
_NIFTI_SCALARS = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8",
                  1280: "u8"}


def _direct_layout(header: bytes) -> tuple[np.dtype, tuple[int, int, int]] | None:
    """(voxel type, (z, y, x) shape) of a little-endian NIfTI-1 3D scalar image whose voxels are
    read as stored (no scaling), or None."""
    if len(header) < 348 or struct.unpack("<i", header[:4])[0] != 348:
        return None  # big-endian or NIfTI-2 files: SimpleITK reads them
    dims = struct.unpack("<8h", header[40:56])
    datatype = struct.unpack("<h", header[70:72])[0]
    slope, inter = struct.unpack("<ff", header[112:120])
    if dims[0] != 3 or datatype not in _NIFTI_SCALARS or slope not in (0.0, 1.0) or inter != 0.0:
        return None  # other dimensions and voxel types, scaled voxels: SimpleITK reads them
    return np.dtype("<" + _NIFTI_SCALARS[datatype]), (int(dims[3]), int(dims[2]), int(dims[1]))


def _read_nifti_direct(path: Path) -> Volume | None:
    """A 3D scalar NIfTI-1 image stored without scaling, decompressed once.

    The voxels come from the completeness check (:func:`check_image_file`), which reads the whole
    payload anyway; the geometry from SimpleITK's reading of the header (``ReadImageInformation``:
    the spacing, origin and direction :func:`sitk.ReadImage` gives). None for every other image,
    and wherever SimpleITK's header reading disagrees on the grid or the voxel type: the caller
    then reads it with SimpleITK (tests/test_io_direct.py checks both against SimpleITK)."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    try:
        with (_gzip_module().open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as stream:
            header = stream.read(540)
    except (OSError, *_gzip_errors()):
        return None  # the full reading names the problem
    layout = _direct_layout(header)
    if layout is None:
        return None
    dtype, shape = layout
    native = dtype.newbyteorder("=")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    if (reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1
            or tuple(reader.GetSize()) != shape[::-1]
            or reader.GetPixelID() != sitk.GetImageFromArray(np.zeros((1, 1, 1), native)).GetPixelID()):
        return None
    voxels = np.empty(math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    check_image_file(path, into=voxels)
    array = voxels.view(dtype).reshape(shape)
    if not dtype.isnative:
        array = array.astype(native)
    return Volume(
        array=array,
        spacing=tuple(float(s) for s in reversed(reader.GetSpacing())),
        origin=tuple(float(o) for o in reader.GetOrigin()),
        direction=tuple(float(d) for d in reader.GetDirection()),
    )


def read_volume(path: str | Path, *, allow_4d: bool = False, max_bytes: int | None = MAX_IMAGE_BYTES) -> Volume:
    """Read an image file into a :class:`Volume`.

    Raises ValueError naming the file when it is missing, unreadable, corrupt,
    incomplete (:func:`check_image_file`), holds NaN voxels, or is not 2D/3D,
    and, before any voxel is decompressed, when its header announces more
    than ``max_bytes`` of voxel data (:func:`read_header`; ``None``: no limit).
    ``path`` may be an fsspec URL: the file is copied to a temporary local file
    and read (and checked) from there.
    """
    from oarbench import storage

    if storage.is_remote(path):
        if not storage.is_file(str(path)):
            raise ValueError(f"{path}: file not found")
        with storage.local_copy(str(path)) as local:
            try:
                return read_volume(local, allow_4d=allow_4d, max_bytes=max_bytes)
            except ValueError as exc:
                raise ValueError(str(exc).replace(str(local), str(path))) from None
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{path}: broken symbolic link (points to {os.readlink(path)})")
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    check_header_size(read_header(path), path, max_bytes)
    direct = _read_nifti_direct(path)
    if direct is not None:
        return direct
    check_image_file(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "Unable" in line), first[0] if first else "")
        raise ValueError(f"{path}: cannot read image ({detail.strip()})") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar image")
    if image.GetDimension() not in (2, 3) and not allow_4d:
        raise ValueError(f"{path}: is a {image.GetDimension()}D image; expected 3D (or 2D)")
    volume = Volume.from_image(image)
    if volume.array.dtype.kind in "fc":
        nan = int(np.count_nonzero(np.isnan(volume.array)))
        if nan:
            raise ValueError(f"{path}: {nan} voxel(s) are NaN (not a number)")
    return volume


def write_volume(volume: Volume, path: str | Path, *, compress: bool = True) -> Path:
    """Write atomically: to a temporary file in the same folder, then rename."""
    path = Path(path)
    with _atomic(path) as (fd, tmp):
        os.close(fd)
        try:
            sitk.WriteImage(volume.to_image(), tmp, useCompression=compress)
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            detail = next((ln for ln in lines if "ERROR" in ln or "Could not" in ln), lines[-1] if lines else "")
            raise OSError(errno.EIO, f"cannot write image ({detail})", str(path)) from None
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def content_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (sorted relative paths with their sha256)."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\t{sha256_file(f)}\n".encode("utf-8"))
    return h.hexdigest()


def write_output_set(folder: Any, files: dict[str, bytes], record: str, record_data: dict[str, Any], *,
                     written: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``files`` and a JSON ``record`` naming their sha256, as one set.

    Every file is first written in full to a temporary file (so a full disk
    fails before any old output is touched); then the files are renamed into
    place and the record last. ``record_data["outputs"]`` maps each file name to
    its sha256, so a set mixed from two runs (a kill between renames) is
    detected by :func:`check_output_set`. ``folder`` may be an fsspec URL: the
    objects are then written one after another (each write is atomic), the
    record last. ``written`` adds outputs that are already in place (name ->
    :func:`content_sha256`), such as a Parquet dataset folder.
    """
    import json

    from oarbench import storage

    payload = dict(record_data)
    payload["outputs"] = {**(written or {}), **{name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    blobs = {**files, record: (json.dumps(payload, indent=2, default=str) + "\n").encode("utf-8")}
    loc = storage.as_location(folder)
    if not isinstance(loc, Path):
        return {name: storage.write_bytes(storage.join(loc, name), data) for name, data in blobs.items()}
    folder = loc
    folder.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, Path]] = []
    try:
        for name, data in blobs.items():
            fd, tmp = _atomic_target(folder / name)
            staged.append((tmp, folder / name))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, target in staged:  # the record is renamed last
            os.replace(tmp, target)
        _fsync_dir(folder)
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
    return {name: folder / name for name in blobs}


def check_output_set(path: str | Path, record: str = "run.json") -> None:
    """Raise ValueError when ``path`` does not match the sha256 that the run record
    beside it names (its set was mixed by an interrupted write, or the file was
    edited). Files without a record, or a record without hashes, are not checked."""
    import json

    path = Path(path)
    rec = path.parent / record
    if not rec.is_file():
        return
    try:
        outputs = json.loads(rec.read_text()).get("outputs")
    except (OSError, ValueError, AttributeError):
        raise ValueError(f"{rec}: cannot read the run record") from None
    if not isinstance(outputs, dict) or path.name not in outputs:
        return
    if content_sha256(path) != outputs[path.name]:
        raise ValueError(
            f"{path}: does not match {rec} (sha256 differs): the outputs in {path.parent} are not one set "
            "(an interrupted or concurrent run, or an edited file); rerun to rewrite them"
        )


_NAME_FORBIDDEN = re.compile(r"[/\\\x00-\x1f\x7f]")


def safe_name(value: str, what: str, *, max_len: int = 100) -> str:
    """``value`` if it can be one path component, else ValueError saying why.

    Names used in file paths (centres, models, studies, conditions) must not be
    empty, start with a dot (``..`` would leave the output folder), hold a path
    separator or a control character, or be longer than ``max_len`` characters.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what}: name must be a non-empty string, got {value!r}")
    if value.startswith(".") or _NAME_FORBIDDEN.search(value) or len(value) > max_len:
        raise ValueError(
            f"{what}: name {value!r} cannot be used in file names (no leading '.', no '/' or '\\', "
            f"no control characters, at most {max_len} characters)"
        )
    return value


class OutputLock:
    """An exclusive lock on an output folder for one run (``OUT/.oarbench.lock``).

    A second run on the same folder refuses with a clear error instead of
    disturbing the first. Once the lock is held, temporary files left by a
    killed run (``.*.partial*``) are removed. Re-entrant within one process.
    """

    _held: dict[str, tuple[int, int]] = {}

    def __init__(self, folder: Any) -> None:
        from oarbench import storage

        loc = storage.as_location(folder)
        # An object store has no locks: remote output folders are not locked.
        self.folder = loc if isinstance(loc, Path) else None
        self._key = ""
        self._created = False

    def __enter__(self) -> "OutputLock":
        if self.folder is None:
            return self
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        key = str(self.folder.resolve())
        self._key = key
        if key in self._held:
            fd, count = self._held[key]
            self._held[key] = (fd, count + 1)
            return self
        lock_path = self.folder / ".oarbench.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    owner = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
                finally:
                    os.close(fd)
                raise ValueError(
                    f"{self.folder}: another oarbench run is writing to this folder"
                    + (f" (process {owner})" if owner else "")
                    + "; wait for it to finish or choose another output folder"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._held[key] = (fd, 1)
        for stale in sorted(self.folder.rglob(f".*{PARTIAL_MARK}*"), reverse=True):
            if stale.is_dir() and not stale.is_symlink():
                import shutil

                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.folder is None:
            return
        fd, count = self._held[self._key]
        if count > 1:
            self._held[self._key] = (fd, count - 1)
            return
        del self._held[self._key]
        lock_path = self.folder / ".oarbench.lock"
        # A run that stopped before writing anything leaves no folder behind.
        if self._created and [p.name for p in self.folder.iterdir()] == [lock_path.name]:
            lock_path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.folder.rmdir()
        os.close(fd)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _grid_differences(a: Volume, b: Volume) -> list[str]:
    diffs = []
    if a.array.shape != b.array.shape:
        diffs.append(f"size {tuple(reversed(a.array.shape))} vs {tuple(reversed(b.array.shape))}")
        return diffs
    sa, sb = np.asarray(a.spacing), np.asarray(b.spacing)
    if not np.allclose(sa, sb, rtol=SPACING_RTOL, atol=0.0):
        diffs.append(f"spacing {tuple(reversed(a.spacing))} vs {tuple(reversed(b.spacing))} mm")
    if not np.allclose(a.origin, b.origin, rtol=0.0, atol=ORIGIN_ATOL_MM):
        diffs.append(f"origin {a.origin} vs {b.origin} mm")
    if not np.allclose(a.direction, b.direction, rtol=0.0, atol=DIRECTION_ATOL):
        diffs.append(f"direction {a.direction} vs {b.direction}")
    return diffs


def same_grid(a: Volume, b: Volume) -> bool:
    """True when size, spacing, origin and direction agree within the tolerances."""
    return not _grid_differences(a, b)


def check_same_grid(a: Volume, b: Volume, name_a: str | Path, name_b: str | Path) -> None:
    """Raise ValueError naming both files when the grids differ."""
    diffs = _grid_differences(a, b)
    if diffs:
        raise ValueError(
            f"{name_b} is not on the grid of {name_a}: {'; '.join(diffs)} "
            "(use --resample-prediction to resample it onto the reference grid)"
        )


def resample_nearest(moving: Volume, target: Volume) -> Volume:
    """Resample a label volume onto ``target``'s grid by nearest neighbour (background 0)."""
    resampled = sitk.Resample(
        moving.to_image(),
        target.to_image(),
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        0,
        moving.to_image().GetPixelID(),
    )
    return Volume.from_image(resampled)


def hash_files(paths: Iterable[str | Path]) -> dict[str, str]:
    """sha256 of each file, keyed by its path as given."""
    return {str(p): sha256_file(p) for p in paths}
