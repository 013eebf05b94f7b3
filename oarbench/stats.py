"""Statistics on the results table: paired and cross-centre rank tests.

Reads only the tidy results table (one row per case x structure x model x
condition, see docs/statistics.md) and answers two questions per structure and
metric:

* **paired** (same patients): is model A better than model B on the cases of one
  test centre?  Wilcoxon signed-rank test on the per-case differences
  ``A - B``, matched-pairs rank-biserial correlation, Hodges-Lehmann shift with
  a confidence interval, and optionally a one-sided non-inferiority test
  against a declared margin ("does FL match local?").
* **cross-centre** (different patients): does one model do better on centre A's
  cases than on centre B's?  Mann-Whitney U (Wilcoxon rank-sum) test, rank-biserial
  correlation and the two-sample Hodges-Lehmann shift.

p-values are corrected for multiple comparisons within a *family* (one
comparison on one test centre, or one model across one centre pair, over all
structures and metrics of the run) with :func:`statsmodels.stats.multitest.multipletests`.

Failed segmentations are never dropped: ``missed``, ``hallucinated`` and
``missing`` rows enter as the worst value of the metric (DSC/surface DSC 0,
distances ``inf``). Infinite differences are ranked above every finite one
(see :func:`finite_for_ranking`); ``inf - inf`` is a tie (difference 0).
Distances are in mm, like the table they come from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as _st

__all__ = [
    "METRIC_DIRECTIONS",
    "DEFAULT_METRICS",
    "ZERO_METHODS",
    "CORRECTIONS",
    "MIN_PAIRS",
    "SignedRankResult",
    "RankSumResult",
    "paired_differences",
    "finite_for_ranking",
    "walsh_averages",
    "hodges_lehmann",
    "signed_rank_null_cdf",
    "signed_rank_test",
    "rank_sum_test",
    "paired_comparisons",
    "centre_comparisons",
    "run_stats",
    "read_results",
    "write_stats",
    "summary_frame",
    "format_table",
]

#: True where higher is better (DSC, surface DSC), False where lower is better (distances, mm).
METRIC_DIRECTIONS: dict[str, bool] = {
    "dsc": True,
    "sdsc": True,
    "hd95": False,
    "hd": False,
    "msd": False,
    "assd": False,
}
#: Metrics compared when the caller names none.
DEFAULT_METRICS: tuple[str, ...] = ("dsc", "hd95", "msd")
#: ``zero_method`` values of :func:`scipy.stats.wilcoxon`.
ZERO_METHODS: tuple[str, ...] = ("pratt", "wilcox", "zsplit")
#: ``method`` values of :func:`statsmodels.stats.multitest.multipletests` offered here.
CORRECTIONS: tuple[str, ...] = ("holm", "fdr_bh", "bonferroni", "hommel", "fdr_by", "sidak", "holm-sidak")
#: Smallest number of pairs (and of non-zero differences) for a signed-rank test:
#: with m non-zero differences the smallest exact two-sided p is 2 / 2**m, which is
#: 0.03125 for m = 6 and 0.0625 for m = 5, so fewer could never reach p < 0.05.
MIN_PAIRS: int = 6

_STATUSES = ("ok", "missed", "hallucinated", "absent", "missing")
_WORST_STATUSES = ("missed", "hallucinated", "missing")
_REQUIRED = ("model", "case", "structure", "status")
_GROUP_COLUMNS = ("study", "condition")
_EXACT_MAX_N = 50  # exact null distributions up to this many observations (as scipy's "auto")


# ---------------------------------------------------------------------------
# Per-vector building blocks
# ---------------------------------------------------------------------------


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
        z = _st.norm.ppf(1.0 - tail)
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
    r = _st.rankdata(np.abs(x))
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
        ranks = _st.rankdata(np.abs(x))
    else:  # pratt and zsplit rank the zeros too; zsplit's half-ranks of zeros are a constant
        x = d
        ranks = _st.rankdata(np.abs(d))
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

    The p-value is :func:`scipy.stats.wilcoxon` on :func:`finite_for_ranking` ``(d)`` with an
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
    ranked = finite_for_ranking(raw)
    n = int(raw.size)
    n_nonzero = int(np.count_nonzero(raw))
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
            res = _st.wilcoxon(ranked, zero_method=zero_method, alternative=alternative, method=method)
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
    z = _st.norm.ppf(1.0 - (1.0 - confidence) / 2.0)
    k = int(math.floor(m / 2.0 - z * math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12.0)))
    if k >= 1:
        ci_low, ci_high, ci_level = float(diffs[k - 1]), float(diffs[m - k]), confidence
    else:
        ci_low = ci_high = ci_level = math.nan
    pooled = np.concatenate([x, y])
    if _min_rank_sum_p(n1, n2) >= alpha_floor:
        reason = f"too few cases (n1={n1}, n2={n2})"
    elif np.unique(pooled).size == 1:
        reason = "all values tied"
    else:
        reason = ""
    # U of x from mid-ranks (equals scipy's statistic): U1 = R1 - n1 (n1 + 1) / 2
    ranks = _st.rankdata(finite_for_ranking(pooled))
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    rbc = 2.0 * u1 / (n1 * n2) - 1.0
    statistic = p = math.nan
    method = ""
    if not reason:
        ties = np.unique(pooled).size < pooled.size
        method = "exact" if (not ties and max(n1, n2) <= _EXACT_MAX_N) else "asymptotic"
        res = _st.mannwhitneyu(x, y, alternative="two-sided", method=method, use_continuity=True)
        statistic, p = float(res.statistic), float(res.pvalue)
    return RankSumResult(n1, n2, n_inf, statistic, p, method, rbc, hl, ci_low, ci_high, ci_level,
                         "normal" if k >= 1 else "", not reason, reason)


# ---------------------------------------------------------------------------
# The results table
# ---------------------------------------------------------------------------


def read_results(path: str | Path) -> pd.DataFrame:
    """Read a results CSV (``inf`` for failed distances, empty for NaN), or a
    ``metrics.parquet`` dataset (:func:`oarbench.tables.read_table`).

    Raises
    ------
    FileNotFoundError, ValueError
        naming ``path`` when it is missing, unreadable or lacks the required columns.
    """
    if str(path).rstrip("/").endswith(".parquet"):
        from oarbench.tables import read_table

        table = read_table(path)
        missing = [c for c in _REQUIRED if c not in table.columns]
        if missing:
            raise ValueError(f"{path}: missing required column(s) {', '.join(missing)}")
        return table
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: results table not found")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"{path}: cannot read the results table as CSV ({exc})") from exc
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        have = ", ".join(map(str, table.columns))
        raise ValueError(f"{path}: missing required column(s) {', '.join(missing)}; have {have}")
    return table


def _prepare(table: pd.DataFrame, metrics: Sequence[str], condition: str | None, source: str) -> pd.DataFrame:
    """Validate and normalise the table: column checks, condition filter, numeric metrics."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{source}: expected a pandas DataFrame, got {type(table).__name__}")
    metrics = list(metrics)
    if not metrics:
        raise ValueError(f"{source}: no metrics to compare")
    unknown = [m for m in metrics if m not in METRIC_DIRECTIONS]
    if unknown:
        raise ValueError(f"{source}: unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRIC_DIRECTIONS)}")
    missing = [c for c in (*_REQUIRED, *metrics) if c not in table.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}")
    t = table.copy()
    for col in ("study", "centre", "condition"):
        if col not in t.columns:
            t[col] = "" if col != "condition" else "original"
    for col in ("study", "centre", "condition", "model", "case", "structure", "status"):
        t[col] = t[col].fillna("").astype(str).str.strip()
    t["status"] = t["status"].str.lower()
    bad = sorted(set(t["status"]) - set(_STATUSES))
    if bad:
        raise ValueError(
            f"{source}: unknown status value(s) {', '.join(map(repr, bad))}; expected one of {', '.join(_STATUSES)}"
        )
    if condition is not None:
        if condition not in set(t["condition"]):
            have = ", ".join(sorted(set(t["condition"])))
            raise ValueError(f"{source}: no rows with condition {condition!r} (conditions present: {have})")
        t = t[t["condition"] == condition]
    for m in metrics:
        values = pd.to_numeric(t[m], errors="coerce")
        nonnumeric = values.isna() & t[m].notna()
        if nonnumeric.any():
            row = t.index[nonnumeric][0]
            raise ValueError(f"{source}: column {m!r} holds a non-numeric value {t.at[row, m]!r} (row {row})")
        bad_ok = (t["status"] == "ok") & values.isna()
        if bad_ok.any():
            row = t.index[bad_ok][0]
            raise ValueError(
                f"{source}: status 'ok' with no {m} value (case {t.at[row, 'case']!r}, "
                f"structure {t.at[row, 'structure']!r}, model {t.at[row, 'model']!r})"
            )
        t[m] = values.astype(float)
    key = ["study", "condition", "centre", "model", "case", "structure"]
    dup = t.duplicated(key, keep=False)
    if dup.any():
        row = t[dup].iloc[0]
        raise ValueError(
            f"{source}: more than one row for study {row['study']!r}, condition {row['condition']!r}, "
            f"centre {row['centre']!r}, "
            f"model {row['model']!r}, case {row['case']!r}, structure {row['structure']!r}"
        )
    return t


