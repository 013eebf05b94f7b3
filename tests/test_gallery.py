"""Failure-case galleries: selection on a crafted table, tiles drawn from synthetic volumes.

Volumes are built here with SimpleITK (no phantom generator). Colour checks look
for the Okabe-Ito reference blue (#0072B2) and prediction orange (#E69F00) in the
rendered pixels; the CT background is grey (R = G = B), far from both colours.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest

SimpleITK = pytest.importorskip("SimpleITK")
sitk = SimpleITK
pytest.importorskip("matplotlib")

from click.testing import CliRunner  # noqa: E402

from oarbench.gallery import (  # noqa: E402
    ABDOMEN_WINDOW,
    BONE_WINDOW,
    BRAIN_WINDOW,
    LUNG_WINDOW,
    FailureCriteria,
    PathResolver,
    build_gallery,
    choose_slice,
    make_tile,
    select_failures,
    tile_for_row,
    window_for,
)
from oarbench.plots import PREDICTION_COLOUR, REFERENCE_COLOUR, figure_png_bytes, tile_figure  # noqa: E402

BLUE = np.array([0x00, 0x72, 0xB2])
ORANGE = np.array([0xE6, 0x9F, 0x00])


# --------------------------------------------------------------------------- selection


def _row(case, dsc, hd95, *, model="m1", centre="A", structure="Liver", condition="original", status="ok", swap=False):
    return dict(study="s", centre=centre, model=model, condition=condition, case=case, structure=structure, label=1,
                status=status, dsc=dsc, hd95=hd95, laterality_swap=swap)


def crafted_table() -> pd.DataFrame:
    inf, nan = math.inf, math.nan
    rows = []
    # Group (Liver, m1, A), condition original, ok rows c1..c8.
    dsc = [0.95, 0.94, 0.93, 0.92, 0.91, 0.90, 0.89, 0.50]
    hd = [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 30.0, 8.0]
    for i, (d, h) in enumerate(zip(dsc, hd), start=1):
        rows.append(_row(f"c{i}", d, h))
    rows.append(_row("c9", 0.0, inf, status="missed"))
    rows.append(_row("c10", 0.0, inf, status="hallucinated"))
    rows.append(_row("c11", nan, nan, status="absent"))
    # Robustness: flip_lr and rot180_si for m1.
    rows.append(_row("c1", 0.60, 9.0, condition="flip_lr"))      # drop 0.35
    rows.append(_row("c2", 0.90, 3.0, condition="flip_lr"))      # drop 0.04
    rows.append(_row("c3", 0.95, 3.0, condition="flip_lr"))      # gain, never a drop
    rows.append(_row("c4", 0.0, inf, condition="flip_lr", status="missed"))  # drop 0.92
    rows.append(_row("c11", nan, nan, condition="flip_lr", status="absent"))
    rows.append(_row("c2", 0.84, 4.0, condition="rot180_si"))    # drop 0.10
    # Group (Liver, m2, A): three ok rows, c3 flagged as a laterality swap.
    rows.append(_row("c1", 0.80, 5.0, model="m2"))
    rows.append(_row("c2", 0.85, 4.0, model="m2"))
    rows.append(_row("c3", 0.90, 3.0, model="m2", swap=True))
    rows.append(_row("c1", 0.80, 5.0, model="m2", condition="flip_lr"))  # drop 0: not selected
    # Group (Liver, m1, B): one ok row.
    rows.append(_row("b1", 0.70, 12.0, centre="B"))
    return pd.DataFrame(rows)


def test_select_failures_picks_exactly_the_expected_rows():
    # Criteria: DSC < .85, HD95 > 10 mm, drop > .05, Tukey f = 1.5, at most k = 2 per rule and group.
    # (Liver, m1, A) ok/original DSC: .95 .94 .93 .92 .91 .90 .89(c7) .50(c8); HD95 2 3 4 5 6 7 30(c7) 8(c8).
    #   DSC < .85: c8 only. HD95 > 10: c7 only.
    #   Quartiles (linear, n=8) of DSC sorted .50 .89 .90 ... .95: Q1 at h=1.75 -> .89 + .75*.01 = .8975,
    #   Q3 at h=5.25 -> .93 + .25*.01 = .9325; IQR .035; fence .8975 - .0525 = .845 -> c8 only.
    #   HD95 sorted 2 3 4 5 6 7 8 30: Q1 = 3.75, Q3 = 7.25, IQR 3.5, fence 7.25 + 5.25 = 12.5 -> c7 only.
    # c9 missed, c10 hallucinated (never ranked); c11 absent: nothing.
    # flip_lr drops (original - condition): c1 .35, c2 .04 (<= .05), c3 -.02, c4 .92 (missed, DSC 0), c11 NaN
    #   -> c4, c1. rot180_si: c2 .10 (its own condition, own cap).
    # (Liver, m2, A) DSC .80(c1) .85(c2) .90(c3): below .85 strictly: c1 only; HD95 5 4 3: none above 10.
    #   Tukey n=3: Q1 .825, Q3 .875, fence .75 -> none; HD95 fence 6 -> none. c3 laterality swap.
    #   flip_lr c1 drop 0 -> not a drop.
    # (Liver, m1, B) b1 DSC .70 < .85 and HD95 12 > 10; one row: IQR 0, nothing strictly outside.
    # The good rows c1..c6 of (m1, A) and c2 of m2 are never selected: the k worst are not taken blindly.
    expected = {
        ("A", "m1", "original", "c7"): "high_hd95;outlier_hd95",
        ("A", "m1", "original", "c8"): "low_dsc;outlier_dsc",
        ("A", "m1", "original", "c9"): "missed",
        ("A", "m1", "original", "c10"): "hallucinated",
        ("A", "m1", "flip_lr", "c1"): "robustness_drop",
        ("A", "m1", "flip_lr", "c4"): "missed;robustness_drop",
        ("A", "m1", "rot180_si", "c2"): "robustness_drop",
        ("A", "m2", "original", "c1"): "low_dsc",
        ("A", "m2", "original", "c3"): "laterality_swap",
        ("B", "m1", "original", "b1"): "low_dsc;high_hd95",
    }
    crit = FailureCriteria(dsc_below=0.85, hd95_above=10.0, drop_above=0.05, k=2)
    sel = select_failures(crafted_table(), crit)
    got = {(r.centre, r.model, r.condition, r.case): r.reason for r in sel.itertuples()}
    assert got == expected
    drops = {(r.condition, r.case): r.dsc_drop for r in sel.itertuples() if not math.isnan(r.dsc_drop)}
    assert drops == {("flip_lr", "c1"): pytest.approx(0.35), ("flip_lr", "c4"): pytest.approx(0.92),
                     ("rot180_si", "c2"): pytest.approx(0.10)}
    assert len(sel) == len(expected)  # deduplicated: one row per key


def test_select_failures_cap_k_worst_first_ties_by_case_name():
    t = pd.DataFrame([_row("z", 0.5, 40.0), _row("a", 0.5, 40.0), _row("m", 0.6, 30.0), _row("ok", 0.95, 1.0)])
    crit = FailureCriteria(k=1, tukey_factor=None)
    sel = select_failures(t, crit)
    # DSC tie .5/.5 and HD95 tie 40/40: the case name decides, "a" before "z"; "m" fails too but the cap is 1.
    assert list(sel["case"]) == ["a"]
    assert sel.loc[0, "reason"] == "low_dsc;high_hd95"
    everything = select_failures(t, FailureCriteria(k=None, tukey_factor=None))
    assert sorted(everything["case"]) == ["a", "m", "z"]


def test_select_failures_takes_nothing_when_nothing_failed():
    # Perfect and good rows only: the old "k lowest" rule picked DSC 1.000 / HD95 0.0 rows; now nothing is taken.
    # DSC 1 .98 .97 .96 .95: Q1 .96, Q3 .98, fence .93; HD95 0 1 2 3 4: Q1 1, Q3 3, fence 6 -> no outlier either.
    t = pd.DataFrame([_row(f"c{i}", d, h) for i, (d, h) in enumerate(zip([1.0, 0.98, 0.97, 0.96, 0.95], [0, 1, 2, 3, 4]))])
    sel = select_failures(t)
    assert sel.empty and {"reason", "dsc_drop"} <= set(sel.columns)
    # A perfect row can never be an outlier (DSC 1 is never below Q1, HD95 0 never above Q3), even among failures.
    t2 = pd.DataFrame([_row("p", 1.0, 0.0)] + [_row(f"b{i}", 0.3, 30.0) for i in range(4)])
    assert "p" not in set(select_failures(t2, FailureCriteria(k=None))["case"])
    # The default thresholds are strict: DSC exactly 0.7 and HD95 exactly 10 mm do not fail, just beyond them do.
    t = pd.DataFrame([_row("a", 0.7, 10.0), _row("b", 0.6999, 10.001)])
    sel = select_failures(t, FailureCriteria(tukey_factor=None))
    assert list(sel["case"]) == ["b"] and sel.loc[0, "reason"] == "low_dsc;high_hd95"
    # Rules can be switched off one by one.
    off = FailureCriteria(dsc_below=None, hd95_above=None, tukey_factor=None)
    assert select_failures(t, off).empty


def test_failure_criteria_check_and_describe():
    with pytest.raises(ValueError, match="k must be"):
        FailureCriteria(k=0)
    with pytest.raises(ValueError, match="dsc_below"):
        FailureCriteria(dsc_below=-1)
    text = FailureCriteria(dsc_below=0.8, hd95_above=15, drop_above=None).describe()
    assert "DSC < 0.8" in text and "HD95 > 15 mm" in text and "drops" not in text
    assert FailureCriteria.from_dict(FailureCriteria(k=None).as_dict()) == FailureCriteria(k=None)


@pytest.mark.parametrize("bad, message", [
    (lambda t: t.drop(columns=["hd95"]), "hd95"),
    (lambda t: pd.concat([t, t.iloc[:1]]), "share"),
])
def test_select_failures_bad_tables_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        select_failures(bad(crafted_table()))


def test_select_failures_without_condition_or_swap_columns():
    t = crafted_table()
    t = t[t["condition"] == "original"].drop(columns=["condition", "laterality_swap"])
    sel = select_failures(t, FailureCriteria(dsc_below=0.85, k=2))
    assert set(sel["condition"]) == {"original"}
    assert "laterality_swap" not in ";".join(sel["reason"])
    assert ("m2", "c3") not in set(zip(sel["model"], sel["case"]))


def test_windows():
    assert window_for("Lung_L") == LUNG_WINDOW and window_for("Lung_R") == LUNG_WINDOW
    # lung lobes as TG-263 and TotalSegmentator write them, and the airways
    for name in ("Lung_LUL", "Lung_RML", "lung_upper_lobe_left", "lung_lower_lobe_right", "Trachea"):
        assert window_for(name) == LUNG_WINDOW, name
    for name in ("Vertebrae", "vertebrae_L3", "rib_left_4", "Femur_Head_L", "sacrum"):
        assert window_for(name) == BONE_WINDOW, name
    assert window_for("Brain") == BRAIN_WINDOW
    for name in ("Liver", "SpinalCord", "Heart", "Kidney_L", "Esophagus"):
        assert window_for(name) == ABDOMEN_WINDOW, name
    assert (BONE_WINDOW.vmin, BONE_WINDOW.vmax) == (-500.0, 1300.0)
    assert (LUNG_WINDOW.vmin, LUNG_WINDOW.vmax) == (-1350.0, 150.0)
    assert (ABDOMEN_WINDOW.vmin, ABDOMEN_WINDOW.vmax) == (-160.0, 240.0)


# --------------------------------------------------------------------------- synthetic volumes

SPACING_XYZ = (0.8, 0.8, 2.5)  # mm, anisotropic: thick slices
SHAPE_ZYX = (40, 64, 64)


def _image(array: np.ndarray, direction, origin) -> "sitk.Image":
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(SPACING_XYZ)
    img.SetDirection(direction)
    img.SetOrigin(origin)
    return img


def _ct(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(40.0, 30.0, SHAPE_ZYX).astype(np.int16)


def write_lr_case(root, rng, name="case1"):
    """x axis flipped (direction -1 along x); reference Kidney_L on the patient's left, prediction on the right.

    Physical x = origin_x - 0.8 * i with origin_x = 25.2 mm. LPS: +x is the patient's Left.
    Reference columns i = 4..28 -> x from 22.0 down to 2.8 mm (> 0: left);
    prediction columns i = 36..60 -> x from -3.6 to -22.8 mm (< 0: right).
    In the raw array the reference sits in the LOW columns: without reorienting it
    would be drawn on the image left, i.e. the wrong side for radiological display.
    """
    direction = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    origin = (25.2, -25.0, -50.0)
    ref = np.zeros(SHAPE_ZYX, np.uint8)
    pred = np.zeros(SHAPE_ZYX, np.uint8)
    ref[16:24, 22:42, 4:29] = 3   # 8 slices x 2.5 = 20 mm (z), 20 x .8 = 16 mm (y), 25 x .8 = 20 mm (x)
    pred[16:24, 22:42, 36:61] = 3
    paths = {}
    for sub, arr, fname in (("images", _ct(rng), f"{name}_0000.nii.gz"), ("reference", ref, f"{name}.nii.gz"),
                            ("preds/m1/A", pred, f"{name}.nii.gz")):
        folder = root / sub
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(_image(arr, direction, origin), str(folder / fname))
        paths[sub] = folder
    return paths


def _render(tile):
    fig = tile_figure(tile, legend=False)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    bbox = fig.axes[0].get_window_extent()
    height = rgba.shape[0]
    rows = slice(int(round(height - bbox.y1)), int(round(height - bbox.y0)))
    cols = slice(int(round(bbox.x0)), int(round(bbox.x1)))
    return rgba, rgba[rows, cols]


def _near(rgb: np.ndarray, colour: np.ndarray, tol: float = 60.0) -> np.ndarray:
    return np.linalg.norm(rgb - colour, axis=-1) < tol


def test_plot_colours_are_the_documented_okabe_ito_pair():
    assert REFERENCE_COLOUR.lower() == "#0072b2" and PREDICTION_COLOUR.lower() == "#e69f00"


@pytest.mark.parametrize("plane", ["axial", "coronal"])
def test_patient_left_is_drawn_on_image_right(tmp_path, plane):
    paths = write_lr_case(tmp_path, np.random.default_rng(1))
    resolver = PathResolver.from_folders(paths["images"], paths["reference"], tmp_path / "preds/{model}/{centre}")
    row = dict(case="case1", structure="Kidney_L", label=3, model="m1", centre="A", condition="original",
               status="ok", dsc=0.0, hd95=40.0)
    tile = tile_for_row(row, resolver, plane=plane)
    assert tile.plane == plane
    _, ax_px = _render(tile)
    blue = np.argwhere(_near(ax_px, BLUE))
    orange = np.argwhere(_near(ax_px, ORANGE))
    assert len(blue) > 100 and len(orange) > 50  # both contours drawn (orange is dashed)
    mid = ax_px.shape[1] / 2
    assert blue[:, 1].min() > mid, "reference (patient left) must be entirely in the image's right half"
    assert orange[:, 1].max() < mid, "prediction (patient right) must be entirely in the image's left half"


def test_auto_plane_and_anisotropic_aspect(tmp_path):
    paths = write_lr_case(tmp_path, np.random.default_rng(2))
    resolver = PathResolver.from_folders(paths["images"], paths["reference"], tmp_path / "preds/{model}/{centre}")
    row = dict(case="case1", structure="Kidney_L", label=3, model="m1", centre="A", status="ok", dsc=0.0, hd95=40.0)
    tile = tile_for_row(row, resolver)
    # Disagreement area of the best slice per plane (both boxes are all disagreement):
    # axial: 2 boxes x 20 (y) x 25 (x) px x 0.8*0.8 mm^2 = 640 mm^2;
    # coronal: 2 x 8 (z) x 25 (x) px x 2.5*0.8 mm^2 = 800 mm^2;
    # sagittal: 1 box x 8 x 20 px x 2.5*0.8 mm^2 = 320 mm^2  -> coronal.
    assert tile.plane == "coronal"
    assert tile.disagreement == 2 * 8 * 25
    assert tile.aspect == pytest.approx(2.5 / 0.8)
    # The reference box is 20 mm (z) x 20 mm (x) in the coronal plane: drawn square on screen
    # only if the pixel aspect 2.5/0.8 is honoured (8 x 25 pixels otherwise: ratio 0.32).
    _, ax_px = _render(tile)
    blue = np.argwhere(_near(ax_px, BLUE))
    h = blue[:, 0].max() - blue[:, 0].min()
    w = blue[:, 1].max() - blue[:, 1].min()
    assert 0.85 < h / w < 1.18


def test_sagittal_anterior_left_superior_up_with_flipped_y_and_z():
    """Direction diag(1, -1, -1): the file's y and z axes point anterior and inferior.

    Physical y = -0.8 j and z = -2.5 k (origin 0). LPS: +y is posterior, +z superior.
    Reference at j = 40..59 (y < -31 mm: anterior) and k = 2..9 (z > -25 mm: superior);
    prediction at j = 4..23 (posterior) and k = 28..35 (inferior).
    Sagittal display: anterior on the left, superior at the top -> reference top-left,
    prediction bottom-right (without reorienting, both would be mirrored in both axes).
    """
    from oarbench.gallery import orient_lps

    rng = np.random.default_rng(3)
    direction = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)
    ref = np.zeros(SHAPE_ZYX, np.uint8)
    pred = np.zeros(SHAPE_ZYX, np.uint8)
    ref[2:10, 40:60, 20:40] = 1
    pred[28:36, 4:24, 20:40] = 1
    imgs = [orient_lps(_image(a, direction, (0.0, 0.0, 0.0))) for a in (_ct(rng), ref, pred)]
    assert imgs[0].GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    arrays = [sitk.GetArrayFromImage(i) for i in imgs]
    spacing = tuple(reversed(imgs[0].GetSpacing()))
    tile = make_tile(arrays[0], arrays[1] == 1, arrays[2] == 1, spacing, structure="Liver", plane="sagittal",
                     meta=dict(case="c", model="m", centre="A", dsc=0.0, hd95=50.0))
    _, ax_px = _render(tile)
    blue = np.argwhere(_near(ax_px, BLUE))
    orange = np.argwhere(_near(ax_px, ORANGE))
    rows_mid, cols_mid = ax_px.shape[0] / 2, ax_px.shape[1] / 2
    assert blue[:, 0].max() < rows_mid and blue[:, 1].max() < cols_mid  # top-left
    assert orange[:, 0].min() > rows_mid and orange[:, 1].min() > cols_mid  # bottom-right


def test_choose_slice_picks_most_disagreement_and_handles_agreement():
    ref = np.zeros((10, 12, 14), bool)
    pred = np.zeros_like(ref)
    ref[2:8, 3:9, 4:10] = True
    pred[2:8, 3:9, 4:10] = True
    pred[5, 3:9, 10:13] = True  # 6 x 3 = 18 extra voxels, all in axial slice 5
    plane, idx, n = choose_slice(ref, pred, (1.0, 1.0, 1.0), "axial")
    assert (plane, idx, n) == ("axial", 5, 18)
    # Perfect agreement: fall back to the slice with most voxels (first of equals: z = 2).
    plane, idx, n = choose_slice(ref, ref, (1.0, 1.0, 1.0), "axial")
    assert (plane, idx, n) == ("axial", 2, 0)
    with pytest.raises(ValueError, match="plane"):
        choose_slice(ref, pred, (1.0, 1.0, 1.0), "oblique")


def test_missed_tile_shows_reference_only():
    ref = np.zeros((20, 30, 30), bool)
    ref[5:15, 10:20, 10:20] = True
    tile = make_tile(np.zeros(ref.shape), ref, np.zeros_like(ref), (2.0, 1.0, 1.0), structure="Spleen",
                     meta=dict(case="c", model="m", centre="A", status="missed", dsc=0.0, hd95=math.inf))
    assert tile.reference.any() and not tile.prediction.any()
    assert "missed" in tile.title and "HD95 inf" in tile.title


# --------------------------------------------------------------------------- end to end


def _png_rgb(path) -> np.ndarray:
    from matplotlib.image import imread

    return (imread(str(path))[..., :3] * 255).round().astype(int)


def _results_csv(tmp_path) -> "Path":  # noqa: F821
    rows = [
        dict(study="s", centre="A", model="m1", condition="original", case="case1", structure="Kidney_L", label=3,
             status="ok", dsc=0.0, hd95=40.0, msd=30.0),
        dict(study="s", centre="A", model="m1", condition="original", case="case2", structure="Kidney_L", label=3,
             status="missed", dsc=0.0, hd95=math.inf, msd=math.inf),  # no files for case2
        dict(study="s", centre="A", model="m1", condition="flip_lr", case="case1", structure="Kidney_L", label=3,
             status="missed", dsc=0.0, hd95=math.inf, msd=math.inf),  # pattern has no {condition}
    ]
    path = tmp_path / "metrics.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _check_montage(out):
    montage = out / "gallery" / "Kidney_L.png"
    assert montage.is_file()
    rgb = _png_rgb(montage)
    assert rgb.std() > 10  # not blank
    assert _near(rgb, BLUE, 40).sum() > 100 and _near(rgb, ORANGE, 40).sum() > 50
    index = pd.read_csv(out / "gallery" / "index.csv")
    assert len(index) == 3
    drawn = index[index["drawn"]]
    assert list(drawn["case"]) == ["case1"] and list(drawn["condition"]) == ["original"]
    assert drawn["panel"].tolist() == [1] and drawn["plane"].tolist() == ["coronal"]
    notes = dict(zip(index["case"] + "/" + index["condition"], index["note"].fillna("")))
    assert "case2" in notes["case2/original"]
    assert "{condition}" in notes["case1/flip_lr"]
    assert (out / "gallery" / "index.html").is_file()


def test_cli_gallery_with_folders(tmp_path):
    from oarbench.cli import main

    paths = write_lr_case(tmp_path, np.random.default_rng(4))
    results = _results_csv(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["gallery", str(results), "--images", str(paths["images"]), "--reference",
                                    str(paths["reference"]), "--predictions", str(tmp_path / "preds/{model}/{centre}"),
                                    "--out", str(out), "--k", "2"])
    assert res.exit_code == 0, res.output
    _check_montage(out)


def test_cli_gallery_with_study_toml(tmp_path):
    from oarbench.cli import main

    write_lr_case(tmp_path, np.random.default_rng(5))
    (tmp_path / "study.toml").write_text(
        '[study]\nname = "s"\n\n[[centres]]\nname = "A"\nimages = "images"\nreference = "reference"\n\n'
        '[[models]]\nname = "m1"\ntrained_on = ["A"]\npredictions = "preds/{model}/{centre}"\n'
    )
    results = _results_csv(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["gallery", str(results), "--study", str(tmp_path / "study.toml"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    _check_montage(out)


def test_gallery_workers_draw_the_same_files(tmp_path):
    """Three montages (two, one and one tiles) drawn by three worker processes are the files one
    process draws, byte for byte, index and HTML included."""
    from oarbench.cli import main

    rng = np.random.default_rng(6)
    write_lr_case(tmp_path, rng)
    paths = write_lr_case(tmp_path, rng, name="case2")
    rows = [dict(study="s", centre="A", model="m1", condition="original", case=case, structure=structure, label=3,
                 status="ok", dsc=0.0, hd95=40.0, msd=30.0)
            for structure, cases in (("Kidney_L", ("case1", "case2")), ("Kidney_R", ("case1",)), ("Spleen", ("case2",)))
            for case in cases]
    results = tmp_path / "metrics.csv"
    pd.DataFrame(rows).to_csv(results, index=False)
    files = {}
    for workers in ("1", "3"):
        out = tmp_path / f"out{workers}"
        res = CliRunner().invoke(main, ["gallery", str(results), "--images", str(paths["images"]), "--reference",
                                        str(paths["reference"]), "--predictions", str(tmp_path / "preds/{model}/{centre}"),
                                        "--out", str(out), "--workers", workers, "--no-progress"])
        assert res.exit_code == 0, res.output
        assert "drew 4 tiles in 3 montages" in res.output
        files[workers] = {f.name: f.read_bytes() for f in sorted((out / "gallery").iterdir())}
    assert {"Kidney_L.png", "Kidney_R.png", "Spleen.png", "index.csv", "index.html"} <= set(files["1"])
    assert files["3"] == files["1"]


def test_cli_gallery_usage_errors(tmp_path):
    from oarbench.cli import main

    results = _results_csv(tmp_path)
    (tmp_path / "study.toml").write_text("[study]\nname='s'\n")
    runner = CliRunner()
    both = runner.invoke(main, ["gallery", str(results), "--study", str(tmp_path / "study.toml"), "--images", "x",
                                "--out", str(tmp_path / "o")])
    assert both.exit_code == 2 and "not both" in both.output
    neither = runner.invoke(main, ["gallery", str(results), "--out", str(tmp_path / "o")])
    assert neither.exit_code == 2
    bad_study = runner.invoke(main, ["gallery", str(results), "--study", str(tmp_path / "study.toml"), "--out", str(tmp_path / "o")])
    assert bad_study.exit_code != 0 and "[[centres]]" in bad_study.output


def test_plain_folders_with_several_models_are_refused(tmp_path):
    t = crafted_table()
    resolver = PathResolver.from_folders(tmp_path, tmp_path, tmp_path)
    with pytest.raises(ValueError, match="no \\{model\\} placeholder"):
        build_gallery(t[t["centre"] == "A"], resolver, tmp_path / "g")


def test_png_bytes_is_png():
    ref = np.zeros((8, 16, 16), bool)
    ref[2:6, 4:12, 4:12] = True
    pred = np.roll(ref, 2, axis=2)
    tile = make_tile(np.zeros(ref.shape), ref, pred, (1.0, 1.0, 1.0), structure="Liver")
    data = figure_png_bytes(tile_figure(tile))
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    from matplotlib.image import imread

    assert imread(io.BytesIO(data)).shape[2] in (3, 4)


def test_coronal_superior_is_up():
    # LPS array: z index grows toward Superior, so the reference (z = 30..35) is above the
    # prediction (z = 4..9) in a coronal view, both in coronal slice y = 10..19.
    ref = np.zeros((40, 30, 30), bool)
    pred = np.zeros_like(ref)
    ref[30:36, 10:20, 10:20] = True
    pred[4:10, 10:20, 10:20] = True
    tile = make_tile(np.zeros(ref.shape), ref, pred, (1.0, 1.0, 1.0), structure="Liver", plane="coronal")
    _, ax_px = _render(tile)
    blue = np.argwhere(_near(ax_px, BLUE))
    orange = np.argwhere(_near(ax_px, ORANGE))
    mid = ax_px.shape[0] / 2
    assert blue[:, 0].max() < mid < orange[:, 0].min()


# --------------------------------------------------------------------------- montage and box-plot layout


def _text_boxes(fig):
    """Window extents (pixels) of every visible, non-empty text of a drawn figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    from matplotlib.text import Text

    texts = [t for t in fig.findobj(match=Text) if t.get_visible() and str(t.get_text()).strip()]
    return [(t, t.get_window_extent(renderer)) for t in texts]


