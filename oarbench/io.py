"""Image input/output with SimpleITK, grid checks and case discovery.

Arrays follow SimpleITK's ``GetArrayFromImage`` order (z, y, x); ``Volume.spacing``
is given in the same order, in mm (the reverse of ``image.GetSpacing()``), while
``origin`` and ``direction`` stay in SimpleITK's physical (x, y, z) convention.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import SimpleITK as sitk

__all__ = [
    "Volume",
    "read_volume",
    "write_volume",
    "same_grid",
    "check_same_grid",
    "resample_nearest",
    "find_cases",
    "case_id",
    "IMAGE_SUFFIXES",
    "atomic_write_bytes",
    "atomic_write_text",
    "sha256_file",
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


def find_cases(folder: str | Path, *, images: bool = False) -> dict[str, Path]:
    """Map case id -> file for every image in ``folder`` (not recursive).

    ``images=True`` reads an nnU-Net image folder: ``CASE_0000.nii.gz`` is case
    ``CASE``; further channels (``_0001``, ...) are not oarbench's business and
    are left out. Raises ValueError when the folder does not exist, holds no
    images, or two files claim the same case id.

    ``folder`` may be an fsspec URL (``s3://bucket/study/labelsTs``); the
    values are then URL strings (:mod:`oarbench.storage`).
    """
    from oarbench import storage

    folder = storage.as_location(folder)  # type: ignore[assignment]
    if not storage.is_dir(folder):
        raise ValueError(f"{folder}: folder not found")
    cases: dict[str, Path] = {}
    for path in storage.list_files(folder):
        fname = storage.name(path)
        stem = case_id(fname)
        if stem is None:
            continue
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


def read_volume(path: str | Path, *, allow_4d: bool = False) -> Volume:
    """Read an image file into a :class:`Volume`.

    Raises ValueError naming the file when it is missing, unreadable, corrupt, or
    not 2D/3D. ``path`` may be an fsspec URL: the file is copied to a temporary
    local file and read from there.
    """
    from oarbench import storage

    if storage.is_remote(path):
        if not storage.is_file(str(path)):
            raise ValueError(f"{path}: file not found")
        with storage.local_copy(str(path)) as local:
            try:
                return read_volume(local, allow_4d=allow_4d)
            except ValueError as exc:
                raise ValueError(str(exc).replace(str(local), str(path))) from None
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
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
    return Volume.from_image(image)


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".partial{suffix}", dir=path.parent)
    # mkstemp creates 0600; give the final file the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (fd, temporary path) in ``path``'s folder; rename onto ``path`` when the
    block succeeds, remove the temporary file when it fails."""
    fd, tmp = _atomic_target(path)
    try:
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_volume(volume: Volume, path: str | Path, *, compress: bool = True) -> Path:
    """Write atomically: to a temporary file in the same folder, then rename."""
    path = Path(path)
    with _atomic(path) as (fd, tmp):
        os.close(fd)
        sitk.WriteImage(volume.to_image(), tmp, useCompression=compress)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    with _atomic(path) as (fd, _tmp):
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


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
