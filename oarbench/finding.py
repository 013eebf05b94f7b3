"""The study's question in one table: does a local model lose accuracy on the other centre, and
does the federated model hold against the local models?

Every claim is a **paired** comparison on the same patients of one test centre (Wilcoxon
signed-rank on the per-patient differences, docs/statistics.md), never a comparison of
different patients: a rank-sum test of one model on centre A's patients against centre B's
measures case mix and domain shift together (a model identical, patient for patient, to
centre B's own model would still "lose" on B if B's patients are harder).

Built from the statistics table (:func:`oarbench.stats.run_stats`) of a study whose models
declare the centres they were trained on (``trained_on``), or, when the results table is
passed (``table=``), from paired comparisons computed here with each pair oriented
``model - reference`` (needed for a non-inferiority test of the federated model when
``oarbench stats`` ran the pair the other way round).

Questions (column ``question``):

* ``local on other centre``: a local model (trained on centre X only) against the model
  trained on centre Y (Y's own local model; the federated models that saw Y when Y has no
  local model), on Y's patients. ``loses`` when the Holm-adjusted two-sided p < alpha and the
  paired estimate (Hodges-Lehmann shift of ``model - reference``, the quantity the
  signed-rank test is about) says the model is worse; ``better`` when it says the opposite;
  else ``no significant difference``.
* ``federated vs local``: a federated model (trained on several centres) against each local
  model, on every test centre. ``holds`` when non-inferiority at the run's margin is shown:
  the one-sided signed-rank test (Holm-adjusted across the finding) below ``ni_alpha`` *and*
  the two-sided ``1 - 2 ni_alpha`` Hodges-Lehmann interval clearing the margin; ``inferior``
  when that whole interval lies beyond the margin (worse by more than the margin; read off the
  interval, per comparison); ``not shown`` otherwise. No margin for the metric: ``no margin``.

``not testable (...)`` when the signed-rank test cannot run (fewer than 6 patients or non-zero
differences, docs/statistics.md); ``not tested (...)`` when the statistics table holds the
pair only the other way round and no results table was given.

**One family.** Every p-value of the finding (two-sided ones of the first question,
non-inferiority ones of the second) is corrected together (Holm by default): the finding is
one claim. One-sided p-values enter as ``p * alpha / ni_alpha`` (2p at the defaults) so that
one correction at ``alpha`` holds both levels; ``p_adjusted`` is given back on the row's own
scale and compared with ``level``.

Columns (:data:`FINDING_COLUMNS`): ``question``, ``model``, ``reference``, ``centre`` (the
test centre whose patients are compared), ``other`` (the centre the local model of the row was
trained on: the model's for the first question, the reference's for the second),
``structure``, ``metric``, ``design`` (what was compared, in words), ``test``, ``n`` (units:
patients by default), ``median_model``, ``median_reference`` (descriptive), ``estimate`` (the
paired estimate the test is about: Hodges-Lehmann shift of ``model - reference``, in the
metric's unit), ``ci_low``, ``ci_high``, ``ci_level`` (its interval: 95 % for the first
question, ``1 - 2 ni_alpha`` for the second), ``margin``, ``p`` (the test's p-value: two-sided,
or one-sided non-inferiority), ``p_adjusted``, ``level`` (alpha or ni_alpha), ``correction``,
``family_size`` and ``verdict``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["FINDING_COLUMNS", "centre_shift_finding", "finding_lines"]

FINDING_COLUMNS = ("question", "model", "reference", "centre", "other", "structure", "metric", "design", "test",
                   "n", "median_model", "median_reference", "estimate", "ci_low", "ci_high", "ci_level", "margin",
                   "p", "p_adjusted", "level", "correction", "family_size", "verdict")

Q_LOCAL = "local on other centre"
Q_FEDERATED = "federated vs local"
_NAMES = {"dsc": "DSC", "sdsc": "surface DSC", "hd95": "HD95", "hd": "HD", "msd": "MSD", "assd": "ASSD",
          "vs": "volumetric similarity", "centroid_mm": "centroid distance", "apl_mm": "APL",
          "apl_mm_per_slice": "APL per slice"}


def _higher_is_better(metric: str) -> bool:
    from oarbench.stats.comparisons import METRIC_DIRECTIONS

    if metric not in METRIC_DIRECTIONS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRIC_DIRECTIONS)}")
    return METRIC_DIRECTIONS[metric]


def _rows_for(stats: pd.DataFrame, metric: str, structures: Sequence[str] | None) -> pd.DataFrame:
    s = stats[(stats["metric"] == metric) & (stats["analysis"] == "paired")] if len(stats) else stats
    if "condition" in s:
        s = s[s["condition"].fillna("original") == "original"]
    if structures:
        s = s[s["structure"].isin(list(structures))]
    return s


def _f(x: object) -> float:
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _comparisons(trained_on: Mapping[str, Sequence[str]], centres: Sequence[str]) -> list[tuple[str, str, str, str, str]]:
    """(question, model, reference, test centre, other) for every comparison the finding needs."""
    local = {m: str(c[0]) for m, c in trained_on.items() if len(c) == 1}
    federated = [m for m, c in trained_on.items() if len(c) > 1]
    out = []
    for model, own in local.items():
        for centre in centres:
            if centre == own:
                continue
            refs = [m for m, c in local.items() if c == centre] or \
                   [m for m in federated if centre in [str(x) for x in trained_on[m]]]
            out.extend((Q_LOCAL, model, ref, centre, own) for ref in refs)
    for fl in federated:
        for model, own in local.items():
            out.extend((Q_FEDERATED, fl, model, centre, own) for centre in centres)
    return out


def _oriented(row: pd.Series, model: str) -> dict[str, float]:
    """The stats row's numbers as ``model - reference`` (flipped when the model is arm b)."""
    flip = row["arm_a"] != model
    sign = -1.0 if flip else 1.0
    lo, hi = _f(row["ci_low"]), _f(row["ci_high"])
    nlo, nhi = _f(row["ni_ci_low"]) if "ni_ci_low" in row else math.nan, \
        _f(row["ni_ci_high"]) if "ni_ci_high" in row else math.nan
    return {
        "flip": flip,
        "estimate": sign * _f(row["hl_shift"]),
        "ci_low": -hi if flip else lo, "ci_high": -lo if flip else hi, "ci_level": _f(row.get("ci_level")),
        "ni_ci_low": -nhi if flip else nlo, "ni_ci_high": -nlo if flip else nhi,
        "ni_ci_level": _f(row.get("ni_ci_level")),
        "rank_biserial": sign * _f(row.get("rank_biserial")),
        "median_model": _f(row["median_b" if flip else "median_a"]),
        "median_reference": _f(row["median_a" if flip else "median_b"]),
    }