def _worst(metric: str) -> float:
    return 0.0 if METRIC_DIRECTIONS[metric] else math.inf


def _best(metric: str) -> float:
    return 1.0 if METRIC_DIRECTIONS[metric] else 0.0


def _arm_values(status: pd.Series, values: pd.Series, metric: str) -> np.ndarray:
    """Metric values as they enter a test: failures -> worst value, absent -> NaN."""
    v = values.to_numpy(dtype=float).copy()
    s = status.to_numpy()
    v[np.isin(s, _WORST_STATUSES)] = _worst(metric)
    v[s == "absent"] = math.nan
    return v


def _quantile(v: np.ndarray, q: float) -> float:
    """Linear-interpolation quantile that is safe with +inf (no inf * 0 = NaN)."""
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


def _describe(v: np.ndarray, arm: str) -> dict[str, float]:
    return {f"median_{arm}": _quantile(v, 0.5), f"q1_{arm}": _quantile(v, 0.25), f"q3_{arm}": _quantile(v, 0.75)}


def _status_counts(status: np.ndarray, arm: str) -> dict[str, int]:
    return {f"n_{s}_{arm}": int((status == s).sum()) for s in _WORST_STATUSES}


def _order(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _parse_pairs(
    pairs: Sequence[tuple[str, str]] | Sequence[str] | None, models: list[str], source: str
) -> list[tuple[str, str]]:
    if pairs is None:
        return list(combinations(models, 2))
    out: list[tuple[str, str]] = []
    for p in pairs:
        if isinstance(p, str):
            parts = p.split(":")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"model pair {p!r} must look like 'fl:local-A'")
            a, b = parts
        else:
            a, b = p
        for m in (a, b):
            if m not in models:
                raise ValueError(
                    f"{source}: model {m!r} of pair {a}:{b} is not in the table (models: {', '.join(models)})"
                )
        if a == b:
            raise ValueError(f"model pair {a}:{b} compares a model with itself")
        out.append((a, b))
    return out


