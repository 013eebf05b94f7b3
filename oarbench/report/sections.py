"""The sections of the report, in page order: one function and one template each.

A section function takes the :class:`~oarbench.report.context.ReportContext` and returns
a :class:`Section`: its anchor id, its title, the name of its template in ``templates/``
and the values that template shows. :data:`SECTIONS` lists the functions in page order;
adding a section is one function, one template and one entry in that list.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

import oarbench.report.figures as F
from oarbench.report.context import ReportContext, gallery_criteria, inside
from oarbench.report.data import (
    _KIND_SHORT,
    _METRICS,
    _ORIGINAL,
    EXPLANATIONS,
    SIGNIFICANCE,
    _flatten,
    _fp_summary,
    _group_label,
    _iqr,
    _normalise,
    _slug,
    _structure_order,
    lowest_median_dsc,
    noise_floor_table,
    quantile_inf,
    robustness_deltas,
    stats_counts,
)
from oarbench.report.views import Cell, TableView, csv_link, figure_view, fmt, table_view, text_columns

__all__ = ["Section", "SECTIONS"]


@dataclass(frozen=True)
class Section:
    """One section of the page: anchor id, title (also the navigation entry), template and its values."""

    id: str
    title: str
    template: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def nav(self) -> str:
        return self.title.split(":")[0]


def _notes(ctx: ReportContext, sid: str) -> list[str]:
    return [str(n) for n in ctx.section_notes.get(sid, ())]


# --------------------------------------------------------------------------- at a glance


def _study_line(ctx: ReportContext) -> str:
    df = ctx.table
    orig = ctx.original
    studies = sorted(set(df["study"])) if "study" in df.columns else []
    centres = [f"{c} ({g['case'].nunique()} cases)" for c, g in orig.groupby("centre", sort=True)]
    conds = sorted(set(df["condition"]) | (set(_normalise(ctx.robustness)["condition"]) if ctx.robustness is not None
                                            and "condition" in ctx.robustness.columns else set()))
    counts = df["status"].value_counts()
    present = ctx.present_structures()
    parts = [f"Study {', '.join(studies)}"] if studies else []
    parts += [
        f"centres: {', '.join(centres) or 'none'}",
        f"models: {', '.join(ctx.models)}",
        f"{df['structure'].nunique()} structures"
        + (f" ({len(present)} present in a reference or prediction)" if len(present) < df["structure"].nunique() else ""),
        f"conditions: {', '.join(conds)}",
        f"{len(df)} rows (" + ", ".join(f"{s} {int(counts.get(s, 0))}" for s in ("ok", "missed", "hallucinated",
                                                                                "absent", "missing"))
        + "".join(f", {s} {int(n)}" for s, n in counts.items() if s not in ("ok", "missed", "hallucinated", "absent",
                                                                           "missing")) + ")",
    ]
    return " · ".join(parts)


def _headline_view(ctx: ReportContext) -> tuple[Any, str]:
    h = ctx.headline()
    if h.empty:
        return None, ""
    centres = ctx.centres
    trained = ctx.options.trained_on or {}
    cols = ["model"] + (["trained on"] if trained else []) + [f"centre {c}" for c in centres]
    rows = []
    for model in ctx.models:
        g = h[h["model"] == model]
        if g.empty:
            continue
        row = [Cell(model, "t")]
        if trained:
            row.append(Cell(", ".join(map(str, trained.get(model, ()))) or "–", "t"))
        by_c = {r.centre: r for r in g.itertuples()}
        for c in centres:
            r = by_c.get(c)
            if r is None:
                row.append(Cell("–", "t"))
                continue
            extra = [f"n={r.n_cases}"]
            if r.n_missed or r.n_hallucinated:
                extra.append(f"{r.n_missed} missed, {r.n_hallucinated} halluc.")
            row.append(Cell(_iqr(r.dsc_median, r.dsc_q1, r.dsc_q3) + (f" {r.setting}" if r.setting else ""), "t",
                            " · ".join(extra)))
        rows.append(row)

    note = ("Per case, the mean DSC over its structures (missed and hallucinated count as 0); each cell: median "
            "[Q1–Q3] over the centre's n test cases. "
            + ("within / cross: the model was / was not trained on that centre." if trained else
               "Training centres are not known (set trained_on per model in the study TOML), so within- and "
               "cross-centre cells are not marked."))
    return TableView([Cell(c, "t") for c in cols], rows), note


def _within_cross(ctx: ReportContext) -> Any:
    h = ctx.headline()
    trained = ctx.options.trained_on or {}
    if not trained or h.empty or not (h["setting"] != "").any():
        return None
    wc = []
    for model in ctx.models:
        g = h[(h["model"] == model) & (h["setting"] != "")]
        if g.empty:
            continue
        w, c = g[g["setting"] == "within"], g[g["setting"] == "cross"]
        wm = float(np.median(w["dsc_median"])) if len(w) else math.nan
        cm = float(np.median(c["dsc_median"])) if len(c) else math.nan
        wc.append({"model": model, "trained on": ", ".join(map(str, trained.get(model, ()))),
                   "within-centre DSC": fmt(wm) + (f" ({', '.join(w['centre'])})" if len(w) else ""),
                   "cross-centre DSC": fmt(cm) + (f" ({', '.join(c['centre'])})" if len(c) else ""),
                   "cross − within": fmt(cm - wm) if len(w) and len(c) else "–"})
    df = pd.DataFrame(wc)
    return table_view(df, text_cols=list(df.columns))


#: Columns of the finding table that identify a comparison, in display order (those present are used).
_FINDING_KEYS = ("question", "model", "reference", "centre", "other", "metric")
#: Columns of the finding table shown per structure, in display order; any other column follows.
_FINDING_ORDER = ("question", "model", "reference", "centre", "other", "structure", "metric", "median_model",
                  "median_reference", "difference", "estimate", "ci_low", "ci_high", "margin", "p_adjusted", "test",
                  "design", "verdict")


def _finding(ctx: ReportContext) -> dict[str, Any]:
    """The study's question (:func:`oarbench.finding.centre_shift_finding`): compact table, all rows, sentences."""
    out: dict[str, Any] = {"compact": None, "full": None, "lines": [], "why": ""}
    trained = ctx.options.trained_on
    if ctx.stats is None or not trained:
        out["why"] = ("No statistics table was given (stats.csv)." if ctx.stats is None else
                      "The models' training centres are not known (trained_on in the study TOML), so the "
                      "within/cross-centre finding is not drawn up.")
        return out
    from oarbench.finding import centre_shift_finding, finding_lines

    try:
        finding = centre_shift_finding(ctx.stats, {m: tuple(c) for m, c in trained.items()}, table=ctx.table)
        lines = finding_lines(finding)
    except KeyError as exc:
        out["why"] = f"The statistics table lacks the column {exc} that the finding needs (run oarbench stats)."
        return out
    except (ValueError, TypeError, AttributeError) as exc:
        out["why"] = f"The finding could not be drawn up from the statistics table: {exc}"
        return out
    if finding.empty or "verdict" not in finding.columns:
        out["why"] = "The statistics table has no cross-centre or paired comparisons of the trained models."
        return out
    keys = [k for k in _FINDING_KEYS if k in finding.columns]
    single = [k for k in keys if k == "metric" and finding[k].nunique() <= 1]  # one metric: said in the caption
    keys = [k for k in keys if k not in single]
    f = finding.copy()
    f["_r"] = f["model"].map(ctx.model_rank) if "model" in f else 0
    rows = []
    for key, g in f.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        v = g["verdict"].astype(str)
        untestable = v.str.startswith("not testable") | v.str.startswith("not tested")
        counts = v[~untestable].value_counts()
        rec = dict(zip(keys, key))
        rec["_r"] = int(g["_r"].iloc[0])
        rec["verdicts (structures)"] = (" · ".join(f"{k} {int(n)}" for k, n in counts.items())
                                        + f" of {int((~untestable).sum())} tested")
        if untestable.any():
            rec["verdicts (structures)"] += f"; {int(untestable.sum())} not testable"
        rows.append(rec)
    compact = pd.DataFrame(rows).sort_values(["_r"] + keys[:1], kind="mergesort").drop(columns="_r")
    cols = [c for c in _FINDING_ORDER if c in finding.columns] + [c for c in finding.columns if c not in _FINDING_ORDER]
    full = finding[cols]
    out.update(metric=str(finding["metric"].iloc[0]).upper() if single else "",
               compact=table_view(compact, text_cols=list(compact.columns)),
               full=table_view(full, csv="finding.csv"), lines=lines, n=len(finding))
    return out


