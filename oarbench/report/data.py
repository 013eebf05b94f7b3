"""The numbers of the report: summaries, headline, robustness deltas, noise floor, flagged values.

Pure functions of the loaded tables (pandas in, pandas out); nothing here draws or writes
HTML. :mod:`oarbench.report.context` holds the loaded inputs, :mod:`oarbench.report.figures`
draws, :mod:`oarbench.report.sections` turns both into the sections of the page.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "STATUSES",
    "SIGNIFICANCE",
    "EXPLANATIONS",
    "MIN_BOX_N",
    "quantile_inf",
    "summary_table",
    "headline_table",
    "robustness_deltas",
    "noise_floor_table",
    "suspicious_values",
    "lowest_median_dsc",
    "stats_counts",
    "model_order",
]

#: Status values counted in the summary tables, in display order.
STATUSES: tuple[str, ...] = ("ok", "missed", "hallucinated", "absent", "missing")
#: Cells of the statistics table with ``p_adjusted`` below this are marked.
SIGNIFICANCE = 0.05
#: A box is drawn for a group of at least this many values; smaller groups are drawn as points only,
#: and a structure whose largest group is smaller gets no box-plot figure (its table says it all).
MIN_BOX_N = 5

_ORIGINAL = "original"
_SCORED = ("ok", "missed", "hallucinated")
_METRICS: tuple[tuple[str, str, int], ...] = (("dsc", "DSC", 3), ("hd95", "HD95 (mm)", 1), ("msd", "MSD (mm)", 2))
_KEYS = ("study", "centre", "model", "condition", "case", "structure")
#: Short names of the kinds of :func:`suspicious_values` (and of the gallery's small reference islands).
_KIND_SHORT = {"hd95_zero": "HD95 0 mm, DSC < 1", "far_island": "large HD95, high DSC", "small_reference": "tiny reference",
               "small_island": "small reference islands"}

#: Why a value that looks like a bug is not one; keyed by the ``kind`` of :func:`suspicious_values`.
EXPLANATIONS: dict[str, str] = {
    "hd95_zero": (
        "HD95 = 0.0 mm although DSC < 1: HD95 is the 95th percentile of surface distances weighted by surface "
        "area. On a coarse grid the two masks differ by a few voxels while most of their surface elements coincide "
        "exactly (distance 0); when more than 95 % of the surface area of each mask lies on the other, the 95th "
        "percentile is 0 mm. HD (the maximum) shows the disagreement."
    ),
    "far_island": (
        "Large HD95 with a high DSC: a small piece of one mask lies far from the other, typically an island of the "
        "reference (or a stray island of the prediction) away from the organ. It barely changes the overlap (DSC), "
        "but once its surface is more than 5 % of the total surface area, HD95 is about its distance. Look at the "
        "reference for islands before suspecting the model."
    ),
    "small_island": (
        "Small reference islands: the gallery found connected pieces of the reference no larger than the size set "
        "with --small-island-voxels. A stray island of a few voxels is usually an annotation slip; if it lies away "
        "from the organ it alone can set HD95 and HD, and a model that (rightly) ignores it is counted as wrong."
    ),
    "small_reference": (
        "Tiny reference structure: with only a few reference voxels, one voxel more or less moves DSC by about 1/N "
        "and any surface distance is dominated by single voxels. Such references are often annotation slips "
        "(a stray click) and are worth checking."
    ),
}



def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Condition filled with ``original``; key columns as text, never NaN (shown as ``(not given)``)."""
    df = df.copy()
    if "condition" not in df.columns:
        df["condition"] = _ORIGINAL
    df["condition"] = df["condition"].fillna(_ORIGINAL).astype(str).replace("", _ORIGINAL)
    for col in ("study", "centre", "model", "case", "structure", "status"):
        if col in df.columns:
            df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str).str.strip().replace("", "(not given)")
    return df


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


def fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; NaN as ``–``, ±inf as ``∞``."""
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
    infinite distances, as docs/metrics.md defines them, so a quartile can be ∞);
    ``absent`` and ``missing`` rows do not (their metrics are undefined). The
    status counts say how many rows of each kind there were.

    Returns a DataFrame with columns model, centre, n_ok, n_missed,
    n_hallucinated, n_absent, n_missing and, per metric, ``<metric>_median``,
    ``<metric>_q1``, ``<metric>_q3`` (floats).
    """
    df = _with_condition(table)
    df = df[(df["structure"].astype(str) == structure) & (df["condition"] == _ORIGINAL)]
    return _summaries(df).get(structure, pd.DataFrame())