def _check_margins(margins: Mapping[str, float] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric, value in (margins or {}).items():
        if metric not in METRIC_DIRECTIONS:
            raise ValueError(f"margin given for unknown metric {metric!r}; known: {', '.join(METRIC_DIRECTIONS)}")
        value = float(value)
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"margin for {metric} must be a finite number >= 0, got {value}")
        out[metric] = value
    return out


def _check_options(zero_method: str, correction: str, alpha: float) -> None:
    if zero_method not in ZERO_METHODS:
        raise ValueError(f"zero_method must be one of {', '.join(ZERO_METHODS)}, got {zero_method!r}")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _better(effect: float, higher_is_better: bool, arm_a: str, arm_b: str) -> str:
    a_larger = effect > 0
    return arm_a if a_larger == higher_is_better else arm_b


def _apply_correction(df: pd.DataFrame, family_cols: list[str], correction: str, alpha: float) -> pd.DataFrame:
    """Adjust ``p`` (and ``p_noninferiority``) within each family; write verdicts."""
    from statsmodels.stats.multitest import multipletests

    df = df.copy()
    df["p_adjusted"] = math.nan
    df["p_noninferiority_adjusted"] = math.nan
    df["family_size"] = 0
    df["correction"] = correction
    for _, idx in df.groupby(family_cols, sort=False, dropna=False).groups.items():
        for pcol, acol in (("p", "p_adjusted"), ("p_noninferiority", "p_noninferiority_adjusted")):
            p = df.loc[idx, pcol]
            ok = p.notna()
            if ok.any():
                adjusted = multipletests(p[ok].to_numpy(dtype=float), alpha=alpha, method=correction)[1]
                df.loc[p[ok].index, acol] = adjusted
            if pcol == "p":
                df.loc[idx, "family_size"] = int(ok.sum())
    verdicts, ni_verdicts, noninferior = [], [], []
    for row in df.itertuples(index=False):
        if not row.testable:
            verdicts.append(f"not testable ({row.reason})")
        elif row.p_adjusted < alpha:
            winner = _better(row.rank_biserial, row.higher_is_better, row.arm_a, row.arm_b)
            verdicts.append(f"significant ({winner} better)")
        else:
            verdicts.append("n.s.")
        if math.isnan(row.margin):
            ni_verdicts.append("")
            noninferior.append(pd.NA)
        elif not row.ni_testable:
            ni_verdicts.append(f"not testable ({row.ni_reason})")
            noninferior.append(pd.NA)
        elif row.p_noninferiority_adjusted < alpha:
            ni_verdicts.append(f"{row.arm_a} non-inferior (margin {row.margin:g})")
            noninferior.append(True)
        else:
            ni_verdicts.append(f"non-inferiority not shown (margin {row.margin:g})")
            noninferior.append(False)
    df["verdict"] = verdicts
    df["noninferior"] = pd.array(noninferior, dtype="boolean")
    df["noninferiority_verdict"] = ni_verdicts
    return df