def _key_findings(ctx: ReportContext) -> list[str]:
    items = []
    low = lowest_median_dsc(ctx.table, ctx.models)
    for model, worst in low.items():
        items.append(f"{model}: lowest median DSC " + ", ".join(f"{s} {fmt(v)} (n={n})" for s, v, n in worst) + ".")
    if ctx.stats is not None:
        counts = stats_counts(ctx.stats)
        if counts is not None:
            for r in counts.to_dict("records"):
                items.append(f"{r['analysis']} {r['comparison']}" + (f" ({r['where']})" if r["where"] else "")
                             + f": {r['significant']} of {r['tested']} tested (adjusted p < {SIGNIFICANCE})"
                             + (f"; {r['not testable']} not testable" if r["not testable"] else "") + ".")
    if ctx.absent is not None and {"model", "status", "pred_ml"}.issubset(ctx.absent.columns):
        fp = _fp_summary(ctx.absent, (0.0,))
        if len(fp):
            fp = fp.assign(_r=fp["model"].map(ctx.model_rank)).sort_values("_r", kind="mergesort")
            items.append("False-positive kidney after nephrectomy (any voxel): "
                         + ", ".join(f"{r.model} {r.n_fp}/{r.n_cases}" for r in fp.itertuples()) + ".")
    sel = ctx.failures()
    items.append(f"Failure cases: {len(sel)} rows" + (f" in {sel['structure'].nunique()} structures" if len(sel) else
                                                      " (no failures)") + " (rules in the failure-case section).")
    sus = ctx.suspicious()
    if len(sus):
        items.append(f"{len(sus)} values look like bugs but follow from the definitions "
                     f"({', '.join(f'{k}: {n}' for k, n in sus['kind'].value_counts().items())}; explained in the "
                     "accuracy section).")
    return items


def _figure_one(ctx: ReportContext) -> Any:
    structures = ctx.present_structures()
    drawn = F.figure_one(ctx.summaries(), structures, ctx.models, ctx.centres, ctx.settings())
    if drawn is None:
        return None
    h = ctx.headline()
    ns = sorted(set(int(n) for n in h["n_cases"])) if len(h) else []
    n_text = f"n = {ns[0]} cases per model and centre" if len(ns) == 1 else \
        "n = " + ", ".join(f"{r.model} @ {r.centre}: {r.n_cases}" for r in h.itertuples()) + " cases"
    caption = (f"Per structure, median (marker) and Q1–Q3 (line) of DSC (left) and HD95 (right) for each model "
               f"(colour) on each centre (shape), condition original; missed and hallucinated structures count as "
               f"DSC 0 and HD95 ∞. {n_text}.")
    if any(ctx.settings().values()):
        caption += " Open markers: cross-centre (the model was not trained on that centre)."
    return figure_view(drawn, 1, "Figure 1: per-structure DSC and HD95 per model and centre", caption, id="figure-1")


