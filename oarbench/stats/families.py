"""Multiple comparisons: which tests form one family, the correction, and the verdicts.

Two definitions of a family are offered:

* ``comparison`` (default): one question a reader asks. Paired: one (study, condition, test
  centre, model pair); cross-centre: one (study, condition, model, centre pair); observer (a
  model against a second observer): one (study, condition, test centre, model and observer);
  each over all structures x metrics of the run.
* ``study``: every test of the run in one family (paired and cross-centre together).

Non-inferiority p-values are corrected within the same families, separately from the
two-sided ones.
"""

from __future__ import annotations

import math

import pandas as pd

__all__ = ["CORRECTIONS", "FAMILIES", "FAMILY_COLUMNS", "apply_correction"]

#: ``method`` values of :func:`statsmodels.stats.multitest.multipletests` offered here.
CORRECTIONS: tuple[str, ...] = ("holm", "fdr_bh", "bonferroni", "hommel", "fdr_by", "sidak", "holm-sidak")
#: Family definitions (see the module docstring).
FAMILIES: tuple[str, ...] = ("comparison", "study")
#: Columns that identify one ``comparison`` family, per analysis.
FAMILY_COLUMNS: dict[str, list[str]] = {
    "paired": ["analysis", "study", "condition", "centre", "comparison"],
    "cross-centre": ["analysis", "study", "condition", "model", "comparison"],
    "observer": ["analysis", "study", "condition", "centre", "comparison"],
}


def _better(effect: float, higher_is_better: bool, arm_a: str, arm_b: str) -> str:
    a_larger = effect > 0
    return arm_a if a_larger == higher_is_better else arm_b


def _family_key(df: pd.DataFrame, family: str) -> pd.Series:
    if family == "study":
        return pd.Series("study", index=df.index)
    key = pd.Series("", index=df.index, dtype=object)
    for analysis, cols in FAMILY_COLUMNS.items():
        sel = df["analysis"] == analysis
        if sel.any():
            key[sel] = df.loc[sel, cols].astype(str).agg("|".join, axis=1)
    return key


def apply_correction(df: pd.DataFrame, *, family: str, correction: str, alpha: float) -> pd.DataFrame:
    """Adjust ``p`` (and ``p_noninferiority``) within each family; write the verdicts.

    Expects the columns the comparison rows carry (``p``, ``testable``, ``reason``,
    ``p_noninferiority``, ``ni_testable``, ``ni_reason``, ``ni_alpha``, ``ni_ci_low``,
    ``ni_ci_high``, ``ni_ci_level``, ``margin``, ``higher_is_better``, ``rank_biserial``, arms).
    The non-inferiority verdict needs both the corrected one-sided test (``p_noninferiority_adjusted
    < ni_alpha``) and the matching two-sided ``1 - 2 ni_alpha`` interval clearing the margin, so
    it never contradicts the interval printed beside it.
    """
    from statsmodels.stats.multitest import multipletests

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    df = df.copy()
    df["p_adjusted"] = math.nan
    df["p_noninferiority_adjusted"] = math.nan
    df["family_size"] = 0
    df["correction"] = correction
    df["family"] = family
    keys = _family_key(df, family)
    for _, idx in df.groupby(keys, sort=False).groups.items():
        for pcol, acol in (("p", "p_adjusted"), ("p_noninferiority", "p_noninferiority_adjusted")):
            p = df.loc[idx, pcol]
            ok = p.notna()
            if ok.any():
                df.loc[p[ok].index, acol] = multipletests(p[ok].to_numpy(dtype=float), method=correction)[1]
            if pcol == "p":
                df.loc[idx, "family_size"] = int(ok.sum())
    verdicts, ni_verdicts, noninferior = [], [], []
    for row in df.itertuples(index=False):
        if not row.testable:
            verdicts.append(f"not testable ({row.reason})")
        elif row.p_adjusted < alpha:
            verdicts.append(f"significant ({_better(row.rank_biserial, row.higher_is_better, row.arm_a, row.arm_b)} better)")
        else:
            verdicts.append("n.s.")
        verdict, flag = _ni_verdict(row, correction)
        ni_verdicts.append(verdict)
        noninferior.append(flag)
    df["verdict"] = verdicts
    df["noninferior"] = pd.array(noninferior, dtype="boolean")
    df["noninferiority_verdict"] = ni_verdicts
    return df


def _ni_verdict(row, correction: str) -> tuple[str, object]:  # noqa: ANN001 - a row namedtuple
    if math.isnan(row.margin):
        return "", pd.NA
    if not row.ni_testable:
        return f"not testable ({row.ni_reason})", pd.NA
    m = row.margin
    level = f"{100 * (1 - 2 * row.ni_alpha):g}% CI"
    if row.higher_is_better:
        clears = row.ni_ci_low > -m
    else:
        clears = row.ni_ci_high < m
    shown = row.p_noninferiority_adjusted < row.ni_alpha
    if shown and clears:
        return f"{row.arm_a} non-inferior (margin {m:g})", True
    if clears:
        return f"non-inferiority not shown after {correction} correction (margin {m:g})", False
    if shown:  # ties: the test and the interval disagree; the interval decides against
        return f"non-inferiority not shown (margin {m:g}; {level} reaches the margin)", False
    return f"non-inferiority not shown (margin {m:g})", False
