"""The tables and the methods paragraph a manuscript of the study needs, generated.

* :func:`paper_table`: per structure and metric, for each model on each centre, the median
  (IQR) and a bootstrap 95 % interval of the median (resampling patients), the numbers of
  patients and scans, the within-centre / cross-centre block (the model trained on that centre
  or not), and significance marks from the corrected paired tests of ``stats.csv``.
* :func:`paper_table_latex`: the same as a LaTeX ``booktabs`` table per metric.
* :func:`methods_paragraph`: definitions, tolerance, tests, unit of analysis, correction family,
  bootstrap and software versions, from ``run.json`` and ``stats.csv``, ready to paste and cite.

Marks: on each centre, structure and metric, a model's cell carries the letters of the models it
is significantly better than (adjusted p < alpha, paired signed-rank test); the letters are
listed under the table (``a`` = first model, ...).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from oarbench.stats.bootstrap import BootstrapOptions, cluster_bootstrap_ci
from oarbench.stats.comparisons import METRIC_DIRECTIONS
from oarbench.stats.ranktests import quantile_inf

__all__ = [
    "PAPER_COLUMNS",
    "METRIC_LABELS",
    "paper_table",
    "paper_table_latex",
    "paper_table_wide",
    "methods_paragraph",
    "trained_on_from_run",
    "write_paper_outputs",
]

#: Columns of :func:`paper_table` (one row per structure x metric x centre x model).
PAPER_COLUMNS: tuple[str, ...] = (
    "structure", "metric", "block", "centre", "model", "n_patients", "n_scans", "median", "q1", "q3",
    "ci_low", "ci_high", "better_than", "marks", "cell", "vs_observer",
)
#: How metrics are named in the tables.
METRIC_LABELS: dict[str, str] = {
    "dsc": "DSC", "sdsc": "surface DSC", "hd95": "HD95 (mm)", "hd": "HD (mm)", "msd": "MSD (mm)",
    "assd": "ASSD (mm)", "vs": "volumetric similarity", "centroid_mm": "centroid distance (mm)",
    "apl_mm": "APL (mm)", "apl_mm_per_slice": "APL per slice (mm)",
}
_SCORED = ("ok", "missed", "hallucinated")


def _digits(metric: str) -> int:
    return 3 if METRIC_DIRECTIONS.get(metric, True) else 2


def _num(x: float, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def _letters(models: Sequence[str]) -> dict[str, str]:
    return {m: "abcdefghijklmnopqrstuvwxyz"[i] if i < 26 else f"m{i}" for i, m in enumerate(models)}


def trained_on_from_run(run: Mapping[str, Any] | None) -> dict[str, tuple[str, ...]] | None:
    """Model -> training centres from the study TOML named in a run record, when readable."""
    from oarbench.study import load_study

    study = (run or {}).get("study") if isinstance(run, Mapping) else None
    if not isinstance(study, str) or not study.endswith(".toml") or not Path(study).is_file():
        return None
    try:
        s = load_study(study)
    except (ValueError, OSError):
        return None
    return {m.name: tuple(m.trained_on) for m in s.models if m.trained_on} or None


def paper_table(
    table: pd.DataFrame,
    stats: pd.DataFrame | None = None,
    *,
    metrics: Sequence[str] = ("dsc", "hd95", "msd"),
    condition: str = "original",
    trained_on: Mapping[str, Sequence[str]] | None = None,
    bootstrap: BootstrapOptions | None = BootstrapOptions(),
    alpha: float = 0.05,
    observers: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per structure x metric x centre x model (columns :data:`PAPER_COLUMNS`).

    ``observers``: models that are a second observer's contours: their rows get the block
    ``observer``; every other model's ``vs_observer`` says, per observer, whether the model was
    shown non-inferior to it (``analysis = "observer"`` rows of ``stats``: ``non-inferior``,
    ``not shown``, or the test's reason), and its ``cell`` ends with ``=`` when it was
    non-inferior to every observer.

    Values are those of ``summary.csv``: rows with status ``ok``, ``missed`` and
    ``hallucinated`` (a miss is DSC 0 / distance inf), per scan; the interval is the percentile
    bootstrap of the median resampling patients (column ``patient`` of the table, else the case).
    ``block`` is ``within-centre`` when the model was trained on that centre, ``cross-centre``
    when trained elsewhere only, ``""`` when ``trained_on`` does not say. ``better_than`` lists
    the models this one beats significantly in ``stats`` (paired rows of that centre, structure and
    metric with adjusted p < ``alpha``), ``marks`` their letters.
    """
    t = table.copy()
    for col in ("study", "centre", "condition", "model", "case", "structure", "status"):
        if col not in t.columns:
            t[col] = "original" if col == "condition" else ""
        t[col] = t[col].fillna("").astype(str)
    if "patient" not in t.columns:
        t["patient"] = t["case"]
    t["patient"] = t["patient"].astype("string").fillna("").astype(str)
    t.loc[t["patient"] == "", "patient"] = t.loc[t["patient"] == "", "case"]
    t = t[(t["condition"] == condition) & t["status"].isin(_SCORED)]
    missing = [m for m in metrics if m not in t.columns]
    if missing:
        raise ValueError(f"results table: no column(s) {', '.join(missing)} for the paper table")
    models = list(dict.fromkeys(t["model"]))
    letters = _letters(models)
    wins = _wins(stats, alpha)
    human = _versus_observer(stats, list(observers))
    rows = []
    structures = list(dict.fromkeys(t["structure"]))
    centres = list(dict.fromkeys(t["centre"]))
    for structure in structures:
        ts = t[t["structure"] == structure]
        for metric in metrics:
            digits = _digits(metric)
            for centre in centres:
                for model in models:
                    g = ts[(ts["centre"] == centre) & (ts["model"] == model)]
                    if g.empty:
                        continue
                    v = pd.to_numeric(g[metric], errors="coerce").to_numpy(dtype=float)
                    keep = ~np.isnan(v)
                    v, pts = v[keep], g["patient"].to_numpy(dtype=object)[keep]
                    lo = hi = math.nan
                    if bootstrap is not None and v.size:
                        lo, hi = cluster_bootstrap_ci(v, pts, "median", bootstrap)
                    med, q1, q3 = quantile_inf(v, 0.5), quantile_inf(v, 0.25), quantile_inf(v, 0.75)
                    beaten = sorted(wins.get((centre, structure, metric, model), set()), key=models.index)
                    marks = "".join(letters[m] for m in beaten if m in letters)
                    trained = None if trained_on is None else trained_on.get(model)
                    block = "" if not trained else ("within-centre" if centre in set(map(str, trained))
                                                    else "cross-centre")
                    if model in observers:
                        block = "observer"
                    cell = f"{_num(med, digits)} ({_num(q1, digits)}-{_num(q3, digits)}) [{_num(lo, digits)}, {_num(hi, digits)}]"
                    vs = human.get((centre, structure, metric, model), {})
                    if observers and model not in observers and vs and all(x == "non-inferior" for x in vs.values()) \
                            and len(vs) == len(observers):
                        marks += "="
                    rows.append(dict(
                        structure=structure, metric=metric, block=block, centre=centre, model=model,
                        n_patients=int(len(set(pts.tolist()))), n_scans=int(v.size), median=med, q1=q1, q3=q3,
                        ci_low=lo, ci_high=hi, better_than=";".join(beaten), marks=marks,
                        cell=cell + (f" {marks}" if marks else ""),
                        vs_observer="; ".join(f"{o}: {x}" for o, x in vs.items()),
                    ))
    return pd.DataFrame(rows, columns=list(PAPER_COLUMNS))


