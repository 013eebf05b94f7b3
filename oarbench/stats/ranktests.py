"""Rank tests on vectors: Wilcoxon signed-rank, Mann-Whitney U (rank-sum), Hodges-Lehmann.

Pure functions of numpy vectors (no tables): the paired signed-rank test with exact,
exact-permutation or asymptotic p-values, the rank-sum test, the one- and two-sample
Hodges-Lehmann shift with its confidence interval, and the helpers that make the tests
exact on the extended reals (``inf`` for a failed distance; see :func:`finite_for_ranking`).

The signed-rank test's null hypothesis is that the distribution of the differences is
symmetric about 0 (equivalently here: their pseudo-median, the median of the Walsh
averages, is 0); it is not a test of the median of the differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


def _scipy_stats():  # type: ignore[no-untyped-def]
    """scipy.stats, imported on first use (a second of start-up that scoring alone does not need)."""
    from scipy import stats

    return stats


__all__ = [
    "ZERO_METHODS",
    "MIN_PAIRS",
    "SignedRankResult",
    "RankSumResult",
    "paired_differences",
    "finite_for_ranking",
    "round_for_ranking",
    "RANK_DIGITS",
    "walsh_averages",
    "hodges_lehmann",
    "signed_rank_null_cdf",
    "signed_rank_test",
    "rank_sum_test",
    "quantile_inf",
]

#: ``zero_method`` values of :func:`scipy.stats.wilcoxon`.
ZERO_METHODS: tuple[str, ...] = ("pratt", "wilcox", "zsplit")
#: Smallest number of pairs (and of non-zero differences) for a signed-rank test:
#: with m non-zero differences the smallest exact two-sided p is 2 / 2**m, which is
#: 0.03125 for m = 6 and 0.0625 for m = 5, so fewer could never reach p < 0.05.
MIN_PAIRS: int = 6

#: Significant digits (of the largest finite magnitude) kept before values are ranked.
RANK_DIGITS: int = 12

_EXACT_MAX_N = 50  # exact null distributions up to this many observations (as scipy's "auto")


@dataclass(frozen=True)
class SignedRankResult:
    """Wilcoxon signed-rank test of paired differences ``d = a - b``.

    Attributes
    ----------
    n : pairs entering the test (zeros included).
    n_nonzero : differences that are not zero.
    n_inf : differences that are +-inf (one arm failed, the other not).
    r_plus, r_minus : rank sums of the positive / negative differences (``zsplit``
        adds half the zero ranks to each; ``wilcox`` ranks without the zeros).
    statistic : scipy's statistic (``min(r_plus, r_minus)`` two-sided, ``r_plus`` one-sided);
        NaN when not testable.
    p : p-value (NaN when not testable).
    p_method : ``exact`` (scipy's exact null distribution; no ties or zeros, n <= 50),
        ``exact-permutation`` (exact distribution over all 2**n sign patterns, conditional on
        the tied ranks and zeros; ties or zeros, n <= 50) or ``asymptotic`` (scipy's normal
        approximation with tie and zero corrections, no continuity correction; n > 50).
    rank_biserial : matched-pairs rank-biserial correlation (Kerby): ``(r_plus - r_minus) /
        (sum of all ranks)``, in [-1, 1], positive when ``a`` tends to be larger.
    hl_shift : Hodges-Lehmann estimate of the shift of ``a - b`` (median of Walsh averages).
    ci_low, ci_high : confidence interval of the shift from order statistics of the Walsh
        averages; ``ci_level`` is its coverage (achieved exact coverage when ``ci_method`` is
        ``exact``), NaN bounds when too few pairs.
    testable : whether a test was run; ``reason`` says why not.
    """

    n: int
    n_nonzero: int
    n_inf: int
    r_plus: float
    r_minus: float
    statistic: float
    p: float
    p_method: str
    alternative: str
    zero_method: str
    rank_biserial: float
    hl_shift: float
    ci_low: float
    ci_high: float
    ci_level: float
    ci_method: str
    testable: bool
    reason: str


@dataclass(frozen=True)
class RankSumResult:
    """Mann-Whitney U (Wilcoxon rank-sum) test of two independent samples ``x`` and ``y``.

    Attributes
    ----------
    n1, n2 : sample sizes.
    statistic : U of ``x`` (number of pairs with x > y, ties counting 1/2), as scipy returns.
    p : two-sided p-value (NaN when not testable).
    p_method : ``exact`` (no ties, both samples <= 50) or ``asymptotic`` (normal
        approximation with tie correction and continuity correction).
    rank_biserial : ``2 U / (n1 n2) - 1 = P(x > y) - P(x < y)``: positive when ``x`` tends
        to be larger.
    hl_shift : two-sample Hodges-Lehmann shift, median of all differences ``x_i - y_j``.
    ci_low, ci_high, ci_level : normal-approximation confidence interval of the shift.
    """

    n1: int
    n2: int
    n_inf: int
    statistic: float
    p: float
    p_method: str
    rank_biserial: float
    hl_shift: float
    ci_low: float
    ci_high: float
    ci_level: float
    ci_method: str
    testable: bool
    reason: str


def _as_float_array(values: Iterable[float], name: str) -> np.ndarray:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN; drop absent pairs (or map failures to the worst value) first")
    return arr


def paired_differences(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> np.ndarray:
    """Differences ``a - b`` on the extended reals, with ``inf - inf`` counted as a tie (0).

    Both arms failing (both ``inf``) is no evidence for either model, so it is a zero
    difference; one arm ``inf`` gives ``+-inf``.
    """
    a = _as_float_array(a, "a")
    b = _as_float_array(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired arms differ in length: {a.size} and {b.size}")
    with np.errstate(invalid="ignore"):
        d = a - b
    both_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    d[both_inf] = 0.0
    return d


def finite_for_ranking(d: np.ndarray) -> np.ndarray:
    """Replace ``+-inf`` by ``+-(2 * max|finite| + 1)`` so that ranks are unchanged.

    Every infinite difference then has a larger magnitude than every finite one, and all
    infinite differences tie with each other (as ``inf == inf``). Rank-based statistics
    (signed-rank, permutation, normal approximation) do not depend on the value chosen,
    only on this order, so the result equals the rank test on the extended reals.
    """
    d = _as_float_array(d, "differences").copy()
    inf = np.isinf(d)
    if inf.any():
        finite = np.abs(d[~inf])
        big = 2.0 * (finite.max() if finite.size else 0.0) + 1.0
        d[inf] = np.sign(d[inf]) * big
    return d


def round_for_ranking(v: Sequence[float] | np.ndarray, digits: int = RANK_DIGITS) -> np.ndarray:
    """Round finite values to ``digits`` significant digits of the largest finite magnitude.

    Differences such as ``0.7 - 0.69`` or a margin added to them (``-0.015 + 0.01``) carry
    floating-point residue of order 1e-17: two magnitudes that are equal in decimal arithmetic
    (``0.005`` and ``-0.005000000000000001``) would then rank apart, and a difference that is
    zero would be a tiny non-zero one, changing the exact p-value. Rounding on one absolute grid
    (``10**(floor(log10(max|v|)) - digits + 1)``) before ranking gives the ranks of decimal
    arithmetic for any data with fewer than ``digits`` significant digits. ``+-inf`` stay.
    """
    v = np.asarray(v, dtype=float).copy()
    fin = np.isfinite(v)
    if not fin.any():
        return v
    top = float(np.max(np.abs(v[fin])))
    if top == 0.0:
        return v
    decimals = digits - 1 - int(math.floor(math.log10(top)))
    v[fin] = np.round(v[fin], decimals) + 0.0  # + 0.0: no negative zero
    return v


def walsh_averages(d: np.ndarray) -> np.ndarray:
    """All ``(d_i + d_j) / 2`` for ``i <= j`` (``n (n + 1) / 2`` values), sorted.

    On the extended reals; ``(+inf + -inf) / 2`` is taken as 0 (the tie rule above).
    """
    d = _as_float_array(d, "differences")
    i, j = np.triu_indices(d.size)
    with np.errstate(invalid="ignore"):
        w = (d[i] + d[j]) / 2.0
    w[np.isnan(w)] = 0.0
    return np.sort(w)


def _median_sorted(w: np.ndarray) -> float:
    """Median of sorted values that may hold +-inf (mean of the middle two, inf-safe)."""
    if w.size == 0:
        return math.nan
    mid = w.size // 2
    if w.size % 2:
        return float(w[mid])
    lo, hi = float(w[mid - 1]), float(w[mid])
    if lo == hi:
        return lo
    if math.isinf(lo) and math.isinf(hi):  # -inf and +inf in the middle: tie rule
        return 0.0
    return (lo + hi) / 2.0


def hodges_lehmann(d: Sequence[float] | np.ndarray) -> float:
    """One-sample Hodges-Lehmann estimate: median of the Walsh averages of ``d``."""
    return _median_sorted(walsh_averages(np.asarray(d, dtype=float)))


def signed_rank_null_cdf(n: int) -> np.ndarray:
    """Exact null CDF of the signed-rank statistic ``T+`` for ``n`` untied non-zero values.

    Returns ``cdf`` with ``cdf[k] = P(T+ <= k)`` for ``k = 0 .. n (n + 1) / 2``, from the
    counts of subsets of ``{1..n}`` with sum ``k`` (dynamic programming, exact in
    float64 for ``n <= 50`` because the counts stay below 2**53).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    top = n * (n + 1) // 2
    counts = np.zeros(top + 1, dtype=np.int64)
    counts[0] = 1
    for r in range(1, n + 1):  # add rank r to every subset: counts[k] += counts[k - r]
        counts[r:] = counts[r:] + counts[: top + 1 - r]
    return np.cumsum(counts) / float(2**n)


def _signed_rank_ci(d: np.ndarray, confidence: float) -> tuple[float, float, float, str]:
    """CI of the Hodges-Lehmann shift: order statistics of the Walsh averages.

    With ``M = n (n + 1) / 2`` sorted Walsh averages ``W(1) <= ... <= W(M)`` the interval is
    ``[W(k), W(M + 1 - k)]`` where ``k - 1`` is the largest lower critical value of ``T+``
    with ``P(T+ <= k - 1) <= (1 - confidence) / 2`` (Hollander & Wolfe). For ``n <= 50`` the
    exact null distribution gives ``k`` and the achieved coverage ``1 - 2 P(T+ <= k - 1)``;
    above, ``k = floor(M / 2 - z sqrt(n (n + 1) (2n + 1) / 24))`` (normal approximation).
    """
    n = d.size
    if n == 0:
        return math.nan, math.nan, math.nan, ""
    w = walsh_averages(d)
    m = w.size
    tail = (1.0 - confidence) / 2.0
    if n <= _EXACT_MAX_N:
        cdf = signed_rank_null_cdf(n)
        k = int(np.searchsorted(cdf, tail, side="right"))  # cdf[0..k-1] <= tail
        if k < 1:
            return math.nan, math.nan, math.nan, "exact"
        level = 1.0 - 2.0 * float(cdf[k - 1])
        method = "exact"
    else:
        z = _scipy_stats().norm.ppf(1.0 - tail)
        k = int(math.floor(m / 2.0 - z * math.sqrt(n * (n + 1) * (2 * n + 1) / 24.0)))
        if k < 1:
            return math.nan, math.nan, math.nan, "normal"
        level = confidence
        method = "normal"
    return float(w[k - 1]), float(w[m - k]), level, method


def _ranks_and_sums(d: np.ndarray, zero_method: str) -> tuple[float, float, float]:
    """(r_plus, r_minus, total rank sum) as scipy.stats.wilcoxon forms them."""
    x = d[d != 0] if zero_method == "wilcox" else d
    if x.size == 0:
        return 0.0, 0.0, 0.0
    r = _scipy_stats().rankdata(np.abs(x))
    r_plus = float(r[x > 0].sum())
    r_minus = float(r[x < 0].sum())
    if zero_method == "zsplit":
        half = float(r[x == 0].sum()) / 2.0
        r_plus += half
        r_minus += half
    return r_plus, r_minus, float(r.sum())


def _signed_rank_method(d: np.ndarray) -> str:
    """exact (no ties, no zeros), exact-permutation (ties or zeros) for n <= 50, else asymptotic."""
    if d.size > _EXACT_MAX_N:
        return "asymptotic"
    ties = np.unique(np.abs(d)).size < d.size
    zeros = bool((d == 0).any())
    return "exact-permutation" if (ties or zeros) else "exact"


def _signed_rank_permutation_p(d: np.ndarray, zero_method: str, alternative: str) -> float:
    """Exact permutation p-value of the signed-rank statistic, conditional on ties and zeros.

    Under H0 every non-zero difference is positive or negative with probability 1/2,
    independently; zeros contribute the same to every sign pattern. The null distribution
    of ``R+`` (a sum of mid-ranks, which are multiples of 1/2) is counted exactly by dynamic
    programming over the doubled ranks, instead of enumerating the ``2**n`` patterns. The
    two-sided p is ``2 * min(P(R+ <= r), P(R+ >= r))`` clipped to 1, as
    :func:`scipy.stats.permutation_test` defines it, so the result equals
    ``scipy.stats.wilcoxon(d, method=PermutationMethod(n_resamples=np.inf))`` (checked in the
    tests) without its ``2**n`` cost.
    """
    if zero_method == "wilcox":
        x = d[d != 0]
        ranks = _scipy_stats().rankdata(np.abs(x))
    else:  # pratt and zsplit rank the zeros too; zsplit's half-ranks of zeros are a constant
        x = d
        ranks = _scipy_stats().rankdata(np.abs(d))
    nz = x != 0
    w = np.rint(2.0 * ranks[nz]).astype(np.int64)
    observed = int(np.rint(2.0 * ranks[x > 0].sum()))
    top = int(w.sum())
    counts = np.zeros(top + 1, dtype=np.float64)  # exact: counts < 2**50 for n <= 50
    counts[0] = 1.0
    for wi in w:
        counts[wi:] = counts[wi:] + counts[: top + 1 - wi]
    pmf = counts / counts.sum()
    p_le = float(pmf[: observed + 1].sum())
    p_ge = float(pmf[observed:].sum())
    if alternative == "greater":
        return p_ge
    if alternative == "less":
        return p_le
    return min(1.0, 2.0 * min(p_le, p_ge))


def signed_rank_test(
    d: Sequence[float] | np.ndarray,
    *,
    zero_method: str = "pratt",
    alternative: str = "two-sided",
    confidence: float = 0.95,
    min_n: int = MIN_PAIRS,
) -> SignedRankResult:
    """Wilcoxon signed-rank test of paired differences ``d`` (may hold +-inf, not NaN).

    The differences are first rounded by :func:`round_for_ranking` (12 significant digits of the
    largest, so that ties and zeros of decimal arithmetic stay ties and zeros). The p-value is
    :func:`scipy.stats.wilcoxon` on :func:`finite_for_ranking` of those with an
    explicit ``method`` (``exact`` or ``asymptotic``), or, with ties or zeros and n <= 50, the
    exact permutation p-value of :func:`_signed_rank_permutation_p` (equal to scipy's
    permutation test with all sign patterns). See :class:`SignedRankResult`.

    Fewer than ``min_n`` pairs, all differences zero, or fewer than ``min_n`` non-zero
    differences give ``testable=False`` with a reason instead of a p-value; effect sizes are
    still reported as descriptions.
    """
    if zero_method not in ZERO_METHODS:
        raise ValueError(f"zero_method must be one of {ZERO_METHODS}, got {zero_method!r}")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    raw = _as_float_array(d, "differences")
    ranked = finite_for_ranking(round_for_ranking(raw))
    n = int(raw.size)
    n_nonzero = int(np.count_nonzero(ranked))
    n_inf = int(np.isinf(raw).sum())
    r_plus, r_minus, total = _ranks_and_sums(ranked, zero_method)
    rbc = (r_plus - r_minus) / total if total > 0 else math.nan
    hl = hodges_lehmann(raw)
    ci_low, ci_high, ci_level, ci_method = _signed_rank_ci(raw, confidence)

    if n < min_n:
        reason = f"n<{min_n}"
    elif n_nonzero == 0:
        reason = "all differences zero"
    elif n_nonzero < min_n:
        reason = f"fewer than {min_n} non-zero differences"
    else:
        reason = ""
    statistic = p = math.nan
    method = ""
    if not reason:
        method = _signed_rank_method(ranked)
        if method == "exact-permutation":
            statistic = min(r_plus, r_minus) if alternative == "two-sided" else r_plus
            p = _signed_rank_permutation_p(ranked, zero_method, alternative)
        else:
            res = _scipy_stats().wilcoxon(ranked, zero_method=zero_method, alternative=alternative, method=method)
            statistic, p = float(res.statistic), float(res.pvalue)
    return SignedRankResult(
        n=n, n_nonzero=n_nonzero, n_inf=n_inf, r_plus=r_plus, r_minus=r_minus,
        statistic=statistic, p=p, p_method=method, alternative=alternative, zero_method=zero_method,
        rank_biserial=rbc, hl_shift=hl, ci_low=ci_low, ci_high=ci_high, ci_level=ci_level,
        ci_method=ci_method, testable=not reason, reason=reason,
    )


def _pairwise_differences(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sorted ``x_i - y_j`` for all i, j, with ``inf - inf`` a tie (0)."""
    with np.errstate(invalid="ignore"):
        diff = (x[:, None] - y[None, :]).ravel()
    diff[np.isnan(diff)] = 0.0
    return np.sort(diff)


def _min_rank_sum_p(n1: int, n2: int) -> float:
    """Smallest attainable exact two-sided Mann-Whitney p-value: 2 / C(n1 + n2, n1)."""
    return min(1.0, 2.0 / math.comb(n1 + n2, n1))


def rank_sum_test(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    alpha_floor: float = 0.05,
) -> RankSumResult:
    """Two-sided Mann-Whitney U test of ``x`` against ``y`` (values may be +-inf, not NaN).

    ``+-inf`` rank beyond every finite value and tie with each other, which is what
    :func:`scipy.stats.mannwhitneyu` does with them. The test is run only when its smallest
    attainable exact p-value ``2 / C(n1 + n2, n1)`` is below ``alpha_floor`` (0.05), the
    rank-sum analogue of :data:`MIN_PAIRS` (e.g. 4 + 4 cases: 2/70 = 0.029; 3 + 4: 2/35 =
    0.057), and when not all values are tied.
    """
    x = _as_float_array(x, "x")
    y = _as_float_array(y, "y")
    n1, n2 = int(x.size), int(y.size)
    n_inf = int(np.isinf(x).sum() + np.isinf(y).sum())
    if n1 == 0 or n2 == 0:
        return RankSumResult(n1, n2, n_inf, math.nan, math.nan, "", math.nan, math.nan, math.nan,
                             math.nan, math.nan, "", False, "no cases in one arm")
    diffs = _pairwise_differences(x, y)
    hl = _median_sorted(diffs)
    # normal-approximation CI of the shift (order statistics of the n1*n2 differences)
    m = diffs.size
    z = _scipy_stats().norm.ppf(1.0 - (1.0 - confidence) / 2.0)
    k = int(math.floor(m / 2.0 - z * math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12.0)))
    if k >= 1:
        ci_low, ci_high, ci_level = float(diffs[k - 1]), float(diffs[m - k]), confidence
    else:
        ci_low = ci_high = ci_level = math.nan
    x, y = np.split(round_for_ranking(np.concatenate([x, y])), [n1])
    pooled = np.concatenate([x, y])
    if _min_rank_sum_p(n1, n2) >= alpha_floor:
        reason = f"too few cases (n1={n1}, n2={n2})"
    elif np.unique(pooled).size == 1:
        reason = "all values tied"
    else:
        reason = ""
    # U of x from mid-ranks (equals scipy's statistic): U1 = R1 - n1 (n1 + 1) / 2
    ranks = _scipy_stats().rankdata(finite_for_ranking(pooled))
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    rbc = 2.0 * u1 / (n1 * n2) - 1.0
    statistic = p = math.nan
    method = ""
    if not reason:
        ties = np.unique(pooled).size < pooled.size
        method = "exact" if (not ties and max(n1, n2) <= _EXACT_MAX_N) else "asymptotic"
        res = _scipy_stats().mannwhitneyu(x, y, alternative="two-sided", method=method, use_continuity=True)
        statistic, p = float(res.statistic), float(res.pvalue)
    return RankSumResult(n1, n2, n_inf, statistic, p, method, rbc, hl, ci_low, ci_high, ci_level,
                         "normal" if k >= 1 else "", not reason, reason)


def quantile_inf(v: Sequence[float] | np.ndarray, q: float) -> float:
    """Linear-interpolation quantile (numpy's default) that is safe with ``+-inf``.

    NaN values are ignored; interpolating towards an infinite order statistic gives that
    infinity (no ``inf * 0 = NaN``).
    """
    v = np.asarray(v, dtype=float).ravel()
    v = np.sort(v[~np.isnan(v)])
    if v.size == 0:
        return math.nan
    pos = q * (v.size - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    frac = pos - lo
    if frac == 0 or v[lo] == v[hi]:
        return float(v[lo])
    if math.isinf(v[hi]) or math.isinf(v[lo]):
        return float(v[hi]) if math.isinf(v[hi]) else float(v[lo])
    return float(v[lo] + frac * (v[hi] - v[lo]))
