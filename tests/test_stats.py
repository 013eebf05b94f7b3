"""Tests of oarbench.stats and ``oarbench stats``.

Expected values are derived by hand in the comments, or come from independent
computations (brute-force enumeration, direct scipy/statsmodels calls on the same vectors).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats as st
from statsmodels.stats.multitest import multipletests

from oarbench import stats as S
from oarbench.cli import main

STRUCTURES = ("Liver", "Kidney_L", "Pancreas")


def _row(centre, model, case, structure, status, dsc, hd95, msd=None, condition="original"):
    return dict(study="t", centre=centre, model=model, condition=condition, case=case,
                structure=structure, label=1, status=status, dsc=dsc, hd95=hd95,
                msd=hd95 / 3 if msd is None else msd)


def synthetic_table(seed: int = 7, n_cases: int = 12) -> pd.DataFrame:
    """Two centres, three models, three structures, with a few failures and absent organs."""
    rng = np.random.default_rng(seed)
    rows = []
    for centre in ("A", "B"):
        for c in range(n_cases):
            case = f"{centre}{c:03d}"
            for s in STRUCTURES:
                for model, shift in (("fl", 0.0), ("local-A", -0.03 if centre == "B" else 0.0), ("local-B", 0.01)):
                    dsc = float(np.clip(0.85 + shift + rng.normal(0, 0.03), 0, 1))
                    hd = float(abs(rng.normal(5, 1.5)) - 20 * shift)
                    status = "ok"
                    if s == "Kidney_L" and c == 3:
                        status = "hallucinated" if model == "local-B" else "absent"
                    if s == "Pancreas" and c in (1, 2) and model == "local-A":
                        status = "missed"
                    if status == "absent":
                        dsc = hd = math.nan
                    elif status != "ok":
                        dsc, hd = 0.0, math.inf
                    rows.append(_row(centre, model, case, s, status, dsc, hd))
    return pd.DataFrame(rows)


def paired_table(a_values, b_values, metric="hd95", statuses_a=None, statuses_b=None, centre="A"):
    """A table with models 'a' and 'b' on one structure, values given per case."""
    rows = []
    for i, (va, vb) in enumerate(zip(a_values, b_values)):
        for model, v, sts in (("a", va, statuses_a), ("b", vb, statuses_b)):
            status = sts[i] if sts else ("ok" if math.isfinite(v) else "missed")
            dsc = v if metric == "dsc" else 0.8
            hd = v if metric == "hd95" else 3.0
            rows.append(_row(centre, model, f"c{i:02d}", "Liver", status, dsc, hd))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# Building blocks, by hand
# ---------------------------------------------------------------------------


def test_n6_all_positive_exact_p_and_effect_sizes():
    # d = 0.1, ..., 0.6 (all positive, no ties): ranks 1..6, R+ = 21, R- = 0.
    # Under H0 each of the 2**6 = 64 sign patterns is equally likely; only the all-plus
    # pattern reaches R+ = 21 (and only all-minus R+ = 0), so the two-sided exact
    # p = 2 * 1/64 = 0.03125. Rank-biserial (Kerby) = (21 - 0) / 21 = 1.
    d = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    res = S.signed_rank_test(d)
    assert res.testable and res.p_method == "exact"
    assert res.p == pytest.approx(2 / 64, abs=1e-15)
    assert res.statistic == 0.0  # scipy's two-sided statistic min(R+, R-)
    assert (res.r_plus, res.r_minus) == (21.0, 0.0)
    assert res.rank_biserial == 1.0
    # HL: Walsh averages (d_i + d_j)/2 = (i + j)/20, i <= j in 1..6. Counts of pairs by
    # i + j = 2..12: 1,1,2,2,3,3,3,2,2,1,1 (21 in all); the 11th smallest lies in the
    # i + j = 7 block (cumulative 9 after 6, 12 after 7), so HL = 7/20 = 0.35.
    assert res.hl_shift == pytest.approx(0.35, abs=1e-12)
    # CI: P(T+ <= 0) = 1/64 <= 0.025 < P(T+ <= 1) = 2/64, so k = 1 and the interval is
    # [W(1), W(21)] = [min, max] = [0.1, 0.6] with coverage 1 - 2/64 = 0.96875.
    assert (res.ci_low, res.ci_high) == (pytest.approx(0.1), pytest.approx(0.6))
    assert res.ci_level == 0.96875 and res.ci_method == "exact"
    direct = st.wilcoxon(d, zero_method="pratt", method="exact")
    assert res.p == direct.pvalue and res.statistic == direct.statistic


def test_hodges_lehmann_by_hand():
    # d = (1, 3, -2): Walsh averages 1, 3, -2, (1+3)/2 = 2, (1-2)/2 = -0.5, (3-2)/2 = 0.5;
    # sorted -2, -0.5, 0.5, 1, 2, 3; median = (0.5 + 1)/2 = 0.75.
    assert S.hodges_lehmann([1.0, 3.0, -2.0]) == 0.75
    np.testing.assert_array_equal(S.walsh_averages(np.array([1.0, 3.0, -2.0])), [-2, -0.5, 0.5, 1, 2, 3])
    # On the extended reals: (inf, 1, 2): Walsh inf, 1, 2, inf, inf, 1.5 -> sorted
    # 1, 1.5, 2, inf, inf, inf; middle two 2 and inf -> HL = inf (failures dominate).
    assert S.hodges_lehmann([math.inf, 1.0, 2.0]) == math.inf


def test_null_cdf_matches_brute_force_enumeration():
    for n in range(0, 11):
        sums = np.array([sum(r for r in range(1, n + 1) if mask >> (r - 1) & 1) for mask in range(2**n)])
        top = n * (n + 1) // 2
        brute = np.array([(sums <= k).mean() for k in range(top + 1)])
        np.testing.assert_array_equal(S.signed_rank_null_cdf(n), brute)


def test_ci_n10_uses_tabulated_critical_value():
    # n = 10: subsets of {1..10} with sum <= 8 number 1+1+1+2+2+3+4+5+6 = 25 (distinct-part
    # partitions of 0..8), so P(T+ <= 8) = 25/1024 = 0.0244 <= 0.025, while sum 9 adds 8
    # more (33/1024 = 0.032): the textbook critical value 8. Hence k = 9 and the interval is
    # [W(9), W(55 + 1 - 9)] = [W(9), W(47)] with coverage 1 - 50/1024.
    d = np.array([-1.3, 0.2, 0.7, 1.1, 2.9, 0.4, -0.6, 1.8, 3.5, 0.9])
    res = S.signed_rank_test(d)
    w = np.sort([(d[i] + d[j]) / 2 for i in range(10) for j in range(i, 10)])
    assert (res.ci_low, res.ci_high) == (w[8], w[46])
    assert res.ci_level == 1 - 50 / 1024
    assert res.hl_shift == w[27]  # 55 averages: the median is the 28th


@pytest.mark.parametrize("zero_method", S.ZERO_METHODS)
def test_signed_rank_equals_scipy_on_same_vectors(zero_method):
    rng = np.random.default_rng(11)
    cases = {
        "exact": np.round(rng.normal(0.3, 1, 30), 6),  # no ties, n <= 50
        "exact-permutation": np.array([0.5, -0.5, 1.0, 2.0, 0.0, 3.0, -1.0, 4.0, 2.0, 5.0]),
        "asymptotic": np.round(rng.normal(0.2, 1, 60), 1),  # n > 50 (rounded: ties and zeros)
    }
    for expected_method, d in cases.items():
        if expected_method == "exact" and (np.unique(np.abs(d)).size < d.size or (d == 0).any()):
            pytest.fail("test vector meant to be untied")
        res = S.signed_rank_test(d, zero_method=zero_method)
        assert res.p_method == expected_method
        method = st.PermutationMethod(n_resamples=np.inf) if expected_method == "exact-permutation" else expected_method
        direct = st.wilcoxon(d, zero_method=zero_method, method=method)
        assert res.p == direct.pvalue
        assert res.statistic == direct.statistic
        assert min(res.r_plus, res.r_minus) == pytest.approx(direct.statistic)
        # independent rank-biserial: ranks of |d| (zeros removed for 'wilcox')
        x = d[d != 0] if zero_method == "wilcox" else d
        r = st.rankdata(np.abs(x))
        plus, minus, zero = r[x > 0].sum(), r[x < 0].sum(), r[x == 0].sum()
        assert res.rank_biserial == pytest.approx((plus - minus) / (plus + minus + zero))
    # one-sided, as used by the non-inferiority test
    d = cases["exact"]
    for alt in ("greater", "less"):
        assert S.signed_rank_test(d, alternative=alt).p == st.wilcoxon(d, alternative=alt, method="exact").pvalue


@pytest.mark.parametrize("zero_method", S.ZERO_METHODS)
@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_permutation_p_equals_brute_force_enumeration(zero_method, alternative):
    # n = 16 with ties and zeros: enumerate all 2**16 sign patterns of the non-zero
    # differences (vectorised) and count how often R+ is <= / >= the observed value.
    d = np.array([0.0, 0.5, -0.5, 1.0, 1.0, -1.5, 2.0, 2.0, 2.0, 3.0, -3.5, 4.0, 0.0, 5.0, 6.0, -6.0])
    x = d[d != 0] if zero_method == "wilcox" else d
    ranks = st.rankdata(np.abs(x))
    r_nz = ranks[x != 0]
    obs = ranks[x > 0].sum()
    signs = (np.arange(2 ** r_nz.size)[:, None] >> np.arange(r_nz.size)) & 1
    null = signs @ r_nz
    p_le, p_ge = np.mean(null <= obs + 1e-9), np.mean(null >= obs - 1e-9)
    expected = {"two-sided": min(1.0, 2 * min(p_le, p_ge)), "greater": p_ge, "less": p_le}[alternative]
    res = S.signed_rank_test(d, zero_method=zero_method, alternative=alternative)
    assert res.p_method == "exact-permutation"
    assert res.p == pytest.approx(expected, rel=1e-12)


def test_not_testable_small_n_and_all_ties():
    small = S.signed_rank_test([0.1, 0.2, 0.3, 0.4, 0.5])
    assert not small.testable and small.reason == "n<6" and math.isnan(small.p)
    zeros = S.signed_rank_test(np.zeros(9))
    assert not zeros.testable and zeros.reason == "all differences zero"
    few = S.signed_rank_test([0, 0, 0, 1.0, 2.0, 3.0, 4.0, 5.0])  # 5 non-zero: min p 2/32 > 0.05
    assert not few.testable and few.reason.startswith("fewer than 6 non-zero")
    # Through the table: verdicts say so instead of crashing.
    t = pd.concat([
        paired_table([1, 2, 3, 4, 5], [2, 3, 4, 5, 6]),
        paired_table([1.0] * 8, [1.0] * 8, centre="B"),
    ])
    out = S.paired_comparisons(t, metrics=["hd95"])
    verdict = dict(zip(out["centre"], out["verdict"]))
    assert verdict == {"A": "not testable (n<6)", "B": "not testable (all differences zero)"}
    assert out["p"].isna().all() and out["p_adjusted"].isna().all()
    assert (out["family_size"] == 0).all()


def test_inf_ranks_missed_cases_worst():
    # Model a misses the liver on 8 of 12 cases (HD95 = inf) and is better by 0.1..0.4 mm
    # on the other 4. d = a - b: four negatives (ranks 1..4) and eight +inf, which tie above
    # every finite |d| (mid-rank (5 + 12)/2 = 8.5). R+ = 68, R- = 10 out of 78.
    # Ties -> exact permutation test over the 2**12 sign patterns: P(R- <= 10) counts the
    # sets of negatives with rank sum <= 10: all 16 subsets of {1,2,3,4} (max sum 10), plus
    # one 8.5 with {} or {1} (8 * 2 = 16); two 8.5s exceed 10. So 32/4096 and the two-sided
    # p = 2 * 32/4096 = 1/64. Dropping the failures would leave 4 pairs: no test at all.
    b = [5.0, 6.0, 4.5, 5.5, 6.5, 7.0, 5.2, 4.8, 6.1, 5.9, 4.4, 6.6]
    a = [bi - 0.1 * (i + 1) for i, bi in enumerate(b[:4])] + [math.inf] * 8
    t = paired_table(a, b)
    out = S.paired_comparisons(t, metrics=["hd95"])
    (row,) = out.itertuples(index=False)
    assert row.n == 12 and row.n_missed_a == 8 and row.n_inf == 8 and row.n_missed_b == 0
    assert row.p_method == "exact-permutation"
    assert row.p == pytest.approx(1 / 64, rel=1e-12)
    assert row.p_adjusted == pytest.approx(1 / 64, rel=1e-12)  # family of one test
    assert row.rank_biserial == pytest.approx((68 - 10) / 78)
    assert row.verdict == "significant (b better)"
    assert row.median_a == math.inf and row.q3_a == math.inf
    # q1 of [a1..a4, inf x 8]: position 0.25 * 11 = 2.75, between the 3rd and 4th finite values
    fin = np.sort(a[:4])
    assert row.q1_a == pytest.approx(fin[2] + 0.75 * (fin[3] - fin[2]))
    # The rank rule does not depend on the stand-in value: scipy with inf -> 1e9 agrees.
    d = np.array(a) - np.array(b)
    d[np.isinf(d)] = 1e9
    assert row.p == pytest.approx(st.wilcoxon(d, method=st.PermutationMethod(n_resamples=np.inf)).pvalue)
    # DSC of the same failures is 0: a is judged worse on DSC as well.
    dsc_b = [0.9, 0.85, 0.88, 0.87, 0.86, 0.9, 0.91, 0.84, 0.83, 0.89, 0.9, 0.86]
    dsc_a = [v + 0.01 for v in dsc_b[:4]] + [0.0] * 8
    out = S.paired_comparisons(paired_table(dsc_a, dsc_b, metric="dsc", statuses_a=["ok"] * 4 + ["missed"] * 8,
                                            statuses_b=["ok"] * 12), metrics=["dsc"])
    assert out.loc[0, "verdict"] == "significant (b better)"


def test_inf_minus_inf_is_a_tie_and_missing_counts_as_missed():
    # both models fail on case 0 (inf - inf -> 0), model a has no prediction on case 1
    # (status missing, metrics empty -> treated as missed: inf).
    a = [math.inf, math.nan, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    b = [math.inf, 2.0, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5]
    sa = ["missed", "missing"] + ["ok"] * 6
    sb = ["missed"] + ["ok"] * 7
    out = S.paired_comparisons(paired_table(a, b, statuses_a=sa, statuses_b=sb), metrics=["hd95"])
    row = out.iloc[0]
    assert row["n"] == 8 and row["n_zero"] == 1 and row["n_inf"] == 1
    assert row["n_missing_a"] == 1 and row["n_missed_a"] == 1 and row["n_missed_b"] == 1
    # d = (0, +inf, -0.5 x 6). Pratt ranks of |d|: 0 -> 1, the six 0.5s -> mid-rank 4.5,
    # inf -> 8; R+ = 8, R- = 27, rank-biserial (8 - 27) / 36.
    # Exact permutation over the 7 non-zero signs (the zero's sign is a no-op): R+ <= 8 for
    # all-negative (0), one 0.5 positive (4.5; 6 ways) or only inf positive (8): 8 of 128.
    # The other tail P(R+ >= 8) is large, so the two-sided p = 2 * 8/128 = 0.125.
    assert row["rank_biserial"] == pytest.approx((8 - 27) / 36)
    assert row["p"] == pytest.approx(0.125)
    d = np.array([0.0, 1e9, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5])
    assert row["p"] == pytest.approx(st.wilcoxon(d, zero_method="pratt",
                                                 method=st.PermutationMethod(n_resamples=np.inf)).pvalue)


def test_absent_pairs_dropped_and_absent_vs_hallucinated():
    # case 0: both absent -> dropped (n_absent = 1); case 1: a correctly empty (absent), b
    # hallucinated -> a takes the best value (0 mm), b the worst (inf).
    a = [math.nan, math.nan] + [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    b = [math.nan, math.inf] + [2.5, 3.5, 4.5, 5.5, 6.5, 7.5]
    sa = ["absent", "absent"] + ["ok"] * 6
    sb = ["absent", "hallucinated"] + ["ok"] * 6
    row = S.paired_comparisons(paired_table(a, b, statuses_a=sa, statuses_b=sb), metrics=["hd95"]).iloc[0]
    assert row["n"] == 7 and row["n_absent"] == 1 and row["n_absent_one_arm"] == 1
    assert row["n_hallucinated_b"] == 1 and row["n_inf"] == 1
    # all 7 differences negative (a better): R- = 28 and the exact-permutation p (one tie
    # group of six 0.5s) is 2 * 1/128.
    assert row["p"] == pytest.approx(2 / 128)
    assert row["verdict"] == "significant (a better)"


def test_multiple_correction_equals_multipletests():
    table = synthetic_table()
    for correction in ("holm", "fdr_bh"):
        out = S.paired_comparisons(table, correction=correction)
        assert set(out["correction"]) == {correction}
        for _, fam in out.groupby(["centre", "comparison"]):
            tested = fam[fam["p"].notna()]
            assert len(tested) == fam["family_size"].iloc[0]
            expected = multipletests(tested["p"].to_numpy(), alpha=0.05, method=correction)[1]
            np.testing.assert_array_equal(tested["p_adjusted"].to_numpy(), expected)
        # every family covers all structures x metrics of one centre and pair
        assert out.groupby(["centre", "comparison"]).size().eq(len(STRUCTURES) * len(S.DEFAULT_METRICS)).all()
    assert len(out) == 2 * 3 * 9  # 2 centres, 3 model pairs, 3 structures x 3 metrics


def test_paired_rows_equal_direct_scipy_on_the_paired_vectors():
    table = synthetic_table()
    out = S.paired_comparisons(table, pairs=["fl:local-A"], metrics=["dsc"])
    assert set(out["comparison"]) == {"fl vs local-A"}
    t = table[table["structure"] == "Liver"]
    for centre in ("A", "B"):
        fa = t[(t.model == "fl") & (t.centre == centre)].set_index("case")["dsc"]
        la = t[(t.model == "local-A") & (t.centre == centre)].set_index("case")["dsc"]
        d = (fa - la.loc[fa.index]).to_numpy()
        row = out[(out.centre == centre) & (out.structure == "Liver")].iloc[0]
        direct = st.wilcoxon(d, zero_method="pratt", method="exact")
        assert row["p"] == direct.pvalue and row["statistic"] == direct.statistic
        assert row["median_a"] == pytest.approx(np.median(fa), rel=1e-15)
        assert row["q1_b"] == pytest.approx(np.quantile(la, 0.25), rel=1e-15)
    # centre B: local-A is 0.03 DSC worse by construction; FL wins on the liver
    assert out[(out.centre == "B") & (out.structure == "Liver")]["verdict"].iloc[0] == "significant (fl better)"


def test_noninferiority_one_sided_with_margin():
    rng = np.random.default_rng(3)
    local = 0.85 + rng.normal(0, 0.02, 10)
    fl = local - np.array([0.004, 0.002, 0.006, 0.001, 0.003, 0.005, 0.0035, 0.0045, 0.0015, 0.0025])
    t = paired_table(list(fl), list(local), metric="dsc")
    t["model"] = t["model"].map({"a": "fl", "b": "local"})
    hd_local = 5 + rng.normal(0, 1, 10)
    hd_fl = hd_local + np.linspace(0.1, 0.6, 10)  # FL 0.1..0.6 mm worse
    t["hd95"] = np.ravel(np.column_stack([hd_fl, hd_local]))
    out = S.paired_comparisons(t, metrics=["dsc", "hd95"], margins={"dsc": 0.01, "hd95": 1.0})
    dsc, hd = out.iloc[0], out.iloc[1]
    # DSC: d + 0.01 > 0 for all 10 pairs -> one-sided exact p = 1/2**10
    d = fl - local
    assert dsc["p_noninferiority"] == st.wilcoxon(d + 0.01, alternative="greater", method="exact").pvalue
    assert dsc["p_noninferiority"] == pytest.approx(1 / 1024)
    assert bool(dsc["noninferior"]) and dsc["noninferiority_verdict"] == "fl non-inferior (margin 0.01)"
    # HD95 (lower is better): d - 1 mm < 0 for all pairs -> alternative "less", p = 1/1024
    dh = hd_fl - hd_local
    assert hd["p_noninferiority"] == st.wilcoxon(dh - 1.0, alternative="less", method="exact").pvalue
    assert hd["p_noninferiority"] == pytest.approx(1 / 1024)
    # Holm over the 2 non-inferiority p-values of the family
    np.testing.assert_allclose(out["p_noninferiority_adjusted"],
                               multipletests(out["p_noninferiority"], method="holm")[1])
    # FL is worse on HD95 on every case: the two-sided test says so, yet it is non-inferior
    assert hd["verdict"] == "significant (local better)" and bool(hd["noninferior"])
    # A too-small margin is not shown: margin 0.1 mm with FL 0.1..0.6 mm worse.
    out2 = S.paired_comparisons(t, metrics=["hd95"], margins={"hd95": 0.1})
    assert out2.loc[0, "noninferiority_verdict"] == "non-inferiority not shown (margin 0.1)"
    # no margin declared: empty verdict, NA flag
    out3 = S.paired_comparisons(t, metrics=["hd95"])
    assert out3.loc[0, "noninferiority_verdict"] == "" and pd.isna(out3.loc[0, "noninferior"])


def test_cross_centre_equals_mannwhitneyu():
    table = synthetic_table()
    out = S.centre_comparisons(table)
    assert len(out) == 3 * 3 * 3  # 3 models x 3 structures x 3 metrics, one centre pair
    t = table
    for row in out.itertuples(index=False):
        sel = (t.model == row.model) & (t.structure == row.structure) & (t.status != "absent")
        x = t[sel & (t.centre == "A")][row.metric].to_numpy(dtype=float)
        y = t[sel & (t.centre == "B")][row.metric].to_numpy(dtype=float)
        assert (row.n_a, row.n_b) == (x.size, y.size)
        direct = st.mannwhitneyu(x, y, alternative="two-sided", method=row.p_method)
        assert row.statistic == direct.statistic and row.p == direct.pvalue
        # rank-biserial = P(x > y) - P(x < y), by brute force over all pairs
        gt = sum(xi > yj for xi in x for yj in y)
        lt = sum(xi < yj for xi in x for yj in y)
        assert row.rank_biserial == pytest.approx((gt - lt) / (x.size * y.size))
    for _, fam in out.groupby("model"):
        np.testing.assert_array_equal(fam["p_adjusted"], multipletests(fam["p"], method="holm")[1])
    # missed pancreas (HD95 inf) of local-A at centre A enter the test: n_a counts them
    pan = out[(out.model == "local-A") & (out.structure == "Pancreas") & (out.metric == "hd95")].iloc[0]
    assert pan["n_missed_a"] == 2 and pan["n_missed_b"] == 2 and pan["n_a"] == 12 and pan["n_inf"] == 4
    # Kidney_L: one absent case per centre is dropped, the hallucination of local-B is kept
    kid = out[(out.model == "local-B") & (out.structure == "Kidney_L") & (out.metric == "dsc")].iloc[0]
    assert kid["n_a"] == 12 and kid["n_hallucinated_a"] == 1 and kid["n_absent"] == 0
    kid_fl = out[(out.model == "fl") & (out.structure == "Kidney_L") & (out.metric == "dsc")].iloc[0]
    assert kid_fl["n_a"] == 11 and kid_fl["n_absent"] == 2


def test_rank_sum_small_examples():
    # 4 vs 4 fully separated: U = 16, exact two-sided p = 2 / C(8, 4) = 2/70; r = 1.
    res = S.rank_sum_test([5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0])
    assert res.p_method == "exact" and res.statistic == 16 and res.p == pytest.approx(2 / 70)
    assert res.rank_biserial == 1.0
    # HL two-sample shift: median of the 16 differences x_i - y_j = 1..7 with counts
    # 1,2,3,4,3,2,1 -> 8th and 9th values are both 4.
    assert res.hl_shift == 4.0
    # CI: k = floor(16/2 - 1.96 * sqrt(4*4*9/12)) = floor(8 - 6.79) = 1 -> [D(1), D(16)] = [1, 7]
    assert (res.ci_low, res.ci_high, res.ci_method) == (1.0, 7.0, "normal")
    # 3 vs 4: smallest attainable p = 2/35 = 0.057 -> not testable
    small = S.rank_sum_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0])
    assert not small.testable and "too few cases" in small.reason and math.isnan(small.p)
    ties = S.rank_sum_test([1.0] * 5, [1.0] * 5)
    assert not ties.testable and ties.reason == "all values tied"
    # inf ranks above every finite value: a sample with failures is the larger one
    res = S.rank_sum_test([math.inf, math.inf, 9.0, 10.0, 11.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert res.rank_biserial == 1.0 and res.p_method == "asymptotic"  # the two infs tie
    assert res.p == st.mannwhitneyu([math.inf, math.inf, 9.0, 10.0, 11.0], [1.0, 2.0, 3.0, 4.0, 5.0],
                                    method="asymptotic").pvalue


def test_bad_input_raises_value_error():
    t = synthetic_table(n_cases=6)
    with pytest.raises(ValueError, match="unknown metric"):
        S.paired_comparisons(t, metrics=["volume"])
    with pytest.raises(ValueError, match="missing column"):
        S.paired_comparisons(t.drop(columns="status"), source="res.csv")
    with pytest.raises(ValueError, match="more than one row"):
        S.paired_comparisons(pd.concat([t, t.iloc[:1]]))
    bad = t.copy()
    bad.loc[bad.index[0], "dsc"] = math.nan
    with pytest.raises(ValueError, match="status 'ok' with no dsc"):
        S.paired_comparisons(bad)
    with pytest.raises(ValueError, match="not in the table"):
        S.paired_comparisons(t, pairs=["fl:nobody"])
    with pytest.raises(ValueError, match="condition 'flip_lr'"):
        S.paired_comparisons(t, condition="flip_lr")
    with pytest.raises(ValueError, match="zero_method"):
        S.paired_comparisons(t, zero_method="none")


def test_conditions_are_separate_groups():
    t = synthetic_table(n_cases=6)
    flipped = t.assign(condition="flip_lr")
    both = pd.concat([t, flipped], ignore_index=True)
    only = S.paired_comparisons(both, metrics=["dsc"])
    assert set(only["condition"]) == {"original"}
    every = S.paired_comparisons(both, metrics=["dsc"], condition=None)
    assert set(every["condition"]) == {"original", "flip_lr"} and len(every) == 2 * len(only)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def test_cli_writes_stats_csv(tmp_path):
    csv = tmp_path / "results.csv"
    synthetic_table().to_csv(csv, index=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["stats", str(csv), "--out", str(out), "--metrics", "dsc,hd95",
                                       "--correction", "fdr_bh", "--margin", "dsc=0.01", "--margin", "hd95=1",
                                       "--pair", "fl:local-A", "--pair", "fl:local-B"])
    assert result.exit_code == 0, result.output
    written = pd.read_csv(out / "stats.csv")
    assert list(written.columns) == list(S.COLUMNS)
    paired = written[written.analysis == "paired"]
    assert set(paired["comparison"]) == {"fl vs local-A", "fl vs local-B"}
    assert set(written["metric"]) == {"dsc", "hd95"} and set(written["correction"]) == {"fdr_bh"}
    assert paired["p_noninferiority"].notna().any()
    assert "significant (fl better)" in result.output  # the readable table
    # failures are counted in the CSV: local-A missed the pancreas on 2 cases per centre
    pan = paired[(paired.comparison == "fl vs local-A") & (paired.structure == "Pancreas") & (paired.metric == "hd95")]
    assert pan["n_missed_b"].tolist() == [2, 2] and pan["n_inf"].tolist() == [2, 2]
    assert not list(out.glob(".*partial*"))  # no temp file left behind


def test_cli_plain_table_without_rich(tmp_path, monkeypatch):
    # The core never needs rich; the CLI falls back to plain text when it is not importable.
    monkeypatch.setitem(sys.modules, "rich.console", None)
    monkeypatch.setitem(sys.modules, "rich.table", None)
    csv = tmp_path / "results.csv"
    synthetic_table(n_cases=8).to_csv(csv, index=False)
    result = CliRunner().invoke(main, ["stats", str(csv), "--out", str(tmp_path / "o"), "--metrics", "dsc",
                                       "--pair", "fl:local-A"])
    assert result.exit_code == 0, result.output
    assert "paired | centre B | a = fl, b = local-A" in result.output
    assert "a median [IQR]" in result.output and "verdict" in result.output
    assert (tmp_path / "o" / "stats.csv").is_file()


def test_cli_bad_input_names_the_file(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "broken.csv"
    bad.write_text("case,structure\nx,Liver\n")
    result = runner.invoke(main, ["stats", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "broken.csv" in result.output and "missing required column" in result.output
    missing = tmp_path / "nope.csv"
    result = runner.invoke(main, ["stats", str(missing), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "nope.csv" in result.output
    good = tmp_path / "r.csv"
    synthetic_table(n_cases=6).to_csv(good, index=False)
    result = runner.invoke(main, ["stats", str(good), "--out", str(tmp_path / "o"), "--margin", "dsc"])
    assert result.exit_code != 0 and "METRIC=VALUE" in result.output
    result = runner.invoke(main, ["stats", str(good), "--out", str(tmp_path / "o"), "--metrics", "volume"])
    assert result.exit_code != 0 and "r.csv" in result.output and "unknown metric" in result.output
    assert not (tmp_path / "o" / "stats.csv").exists()
