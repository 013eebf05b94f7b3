"""The study's question in one table: do local models lose accuracy on the other centre, and
does the federated model hold?

Built from the statistics table (:func:`oarbench.stats.run_stats`, docs/statistics.md) of
a study whose models declare the centres they were trained on:

* a **local** model (trained on one centre X) is compared between X's test cases and each
  other centre Y's (Mann-Whitney U, ``cross-centre`` rows): ``loses`` when its median is
  lower on Y and the Holm-adjusted p < alpha;
* a **federated** model (trained on several centres) is compared, on each centre X, with
  the local model of X on the same cases (Wilcoxon signed-rank, ``paired`` rows):
  ``holds`` when its median is no more than ``tolerance`` below the local model's, and
  on every other centre Y with the local model of X there (the cases the local model
  did not see).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["FINDING_COLUMNS", "centre_shift_finding", "finding_lines"]

FINDING_COLUMNS = ("question", "model", "reference", "centre", "other", "structure", "median_model",
                   "median_reference", "difference", "p_adjusted", "test", "verdict")


def _rows_for(stats: pd.DataFrame, metric: str, structures: Sequence[str] | None) -> pd.DataFrame:
    s = stats[stats["metric"] == metric]
    if "condition" in s:
        s = s[s["condition"].fillna("original") == "original"]
    if structures:
        s = s[s["structure"].isin(list(structures))]
    return s


def centre_shift_finding(stats: pd.DataFrame, trained_on: Mapping[str, Sequence[str]], *,
                         structures: Sequence[str] | None = None, metric: str = "dsc", alpha: float = 0.05,
                         tolerance: float = 0.02) -> pd.DataFrame:
    """One row per (question, model, centre, structure); see the module docstring.

    Columns :data:`FINDING_COLUMNS`. ``question`` is ``local on other centre`` (model = the
    local model, reference = the same model on its own centre, ``centre`` its own centre,
    ``other`` the other one) or ``federated vs local`` (model = the federated model,
    reference = the local model of ``other``, evaluated on ``centre``). ``difference`` =
    ``median_model - median_reference``. ``verdict``: ``loses``/``no significant loss``
    (first question), ``holds``/``lower`` (second, by the tolerance on the medians, with
    the paired test's adjusted p for the statistics).
    """
    local = {m: c[0] for m, c in trained_on.items() if len(c) == 1}
    federated = [m for m, c in trained_on.items() if len(c) > 1]
    s = _rows_for(stats, metric, structures)
    out = []
    cross = s[s["analysis"] == "cross-centre"] if "analysis" in s else s.iloc[0:0]
    for model, own in local.items():
        for r in cross[cross["model"] == model].itertuples(index=False):
            if own not in (r.arm_a, r.arm_b):
                continue
            other = r.arm_b if r.arm_a == own else r.arm_a
            m_own, m_other = (r.median_a, r.median_b) if r.arm_a == own else (r.median_b, r.median_a)
            diff = float(m_other) - float(m_own)
            lost = diff < 0 and np.isfinite(r.p_adjusted) and r.p_adjusted < alpha
            out.append({"question": "local on other centre", "model": model, "reference": model, "centre": own,
                        "other": other, "structure": r.structure, "median_model": float(m_other),
                        "median_reference": float(m_own), "difference": diff, "p_adjusted": float(r.p_adjusted),
                        "test": r.test, "verdict": "loses" if lost else "no significant loss"})
    paired = s[s["analysis"] == "paired"] if "analysis" in s else s.iloc[0:0]
    for fl in federated:
        for model, own in local.items():
            for r in paired[(paired["arm_a"].isin([fl, model])) & (paired["arm_b"].isin([fl, model]))
                            & (paired["arm_a"] != paired["arm_b"])].itertuples(index=False):
                m_fl, m_loc = (r.median_a, r.median_b) if r.arm_a == fl else (r.median_b, r.median_a)
                diff = float(m_fl) - float(m_loc)
                out.append({"question": "federated vs local", "model": fl, "reference": model, "centre": r.centre,
                            "other": own, "structure": r.structure, "median_model": float(m_fl),
                            "median_reference": float(m_loc), "difference": diff,
                            "p_adjusted": float(r.p_adjusted), "test": r.test,
                            "verdict": "holds" if diff >= -tolerance else "lower"})
    return pd.DataFrame(out, columns=list(FINDING_COLUMNS))


def finding_lines(finding: pd.DataFrame, *, alpha: float = 0.05, tolerance: float = 0.02) -> list[str]:
    """Plain-language statements of :func:`centre_shift_finding`'s table, one per model and centre."""
    lines = []
    q1 = finding[finding["question"] == "local on other centre"]
    for (model, own, other), g in q1.groupby(["model", "centre", "other"], sort=True):
        lost = g[g["verdict"] == "loses"]
        worse = g[g["difference"] < 0]
        lines.append(
            f"{model} (trained on {own}) on centre {other}: median DSC lower than on {own} for {len(worse)} of "
            f"{len(g)} structures, significantly for {len(lost)} (Mann-Whitney U, Holm-adjusted p < {alpha:g})"
            + (f": {', '.join(f'{r.structure} {r.median_reference:.2f} -> {r.median_model:.2f}' for r in lost.itertuples())}"
               if len(lost) else "") + ".")
    q2 = finding[finding["question"] == "federated vs local"]
    for (model, ref, centre), g in q2.groupby(["model", "reference", "centre"], sort=True):
        held = g[g["verdict"] == "holds"]
        own = g["other"].iloc[0]
        where = "its own centre" if own == centre else f"centre {centre}, which {ref} did not see"
        sig = g[(g["p_adjusted"] < alpha) & (g["difference"] < 0)]
        lines.append(
            f"{model} vs {ref} on {where}: within {tolerance:g} DSC of it or better (median) for {len(held)} of "
            f"{len(g)} structures; significantly lower (Wilcoxon signed-rank, Holm-adjusted p < {alpha:g}) for "
            f"{len(sig)}" + (f": {', '.join(sig['structure'])}" if len(sig) else "") + ".")
    return lines