def section_headline(ctx: ReportContext) -> Section:
    headline, note = _headline_view(ctx)
    fig1 = _figure_one(ctx)
    if fig1 is not None:
        ctx.cached("_figures", lambda: 1)
    return Section("headline", "At a glance", "headline.html.j2", {
        "study_line": _study_line(ctx), "headline": headline, "headline_note": note, "figure": fig1,
        "finding": _finding(ctx), "key_findings": _key_findings(ctx), "within_cross": _within_cross(ctx),
        "notes": _notes(ctx, "headline"),
    })


# --------------------------------------------------------------------------- paper tables


def section_paper(ctx: ReportContext) -> Section:
    """The manuscript's tables and methods paragraph (generated by :mod:`oarbench.stats.paper`)."""
    from oarbench.stats.paper import METRIC_LABELS, methods_paragraph, paper_table, paper_table_latex, paper_table_wide

    metrics = [m for m in ("dsc", "hd95", "msd") if m in ctx.table.columns]
    # rows in the report's model order: the paper tables (and their letters) follow first appearance
    ranked = ctx.table.iloc[np.argsort(ctx.table["model"].map(ctx.model_rank).to_numpy(), kind="stable")]
    observers = [str(o) for o in (ctx.provenance or {}).get("observers") or [] if str(o) in set(ctx.table["model"])]
    paper = ctx.cached("paper", lambda: paper_table(ranked, ctx.stats, metrics=metrics,
                                                    trained_on=ctx.options.trained_on, observers=observers))
    data: dict[str, Any] = {"notes": _notes(ctx, "paper"), "family": None, "tables": [], "csv": None,
                            "letters": "", "latex": "", "empty": paper.empty, "observers": observers,
                            "resolution": list((ctx.provenance or {}).get("resolution_warnings") or [])}
    if ctx.stats is not None and not ctx.stats.empty and "family" in ctx.stats.columns:
        data["family"] = {
            "family": ", ".join(sorted(set(ctx.stats["family"].dropna().astype(str)))),
            "correction": ", ".join(sorted(set(ctx.stats["correction"].dropna().astype(str)))) if "correction" in ctx.stats else "",
            "unit": (", ".join(sorted(set(ctx.stats["unit"].dropna().astype(str)))) if "unit" in ctx.stats.columns else "")
            or "not stated",
        }
    if not paper.empty:
        data["csv"] = csv_link(paper, "paper_table.csv")
        models = list(dict.fromkeys(paper["model"]))
        data["letters"] = ", ".join(f"{'abcdefghijklmnopqrstuvwxyz'[i]}: {m}" for i, m in enumerate(models) if i < 26)
        for metric in metrics:
            wide = paper_table_wide(paper, metric)
            data["tables"].append((METRIC_LABELS.get(metric, metric), table_view(wide, text_cols=list(wide.columns))))
        data["latex"] = paper_table_latex(paper)
    data["methods"] = methods_paragraph(ctx.provenance, ctx.stats)
    return Section("paper", "Paper tables", "paper.html.j2", data)


# --------------------------------------------------------------------------- accuracy


def _structure_matrix(ctx: ReportContext, metric: str, digits: int) -> pd.DataFrame:
    orig = ctx.original
    settings = ctx.settings()
    groups = sorted({(m, c) for m, c in zip(orig["model"], orig["centre"])}, key=lambda mc: (mc[1], ctx.model_rank(mc[0])))
    rows = []
    summaries = ctx.summaries()
    for s in ctx.present_structures():
        tab = summaries.get(s, pd.DataFrame())
        rec: dict[str, Any] = {"structure": s}
        by = {(r["model"], r["centre"]): r for _, r in tab.iterrows()}
        for m, c in groups:
            r = by.get((m, c))
            rec[_group_label(m, c, settings.get((m, c), ""))] = (
                fmt(r[f"{metric}_median"], digits) if r is not None and f"{metric}_median" in r else "–")
        rows.append(rec)
    return pd.DataFrame(rows)