#: Column order of the output (both analyses share it; unused cells are NaN/empty).
COLUMNS: tuple[str, ...] = (
    "analysis", "study", "condition", "centre", "model", "comparison", "arm_a", "arm_b",
    "structure", "metric", "higher_is_better", "n", "n_a", "n_b",
    "n_missed_a", "n_hallucinated_a", "n_missing_a", "n_missed_b", "n_hallucinated_b", "n_missing_b",
    "n_absent", "n_absent_one_arm", "n_unpaired", "n_inf", "n_zero",
    "median_a", "q1_a", "q3_a", "median_b", "q1_b", "q3_b",
    "test", "zero_method", "p_method", "statistic", "p", "p_adjusted", "correction", "family_size",
    "rank_biserial", "hl_shift", "ci_low", "ci_high", "ci_level", "ci_method", "verdict",
    "margin", "statistic_noninferiority", "p_noninferiority", "p_noninferiority_adjusted",
    "noninferior", "noninferiority_verdict",
)


def _finish(rows: list[dict], family_cols: list[str], correction: str, alpha: float) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(columns=list(COLUMNS))
    df = _apply_correction(pd.DataFrame(rows), family_cols, correction, alpha)
    return df[list(COLUMNS)].reset_index(drop=True)


def paired_comparisons(
    table: pd.DataFrame,
    *,
    pairs: Sequence[tuple[str, str]] | Sequence[str] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    zero_method: str = "pratt",
    correction: str = "holm",
    alpha: float = 0.05,
    margins: Mapping[str, float] | None = None,
    condition: str | None = "original",
    confidence: float = 0.95,
    source: str = "results table",
) -> pd.DataFrame:
    """Wilcoxon signed-rank comparisons of model pairs on identical cases.

    For each (study, condition, test centre), model pair ``(a, b)``, structure and metric,
    the cases both models have are paired and ``d = a - b`` is tested (two-sided).

    Pairing rules (docs/statistics.md): pairs where both arms are ``absent`` are dropped
    (counted in ``n_absent``); ``missed``/``hallucinated``/``missing`` rows take the worst
    value (DSC/surface DSC 0, distances inf); an ``absent`` arm facing a non-absent one
    (e.g. the other model hallucinated an organ that is not there) takes the best value
    (DSC 1, distance 0 mm; counted in ``n_absent_one_arm``); cases only one model has are
    counted in ``n_unpaired`` and not tested.

    Parameters
    ----------
    table : the results table (see :func:`read_results`).
    pairs : model pairs, as ``("fl", "local-A")`` tuples or ``"fl:local-A"`` strings; default
        all pairs in order of first appearance in the table.
    metrics : metric columns (keys of :data:`METRIC_DIRECTIONS`).
    zero_method : passed to :func:`scipy.stats.wilcoxon` (``pratt``, ``wilcox``, ``zsplit``).
    correction : :func:`statsmodels.stats.multitest.multipletests` method; the family is one
        (study, condition, centre, model pair) over all structures and metrics.
    alpha : significance level for verdicts (on adjusted p-values).
    margins : non-inferiority margins per metric in the metric's unit (e.g. ``{"dsc": 0.01,
        "hd95": 1.0}`` mm): arm ``a`` is tested for non-inferiority to arm ``b``.
    condition : only rows of this condition (default ``original``); ``None``: each
        condition separately.
    confidence : coverage of the Hodges-Lehmann interval.
    source : name used in error messages (the CSV path).

    Returns
    -------
    pandas.DataFrame with the columns :data:`COLUMNS`, one row per comparison.
    """
    _check_options(zero_method, correction, alpha)
    margins = _check_margins(margins)
    t = _prepare(table, metrics, condition, source)
    models = _order(t["model"])
    pair_list = _parse_pairs(pairs, models, source)
    rows: list[dict] = []
    for (study, cond, centre), grp in t.groupby(["study", "condition", "centre"], sort=False):
        structures = _order(grp["structure"])
        for a, b in pair_list:
            ga = grp[grp["model"] == a].set_index(["case", "structure"])
            gb = grp[grp["model"] == b].set_index(["case", "structure"])
            if ga.empty or gb.empty:
                continue
            both = ga.index.intersection(gb.index, sort=False)
            only = ga.index.symmetric_difference(gb.index, sort=False)
            for structure in structures:
                idx = both[both.get_level_values("structure") == structure]
                n_unpaired = int((only.get_level_values("structure") == structure).sum())
                if len(idx) == 0 and n_unpaired == 0:
                    continue
                sa = ga.loc[idx, "status"].to_numpy()
                sb = gb.loc[idx, "status"].to_numpy()
                for metric in metrics:
                    rows.append(_paired_row(
                        ga.loc[idx], gb.loc[idx], sa, sb, metric, margins.get(metric, math.nan),
                        zero_method, confidence,
                        dict(analysis="paired", study=study, condition=cond, centre=centre, model="",
                             comparison=f"{a} vs {b}", arm_a=a, arm_b=b, structure=structure,
                             n_unpaired=n_unpaired),
                    ))
    return _finish(rows, ["analysis", "study", "condition", "centre", "comparison"], correction, alpha)


