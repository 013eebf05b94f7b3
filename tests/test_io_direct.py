"""``read_volume`` reads a 3D scalar NIfTI image in one decompression (oarbench.io._read_nifti_direct):
the same voxels, voxel type and geometry as SimpleITK's ``ReadImage``, on every voxel type,
and orientation, from .nii and .nii.gz; everything else goes to SimpleITK's reader.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from oarbench import io
from oarbench.io import Volume, read_volume

DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64, np.float32, np.float64]


def _sitk(path: Path) -> Volume:
    return Volume.from_image(sitk.ReadImage(str(path)))


def _same(a: Volume, b: Volume) -> None:
    assert a.array.dtype == b.array.dtype
    assert a.array.shape == b.array.shape
    np.testing.assert_array_equal(a.array, b.array)
    assert a.spacing == b.spacing and a.origin == b.origin and a.direction == b.direction


def _direct_used(monkeypatch) -> list:
    used = []
    real = io._read_nifti_direct

    def spy(path):
        out = real(path)
        used.append(out is not None)
        return out

    monkeypatch.setattr(io, "_read_nifti_direct", spy)
    return used


def _random_direction(rng) -> tuple[float, ...]:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return tuple(float(v) for v in q.ravel())


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_reading_equals_simpleitk(tmp_path, monkeypatch, dtype, suffix):
    rng = np.random.default_rng(hash((np.dtype(dtype).str, suffix)) % 2**32)
    shape = (5, 7, 9)
    if np.dtype(dtype).kind == "f":
        arr = rng.normal(size=shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape, endpoint=True).astype(dtype)
    for k, direction in enumerate([(1.0, 0, 0, 0, 1, 0, 0, 0, 1), (-1.0, 0, 0, 0, -1, 0, 0, 0, 1),
                                   (0, 1.0, 0, 0, 0, 1, 1, 0, 0), _random_direction(rng)]):
        image = sitk.GetImageFromArray(arr)
        image.SetSpacing(tuple(float(v) for v in rng.uniform(0.3, 4.0, size=3)))
        image.SetOrigin(tuple(float(v) for v in rng.uniform(-300, 300, size=3)))
        image.SetDirection(direction)
        path = tmp_path / f"img{k}{suffix}"
        sitk.WriteImage(image, str(path))
        used = _direct_used(monkeypatch)
        ours = read_volume(path)
        assert used == [True]
        _same(ours, _sitk(path))


def _set_scaling(path: Path, slope: float, inter: float) -> None:
    data = gzip.decompress(path.read_bytes())
    data = data[:112] + struct.pack("<ff", slope, inter) + data[120:]
    path.write_bytes(gzip.compress(data))


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_scaled_voxels_go_to_simpleitk(tmp_path, monkeypatch, dtype):
    arr = np.arange(60, dtype=dtype).reshape(3, 4, 5)
    path = tmp_path / "scaled.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    _set_scaling(path, 2.0, 10.0)
    used = _direct_used(monkeypatch)
    ours = read_volume(path)
    assert used == [False]
    theirs = _sitk(path)
    _same(ours, theirs)
    np.testing.assert_allclose(theirs.array, arr * 2.0 + 10.0)  # SimpleITK applied the scaling


def test_2d_and_other_formats_go_to_simpleitk(tmp_path, monkeypatch):
    used = _direct_used(monkeypatch)
    two = tmp_path / "two.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(12, dtype=np.uint8).reshape(3, 4)), str(two))
    mha = tmp_path / "three.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(24, dtype=np.uint8).reshape(2, 3, 4)), str(mha))
    for path in (two, mha):
        _same(read_volume(path), _sitk(path))
    assert used == [False, False]


def test_big_endian_and_nifti2_go_to_simpleitk():
    # only little-endian NIfTI-1 headers take the direct path
    little = bytearray(348)
    struct.pack_into("<i", little, 0, 348)
    struct.pack_into("<8h", little, 40, 3, 4, 5, 6, 1, 1, 1, 1)
    struct.pack_into("<hh", little, 70, 2, 8)
    struct.pack_into("<ff", little, 112, 1.0, 0.0)
    assert io._direct_layout(bytes(little)) == (np.dtype("<u1"), (6, 5, 4))
    big = bytearray(348)
    struct.pack_into(">i", big, 0, 348)
    struct.pack_into(">8h", big, 40, 3, 4, 5, 6, 1, 1, 1, 1)
    struct.pack_into(">hh", big, 70, 2, 8)
    assert io._direct_layout(bytes(big)) is None
    two = bytearray(540)
    struct.pack_into("<i", two, 0, 540)
    assert io._direct_layout(bytes(two)) is None
    four = bytearray(little)
    struct.pack_into("<h", four, 40, 4)
    assert io._direct_layout(bytes(four)) is None


def test_damaged_files_are_still_refused_on_the_direct_path(tmp_path):
    arr = np.zeros((20, 40, 40), np.uint8)
    arr[2:18, 5:30, 5:30] = 1
    path = tmp_path / "cut.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="cannot read image"):
        read_volume(path)


def test_isal_and_gzip_read_the_same_voxels(tmp_path, monkeypatch):
    """ISA-L's inflate (the default where installed) and the standard gzip module give the same volume."""
    igzip = pytest.importorskip("isal.igzip")
    assert io._gzip_module() is igzip  # installed: the faster reader is the one used
    rng = np.random.default_rng(5)
    arr = rng.integers(0, 20, size=(30, 64, 64), dtype=np.uint8)
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path), useCompression=True)
    used = _direct_used(monkeypatch)
    fast = read_volume(path)
    monkeypatch.setattr(io, "_GZIP", gzip)
    plain = read_volume(path)
    assert used == [True, True]  # both readings decompressed the file themselves (not SimpleITK's fallback)
    _same(fast, plain)
    _same(fast, _sitk(path))