def _worse(estimate: float, rank_biserial: float, higher: bool) -> bool | None:
    """Whether the paired estimate says the model is worse; the rank-biserial sign breaks a zero shift."""
    e = estimate if not math.isnan(estimate) and estimate != 0 else rank_biserial
    if math.isnan(e) or e == 0:
        return None
    return e < 0 if higher else e > 0


def _recompute(table: pd.DataFrame, comps: list, metric: str, stats: pd.DataFrame, margin: float,
               ni_alpha: float) -> pd.DataFrame:
    """Paired rows oriented ``model - reference`` for every comparison, from the results table."""
    from oarbench.stats.comparisons import paired_comparisons

    opts = {}
    if len(stats):
        for col in ("unit", "zero_method"):
            if col in stats and stats[col].notna().any():
                opts[col] = str(stats[col].dropna().iloc[0])
    pairs = list(dict.fromkeys(f"{m}:{r}" for _, m, r, _, _ in comps))
    margins = {metric: margin} if np.isfinite(margin) else None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return paired_comparisons(table, pairs=pairs, metrics=[metric], margins=margins, ni_alpha=ni_alpha,
                                  bootstrap=None, _correct=False, **opts)


def _reason(row: pd.Series, column: str, verdict: str) -> str:
    """Why a test did not run: the row's reason, or the one its written verdict states."""
    if column in row and isinstance(row[column], str) and row[column]:
        return str(row[column])
    v = row[verdict] if verdict in row and isinstance(row[verdict], str) else ""
    return v.removeprefix("not testable (").removesuffix(")") if v.startswith("not testable (") else (v or "?")


def _run_margin(stats: pd.DataFrame, metric: str) -> float:
    if len(stats) and "margin" in stats:
        m = pd.to_numeric(stats.loc[stats["metric"] == metric, "margin"], errors="coerce").dropna()
        if len(m):
            return float(m.iloc[0])
    return math.nan


