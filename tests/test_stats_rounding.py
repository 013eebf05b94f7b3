"""Ranks of differences as decimal arithmetic gives them: floating-point residue after a
subtraction or a non-inferiority shift must not break ties or zeros.

Oracle: the exact permutation distribution computed here on exact decimals (``fractions``),
by enumerating every sign pattern; independent of oarbench's dynamic programme and of floats.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from oarbench.stats import rank_sum_test, round_for_ranking, signed_rank_test


def _exact_signed_rank_p(d: list[Fraction], alternative: str) -> Fraction:
    """Exact signed-rank permutation p on exact values (pratt: zeros ranked, no sign)."""
    mags = sorted({abs(x) for x in d})
    # mid-ranks of |d| by exact comparison
    rank = {}
    pos = 1
    for m in mags:
        k = sum(1 for x in d if abs(x) == m)
        rank[m] = Fraction(2 * pos + k - 1, 2)
        pos += k
    nz = [x for x in d if x != 0]
    obs = sum(rank[abs(x)] for x in nz if x > 0)
    stats = [sum(rank[abs(x)] for x, s in zip(nz, signs) if s) for signs in itertools.product((0, 1), repeat=len(nz))]
    total = Fraction(len(stats))
    p_ge = sum(1 for s in stats if s >= obs) / total
    p_le = sum(1 for s in stats if s <= obs) / total
    if alternative == "greater":
        return p_ge
    if alternative == "less":
        return p_le
    return min(Fraction(1), 2 * min(p_ge, p_le))


def _dec(values: list[str]) -> list[Fraction]:
    return [Fraction(v) for v in values]


def test_shifted_differences_keep_their_decimal_ties():
    d = ["0", ".01", ".015", "-.015", "0", "-.005", ".005", "-.01"]
    m = Fraction("0.01")
    expected = _exact_signed_rank_p([x + m for x in _dec(d)], "greater")
    assert expected == Fraction(3, 128)  # 0.0234375
    got = signed_rank_test(np.array([float(x) for x in d]) + 0.01, alternative="greater")
    assert got.p == float(expected)  # without rounding: 0.015625 (-0.005 and 0.005 ranked apart)


def test_non_inferiority_across_the_level_follows_decimal_arithmetic():
    a = ["0.84", "0.7", "0.8", "0.78", "0.8", "0.71", "0.84", "0.86", "0.89"]
    b = ["0.855", "0.69", "0.785", "0.77", "0.81", "0.7", "0.835", "0.87", "0.895"]
    exact = [Fraction(x) - Fraction(y) + Fraction("0.01") for x, y in zip(a, b)]
    expected = _exact_signed_rank_p(exact, "greater")
    assert float(expected) == pytest.approx(0.0234375)
    d = np.array([float(x) for x in a]) - np.array([float(y) for y in b]) + 0.01
    got = signed_rank_test(d, alternative="greater")
    assert got.p == float(expected) < 0.025  # was 0.0371, the other side of 0.025


def test_two_sided_and_residue_zeros():
    # 0.3 - 0.1 - 0.2 is 5.6e-17 in floats, 0 in decimals: it must count as a zero difference
    d = np.array([0.3 - 0.1 - 0.2, 0.1, 0.2, -0.3, 0.4, 0.5, 0.6, 0.7])
    res = signed_rank_test(d)
    assert res.n_nonzero == 7
    exact = _dec(["0", ".1", ".2", "-.3", ".4", ".5", ".6", ".7"])
    assert res.p == pytest.approx(float(_exact_signed_rank_p(exact, "two-sided")), abs=1e-15)


def test_round_for_ranking_grid_and_infinities():
    v = round_for_ranking(np.array([-0.005000000000000001, 0.005, np.inf, -np.inf, 0.0]))
    assert v[0] == -v[1] and np.isinf(v[2]) and np.isinf(v[3]) and v[4] == 0
    assert not np.signbit(round_for_ranking(np.array([-1e-20, 1.0]))[0])  # residue becomes +0
    # 12 significant digits of the largest: differences at the 11th digit are kept
    w = round_for_ranking(np.array([100.0, 100.00000001]))
    assert w[0] != w[1]


def test_rank_sum_ties_of_equal_decimals():
    # patient means 0.1 + 0.2 (0.30000000000000004) and 0.3 are one value: a tie in the ranks
    x = np.array([0.1 + 0.2, 0.5, 0.6, 0.7, 0.8])
    y = np.array([0.3, 0.1, 0.2, 0.25, 0.35])
    from scipy import stats as st

    res = rank_sum_test(x, y)
    oracle = st.mannwhitneyu([0.3, 0.5, 0.6, 0.7, 0.8], y, alternative="two-sided", method="asymptotic")
    assert res.p_method == "asymptotic"  # the tie is seen
    assert res.p == pytest.approx(oracle.pvalue, abs=1e-15) and res.statistic == oracle.statistic


def test_stats_help_lists_every_metric_the_docs_list():
    import re
    from pathlib import Path

    from click.testing import CliRunner

    from oarbench.cli import main
    from oarbench.stats import METRIC_DIRECTIONS

    out = CliRunner().invoke(main, ["stats", "--help"], terminal_width=400).output
    listed = set(re.findall(r"[a-z0-9_]+", out.split("--metrics", 1)[1].split("--correction", 1)[0]))
    assert set(METRIC_DIRECTIONS) <= listed
    doc = (Path(__file__).resolve().parents[1] / "docs" / "statistics.md").read_text()
    row = [line for line in doc.splitlines() if line.startswith("| `--metrics`")][0]
    spans = re.findall(r"`([^`]+)`", row.split("|")[3])
    assert {m.strip() for span in spans for m in span.split(",")} == set(METRIC_DIRECTIONS)


def test_bootstrap_of_equal_values_is_that_value():
    from oarbench.stats import BootstrapOptions, bootstrap_ci

    assert bootstrap_ci(np.full(12, 0.8), "median") == (0.8, 0.8)
    assert bootstrap_ci(np.full(12, 0.8), "mean", BootstrapOptions(n_resamples=0)) != (0.8, 0.8)