def _versus_observer(stats: pd.DataFrame | None, observers: list[str]) -> dict[tuple[str, str, str, str], dict]:
    """(centre, structure, metric, model) -> {observer: non-inferiority outcome} from ``observer`` rows."""
    out: dict[tuple[str, str, str, str], dict] = {}
    if stats is None or stats.empty or "analysis" not in stats.columns or not observers:
        return out
    rows = stats[(stats["analysis"].astype(str) == "observer") & stats["arm_b"].astype(str).isin(observers)]
    for r in rows.itertuples(index=False):
        flag = r.noninferior
        verdict = str(r.noninferiority_verdict) if isinstance(r.noninferiority_verdict, str) else ""
        if verdict.startswith("not testable"):
            text = verdict
        elif flag is True or str(flag) == "True":
            text = "non-inferior"
        elif verdict:
            text = "not shown"
        else:
            text = "no margin"
        out.setdefault((str(r.centre), str(r.structure), str(r.metric), str(r.arm_a)), {})[str(r.arm_b)] = text
    return out


def _wins(stats: pd.DataFrame | None, alpha: float) -> dict[tuple[str, str, str, str], set[str]]:
    """(centre, structure, metric, winner) -> models it beats significantly (paired rows)."""
    out: dict[tuple[str, str, str, str], set[str]] = {}
    if stats is None or stats.empty or "analysis" not in stats.columns:
        return out
    paired = stats[stats["analysis"].astype(str) == "paired"]
    for r in paired.itertuples(index=False):
        p = pd.to_numeric(pd.Series([r.p_adjusted]), errors="coerce").iloc[0]
        if not (p < alpha):
            continue
        verdict = str(r.verdict)
        if not verdict.startswith("significant ("):
            continue
        winner = verdict[len("significant ("):].rsplit(" better)", 1)[0]
        loser = str(r.arm_b) if winner == str(r.arm_a) else str(r.arm_a)
        out.setdefault((str(r.centre), str(r.structure), str(r.metric), winner), set()).add(loser)
    return out


