"""Other tools' RTSTRUCT writers and readers, for the fidelity tests and benchmarks/bench_dicom_fidelity.py.

* rt-utils (pinned in constraints.txt) runs in this environment;
* platipy 0.7.2 pins pydicom 2, so it runs in its own virtual environment through
  ``tests/_platipy_tool.py``, found by ``tests/_platipy.py`` (``OARBENCH_PLATIPY_PYTHON``, else
  ``<repo>/.venv-platipy``, built by ``.ci/run`` from ``tests/platipy-requirements.txt``).

Masks here are bool arrays (z, y, x) on the CT grid, z along the slice normal.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from tests._platipy import PLATIPY_VERSION, platipy_python, require_platipy  # noqa: F401 - one finder

REPO = Path(__file__).resolve().parent.parent
TOOL = Path(__file__).resolve().parent / "_platipy_tool.py"



def _platipy(mode: str, ct_dir: Path, src: Path, dst: Path, python: Path) -> None:
    res = subprocess.run([str(python), str(TOOL), mode, str(ct_dir), str(src), str(dst)], capture_output=True,
                         text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"platipy {mode} failed: {res.stderr[-2000:]}")


def platipy_write(ct_dir: Path, masks: dict[str, np.ndarray], out: Path, python: Path) -> Path:
    npz = out.with_suffix(".masks.npz")
    np.savez_compressed(npz, **{k: np.asarray(v, bool) for k, v in masks.items()})
    _platipy("write", ct_dir, npz, out, python)
    return out


def platipy_read(ct_dir: Path, rtstruct: Path, python: Path, scratch: Path) -> dict[str, np.ndarray]:
    npz = scratch / f"{rtstruct.stem}.platipy.npz"
    _platipy("read", ct_dir, rtstruct, npz, python)
    with np.load(npz) as data:
        return {k: data[k] for k in data.files}


def rtutils_write(ct_dir: Path, masks: dict[str, np.ndarray], out: Path) -> Path:
    from rt_utils import RTStructBuilder

    rs = RTStructBuilder.create_new(dicom_series_path=str(ct_dir))
    for name, mask in masks.items():
        rs.add_roi(mask=np.transpose(np.asarray(mask, bool), (1, 2, 0)), name=name)
    rs.save(str(out))
    return out


def rtutils_read(ct_dir: Path, rtstruct: Path) -> dict[str, np.ndarray]:
    """rt-utils 1.2.7's reader (its masks are (rows, columns, slices) only for square images: it
    allocates (Columns, Rows) and fills (x, y), so the fidelity cases use square slices)."""
    from rt_utils import RTStructBuilder

    rs = RTStructBuilder.create_from(dicom_series_path=str(ct_dir), rt_struct_path=str(rtstruct))
    return {name: np.transpose(rs.get_roi_mask_by_name(name), (2, 0, 1)).astype(bool) for name in rs.get_roi_names()}


def phantom_case(size_xyz=(96, 96, 20), spacing_xyz=(3.90625, 3.90625, 8.0), age: float = 8.0, seed: int = 7):
    """CT and labels (oarbench Volumes) of one synthetic case (the anatomy of oarbench.phantoms:
    real-shaped organs) on a grid centred like a scanner's: origin -(n - 1) / 2 x spacing, which
    for 512 x 0.9765625 mm is -249.51171875 mm."""
    from oarbench.phantoms import CentreProtocol, draw_cases, load_demo_config, render_case

    config = load_demo_config()
    spec = replace(draw_cases(config.phantoms)[0], age=age, position="supine")
    centre = CentreProtocol("A", 901, tuple(size_xyz), tuple(spacing_xyz))
    return render_case(spec, centre, seed)


def write_case(folder: Path, ct, seed: str = "fidelity") -> tuple[Path, object]:
    """Write the CT as a DICOM series under folder/CT; returns (ct_dir, SeriesGeometry)."""
    from oarbench.dicom.ct import read_geometry
    from oarbench.dicom.export import new_uid, write_ct_series

    header = {"PatientName": "Fidelity^Test", "PatientID": "FID1", "StudyInstanceUID": new_uid(seed, "study"),
              "SeriesInstanceUID": new_uid(seed, "series"), "FrameOfReferenceUID": new_uid(seed, "frame"),
              "PatientSex": "O", "PatientAge": "008Y", "PatientPosition": "HFS", "StudyID": "1",
              "BodyPartExamined": "ABDOMEN"}
    paths = write_ct_series(ct, folder / "CT", header, uid_seed=seed)
    return folder / "CT", read_geometry(header["SeriesInstanceUID"], paths)


def own_read(geometry, rtstruct: Path) -> dict[str, np.ndarray]:
    """oarbench's reader: every ROI rasterised on the CT grid."""
    from oarbench.dicom.rtstruct import Grid, rasterise, read_rtstruct

    grid = Grid(geometry.shape_zyx, geometry.spacing_zyx, geometry.origin, geometry.direction)
    out = {}
    for roi in read_rtstruct(rtstruct)[0]:
        m = np.zeros(int(np.prod(grid.shape)), bool)
        m[rasterise(roi, grid, rtstruct).indices] = True
        out[roi.name] = m.reshape(grid.shape)
    return out


def strict_centre_read(geometry, rtstruct: Path) -> dict[str, np.ndarray]:
    """A reader that keeps a voxel when its centre is strictly inside the polygons (even-odd) with no
    tolerance: matplotlib's Path.contains_points on the raw vertices, the test of dicompyler-core's
    dose-volume code and the rule the rt-utils voxel-edge contour mode names for planning systems."""
    from matplotlib.path import Path as MplPath

    from oarbench.dicom.rtstruct import Grid, patient_to_index, read_rtstruct

    grid = Grid(geometry.shape_zyx, geometry.spacing_zyx, geometry.origin, geometry.direction)
    nz, ny, nx = grid.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    centres = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)
    out = {}
    for roi in read_rtstruct(rtstruct)[0]:
        m = np.zeros(grid.shape, bool)
        for _kind, pts in roi.contours:
            if len(pts) < 3:
                continue
            idx = patient_to_index(pts, grid)
            z = int(np.rint(idx[0, 2]))
            m[z] ^= MplPath(idx[:, :2]).contains_points(centres).reshape(ny, nx)
        out[roi.name] = m
    return out


def polygon_area_ratio(geometry, rtstruct: Path, masks: dict[str, np.ndarray]) -> dict[str, float]:
    """Per ROI: the net polygon area (signed shoelace areas summed: the tracers of oarbench,
    rt-utils and platipy orient hole contours against outer ones) over the voxel area of its mask."""
    from oarbench.dicom.rtstruct import Grid, patient_to_index, read_rtstruct

    grid = Grid(geometry.shape_zyx, geometry.spacing_zyx, geometry.origin, geometry.direction)
    out = {}
    for roi in read_rtstruct(rtstruct)[0]:
        total = 0.0
        for _kind, pts in roi.contours:
            idx = patient_to_index(pts, grid)
            x, y = idx[:, 0], idx[:, 1]
            total += 0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        out[roi.name] = abs(total) / max(int(np.count_nonzero(masks[roi.name])), 1)
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.count_nonzero(a & b)) / s


if __name__ == "__main__":  # pragma: no cover
    sys.exit("imported by the tests and benchmarks/bench_dicom_fidelity.py; not a script")