def centre_shift_finding(stats: pd.DataFrame, trained_on: Mapping[str, Sequence[str]], *,
                         structures: Sequence[str] | None = None, metric: str = "dsc", alpha: float = 0.05,
                         tolerance: float | None = None, table: pd.DataFrame | None = None,
                         margin: float | None = None, ni_alpha: float | None = None,
                         correction: str = "holm") -> pd.DataFrame:
    """One row per (question, model, reference, test centre, structure); see the module docstring.

    Parameters
    ----------
    stats : the statistics table (``stats.csv``; paired rows are used).
    trained_on : model -> centres it was trained on (one centre: local; several: federated).
    structures : only these structures (default all).
    metric : the metric of the finding (default ``dsc``).
    alpha : two-sided level of the first question.
    tolerance : ignored (kept for callers of the earlier median rule); the margin decides.
    table : the results table; when given, the paired tests are computed here, each pair
        oriented ``model - reference``.
    margin : non-inferiority margin in the metric's unit; default the run's (``margin`` of
        ``stats``).
    ni_alpha : one-sided level; default the run's (``ni_alpha`` of ``stats``), else 0.025.
    correction : :func:`statsmodels.stats.multitest.multipletests` method over the finding.
    """
    from statsmodels.stats.multitest import multipletests

    del tolerance
    higher = _higher_is_better(metric)
    if margin is None:
        margin = _run_margin(stats, metric)
    if ni_alpha is None:
        v = pd.to_numeric(stats["ni_alpha"], errors="coerce").dropna() if len(stats) and "ni_alpha" in stats \
            else pd.Series(dtype=float)
        ni_alpha = float(v.iloc[0]) if len(v) else 0.025
    s = _rows_for(stats, metric, structures)
    if table is not None:
        centres = list(dict.fromkeys(table["centre"].fillna("").astype(str))) if "centre" in table else [""]
    else:
        centres = list(dict.fromkeys(s["centre"].fillna("").astype(str))) if len(s) else []
    comps = _comparisons(trained_on, centres)
    if table is not None:  # only models the results table holds
        present = set(table["model"].astype(str)) if "model" in table else set()
        comps = [c for c in comps if c[1] in present and c[2] in present]
    if table is not None and comps:
        s = _rows_for(_recompute(table, comps, metric, stats, margin, ni_alpha), metric, structures)
    out: list[dict] = []
    for question, model, ref, centre, other in comps:
        sel = s[(s["centre"].fillna("").astype(str) == centre)
                & (((s["arm_a"] == model) & (s["arm_b"] == ref)) | ((s["arm_a"] == ref) & (s["arm_b"] == model)))]
        sel = sel.drop_duplicates("structure", keep="first")
        for _, r in sel.iterrows():
            o = _oriented(r, model)
            testable = bool(r["testable"]) if "testable" in r else bool(pd.notna(r["p"]))
            reason = _reason(r, "reason", "verdict")
            base = {"question": question, "model": model, "reference": ref, "centre": centre, "other": other,
                    "structure": r["structure"], "metric": metric, "n": int(_f(r["n"])) if pd.notna(r["n"]) else 0,
                    "median_model": o["median_model"], "median_reference": o["median_reference"],
                    "correction": correction}
            if question == Q_LOCAL:
                base.update(design=f"paired: {model} (trained on {other}) vs {ref} (trained on {centre}) on the "
                                   f"same patients of centre {centre}",
                            test="wilcoxon signed-rank, two-sided", estimate=o["estimate"], ci_low=o["ci_low"],
                            ci_high=o["ci_high"], ci_level=o["ci_level"], margin=math.nan,
                            p=_f(r["p"]) if testable else math.nan, level=alpha,
                            _state="test" if testable else f"not testable ({reason})",
                            _worse=_worse(o["estimate"], o["rank_biserial"], higher))
            else:
                where = f"centre {centre} ({ref}'s own)" if centre == other else \
                    f"centre {centre}, which {ref} did not see"
                base.update(design=f"paired: {model} vs {ref} on the same patients of {where}",
                            test=f"wilcoxon signed-rank, one-sided non-inferiority (margin {margin:g})"
                                 if np.isfinite(margin) else "wilcoxon signed-rank",
                            estimate=o["estimate"], ci_low=o["ni_ci_low"], ci_high=o["ni_ci_high"],
                            ci_level=o["ni_ci_level"], margin=margin, level=ni_alpha, p=math.nan)
                ni_testable = bool(r["ni_testable"]) if "ni_testable" in r else bool(pd.notna(r["p_noninferiority"]))
                if not np.isfinite(margin):
                    base["_state"] = "no margin"
                elif table is None and not math.isclose(_f(r["margin"]), margin):
                    base["_state"] = (f"not tested (stats used margin {_f(r['margin']):g}; pass the results "
                                      f"table for margin {margin:g})")
                elif o["flip"]:
                    base["_state"] = (f"not tested (stats ran {ref}:{model}; pass the results table, or run "
                                      f"oarbench stats --pair {model}:{ref})")
                    base.update(ci_low=math.nan, ci_high=math.nan, ci_level=math.nan)
                elif not ni_testable:
                    base["_state"] = f"not testable ({_reason(r, 'ni_reason', 'noninferiority_verdict')})"
                else:
                    base["_state"] = "test"
                    base["p"] = _f(r["p_noninferiority"])
            out.append(base)
    # one family over the finding: p on the alpha scale, corrected once
    q = [row["p"] * alpha / row["level"] if row["_state"] == "test" and np.isfinite(row["p"]) else math.nan
         for row in out]
    ok = [i for i, v in enumerate(q) if np.isfinite(v)]
    adj = multipletests(np.array([q[i] for i in ok]), method=correction)[1] if ok else []
    for row in out:
        row["p_adjusted"] = math.nan
        row["family_size"] = len(ok)
    for i, a in zip(ok, adj):
        # back on the row's own scale; a value clipped at 1 stays 1
        out[i]["p_adjusted"] = 1.0 if a >= 1.0 else min(1.0, float(a) * out[i]["level"] / alpha)
    for row in out:
        state = row.pop("_state")
        worse = row.pop("_worse", None)
        if state != "test":
            row["verdict"] = state
            if row["question"] == Q_FEDERATED and state == "no margin":
                row["verdict"] = "no margin"
            continue
        significant = row["p_adjusted"] < row["level"]
        if row["question"] == Q_LOCAL:
            row["verdict"] = ("loses" if worse else "better") if significant and worse is not None \
                else "no significant difference"
        else:
            m, lo, hi = row["margin"], row["ci_low"], row["ci_high"]
            clears = lo > -m if higher else hi < m
            beyond = hi < -m if higher else lo > m
            row["verdict"] = "holds" if (significant and clears) else "inferior" if beyond else "not shown"
    return pd.DataFrame(out, columns=list(FINDING_COLUMNS))