def paper_table_wide(paper: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One metric of :func:`paper_table` as a grid of text cells: a row per structure, a column
    per model x centre (within-centre columns first), and a last row of patients / scans."""
    pm = paper[paper["metric"] == metric]
    if pm.empty:
        return pd.DataFrame(columns=["structure"])
    order = {"within-centre": 0, "cross-centre": 1, "": 2, "observer": 3}
    keys = pm[["block", "centre", "model"]].drop_duplicates()
    keys = keys.assign(_o=keys["block"].map(order)).sort_values("_o", kind="stable")
    names = {(b, c, m): f"{m} on {c}" + (f" ({b})" if b else "") for b, c, m in keys[["block", "centre", "model"]].to_numpy()}
    rows = []
    for structure, ps in pm.groupby("structure", sort=False):
        row = {"structure": structure}
        for (b, c, m), name in names.items():
            hit = ps[(ps["block"] == b) & (ps["centre"] == c) & (ps["model"] == m)]
            row[name] = hit["cell"].iloc[0] if len(hit) else "-"
        rows.append(row)
    last = {"structure": "patients / scans"}
    for (b, c, m), name in names.items():
        hit = pm[(pm["block"] == b) & (pm["centre"] == c) & (pm["model"] == m)]
        last[name] = f"{int(hit['n_patients'].max())} / {int(hit['n_scans'].max())}" if len(hit) else "-"
    rows.append(last)
    return pd.DataFrame(rows, columns=["structure", *names.values()])


def _tex(text: Any) -> str:
    """Text with LaTeX's special characters escaped."""
    s = str(text).replace("\\", "\0")
    for a, b in (("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"), ("_", r"\_"), ("{", r"\{"),
                 ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}")):
        s = s.replace(a, b)
    return s.replace("\0", r"\textbackslash{}")


def paper_table_latex(paper: pd.DataFrame, *, caption: str = "", label: str = "tab:results") -> str:
    """LaTeX (``booktabs``) tables of :func:`paper_table`, one ``table`` per metric.

    Rows: structures; columns: model x centre, grouped into within-centre and cross-centre
    blocks when known; cells ``median (Q1-Q3) [95 % CI]`` with the significance letters as
    superscripts; a last row with the numbers of patients / scans. Needs ``\\usepackage{booktabs}``.
    """
    if paper.empty:
        return "% no rows\n"
    models = list(dict.fromkeys(paper["model"]))
    letters = _letters(models)
    legend = ", ".join(f"{letters[m]}: {_tex(m)}" for m in models)
    out = []
    for metric, pm in paper.groupby("metric", sort=False):
        cols = pm[["block", "centre", "model"]].drop_duplicates()
        order = {"within-centre": 0, "cross-centre": 1, "": 2, "observer": 3}
        cols = cols.assign(_o=cols["block"].map(order)).sort_values(["_o"], kind="stable").drop(columns="_o")
        keys = [tuple(x) for x in cols.to_numpy()]
        spec = "l" + "c" * len(keys)
        lines = [r"\begin{table}[ht]", r"\centering", r"\small"]
        cap = caption or (f"{METRIC_LABELS.get(metric, metric)}: median (IQR) [bootstrap 95\\% CI of the median, "
                          "resampling patients] per model and centre")
        lines += [f"\\caption{{{cap}}}", f"\\label{{{label}-{metric}}}",
                  f"\\begin{{tabular}}{{{spec}}}", r"\toprule"]
        if any(b for b, _, _ in keys):
            head, start = [""], 2
            for block in dict.fromkeys(b for b, _, _ in keys):
                n = sum(1 for b, _, _ in keys if b == block)
                head.append(f"\\multicolumn{{{n}}}{{c}}{{{_tex(block or 'training centres unknown')}}}")
            lines.append(" & ".join(head) + r" \\")
            rules = []
            for block in dict.fromkeys(b for b, _, _ in keys):
                n = sum(1 for b, _, _ in keys if b == block)
                rules.append(f"\\cmidrule(lr){{{start}-{start + n - 1}}}")
                start += n
            lines.append(" ".join(rules))
        lines.append(" & ".join(["Structure"] + [f"{_tex(m)} on {_tex(c)}" for _, c, m in keys]) + r" \\")
        lines.append(r"\midrule")
        for structure, ps in pm.groupby("structure", sort=False):
            cells = []
            for b, c, m in keys:
                hit = ps[(ps["block"] == b) & (ps["centre"] == c) & (ps["model"] == m)]
                if hit.empty:
                    cells.append("--")
                    continue
                r = hit.iloc[0]
                text = _tex(r["cell"][: len(r["cell"]) - len(r["marks"])].strip() if r["marks"] else r["cell"])
                cells.append(text + (f"$^{{{r['marks']}}}$" if r["marks"] else ""))
            lines.append(" & ".join([_tex(structure)] + cells) + r" \\")
        lines.append(r"\midrule")
        n_cells = []
        for b, c, m in keys:
            hit = pm[(pm["block"] == b) & (pm["centre"] == c) & (pm["model"] == m)]
            n_cells.append(f"{int(hit['n_patients'].max())} / {int(hit['n_scans'].max())}" if len(hit) else "--")
        lines.append(" & ".join(["Patients / scans"] + n_cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}",
                  f"\\par\\footnotesize Letters: significantly better than that model on the same centre "
                  f"(paired Wilcoxon signed-rank, corrected); {legend}."
                  + (" =: non-inferior to the second observer on the same patients (one-sided signed-rank at "
                     "the run's margin, corrected, with the interval clearing the margin)."
                     if pm["block"].eq("observer").any() else ""),
                  r"\end{table}", ""]
        out.append("\n".join(lines))
    return "\n".join(out)


def methods_paragraph(run: Mapping[str, Any] | None, stats: pd.DataFrame | None = None,
                      bootstrap: BootstrapOptions | None = BootstrapOptions()) -> str:
    """A methods paragraph from the run record (``run.json``) and the statistics table.

    States the metric definitions, the tolerance(s), the APL convention, the tests, the unit of
    analysis, the correction and its family, non-inferiority margins and level, the bootstrap
    and the software versions. Parts the inputs do not give are left out, never guessed.
    """
    run = dict(run or {})
    opts = dict(run.get("options") or {})
    parts = []
    version = run.get("oarbench")
    parts.append(
        "Segmentations were compared with the reference contours using oarbench"
        + (f" {version}" if version else "")
        + ": Dice similarity coefficient (DSC), 95th-percentile Hausdorff distance (HD95), mean surface "
        "distance (MSD) and surface DSC, with the surface-element definitions of DeepMind's surface-distance "
        "library (area-weighted distances between surface elements, HD95 as the area-weighted 95th percentile "
        "without interpolation, the larger of the two directions); volumetric similarity, centroid distance and "
        "the added path length (APL; per axial slice, the length of reference contour farther than the tolerance "
        "from the predicted contour)."
    )
    tol = opts.get("tolerance_mm")
    per = opts.get("tolerances_mm") or {}
    if tol is not None:
        text = f"The tolerance of surface DSC and APL was {float(tol):g} mm"
        if per:
            text += " (structure-specific: " + ", ".join(f"{k} {float(v):g} mm" for k, v in sorted(per.items())) + ")"
        conv = opts.get("apl_convention")
        if conv:
            text += ("; APL counted contour pixels farther than the tolerance in in-plane Euclidean distance"
                     if conv == "exact" else
                     "; APL used platipy's convention (tolerance rounded up to whole pixels)")
        parts.append(text + ".")
    res = run.get("resolution_warnings") or []
    if res:
        parts.append("Some tolerances were below the coarsest voxel spacing, where surface DSC cannot resolve "
                     "distances below one voxel (" + "; ".join(map(str, res)) + ").")
    parts.append("Failed segmentations were not excluded: a missed or hallucinated structure entered with DSC 0 "
                 "and infinite distances.")
    if stats is not None and not stats.empty:
        unit = _one(stats, "unit")
        fam = _one(stats, "family")
        corr = _one(stats, "correction")
        if unit == "patient":
            parts.append("The unit of analysis was the patient: the values of a patient's scans were averaged per "
                         "structure before testing.")
        elif unit == "scan":
            parts.append("Each scan was analysed as an independent unit.")
        tests = []
        analysis = stats["analysis"].astype(str) if "analysis" in stats.columns else pd.Series(dtype=str)
        if (analysis == "paired").any():
            tests.append("paired comparisons of models on the same patients used the two-sided Wilcoxon "
                         "signed-rank test (exact or exact permutation p-values up to 50 pairs, zero differences "
                         "ranked by Pratt's method), with the Hodges-Lehmann shift and its confidence interval")
        if (analysis == "cross-centre").any():
            tests.append("comparisons of one model between centres used the two-sided Mann-Whitney U test")
        if tests:
            text = "; ".join(tests)
            parts.append(text[0].upper() + text[1:] + ".")
        if corr:
            family_text = {"comparison": "within each comparison (one model pair on one centre, or one model "
                                         "across one pair of centres, over all structures and metrics)",
                           "study": "over all tests of the study"}.get(fam, f"within families '{fam}'")
            parts.append(f"P-values were adjusted for multiple comparisons with the {_corr_name(corr)} method "
                         f"{family_text}.")
        margins = stats.dropna(subset=["margin"]) if {"margin", "metric"} <= set(stats.columns) else pd.DataFrame()
        if len(margins):
            ni = margins["ni_alpha"].dropna() if "ni_alpha" in margins.columns else pd.Series(dtype=float)
            ni_alpha = float(ni.iloc[0]) if len(ni) else 0.025
            ms = margins.drop_duplicates("metric")
            parts.append(
                "Non-inferiority was tested with a one-sided signed-rank test at alpha = "
                f"{ni_alpha:g} against margins of " + ", ".join(f"{r.margin:g} ({r.metric})" for r in ms.itertuples())
                + f", and declared only when the matching two-sided {100 * (1 - 2 * ni_alpha):g}% Hodges-Lehmann "
                "interval excluded the margin (ICH E9, CONSORT)."
            )
        if "analysis" in stats.columns and (stats["analysis"].astype(str) == "observer").any():
            human = stats[stats["analysis"].astype(str) == "observer"]
            names = ", ".join(dict.fromkeys(human["arm_b"].astype(str)))
            parts.append(
                f"As a human baseline, a second observer's contours ({names}) were scored against the reference "
                "like a model, and each model was compared with them on the same patients (paired signed-rank "
                "test" + (", and non-inferiority to the observer at the margins above" if len(margins) else "")
                + ")."
            )
        label = _one(stats, "bootstrap")
        if label:
            parts.append(f"Confidence intervals of the median and mean differences were bootstrap intervals ({label}).")
    if bootstrap is not None and bootstrap.n_resamples:
        parts.append(f"Summary medians are reported with {100 * bootstrap.confidence:g}% {bootstrap.method} bootstrap "
                     f"intervals resampling patients ({bootstrap.n_resamples} resamples, seed {bootstrap.seed}).")
    soft = [f"Python {run['python']}" if run.get("python") else "",
            f"NumPy {run['numpy']}" if run.get("numpy") else "", f"pandas {run['pandas']}" if run.get("pandas") else ""]
    try:
        import scipy
        import statsmodels

        soft += [f"SciPy {scipy.__version__}", f"statsmodels {statsmodels.__version__}"]
    except ImportError:  # pragma: no cover - both are core dependencies
        pass
    soft = [s for s in soft if s]
    if soft:
        parts.append("Software: " + ", ".join(soft) + ".")
    return " ".join(parts)


def _one(df: pd.DataFrame, col: str) -> str:
    if col not in df.columns:
        return ""
    vals = [str(v) for v in df[col].dropna().unique() if str(v)]
    return vals[0] if len(vals) == 1 else ", ".join(vals)


def _corr_name(method: str) -> str:
    return {"holm": "Holm", "fdr_bh": "Benjamini-Hochberg", "bonferroni": "Bonferroni", "hommel": "Hommel",
            "fdr_by": "Benjamini-Yekutieli", "sidak": "Sidak", "holm-sidak": "Holm-Sidak"}.get(method, method)


def write_paper_outputs(out_dir: str | Path, paper: pd.DataFrame, methods: str) -> dict[str, Path]:
    """Write ``paper_table.csv``, ``paper_table.tex`` and ``methods.md`` atomically."""
    from oarbench.io import atomic_write_text
    from oarbench.tables import csv_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "paper_table.csv": atomic_write_text(out / "paper_table.csv", csv_text(paper)),
        "paper_table.tex": atomic_write_text(out / "paper_table.tex", paper_table_latex(paper)),
        "methods.md": atomic_write_text(out / "methods.md", methods + "\n"),
    }
