"""False-positive kidneys after nephrectomy, on crafted cases with analytic blob volumes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats as st
from scipy.stats import wilcoxon
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from oarbench.absent import absent_side_volume, analyse_absent, read_nephrectomy, write_absent
from oarbench.io import Volume, write_volume
from oarbench.labels import DEFAULT_LABELS

SPACING = (0.5, 0.5, 0.5)  # mm
SHAPE = (64, 96, 64)  # (z, y, x) voxels: 32 x 48 x 32 mm
KL, KR = DEFAULT_LABELS.value("Kidney_L"), DEFAULT_LABELS.value("Kidney_R")


def radius_for(ml: float) -> float:
    """Radius in mm of a sphere of ``ml`` millilitres: V = 4/3 pi r^3, 1 mL = 1000 mm^3."""
    return (3 * ml * 1000.0 / (4 * math.pi)) ** (1 / 3)


def sphere(arr: np.ndarray, label: int, centre_mm, r_mm: float) -> None:
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    cz, cy, cx = (c / s for c, s in zip(centre_mm, SPACING))
    inside = ((z - cz) * SPACING[0]) ** 2 + ((y - cy) * SPACING[1]) ** 2 + ((x - cx) * SPACING[2]) ** 2 <= r_mm**2
    arr[inside] = label


def vol(arr) -> Volume:
    return Volume(arr, SPACING, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


# case -> nephrectomy side; the last two have both kidneys
META = {"c1": "left", "c2": "left", "c3": "right", "c4": "left", "c5": "right", "c6": "none", "c7": "none"}
# Blob centre in mm (z, y, x), deliberately off the voxel lattice: a sphere centred on a voxel
# centre is the worst case of the lattice-point count (whole symmetric shells of voxels enter
# at once, +-1.1 % at 8 voxels radius); for a generic centre the count error averages out
# over the boundary shell and stays well under 1 % from about 8 voxels of radius on.
BLOB_CENTRE = (16.13, 32.07, 16.21)
# model -> case -> blob volume (mL) on the absent side, centred at BLOB_CENTRE. Smallest blob
# 0.3 mL: r = 4.15 mm = 8.3 voxels; largest 7 mL: r = 11.86 mm, inside the grid (y 20.1..43.9 mm)
# and 17.9 mm from the remaining kidney (radius 5 mm): no contact
BLOBS = {"A": {"c1": 0.3, "c2": 0.8, "c3": 7.0}, "B": {"c1": 3.0}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("absent")
    absent_label = {"left": KL, "right": KR}
    for case, side in META.items():
        ref = np.zeros(SHAPE, np.uint8)
        if side != "left" and case != "c7":  # c7: reference Kidney_L empty although metadata says none
            sphere(ref, KL, (16, 16, 24), 5.0)
        if side != "right":
            sphere(ref, KR, (16, 16, 8), 5.0)
        if case == "c2":  # metadata says left removed, reference still draws a left kidney
            sphere(ref, KL, (16, 16, 24), 3.0)
        write_volume(vol(ref), root / "ref" / f"{case}.nii.gz")
        for model, blobs in BLOBS.items():
            pred = np.zeros(SHAPE, np.uint8)
            # the remaining kidney, correctly labelled: must not count
            if side == "left":
                sphere(pred, KR, (16, 16, 8), 5.0)
            if side == "right":
                sphere(pred, KL, (16, 16, 24), 5.0)
            if case in blobs:
                sphere(pred, absent_label[side], BLOB_CENTRE, radius_for(blobs[case]))
            write_volume(vol(pred), root / model / f"{case}.nii.gz")
    (root / "meta.csv").write_text("case,centre,nephrectomy\n" + "".join(f"{c},X,{s}\n" for c, s in META.items()))
    return root


def _preds(root):
    return {m: {c: root / m / f"{c}.nii.gz" for c in META} for m in BLOBS}


def test_rates_volumes_components(study):
    refs = {c: study / "ref" / f"{c}.nii.gz" for c in META}
    res = analyse_absent(read_nephrectomy(study / "meta.csv"), _preds(study), references=refs)
    cases = res.cases.set_index(["model", "case"])
    assert len(res.cases) == 2 * 5  # 5 nephrectomy cases x 2 models; none-cases not analysed
    for model, blobs in BLOBS.items():
        for case in ("c1", "c2", "c3", "c4", "c5"):
            row = cases.loc[(model, case)]
            if case in blobs:
                # the voxelised sphere is within 1 % of 4/3 pi r^3 (r >= 8.3 voxels)
                assert row["pred_ml"] == pytest.approx(blobs[case], rel=0.01)
                assert row["n_components"] == 1 and row["largest_ml"] == row["pred_ml"]
                assert row["status"] == "fp"
            else:
                assert row["pred_ml"] == 0.0 and row["n_components"] == 0 and row["status"] == "clean"
    s = res.summary.set_index(["model", "threshold_ml"])
    # FP = volume > threshold. A: 0.3, 0.8, 7.0 mL in 3 of 5 -> 3/5, 2/5, 1/5, 1/5; B: 3.0 in 1 of 5
    for t, a, b in ((0.0, 3, 1), (0.5, 2, 1), (1.0, 1, 1), (5.0, 1, 0)):
        assert s.loc[("A", t), "fp_rate"] == a / 5 and s.loc[("B", t), "fp_rate"] == b / 5
    vols_a = np.array([cases.loc[("A", c), "pred_ml"] for c in ("c1", "c2", "c3", "c4", "c5")])
    assert s.loc[("A", 0.0), "median_ml"] == np.median(vols_a)  # the 0.3 mL blob
    assert s.loc[("A", 0.0), "max_ml"] == vols_a.max()
    assert s.loc[("A", 0.0), "q3_ml"] == np.percentile(vols_a, 75)
    # every FP case listed for the gallery
    assert sorted(zip(res.fp_cases["model"], res.fp_cases["case"])) == [("A", "c1"), ("A", "c2"), ("A", "c3"), ("B", "c1")]
    # warnings: c7's empty Kidney_L without nephrectomy; c2's reference still has a left kidney
    w = res.warnings.set_index("case")
    assert set(w.index) == {"c7", "c2"} and "empty" in w.loc["c7", "message"]


def test_pairs_match_statsmodels_and_scipy(study):
    res = analyse_absent(read_nephrectomy(study / "meta.csv"), _preds(study))
    p = res.pairs.set_index("threshold_ml")
    row = p.loc[0.0]
    # FP at 0 mL: A in c1, c2, c3; B in c1 -> both 1, A only 2, B only 0, neither 2
    assert (row["fp_both"], row["fp_a_only"], row["fp_b_only"], row["fp_neither"]) == (1, 2, 0, 2)
    # exact McNemar = two-sided binomial on 2 discordant pairs, both one way: 2 * 0.5^2 = 0.5,
    # which cannot reach 0.05: not testable, no p-value, out of the family
    assert mcnemar(np.array([[1, 2], [0, 2]]), exact=True).pvalue == 0.5
    assert math.isnan(row["mcnemar_p"])
    assert row["mcnemar_verdict"].startswith("not testable")  # 2 discordant: smallest p 0.5
    # 5 mL: A only in c3 (7 mL), B none
    assert p.loc[5.0, "fp_a_only"] == 1 and p.loc[5.0, "fp_b_only"] == 0
    va = res.cases[res.cases["model"] == "A"].sort_values("case")["pred_ml"].to_numpy()
    vb = res.cases[res.cases["model"] == "B"].sort_values("case")["pred_ml"].to_numpy()
    assert row["wilcoxon_n_nonzero"] == 3
    # the signed-rank code of oarbench stats: 3 non-zero differences are too few for any test
    # (smallest exact two-sided p 2/2**3 = 0.25), so no p-value, and scipy's asymptotic
    # zero-dropping p (what this analysis used before) is not reported
    assert math.isnan(row["wilcoxon_p"]) and row["wilcoxon_verdict"].startswith("not testable")
    assert not math.isnan(wilcoxon(va, vb, zero_method="wilcox").pvalue)
    # the family holds only testable p-values (none here)
    assert (p["correction"] == "holm").all() and (p["family_size"] == 0).all()
    tested = p["mcnemar_p"].dropna().to_numpy()
    np.testing.assert_allclose(p["mcnemar_p_adjusted"].dropna(), multipletests(tested, method="holm")[1])


def test_absent_volume_test_is_the_exact_signed_rank_of_stats():
    from oarbench.absent import compare_models
    from oarbench.stats import signed_rank_test

    # 8 cases: model A's FP volumes exceed B's on 7 of them, one tie at 0 mL
    va = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    vb = np.array([0.0, 0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 9.0])
    rows = []
    for i in range(8):
        rows.append(dict(centre="X", case=f"c{i}", model="A", status="ok", pred_ml=va[i]))
        rows.append(dict(centre="X", case=f"c{i}", model="B", status="ok", pred_ml=vb[i]))
    out = compare_models(pd.DataFrame(rows), thresholds_ml=(0.0,))
    ref = signed_rank_test(va - vb, zero_method="pratt")
    # a zero difference: the exact permutation path, not scipy's asymptotic default
    assert ref.p_method == "exact-permutation" and out.loc[0, "wilcoxon_p_method"] == "exact-permutation"
    assert out.loc[0, "wilcoxon_p"] == ref.p
    # brute force over the 2**7 sign patterns of the 7 non-zero differences (pratt: zero ranked)
    import itertools
    d = va - vb
    r = st.rankdata(np.abs(d))
    nz = d != 0
    obs = r[d > 0].sum()
    stats_all = [sum(rk for rk, s in zip(r[nz], signs) if s) for signs in itertools.product((0, 1), repeat=7)]
    p_le = np.mean([x <= obs + 1e-9 for x in stats_all])
    p_ge = np.mean([x >= obs - 1e-9 for x in stats_all])
    assert out.loc[0, "wilcoxon_p"] == pytest.approx(min(1, 2 * min(p_le, p_ge)), abs=1e-12)
    # one McNemar test and one Wilcoxon test form the family: Holm over both
    fam = np.array([out.loc[0, "mcnemar_p"], out.loc[0, "wilcoxon_p"]])
    adj = multipletests(fam[~np.isnan(fam)], method="holm")[1]
    assert out.loc[0, "wilcoxon_p_adjusted"] == pytest.approx(adj[-1])
    assert out.loc[0, "family_size"] == (~np.isnan(fam)).sum()


def test_untestable_mcnemar_stays_out_of_the_family():
    # McNemar with 5 or fewer discordant cases cannot reach p < 0.05 (2 / 2**5 = 0.0625): like
    # oarbench stats, such a test has no p-value and does not enter the Holm family
    from oarbench.absent import compare_models

    va = [0, 0, .3, .7, 1.2, 6, 8, 0, 2, .6, 0, 3.3]
    vb = [0, 0, 0, 0, 0, 0, .2, 0, 0, 0, .4, 0]
    rows = [dict(centre="X", case=f"c{i}", model=m, status="ok", pred_ml=v)
            for m, vals in (("A", va), ("B", vb)) for i, v in enumerate(vals)]
    out = compare_models(pd.DataFrame(rows)).set_index("threshold_ml")
    # discordant cases per threshold, counted by hand: 0 mL: 7 A only + 1 B only; 0.5: 7; 1: 5; 5: 2
    assert [int(out.loc[t, "fp_a_only"] + out.loc[t, "fp_b_only"]) for t in (0.0, 0.5, 1.0, 5.0)] == [8, 7, 5, 2]
    assert out.loc[[1.0, 5.0], "mcnemar_p"].isna().all()
    assert out.loc[[1.0, 5.0], "mcnemar_verdict"].str.startswith("not testable").all()
    # the family: McNemar at 0 and 0.5 mL and the Wilcoxon test (9 non-zero differences)
    p_mc = [st.binomtest(1, 8).pvalue, st.binomtest(0, 7).pvalue]
    p_w = signed_rank_p = out.loc[0.0, "wilcoxon_p"]
    assert out.loc[0.0, "mcnemar_p"] == pytest.approx(p_mc[0]) and out.loc[0.5, "mcnemar_p"] == pytest.approx(p_mc[1])
    # Holm by hand over the three: sorted p times (3, 2, 1), running maximum
    ps = sorted([*p_mc, signed_rank_p])
    holm = np.maximum.accumulate([min(1.0, p * (3 - i)) for i, p in enumerate(ps)])
    assert (out["family_size"] == 3).all()
    assert out.loc[0.5, "mcnemar_p_adjusted"] == pytest.approx(holm[ps.index(p_mc[1])])
    assert out.loc[0.0, "wilcoxon_p_adjusted"] == pytest.approx(holm[ps.index(p_w)])
    assert out.loc[0.5, "mcnemar_p_adjusted"] == pytest.approx(0.03515625)
    assert out.loc[0.5, "mcnemar_verdict"] == "different" and out.loc[0.0, "wilcoxon_verdict"] == "different"


def test_all_equal_models_are_not_testable(study):
    preds = {"A": _preds(study)["A"], "A2": _preds(study)["A"]}
    res = analyse_absent(read_nephrectomy(study / "meta.csv"), preds)
    assert res.pairs["mcnemar_p"].isna().all() and res.pairs["wilcoxon_p"].isna().all()
    assert (res.pairs["mcnemar_verdict"] == "not testable: no discordant cases").all()


def test_components_use_26_connectivity():
    arr = np.zeros((8, 8, 8), np.uint8)
    arr[1, 1, 1] = arr[2, 2, 2] = KL  # corner-touching: one component with 26-connectivity
    arr[5:7, 5:7, 5:7] = KL  # a separate 8-voxel cube
    ml, n, largest = absent_side_volume(arr, KL, 0.001)
    assert (n, ml, largest) == (2, pytest.approx(0.010), pytest.approx(0.008))
    assert absent_side_volume(arr, KR, 0.001) == (0.0, 0, 0.0)


def test_metadata_is_strict(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("case,nephrectomy\na,Left \nb,\n")
    with pytest.raises(ValueError, match=r"row 3 .*'b'"):
        read_nephrectomy(p)
    p.write_text("case,side\na,left\n")
    with pytest.raises(ValueError, match="nephrectomy"):
        read_nephrectomy(p)
    p.write_text("case,centre,nephrectomy\na,X,LEFT\nb,Y,right\n")
    assert read_nephrectomy(p, centre="X") == {"a": "left"}


def test_missing_prediction_is_counted_not_dropped(study):
    preds = {"A": {c: f for c, f in _preds(study)["A"].items() if c != "c5"}}
    res = analyse_absent(read_nephrectomy(study / "meta.csv"), preds)
    s = res.summary.set_index("threshold_ml")
    assert s.loc[0.0, "n_cases"] == 4 and s.loc[0.0, "n_missing"] == 1 and s.loc[0.0, "fp_rate"] == 3 / 4


def test_cli_folders_and_study(study, tmp_path):
    from oarbench.cli import main

    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["absent", "--metadata", str(study / "meta.csv"), "--predictions", f"A={study / 'A'}",
                                  "--predictions", f"B={study / 'B'}", "--reference", str(study / "ref"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    for name in ("absent.csv", "absent_summary.csv", "absent_pairs.csv", "absent_cases.csv"):
        assert (out / name).is_file()
    assert len(pd.read_csv(out / "absent_cases.csv")) == 4
    assert "c7" in r.output  # the warning is shown
    toml = tmp_path / "s.toml"
    toml.write_text(f"""