def _per_structure(ctx: ReportContext, sus: pd.DataFrame) -> list[dict[str, Any]]:
    settings = ctx.settings()
    out = []
    summaries = ctx.summaries()
    for structure in ctx.present_structures():
        s = summaries.get(structure, pd.DataFrame())
        if s.empty:
            continue
        show = pd.DataFrame({"model @ centre": [_group_label(m, c, settings.get((m, c), ""))
                                                for m, c in zip(s["model"], s["centre"])]})
        show["n ok"] = s["n_ok"]
        show["missed / halluc."] = [f"{a} / {b}" for a, b in zip(s["n_missed"], s["n_hallucinated"])]
        show["absent / missing"] = [f"{a} / {b}" for a, b in zip(s["n_absent"], s["n_missing"])]
        for col, label, digits in _METRICS:
            if f"{col}_median" in s:
                show[label] = [_iqr(m, a, b, digits) for m, a, b in zip(s[f"{col}_median"], s[f"{col}_q1"], s[f"{col}_q3"])]
        ssus = sus[sus["structure"] == structure] if len(sus) else sus
        flags = []
        for m, c in zip(s["model"], s["centre"]):
            g = ssus[(ssus["model"] == m) & (ssus["centre"] == c) & (ssus["condition"] == _ORIGINAL)] if len(ssus) else ssus
            flags.append("; ".join(f"{_KIND_SHORT[k]}: {n}" for k, n in g["kind"].value_counts().items()) if len(g) else "")
        if any(flags):
            show["values explained below"] = flags
        explain = [(_KIND_SHORT[k], int((ssus["kind"] == k).sum()), EXPLANATIONS[k])
                   for k in (sorted(set(ssus["kind"])) if len(ssus) else [])]
        fig = None
        why_no_plot = ""
        if ctx.options.box_plots:
            drawn = F.structure_box_figure(ctx.original, structure, ctx.models, ctx.centres)
            if drawn is None:
                why_no_plot = (f"No box plots: fewer than {F.MIN_BOX_N} ok rows in every model/centre group; the "
                               "table says it all.")
            else:
                fig = {"uri": drawn.uri, "width_in": round(drawn.width_in, 2), "alt": f"box plots of {structure}"}
        med = pd.to_numeric(s["dsc_median"], errors="coerce") if "dsc_median" in s else pd.Series([], dtype=float)
        rng = f"median DSC {fmt(med.min())}–{fmt(med.max())}" if len(med) and med.notna().any() else "no DSC"
        fails = int(s["n_missed"].sum() + s["n_hallucinated"].sum())
        summary = (f"{rng} over {len(s)} model/centre groups" + (f"; {fails} missed/hallucinated" if fails else "")
                   + (f"; {len(ssus)} values explained" if len(ssus) else ""))
        out.append({"structure": structure, "id": f"s-{_slug(structure)}", "summary": summary,
                    "table": table_view(show, text_cols=[c for c in show.columns if c != "n ok"]),
                    "explain": explain, "figure": fig, "why_no_plot": why_no_plot})
    return out


def _explanations(sus: pd.DataFrame, islands: pd.DataFrame) -> dict[str, Any]:
    items = []
    if islands is not None and len(islands):
        where = ", ".join(f"{s} ({n})" for s, n in islands.groupby("structure").size().items())
        items.append((_KIND_SHORT["small_island"], f"{len(islands)} drawn failure cases in {where}.",
                      EXPLANATIONS["small_island"]))
    if len(sus):
        counts = sus.groupby(["kind", "structure"]).size().rename("rows").reset_index()
        for kind, g in counts.groupby("kind", sort=False):
            where = ", ".join(f"{s} ({n})" for s, n in zip(g["structure"], g["rows"]))
            items.append((_KIND_SHORT[kind], f"{int(g['rows'].sum())} rows in {where}.", EXPLANATIONS[kind]))
    view = table_view(sus.assign(kind=sus["kind"].map(_KIND_SHORT)), csv="explained_values.csv") if len(sus) else None
    return {"items": items, "table": view, "none": sus.empty}


#: Columns of stats.csv shown in the detail table, renamed, when the file has the documented columns.
_STATS_VIEW: tuple[tuple[str, str], ...] = (
    ("structure", "structure"), ("metric", "metric"), ("comparison", "comparison"), ("where", "where"), ("n", "n"),
    ("n_patients", "patients"), ("n_scans", "scans"),
    ("median_a", "median A"), ("median_b", "median B"), ("shift", "shift [CI]"),
    ("diff", "median difference [bootstrap CI]"), ("p_adjusted", "p_adjusted"),
    ("verdict", "verdict"), ("p_noninferiority_adjusted", "p_noninferiority_adjusted"),
    ("noninferiority_verdict", "non-inferiority"), ("ni_ci", "non-inferiority interval"),
)
#: Columns whose values below :data:`SIGNIFICANCE` are marked.
_MARKED: tuple[str, ...] = ("p_adjusted", "p_noninferiority_adjusted")


def _stats_view(stats: pd.DataFrame) -> pd.DataFrame:
    from oarbench.report.data import _fmt_cell

    if not {"structure", "metric", "comparison"}.issubset(stats.columns):
        return stats.reset_index(drop=True)
    s = stats.reset_index(drop=True)
    view = pd.DataFrame(index=s.index)

    def col(name: str) -> pd.Series:
        return s[name].astype(object).where(s[name].notna(), "").astype(str) if name in s else pd.Series("", index=s.index)

    centre, model = col("centre"), col("model")
    for key, label in _STATS_VIEW:
        if key == "where":
            view[label] = np.where(centre != "", "centre " + centre, np.where(model != "", "model " + model, ""))
        elif key == "shift":
            if {"hl_shift", "ci_low", "ci_high"}.issubset(s.columns):
                view[label] = [f"{_fmt_cell(h)} [{_fmt_cell(a)}, {_fmt_cell(b)}]" for h, a, b in zip(s["hl_shift"], s["ci_low"], s["ci_high"])]
        elif key == "diff":
            if {"diff_median", "diff_median_ci_low", "diff_median_ci_high"}.issubset(s.columns):
                view[label] = [f"{_fmt_cell(h)} [{_fmt_cell(a)}, {_fmt_cell(b)}]" for h, a, b in
                               zip(s["diff_median"], s["diff_median_ci_low"], s["diff_median_ci_high"])]
        elif key == "ni_ci":
            if {"ni_ci_low", "ni_ci_high", "ni_ci_level"}.issubset(s.columns) and s["ni_ci_level"].notna().any():
                view[label] = ["" if pd.isna(lv) else f"[{_fmt_cell(a)}, {_fmt_cell(b)}] ({100 * float(lv):.1f}%)"
                               for a, b, lv in zip(s["ni_ci_low"], s["ni_ci_high"], s["ni_ci_level"])]
        elif key in ("median_a", "median_b"):
            if key in s:
                arm = col("arm_a" if key == "median_a" else "arm_b")
                view[label] = [f"{_fmt_cell(v)} ({a})" if a else _fmt_cell(v) for v, a in zip(s[key], arm)]
        elif key in s:
            view[label] = s[key]
    return view