def test_montage_titles_are_never_clipped_nor_overlap_other_tiles():
    from oarbench.plots import montage_figure

    ref = np.zeros((10, 40, 40), bool)
    ref[3:7, 10:30, 10:30] = True
    long_meta = dict(case="patient_with_a_very_long_identifier_000123", structure="lung_lower_lobe_right_extra_long",
                     model="a-model-with-a-long-name", centre="Hospital-Universitario-Centre", condition="rot_z+10",
                     status="hallucinated", dsc=0.1234, hd95=87.5,
                     reason="low_dsc;high_hd95;outlier_dsc;outlier_hd95;robustness_drop")
    tiles = [make_tile(np.zeros(ref.shape), ref, np.roll(ref, k, axis=2), (2.5, 0.8, 0.8), structure="Liver",
                       meta=long_meta if k % 2 else dict(case=f"c{k}", structure="Liver", model="m", centre="A", dsc=0.9,
                                                         hd95=3.0))
             for k in range(1, 6)]
    fig = montage_figure(tiles, ncols=3, title="lung_lower_lobe_right_extra_long: failure cases (5) " * 3)
    boxes = _text_boxes(fig)
    W, H = fig.bbox.width, fig.bbox.height
    for t, bb in boxes:
        assert bb.x0 >= -0.5 and bb.y0 >= -0.5 and bb.x1 <= W + 0.5 and bb.y1 <= H + 0.5, (t.get_text(), bb, W, H)
    titles = [(ax.title, ax.title.get_window_extent()) for ax in fig.axes]
    assert len(titles) == 5
    for i, (t, bb) in enumerate(titles):
        # the whole title is shown: every part of the case and structure name is in it
        assert "patient_with_a_very_long" in t.get_text().replace("\n", "") or "c" in t.get_text()
        for j, ax in enumerate(fig.axes):
            assert not bb.overlaps(ax.get_window_extent()), (i, j)  # no title runs into any image
        for j, (_, other) in enumerate(titles):
            if j != i:
                assert not bb.overlaps(other), (i, j)
        # and no title overlaps the figure title or the legend band above the first row
    top_texts = [bb for t, bb in boxes if t not in [tt for tt, _ in titles] and bb.y0 > max(b.y1 for _, b in titles) - 1]
    assert top_texts, "figure title and legend are above every tile title"
    long = [t.get_text() for t, _ in titles if "patient" in t.get_text()]
    assert long and all("lung_lower_lobe_right" in x.replace("\n", "") or "lung_lower_lobe_right_extra_long"[:20]
                        in x.replace("\n", "") for x in long)