def _summaries(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """:func:`summary_table` of every structure of ``table`` (condition original rows only), in one pass."""
    df = _with_condition(table)
    df = df[df["condition"] == _ORIGINAL]
    metrics = [(col, pd.to_numeric(df[col], errors="coerce").to_numpy(float)) for col, _l, _d in _METRICS if col in df.columns]
    status = df["status"].astype(str).to_numpy()
    scored = np.isin(status, ["ok", "missed", "hallucinated"])
    keys = pd.DataFrame({"structure": df["structure"].astype(str).to_numpy(), "model": df["model"].astype(str).to_numpy(),
                         "centre": df["centre"].astype(str).to_numpy()})
    rows: dict[str, list[dict[str, Any]]] = {}
    for (structure, model, centre), pos in keys.groupby(["structure", "model", "centre"], sort=True).indices.items():
        rec: dict[str, Any] = {"model": model, "centre": centre}
        st = status[pos]
        for s in STATUSES:
            rec[f"n_{s}"] = int((st == s).sum())
        sc = pos[scored[pos]]
        for col, values in metrics:
            vals = values[sc]
            rec[f"{col}_median"] = quantile_inf(vals, 0.5)
            rec[f"{col}_q1"] = quantile_inf(vals, 0.25)
            rec[f"{col}_q3"] = quantile_inf(vals, 0.75)
        rows.setdefault(structure, []).append(rec)
    return {k: pd.DataFrame(v) for k, v in rows.items()}


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




def headline_table(table: pd.DataFrame, trained_on: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """Per model x centre: the per-case mean DSC over structures, summarised over cases.

    For each case (condition ``original``), the mean DSC over its structures with
    status ``ok``, ``missed`` or ``hallucinated`` (missed/hallucinated count as 0);
    then median, Q1 and Q3 (linear interpolation) over the cases of that model and
    centre. ``setting`` is ``within`` when the model was trained on that centre,
    ``cross`` when it was trained on other centres only, ``""`` when unknown.

    Returns columns model, centre, setting, n_cases, n_missed, n_hallucinated,
    dsc_median, dsc_q1, dsc_q3.
    """
    df = _normalise(table)
    df = df[df["condition"] == _ORIGINAL]
    scored = df[df["status"].isin(_SCORED)].assign(_dsc=lambda d: pd.to_numeric(d["dsc"], errors="coerce"))
    rows = []
    for (model, centre), g in df.groupby(["model", "centre"], sort=True):
        s = scored[(scored["model"] == model) & (scored["centre"] == centre)]
        per_case = s.groupby("case")["_dsc"].mean().to_numpy(float)
        trained = None if trained_on is None else trained_on.get(model)
        setting = "" if not trained else ("within" if centre in set(map(str, trained)) else "cross")
        rows.append({
            "model": model, "centre": centre, "setting": setting, "n_cases": int(per_case.size),
            "n_missed": int((g["status"] == "missed").sum()), "n_hallucinated": int((g["status"] == "hallucinated").sum()),
            "dsc_median": quantile_inf(per_case, 0.5), "dsc_q1": quantile_inf(per_case, 0.25),
            "dsc_q3": quantile_inf(per_case, 0.75),
        })
    return pd.DataFrame(rows, columns=["model", "centre", "setting", "n_cases", "n_missed", "n_hallucinated",
                                       "dsc_median", "dsc_q1", "dsc_q3"])


def _is_lossless(condition: str) -> bool | None:
    """True for flips, 90-degree steps and re-orientations, False for resampling ones, None when unknown."""
    try:
        from oarbench.robustness.transforms import SmallRotation, parse_condition

        return not isinstance(parse_condition(condition), SmallRotation)
    except (ValueError, ImportError):
        return None


def noise_floor_table(noise_floor: pd.DataFrame | None, conditions: Iterable[str]) -> pd.DataFrame:
    """The resampling noise floor of each robustness condition.

    The floor is what a perfect model would lose: the reference pushed through
    the perturbation and back (nearest neighbour), scored against itself
    (``noise_floor.csv`` of ``oarbench robustness``). Per condition: the median
    and minimum of ΔDSC = floor DSC − 1 over the floor's rows with a defined DSC,
    and the median floor HD95 (mm). Flips, 90-degree steps and re-orientations
    move voxels without resampling: their floor is exactly 0 (``lossless``).

    Returns columns condition, kind (``lossless``, ``resampled``, ``not given``),
    n, floor_delta_dsc_median, floor_delta_dsc_min, floor_hd95_median.
    """
    rows = []
    fl = None
    if noise_floor is not None and {"condition", "dsc"}.issubset(noise_floor.columns):
        fl = _normalise(noise_floor)
    for cond in sorted(set(conditions)):
        lossless = _is_lossless(cond)
        rec: dict[str, Any] = {"condition": cond, "kind": "", "n": 0, "floor_delta_dsc_median": math.nan,
                               "floor_delta_dsc_min": math.nan, "floor_hd95_median": math.nan}
        sub = fl[fl["condition"] == cond] if fl is not None else None
        if sub is not None and len(sub):
            d = pd.to_numeric(sub["dsc"], errors="coerce").to_numpy(float)
            d = d[~np.isnan(d)] - 1.0
            h = pd.to_numeric(sub["hd95"], errors="coerce").to_numpy(float) if "hd95" in sub else np.array([])
            rec.update(kind="resampled" if lossless is not True else "lossless", n=int(d.size),
                       floor_delta_dsc_median=quantile_inf(d, 0.5), floor_delta_dsc_min=float(d.min()) if d.size else math.nan,
                       floor_hd95_median=quantile_inf(h[np.isfinite(h)], 0.5))
        elif lossless:
            rec.update(kind="lossless", floor_delta_dsc_median=0.0, floor_delta_dsc_min=0.0, floor_hd95_median=0.0)
        else:
            rec.update(kind="not given")
        rows.append(rec)
    return pd.DataFrame(rows, columns=["condition", "kind", "n", "floor_delta_dsc_median", "floor_delta_dsc_min",
                                       "floor_hd95_median"])


def suspicious_values(
    table: pd.DataFrame,
    *,
    hd95_above: float = 10.0,
    high_dsc: float = 0.9,
    small_reference_voxels: int = 10,
) -> pd.DataFrame:
    """Rows whose values look like a bug but follow from the definitions.

    Kinds (see :data:`EXPLANATIONS`):

    * ``hd95_zero``: status ``ok``, HD95 = 0 mm and DSC < 1;
    * ``far_island``: status ``ok``, HD95 > ``hd95_above`` mm and DSC >= ``high_dsc``;
    * ``small_reference``: status ``ok`` or ``missed`` and a reference of at most
      ``small_reference_voxels`` voxels (``tp + fn``; needs those columns; 0 turns
      the check off).

    Returns the key columns plus dsc, hd95, hd, ref_voxels, ref_ml and kind, one
    row per row and kind (a row may have several kinds).
    """
    df = _normalise(table)
    dsc = pd.to_numeric(df["dsc"], errors="coerce") if "dsc" in df else pd.Series(np.nan, index=df.index)
    hd95 = pd.to_numeric(df["hd95"], errors="coerce") if "hd95" in df else pd.Series(np.nan, index=df.index)
    ok = df["status"] == "ok"
    if {"tp", "fn"}.issubset(df.columns):
        ref_vox = pd.to_numeric(df["tp"], errors="coerce") + pd.to_numeric(df["fn"], errors="coerce")
    else:
        ref_vox = pd.Series(np.nan, index=df.index)
    masks = {
        "hd95_zero": ok & (hd95 == 0) & (dsc < 1),
        "far_island": ok & (hd95 > hd95_above) & np.isfinite(hd95) & (dsc >= high_dsc),
        "small_reference": (df["status"].isin(["ok", "missed"]) & (ref_vox <= small_reference_voxels) & (ref_vox > 0))
        if small_reference_voxels > 0 else pd.Series(False, index=df.index),
    }
    cols = [c for c in _KEYS if c in df.columns]
    frames = []
    for kind, m in masks.items():
        m = m.fillna(False).astype(bool)
        if m.any():
            sub = df.loc[m, cols].copy()
            sub["dsc"] = dsc[m]
            sub["hd95"] = hd95[m]
            sub["hd"] = pd.to_numeric(df.loc[m, "hd"], errors="coerce") if "hd" in df else np.nan
            sub["ref_voxels"] = ref_vox[m]
            sub["ref_ml"] = pd.to_numeric(df.loc[m, "ref_ml"], errors="coerce") if "ref_ml" in df else np.nan
            sub["kind"] = kind
            frames.append(sub)
    out_cols = cols + ["dsc", "hd95", "hd", "ref_voxels", "ref_ml", "kind"]
    if not frames:
        return pd.DataFrame(columns=out_cols)
    return pd.concat(frames, ignore_index=True)[out_cols]


def _fp_summary(absent: pd.DataFrame, thresholds: Sequence[float]) -> pd.DataFrame:
    from oarbench.absent import summarise_absent

    cases = absent.copy()
    if "study" not in cases.columns:
        cases["study"] = ""
    return summarise_absent(cases, thresholds)


def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(text))
    return keep or "x"


def _group_label(model: str, centre: str, setting: str = "") -> str:
    return f"{model} @ {centre}" + (f" ({setting})" if setting else "")


def _iqr(m: float, a: float, b: float, digits: int = 3) -> str:
    return f"{fmt(m, digits)} [{fmt(a, digits)}–{fmt(b, digits)}]"


def _is_untestable(verdict: pd.Series) -> pd.Series:
    return verdict.str.startswith("not testable") | verdict.str.startswith("not tested")


def stats_counts(stats: pd.DataFrame) -> pd.DataFrame | None:
    """Per comparison (analysis, comparison, centre or model): how many tests came out which way.

    ``tests`` counts every row, ``tested`` the rows with a test result (verdict not
    ``not testable``): the counts of significant results are out of ``tested``.
    Returns None when the table has no ``comparison`` and ``verdict`` columns.
    """
    need = {"comparison", "verdict"}
    if not need.issubset(stats.columns):
        return None
    s = stats.copy()
    for c in ("analysis", "centre", "model", "comparison", "verdict"):
        if c in s.columns:
            s[c] = s[c].astype(object).where(s[c].notna(), "").astype(str)
        else:
            s[c] = ""
    s["where"] = np.where(s["centre"] != "", "centre " + s["centre"], np.where(s["model"] != "", "model " + s["model"], ""))
    rows = []
    for (analysis, comparison, where), g in s.groupby(["analysis", "comparison", "where"], sort=False):
        v = g["verdict"]
        untestable = _is_untestable(v)
        sig = v[v.str.startswith("significant")].str.extract(r"\((.*) better\)")[0].fillna("?").value_counts()
        ni = ""
        if "noninferiority_verdict" in g.columns:
            nv = g["noninferiority_verdict"].astype(str)
            shown = nv[nv.str.contains("non-inferior ") & ~nv.str.contains("not shown")]
            ni = str(len(shown))
        rows.append({
            "analysis": analysis, "comparison": comparison, "where": where, "tests": len(g),
            "tested": int((~untestable).sum()),
            "significant": " · ".join(f"{k} better: {int(n)}" for k, n in sig.items()) or "none",
            "n.s.": int(v.str.startswith("n.s").sum() + v.str.startswith("no evidence").sum()),
            "not testable": int(untestable.sum()),
            **({"non-inferiority shown": ni} if ni != "" else {}),
        })
    return pd.DataFrame(rows)


def lowest_median_dsc(table: pd.DataFrame, models: Sequence[str], k: int = 3) -> dict[str, list[tuple[str, float, int]]]:
    """Per model: the ``k`` structures with the lowest median DSC over its cases and centres.

    Condition original, rows with status ok, missed or hallucinated (missed and
    hallucinated count as DSC 0). Each entry is (structure, median, n rows); models
    without scored rows are left out. One model's bad structure is never averaged with
    another model's good one: each model is ranked on its own rows.
    """
    df = _normalise(table)
    df = df[(df["condition"] == _ORIGINAL) & df["status"].isin(_SCORED)]
    df = df.assign(_d=pd.to_numeric(df["dsc"], errors="coerce")).dropna(subset=["_d"])
    out: dict[str, list[tuple[str, float, int]]] = {}
    for model in models:
        g = df[df["model"] == model]
        if g.empty:
            continue
        by = g.groupby("structure")["_d"].agg(["median", "size"]).sort_values(["median"], kind="mergesort")
        if len(by) > 1:
            out[model] = [(str(s), float(r["median"]), int(r["size"])) for s, r in by.head(k).iterrows()]
    return out


def model_order(table: pd.DataFrame, given: Sequence[str] | None = None) -> list[str]:
    """Models in the order given (the ``--prediction`` order or the study file's), then any other
    model of ``table`` in order of first appearance (which is the order of evaluation)."""
    seen = list(dict.fromkeys(str(m) for m in table["model"])) if "model" in table.columns else []
    first = [str(m) for m in (given or ()) if str(m) in set(seen)]
    return list(dict.fromkeys(first + seen))


def _flatten(obj: Any, prefix: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in obj):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, json.dumps(obj, default=str) if isinstance(obj, (list, tuple)) else str(obj)