def _paired_row(ga: pd.DataFrame, gb: pd.DataFrame, sa: np.ndarray, sb: np.ndarray, metric: str,
                margin: float, zero_method: str, confidence: float, base: dict) -> dict:
    va = _arm_values(ga["status"], ga[metric], metric)
    vb = _arm_values(gb["status"], gb[metric], metric)
    na, nb = np.isnan(va), np.isnan(vb)
    both_absent = na & nb
    one_absent = na ^ nb
    va[na & ~nb] = _best(metric)
    vb[nb & ~na] = _best(metric)
    keep = ~both_absent
    va, vb, sa, sb = va[keep], vb[keep], sa[keep], sb[keep]
    d = paired_differences(va, vb)
    res = signed_rank_test(d, zero_method=zero_method, confidence=confidence)
    higher = METRIC_DIRECTIONS[metric]
    row = dict(base)
    row.update(
        metric=metric, higher_is_better=higher, n=res.n, n_a=res.n, n_b=res.n,
        **_status_counts(sa, "a"), **_status_counts(sb, "b"),
        n_absent=int(both_absent.sum()), n_absent_one_arm=int(one_absent.sum()),
        n_inf=res.n_inf, n_zero=res.n - res.n_nonzero,
        **_describe(va, "a"), **_describe(vb, "b"),
        test="wilcoxon signed-rank", zero_method=zero_method, p_method=res.p_method,
        statistic=res.statistic, p=res.p, testable=res.testable, reason=res.reason,
        rank_biserial=res.rank_biserial, hl_shift=res.hl_shift, ci_low=res.ci_low,
        ci_high=res.ci_high, ci_level=res.ci_level, ci_method=res.ci_method, margin=margin,
        statistic_noninferiority=math.nan, p_noninferiority=math.nan, ni_testable=False, ni_reason="",
    )
    if not math.isnan(margin):
        # H0: a is worse than b by at least the margin. Higher-better: median(a - b) <= -margin,
        # so test d + margin > 0; lower-better: median(a - b) >= margin, so test d - margin < 0.
        shifted = d + margin if higher else d - margin
        ni = signed_rank_test(shifted, zero_method=zero_method, confidence=confidence,
                              alternative="greater" if higher else "less")
        row.update(statistic_noninferiority=ni.statistic, p_noninferiority=ni.p,
                   ni_testable=ni.testable, ni_reason=ni.reason)
    return row