def test_box_plot_has_a_legend_for_the_hatches_and_plain_dsc_label():
    from oarbench.plots import box_plot_figure

    rows = [dict(centre=c, model=m, condition="original", case=f"{c}{i}", structure="Liver", status="ok",
                 dsc=0.9 - 0.01 * i, hd95=3.0 + i, msd=1.0) for m in ("fl", "local-A") for c in ("A", "B") for i in range(4)]
    fig = box_plot_figure(pd.DataFrame(rows), "Liver")
    assert fig.axes[0].get_ylabel() == "DSC"
    legends = fig.legends
    assert legends, "no figure legend"
    labels = [t.get_text() for t in legends[-1].get_texts()]
    assert labels == ["fl", "local-A"]
    hatches = [p.get_hatch() or "" for p in legends[-1].get_patches()]
    boxes = [p for p in fig.axes[0].patches]
    # each legend entry carries the hatch of its model's boxes (box order: centre A fl, A local-A, B fl, B local-A)
    assert hatches == [boxes[0].get_hatch() or "", boxes[1].get_hatch() or ""] and hatches[0] != hatches[1]
    for t, bb in _text_boxes(fig):
        assert bb.x0 >= -0.5 and bb.x1 <= fig.bbox.width + 0.5 and bb.y1 <= fig.bbox.height + 0.5, t.get_text()