def _stats(ctx: ReportContext) -> dict[str, Any] | None:
    stats = ctx.stats
    if stats is None:
        return None
    counts = stats_counts(stats)
    view = _stats_view(stats)
    marks: dict[tuple[int, str], bool] = {}
    for c in _MARKED:
        if c in view.columns:
            for i, p in enumerate(pd.to_numeric(view[c], errors="coerce").to_numpy(float)):
                if p < SIGNIFICANCE:
                    marks[(i, c)] = True
    n_sig = sum(1 for (_, c) in marks if c == "p_adjusted")
    n_ni = sum(1 for (_, c) in marks if c == "p_noninferiority_adjusted")
    return {
        "counts": table_view(counts, text_cols=["analysis", "comparison", "where", "significant"])
        if counts is not None and len(counts) else None,
        "has_p": "p_adjusted" in view.columns, "n_sig": n_sig, "n_rows": len(view),
        "n_ni": n_ni if "p_noninferiority_adjusted" in view.columns else None, "alpha": SIGNIFICANCE,
        "table": table_view(view, csv="stats.csv", full=stats, marks=marks, text_cols=text_columns(view)),
    }


def section_accuracy(ctx: ReportContext) -> Section:
    sus = ctx.suspicious()
    dsc = _structure_matrix(ctx, "dsc", 3)
    hd = _structure_matrix(ctx, "hd95", 1) if "hd95" in ctx.table.columns else None
    summaries = ctx.summaries()
    full = pd.concat([summaries[s].assign(structure=s) for s in ctx.present_structures() if s in summaries]
                     or [pd.DataFrame()], ignore_index=True)
    gone = [s for s in _structure_order(ctx.original) if s not in set(ctx.present_structures())]
    drawn = F.casewise_figure(ctx.original, ctx.models, ctx.centres)
    fig = None
    if drawn is not None:
        h = ctx.headline()
        fig = figure_view(drawn, ctx.next_figure(), "per-case mean DSC per model and centre",
                          "Per case, the mean DSC over its structures (condition original; missed and hallucinated "
                          f"structures count as 0), one point per case; a box (median, quartiles, whiskers to 1.5 IQR) "
                          f"where a model/centre group has at least {F.MIN_BOX_N} cases. n per group under each column "
                          f"({int(h['n_cases'].sum()) if len(h) else 0} case results in all).", id="figure-casewise")
    return Section("accuracy", "Accuracy: how close are the contours?", "accuracy.html.j2", {
        "notes": _notes(ctx, "accuracy"), "figure": fig, "gone": gone,
        "dsc": table_view(dsc, text_cols=["structure"], csv="median_dsc.csv"), "dsc_open": len(dsc) <= 30,
        "hd": table_view(hd, text_cols=["structure"], csv="median_hd95.csv") if hd is not None else None,
        "summary_csv": csv_link(full, "per_structure_summary.csv"), "structures": _per_structure(ctx, sus),
        "box_plots": ctx.options.box_plots, "min_box_n": F.MIN_BOX_N,
        "explanations": _explanations(sus, ctx.gallery_islands()), "stats": _stats(ctx),
    })


# --------------------------------------------------------------------------- robustness


def _model_effect_view(ctx: ReportContext, rank: Mapping[str, int]) -> Any:
    """The small rotations' model effect (rotation minus its control, robustness_summary.csv), or None."""
    s = ctx.robustness_summary
    need = {"model", "centre", "structure", "condition", "control_condition", "model_effect_dsc",
            "model_effect_dsc_ci_low", "model_effect_dsc_ci_high", "n_pairs_effect_dsc"}
    if s is None or not need.issubset(s.columns):
        return None
    s = s[s["control_condition"].notna() & (s["control_condition"].astype(str) != "")]
    if s.empty:
        return None
    s = s.assign(_r=s["model"].map(lambda m: rank.get(m, len(rank)))).sort_values(
        ["_r", "condition", "structure", "centre"], kind="mergesort")

    def effect(metric: str, digits: int) -> list[str]:
        cols = [f"model_effect_{metric}", f"model_effect_{metric}_ci_low", f"model_effect_{metric}_ci_high"]
        if not set(cols).issubset(s.columns):
            return ["–"] * len(s)
        return [f"{fmt(e, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]" for e, lo, hi in s[cols].itertuples(index=False)]

    show = pd.DataFrame({
        "model": s["model"], "centre": s["centre"], "structure": s["structure"], "condition": s["condition"],
        "control": s["control_condition"], "n pairs": s["n_pairs_effect_dsc"],
        "model effect ΔDSC [95 % CI]": effect("dsc", 3), "model effect ΔHD95 mm [95 % CI]": effect("hd95", 2),
    })
    return table_view(show, csv="robustness_model_effect.csv", full=s.drop(columns="_r"),
                      text_cols=["model", "centre", "structure", "condition", "control",
                                 "model effect ΔDSC [95 % CI]", "model effect ΔHD95 mm [95 % CI]"])


