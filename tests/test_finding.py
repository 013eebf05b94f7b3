"""The study finding: paired within-centre comparisons, direction from the paired estimate,
non-inferiority at the run's margin with its interval, one correction over the finding, and
the metric named in the sentences. Each defect of the earlier median rule has a worked case."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from oarbench.finding import FINDING_COLUMNS, centre_shift_finding, finding_lines

TRAINED_ON = {"local-A": ("A",), "local-B": ("B",), "fl": ("A", "B")}


def _row(centre, a, b, structure, *, hl, lo, hi, p, med_a=0.9, med_b=0.9, metric="dsc", rbc=None, margin=0.01,
         p_ni=math.nan, ni_lo=math.nan, ni_hi=math.nan, n=12, condition="original"):
    return {"analysis": "paired", "centre": centre, "arm_a": a, "arm_b": b, "structure": structure, "metric": metric,
            "condition": condition, "n": n, "median_a": med_a, "median_b": med_b, "hl_shift": hl, "ci_low": lo,
            "ci_high": hi, "ci_level": 0.95, "rank_biserial": np.sign(hl) if rbc is None else rbc, "p": p,
            "p_adjusted": p, "verdict": "n.s." if not math.isnan(p) else "not testable (n<6)",
            "margin": margin, "ni_alpha": 0.025, "ni_ci_low": ni_lo, "ni_ci_high": ni_hi, "ni_ci_level": 0.95,
            "p_noninferiority": p_ni, "noninferiority_verdict": "", "unit": "patient", "zero_method": "pratt"}


def test_columns_and_interface_defaults():
    f = centre_shift_finding(pd.DataFrame([_row("B", "local-A", "local-B", "Liver", hl=-0.3, lo=-0.4, hi=-0.2,
                                                p=0.001)]), TRAINED_ON)
    assert list(f.columns) == list(FINDING_COLUMNS)
    for col in ("question", "model", "reference", "centre", "other", "structure", "verdict", "metric", "estimate",
                "ci_low", "ci_high", "margin", "p_adjusted", "test", "design"):
        assert col in f.columns
    r = f.iloc[0]
    assert (r.question, r.model, r.reference, r.centre, r.other) == ("local on other centre", "local-A", "local-B",
                                                                     "B", "A")
    assert r.verdict == "loses" and "same patients of centre B" in r.design
    assert isinstance(finding_lines(f), list) and finding_lines(f)


def test_direction_comes_from_the_paired_estimate_not_the_medians():
    # stats.csv: significant (fl better), Hodges-Lehmann +0.105, rank-biserial +0.81, but the
    # medians of the two arms point the other way (fl 0.80 < local-B 0.85). Arms in either order.
    for a, b, sign in (("local-A", "local-B", 1), ("local-B", "local-A", -1)):
        row = _row("B", a, b, "Spleen", hl=sign * 0.105, lo=sign * 0.05 if sign > 0 else -0.16,
                   hi=0.16 if sign > 0 else -0.05, p=1e-4, rbc=sign * 0.81,
                   med_a=0.80 if sign > 0 else 0.85, med_b=0.85 if sign > 0 else 0.80)
        f = centre_shift_finding(pd.DataFrame([row]), TRAINED_ON)
        r = f.iloc[0]
        assert r.model == "local-A" and r.median_model < r.median_reference  # the medians say "lower"
        assert r.estimate == pytest.approx(0.105) and r.ci_low == pytest.approx(0.05) and r.ci_high == pytest.approx(0.16)
        assert r.verdict == "better"
        text = finding_lines(f)[0]
        assert "better for 1 (Spleen +0.105 [+0.050, +0.160])" in text and "loses" not in text
    # lower-is-better metric: a positive shift of HD95 is worse
    f = centre_shift_finding(pd.DataFrame([_row("B", "local-A", "local-B", "Liver", hl=3.0, lo=1.0, hi=5.0, p=0.001,
                                                metric="hd95", med_a=4.0, med_b=6.0)]), TRAINED_ON, metric="hd95")
    assert f.iloc[0].verdict == "loses"


def test_holds_means_non_inferiority_shown_with_the_interval():
    # fl 0.0148 [0.0145, 0.0151] below local-A (adjusted p 4e-6): significantly lower, and the
    # whole interval is beyond the run's margin 0.01: inferior, never "holds"
    rows = [
        _row("A", "fl", "local-A", "Liver", hl=-0.0148, lo=-0.0151, hi=-0.0145, p=4e-6, p_ni=0.99,
             ni_lo=-0.0151, ni_hi=-0.0145),
        # within the margin, shown: holds
        _row("A", "fl", "local-A", "Spleen", hl=-0.002, lo=-0.004, hi=0.0, p=0.03, p_ni=0.0005,
             ni_lo=-0.004, ni_hi=0.0),
        # the interval crosses the margin: not shown (neither holds nor inferior)
        _row("A", "fl", "local-A", "Stomach", hl=-0.008, lo=-0.02, hi=0.004, p=0.2, p_ni=0.2,
             ni_lo=-0.02, ni_hi=0.004),
        # the test passes but the interval reaches the margin (ties): not shown
        _row("A", "fl", "local-A", "Pancreas", hl=-0.001, lo=-0.011, hi=0.01, p=0.5, p_ni=0.001,
             ni_lo=-0.011, ni_hi=0.01),
    ]
    f = centre_shift_finding(pd.DataFrame(rows), TRAINED_ON).set_index("structure")
    assert (f["margin"] == 0.01).all()
    assert f.loc["Liver", "verdict"] == "inferior"
    assert f.loc["Spleen", "verdict"] == "holds"
    assert f.loc["Stomach", "verdict"] == "not shown"
    assert f.loc["Pancreas", "verdict"] == "not shown"
    line = [x for x in finding_lines(f.reset_index()) if x.startswith("fl against local-A")][0]
    assert "centre A (local-A's own)" in line and "margin 0.01" in line
    assert "4 structures: holds for 1; inferior for 1 (Liver -0.015 [-0.015, -0.015]); not shown for 2" in line
    # another margin than the run's: stats' p-values are for 0.01, so nothing is claimed
    g = centre_shift_finding(pd.DataFrame(rows), TRAINED_ON, margin=0.02).set_index("structure")
    assert g["verdict"].str.startswith("not tested (stats used margin 0.01").all()


def test_non_inferiority_needs_the_pair_in_the_right_order_or_the_table():
    row = _row("A", "local-A", "fl", "Liver", hl=0.001, lo=-0.003, hi=0.004, p=0.5, p_ni=0.001,
               ni_lo=-0.003, ni_hi=0.004)
    f = centre_shift_finding(pd.DataFrame([row]), TRAINED_ON)
    r = f[f["question"] == "federated vs local"].iloc[0]
    assert r.verdict.startswith("not tested") and math.isnan(r.p_adjusted)
    assert r.estimate == pytest.approx(-0.001)  # still oriented fl - local-A


def _results(values: dict[tuple[str, str], np.ndarray], structure: str = "Liver") -> pd.DataFrame:
    rows = []
    for (model, centre), v in values.items():
        for i, x in enumerate(v):
            rows.append({"study": "s", "centre": centre, "model": model, "condition": "original",
                         "case": f"{centre}{i:02d}", "patient": f"{centre}{i:02d}", "structure": structure,
                         "status": "ok", "dsc": float(x), "hd95": 1.0, "msd": 1.0})
    return pd.DataFrame(rows)


def test_case_mix_is_not_a_loss():
    # local-A is identical, patient for patient, to local-B on B (and on A); B's patients are
    # harder (0.83 against 0.93). A rank-sum test of local-A on A against local-A on B calls
    # that a loss; the paired comparison on B's patients finds nothing.
    from oarbench.stats import run_stats

    rng = np.random.default_rng(0)
    on_a = 0.93 + rng.normal(0, 0.01, 15)
    on_b = 0.83 + rng.normal(0, 0.01, 15)
    table = _results({("local-A", "A"): on_a, ("local-A", "B"): on_b, ("local-B", "A"): on_a,
                      ("local-B", "B"): on_b})
    stats = run_stats(table, metrics=("dsc",), bootstrap=None)
    cross = stats[(stats["analysis"] == "cross-centre") & (stats["model"] == "local-A")].iloc[0]
    assert cross["p_adjusted"] < 1e-4  # what the earlier rule read as "loses"
    for source in ({}, {"table": table}):
        f = centre_shift_finding(stats, {"local-A": ("A",), "local-B": ("B",)}, **source)
        q = f[f["model"] == "local-A"].iloc[0]
        assert q.centre == "B" and q.reference == "local-B"
        assert q.verdict == "not testable (all differences zero)" and q.verdict != "loses"
        assert "paired" in q.design
    # a model the study declares but the table lacks is left out, not an error
    f = centre_shift_finding(stats, {"local-A": ("A",), "local-B": ("B",), "fl": ("A", "B")}, table=table)
    assert "fl" not in set(f["model"]) and len(f) == 2


def test_table_path_orients_the_pair_and_matches_scipy():
    # fl worse than local-A by ~0.004 on 14 patients; stats ran "local-A vs fl" (table order),
    # so the non-inferiority of fl needs the results table
    from oarbench.stats import run_stats

    rng = np.random.default_rng(3)
    base = 0.9 + rng.normal(0, 0.02, 14)
    d = np.array([-0.004, -0.002, -0.006, 0.001, -0.003, -0.005, -0.0035, -0.0045, 0.0005, -0.001, -0.007,
                  -0.0025, -0.0055, -0.0015])
    table = _results({("local-A", "A"): base, ("fl", "A"): base + d})
    stats = run_stats(table, metrics=("dsc",), margins={"dsc": 0.01}, bootstrap=None)
    assert stats.iloc[0]["arm_a"] == "local-A"
    f = centre_shift_finding(stats, {"local-A": ("A",), "fl": ("A", "B")}, table=table)
    r = f.iloc[0]
    assert (r.model, r.reference) == ("fl", "local-A")
    dd = (base + d) - base
    assert r.estimate == pytest.approx(np.median([(dd[i] + dd[j]) / 2 for i in range(14) for j in range(i, 14)]))
    p_ni = st.wilcoxon(np.round(dd + 0.01, 12), alternative="greater", method="exact").pvalue
    assert r.p == pytest.approx(p_ni) and r.family_size == 1
    assert r.p_adjusted == pytest.approx(p_ni)  # one test: Holm changes nothing
    assert r.ci_low > -0.01 and r.verdict == "holds"


def test_one_correction_across_the_finding():
    # two questions, each significant in its own stats family (p 0.03 and 0.02), and a
    # non-inferiority test (one-sided p 0.012 at 0.025): together one Holm family
    rows = [
        _row("B", "local-A", "local-B", "Liver", hl=-0.05, lo=-0.08, hi=-0.01, p=0.03),
        _row("A", "local-B", "local-A", "Liver", hl=-0.04, lo=-0.07, hi=-0.01, p=0.02),
        _row("A", "fl", "local-A", "Liver", hl=0.0, lo=-0.005, hi=0.005, p=0.9, p_ni=0.012, ni_lo=-0.005,
             ni_hi=0.005),
    ]
    f = centre_shift_finding(pd.DataFrame(rows), TRAINED_ON)
    # Holm by hand on the alpha scale (the one-sided p doubled: 0.012 * 0.05 / 0.025 = 0.024):
    # sorted 0.02, 0.024, 0.03 times 3, 2, 1 -> 0.06, 0.06 (running max of 0.048), 0.06
    ql = f[f["question"] == "local on other centre"].set_index("model")
    assert ql.loc["local-A", "p_adjusted"] == pytest.approx(0.06)
    assert ql.loc["local-B", "p_adjusted"] == pytest.approx(0.06)
    fl = f[f["question"] == "federated vs local"].iloc[0]
    assert fl.p_adjusted == pytest.approx(0.03)  # 0.06 back on the one-sided scale
    assert (f["family_size"] == 3).all()
    assert (ql["verdict"] == "no significant difference").all() and fl.verdict == "not shown"
    assert "holm-adjusted across the finding's 3 tests" in finding_lines(f)[0]


def test_metric_is_named_in_the_sentences():
    rows = [_row("B", "local-A", "local-B", "Liver", hl=2.5, lo=1.0, hi=4.0, p=0.001, metric="hd95"),
            _row("B", "local-A", "local-B", "Liver", hl=-0.2, lo=-0.3, hi=-0.1, p=0.001, metric="dsc")]
    f = centre_shift_finding(pd.DataFrame(rows), TRAINED_ON, metric="hd95")
    assert len(f) == 1 and f.iloc[0].metric == "hd95" and f.iloc[0].verdict == "loses"
    text = finding_lines(f)[0]
    assert "HD95 mm" in text and "DSC" not in text
    assert "loses for 1 (Liver +2.50 [+1.00, +4.00])" in text