def centre_comparisons(
    table: pd.DataFrame,
    *,
    models: Sequence[str] | None = None,
    centre_pairs: Sequence[tuple[str, str]] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    correction: str = "holm",
    alpha: float = 0.05,
    condition: str | None = "original",
    confidence: float = 0.95,
    source: str = "results table",
) -> pd.DataFrame:
    """Mann-Whitney U comparisons of one model's results on two centres' (different) cases.

    ``absent`` rows are dropped (nothing to segment; counted in ``n_absent``), failures enter
    with the worst value. The family for the correction is one (study, condition, model,
    centre pair) over all structures and metrics. Arm ``a`` is the first centre of the pair.
    """
    _check_options(ZERO_METHODS[0], correction, alpha)  # zero_method is not used by rank-sum
    t = _prepare(table, metrics, condition, source)
    all_models = _order(t["model"])
    if models is None:
        model_list = all_models
    else:
        model_list = list(models)
        unknown = [m for m in model_list if m not in all_models]
        if unknown:
            raise ValueError(
                f"{source}: model(s) {', '.join(unknown)} not in the table (models: {', '.join(all_models)})"
            )
    rows: list[dict] = []
    for (study, cond), grp in t.groupby(["study", "condition"], sort=False):
        centres = _order(grp["centre"])
        cpairs = list(combinations(centres, 2)) if centre_pairs is None else [tuple(p) for p in centre_pairs]
        for ca, cb in cpairs:
            for c in (ca, cb):
                if c not in centres:
                    raise ValueError(f"{source}: centre {c!r} not in the table (centres: {', '.join(centres)})")
            for model in model_list:
                gm = grp[grp["model"] == model]
                ga, gb = gm[gm["centre"] == ca], gm[gm["centre"] == cb]
                if ga.empty or gb.empty:
                    continue
                for structure in _order(gm["structure"]):
                    xa = ga[ga["structure"] == structure]
                    xb = gb[gb["structure"] == structure]
                    for metric in metrics:
                        va = _arm_values(xa["status"], xa[metric], metric)
                        vb = _arm_values(xb["status"], xb[metric], metric)
                        n_absent = int(np.isnan(va).sum() + np.isnan(vb).sum())
                        va, vb = va[~np.isnan(va)], vb[~np.isnan(vb)]
                        res = rank_sum_test(va, vb, confidence=confidence)
                        sa = xa["status"].to_numpy()
                        sb = xb["status"].to_numpy()
                        rows.append(dict(
                            analysis="cross-centre", study=study, condition=cond, centre="", model=model,
                            comparison=f"{ca} vs {cb}", arm_a=ca, arm_b=cb, structure=structure,
                            metric=metric, higher_is_better=METRIC_DIRECTIONS[metric],
                            n=res.n1 + res.n2, n_a=res.n1, n_b=res.n2,
                            **_status_counts(sa, "a"), **_status_counts(sb, "b"),
                            n_absent=n_absent, n_absent_one_arm=0, n_unpaired=0, n_inf=res.n_inf,
                            n_zero=0, **_describe(va, "a"), **_describe(vb, "b"),
                            test="mann-whitney u", zero_method="", p_method=res.p_method,
                            statistic=res.statistic, p=res.p, testable=res.testable, reason=res.reason,
                            rank_biserial=res.rank_biserial, hl_shift=res.hl_shift, ci_low=res.ci_low,
                            ci_high=res.ci_high, ci_level=res.ci_level, ci_method=res.ci_method,
                            margin=math.nan, statistic_noninferiority=math.nan, p_noninferiority=math.nan,
                            ni_testable=False, ni_reason="",
                        ))
    return _finish(rows, ["analysis", "study", "condition", "model", "comparison"], correction, alpha)