def section_robustness(ctx: ReportContext) -> Section:
    title = "Robustness: does the result survive flips and rotations?"
    data: dict[str, Any] = {"notes": _notes(ctx, "robustness"), "raw": None, "empty": False}
    source = ctx.robustness if ctx.robustness is not None else ctx.table
    needed = {"centre", "model", "case", "structure", "status", "dsc"}
    if not needed.issubset(source.columns):
        data["raw"] = table_view(source, csv="robustness.csv")
        return Section("robustness", title, "robustness.html.j2", data)
    deltas = robustness_deltas(ctx.table, ctx.robustness)
    if deltas.empty:
        data["empty"] = True
        return Section("robustness", title, "robustness.html.j2", data)
    floor = noise_floor_table(ctx.noise_floor, deltas["condition"])
    fshow = pd.DataFrame({
        "condition": floor["condition"], "kind": floor["kind"], "n": floor["n"],
        "floor ΔDSC median": [fmt(v) for v in floor["floor_delta_dsc_median"]],
        "floor ΔDSC min": [fmt(v) for v in floor["floor_delta_dsc_min"]],
        "floor HD95 median (mm)": [fmt(v, 2) for v in floor["floor_hd95_median"]],
    })
    both = ctx.all_conditions()
    key = ["centre", "model", "case", "structure"]
    orig = both[both["condition"] == _ORIGINAL].set_index(key)
    pert = both[both["condition"] != _ORIGINAL]
    o = orig.reindex(pd.MultiIndex.from_frame(pert[key]))
    pert = pert.assign(_d=pd.to_numeric(pert["dsc"], errors="coerce").to_numpy(float) - pd.to_numeric(o["dsc"], errors="coerce").to_numpy(float),
                       _st0=o["status"].to_numpy(object))
    pert = pert[pert["_st0"].notna()]
    fl = floor.set_index("condition")
    rows = []
    order = list(dict.fromkeys(ctx.models + sorted(set(pert["model"]) - set(ctx.models))))
    rank = {m: i for i, m in enumerate(order)}
    for (cond, model), g in sorted(pert.groupby(["condition", "model"], sort=True), key=lambda kv: (rank[kv[0][1]], kv[0][0])):
        d = g["_d"].to_numpy(float)
        d = d[~np.isnan(d)]
        fmin = fl.at[cond, "floor_delta_dsc_min"] if cond in fl.index else math.nan
        swaps = int(g["laterality_swap"].map(lambda v: str(v).strip().lower() in {"1", "true", "yes"}).sum()) if "laterality_swap" in g else 0
        rows.append({
            "model": model, "condition": cond, "n pairs": int(d.size),
            "ΔDSC median [Q1–Q3]": _iqr(quantile_inf(d, 0.5), quantile_inf(d, 0.25), quantile_inf(d, 0.75)),
            "worst ΔDSC": fmt(d.min() if d.size else math.nan),
            "floor ΔDSC median": fmt(fl.at[cond, "floor_delta_dsc_median"] if cond in fl.index else math.nan),
            "pairs below floor": (int((d < fmin).sum()) if not math.isnan(fmin) else "–"),
            "status changed": int((g["status"].astype(str).to_numpy() != g["_st0"].astype(str).to_numpy()).sum()),
            "laterality swaps": swaps,
        })
    rv = pd.DataFrame(rows)
    pairs = pd.DataFrame({"model": pert["model"].astype(str), "condition": pert["condition"].astype(str),
                          "delta": pert["_d"].to_numpy(float)})
    drawn = F.robustness_figure(pairs, floor, order)
    fig = figure_view(drawn, ctx.next_figure(), "ΔDSC per model and condition against the noise floor",
                      "ΔDSC = DSC under the condition − DSC of the original scan, per case and structure (all centres), "
                      f"for each model (colour) and condition; a box where a group has at least {F.MIN_BOX_N} pairs, "
                      "every pair as a point; n pairs per row. Control: the grey band spans the noise floor (what "
                      "resampling alone costs a perfect model, from its lowest ΔDSC to 0; dotted: its median); "
                      "lossless conditions (flips, 90-degree steps) have no band: any loss is the model's.",
                      id="figure-robustness") if drawn is not None else None
    deltas_show = deltas.assign(_r=deltas["model"].map(lambda m: rank.get(m, len(rank)))).sort_values(
        ["structure", "_r", "centre", "condition"], kind="mergesort").drop(columns="_r")
    show = pd.DataFrame({
        "structure": deltas_show["structure"], "model": deltas_show["model"], "centre": deltas_show["centre"],
        "condition": deltas_show["condition"], "n pairs": deltas_show["n_pairs"],
        "ΔDSC": [_iqr(m, a, b) for m, a, b in zip(deltas_show["delta_dsc_median"], deltas_show["delta_dsc_q1"],
                                                  deltas_show["delta_dsc_q3"])],
        "n HD95 pairs": deltas_show["n_hd95_pairs"],
        "ΔHD95 (mm)": [fmt(v, 2) for v in deltas_show["delta_hd95_median"]],
        "status changed": deltas_show["n_status_changed"],
    })
    data.update(
        figure=fig,
        effect=_model_effect_view(ctx, rank),
        floor=table_view(fshow, text_cols=list(fshow.columns[:2]) + list(fshow.columns[3:])),
        floor_missing=bool((floor["kind"] == "not given").any()),
        per_model=table_view(rv, text_cols=["model", "condition", "ΔDSC median [Q1–Q3]", "worst ΔDSC", "floor ΔDSC median"]),
        detail=table_view(show, csv="robustness_deltas.csv", full=deltas,
                          text_cols=["structure", "model", "centre", "condition", "ΔDSC", "ΔHD95 (mm)"]),
    )
    return Section("robustness", title, "robustness.html.j2", data)