def test_cli_gallery_says_no_failures_and_records_its_rules(tmp_path):
    from oarbench.cli import main

    paths = write_lr_case(tmp_path, np.random.default_rng(6))
    results = tmp_path / "metrics.csv"
    pd.DataFrame([dict(study="s", centre="A", model="m1", condition="original", case="case1", structure="Kidney_L",
                       label=3, status="ok", dsc=0.0, hd95=40.0, msd=30.0)]).to_csv(results, index=False)
    args = ["gallery", str(results), "--images", str(paths["images"]), "--reference", str(paths["reference"]),
            "--predictions", str(tmp_path / "preds/{model}/{centre}")]
    # with both threshold rules off, the one bad row does not fail anything else
    res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "o1"), "--dsc-below", "off", "--hd95-above", "off"])
    assert res.exit_code == 0, res.output
    assert "no failures" in res.output
    assert pd.read_csv(tmp_path / "o1" / "gallery" / "index.csv").empty
    assert "No failures" in (tmp_path / "o1" / "gallery" / "index.html").read_text()
    import json

    rules = json.loads((tmp_path / "o1" / "gallery" / "selection.json").read_text())
    assert rules["dsc_below"] is None and rules["hd95_above"] is None and rules["drop_above"] == 0.1
    res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "o2"), "--dsc-below", "0.5"])
    assert res.exit_code == 0, res.output
    index = pd.read_csv(tmp_path / "o2" / "gallery" / "index.csv")
    assert list(index["reason"]) == ["low_dsc;high_hd95"]
    res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "o3"), "--dsc-below", "abc"])
    assert res.exit_code != 0 and "number or 'off'" in res.output


