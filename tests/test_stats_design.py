"""Study design in the statistics: non-inferiority convention, patients with several scans,
bootstrap intervals (resampling patients), correction families, one-arm-absent pairs.

Expected values are derived in the comments or come from independent computations
(explicit resampling, scipy, statsmodels).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from statsmodels.stats.multitest import multipletests

from oarbench import stats as S
from oarbench.cli import main


def _rows(values_a, values_b, patients=None, metric="dsc", structure="Liver", centre="A", statuses=None):
    rows = []
    for i, (va, vb) in enumerate(zip(values_a, values_b)):
        for model, v in (("a", va), ("b", vb)):
            st = statuses[i][0 if model == "a" else 1] if statuses else "ok"
            rows.append(dict(study="t", centre=centre, model=model, condition="original", case=f"s{i:02d}",
                             patient=patients[i] if patients is not None else f"s{i:02d}",
                             structure=structure, status=st,
                             dsc=v if metric == "dsc" else 0.8, hd95=v if metric == "hd95" else 3.0,
                             msd=1.0))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# Non-inferiority: one-sided 0.025 with the matching two-sided 95 % interval
# ---------------------------------------------------------------------------


def test_noninferiority_fails_under_the_old_one_sided_005_rule():
    # d + m = 0.001 * [1, 2, 3, -4, 5, -6, 7, 8, 9, 10] (m = 0.01, DSC): no ties, n = 10.
    # T- = 4 + 6 = 10; exact one-sided p = P(T- <= 10) = 43/1024 = 0.0420 (counting the
    # subsets of {1..10} with sum <= 10: 1, 1, 1, 2, 2, 3, 4, 5, 6, 8, 10 for sums 0..10).
    # Old rule (alpha 0.05): non-inferior. New rule (0.025): not shown. And the 95 % interval
    # agrees with the new verdict: for untied data the number of negative Walsh averages of
    # d + m is T- = 10, and the 95 % interval's lower bound is the 9th smallest Walsh average
    # (n = 10: critical value 8, P(T <= 8) = 25/1024), so the lower bound of d is below -m: the interval crosses.
    m = 0.01
    shifted = 0.001 * np.array([1, 2, 3, -4, 5, -6, 7, 8, 9, 10], dtype=float)
    d = shifted - m
    b = np.full(10, 0.85) + 0.001 * np.arange(10)
    a = b + d
    t = _rows(a, b)
    counts = [1, 1, 1, 2, 2, 3, 4, 5, 6, 8, 10]
    p_exact = sum(counts) / 1024
    new = S.paired_comparisons(t, metrics=["dsc"], margins={"dsc": m}).iloc[0]
    assert new["p_noninferiority"] == pytest.approx(p_exact, abs=1e-12)
    assert new["ni_alpha"] == 0.025 and new["ni_ci_level"] == pytest.approx(1 - 2 * 25 / 1024)
    assert new["ni_ci_low"] < -m < new["ni_ci_high"]  # the printed interval crosses the margin
    assert not bool(new["noninferior"])
    assert new["noninferiority_verdict"] == "non-inferiority not shown (margin 0.01)"
    # the old rule (one-sided 0.05) would have declared it; with ni_alpha = 0.05 the interval is
    # the 90 % one, which clears the margin, so verdict and interval agree again
    old = S.paired_comparisons(t, metrics=["dsc"], margins={"dsc": m}, ni_alpha=0.05).iloc[0]
    assert bool(old["noninferior"]) and old["ni_ci_low"] > -m
    assert old["ni_ci_level"] == pytest.approx(1 - 2 * 43 / 1024)  # achieved exact coverage


def test_noninferiority_verdict_never_contradicts_its_interval():
    rng = np.random.default_rng(11)
    for _ in range(6):
        n = int(rng.integers(6, 20))
        b = 0.85 + rng.normal(0, 0.02, n)
        a = b + rng.normal(-0.004, 0.01, n)
        row = S.paired_comparisons(_rows(a, b), metrics=["dsc"], margins={"dsc": 0.01},
                                   bootstrap=None).iloc[0]
        if bool(row["noninferior"]):
            assert row["ni_ci_low"] > -0.01


# ---------------------------------------------------------------------------
# Patients with several scans
# ---------------------------------------------------------------------------


def test_aggregate_by_patient_by_hand():
    means, ids = S.aggregate_by_patient([1.0, 3.0, 5.0, np.inf, 2.0], ["p1", "p1", "p2", "p3", "p3"])
    assert list(ids) == ["p1", "p2", "p3"]
    assert means[0] == 2.0 and means[1] == 5.0 and means[2] == np.inf  # a failure is not averaged away


def test_clustered_data_default_is_per_patient_and_differs_from_per_scan():
    # 5 patients with 4 scans each; model a beats b by 0.01..0.04 DSC on every scan.
    # Per scan: 20 positive differences, exact two-sided p = 2 / 2**20 (significant).
    # Per patient (default): 5 patient means, fewer than 6 pairs: not testable (the
    # smallest attainable p would be 2 / 2**5 = 0.0625). The scans are not independent evidence.
    patients = [f"p{i // 4}" for i in range(20)]
    b = np.full(20, 0.80)
    a = b + 0.01 * (1 + np.arange(20) % 4) + 0.0001 * np.arange(20)
    t = _rows(a, b, patients=patients)
    default = S.paired_comparisons(t, metrics=["dsc"], bootstrap=None).iloc[0]
    assert default["unit"] == "patient" and default["n"] == 5
    assert default["n_patients"] == 5 and default["n_scans"] == 20
    assert default["verdict"] == "not testable (n<6)"
    with pytest.warns(S.ClusteringWarning, match="5 patient"):
        per_scan = S.paired_comparisons(t, metrics=["dsc"], unit="scan", bootstrap=None).iloc[0]
    assert per_scan["n"] == 20 and per_scan["p"] == pytest.approx(2 / 2**20)
    assert per_scan["verdict"] == "significant (a better)"


def test_per_patient_means_enter_the_test():
    # 7 patients, 1-3 scans each: the test is the signed-rank test of the patient means
    rng = np.random.default_rng(5)
    patients = ["p0", "p0", "p1", "p2", "p2", "p2", "p3", "p4", "p5", "p5", "p6"]
    a = 0.8 + rng.normal(0, 0.02, len(patients))
    b = 0.8 + rng.normal(0, 0.02, len(patients))
    row = S.paired_comparisons(_rows(a, b, patients=patients), metrics=["dsc"], bootstrap=None).iloc[0]
    pa = pd.Series(a).groupby(patients, sort=False).mean().to_numpy()
    pb = pd.Series(b).groupby(patients, sort=False).mean().to_numpy()
    ref = S.signed_rank_test(pa - pb)
    assert row["n"] == 7 and row["n_scans"] == 11 and row["p"] == ref.p
    assert row["median_a"] == pytest.approx(np.median(pa))


def test_cross_centre_per_patient():
    rows = []
    for centre, n, base in (("X", 8, 0.8), ("Y", 8, 0.7)):
        for i in range(n):
            for k in range(2):  # two scans per patient
                rows.append(dict(study="t", centre=centre, model="m", condition="original",
                                 case=f"{centre}{i}-{k}", patient=f"{centre}{i}", structure="Liver",
                                 status="ok", dsc=base + 0.01 * i + 0.001 * k, hd95=1.0, msd=1.0))
    out = S.centre_comparisons(pd.DataFrame(rows), metrics=["dsc"]).iloc[0]
    assert out["n_a"] == 8 and out["n_b"] == 8 and out["n_scans"] == 32 and out["n_patients"] == 16


# ---------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------


def test_cluster_bootstrap_equals_explicit_resampling():
    # The weighted statistic must equal np.median / np.mean of the explicitly expanded resample.
    rng = np.random.default_rng(0)
    values = rng.normal(0, 1, 12)
    values[3] = np.inf
    clusters = np.array(["a", "a", "b", "c", "c", "c", "d", "e", "e", "f", "g", "h"])
    opts = S.BootstrapOptions(n_resamples=200, seed=42)
    lo, hi = S.cluster_bootstrap_ci(values, clusters, "median", opts)
    # replay the same draws: multinomial counts over the sorted unique cluster labels
    uniq = np.unique(clusters)
    counts = np.random.default_rng(42).multinomial(len(uniq), np.full(len(uniq), 1 / len(uniq)), size=200)
    meds = []
    for c in counts:
        sample = np.concatenate([np.repeat(values[clusters == u], k) for u, k in zip(uniq, c)])
        meds.append(np.median(sample))
    meds = np.array(meds)
    meds[np.isnan(meds)] = np.inf  # np.median of (inf, inf) middle pair is inf already; guard
    assert lo == pytest.approx(np.quantile(meds, 0.025)) and hi == pytest.approx(np.quantile(meds, 0.975))
    lo_m, hi_m = S.cluster_bootstrap_ci(np.where(np.isinf(values), 9.0, values), clusters, "mean", opts)
    v9 = np.where(np.isinf(values), 9.0, values)
    means = [np.mean(np.concatenate([np.repeat(v9[clusters == u], k) for u, k in zip(uniq, c)])) for c in counts]
    assert lo_m == pytest.approx(np.quantile(means, 0.025)) and hi_m == pytest.approx(np.quantile(means, 0.975))


def test_bootstrap_ci_is_scipy_percentile():
    from scipy.stats import bootstrap

    v = np.random.default_rng(3).normal(2, 1, 25)
    opts = S.BootstrapOptions(n_resamples=500, seed=7)
    ref = bootstrap((v,), np.median, n_resamples=500, method="percentile", rng=np.random.default_rng(7))
    lo, hi = S.bootstrap_ci(v, "median", opts)
    assert lo == pytest.approx(ref.confidence_interval.low) and hi == pytest.approx(ref.confidence_interval.high)
    bca = S.bootstrap_ci(v, "mean", S.BootstrapOptions(n_resamples=500, seed=7, method="bca"))
    ref_bca = bootstrap((v,), np.mean, n_resamples=500, method="BCa", rng=np.random.default_rng(7))
    assert bca == pytest.approx((ref_bca.confidence_interval.low, ref_bca.confidence_interval.high))


def test_cluster_bootstrap_coverage_on_simulated_clustered_data():
    # 300 simulated studies of 25 patients with 1-3 scans each: patient effect N(0, 1), scan
    # noise N(0, 0.5), true mean and median of a scan 0 (symmetric). The 95 % percentile
    # interval of the mean and of the median must cover 0 in 95 % of studies, within simulation
    # error: SE = sqrt(0.95 * 0.05 / 300) = 0.0126; we accept 0.95 +- 0.045 (3.5 SE), the
    # percentile bootstrap being known to undercover slightly at 25 clusters.
    rng = np.random.default_rng(2026)
    reps, hits_mean, hits_median = 300, 0, 0
    for r in range(reps):
        sizes = rng.integers(1, 4, 25)
        patients = np.repeat(np.arange(25), sizes)
        values = rng.normal(0, 1, 25)[patients] + rng.normal(0, 0.5, patients.size)
        opts = S.BootstrapOptions(n_resamples=400, seed=r)
        lo, hi = S.cluster_bootstrap_ci(values, patients, "mean", opts)
        hits_mean += lo <= 0 <= hi
        lo, hi = S.cluster_bootstrap_ci(values, patients, "median", opts)
        hits_median += lo <= 0 <= hi
    assert abs(hits_mean / reps - 0.95) <= 0.045, hits_mean / reps
    assert abs(hits_median / reps - 0.95) <= 0.045, hits_median / reps


def test_patient_level_bootstrap_coverage_of_the_mean_difference():
    # 300 simulated paired studies of 30 patients, differences N(0.01, 0.02): the percentile
    # interval of bootstrap_ci (scipy.stats.bootstrap's draws) must cover the true mean difference
    # 0.01 in 95 % of studies, within 0.045 (3.5 simulation SE).
    rng = np.random.default_rng(77)
    hits = 0
    for r in range(300):
        d = rng.normal(0.01, 0.02, 30)
        lo, hi = S.bootstrap_ci(d, "mean", S.BootstrapOptions(n_resamples=400, seed=r))
        hits += lo <= 0.01 <= hi
    assert abs(hits / 300 - 0.95) <= 0.045, hits / 300


def test_clustering_ignored_by_naive_bootstrap_undercovers():
    # The same design with strong patient effects and 4 scans each: resampling scans as if
    # independent gives too narrow intervals (coverage well below 95 %), resampling patients does not.
    rng = np.random.default_rng(9)
    reps, naive, cluster = 200, 0, 0
    for r in range(reps):
        patients = np.repeat(np.arange(20), 4)
        values = rng.normal(0, 1, 20)[patients] + rng.normal(0, 0.2, patients.size)
        opts = S.BootstrapOptions(n_resamples=300, seed=r)
        lo, hi = S.cluster_bootstrap_ci(values, np.arange(values.size), "mean", opts)
        naive += lo <= 0 <= hi
        lo, hi = S.cluster_bootstrap_ci(values, patients, "mean", opts)
        cluster += lo <= 0 <= hi
    assert naive / reps < 0.80 and cluster / reps > 0.88


def test_paired_rows_carry_bootstrap_intervals_of_the_differences():
    rng = np.random.default_rng(1)
    a, b = 0.8 + rng.normal(0, 0.02, 15), 0.8 + rng.normal(0, 0.02, 15)
    opts = S.BootstrapOptions(n_resamples=300, seed=3)
    row = S.paired_comparisons(_rows(a, b), metrics=["dsc"], bootstrap=opts).iloc[0]
    d = a - b
    assert row["diff_median"] == pytest.approx(np.median(d)) and row["diff_mean"] == pytest.approx(d.mean())
    assert (row["diff_mean_ci_low"], row["diff_mean_ci_high"]) == pytest.approx(S.bootstrap_ci(d, "mean", opts))
    assert row["diff_median_ci_low"] <= row["diff_median"] <= row["diff_median_ci_high"]
    assert "300 resamples" in row["bootstrap"] and "seed 3" in row["bootstrap"]


# ---------------------------------------------------------------------------
# Families and one-arm-absent pairs
# ---------------------------------------------------------------------------


def test_family_study_pools_every_test_of_the_run():
    from tests.test_stats import synthetic_table

    table = synthetic_table()
    per = S.run_stats(table, bootstrap=None)
    study = S.run_stats(table, bootstrap=None, family="study")
    assert (study["family"] == "study").all() and (per["family"] == "comparison").all()
    p = study["p"].to_numpy(dtype=float)
    ok = ~np.isnan(p)
    np.testing.assert_allclose(study["p_adjusted"].to_numpy(dtype=float)[ok], multipletests(p[ok], method="holm")[1])
    assert (study.loc[ok, "family_size"] == ok.sum()).all()
    assert (per["family_size"] < ok.sum()).all()


def test_one_arm_absent_rows_are_listed_apart_not_in_medians():
    # 8 cases; on case 0 model a says absent, model b hallucinated (DSC 0).
    a = [math.nan, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96]
    b = [0.0, 0.8, 0.81, 0.82, 0.83, 0.84, 0.85, 0.86]
    statuses = [("absent", "hallucinated")] + [("ok", "ok")] * 7
    t = _rows(a, b, statuses=statuses)
    row = S.paired_comparisons(t, metrics=["dsc"], bootstrap=None).iloc[0]
    assert row["n_absent_one_arm"] == 1 and row["n"] == 8  # the test sees the pair (a right, b wrong)
    assert row["median_a"] == pytest.approx(np.median(a[1:]))  # no imputed DSC 1 in the median
    assert row["median_b"] == pytest.approx(np.median(b[1:]))  # nor the hallucination's 0
    listed = S.one_arm_absent(t)
    assert len(listed) == 1 and listed.iloc[0]["case"] == "s00"
    assert (listed.iloc[0]["status_a"], listed.iloc[0]["status_b"]) == ("absent", "hallucinated")


def test_cli_family_unit_and_outputs(tmp_path):
    patients = [f"p{i // 2}" for i in range(16)]
    rng = np.random.default_rng(4)
    t = _rows(0.8 + rng.normal(0, 0.02, 16), 0.8 + rng.normal(0, 0.02, 16), patients=patients)
    csv = tmp_path / "metrics.csv"
    t.to_csv(csv, index=False)
    res = CliRunner().invoke(main, ["stats", str(csv), "--out", str(tmp_path / "o"), "--family", "study",
                                    "--unit", "scan", "--n-resamples", "100", "--no-table"])
    assert res.exit_code == 0, res.output
    assert "8 patient(s) have more than one scan" in res.output
    df = pd.read_csv(tmp_path / "o" / "stats.csv")
    assert (df["family"] == "study").all() and (df["unit"] == "scan").all()
    assert (tmp_path / "o" / "one_arm_absent.csv").is_file()
    res = CliRunner().invoke(main, ["stats", str(csv), "--out", str(tmp_path / "p"), "--no-table"])
    df = pd.read_csv(tmp_path / "p" / "stats.csv")
    paired = df[df.analysis == "paired"].iloc[0]
    assert paired["unit"] == "patient" and paired["n_patients"] == 8 and paired["n_scans"] == 16


def test_signed_rank_null_is_symmetry_not_median():
    # 31 differences with median exactly 0 (15 small negatives -0.1..-1.5, a zero, 15 large
    # positives 5..19): a test of the median (sign test: 15 vs 15) has p = 1, but the
    # distribution is not symmetric about 0 and its pseudo-median (Hodges-Lehmann) is far above
    # 0, so the signed-rank test rejects: its null is symmetry about 0 / pseudo-median 0.
    d = np.concatenate([-0.1 * np.arange(1, 16), [0.0], 5.0 + np.arange(15)])
    assert np.median(d) == 0.0
    res = S.signed_rank_test(d)
    # pratt: ranks of |d|: the zero rank 1, negatives 2..16 (sum 135), positives 17..31 (sum 360)
    assert (res.r_minus, res.r_plus) == (135.0, 360.0)
    assert S.hodges_lehmann(d) > 2.0 and res.p < 0.05


def test_a_scan_both_models_missed_keeps_the_patients_other_scans():
    # Patient p0 has two scans: both models missed the organ in the first (HD95 inf in both
    # arms), the second is finite (3 mm against 5 mm: a is 2 mm better). Patient means would be
    # inf and inf, a difference of 0, and the 2 mm lost. The rule: the mean of the patient's scan
    # differences, (0 + (3 - 5)) / 2 = -1 mm (the failed scan is a tie averaged in, as DSC 0
    # against DSC 0 is). Six more patients with one scan each.
    from scipy import stats as st

    a = [math.inf, 3.0, 2.0, 4.0, 6.0, 3.5, 2.5, 5.0]
    b = [math.inf, 5.0, 2.6, 4.9, 6.3, 3.3, 2.7, 5.2]
    patients = ["p0", "p0", "p1", "p2", "p3", "p4", "p5", "p6"]
    statuses = [("missed", "missed")] + [("ok", "ok")] * 7
    t = _rows(a, b, patients=patients, metric="hd95", statuses=statuses)
    row = S.paired_comparisons(t, metrics=("hd95",), bootstrap=None).iloc[0]
    d = np.array([-1.0, 2.0 - 2.6, 4.0 - 4.9, 6.0 - 6.3, 3.5 - 3.3, 2.5 - 2.7, 5.0 - 5.2])
    assert row["n"] == 7 and row["n_zero"] == 0
    # three differences of 0.2 tie: the exact permutation distribution (all 2**7 sign patterns)
    oracle = st.wilcoxon(np.round(d, 12), method=st.PermutationMethod(n_resamples=np.inf)).pvalue
    assert row["p"] == pytest.approx(oracle)
    walsh = [(d[i] + d[j]) / 2 for i in range(7) for j in range(i, 7)]
    assert row["hl_shift"] == pytest.approx(np.median(walsh))
    # per scan, the failed scan is one zero difference among eight units
    with pytest.warns(S.ClusteringWarning):  # p0 has two scans
        per_scan = S.paired_comparisons(t, metrics=("hd95",), bootstrap=None, unit="scan").iloc[0]
    assert per_scan["n"] == 8 and per_scan["n_zero"] == 1
    # DSC, for comparison: the missed scan is 0 - 0 = 0, averaged in the same way
    t2 = _rows([0.0, 0.8, .9, .85, .7, .75, .8, .9], [0.0, 0.7, .8, .8, .71, .7, .75, .95], patients=patients,
               statuses=statuses)
    d2 = S.paired_comparisons(t2, metrics=("dsc",), bootstrap=None).iloc[0]
    assert d2["n_zero"] == 0 and d2["n"] == 7
