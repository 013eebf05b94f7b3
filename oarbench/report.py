"""One self-contained HTML report of a benchmark run.

:func:`build_report` writes ``report.html``: every figure is embedded as a
base64 PNG data URI, the CSS is inline, there is no script and no external
resource, so the file can be mailed, archived or printed as it is. All text
from the tables is escaped with :func:`html.escape`.

Sections: study description; per-structure summary tables (median [Q1-Q3] of
DSC, HD95 and MSD per model and centre, with status counts); box plots; the
statistics table (``p_adjusted < 0.05`` marked); robustness deltas per
condition; the absent-organ (false-positive kidney) table; the failure-case
galleries; provenance.
"""

from __future__ import annotations

import base64
import html
import json
import math
import platform
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "STATUSES",
    "SIGNIFICANCE",
    "quantile_inf",
    "summary_table",
    "robustness_deltas",
    "build_report",
]

#: Status values counted in the summary tables, in display order.
STATUSES: tuple[str, ...] = ("ok", "missed", "hallucinated", "absent", "missing")
#: Cells of the statistics table with ``p_adjusted`` below this are marked.
SIGNIFICANCE = 0.05

_ORIGINAL = "original"
_METRICS: tuple[tuple[str, str, int], ...] = (("dsc", "DSC", 3), ("hd95", "HD95 (mm)", 1), ("msd", "MSD (mm)", 2))


# --------------------------------------------------------------------------- numbers


def quantile_inf(values: Sequence[float] | np.ndarray, q: float) -> float:
    """Quantile by linear interpolation (numpy's default) that tolerates ``inf``.

    ``numpy.quantile`` returns NaN when it interpolates between two infinities
    (``inf - inf``); here any interpolation touching ``+inf`` gives ``+inf``,
    which is the order-statistic answer. NaNs are dropped first; an empty input
    gives NaN.
    """
    v = np.sort(np.asarray(values, dtype=float)[~np.isnan(np.asarray(values, dtype=float))])
    if v.size == 0:
        return float("nan")
    h = (v.size - 1) * float(q)
    lo, hi = int(math.floor(h)), int(math.ceil(h))
    frac = h - lo
    if np.isinf(v[hi]) and (frac > 0 or np.isinf(v[lo])):
        return float(v[hi])
    if np.isinf(v[lo]):
        return float(v[lo])
    return float(v[lo] + frac * (v[hi] - v[lo]))


def _fmt(value: Any, digits: int = 3) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.{digits}f}"