def run_stats(
    table: pd.DataFrame,
    *,
    pairs: Sequence[tuple[str, str]] | Sequence[str] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    zero_method: str = "pratt",
    correction: str = "holm",
    alpha: float = 0.05,
    margins: Mapping[str, float] | None = None,
    condition: str | None = "original",
    confidence: float = 0.95,
    source: str = "results table",
) -> pd.DataFrame:
    """Paired comparisons followed by cross-centre comparisons, in one table.

    Each analysis is corrected within its own families (see :func:`paired_comparisons` and
    :func:`centre_comparisons`); the two are not pooled into one family.
    """
    paired = paired_comparisons(table, pairs=pairs, metrics=metrics, zero_method=zero_method,
                                correction=correction, alpha=alpha, margins=margins,
                                condition=condition, confidence=confidence, source=source)
    cross = centre_comparisons(table, metrics=metrics, correction=correction, alpha=alpha,
                               condition=condition, confidence=confidence, source=source)
    frames = [f for f in (paired, cross) if not f.empty]
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.concat(frames, ignore_index=True)


def write_stats(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the statistics table as CSV atomically (temp file in the same folder, then rename)."""
    from oarbench.io import atomic_write_text

    return atomic_write_text(path, df.to_csv(index=False))


# ---------------------------------------------------------------------------
# Display
# ---------------------------------------------------------------------------


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def _fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _family_title(r) -> str:  # noqa: ANN001 - a row namedtuple
    where = f"centre {r.centre}" if r.analysis == "paired" else f"model {r.model}"
    extra = " ".join(x for x in (r.study, r.condition) if x)
    arms = f"a = {r.arm_a}, b = {r.arm_b}"
    return f"{r.analysis} | {where} | {arms} | {extra} | {r.correction} over {r.family_size} tests"


def summary_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A short, string-formatted view of :func:`run_stats` output for the terminal.

    One row per comparison; the ``family`` column titles the group of rows that share a
    multiple-comparison family (same analysis, centre or model, and arms).
    """
    out = []
    for r in df.itertuples(index=False):
        out.append({
            "family": _family_title(r),
            "structure": r.structure,
            "metric": r.metric,
            "n": f"{r.n_a}+{r.n_b}" if r.analysis != "paired" else str(r.n),
            "a median [IQR]": f"{_fmt(r.median_a)} [{_fmt(r.q1_a)}, {_fmt(r.q3_a)}]",
            "b median [IQR]": f"{_fmt(r.median_b)} [{_fmt(r.q1_b)}, {_fmt(r.q3_b)}]",
            "p": _fmt_p(r.p),
            "p adj": _fmt_p(r.p_adjusted),
            "r_rb": _fmt(r.rank_biserial, 2),
            "HL shift [CI]": f"{_fmt(r.hl_shift)} [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]",
            "verdict": r.verdict,
            "non-inferiority": r.noninferiority_verdict,
        })
    return pd.DataFrame(out)


def format_table(df: pd.DataFrame) -> str:
    """Plain-text rendering of :func:`summary_frame`, one block per family (no rich needed)."""
    view = summary_frame(df)
    if view.empty:
        return "(no comparisons)"
    if not (view["non-inferiority"] != "").any():
        view = view.drop(columns="non-inferiority")
    blocks = []
    for title, block in view.groupby("family", sort=False):
        blocks.append(title + "\n" + block.drop(columns="family").to_string(index=False))
    return "\n\n".join(blocks)