# --------------------------------------------------------------------------- false-positive kidneys


def section_absent(ctx: ReportContext) -> Section:
    title = "False-positive kidneys: what do models draw where no kidney is?"
    absent = ctx.absent
    data: dict[str, Any] = {"notes": _notes(ctx, "absent"), "missing": absent is None, "raw": None}
    if absent is None:
        return Section("absent", title, "absent.html.j2", data)
    if not {"model", "status", "pred_ml"}.issubset(absent.columns):
        data["raw"] = table_view(absent)
        return Section("absent", title, "absent.html.j2", data)
    from oarbench.absent import DEFAULT_THRESHOLDS_ML, compare_models

    thresholds = tuple(ctx.options.fp_thresholds_ml or DEFAULT_THRESHOLDS_ML)
    summ = _fp_summary(absent, thresholds)
    order = list(dict.fromkeys(ctx.models + sorted(set(map(str, summ["model"])) - set(ctx.models))))
    rows = []
    for model in order:
        g = summ[summ["model"] == model]
        if g.empty:
            continue
        first = g.iloc[0]
        rec: dict[str, Any] = {"model": model, "cases": int(first["n_cases"]), "missing": int(first["n_missing"])}
        for r in g.itertuples():
            rate = f"{r.fp_rate * 100:.0f} %" if not math.isnan(r.fp_rate) else "–"
            rec[f"FP > {r.threshold_ml:g} mL"] = f"{r.n_fp}/{r.n_cases} ({rate})"
        rec["volume median [Q1–Q3] (mL)"] = _iqr(first["median_ml"], first["q1_ml"], first["q3_ml"], 2)
        rec["max (mL)"] = fmt(first["max_ml"], 2)
        rows.append(rec)
    view = pd.DataFrame(rows)
    pairs = ctx.absent_pairs
    if pairs is None and {"case", "centre"}.issubset(absent.columns):
        try:
            pairs = compare_models(absent, thresholds)
        except (KeyError, ValueError):
            pairs = None
    n_cases = sorted(set(int(n) for n in summ["n_cases"])) if len(summ) else []
    drawn = F.fp_figure(summ, order)
    fig = figure_view(drawn, ctx.next_figure(), "false-positive kidney rate per model and threshold",
                      "Share of nephrectomy cases in which the model draws more than t mL of kidney on the side where "
                      "none is, per volume threshold t (x) and model (colour); n = "
                      + (f"{n_cases[0]} cases per model" if len(n_cases) == 1 else
                         ", ".join(f"{r['model']}: {r['cases']}" for r in rows) + " cases")
                      + " with a prediction.", id="figure-absent") if drawn is not None else None
    data.update(figure=fig, rates=table_view(view, text_cols=[c for c in view.columns if c not in ("cases", "missing")]),
                summary_csv=csv_link(summ, "absent_summary.csv"),
                pairs=table_view(pairs, csv="absent_pairs.csv") if pairs is not None and len(pairs) else None,
                cases=table_view(absent, csv="absent.csv"))
    return Section("absent", title, "absent.html.j2", data)


# --------------------------------------------------------------------------- failure cases

_FAILURE_COLUMNS = ("structure", "model", "centre", "condition", "case", "status", "dsc", "hd95", "dsc_drop", "reason")


def _montages(ctx: ReportContext) -> dict[str, Any]:
    out: dict[str, Any] = {"given": ctx.gallery_dir is not None, "blocks": [], "index": None, "figure": None,
                           "empty": ""}
    gallery_dir = ctx.gallery_dir
    if gallery_dir is None:
        return out
    if not gallery_dir.is_dir():
        raise ValueError(f"{gallery_dir}: gallery folder not found")
    index = ctx.gallery_index()
    index_path = gallery_dir / "index.csv"
    if index is not None and "montage" in index.columns:
        names = [str(m) for m in index["montage"].dropna().unique() if str(m)]
    else:
        names = sorted(p.name for p in gallery_dir.glob("*.png"))
    blocks = []
    for name in names:
        path = inside(gallery_dir, name, f"montage named in {index_path.name}" if index is not None else "montage")
        if not path.is_file():
            blocks.append({"missing": name})
            continue
        png = path.read_bytes()
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError(f"{path}: not a PNG file")
        structure = path.stem
        sub = index[index["montage"].astype(str) == name] if index is not None and "montage" in index.columns else None
        tiles = int(sub["drawn"].astype(bool).sum()) if sub is not None and "drawn" in sub.columns else (
            len(sub) if sub is not None else None)
        worst = float(pd.to_numeric(sub["dsc"], errors="coerce").min()) if sub is not None and "dsc" in sub.columns else math.nan
        models = [m for m in ctx.models if sub is not None and "model" in sub.columns and m in set(sub["model"].astype(str))]
        blocks.append({"structure": structure, "id": f"g-{_slug(structure)}", "uri": F.png_data_uri(png), "png": png,
                       "tiles": tiles, "rows": len(sub) if sub is not None else None, "worst": worst,
                       "models": models})
    drawn = [b for b in blocks if "uri" in b]
    if drawn:
        # the montage shown open: the structure with the most drawn failures, then the lowest DSC
        top = sorted(drawn, key=lambda b: (-(b["tiles"] or 0), b["worst"] if not math.isnan(b["worst"]) else 2.0))[0]
        n_tiles = f"{top['tiles']} tiles" if top["tiles"] is not None else "tiles"
        head, cut = F.montage_head(top["png"], rows=2)
        out["figure"] = {"number": ctx.next_figure(), "uri": F.png_data_uri(head), "structure": top["structure"],
                         "caption": f"Failure cases of {top['structure']}, the structure with the most drawn failures "
                         f"({n_tiles}" + (f" of {top['rows']} selected rows" if top["rows"] is not None else "") + "; "
                         + (f"models {', '.join(top['models'])}; " if top["models"] else "")
                         + "worst DSC " + fmt(top["worst"]) + ")"
                         + ("; the first two rows of its montage, in the gallery's order (worst first per rule), the "
                            "whole montage is in the gallery below" if cut else "")
                         + ". Each tile: the slice with the most disagreement, reference solid blue, prediction dashed "
                         "orange; title: case, model @ centre, DSC, HD95, reasons.", "id": "figure-failures"}
        if not cut:
            blocks = [b for b in blocks if b is not top]
    out["blocks"] = blocks
    if not names:
        out["empty"] = ("The gallery folder holds no montages." if index is None or len(index) else
                        "No failures to draw.")
    if index is not None:
        keep = [c for c in ("structure", "centre", "model", "condition", "case", "status", "dsc", "hd95", "dsc_drop",
                            "reason", "drawn", "note", "montage", "panel", "plane", "slice_index", "ref_islands",
                            "ref_small_islands", "ref_smallest_island_voxels") if c in index.columns]
        out["index"] = table_view(index[keep] if keep else index, csv="gallery_index.csv", full=index)
    return out


