"""RTSTRUCTs between oarbench and tools no one here wrote: rt-utils (this environment) and platipy
0.7.2 (its own environment, tests/_dicom_external.py), on real-shaped organs (the phantom anatomy)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pydicom")

from tests import _dicom_external as X  # noqa: E402
from oarbench.dicom.export import DEFAULT_CONTOUR, build_rtstruct, save_dataset  # noqa: E402
from oarbench.dicom.rtstruct import Grid, Roi, index_to_patient, rasterise  # noqa: E402
from oarbench.labels import DEFAULT_LABELS  # noqa: E402


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """One synthetic case on a scanner-centred square grid (origin -(n-1)/2 x spacing), as DICOM CT."""
    folder = tmp_path_factory.mktemp("fidelity")
    ct, labels = X.phantom_case()
    ct_dir, geometry = X.write_case(folder, ct)
    arr = np.asarray(labels.array)
    masks = {name: arr == value for value, name in DEFAULT_LABELS if np.any(arr == value)}
    assert len(masks) >= 15  # small organs (adrenals, oesophagus, cord) of a few dozen voxels included
    return {"folder": folder, "ct_dir": ct_dir, "geometry": geometry, "labels": labels, "masks": masks}


def _exact(read: dict, masks: dict) -> dict:
    """Structures whose mask came back with any voxel different, with their DSC."""
    assert set(read) >= set(masks)
    return {k: round(X.dice(read[k], m), 4) for k, m in masks.items() if not np.array_equal(read[k], m)}


def test_rectangle_with_corners_on_voxel_centres_after_decimal_round_off():
    # 512 x 0.9765625 mm (500 mm field of view): origin -249.51171875; a 21 x 11 voxel rectangle whose
    # corners are voxel centres, ContourData rounded to 6 decimals: 21 * 11 = 231 centres on or inside
    for origin in (-249.51171875, -250.0, 12.3456789):
        grid = Grid((1, 512, 512), (3.0, 0.9765625, 0.9765625), (origin, origin, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        corners = np.array([[100, 200, 0], [120, 200, 0], [120, 210, 0], [100, 210, 0]], float)
        pts = np.round(index_to_patient(corners, grid), 6)
        mask = rasterise(Roi(1, "R", "", (("CLOSED_PLANAR", pts),)), grid)
        rows, cols = np.divmod(mask.indices, 512)
        assert mask.indices.size == 231, origin
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (200, 210, 100, 120)


def test_rtutils_written_rtstructs_import_exactly(case):
    path = X.rtutils_write(case["ct_dir"], case["masks"], case["folder"] / "rtutils.dcm")
    assert _exact(X.own_read(case["geometry"], path), case["masks"]) == {}


def test_platipy_written_rtstructs_import_exactly(case):
    py = X.require_platipy()
    path = X.platipy_write(case["ct_dir"], case["masks"], case["folder"] / "platipy.dcm", py)
    assert _exact(X.own_read(case["geometry"], path), case["masks"]) == {}


@pytest.mark.parametrize("contour", ["edges", "centres"])
def test_exported_rtstruct_read_back_by_each_reader(case, contour):
    ds = build_rtstruct(case["labels"], case["geometry"], DEFAULT_LABELS, contour=contour)
    path = save_dataset(ds, case["folder"] / f"oarbench_{contour}.dcm")
    masks = case["masks"]
    assert ds.StructureSetROISequence[0].ROIGenerationDescription == {
        "edges": "oarbench: polygons along the voxel edges",
        "centres": "oarbench: polygons through the boundary voxel centres"}[contour]
    assert _exact(X.own_read(case["geometry"], path), masks) == {}
    rtutils = X.rtutils_read(case["ct_dir"], path)
    strict = X.strict_centre_read(case["geometry"], path)
    area = X.polygon_area_ratio(case["geometry"], path, masks)
    if contour == "edges":
        # a planning system's view: centre strictly inside, volume from the polygon area
        assert _exact(strict, masks) == {}
        assert all(abs(v - 1) < 1e-6 for v in area.values()), area
        # rt-utils rounds the vertices (half-way between voxel centres) to indices: one ring too large
        assert all(rtutils[k].sum() > m.sum() for k, m in masks.items())
    else:
        assert _exact(rtutils, masks) == {}
        assert all(v < 1 for v in area.values()), area
        assert all(X.dice(strict[k], m) < 1 for k, m in masks.items())


def test_exported_rtstruct_read_back_by_platipy(case):
    py = X.require_platipy()
    masks = case["masks"]
    for contour in ("edges", "centres"):
        ds = build_rtstruct(case["labels"], case["geometry"], DEFAULT_LABELS, contour=contour)
        path = save_dataset(ds, case["folder"] / f"oarbench_{contour}_p.dcm")
        read = X.platipy_read(case["ct_dir"], path, py, case["folder"])
        read = {k.replace("_", " ") if k not in masks else k: v for k, v in read.items()}
        if contour == "centres":
            # exact except around holes (platipy XORs filled polygons, boundary included, so the voxels
            # a hole contour runs through are removed): here the vertebrae around the spinal canal
            wrong = _exact(read, masks)
            assert set(wrong) <= {"Vertebrae", "Liver", "Bowel", "Lung_L", "Lung_R"}, wrong
            assert min(X.dice(read[k], m) for k, m in masks.items()) >= 0.8
        else:
            assert all(read[k].sum() > m.sum() for k, m in masks.items())


def test_default_contour_convention_is_edges():
    assert DEFAULT_CONTOUR == "edges"


@pytest.mark.parametrize("decimals", [2, 3, 6])
def test_rectangle_read_from_a_file_with_few_decimals(tmp_path, decimals):
    # a 21 x 11 rectangle with corners on voxel centres, its ContourData written with 2, 3 or 6
    # decimals, placed where the rounding moves its left side inwards the most; with 2 decimals that
    # is beyond the fixed snap tolerance (1e-3 voxel): the snap follows the strings' round-off
    import pydicom

    from oarbench.dicom.ct import read_geometry
    from oarbench.dicom.rtstruct import read_rtstruct
    from tests._dicom import ct_series, rtstruct

    o, px = -249.51171875, 0.9765625
    s = ct_series(tmp_path / "ct", rows=512, cols=512, pixel_spacing=(px, px),
                  positions=[(o, o, 3.0 * k) for k in range(2)], pixels=np.zeros((2, 512, 512)))
    geo = read_geometry(s["series"], s["paths"])
    grid = Grid(geo.shape_zyx, geo.spacing_zyx, geo.origin, geo.direction)

    # the left side where its rounding moves it inwards the most
    c0 = max(range(0, 480), key=lambda k: round(o + k * px, decimals) - (o + k * px))
    r0 = 200
    shift = (round(o + c0 * px, decimals) - (o + c0 * px)) / px  # voxels
    assert shift > (1e-3 if decimals == 2 else 0)
    corners = index_to_patient(np.array([[c0, r0, 0], [c0 + 20, r0, 0], [c0 + 20, r0 + 10, 0],
                                         [c0, r0 + 10, 0]], float), grid)
    path = rtstruct(tmp_path / "rs.dcm", s, {"R": [corners]})
    ds = pydicom.dcmread(path)
    ds.ROIContourSequence[0].ContourSequence[0].ContourData = [f"{v:.{decimals}f}" for v in corners.ravel()]
    ds.save_as(path)
    roi = read_rtstruct(path)[0][0]
    assert rasterise(roi, grid, path).indices.size == 231
    # the same numbers without their strings: only the fixed tolerance (1e-3 voxel)
    bare = Roi(1, "R", "", roi.contours)
    expected = 231 if decimals >= 3 else 220  # 2 decimals: the left column (11 centres) falls outside
    assert rasterise(bare, grid, path).indices.size == expected


def test_centres_on_the_polygon_match_an_exact_integer_oracle(rng):
    # random polygons with whole-index vertices, some beyond the image, some edges axis-parallel
    # with fractional ends: every voxel centre on an edge between two voxel centres or on an
    # axis-parallel edge at a whole index (exact integer cross products here) is found, and no other
    from oarbench.dicom.rtstruct import _on_boundary

    ny, nx = 13, 17
    for _ in range(60):
        n = int(rng.integers(1, 7))
        x = rng.integers(-4, nx + 4, n).astype(float)
        y = rng.integers(-4, ny + 4, n).astype(float)
        if rng.random() < 0.3:  # an axis-parallel edge whose ends are not voxel centres
            x = np.append(x, [x[-1], x[-1]])
            y = np.append(y, [y[-1] + 0.4, y[-1] + 5.7])
        rows, cols = _on_boundary(x, y, nx, ny)
        got = set(zip(rows.tolist(), cols.tolist()))
        want = set()
        for i in range(len(x)):
            ax, ay, bx, by = x[i], y[i], x[(i + 1) % len(x)], y[(i + 1) % len(x)]
            lattice = all(v == round(v) for v in (ax, ay, bx, by))
            if not (lattice or (ax == bx and ax == round(ax)) or (ay == by and ay == round(ay))):
                continue  # the documented scope: ends on voxel centres, or axis-parallel at a whole index
            for r in range(ny):
                for c in range(nx):
                    # exact: the coordinates are whole or tenths, so scale by 10 to integers
                    pax, pay, pbx, pby = (round(10 * v) for v in (ax - c, ay - r, bx - c, by - r))
                    if pax * pby - pay * pbx == 0 and min(pax, pbx) <= 0 <= max(pax, pbx) \
                            and min(pay, pby) <= 0 <= max(pay, pby):
                        want.add((r, c))
        assert got == want
