"""DICOM RT import and export: CT geometry, contour rasterisation, names, the nnU-Net dataset, the round trip.

DICOM objects are built in the tests with pydicom (tests/_dicom.py), or written from the
synthetic phantoms. Expected values are derived by hand in each test.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")
pytest.importorskip("skimage")

from click.testing import CliRunner  # noqa: E402

from oarbench.cli import main  # noqa: E402
from oarbench.dicom.ct import read_ct, read_geometry  # noqa: E402
from oarbench.dicom.importer import ImportOptions, age_years, import_dicom, position_of  # noqa: E402
from oarbench.dicom.names import NameResolver, clinical_name, load_aliases  # noqa: E402
from oarbench.dicom.rtstruct import Grid, Roi, rasterise, trace_mask  # noqa: E402
from oarbench.labels import DEFAULT_LABELS, LabelMap  # noqa: E402
from tests._dicom import circle, ct_series, rtstruct, square  # noqa: E402

def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- CT series


def test_ct_sorted_along_normal_with_exact_geometry_and_hu(tmp_path):
    # Coronal slices: rows along +x, columns along -z, so the normal is row x column = +y.
    row, col = (1.0, 0.0, 0.0), (0.0, 0.0, -1.0)
    positions = [(5.0, y, 40.0) for y in (17.5, 10.0, 15.0, 12.5)]  # shuffled, 2.5 mm apart along +y
    s = ct_series(tmp_path / "ct", row_dir=row, col_dir=col, positions=positions, slope=2.0, intercept=-1000.0,
                  names=["d.dcm", "a.dcm", "c.dcm", "b.dcm"])
    geo = read_geometry(s["series"], s["paths"])
    ct = read_ct(geo)
    assert ct.array.shape == (4, 6, 8)
    assert ct.spacing == pytest.approx((2.5, 1.5, 1.0))
    assert ct.origin == pytest.approx((5.0, 10.0, 40.0))  # the first slice along +y
    # columns of the direction: row, column, normal
    assert np.asarray(ct.direction).reshape(3, 3) == pytest.approx(np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]]))
    # file k holds 10 k + column; sorted order along +y is files 1, 3, 2, 0; HU = 2 * stored - 1000
    for z, k in enumerate((1, 3, 2, 0)):
        assert ct.array[z, 0, :].tolist() == [2 * (10 * k + c) - 1000 for c in range(8)]


def test_files_without_preamble_are_read(tmp_path):
    s = ct_series(tmp_path / "in" / "ct", bare=True, names=["IM1", "IM2", "IM3", "IM4"])
    assert s["paths"][0].read_bytes()[:2] == b"\x08\x00"  # no preamble, no DICM
    rtstruct(tmp_path / "in" / "rs.dcm", s, {"Lever": [square(10.5, -19.5, 14.5, -16.5, 32.5)]})
    res = import_dicom(tmp_path / "in", tmp_path / "out", ImportOptions(DEFAULT_LABELS))
    assert res.rows[0]["voxels"] == 8


def test_ct_fractional_rescale_gives_float(tmp_path):
    s = ct_series(tmp_path / "ct", slope=0.5, intercept=-1024.0)
    ct = read_ct(read_geometry(s["series"], s["paths"]))
    assert ct.array.dtype == np.float32
    assert float(ct.array[0, 0, 3]) == 0.5 * 3 - 1024


def test_ct_gantry_tilt_is_refused(tmp_path):
    s = ct_series(tmp_path / "ct", tilt=12.0)
    with pytest.raises(ValueError, match=r"gantry tilt 12\.0") as err:
        read_geometry(s["series"], s["paths"])
    assert str(tmp_path / "ct") in str(err.value)


def test_ct_sheared_positions_are_refused_as_tilt(tmp_path):
    positions = [(0.0, 0.4 * k, 2.5 * k) for k in range(4)]  # slices move along y too: a tilted stack
    s = ct_series(tmp_path / "ct", positions=positions)
    with pytest.raises(ValueError, match="gantry tilt or a sheared series") as err:
        read_geometry(s["series"], s["paths"])
    assert s["series"] in str(err.value)


def test_ct_missing_slice_names_the_gap(tmp_path):
    positions = [(0.0, 0.0, z) for z in (0.0, 2.5, 7.5, 10.0)]  # the slice at 5.0 is missing
    s = ct_series(tmp_path / "ct", positions=positions, names=["s0.dcm", "s1.dcm", "s3.dcm", "s4.dcm"])
    with pytest.raises(ValueError, match=r"gap of 5\.000 mm between s1\.dcm \(at 2\.50 mm\) and s3\.dcm") as err:
        read_geometry(s["series"], s["paths"])
    assert "1 slice(s) missing" in str(err.value) and s["series"] in str(err.value)


def test_ct_unequal_spacing_is_refused(tmp_path):
    positions = [(0.0, 0.0, z) for z in (0.0, 2.5, 5.0, 8.0, 10.5)]
    s = ct_series(tmp_path / "ct", positions=positions)
    with pytest.raises(ValueError, match=r"unequal slice spacing: gap of 3\.000 mm"):
        read_geometry(s["series"], s["paths"])


def test_ct_mixed_sizes_are_refused(tmp_path):
    s = ct_series(tmp_path / "ct", sizes=[(6, 8), (6, 8), (6, 10), (6, 8)], names=["a.dcm", "b.dcm", "c.dcm", "d.dcm"])
    with pytest.raises(ValueError, match=r"mixed image sizes .* a\.dcm is 8x6 and c\.dcm is 10x6"):
        read_geometry(s["series"], s["paths"])


def test_non_ct_modality_is_refused_by_the_import(tmp_path):
    s = ct_series(tmp_path / "in" / "mr", modality="MR")
    rtstruct(tmp_path / "in" / "rs.dcm", s, {"Liver": [square(10, -20, 14, -16, 30.0)]})
    with pytest.raises(ValueError, match=r"modality MR in .*; only CT is imported"):
        import_dicom(tmp_path / "in", tmp_path / "out", ImportOptions(DEFAULT_LABELS))


def test_cli_error_is_one_clean_line(tmp_path):
    s = ct_series(tmp_path / "in" / "ct", tilt=5.0)
    rtstruct(tmp_path / "in" / "rs.dcm", s, {"Liver": [square(10, -20, 14, -16, 30.0)]})
    res = CliRunner().invoke(main, ["dicom", "import", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                                    "--no-progress"])
    assert res.exit_code == 1
    assert "gantry tilt 5.0" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out" / "imagesTr").exists()  # checked before anything is written


# --------------------------------------------------------------------------- contours -> voxels

_EYE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _area_mm2(polys, px: float, n: int) -> float:
    grid = Grid((1, n, n), (2.0, px, px), (0.0, 0.0, 0.0), _EYE)
    mask = rasterise(Roi(1, "r", "", tuple(("CLOSED_PLANAR", p) for p in polys)), grid)
    return mask.indices.size * px * px


@pytest.mark.parametrize("px,radius,tol", [(1.0, 10.0, 0.02), (1.0, 20.0, 0.01), (3.0, 30.0, 0.02),
                                           (3.0, 60.0, 0.01)])
def test_disc_area_matches_pi_r_squared(px, radius, tol, rng):
    """A disc of radius r (720-gon, area deficit (2 pi / 720)^2 / 6 < 1e-5) anywhere on the pixel grid:
    the counted pixel centres give pi r^2 within ``tol`` (docs/dicom.md: 2 % at r >= 10 pixels, 1 % at
    r >= 20 pixels), and on average over random placements within 0.3 %."""
    n = int(2 * radius / px) + 8
    errors = []
    for _ in range(40):
        c = (n * px / 2) + rng.random(2) * px
        area = _area_mm2([circle(c[0], c[1], radius, 0.0)], px, n)
        errors.append(area / (math.pi * radius**2) - 1)
    errors = np.asarray(errors)
    assert np.max(np.abs(errors)) <= tol
    assert abs(errors.mean()) <= 0.003


def test_inclusion_matches_a_brute_force_point_in_polygon_oracle(rng):
    """Random star-shaped polygons on an oblique, anisotropic grid: the voxels equal matplotlib's
    point-in-polygon test on every voxel centre, transformed to the contour's plane by hand
    (centres within 1e-6 mm of an edge, where the two may differ, are left out)."""
    from matplotlib.path import Path as MplPath

    c, s_ = math.cos(0.4), math.sin(0.4)
    rot = np.array([[c, -s_, 0.0], [s_, c, 0.0], [0.0, 0.0, 1.0]])
    grid = Grid((3, 23, 31), (2.5, 1.7, 0.9), (-4.0, 6.0, 11.0), tuple(rot.ravel()))
    zz, yy, xx = np.indices(grid.shape)
    centres = np.asarray(grid.origin) + (np.column_stack([xx.ravel(), yy.ravel(), zz.ravel()])
                                         * grid.spacing_xyz) @ rot.T
    for _ in range(10):
        k = int(rng.integers(0, 3))
        t = np.sort(rng.random(9)) * 2 * np.pi
        r = 4 + 10 * rng.random(9)
        centre_idx = np.array([15.0, 11.0, k]) + rng.random(3) * [1, 1, 0]
        centre = np.asarray(grid.origin) + (centre_idx * grid.spacing_xyz) @ rot.T
        in_plane = np.column_stack([r * np.cos(t), r * np.sin(t), np.zeros(9)])
        poly = centre + in_plane @ rot.T  # a polygon in the plane of slice k
        mask = rasterise(Roi(1, "p", "", (("CLOSED_PLANAR", poly),)), grid)
        got = np.zeros(int(np.prod(grid.shape)), bool)
        got[mask.indices] = True
        local = (centres - centre) @ rot  # voxel centres in the polygon's in-plane frame
        on_slice = zz.ravel() == k
        path = MplPath(in_plane[:, :2], closed=False)
        inside = path.contains_points(local[:, :2]) & on_slice
        a, b = in_plane[:, :2], np.roll(in_plane[:, :2], -1, axis=0)
        d = b - a
        tpar = np.clip(np.einsum("nij,ij->ni", local[:, None, :2] - a, d) / np.einsum("ij,ij->i", d, d), 0, 1)
        dist = np.linalg.norm(local[:, None, :2] - (a + tpar[..., None] * d), axis=2).min(axis=1)
        clear = dist > 1e-6
        assert np.array_equal(got[clear], inside[clear])
        assert inside.sum() > 10


def test_holes_and_islands_by_even_odd():
    # 1 mm pixels; a 20x20 square with a 10x10 hole holding a 4x4 island, plus a separate 3x3 square.
    # Pixel centres at integers; squares drawn on half-integers hold exactly (side) x (side) centres.
    polys = [square(4.5, 4.5, 24.5, 24.5, 0), square(9.5, 9.5, 19.5, 19.5, 0), square(12.5, 12.5, 16.5, 16.5, 0),
             square(30.5, 30.5, 33.5, 33.5, 0)]
    assert _area_mm2(polys, 1.0, 40) == 400 - 100 + 16 + 9


def test_boundary_centres_count_as_inside():
    # vertices on pixel centres 2..5: the rule counts centres on the boundary, so 4 x 4 pixels
    assert _area_mm2([square(2, 2, 5, 5, 0)], 1.0, 10) == 16


def test_off_image_points_are_counted_and_clipped():
    grid = Grid((1, 10, 10), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), _EYE)
    # square from -5.5 to 4.5: two corners (x = -5.5) and one more (y = -5.5) lie off the image (x, y < -0.5)
    poly = square(-5.5, -5.5, 4.5, 4.5, 0)
    m = rasterise(Roi(1, "r", "", (("CLOSED_PLANAR", poly),)), grid)
    assert m.points_off_image == 3  # (-5.5,-5.5), (4.5,-5.5), (-5.5,4.5); only (4.5, 4.5) is on the image
    assert m.indices.size == 5 * 5  # centres 0..4 in x and y


def test_contour_between_slices_is_an_error_before_anything_is_written(tmp_path):
    good = ct_series(tmp_path / "in" / "good")
    rtstruct(tmp_path / "in" / "good.dcm", good, {"Liver": [square(10.5, -19.5, 14.5, -16.5, 32.5)]})
    s = ct_series(tmp_path / "in" / "ct")  # slices at z = 30, 32.5, 35, 37.5
    rtstruct(tmp_path / "in" / "rs.dcm", s, {"Liver": [square(10.5, -19.5, 14.5, -16.5, 31.25)]})
    with pytest.raises(ValueError, match=r"rs\.dcm: ROI 'Liver' contour 1 lies on a plane that matches no CT slice"):
        import_dicom(tmp_path / "in", tmp_path / "out", ImportOptions(DEFAULT_LABELS))
    assert not (tmp_path / "out" / "imagesTr").exists()  # the good pair was not converted either


@pytest.mark.parametrize("convention", ["edges", "centres"])
@pytest.mark.parametrize("opened", [True, False])
def test_rotated_grid_trace_and_fill_give_back_the_mask(rng, convention, opened):
    # unopened random masks hold lone voxels, one-voxel lines, diagonal contacts and holes
    from scipy import ndimage

    c, s_ = math.cos(0.5), math.sin(0.5)
    rot = np.array([[c, -s_, 0], [s_ * 0.6, c * 0.6, -0.8], [s_ * 0.8, c * 0.8, 0.6]])
    grid = Grid((4, 21, 33), (3.0, 1.3, 0.7), (10.0, -5.0, 3.0), tuple(rot.ravel()))
    mask = rng.random(grid.shape) > 0.4
    if opened:
        mask = ndimage.binary_opening(mask)
    polys = trace_mask(mask, grid, convention)
    # as a file holds them: decimal strings of 6 decimals
    back = np.zeros(mask.size, bool)
    back[rasterise(Roi(1, "x", "", tuple(("CLOSED_PLANAR", np.round(p, 6)) for _, p in polys)), grid).indices] = True
    assert np.array_equal(back.reshape(mask.shape), mask)
    if convention == "edges":  # along the voxel edges: net polygon area = voxel area, slice by slice
        for z in range(grid.shape[0]):
            net = sum(0.5 * float(np.dot(q[:, 0], np.roll(q[:, 1], -1)) - np.dot(q[:, 1], np.roll(q[:, 0], -1)))
                      for q in (rtstruct_index(p, grid) for zz, p in polys if zz == z))
            assert abs(abs(net) - mask[z].sum()) < 1e-6


def rtstruct_index(points: np.ndarray, grid: Grid) -> np.ndarray:
    from oarbench.dicom.rtstruct import patient_to_index

    return patient_to_index(points, grid)[:, :2]


# --------------------------------------------------------------------------- overlaps, names, tables


def test_overlap_rule_smaller_structure_wins_and_volume_is_reported(tmp_path):
    s = ct_series(tmp_path / "in" / "ct", rows=20, cols=20, pixel_spacing=(1.0, 1.0),
                  positions=[(0.0, 0.0, 2.0 * k) for k in range(3)])
    # Liver: centres x, y in 0..9 (100 px); Spleen: x, y in 6..11 (36 px); shared: 6..9 -> 16 px, slice 1 only
    rtstruct(tmp_path / "in" / "rs.dcm", s, {"Liver": [square(-0.5, -0.5, 9.5, 9.5, 2.0)],
                                             "Spleen": [square(5.5, 5.5, 11.5, 11.5, 2.0)]})
    res = import_dicom(tmp_path / "in", tmp_path / "out", ImportOptions(DEFAULT_LABELS))
    rows = {r["roi_name"]: r for r in _rows(tmp_path / "out" / "import.csv")}
    voxel_ml = 2.0 * 1.0 * 1.0 / 1000
    assert float(rows["Liver"]["overlap_ml"]) == pytest.approx(16 * voxel_ml)
    assert float(rows["Liver"]["lost_ml"]) == pytest.approx(16 * voxel_ml)  # the smaller spleen keeps them
    assert float(rows["Spleen"]["lost_ml"]) == 0
    assert res.overlap_ml == pytest.approx(16 * voxel_ml)
    from oarbench.io import read_volume

    lab = read_volume(tmp_path / "out" / "labelsTr" / "case_0001.nii.gz").array
    assert np.count_nonzero(lab == 1) == 100 - 16 and np.count_nonzero(lab == 2) == 36


@pytest.mark.parametrize("name,expected", [
    ("Lever", "Liver"), ("Leber", "Liver"), ("Milt", "Spleen"), ("Milz", "Spleen"),
    ("Nier links", "Kidney_L"), ("Niere li.", "Kidney_L"), ("Niere re.", "Kidney_R"), ("Nier_R", "Kidney_R"),
    ("Bijnier rechts", "Glnd_Adrenal_R"), ("Nebenniere li", "Glnd_Adrenal_L"), ("Maag", "Stomach"),
    ("Magen", "Stomach"), ("Alvleesklier", "Pancreas"), ("Pankreas", "Pancreas"), ("Galblaas", "Gallbladder"),
    ("Gallenblase", "Gallbladder"), ("Slokdarm", "Esophagus"), ("Oesophagus", "Esophagus"),
    ("Ösophagus", "Esophagus"), ("Speiseröhre", "Esophagus"), ("Speiseroehre", "Esophagus"),
    ("Speiserohre", "Esophagus"), ("Ruggenmerg", "SpinalCord"), ("Myelon", "SpinalCord"),
    ("Rückenmark", "SpinalCord"), ("Rueckenmark", "SpinalCord"), ("Wervels", "Vertebrae"),
    ("Wirbelkörper", "Vertebrae"), ("Wirbelkoerper", "Vertebrae"), ("Darm", "Bowel"), ("Hart", "Heart"),
    ("Herz", "Heart"), ("Long links", "Lung_L"), ("Lunge re.", "Lung_R"), ("Vena cava inferior", "VenaCava_I"),
    ("L_Kidney", "Kidney_L"), ("IVC", "VenaCava_I"), ("Liver", "Liver"), ("Intestine", "Bowel"),
    ("Vena_Cava_Inferior", "VenaCava_I"), ("Vertebral Bodies", "Vertebrae"), ("Adrenal_Gland_R", "Glnd_Adrenal_R"),
    ("Lt Lung", "Lung_L"), ("untere Hohlvene", "VenaCava_I"), ("Twaalfvingerige darm", "Duodenum"),
    ("Zwölffingerdarm", "Duodenum"), ("Wervellichamen", "Vertebrae"), ("Bauchspeicheldruese", "Pancreas"),
    # side letters run into the organ, brackets, who drew it (auto / AI / KI), a leading z_, parts of the aorta
    ("RLung", "Lung_R"), ("LLung", "Lung_L"), ("RKidney", "Kidney_R"), ("Kidney (R)", "Kidney_R"),
    ("Liver_auto", "Liver"), ("Liver (AI)", "Liver"), ("z_Liver", "Liver"), ("Aorta_Abd", "A_Aorta"),
    ("Aorta descendens", "A_Aorta"), ("SpinalCanal", "SpinalCord"), ("Herz (KI)", "Heart"),
])
def test_clinical_spellings_resolve(name, expected):
    assert NameResolver(DEFAULT_LABELS).resolve(name).structure == expected


@pytest.mark.parametrize("name", ["Bowel_Small", "Small_Intestine", "Dünndarm", "Dunne darm", "SmallBowel"])
def test_small_bowel_alone_is_not_tg263_bowel(name):
    # TG-263's Bowel is the small and the large bowel; the SEG codes Bowel as the intestine (both)
    m = NameResolver(DEFAULT_LABELS).resolve(name)
    assert m.structure == "unmapped" and "small bowel" in m.rule


@pytest.mark.parametrize("name", ["Nier", "Niere", "Lunge", "BODY", "PTV_60", "Leverx", "Kidney"])
def test_unknown_or_sideless_names_stay_unmapped(name):
    m = NameResolver(DEFAULT_LABELS).resolve(name)
    assert m.structure == "unmapped" and not m.mapped
    sideless = name in ("Nier", "Niere", "Lunge", "Kidney")
    assert m.rule == ("paired organ without a side" if sideless else "no rule matches")
    assert clinical_name(name) is None or clinical_name(name) not in DEFAULT_LABELS.names


def test_aliases_file_exact_regex_per_centre_and_ambiguous(tmp_path):
    f = tmp_path / "aliases.toml"
    f.write_text('[aliases]\n"GTV lever" = "Liver"\n'
                 '[patterns]\n"nier[ _]?l(i|inks)?_def" = "Kidney_L"\n"nier.*_def" = "Kidney_R"\n'
                 '[centre.B.aliases]\n"Leber_neu" = "Liver"\n[centre.B.patterns]\n"mz.*" = "Spleen"\n',
                 encoding="utf-8")
    aliases = load_aliases(f, DEFAULT_LABELS)
    a = NameResolver(DEFAULT_LABELS, aliases, centre="A")
    b = NameResolver(DEFAULT_LABELS, aliases, centre="B")
    assert a.resolve("GTV lever").structure == "Liver"
    assert a.resolve("NIER_L_DEF").structure == "ambiguous"  # both patterns match, with different targets
    assert a.resolve("nier_r_def").structure == "Kidney_R"
    assert a.resolve("Leber_neu").structure == "unmapped" and b.resolve("Leber_neu").structure == "Liver"
    assert a.resolve("MZ1").structure == "unmapped" and b.resolve("MZ1").structure == "Spleen"
    # two ROIs of one RTSTRUCT reaching one structure: both left out
    both = a.resolve_all(["Lever", "Liver", "Milt"])
    assert [m.structure for m in both] == ["ambiguous", "ambiguous", "Spleen"]


def test_aliases_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[aliases]\n"X" = "Livr"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.toml: targets \['Livr'\] are not structures"):
        load_aliases(f, DEFAULT_LABELS)
    f.write_text('[patterns]\n"(" = "Liver"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.toml: \[patterns\]: bad regular expression"):
        load_aliases(f, DEFAULT_LABELS)


def test_age_and_position_from_headers():
    # whole (completed) years only: a fraction of a year plus the study date would give the birth date
    assert age_years("007Y") == 7 and age_years("018M") == 1 and age_years("011M") == 0 and age_years("") is None
    assert age_years("", "20200301", "20260301") == 6 and age_years("", "20200302", "20260301") == 5
    assert age_years("", "20200229", "20260228") == 5 and age_years("", "20200229", "20260301") == 6
    assert isinstance(age_years("100W"), int) and age_years("100W") == 1 and age_years("400D") == 1
    assert [position_of(p) for p in ("HFS", "FFS", "HFP", "FFP", "", "XYZ")] == \
        ["supine", "supine", "prone", "prone", "unknown", "unknown"]


def test_import_tables_pseudonyms_pairing_and_resume(tmp_path):
    src = tmp_path / "export"
    # two patients; the second RTSTRUCT names no series and is paired by its frame of reference
    s1 = ct_series(src / "p1" / "ct", patient_id="P-SECRET-1", patient_name="Doe^Jane", patient_position="FFP",
                   age="004Y", sex="F")
    s2 = ct_series(src / "mixed", patient_id="P-SECRET-2", patient_name="Roe^John", patient_position="HFS",
                   age="011M", sex="M")
    rtstruct(src / "p1" / "rs.dcm", s1, {"Lever": [square(10.5, -19.5, 14.5, -16.5, 32.5)], "BODY": []})
    rtstruct(src / "mixed" / "zz.dcm", s2, {"Milz": [square(10.5, -19.5, 14.5, -16.5, 30.0)]},
             reference_series=False)
    # a dose grid in the same frame of reference as s2 does not compete with the CT
    ct_series(src / "mixed" / "dose", modality="RTDOSE", frame_uid=s2["frame"], study_uid=s2["study"])
    (src / "notes.txt").write_text("not DICOM")
    out = tmp_path / "ds"
    res = import_dicom(src, out, ImportOptions(DEFAULT_LABELS, centre="A"))
    assert res.computed == 2 and sorted(res.cases) == ["case_0001", "case_0002"]
    cases = {r["series_instance_uid"]: r for r in _rows(out / "cases.csv")}
    c1, c2 = cases[s1["series"]]["case"], cases[s2["series"]]["case"]
    meta = {r["case"]: r for r in _rows(out / "metadata.csv")}
    assert meta[c1] == {"case": c1, "centre": "A", "age": "4", "sex": "F", "position": "prone",
                        "patient_position": "FFP"}
    assert meta[c2]["age"] == "0" and meta[c2]["position"] == "supine"  # 11 months: whole years
    rows = _rows(out / "import.csv")
    liver = next(r for r in rows if r["roi_name"] == "Lever")
    # x 11..14 (4 columns, 1 mm) x y -19..-17 in 1.5 mm rows: centres -20 + 1.5 j in (-19.5, -16.5): j = 1, 2 -> 8 px
    assert liver["structure"] == "Liver" and int(liver["voxels"]) == 8
    assert float(liver["ml"]) == pytest.approx(8 * 1.0 * 1.5 * 2.5 / 1000)
    # the ROI not imported: listed with its status, its name withheld from the shared table
    body = next(r for r in rows if r["structure"] == "unmapped")
    assert body["roi_name"] == "(withheld)" and body["status"] == "unmapped" and liver["status"] == "imported"
    assert "BODY" not in (out / "import.csv").read_text() and res.unmapped == {"BODY": 1}
    # no patient name or id anywhere in the output
    for path in out.rglob("*"):
        assert "SECRET" not in path.name and "Doe" not in path.name
        if path.is_file() and path.suffix in (".csv", ".json"):
            text = path.read_text()
            assert "SECRET" not in text and "Doe" not in text and "Roe" not in text
    res2 = import_dicom(src, out, ImportOptions(DEFAULT_LABELS, centre="A"))
    assert res2.computed == 0 and res2.from_cache == 2
    assert {r["case"] for r in _rows(out / "cases.csv")} == {c1, c2}


def test_two_rtstructs_on_one_series_are_two_cases(tmp_path):
    s = ct_series(tmp_path / "in" / "ct")
    rtstruct(tmp_path / "in" / "rs1.dcm", s, {"Lever": [square(10.5, -19.5, 14.5, -16.5, 32.5)]})
    rtstruct(tmp_path / "in" / "rs2.dcm", s, {"Leber": [square(10.5, -19.5, 12.5, -16.5, 32.5)]})
    res = import_dicom(tmp_path / "in", tmp_path / "out", ImportOptions(DEFAULT_LABELS))
    assert len(res.cases) == 2
    table = _rows(tmp_path / "out" / "cases.csv")
    assert {r["series_instance_uid"] for r in table} == {s["series"]}
    assert len({r["rtstruct_sop_instance_uid"] for r in table}) == 2
    assert sorted(int(r["voxels"]) for r in res.rows) == [4, 8]  # 2 or 4 columns x 2 rows


def test_a_later_run_keeps_earlier_cases_and_numbers_new_ones_on(tmp_path):
    s1 = ct_series(tmp_path / "one" / "ct")
    rtstruct(tmp_path / "one" / "rs.dcm", s1, {"Lever": [square(10.5, -19.5, 14.5, -16.5, 32.5)]})
    s2 = ct_series(tmp_path / "two" / "ct")
    rtstruct(tmp_path / "two" / "rs.dcm", s2, {"Milt": [square(10.5, -19.5, 14.5, -16.5, 32.5)]})
    out = tmp_path / "ds"
    import_dicom(tmp_path / "one", out, ImportOptions(DEFAULT_LABELS))
    warnings: list[str] = []
    res = import_dicom(tmp_path / "two", out, ImportOptions(DEFAULT_LABELS), warn=warnings.append)
    assert res.cases == ["case_0002"]
    assert [r["case"] for r in _rows(out / "cases.csv")] == ["case_0001", "case_0002"]
    assert [r["series_instance_uid"] for r in _rows(out / "cases.csv")] == [s1["series"], s2["series"]]
    assert [r["roi_name"] for r in _rows(out / "import.csv")] == ["Lever", "Milt"]
    assert len(_rows(out / "metadata.csv")) == 2
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    assert any("keeps 1 case(s) imported earlier" in w for w in warnings)


def test_unpaired_rtstruct_is_reported(tmp_path):
    s = ct_series(tmp_path / "in" / "ct")
    other = dict(s, series="1.2.3.4", frame="1.2.3.5")
    rtstruct(tmp_path / "in" / "rs.dcm", s, {"Lever": [square(10.5, -19.5, 14.5, -16.5, 32.5)]})
    rtstruct(tmp_path / "in" / "orphan.dcm", other, {"Lever": [square(10.5, -19.5, 14.5, -16.5, 32.5)]})
    warnings: list[str] = []
    import_dicom(tmp_path / "in", tmp_path / "out", ImportOptions(DEFAULT_LABELS), warn=warnings.append)
    assert any("orphan.dcm: RTSTRUCT not imported: references series 1.2.3.4" in w for w in warnings)


# --------------------------------------------------------------------------- phantoms -> DICOM -> dataset


def _small_config(tmp_path: Path, direction_b=(-1, 0, 0, 0, -1, 0, 0, 0, 1)) -> Path:
    from oarbench.phantoms.study import DEFAULT_DEMO_CONFIG, to_toml

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    data = tomllib.loads(DEFAULT_DEMO_CONFIG.read_text())
    data["phantoms"].update(test_cases_per_centre=1, train_cases_per_centre=0, prone_fraction=1.0)
    data["phantoms"]["centres"]["A"].update(size_xyz=[48, 40, 20], spacing_xyz_mm=[7.0, 8.0, 14.0])
    data["phantoms"]["centres"]["B"].update(size_xyz=[40, 48, 18], spacing_xyz_mm=[8.0, 7.0, 15.0],
                                            direction=list(direction_b))
    path = tmp_path / "small.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.nnunet
def test_phantoms_as_dicom_import_to_valid_nnunet_dataset(tmp_path):
    pytest.importorskip("nnunetv2")
    runner = CliRunner()
    src, out = tmp_path / "dicom", tmp_path / "Dataset950_Site"
    res = runner.invoke(main, ["phantoms", "--format", "dicom", "--out", str(src), "--config",
                               str(_small_config(tmp_path))])
    assert res.exit_code == 0, res.output
    manifest = _rows(src / "dicom_manifest.csv")
    assert len(manifest) == 2
    res = runner.invoke(main, ["dicom", "import", str(src), "--out", str(out), "--no-progress", "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert "2 cases (2 imported, 0 already there)" in res.output and "not imported" not in res.output
    rows = _rows(out / "import.csv")
    # every ROI of both centres (Dutch and German names) mapped; 19 structures minus those too small to draw
    assert all(r["structure"] != "unmapped" for r in rows)
    assert {r["rule"] for r in rows} >= {"built-in clinical spelling"}
    assert {r["position"] for r in _rows(out / "metadata.csv")} == {"prone"}
    assert {r["patient_position"] for r in _rows(out / "metadata.csv")} == {"HFP"}
    # German names with umlauts are stored as UTF-8 under a declared character set
    b_rtstruct = next((src / "B").glob("*/RTSTRUCT.dcm"))
    import pydicom

    assert pydicom.dcmread(b_rtstruct).SpecificCharacterSet == "ISO_IR 192"
    assert "Speiseröhre".encode("utf-8") in b_rtstruct.read_bytes()
    assert "Speiseröhre" in {r["roi_name"] for r in rows}
    ids = {m["patient_id"] for m in manifest}
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".csv", ".json"):
            assert not any(i in path.read_text() for i in ids)
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(out), 1)  # raises on any inconsistency
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    res = runner.invoke(main, ["dicom", "import", str(src), "--out", str(out), "--no-progress"])
    assert "(0 imported, 2 already there)" in res.output


# --------------------------------------------------------------------------- export and the round trip


def _rotation() -> np.ndarray:
    a, b = math.radians(25), math.radians(15)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


@pytest.mark.slow
def test_round_trip_export_import_on_oblique_anisotropic_phantom_with_holes(tmp_path):
    hd = pytest.importorskip("highdicom")
    import pydicom
    from scipy import ndimage

    from oarbench.dicom.export import export_predictions, write_ct_series
    from oarbench.io import write_volume
    from oarbench.metrics import compute_surface_distances, dice, hd95
    from oarbench.phantoms import CentreProtocol, CaseSpec, render_case

    rot = _rotation()
    centre = CentreProtocol("X", 950, (44, 36, 16), (7.0, 8.5, 12.0), tuple(rot.ravel()), noise_hu=5.0)
    spec = CaseSpec("X_001", "X", "test", 9.0, "F", "renal tumour", "none", "supine")
    ct, labels = render_case(spec, centre, 7)
    lab = labels.array.copy()
    liver = lab == 1
    core = ndimage.binary_erosion(liver, np.ones((1, 5, 5), bool))
    holes = core & (np.indices(lab.shape)[2] % 6 == 0) & (np.indices(lab.shape)[1] % 6 == 0)
    holes = ndimage.binary_dilation(holes, np.ones((1, 2, 2), bool)) & core
    assert holes.sum() > 0
    lab[holes] = 0
    labels = labels.with_array(lab)

    header = {"PatientName": "Test^Round", "PatientID": "RT-1", "PatientSex": "F", "PatientAge": "009Y",
              "PatientPosition": "HFS", "StudyInstanceUID": pydicom.uid.generate_uid(),
              "SeriesInstanceUID": pydicom.uid.generate_uid(), "FrameOfReferenceUID": pydicom.uid.generate_uid(),
              "StudyDate": "20260101"}
    ct_paths = write_ct_series(ct, tmp_path / "dicom" / "CT", header)
    write_volume(labels, tmp_path / "pred" / "X_001.nii.gz")
    res = export_predictions(tmp_path / "pred", tmp_path / "dicom", tmp_path / "exp", DEFAULT_LABELS)
    rs_path, seg_path = tmp_path / "exp" / "X_001" / "RTSTRUCT.dcm", tmp_path / "exp" / "X_001" / "SEG.dcm"
    assert set(res.files) == {rs_path, seg_path}

    rs = pydicom.dcmread(rs_path)
    ct_sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct_paths}
    ref = rs.ReferencedFrameOfReferenceSequence[0]
    assert ref.FrameOfReferenceUID == header["FrameOfReferenceUID"]
    ser = ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ser.SeriesInstanceUID == header["SeriesInstanceUID"]
    assert {i.ReferencedSOPInstanceUID for i in ser.ContourImageSequence} == ct_sops
    for uid in (rs.SOPInstanceUID, rs.SeriesInstanceUID, rs.file_meta.MediaStorageSOPInstanceUID):
        assert pydicom.uid.UID(uid).is_valid
    present = [n for v, n in DEFAULT_LABELS if np.any(lab == v)]
    assert [r.ROIName for r in rs.StructureSetROISequence] == present
    from oarbench.dicom.export import COLOURS

    assert [list(c.ROIDisplayColor) for c in rs.ROIContourSequence] == [list(COLOURS[n]) for n in present]
    for rc in rs.ROIContourSequence:
        for c in rc.ContourSequence:
            assert c.ContourImageSequence[0].ReferencedSOPInstanceUID in ct_sops

    seg = hd.seg.segread(seg_path)
    assert pydicom.uid.UID(seg.SOPInstanceUID).is_valid
    assert [seg.get_segment_description(i).segment_label for i in seg.segment_numbers] == present
    # the SEG holds the label map: segment i is the i-th structure present
    sop_order = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct_paths]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_order, combine_segments=True,
                                               skip_overlap_checks=True)
    lut = np.zeros(max(DEFAULT_LABELS.values) + 1, np.int64)
    for i, name in enumerate(present, 1):
        lut[DEFAULT_LABELS.value(name)] = i
    assert np.array_equal(pixels, lut[lab])

    # import the exported RTSTRUCT with its CT (a fresh folder: CT + RTSTRUCT only)
    back_dir = tmp_path / "back"
    back_dir.mkdir()
    for p in ct_paths:
        (back_dir / p.name).write_bytes(p.read_bytes())
    (back_dir / "rs.dcm").write_bytes(rs_path.read_bytes())
    import_dicom(back_dir, tmp_path / "ds", ImportOptions(DEFAULT_LABELS))
    from oarbench.io import read_volume

    back = read_volume(tmp_path / "ds" / "labelsTr" / "case_0001.nii.gz")
    image = read_volume(tmp_path / "ds" / "imagesTr" / "case_0001_0000.nii.gz")
    assert image.array.dtype == np.int16 and np.array_equal(image.array, ct.array)  # HU back exactly
    assert image.spacing == pytest.approx(ct.spacing) and image.origin == pytest.approx(ct.origin, abs=1e-4)
    assert np.allclose(back.direction, labels.direction, atol=1e-4) and back.array.shape == lab.shape
    voxel_ml = float(np.prod(labels.spacing)) / 1000
    checked = 0
    for value, name in DEFAULT_LABELS:
        ref_mask, got = lab == value, back.array == value
        if ref_mask.sum() * voxel_ml < 10:
            continue
        checked += 1
        assert dice(ref_mask, got) >= 0.99, name
        assert hd95(compute_surface_distances(ref_mask, got, labels.spacing)) <= min(labels.spacing), name
    assert checked >= 8
    assert np.count_nonzero(back.array[holes]) == 0  # the holes came back as holes


def test_export_needs_cases_table_for_several_series(tmp_path):
    from oarbench.io import Volume, write_volume

    s1 = ct_series(tmp_path / "dicom" / "a")
    ct_series(tmp_path / "dicom" / "b")
    lab = np.zeros((4, 6, 8), np.uint8)
    lab[1, 2:4, 2:5] = 1
    geo = read_geometry(s1["series"], s1["paths"])
    write_volume(Volume(lab, geo.spacing_zyx, geo.origin, geo.direction), tmp_path / "pred" / "case_0001.nii.gz")
    from oarbench.dicom.export import export_predictions

    with pytest.raises(ValueError, match="2 CT series and 1 predictions"):
        export_predictions(tmp_path / "pred", tmp_path / "dicom", tmp_path / "out", DEFAULT_LABELS)
    table = tmp_path / "cases.csv"
    table.write_text(f"case,series_instance_uid\ncase_0001,{s1['series']}\n")
    res = CliRunner().invoke(main, ["dicom", "export", str(tmp_path / "pred"), "--dicom", str(tmp_path / "dicom"),
                                    "--out", str(tmp_path / "out"), "--cases", str(table), "--format", "rtstruct"])
    assert res.exit_code == 0, res.output
    import pydicom

    rs = pydicom.dcmread(tmp_path / "out" / "case_0001" / "RTSTRUCT.dcm")
    assert rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].SeriesInstanceUID == s1["series"]
    # the 3 x 2 pixel rectangle: one contour on slice 1, back to 6 pixels
    roi = Roi(1, "Liver", "", tuple((c.ContourGeometricType, np.asarray(c.ContourData, float).reshape(-1, 3))
                                    for c in rs.ROIContourSequence[0].ContourSequence))
    grid = Grid(lab.shape, geo.spacing_zyx, geo.origin, geo.direction)
    assert np.array_equal(np.sort(rasterise(roi, grid).indices), np.flatnonzero(lab))
    # a case without a row in the cases table, or whose series is not in the DICOM folder
    other = tmp_path / "other.csv"
    other.write_text("case,series_instance_uid\ncase_0002,1.2.3\n")
    with pytest.raises(ValueError, match=r"other\.csv: no row for the predicted case\(s\) \['case_0001'\]"):
        export_predictions(tmp_path / "pred", tmp_path / "dicom", tmp_path / "o4", DEFAULT_LABELS, cases_csv=other)
    other.write_text("case,series_instance_uid\ncase_0001,1.2.3\n")
    with pytest.raises(ValueError, match=r"holds no CT series 1\.2\.3 \(case case_0001 in .*other\.csv\)"):
        export_predictions(tmp_path / "pred", tmp_path / "dicom", tmp_path / "o4", DEFAULT_LABELS, cases_csv=other)
    # label values outside the label map are refused, naming the file
    bad = lab.copy()
    bad[2, 1, 1] = 42
    write_volume(Volume(bad, geo.spacing_zyx, geo.origin, geo.direction), tmp_path / "pred" / "case_0001.nii.gz")
    with pytest.raises(ValueError, match=r"case_0001\.nii\.gz: label values \[42\] are not in the label map"):
        export_predictions(tmp_path / "pred", tmp_path / "dicom", tmp_path / "out3", DEFAULT_LABELS,
                           cases_csv=table)
    # a prediction on another grid is refused, naming the file
    write_volume(Volume(lab, (3.0, 1.5, 1.0), geo.origin, geo.direction), tmp_path / "pred" / "case_0001.nii.gz")
    with pytest.raises(ValueError, match=r"case_0001\.nii\.gz is not on the grid"):
        export_predictions(tmp_path / "pred", tmp_path / "dicom", tmp_path / "out2", DEFAULT_LABELS,
                           cases_csv=table)


def test_missing_dependency_message_names_the_extra(monkeypatch, tmp_path):
    from oarbench.dicom import _deps

    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` fail
    with pytest.raises(ImportError, match=r"pip install 'oarbench\[dicom\]'"):
        _deps.require_pydicom()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.dcm").write_bytes(b"\0" * 200)
    res = CliRunner().invoke(main, ["dicom", "import", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                                    "--no-progress"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [res.output.strip()]  # one line
    assert "pip install 'oarbench[dicom]'" in res.output


def test_labels_map_other_than_default(tmp_path):
    s = ct_series(tmp_path / "in" / "ct")
    rtstruct(tmp_path / "in" / "rs.dcm", s, {"Tumour": [square(10.5, -19.5, 14.5, -16.5, 32.5)]})
    res = import_dicom(tmp_path / "in", tmp_path / "out", ImportOptions(LabelMap({1: "Tumour"})))
    assert res.rows[0]["structure"] == "Tumour" and res.rows[0]["label"] == 1


# --------------------------------------------------------------------------- more bad input, each naming the file


def _flat(tmp_path, **kw):
    return ct_series(tmp_path / "ct", names=["a.dcm", "b.dcm", "c.dcm", "d.dcm"], **kw)


@pytest.mark.parametrize("kind", ["duplicate", "single", "pixel_spacing", "orientation", "multiframe"])
def test_more_series_errors_name_the_files(tmp_path, kind):
    if kind == "duplicate":
        s = _flat(tmp_path, positions=[(0.0, 0.0, z) for z in (0.0, 2.5, 2.5, 5.0)])
        pattern = r"two slices at position 2\.50 mm: [bc]\.dcm and [bc]\.dcm"
    elif kind == "single":
        s = ct_series(tmp_path / "ct", positions=[(0.0, 0.0, 0.0)])
        pattern = "a single slice"
    elif kind == "pixel_spacing":
        s = _flat(tmp_path)
        import pydicom

        ds = pydicom.dcmread(s["paths"][2])
        ds.PixelSpacing = [1.5, 1.2]
        ds.save_as(s["paths"][2])
        pattern = r"mixed PixelSpacing: a\.dcm .* vs c\.dcm"
    elif kind == "multiframe":
        s = _flat(tmp_path)
        import pydicom

        ds = pydicom.dcmread(s["paths"][3])
        ds.NumberOfFrames = 2
        ds.save_as(s["paths"][3])
        pattern = r"d\.dcm: multi-frame image \(2 frames\)"
    else:
        s = _flat(tmp_path)
        import pydicom

        ds = pydicom.dcmread(s["paths"][1])
        ds.ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
        ds.save_as(s["paths"][1])
        pattern = r"mixed ImageOrientationPatient: a\.dcm .* vs b\.dcm"
    with pytest.raises(ValueError, match=pattern) as err:
        read_geometry(s["series"], s["paths"])
    assert s["series"] in str(err.value)


def test_rtstruct_errors_name_the_file_and_roi(tmp_path):
    s = ct_series(tmp_path / "in" / "ct")
    tilted = np.array([[10.5, -19.5, 30.0], [14.5, -19.5, 32.5], [14.5, -16.5, 35.0]])
    rtstruct(tmp_path / "in" / "rs.dcm", s, {"Lever": [tilted]})
    with pytest.raises(ValueError, match=r"rs\.dcm: ROI 'Lever' contour 1 is not in a slice plane"):
        import_dicom(tmp_path / "in", tmp_path / "out", ImportOptions(DEFAULT_LABELS))
    # the same contour in an ROI that is not imported stops nothing: that ROI is not drawn at all
    rtstruct(tmp_path / "in" / "rs.dcm", s, {"Lever": [square(10.5, -19.5, 14.5, -16.5, 32.5)], "BODY": [tilted]})
    res = import_dicom(tmp_path / "in", tmp_path / "out", ImportOptions(DEFAULT_LABELS))
    body = next(r for r in res.rows if r["structure"] == "unmapped")
    assert body["status"] == "unmapped" and "voxels" not in body
    assert res.unmapped == {"BODY": 1} and {r["status"] for r in res.rows} == {"imported", "unmapped"}


def test_rtstruct_with_contours_of_an_undefined_roi_is_refused(tmp_path):
    import pydicom

    s = ct_series(tmp_path / "in" / "ct")
    path = rtstruct(tmp_path / "in" / "rs.dcm", s, {"Lever": [square(10.5, -19.5, 14.5, -16.5, 32.5)]})
    ds = pydicom.dcmread(path)
    ds.ROIContourSequence[0].ReferencedROINumber = 7
    ds.save_as(path)
    with pytest.raises(ValueError, match=r"rs\.dcm: ROIContourSequence refers to ROI number 7"):
        import_dicom(tmp_path / "in", tmp_path / "out", ImportOptions(DEFAULT_LABELS))


def test_rtstruct_in_another_frame_of_reference_is_refused(tmp_path):
    s = ct_series(tmp_path / "in" / "ct")
    rtstruct(tmp_path / "in" / "rs.dcm", s, {"Lever": [square(10.5, -19.5, 14.5, -16.5, 32.5)]},
             frame_uid="1.2.826.0.1.99")
    with pytest.raises(ValueError, match=r"rs\.dcm: ROI 'Lever' is drawn in frame of reference 1\.2\.826\.0\.1\.99"):
        import_dicom(tmp_path / "in", tmp_path / "out", ImportOptions(DEFAULT_LABELS))


def test_folder_without_dicom_is_an_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("x")
    res = CliRunner().invoke(main, ["dicom", "import", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                                    "--no-progress"])
    assert res.exit_code == 1 and "no DICOM images or RTSTRUCTs found (1 other files)" in res.output


def test_cli_import_with_aliases_and_labels(tmp_path):
    s = ct_series(tmp_path / "in" / "ct")
    rtstruct(tmp_path / "in" / "rs.dcm", s, {"GTV_1": [square(10.5, -19.5, 14.5, -16.5, 32.5)],
                                             "Lever": [square(10.5, -19.5, 12.5, -16.5, 35.0)]})
    (tmp_path / "a.toml").write_text('[centre.X.patterns]\n"gtv_\\\\d+" = "GTV"\n', encoding="utf-8")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "Liver": 1, "GTV": 2}}))
    res = CliRunner().invoke(main, ["dicom", "import", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                                    "--no-progress", "--centre", "X", "--aliases", str(tmp_path / "a.toml"),
                                    "--labels", str(tmp_path / "dataset.json"), "--case-prefix", "siteX"])
    assert res.exit_code == 0, res.output
    rows = {r["roi_name"]: r for r in _rows(tmp_path / "o" / "import.csv")}
    assert rows["GTV_1"]["structure"] == "GTV" and rows["GTV_1"]["label"] == "2"
    assert rows["Lever"]["structure"] == "Liver" and rows["Lever"]["case"] == "siteX_0001"
    assert json.loads((tmp_path / "o" / "dataset.json").read_text())["labels"] == \
        {"background": 0, "Liver": 1, "GTV": 2}


def test_phantoms_dicom_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    res = CliRunner().invoke(main, ["phantoms", "--format", "dicom", "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "not empty; use --force" in res.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