def test_outliers_must_also_be_clearly_worse_than_the_median():
    # DSC .999 x 4 and .996: IQR 0, so .996 is beyond the Tukey fence, but only .003 below the median (< .05):
    # not a failure. HD95 0 x 4 and 1.5 mm: beyond the fence, but only 1.5 mm above the median (< 2 mm).
    t = pd.DataFrame([_row(f"c{i}", 0.999, 0.0) for i in range(4)] + [_row("x", 0.996, 1.5)])
    assert select_failures(t).empty
    # .90 and 2.5 mm are beyond both the fences and the margins.
    t = pd.DataFrame([_row(f"c{i}", 0.999, 0.0) for i in range(4)] + [_row("x", 0.90, 2.5)])
    sel = select_failures(t)
    assert list(sel["case"]) == ["x"] and sel.loc[0, "reason"] == "outlier_dsc;outlier_hd95"
    # the margins are options
    t = pd.DataFrame([_row(f"c{i}", 0.999, 0.0) for i in range(4)] + [_row("x", 0.996, 1.5)])
    sel = select_failures(t, FailureCriteria(outlier_min_dsc=0.0, outlier_min_hd95=0.0))
    assert sel.loc[0, "reason"] == "outlier_dsc;outlier_hd95"


def test_island_sizes_26_connectivity():
    from oarbench.gallery import island_sizes

    m = np.zeros((10, 10, 10), bool)
    m[1:3, 1:3, 1:3] = True     # 8 voxels
    m[3, 3, 3] = True           # touches the cube's corner voxel (2,2,2) only by a corner: same component
    m[8, 8, 8] = True           # alone
    assert island_sizes(m).tolist() == [1, 9]
    assert island_sizes(np.zeros((3, 3, 3), bool)).size == 0