[study]
name = "s"
[[centres]]
name = "X"
reference = "{study / 'ref'}"
metadata = "{study / 'meta.csv'}"
[[models]]
name = "A"
predictions = "{study}/{{model}}"
[[models]]
name = "B"
predictions = "{study}/{{model}}"
[absent]
thresholds_ml = [0, 2]
""")
    r2 = CliRunner().invoke(main, ["absent", str(toml), "--out", str(tmp_path / "o2")])
    assert r2.exit_code == 0, r2.output
    summ = pd.read_csv(tmp_path / "o2" / "absent_summary.csv")
    assert sorted(set(summ["threshold_ml"])) == [0.0, 2.0]
    assert summ.set_index(["model", "threshold_ml"]).loc[("A", 2.0), "n_fp"] == 1
    bad = CliRunner().invoke(main, ["absent", "--metadata", str(tmp_path / "nope.csv"), "--predictions", str(study / "A"),
                                    "--out", str(tmp_path / "o3")])
    assert bad.exit_code != 0 and "not found" in bad.output


def test_write_is_atomic_and_complete(study, tmp_path):
    res = analyse_absent(read_nephrectomy(study / "meta.csv"), _preds(study))
    paths = write_absent(res, tmp_path)
    assert all(p.is_file() for p in paths.values())
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_cli_shows_each_warning_once(study, tmp_path, monkeypatch):
    import logging

    from oarbench.cli import main

    # as in a plain `oarbench absent` run: no logging handlers (pytest adds its own), so the
    # logging module's last-resort handler would print a library warning to stderr as well
    monkeypatch.setattr(logging.root, "handlers", [])
    r = CliRunner().invoke(main, ["absent", "--metadata", str(study / "meta.csv"), "--predictions", f"A={study / 'A'}",
                                  "--reference", str(study / "ref"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    warnings = pd.read_csv(tmp_path / "o" / "absent_warnings.csv")
    assert len(warnings) >= 2  # c7's empty kidney without nephrectomy, c2's kidney despite it
    for message in warnings["message"]:
        assert r.output.count(message) == 1, r.output