def _num(x: float, metric: str) -> str:
    digits = 3 if _higher_is_better(metric) else 2
    if not (np.isfinite(x) or np.isinf(x)):
        return "-"
    return f"{x:+.{digits}f}" if np.isfinite(x) else ("+inf" if x > 0 else "-inf")


def _cell(r: object, metric: str) -> str:
    est = f"{r.structure} {_num(r.estimate, metric)}"  # type: ignore[attr-defined]
    if np.isfinite(r.ci_low) or np.isinf(r.ci_low):  # type: ignore[attr-defined]
        est += f" [{_num(r.ci_low, metric)}, {_num(r.ci_high, metric)}]"  # type: ignore[attr-defined]
    return est


def finding_lines(finding: pd.DataFrame, *, alpha: float = 0.05, tolerance: float | None = None) -> list[str]:
    """One plain-language sentence per row group of :func:`centre_shift_finding`'s table:
    (model, reference, test centre), naming the design, the test, the correction, and per verdict
    the structures with their paired estimate and interval."""
    del alpha, tolerance
    lines = []
    if finding.empty:
        return lines
    for (question, model, ref, centre), g in finding.groupby(["question", "model", "reference", "centre"],
                                                             sort=False):
        metric = str(g["metric"].iloc[0])
        name = _NAMES.get(metric, metric)
        unit = "" if _higher_is_better(metric) else " mm"
        n = int(g["n"].max())
        corr = f"{g['correction'].iloc[0]}-adjusted across the finding's {int(g['family_size'].iloc[0])} tests"
        counts = g["verdict"].value_counts()
        parts = []
        order = (["loses", "better", "no significant difference"] if question == Q_LOCAL
                 else ["holds", "inferior", "not shown", "no margin"])
        for verdict in order:
            rows = g[g["verdict"] == verdict]
            if not len(rows):
                continue
            listed = " (" + ", ".join(_cell(r, metric) for r in rows.itertuples()) + ")" \
                if verdict in ("loses", "better", "inferior", "not shown") else ""
            parts.append(f"{verdict} for {len(rows)}{listed}")
        other = [v for v in counts.index if v not in order]
        for v in other:
            parts.append(f"{v} for {int(counts[v])}")
        own = g["other"].iloc[0]
        if question == Q_LOCAL:
            head = (f"{model} (trained on {own}) against {ref} (trained on {centre}) on centre {centre}'s patients "
                    f"(paired, {n} patients; estimate = Hodges-Lehmann shift of {model} - {ref} in {name}{unit} "
                    f"[95% CI]; Wilcoxon signed-rank, {corr}, p < {g['level'].iloc[0]:g})")
        else:
            where = f"centre {centre} ({ref}'s own)" if centre == own else f"centre {centre}, which {ref} did not see"
            m = g["margin"].iloc[0]
            ci = f"[{100 * (1 - 2 * g['level'].iloc[0]):g}% CI]"
            head = (f"{model} against {ref} on {where} (paired, {n} patients; estimate = Hodges-Lehmann shift "
                    f"of {model} - {ref} in {name}{unit} {ci}; "
                    + (f"non-inferiority margin {m:g}{unit}, one-sided signed-rank at {g['level'].iloc[0]:g}, "
                       f"{corr}, and the interval clearing the margin" if np.isfinite(m) else "no margin declared")
                    + ")")
        lines.append(f"{head}, {len(g)} structure{'s' if len(g) != 1 else ''}: {'; '.join(parts)}.")
    return lines