def _fmt_cell(value: Any) -> str:
    """Generic cell: 4 significant digits for floats, text as it is."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if value is None:
        return ""
    return str(value)


# --------------------------------------------------------------------------- tables


def _with_condition(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if "condition" not in df.columns:
        df["condition"] = _ORIGINAL
    df["condition"] = df["condition"].fillna(_ORIGINAL).astype(str)
    return df


def _structure_order(df: pd.DataFrame) -> list[str]:
    if "label" in df.columns:
        lab = df[["structure", "label"]].drop_duplicates("structure")
        lab = lab.assign(_l=pd.to_numeric(lab["label"], errors="coerce")).sort_values(["_l", "structure"], kind="mergesort")
        return [str(s) for s in lab["structure"]]
    return sorted(map(str, df["structure"].unique()))


def summary_table(table: pd.DataFrame, structure: str) -> pd.DataFrame:
    """Median [Q1–Q3] of DSC, HD95 (mm), MSD (mm) per model and centre for one structure.

    Uses condition ``original`` rows. Rows with status ``ok``, ``missed`` and
    ``hallucinated`` enter the quantiles (missed/hallucinated with DSC 0 and
    infinite distances, as METRICS.md defines them, so a quartile can be ∞);
    ``absent`` and ``missing`` rows do not (their metrics are undefined). The
    status counts say how many rows of each kind there were.

    Returns a DataFrame with columns model, centre, n_ok, n_missed,
    n_hallucinated, n_absent, n_missing and, per metric, ``<metric>_median``,
    ``<metric>_q1``, ``<metric>_q3`` (floats).
    """
    df = _with_condition(table)
    df = df[(df["structure"].astype(str) == structure) & (df["condition"] == _ORIGINAL)]
    rows = []
    for (model, centre), g in df.groupby([df["model"].astype(str), df["centre"].astype(str)], sort=True):
        rec: dict[str, Any] = {"model": model, "centre": centre}
        for s in STATUSES:
            rec[f"n_{s}"] = int((g["status"] == s).sum())
        scored = g[g["status"].isin(["ok", "missed", "hallucinated"])]
        for col, _label, _d in _METRICS:
            if col not in g.columns:
                continue
            vals = pd.to_numeric(scored[col], errors="coerce").to_numpy(float)
            rec[f"{col}_median"] = quantile_inf(vals, 0.5)
            rec[f"{col}_q1"] = quantile_inf(vals, 0.25)
            rec[f"{col}_q3"] = quantile_inf(vals, 0.75)
        rows.append(rec)
    return pd.DataFrame(rows)


def robustness_deltas(table: pd.DataFrame, robustness: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per structure x model x centre x condition: how much the metrics change.

    Each row under a condition other than ``original`` is paired with the same
    case/structure/model/centre under ``original`` (taken from ``robustness``
    itself or, failing that, from ``table``). ΔDSC = DSC(condition) − DSC(original)
    over pairs where both DSC are defined (not NaN); ΔHD95 (mm) over pairs where
    both HD95 are finite. ``n_status_changed`` counts pairs whose status differs.

    Returns an empty DataFrame when there is no condition other than ``original``.
    """
    frames = [_with_condition(table)]
    if robustness is not None:
        frames.insert(0, _with_condition(robustness))
    key = ["centre", "model", "case", "structure"]
    allrows = pd.concat(frames, ignore_index=True)
    for c in key:
        allrows[c] = allrows[c].astype(str)
    allrows = allrows.drop_duplicates(key + ["condition"], keep="first")
    orig = allrows[allrows["condition"] == _ORIGINAL].set_index(key)
    pert = allrows[allrows["condition"] != _ORIGINAL]
    cols = ["structure", "model", "centre", "condition", "n_pairs", "delta_dsc_median", "delta_dsc_q1", "delta_dsc_q3",
            "n_hd95_pairs", "delta_hd95_median", "n_status_changed"]
    if pert.empty or orig.empty:
        return pd.DataFrame(columns=cols)
    idx = pd.MultiIndex.from_frame(pert[key])
    o = orig.reindex(idx)
    d = pert.assign(
        _dsc0=o["dsc"].to_numpy(float),
        _hd0=pd.to_numeric(o["hd95"], errors="coerce").to_numpy(float) if "hd95" in o else np.nan,
        _st0=o["status"].to_numpy(object),
    )
    d = d[d["_st0"].notna()]
    rows = []
    for (structure, model, centre, condition), g in d.groupby(["structure", "model", "centre", "condition"], sort=True):
        dd = (pd.to_numeric(g["dsc"], errors="coerce") - g["_dsc0"]).to_numpy(float)
        dd = dd[~np.isnan(dd)]
        h1 = pd.to_numeric(g["hd95"], errors="coerce").to_numpy(float) if "hd95" in g else np.full(len(g), np.nan)
        h0 = g["_hd0"].to_numpy(float)
        fin = np.isfinite(h1) & np.isfinite(h0)
        dh = h1[fin] - h0[fin]
        rows.append({
            "structure": structure, "model": model, "centre": centre, "condition": condition,
            "n_pairs": int(dd.size),
            "delta_dsc_median": quantile_inf(dd, 0.5), "delta_dsc_q1": quantile_inf(dd, 0.25), "delta_dsc_q3": quantile_inf(dd, 0.75),
            "n_hd95_pairs": int(dh.size), "delta_hd95_median": quantile_inf(dh, 0.5),
            "n_status_changed": int((g["status"].astype(str).to_numpy() != g["_st0"].astype(str).to_numpy()).sum()),
        })
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------- html pieces

_CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:1.5em auto;max-width:1200px;color:#111;line-height:1.35}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #444;margin-top:1.6em}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:0.8em;margin:0.4em 0 1em 0}
th,td{border:1px solid #888;padding:2px 6px;text-align:right;vertical-align:top}
th{background:#eee}td.t,th.t{text-align:left}
td.sig{font-weight:bold;background:#e8e8e8}
.note{color:#444;font-size:0.85em}.missing{color:#555;font-style:italic}
img{max-width:100%;height:auto;display:block;margin:0.3em 0}
pre{background:#f6f6f6;border:1px solid #ccc;padding:0.5em;font-size:0.75em;white-space:pre-wrap;word-break:break-all}
nav ul{columns:2;font-size:0.9em}
@media print{body{max-width:none;margin:0}h2{page-break-before:auto}img,table{page-break-inside:avoid}nav{display:none}}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _html_table(df: pd.DataFrame, *, marks: Mapping[tuple[int, str], bool] | None = None, text_cols: Iterable[str] = ()) -> str:
    text_cols = set(text_cols)
    out = ["<table><thead><tr>"]
    for c in df.columns:
        out.append(f'<th class="t">{_e(c)}</th>' if c in text_cols else f"<th>{_e(c)}</th>")
    out.append("</tr></thead><tbody>")
    for i, (_, row) in enumerate(df.iterrows()):
        out.append("<tr>")
        for c in df.columns:
            val = row[c]
            txt = _fmt_cell(val)
            is_text = c in text_cols or not isinstance(val, (int, float, np.integer, np.floating)) or isinstance(val, bool)
            cls = []
            if is_text:
                cls.append("t")
            if marks and marks.get((i, c)):
                cls.append("sig")
                txt += " *"
            attr = f' class="{" ".join(cls)}"' if cls else ""
            out.append(f"<td{attr}>{_e(txt)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _text_columns(df: pd.DataFrame) -> list[str]:
    """Columns shown left-aligned: everything that is not numeric (object, str, bool)."""
    return [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])]


def _load(obj: Any, name: str) -> pd.DataFrame | None:
    if obj is None:
        return None
    if isinstance(obj, pd.DataFrame):
        return obj
    path = Path(obj)
    if path.suffix == ".parquet":
        from oarbench.tables import read_table

        return read_table(path)
    if not path.is_file():
        raise ValueError(f"{path}: {name} file not found")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read {name} as CSV: {exc}") from exc


def _section_study(table: pd.DataFrame, provenance: Mapping[str, Any] | None) -> str:
    df = _with_condition(table)
    parts = ["<h2 id='study'>Study</h2>"]
    studies = sorted(map(str, df["study"].dropna().unique())) if "study" in df.columns else []
    items = []
    if studies:
        items.append(f"<li>Study: {_e(', '.join(studies))}</li>")
    orig = df[df["condition"] == _ORIGINAL]
    centres = []
    for centre, g in orig.groupby(orig["centre"].astype(str), sort=True):
        centres.append(f"{centre} ({g['case'].astype(str).nunique()} cases)")
    items.append(f"<li>Centres: {_e(', '.join(centres) or 'none')}</li>")
    items.append(f"<li>Models: {_e(', '.join(sorted(map(str, df['model'].unique()))))}</li>")
    items.append(f"<li>Structures ({df['structure'].nunique()}): {_e(', '.join(_structure_order(df)))}</li>")
    items.append(f"<li>Conditions: {_e(', '.join(sorted(df['condition'].unique())))}</li>")
    counts = df["status"].astype(str).value_counts()
    items.append("<li>Rows: " + _e(f"{len(df)} (" + ", ".join(f"{s} {int(counts.get(s, 0))}" for s in STATUSES)
                                    + "".join(f", {s} {int(n)}" for s, n in counts.items() if s not in STATUSES) + ")") + "</li>")
    if provenance and isinstance(provenance.get("study"), (str, Mapping)):
        items.append(f"<li>Study definition: {_e(json.dumps(provenance['study'], default=str) if isinstance(provenance['study'], Mapping) else provenance['study'])}</li>")
    parts.append("<ul>" + "".join(items) + "</ul>")
    parts.append(
        "<p class='note'>Status per structure and case (docs/metrics.md): ok = both masks present; missed = reference "
        "present, prediction empty (DSC 0, distances ∞); hallucinated = reference empty, prediction present (DSC 0, "
        "distances ∞); absent = both empty (metrics undefined); missing = no prediction file.</p>"
    )
    return "\n".join(parts)


def _section_summary(table: pd.DataFrame, box_plots: bool) -> str:
    from oarbench.plots import box_plot_figure, figure_png_bytes

    parts = [
        "<h2 id='summary'>Per-structure results</h2>",
        "<p class='note'>Condition original. Each metric cell is median [Q1–Q3] over rows with status ok, missed and "
        "hallucinated (missed/hallucinated count as DSC 0 and distance ∞, so a quartile may be ∞); absent and missing "
        "rows are only counted. Box plots show ok rows; the number of missed/hallucinated rows left out is written under "
        "each box.</p>",
    ]
    for structure in _structure_order(table):
        s = summary_table(table, structure)
        if s.empty:
            continue
        show = pd.DataFrame({"model": s["model"], "centre": s["centre"]})
        for st in STATUSES:
            show[f"n {st}"] = s[f"n_{st}"]
        for col, label, digits in _METRICS:
            if f"{col}_median" in s:
                show[label] = [
                    f"{_fmt(m, digits)} [{_fmt(a, digits)}–{_fmt(b, digits)}]"
                    for m, a, b in zip(s[f"{col}_median"], s[f"{col}_q1"], s[f"{col}_q3"])
                ]
        parts.append(f"<h3 id='s-{_e(structure)}'>{_e(structure)}</h3>")
        parts.append(_html_table(show, text_cols=["model", "centre"] + [m[1] for m in _METRICS]))
        if box_plots:
            fig = box_plot_figure(table, structure)
            parts.append(_img(figure_png_bytes(fig, dpi=90), f"box plots of {structure}"))
    return "\n".join(parts)


#: Columns of stats.csv shown in the report, when present (the file keeps them all).
_STATS_SHOWN: tuple[str, ...] = (
    "analysis", "condition", "centre", "comparison", "structure", "metric", "n",
    "arm_a", "median_a", "q1_a", "q3_a", "arm_b", "median_b", "q1_b", "q3_b",
    "test", "statistic", "p", "p_adjusted", "correction", "rank_biserial", "hl_shift", "ci_low", "ci_high",
    "verdict", "margin", "p_noninferiority_adjusted", "noninferiority_verdict",
)
#: Columns whose values below :data:`SIGNIFICANCE` are marked.
_MARKED: tuple[str, ...] = ("p_adjusted", "p_noninferiority_adjusted")


def _section_stats(stats: pd.DataFrame | None) -> str:
    parts = ["<h2 id='stats'>Statistics</h2>"]
    if stats is None:
        parts.append("<p class='missing'>No statistics table was given (stats.csv).</p>")
        return "\n".join(parts)
    shown = [c for c in _STATS_SHOWN if c in stats.columns]
    if len(shown) >= 4 and "structure" in shown:
        view = stats[shown].reset_index(drop=True)
        if len(shown) < len(stats.columns):
            parts.append(f"<p class='note'>{len(shown)} of the {len(stats.columns)} columns of stats.csv are shown; "
                         "the file has them all (status counts per arm, methods, family sizes).</p>")
    else:
        view = stats.reset_index(drop=True)
    marks: dict[tuple[int, str], bool] = {}
    marked_cols = [c for c in _MARKED if c in view.columns]
    for col in marked_cols:
        vals = pd.to_numeric(view[col], errors="coerce").to_numpy(float)
        for i, p in enumerate(vals):
            if p < SIGNIFICANCE:
                marks[(i, col)] = True
    if "p_adjusted" in view.columns:
        n_sig = sum(1 for (_, c) in marks if c == "p_adjusted")
        parts.append(
            f"<p class='note'>Cells in bold with * have an adjusted p-value below {SIGNIFICANCE} "
            f"(p_adjusted: {n_sig} of {len(view)} rows"
            + (f"; p_noninferiority_adjusted: {sum(1 for (_, c) in marks if c == 'p_noninferiority_adjusted')}, "
               "i.e. non-inferiority shown at the declared margin" if "p_noninferiority_adjusted" in view.columns else "")
            + "). Tests, correction and margins are those of the statistics step (docs/statistics.md); "
            "its verdict columns are shown as written.</p>"
        )
    else:
        parts.append("<p class='note'>The table has no p_adjusted column; nothing is marked.</p>")
    parts.append(_html_table(view, marks=marks, text_cols=_text_columns(view)))
    return "\n".join(parts)


def _section_robustness(table: pd.DataFrame, robustness: pd.DataFrame | None) -> str:
    parts = ["<h2 id='robustness'>Robustness</h2>"]
    source = robustness if robustness is not None else table
    needed = {"centre", "model", "case", "structure", "status", "dsc"}
    if not needed.issubset(source.columns):
        parts.append("<p class='note'>The robustness table does not have the results-table columns; shown as given.</p>")
        parts.append(_html_table(source.reset_index(drop=True), text_cols=_text_columns(source)))
        return "\n".join(parts)
    deltas = robustness_deltas(table, robustness)
    if deltas.empty:
        parts.append("<p class='missing'>No condition other than original in the results (no robustness run).</p>")
        return "\n".join(parts)
    parts.append(
        "<p class='note'>Δ = condition − original, paired by case (same structure, model, centre). ΔDSC median "
        "[Q1–Q3] over pairs where both DSC are defined; ΔHD95 (mm) median over pairs with both HD95 finite; "
        "status changed = pairs whose status differs (e.g. ok → missed).</p>"
    )
    show = pd.DataFrame({
        "structure": deltas["structure"], "model": deltas["model"], "centre": deltas["centre"], "condition": deltas["condition"],
        "n pairs": deltas["n_pairs"],
        "ΔDSC": [f"{_fmt(m)} [{_fmt(a)}–{_fmt(b)}]" for m, a, b in zip(deltas["delta_dsc_median"], deltas["delta_dsc_q1"], deltas["delta_dsc_q3"])],
        "n HD95 pairs": deltas["n_hd95_pairs"],
        "ΔHD95 (mm)": [_fmt(v, 2) for v in deltas["delta_hd95_median"]],
        "status changed": deltas["n_status_changed"],
    })
    parts.append(_html_table(show, text_cols=["structure", "model", "centre", "condition", "ΔDSC", "ΔHD95 (mm)"]))
    return "\n".join(parts)


def _section_absent(absent: pd.DataFrame | None) -> str:
    parts = ["<h2 id='absent'>Absent organs (false-positive kidneys)</h2>"]
    if absent is None:
        parts.append("<p class='missing'>No absent-organ table was given (absent.csv).</p>")
    else:
        parts.append("<p class='note'>As written by the absent-organ analysis (docs/absent.md).</p>")
        parts.append(_html_table(absent.reset_index(drop=True), text_cols=_text_columns(absent)))
    return "\n".join(parts)


def _section_gallery(gallery_dir: Path | None) -> str:
    parts = ["<h2 id='gallery'>Failure-case galleries</h2>"]
    if gallery_dir is None:
        parts.append("<p class='missing'>No gallery folder was given.</p>")
        return "\n".join(parts)
    gallery_dir = Path(gallery_dir)
    if not gallery_dir.is_dir():
        raise ValueError(f"{gallery_dir}: gallery folder not found")
    index_path = gallery_dir / "index.csv"
    index = pd.read_csv(index_path) if index_path.is_file() else None
    parts.append(
        "<p class='note'>Reference: solid blue (#0072B2); prediction: dashed orange (#E69F00). Radiological "
        "convention: patient left on image right (axial seen from the feet, coronal from the front; sagittal "
        "anterior on the left). Abdomen window W400/L40, lungs W1500/L−600.</p>"
    )
    if index is not None and "montage" in index.columns:
        names = [str(m) for m in index["montage"].dropna().unique() if str(m)]
    else:
        names = sorted(p.name for p in gallery_dir.glob("*.png"))
    for name in names:
        path = gallery_dir / name
        if not path.is_file():
            parts.append(f"<p class='missing'>{_e(name)} is listed in index.csv but not found.</p>")
            continue
        png = path.read_bytes()
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError(f"{path}: not a PNG file")
        structure = Path(name).stem
        parts.append(f"<h3>{_e(structure)}</h3>")
        parts.append(_img(png, f"failure cases of {structure}"))
    if not names:
        parts.append("<p class='missing'>The gallery folder holds no montages.</p>")
    if index is not None:
        parts.append("<h3>Gallery index</h3>")
        keep = [c for c in ("structure", "centre", "model", "condition", "case", "status", "dsc", "hd95", "dsc_drop",
                            "reason", "drawn", "note", "montage", "panel", "plane", "slice_index") if c in index.columns]
        sub = index[keep] if keep else index
        parts.append(_html_table(sub.reset_index(drop=True), text_cols=_text_columns(sub)))
    return "\n".join(parts)


def _section_provenance(provenance: Mapping[str, Any] | None) -> str:
    import matplotlib
    import scipy

    from oarbench import __version__

    parts = ["<h2 id='provenance'>Provenance</h2>"]
    env = {
        "oarbench": __version__, "python": platform.python_version(), "numpy": np.__version__,
        "pandas": pd.__version__, "scipy": scipy.__version__, "matplotlib": matplotlib.__version__,
    }
    parts.append("<h3>Report built with</h3>")
    parts.append(_html_table(pd.DataFrame({"package": list(env), "version": list(env.values())}), text_cols=["package", "version"]))
    if provenance is None:
        parts.append("<p class='missing'>No run record was given (run.json).</p>")
    else:
        parts.append("<h3>Run record (run.json)</h3>")
        flat = list(_flatten(provenance))
        if flat:
            parts.append(_html_table(pd.DataFrame(flat, columns=["key", "value"]), text_cols=["key", "value"]))
    return "\n".join(parts)


def _flatten(obj: Any, prefix: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in obj):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, json.dumps(obj, default=str) if isinstance(obj, (list, tuple)) else str(obj)


def build_report(
    out_dir: str | Path,
    table: pd.DataFrame | str | Path,
    stats: pd.DataFrame | str | Path | None = None,
    robustness: pd.DataFrame | str | Path | None = None,
    absent: pd.DataFrame | str | Path | None = None,
    gallery_dir: str | Path | None = None,
    provenance: Mapping[str, Any] | str | Path | None = None,
    *,
    filename: str = "report.html",
    title: str | None = None,
    notes: Sequence[str] = (),
    box_plots: bool = True,
) -> Path:
    """Write the self-contained HTML report; returns its path.

    Parameters
    ----------
    out_dir:
        Folder to write into (created).
    table:
        The results table (DataFrame or CSV path).
    stats:
        The statistics table (``stats.csv``), shown as given with ``p_adjusted < 0.05`` marked.
    robustness:
        Results rows under robustness conditions (``robustness.csv``, results-table
        columns); when None, the non-original rows of ``table`` are used.
    absent:
        The absent-organ table (``absent.csv``), shown as given.
    gallery_dir:
        A folder written by :func:`oarbench.gallery.build_gallery`.
    provenance:
        The run record (dict or path to ``run.json``): versions, options, input hashes.
    filename:
        Name of the HTML file.
    title:
        Page title (default from the study name).
    notes:
        Lines shown under the title (e.g. which inputs were not found).
    box_plots:
        Draw the box plots (the slowest part; off for quick tests).
    """
    tbl = _load(table, "results table")
    assert tbl is not None
    missing = [c for c in ("centre", "model", "case", "structure", "status") if c not in tbl.columns]
    if missing:
        raise ValueError(f"results table: missing column(s) {', '.join(missing)}")
    stats_df = _load(stats, "statistics table")
    rob_df = _load(robustness, "robustness table")
    absent_df = _load(absent, "absent-organ table")
    prov: Mapping[str, Any] | None
    if provenance is None or isinstance(provenance, Mapping):
        prov = provenance
    else:
        p = Path(provenance)
        try:
            prov = json.loads(p.read_text())
        except OSError as exc:
            raise ValueError(f"{p}: cannot read run record: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON: {exc}") from exc
        if not isinstance(prov, Mapping):
            raise ValueError(f"{p}: run record must be a JSON object")
    if title is None:
        studies = sorted(map(str, tbl["study"].dropna().unique())) if "study" in tbl.columns else []
        title = f"oarbench report: {', '.join(studies)}" if studies else "oarbench report"

    sections = [
        _section_study(tbl, prov),
        _section_summary(tbl, box_plots),
        _section_stats(stats_df),
        _section_robustness(tbl, rob_df),
        _section_absent(absent_df),
        _section_gallery(Path(gallery_dir) if gallery_dir is not None else None),
        _section_provenance(prov),
    ]
    nav = (
        "<nav><ul><li><a href='#study'>Study</a></li><li><a href='#summary'>Per-structure results</a></li>"
        "<li><a href='#stats'>Statistics</a></li><li><a href='#robustness'>Robustness</a></li>"
        "<li><a href='#absent'>Absent organs</a></li><li><a href='#gallery'>Failure-case galleries</a></li>"
        "<li><a href='#provenance'>Provenance</a></li></ul></nav>"
    )
    note_html = "".join(f"<p class='missing'>{_e(n)}</p>" for n in notes)
    doc = (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n{note_html}\n{nav}\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )
    from oarbench.io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / filename, doc)