def section_failures(ctx: ReportContext) -> Section:
    title = "Failure cases: where did it go wrong?"
    crit = ctx.criteria
    allrows = ctx.all_conditions()
    selected = ctx.failures()
    data: dict[str, Any] = {"notes": _notes(ctx, "failures"), "rules": crit.describe(), "rules_note": "",
                            "k_note": "The limit of rows per rule applies to the gallery's montages; the counts and the "
                                      "table below have every failing row." if crit.k is not None else "",
                            "n_failing": len(selected), "counts": None, "rows": None}
    if ctx.options.criteria is None and ctx.gallery_dir is not None and gallery_criteria(ctx.gallery_dir) is not None:
        data["rules_note"] = "These are the rules the gallery was drawn with (gallery/selection.json)."
    elif ctx.options.criteria is not None and ctx.gallery_dir is not None:
        drawn_with = gallery_criteria(ctx.gallery_dir)
        if drawn_with is not None and drawn_with != ctx.options.criteria:
            data["rules_note"] = f"The gallery's montages were drawn with other rules: {drawn_with.describe()}"
    if not selected.empty:
        counts = selected.assign(reason=selected["reason"].str.split(";")).explode("reason")
        pivot = counts.groupby(["structure", "reason"]).size().unstack(fill_value=0)
        from oarbench.gallery.selection import REASONS

        pivot = pivot[[r for r in REASONS if r in pivot.columns]]
        pivot.insert(0, "rows", selected.groupby("structure").size())
        order = [s for s in _structure_order(allrows) if s in pivot.index]
        pivot = pivot.loc[order].reset_index()
        data["n_structures"] = len(pivot)
        data["counts"] = table_view(pivot, text_cols=["structure"])
        sus = ctx.suspicious()
        shown = selected[[c for c in _FAILURE_COLUMNS if c in selected.columns]].copy()
        if len(sus):
            kinds = sus.groupby([c for c in ("centre", "model", "condition", "case", "structure")])["kind"].agg(
                lambda k: "; ".join(_KIND_SHORT[x] for x in k))
            idx = pd.MultiIndex.from_frame(shown[["centre", "model", "condition", "case", "structure"]])
            shown["explained"] = kinds.reindex(idx).fillna("").to_numpy()
        isl = ctx.gallery_islands()
        if len(isl):
            keys = set(zip(isl["centre"], isl["model"], isl["condition"], isl["case"], isl["structure"]))
            mark = [_KIND_SHORT["small_island"] if k in keys else "" for k in
                    zip(shown["centre"], shown["model"], shown["condition"], shown["case"], shown["structure"])]
            prev = shown["explained"] if "explained" in shown else pd.Series("", index=shown.index)
            shown["explained"] = ["; ".join(x for x in (a, b) if x) for a, b in zip(prev, mark)]
        data["rows"] = table_view(shown, csv="failures.csv")
    data["gallery"] = _montages(ctx)
    return Section("failures", title, "failures.html.j2", data)


# --------------------------------------------------------------------------- provenance


def section_provenance(ctx: ReportContext) -> Section:
    import jinja2
    import matplotlib
    import scipy

    from oarbench import __version__

    env = {
        "oarbench": __version__, "python": platform.python_version(), "numpy": np.__version__,
        "pandas": pd.__version__, "scipy": scipy.__version__, "matplotlib": matplotlib.__version__,
        "jinja2": jinja2.__version__,
    }
    flat = list(_flatten(ctx.provenance)) if ctx.provenance is not None else []
    return Section("provenance", "Provenance", "provenance.html.j2", {
        "notes": _notes(ctx, "provenance"), "versions": ", ".join(f"{k} {v}" for k, v in env.items()),
        "given": ctx.provenance is not None,
        "record": table_view(pd.DataFrame(flat, columns=["key", "value"]), text_cols=["key", "value"], csv="run_record.csv")
        if flat else None,
    })


#: The report's sections in page order; each takes the :class:`ReportContext` and returns a :class:`Section`.
SECTIONS: list[Callable[[ReportContext], Section]] = [
    section_headline,
    section_paper,
    section_accuracy,
    section_robustness,
    section_absent,
    section_failures,
    section_provenance,
]