def test_gallery_and_report_flag_small_reference_islands(tmp_path):
    from oarbench.report import build_report

    paths = write_lr_case(tmp_path, np.random.default_rng(7))
    ref_file = paths["reference"] / "case1.nii.gz"
    img = sitk.ReadImage(str(ref_file))
    arr = sitk.GetArrayFromImage(img)
    arr[2, 2, 2] = 3           # a one-voxel island of Kidney_L far from the kidney
    out_img = sitk.GetImageFromArray(arr)
    out_img.CopyInformation(img)
    sitk.WriteImage(out_img, str(ref_file))
    table = pd.DataFrame([dict(study="s", centre="A", model="m1", condition="original", case="case1",
                               structure="Kidney_L", label=3, status="ok", dsc=0.0, hd95=40.0, msd=30.0)])
    resolver = PathResolver.from_folders(paths["images"], paths["reference"], tmp_path / "preds/{model}/{centre}")
    result = build_gallery(table, resolver, tmp_path / "gallery", small_island_voxels=5)
    row = result.index.iloc[0]
    # the kidney block (8 x 20 x 25 = 4000 voxels) and the island (1 voxel)
    assert (row["ref_islands"], row["ref_small_islands"], row["ref_smallest_island_voxels"]) == (2, 1, 1)
    text = build_report(tmp_path / "out", table, gallery_dir=tmp_path / "gallery", box_plots=False).read_text()
    assert "small reference islands" in text and "annotation slip" in text
    # with the size set below one voxel nothing is flagged
    result = build_gallery(table, resolver, tmp_path / "gallery0", small_island_voxels=0)
    assert result.index.iloc[0]["ref_small_islands"] == 0
    text = build_report(tmp_path / "out0", table, gallery_dir=tmp_path / "gallery0", box_plots=False).read_text()
    assert "small reference islands" not in text
