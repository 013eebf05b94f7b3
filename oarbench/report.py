"""One self-contained HTML report of a benchmark run, laid out like a paper.

:func:`build_report` writes ``report.html``: every figure is embedded as a
base64 PNG data URI, every detail table can be downloaded as CSV from an
embedded ``data:`` link, the CSS is inline, there is no script and no external
resource, so the file can be mailed, archived or printed as it is. All text
from the tables is escaped with :func:`html.escape`.

The page opens with the headline comparison (models x centres, within- and
cross-centre), then one section per question: accuracy (per-structure results,
values that look like bugs but are not, statistics), robustness (against the
resampling noise floor), false-positive kidneys after nephrectomy, failure
cases, provenance. Long tables sit in closed ``<details>`` elements.

Each section is built by one small function ``(ReportContext) -> Section``
listed in :data:`SECTIONS`; a new section is a new function in that list.
"""

from __future__ import annotations

import base64
import html
import json
import math
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from oarbench.gallery.selection import FailureCriteria, select_failures

__all__ = [
    "STATUSES",
    "SIGNIFICANCE",
    "EXPLANATIONS",
    "ReportOptions",
    "ReportContext",
    "Section",
    "SECTIONS",
    "quantile_inf",
    "summary_table",
    "headline_table",
    "robustness_deltas",
    "noise_floor_table",
    "suspicious_values",
    "build_report",
]

#: Status values counted in the summary tables, in display order.
STATUSES: tuple[str, ...] = ("ok", "missed", "hallucinated", "absent", "missing")
#: Cells of the statistics table with ``p_adjusted`` below this are marked.
SIGNIFICANCE = 0.05

_ORIGINAL = "original"
_SCORED = ("ok", "missed", "hallucinated")
_METRICS: tuple[tuple[str, str, int], ...] = (("dsc", "DSC", 3), ("hd95", "HD95 (mm)", 1), ("msd", "MSD (mm)", 2))
_KEYS = ("study", "centre", "model", "condition", "case", "structure")

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


@dataclass(frozen=True)
class ReportOptions:
    """What the report flags and how.

    Attributes
    ----------
    criteria:
        What counts as a failure case (:class:`oarbench.gallery.FailureCriteria`);
        ``None``: the criteria the gallery was drawn with (its ``selection.json``),
        else the defaults.
    high_dsc:
        A row with DSC >= this and HD95 above ``criteria.hd95_above`` (default
        10 mm) is explained as a far-away island.
    small_reference_voxels:
        A reference structure of at most this many voxels (``tp + fn``) is flagged
        as tiny (0 turns the flag off).
    fp_thresholds_ml:
        Volume thresholds (mL) of the false-positive kidney rates.
    trained_on:
        Model -> centres it was trained on, for the within/cross-centre view
        (``None``: not known; the CLI reads it from the study TOML in run.json).
    box_plots:
        Draw the box plots (the slowest part; off for quick tests).
    """

    criteria: FailureCriteria | None = None
    high_dsc: float = 0.9
    small_reference_voxels: int = 10
    fp_thresholds_ml: tuple[float, ...] | None = None
    trained_on: Mapping[str, Sequence[str]] | None = None
    box_plots: bool = True

    def __post_init__(self) -> None:
        if not 0 <= float(self.high_dsc) <= 1:
            raise ValueError(f"high_dsc must lie in [0, 1], got {self.high_dsc}")
        if int(self.small_reference_voxels) < 0:
            raise ValueError(f"small_reference_voxels must be >= 0, got {self.small_reference_voxels}")


@dataclass(frozen=True)
class Section:
    """One section of the report: anchor id, title (for the navigation bar) and HTML body."""

    id: str
    title: str
    body: str

    def html(self) -> str:
        return f"<section id='{_e(self.id)}'>\n<h2>{_e(self.title)}</h2>\n{self.body}\n</section>"


@dataclass(frozen=True)
class ReportContext:
    """Everything a section builder may read (tables already loaded and checked)."""

    table: pd.DataFrame
    stats: pd.DataFrame | None = None
    robustness: pd.DataFrame | None = None
    noise_floor: pd.DataFrame | None = None
    absent: pd.DataFrame | None = None
    absent_pairs: pd.DataFrame | None = None
    gallery_dir: Path | None = None
    provenance: Mapping[str, Any] | None = None
    options: ReportOptions = field(default_factory=ReportOptions)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per report (sections share summaries and selections)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def original(self) -> pd.DataFrame:
        """Rows of condition ``original``."""
        return self.cached("original", lambda: self.table[self.table["condition"] == _ORIGINAL])

    def summaries(self) -> dict[str, pd.DataFrame]:
        """:func:`summary_table` of every structure."""
        return self.cached("summaries", lambda: _summaries(self.table))

    def failures(self, capped: bool = False) -> pd.DataFrame:
        """:func:`~oarbench.gallery.select_failures` on all conditions (every failing row, or at most k per rule)."""
        crit = self.criteria if capped else replace(self.criteria, k=None)
        return self.cached(f"failures-{capped}", lambda: select_failures(self.all_conditions(), crit, source="results table"))

    @property
    def criteria(self) -> FailureCriteria:
        if self.options.criteria is not None:
            return self.options.criteria
        recorded = self.cached("gallery_criteria", lambda: _gallery_criteria(self.gallery_dir))
        return recorded if recorded is not None else FailureCriteria()

    def all_conditions(self) -> pd.DataFrame:
        """The results table plus the robustness rows it lacks (one row per key)."""
        return self.cached("all_conditions", self._all_conditions)

    def _all_conditions(self) -> pd.DataFrame:
        if self.robustness is None or not {"centre", "model", "case", "structure", "status", "dsc"}.issubset(self.robustness.columns):
            return self.table
        rob = _normalise(self.robustness)
        both = pd.concat([self.table, rob], ignore_index=True)
        return both.drop_duplicates([c for c in _KEYS if c in both.columns], keep="first").reset_index(drop=True)


def _gallery_criteria(gallery_dir: Path | None) -> FailureCriteria | None:
    if gallery_dir is None:
        return None
    from oarbench.gallery.build import SELECTION_FILE

    path = Path(gallery_dir) / SELECTION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return FailureCriteria.from_dict(data) if isinstance(data, Mapping) else None
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the gallery's selection criteria: {exc}") from exc


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


# --------------------------------------------------------------------------- html pieces

_CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:1.2em auto;max-width:1320px;padding:0 12px;color:#111;line-height:1.35}
h1{font-size:1.5em;margin:0.2em 0}h2{font-size:1.3em;border-bottom:1px solid #444;margin-top:1.4em}h3{font-size:1.05em;margin:1em 0 0.3em 0}
table{border-collapse:collapse;font-size:0.8em;margin:0.4em 0 0.8em 0;max-width:100%}
th,td{border:1px solid #888;padding:2px 6px;text-align:right;vertical-align:top;overflow-wrap:anywhere}
th{background:#eee}td.t,th.t{text-align:left}
td.sig{font-weight:bold;background:#e8e8e8}
.tw{max-width:100%;overflow-x:auto}
.note{color:#444;font-size:0.85em}.missing{color:#555;font-style:italic}.explain{font-size:0.85em;border-left:3px solid #999;padding-left:0.6em;margin:0.4em 0}
.csv{font-size:0.8em;margin-left:0.6em}
img{max-width:100%;height:auto;display:block;margin:0.3em 0}
pre{background:#f6f6f6;border:1px solid #ccc;padding:0.5em;font-size:0.75em;white-space:pre-wrap;word-break:break-all}
nav{font-size:0.9em;margin:0.4em 0 0.8em 0}nav a{margin-right:1em}
details{margin:0.25em 0}details>summary{cursor:pointer}details[open]>summary{font-weight:bold}
details.structure{border-bottom:1px solid #ddd;padding:0.1em 0}
ul.findings li{margin:0.15em 0}
@media print{body{max-width:none;margin:0}img,table{page-break-inside:avoid}nav{display:none}}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _html_table(df: pd.DataFrame, *, marks: Mapping[tuple[int, str], bool] | None = None, text_cols: Iterable[str] = ()) -> str:
    """A table inside a container that scrolls sideways only if the table cannot wrap to the layout's width."""
    text_cols = set(text_cols)
    cols = list(df.columns)
    out = ["<div class='tw'><table><thead><tr>"]
    for c in cols:
        out.append(f'<th class="t">{_e(c)}</th>' if c in text_cols else f"<th>{_e(c)}</th>")
    out.append("</tr></thead><tbody>")
    numeric = (int, float, np.integer, np.floating)
    for i, values in enumerate(df.itertuples(index=False, name=None)):
        out.append("<tr>")
        for c, val in zip(cols, values):
            txt = _fmt_cell(val)
            is_text = c in text_cols or not isinstance(val, numeric) or isinstance(val, (bool, np.bool_))
            cls = "t" if is_text else ""
            if marks and marks.get((i, c)):
                cls = (cls + " sig").strip()
                txt += " *"
            out.append(f'<td class="{cls}">{_e(txt)}</td>' if cls else f"<td>{_e(txt)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _text_columns(df: pd.DataFrame) -> list[str]:
    """Columns shown left-aligned: everything that is not numeric (object, str, bool)."""
    return [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])]


def _csv_link(df: pd.DataFrame, filename: str) -> str:
    """A download link carrying the table as an embedded CSV (``data:`` URI, no file beside the report needed)."""
    data = base64.b64encode(df.to_csv(index=False).encode("utf-8")).decode("ascii")
    return (f"<a class='csv' download='{_e(filename)}' href='data:text/csv;charset=utf-8;base64,{data}'>"
            f"download {_e(filename)} ({len(df)} rows)</a>")


def _details(summary: str, body: str, *, id: str | None = None, cls: str | None = None, open_: bool = False) -> str:
    """A collapsible block; ``summary`` is HTML (already escaped)."""
    attrs = (f" id='{_e(id)}'" if id else "") + (f" class='{_e(cls)}'" if cls else "") + (" open" if open_ else "")
    return f"<details{attrs}><summary>{summary}</summary>\n{body}\n</details>"


def _detail_table(df: pd.DataFrame, summary: str, filename: str, *, full: pd.DataFrame | None = None,
                  marks: Mapping[tuple[int, str], bool] | None = None, text_cols: Iterable[str] | None = None) -> str:
    """A closed ``<details>`` with a table and a CSV download of ``full`` (default: the table shown)."""
    full = df if full is None else full
    body = _csv_link(full, filename) + _html_table(df.reset_index(drop=True), marks=marks,
                                                   text_cols=_text_columns(df) if text_cols is None else text_cols)
    return _details(f"{_e(summary)} ({len(df)} rows)", body)


def _load(obj: Any, name: str) -> pd.DataFrame | None:
    if obj is None:
        return None
    if isinstance(obj, pd.DataFrame):
        return obj
    path = Path(obj)
    from oarbench.io import check_output_set  # the tables of one run, not a mixed set

    if path.suffix == ".parquet":
        from oarbench.tables import read_table

        check_output_set(path)
        return read_table(path)
    if not path.is_file():
        raise ValueError(f"{path}: {name} file not found")
    check_output_set(path)
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read {name} as CSV: {exc}") from exc


def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(text))
    return keep or "x"


def _group_label(model: str, centre: str, setting: str = "") -> str:
    return f"{model} @ {centre}" + (f" ({setting})" if setting else "")


def _headline(ctx: ReportContext) -> pd.DataFrame:
    return ctx.cached("headline", lambda: headline_table(ctx.table, ctx.options.trained_on))


def _settings(ctx: ReportContext) -> dict[tuple[str, str], str]:
    return {(r.model, r.centre): r.setting for r in _headline(ctx).itertuples()}


def _iqr(m: float, a: float, b: float, digits: int = 3) -> str:
    return f"{_fmt(m, digits)} [{_fmt(a, digits)}–{_fmt(b, digits)}]"


# --------------------------------------------------------------------------- sections


def _study_line(ctx: ReportContext) -> str:
    df = ctx.table
    orig = ctx.original
    studies = sorted(set(df["study"])) if "study" in df.columns else []
    centres = [f"{c} ({g['case'].nunique()} cases)" for c, g in orig.groupby("centre", sort=True)]
    conds = sorted(set(df["condition"]) | (set(_normalise(ctx.robustness)["condition"]) if ctx.robustness is not None
                                            and "condition" in ctx.robustness.columns else set()))
    counts = df["status"].value_counts()
    parts = []
    if studies:
        parts.append(f"Study {', '.join(studies)}")
    parts += [
        f"centres: {', '.join(centres) or 'none'}",
        f"models: {', '.join(sorted(set(df['model'])))}",
        f"{df['structure'].nunique()} structures"
        + (f" ({len(_present_structures(ctx))} present in a reference or prediction)"
           if len(_present_structures(ctx)) < df["structure"].nunique() else ""),
        f"conditions: {', '.join(conds)}",
        f"{len(df)} rows (" + ", ".join(f"{s} {int(counts.get(s, 0))}" for s in STATUSES)
        + "".join(f", {s} {int(n)}" for s, n in counts.items() if s not in STATUSES) + ")",
    ]
    return "<p>" + _e(" · ".join(parts)) + "</p>"


def _headline_matrix(ctx: ReportContext) -> str:
    h = _headline(ctx)
    if h.empty:
        return "<p class='missing'>No rows of condition original.</p>"
    centres = sorted(set(h["centre"]))
    trained = ctx.options.trained_on or {}
    rows = []
    for model, g in h.groupby("model", sort=True):
        rec: dict[str, Any] = {"model": model}
        if trained:
            rec["trained on"] = ", ".join(map(str, trained.get(model, ()))) or "–"
        by_c = {r.centre: r for r in g.itertuples()}
        for c in centres:
            r = by_c.get(c)
            if r is None:
                rec[f"centre {c}"] = "–"
                continue
            extra = [f"n={r.n_cases}"]
            if r.n_missed or r.n_hallucinated:
                extra.append(f"{r.n_missed} missed, {r.n_hallucinated} halluc.")
            rec[f"centre {c}"] = (_iqr(r.dsc_median, r.dsc_q1, r.dsc_q3) + (f" {r.setting}" if r.setting else "")
                                  + " (" + "; ".join(extra) + ")")
        rows.append(rec)
    view = pd.DataFrame(rows)
    out = [_html_table(view, text_cols=list(view.columns))]
    out.append("<p class='note'>Per case, the mean DSC over its structures (condition original; missed and "
               "hallucinated structures count as DSC 0); each cell is the median [Q1–Q3] of that per-case mean over "
               "the centre's test cases. " + ("'within' = the model was trained on that centre's data, 'cross' = it "
               "was not (trained elsewhere)." if trained else "Training centres are not known (set trained_on per "
               "model in the study TOML), so within- and cross-centre cells are not marked.") + "</p>")
    if trained and (h["setting"] != "").any():
        wc = []
        for model, g in h[h["setting"] != ""].groupby("model", sort=True):
            w, c = g[g["setting"] == "within"], g[g["setting"] == "cross"]
            wm = float(np.median(w["dsc_median"])) if len(w) else math.nan
            cm = float(np.median(c["dsc_median"])) if len(c) else math.nan
            wc.append({"model": model, "trained on": ", ".join(map(str, trained.get(model, ()))),
                       "within-centre DSC": _fmt(wm) + (f" ({', '.join(w['centre'])})" if len(w) else ""),
                       "cross-centre DSC": _fmt(cm) + (f" ({', '.join(c['centre'])})" if len(c) else ""),
                       "cross − within": _fmt(cm - wm) if len(w) and len(c) else "–"})
        out.append("<h3>Within- vs cross-centre</h3>")
        out.append(_html_table(pd.DataFrame(wc), text_cols=["model", "trained on", "within-centre DSC",
                                                            "cross-centre DSC", "cross − within"]))
        out.append("<p class='note'>Medians of the cells above; the statistics (cross-centre rank-sum tests per "
                   "structure and metric) are in the accuracy section.</p>")
    return "\n".join(out)


def _stats_counts(stats: pd.DataFrame) -> pd.DataFrame | None:
    """Per comparison (analysis, comparison, centre or model): how many tests came out which way."""
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
    for (analysis, comparison, where), g in s.groupby(["analysis", "comparison", "where"], sort=True):
        v = g["verdict"]
        sig = v[v.str.startswith("significant")].str.extract(r"\((.*) better\)")[0].fillna("?").value_counts()
        ni = ""
        if "noninferiority_verdict" in g.columns:
            nv = g["noninferiority_verdict"].astype(str)
            shown = nv[nv.str.contains("non-inferior ") & ~nv.str.contains("not shown")]
            ni = str(len(shown))
        rows.append({
            "analysis": analysis, "comparison": comparison, "where": where, "tests": len(g),
            "significant": " · ".join(f"{k} better: {int(n)}" for k, n in sig.items()) or "none",
            "n.s.": int(v.str.startswith("n.s").sum() + v.str.startswith("no evidence").sum()),
            "not testable": int(v.str.startswith("not testable").sum()),
            **({"non-inferiority shown": ni} if ni != "" else {}),
        })
    return pd.DataFrame(rows)


def _findings(ctx: ReportContext) -> str:
    items = []
    orig = ctx.original[ctx.original["status"].isin(_SCORED)]
    if len(orig):
        med = orig.assign(_d=pd.to_numeric(orig["dsc"], errors="coerce")).groupby("structure")["_d"].median().sort_values()
        if len(med) > 1:
            worst = ", ".join(f"{s} {_fmt(v)}" for s, v in med.head(3).items())
            items.append(f"Lowest median DSC (all models and centres): {worst}.")
    if ctx.stats is not None:
        counts = _stats_counts(ctx.stats)
        if counts is not None:
            for r in counts.itertuples():
                items.append(f"{r.analysis} {r.comparison}" + (f" ({r.where})" if r.where else "")
                             + f": {r.significant} of {r.tests} tests (adjusted p < {SIGNIFICANCE}).")
    if ctx.absent is not None and {"model", "status", "pred_ml"}.issubset(ctx.absent.columns):
        fp = _fp_summary(ctx.absent, (0.0,))
        if len(fp):
            items.append("False-positive kidney after nephrectomy (any voxel): "
                         + ", ".join(f"{r.model} {r.n_fp}/{r.n_cases}" for r in fp.itertuples()) + ".")
    sel = ctx.failures()
    items.append(f"Failure cases: {len(sel)} rows" + (f" in {sel['structure'].nunique()} structures" if len(sel) else
                                                      " (no failures)") + " (rules in the failure-case section).")
    sus = _suspicious(ctx)
    if len(sus):
        items.append(f"{len(sus)} values look like bugs but follow from the definitions "
                     f"({', '.join(f'{k}: {n}' for k, n in sus['kind'].value_counts().items())}; explained in the "
                     "accuracy section).")
    return "<ul class='findings'>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def _section_headline(ctx: ReportContext) -> Section:
    body = [_study_line(ctx), "<h3>Headline: mean DSC per case, models × centres</h3>", _headline_matrix(ctx),
            "<h3>Key findings</h3>", _findings(ctx)]
    return Section("headline", "At a glance", "\n".join(body))


def _suspicious(ctx: ReportContext) -> pd.DataFrame:
    crit = ctx.criteria
    return ctx.cached("suspicious", lambda: suspicious_values(
        ctx.table, hd95_above=crit.hd95_above if crit.hd95_above is not None else 10.0,
        high_dsc=ctx.options.high_dsc, small_reference_voxels=ctx.options.small_reference_voxels))


_KIND_SHORT = {"hd95_zero": "HD95 0 mm, DSC < 1", "far_island": "large HD95, high DSC", "small_reference": "tiny reference",
               "small_island": "small reference islands"}


def _gallery_islands(ctx: ReportContext) -> pd.DataFrame:
    """Rows of the gallery index whose reference has small islands (columns of the index; empty when none)."""
    def compute() -> pd.DataFrame:
        if ctx.gallery_dir is None or not (ctx.gallery_dir / "index.csv").is_file():
            return pd.DataFrame()
        index = _load(ctx.gallery_dir / "index.csv", "gallery index")
        if index is None or "ref_small_islands" not in index.columns:
            return pd.DataFrame()
        n = pd.to_numeric(index["ref_small_islands"], errors="coerce").fillna(0)
        return _normalise(index[n > 0])
    return ctx.cached("gallery_islands", compute)


def _present_structures(ctx: ReportContext) -> list[str]:
    """Structures (label order) with at least one row that is not ``absent`` under condition original."""
    def compute() -> list[str]:
        orig = ctx.original
        present = set(orig.loc[orig["status"] != "absent", "structure"])
        return [s for s in _structure_order(orig) if s in present]
    return ctx.cached("present_structures", compute)


def _absent_everywhere_note(ctx: ReportContext) -> str:
    gone = [s for s in _structure_order(ctx.original) if s not in set(_present_structures(ctx))]
    if not gone:
        return ""
    return (f"<p class='note'>{len(gone)} structures of the label map are absent from every reference and prediction "
            f"(nothing to score) and are not listed: {_e(', '.join(gone))}.</p>")


def _structure_matrix(ctx: ReportContext, metric: str, digits: int) -> pd.DataFrame:
    orig = ctx.original
    settings = _settings(ctx)
    structures = _present_structures(ctx)
    groups = sorted({(m, c) for m, c in zip(orig["model"], orig["centre"])}, key=lambda mc: (mc[1], mc[0]))
    rows = []
    summaries = ctx.summaries()
    for s in structures:
        tab = summaries.get(s, pd.DataFrame())
        rec: dict[str, Any] = {"structure": s}
        by = {(r["model"], r["centre"]): r for _, r in tab.iterrows()}
        for m, c in groups:
            r = by.get((m, c))
            rec[_group_label(m, c, settings.get((m, c), ""))] = _fmt(r[f"{metric}_median"], digits) if r is not None and f"{metric}_median" in r else "–"
        rows.append(rec)
    return pd.DataFrame(rows)


def _per_structure_blocks(ctx: ReportContext, sus: pd.DataFrame) -> str:
    from oarbench.plots import box_plot_figure, figure_png_bytes

    orig = ctx.original
    settings = _settings(ctx)
    out = []
    summaries = ctx.summaries()
    for structure in _present_structures(ctx):
        s = summaries.get(structure, pd.DataFrame())
        if s.empty:
            continue
        show = pd.DataFrame({"model @ centre": [_group_label(m, c, settings.get((m, c), "")) for m, c in zip(s["model"], s["centre"])]})
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
        body = [_html_table(show, text_cols=[c for c in show.columns if c not in ("n ok",)])]
        kinds = sorted(set(ssus["kind"])) if len(ssus) else []
        for k in kinds:
            body.append(f"<p class='explain'><b>{_e(_KIND_SHORT[k])}</b> ({int((ssus['kind'] == k).sum())} rows): "
                        f"{_e(EXPLANATIONS[k])}</p>")
        if ctx.options.box_plots:
            fig = box_plot_figure(orig, structure)
            body.append(_img(figure_png_bytes(fig, dpi=90), f"box plots of {structure}"))
        med = pd.to_numeric(s["dsc_median"], errors="coerce") if "dsc_median" in s else pd.Series([], dtype=float)
        rng = f"median DSC {_fmt(med.min())}–{_fmt(med.max())}" if len(med) and med.notna().any() else "no DSC"
        fails = int(s["n_missed"].sum() + s["n_hallucinated"].sum())
        summary = (f"<b>{_e(structure)}</b> <span class='note'>{_e(rng)} over {len(s)} model/centre groups"
                   + (f"; {fails} missed/hallucinated" if fails else "")
                   + (f"; {len(ssus)} values explained" if len(ssus) else "") + "</span>")
        out.append(_details(summary, "\n".join(body), id=f"s-{_slug(structure)}", cls="structure"))
    return "\n".join(out)


def _explanations_block(sus: pd.DataFrame, islands: pd.DataFrame | None = None) -> str:
    out = ["<h3 id='explanations'>Values that look like bugs, and why they are not</h3>"]
    if islands is not None and len(islands):
        where = ", ".join(f"{s} ({n})" for s, n in islands.groupby("structure").size().items())
        out.append(f"<p class='explain'><b>{_e(_KIND_SHORT['small_island'])}</b>: {len(islands)} drawn failure cases in "
                   f"{_e(where)}. {_e(EXPLANATIONS['small_island'])}</p>")
    if sus.empty:
        out.append("<p class='note'>None found: no HD95 of 0 mm with DSC < 1, no large HD95 with a high DSC, no tiny "
                   "reference structure.</p>")
        return "\n".join(out)
    counts = sus.groupby(["kind", "structure"]).size().rename("rows").reset_index()
    for kind, g in counts.groupby("kind", sort=False):
        where = ", ".join(f"{s} ({n})" for s, n in zip(g["structure"], g["rows"]))
        out.append(f"<p class='explain'><b>{_e(_KIND_SHORT[kind])}</b>: {int(g['rows'].sum())} rows in {_e(where)}. "
                   f"{_e(EXPLANATIONS[kind])}</p>")
    view = sus.assign(kind=sus["kind"].map(_KIND_SHORT))
    out.append(_detail_table(view, "All flagged rows", "explained_values.csv"))
    return "\n".join(out)


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


def _stats_block(ctx: ReportContext) -> str:
    out = ["<h3 id='stats'>Statistics</h3>"]
    stats = ctx.stats
    if stats is None:
        out.append("<p class='missing'>No statistics table was given (stats.csv).</p>")
        return "\n".join(out)
    counts = _stats_counts(stats)
    if counts is not None and len(counts):
        out.append(_html_table(counts, text_cols=["analysis", "comparison", "where", "significant"]))
    view = _stats_view(stats)
    marks: dict[tuple[int, str], bool] = {}
    for c in _MARKED:
        if c in view.columns:
            for i, p in enumerate(pd.to_numeric(view[c], errors="coerce").to_numpy(float)):
                if p < SIGNIFICANCE:
                    marks[(i, c)] = True
    if "p_adjusted" in view.columns:
        n_sig = sum(1 for (_, c) in marks if c == "p_adjusted")
        out.append(
            f"<p class='note'>Cells in bold with * have an adjusted p-value below {SIGNIFICANCE} (p_adjusted: {n_sig} "
            f"of {len(view)} rows" + (f"; p_noninferiority_adjusted: {sum(1 for (_, c) in marks if c == 'p_noninferiority_adjusted')}, "
                                     "i.e. non-inferiority shown at the declared margin" if "p_noninferiority_adjusted" in view.columns else "")
            + "). Tests, correction and margins are those of the statistics step (docs/statistics.md); verdicts as "
            "written. The download has every column of stats.csv.</p>")
    else:
        out.append("<p class='note'>The table has no p_adjusted column; nothing is marked.</p>")
    out.append(_detail_table(view, "All statistics rows", "stats.csv", full=stats, marks=marks,
                             text_cols=_text_columns(view)))
    return "\n".join(out)


def _section_accuracy(ctx: ReportContext) -> Section:
    sus = _suspicious(ctx)
    body = [
        "<p class='note'>Condition original. Status per structure and case (docs/metrics.md): ok = both masks present; "
        "missed = reference present, prediction empty (DSC 0, distances ∞); hallucinated = reference empty, prediction "
        "present (DSC 0, distances ∞); absent = both empty (metrics undefined); missing = no prediction file. Medians "
        "[Q1–Q3] are over rows with status ok, missed and hallucinated, so a quartile may be ∞.</p>",
        "<h3 id='summary'>Median DSC per structure</h3>",
    ]
    body.append(_absent_everywhere_note(ctx))
    dsc = _structure_matrix(ctx, "dsc", 3)
    n_struct = len(dsc)
    matrix = _html_table(dsc, text_cols=["structure"])
    body.append(matrix if n_struct <= 30 else _details(f"Median DSC of {n_struct} structures", _csv_link(dsc, "median_dsc.csv") + matrix))
    if "hd95" in ctx.table.columns:
        hd = _structure_matrix(ctx, "hd95", 1)
        body.append(_details(f"Median HD95 (mm) per structure ({len(hd)} rows)", _csv_link(hd, "median_hd95.csv")
                             + _html_table(hd, text_cols=["structure"])))
    summaries = ctx.summaries()
    full = pd.concat([summaries[s].assign(structure=s) for s in _present_structures(ctx) if s in summaries]
                     or [pd.DataFrame()], ignore_index=True)
    body.append("<h3>Per structure</h3>")
    body.append("<p class='note'>Open a structure for its status counts, median [Q1–Q3] of DSC, HD95 and MSD per model "
                "and centre, explanations of values that look wrong, and box plots (ok rows; the number of missed/"
                "hallucinated rows left out is written under each box). " + _csv_link(full, "per_structure_summary.csv")
                + "</p>")
    body.append(_per_structure_blocks(ctx, sus))
    body.append(_explanations_block(sus, _gallery_islands(ctx)))
    body.append(_stats_block(ctx))
    return Section("accuracy", "Accuracy: how close are the contours?", "\n".join(body))


def _section_robustness(ctx: ReportContext) -> Section:
    title = "Robustness: does the result survive flips and rotations?"
    source = ctx.robustness if ctx.robustness is not None else ctx.table
    needed = {"centre", "model", "case", "structure", "status", "dsc"}
    if not needed.issubset(source.columns):
        return Section("robustness", title, "<p class='note'>The robustness table does not have the results-table "
                       "columns; shown as given.</p>" + _detail_table(source, "robustness table", "robustness.csv"))
    deltas = robustness_deltas(ctx.table, ctx.robustness)
    if deltas.empty:
        return Section("robustness", title, "<p class='missing'>No condition other than original in the results "
                       "(no robustness run).</p>")
    floor = noise_floor_table(ctx.noise_floor, deltas["condition"])
    body = ["<p class='note'>Δ = condition − original on the same case, structure, model and centre. The noise "
            "floor is what resampling alone costs a perfect model: the reference pushed through the perturbation and "
            "back, scored against itself (noise_floor.csv). Flips, 90-degree steps and re-orientations move voxels "
            "without resampling, so their floor is exactly 0 and any change is the model's.</p>",
            "<h3>Noise floor</h3>"]
    fshow = pd.DataFrame({
        "condition": floor["condition"], "kind": floor["kind"], "n": floor["n"],
        "floor ΔDSC median": [_fmt(v) for v in floor["floor_delta_dsc_median"]],
        "floor ΔDSC min": [_fmt(v) for v in floor["floor_delta_dsc_min"]],
        "floor HD95 median (mm)": [_fmt(v, 2) for v in floor["floor_hd95_median"]],
    })
    body.append(_html_table(fshow, text_cols=list(fshow.columns[:2]) + list(fshow.columns[3:])))
    if (floor["kind"] == "not given").any():
        body.append("<p class='missing'>No noise floor was given for resampling conditions (noise_floor.csv).</p>")
    # per model x condition over all structures, centres and cases
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
    for (model, cond), g in pert.groupby(["model", "condition"], sort=True):
        d = g["_d"].to_numpy(float)
        d = d[~np.isnan(d)]
        fmin = fl.at[cond, "floor_delta_dsc_min"] if cond in fl.index else math.nan
        swaps = int(g["laterality_swap"].map(lambda v: str(v).strip().lower() in {"1", "true", "yes"}).sum()) if "laterality_swap" in g else 0
        rows.append({
            "model": model, "condition": cond, "n pairs": int(d.size),
            "ΔDSC median [Q1–Q3]": _iqr(quantile_inf(d, 0.5), quantile_inf(d, 0.25), quantile_inf(d, 0.75)),
            "worst ΔDSC": _fmt(d.min() if d.size else math.nan),
            "floor ΔDSC median": _fmt(fl.at[cond, "floor_delta_dsc_median"] if cond in fl.index else math.nan),
            "pairs below floor": (int((d < fmin).sum()) if not math.isnan(fmin) else "–"),
            "status changed": int((g["status"].astype(str).to_numpy() != g["_st0"].astype(str).to_numpy()).sum()),
            "laterality swaps": swaps,
        })
    body.append("<h3>Per model and condition</h3>")
    rv = pd.DataFrame(rows)
    body.append(_html_table(rv, text_cols=["model", "condition", "ΔDSC median [Q1–Q3]", "worst ΔDSC", "floor ΔDSC median"]))
    body.append("<p class='note'>Over all structures, centres and cases. Pairs below floor: ΔDSC lower than the lowest "
                "ΔDSC resampling alone produced for that condition (for lossless conditions: any loss).</p>")
    show = pd.DataFrame({
        "structure": deltas["structure"], "model": deltas["model"], "centre": deltas["centre"], "condition": deltas["condition"],
        "n pairs": deltas["n_pairs"],
        "ΔDSC": [_iqr(m, a, b) for m, a, b in zip(deltas["delta_dsc_median"], deltas["delta_dsc_q1"], deltas["delta_dsc_q3"])],
        "n HD95 pairs": deltas["n_hd95_pairs"],
        "ΔHD95 (mm)": [_fmt(v, 2) for v in deltas["delta_hd95_median"]],
        "status changed": deltas["n_status_changed"],
    })
    body.append(_detail_table(show, "Per structure, model, centre and condition", "robustness_deltas.csv", full=deltas,
                              text_cols=["structure", "model", "centre", "condition", "ΔDSC", "ΔHD95 (mm)"]))
    return Section("robustness", title, "\n".join(body))


def _section_absent(ctx: ReportContext) -> Section:
    title = "False-positive kidneys: what do models draw where no kidney is?"
    absent = ctx.absent
    if absent is None:
        return Section("absent", title, "<p class='missing'>No absent-organ table was given (absent.csv).</p>")
    if not {"model", "status", "pred_ml"}.issubset(absent.columns):
        return Section("absent", title, "<p class='note'>The table does not have the columns of absent.csv "
                       "(model, status, pred_ml); shown as given.</p>" + _html_table(absent.reset_index(drop=True),
                                                                                   text_cols=_text_columns(absent)))
    from oarbench.absent import DEFAULT_THRESHOLDS_ML, compare_models

    thresholds = tuple(ctx.options.fp_thresholds_ml or DEFAULT_THRESHOLDS_ML)
    summ = _fp_summary(absent, thresholds)
    body = ["<p class='note'>Cases whose metadata says a kidney was removed (nephrectomy). A case is a false positive "
            "at threshold t when the model's predicted volume on the absent side is strictly greater than t mL (so at "
            "0 mL any voxel counts). Cases without a prediction file are counted as missing and left out "
            "(docs/absent.md).</p>"]
    rows = []
    for model, g in summ.groupby("model", sort=True):
        first = g.iloc[0]
        rec: dict[str, Any] = {"model": model, "cases": int(first["n_cases"]), "missing": int(first["n_missing"])}
        for r in g.itertuples():
            rate = f"{r.fp_rate * 100:.0f} %" if not math.isnan(r.fp_rate) else "–"
            rec[f"FP > {r.threshold_ml:g} mL"] = f"{r.n_fp}/{r.n_cases} ({rate})"
        rec["volume median [Q1–Q3] (mL)"] = _iqr(first["median_ml"], first["q1_ml"], first["q3_ml"], 2)
        rec["max (mL)"] = _fmt(first["max_ml"], 2)
        rows.append(rec)
    view = pd.DataFrame(rows)
    body.append("<h3>False-positive rate per model and threshold</h3>")
    body.append(_html_table(view, text_cols=[c for c in view.columns if c not in ("cases", "missing")]))
    body.append(_csv_link(summ, "absent_summary.csv"))
    pairs = ctx.absent_pairs
    if pairs is None and {"case", "centre"}.issubset(absent.columns):
        try:
            pairs = compare_models(absent, thresholds)
        except (KeyError, ValueError):
            pairs = None
        if pairs is not None and len(pairs):
            body.append(_detail_table(pairs, "Between models: McNemar's exact test per threshold, signed-rank test on volumes",
                                      "absent_pairs.csv"))
    body.append(_detail_table(absent, "Per case and model", "absent.csv"))
    return Section("absent", title, "\n".join(body))


_FAILURE_COLUMNS = ("structure", "model", "centre", "condition", "case", "status", "dsc", "hd95", "dsc_drop", "reason")


def _section_failures(ctx: ReportContext) -> Section:
    title = "Failure cases: where did it go wrong?"
    crit = ctx.criteria
    allrows = ctx.all_conditions()
    selected = ctx.failures()
    body = [f"<p>{_e(crit.describe())}</p>"]
    if ctx.options.criteria is None and ctx.gallery_dir is not None and _gallery_criteria(ctx.gallery_dir) is not None:
        body.append("<p class='note'>These are the rules the gallery was drawn with (gallery/selection.json).</p>")
    elif ctx.options.criteria is not None and ctx.gallery_dir is not None:
        drawn_with = _gallery_criteria(ctx.gallery_dir)
        if drawn_with is not None and drawn_with != ctx.options.criteria:
            body.append(f"<p class='note'>The gallery's montages were drawn with other rules: {_e(drawn_with.describe())}</p>")
    if selected.empty:
        body.append("<p><b>No failures</b>: no row meets any of these rules.</p>")
    else:
        counts = selected.assign(reason=selected["reason"].str.split(";")).explode("reason")
        pivot = counts.groupby(["structure", "reason"]).size().unstack(fill_value=0)
        from oarbench.gallery.selection import REASONS

        pivot = pivot[[r for r in REASONS if r in pivot.columns]]
        pivot.insert(0, "rows", selected.groupby("structure").size())
        order = [s for s in _structure_order(allrows) if s in pivot.index]
        pivot = pivot.loc[order].reset_index()
        body.append(f"<p>{len(selected)} failing rows in {len(pivot)} structures (a row may fail for several reasons).</p>")
        body.append(_html_table(pivot, text_cols=["structure"]))
        sus = _suspicious(ctx)
        shown = selected[[c for c in _FAILURE_COLUMNS if c in selected.columns]].copy()
        if len(sus):
            kinds = sus.groupby([c for c in ("centre", "model", "condition", "case", "structure")])["kind"].agg(
                lambda k: "; ".join(_KIND_SHORT[x] for x in k))
            idx = pd.MultiIndex.from_frame(shown[["centre", "model", "condition", "case", "structure"]])
            shown["explained"] = kinds.reindex(idx).fillna("").to_numpy()
        isl = _gallery_islands(ctx)
        if len(isl):
            keys = set(zip(isl["centre"], isl["model"], isl["condition"], isl["case"], isl["structure"]))
            mark = [_KIND_SHORT["small_island"] if k in keys else "" for k in
                    zip(shown["centre"], shown["model"], shown["condition"], shown["case"], shown["structure"])]
            prev = shown["explained"] if "explained" in shown else pd.Series("", index=shown.index)
            shown["explained"] = ["; ".join(x for x in (a, b) if x) for a, b in zip(prev, mark)]
        body.append(_detail_table(shown, "All failing rows", "failures.csv"))
    body.append(_gallery_block(ctx))
    return Section("failures", title, "\n".join(body))


def _gallery_block(ctx: ReportContext) -> str:
    out = ["<h3 id='gallery'>Gallery</h3>"]
    gallery_dir = ctx.gallery_dir
    if gallery_dir is None:
        out.append("<p class='missing'>No gallery folder was given.</p>")
        return "\n".join(out)
    if not gallery_dir.is_dir():
        raise ValueError(f"{gallery_dir}: gallery folder not found")
    index_path = gallery_dir / "index.csv"
    index = _load(index_path, "gallery index") if index_path.is_file() else None
    out.append("<p class='note'>Reference: solid blue (#0072B2); prediction: dashed orange (#E69F00). Radiological "
               "convention: patient left on image right (axial seen from the feet, coronal from the front; sagittal "
               "anterior on the left). Windows by structure: lungs and airways W1500/L−600, bones W1800/L400, brain "
               "W80/L40, everything else W400/L40.</p>")
    if index is not None and "montage" in index.columns:
        names = [str(m) for m in index["montage"].dropna().unique() if str(m)]
    else:
        names = sorted(p.name for p in gallery_dir.glob("*.png"))
    for name in names:
        path = gallery_dir / name
        if not path.is_file():
            out.append(f"<p class='missing'>{_e(name)} is listed in index.csv but not found.</p>")
            continue
        png = path.read_bytes()
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError(f"{path}: not a PNG file")
        structure = Path(name).stem
        n = int((index["montage"].astype(str) == name).sum()) if index is not None and "montage" in index.columns else None
        summary = f"<b>{_e(structure)}</b>" + (f" <span class='note'>{n} tiles</span>" if n is not None else "")
        out.append(_details(summary, _img(png, f"failure cases of {structure}"), id=f"g-{_slug(structure)}"))
    if not names:
        out.append("<p class='missing'>The gallery folder holds no montages.</p>" if index is None or len(index)
                   else "<p>No failures to draw.</p>")
    if index is not None:
        keep = [c for c in ("structure", "centre", "model", "condition", "case", "status", "dsc", "hd95", "dsc_drop",
                            "reason", "drawn", "note", "montage", "panel", "plane", "slice_index", "ref_islands",
                            "ref_small_islands", "ref_smallest_island_voxels") if c in index.columns]
        out.append(_detail_table(index[keep] if keep else index, "Gallery index", "gallery_index.csv", full=index))
    return "\n".join(out)


def _section_provenance(ctx: ReportContext) -> Section:
    import matplotlib
    import scipy

    from oarbench import __version__

    env = {
        "oarbench": __version__, "python": platform.python_version(), "numpy": np.__version__,
        "pandas": pd.__version__, "scipy": scipy.__version__, "matplotlib": matplotlib.__version__,
    }
    body = ["<p>Report built with " + _e(", ".join(f"{k} {v}" for k, v in env.items())) + ".</p>"]
    if ctx.provenance is None:
        body.append("<p class='missing'>No run record was given (run.json).</p>")
    else:
        flat = list(_flatten(ctx.provenance))
        if flat:
            body.append(_detail_table(pd.DataFrame(flat, columns=["key", "value"]), "Run record (run.json): versions, "
                                      "options, input hashes", "run_record.csv", text_cols=["key", "value"]))
    return Section("provenance", "Provenance", "\n".join(body))


def _section_paper(ctx: ReportContext) -> Section:
    """The manuscript's tables and methods paragraph (generated by :mod:`oarbench.stats.paper`)."""
    from oarbench.stats.paper import METRIC_LABELS, methods_paragraph, paper_table, paper_table_latex, paper_table_wide

    metrics = [m for m in ("dsc", "hd95", "msd") if m in ctx.table.columns]
    paper = ctx.cached("paper", lambda: paper_table(ctx.table, ctx.stats, metrics=metrics,
                                                    trained_on=ctx.options.trained_on))
    body = ["<p>Per structure and metric: median (Q1-Q3) [bootstrap 95% interval of the median, resampling "
            "patients] for each model on each centre, with the numbers of patients and scans; letters mark the "
            "models a cell is significantly better than (paired tests of stats.csv after correction). The same "
            "tables as CSV and LaTeX (booktabs) are below; <code>oarbench stats</code> writes them as files.</p>"]
    if ctx.stats is not None and not ctx.stats.empty and "family" in ctx.stats.columns:
        fam = ", ".join(sorted(set(ctx.stats["family"].dropna().astype(str))))
        corr = ", ".join(sorted(set(ctx.stats["correction"].dropna().astype(str))))
        unit = ", ".join(sorted(set(ctx.stats["unit"].dropna().astype(str)))) if "unit" in ctx.stats.columns else ""
        body.append(f"<p>Multiple comparisons: {_e(corr)} within the <b>{_e(fam)}</b> family "
                    "(comparison: one model pair on one centre, or one model across a pair of centres; study: every "
                    f"test of the run). Unit of analysis: {_e(unit or 'not stated')}.</p>")
    res = list((ctx.provenance or {}).get("resolution_warnings") or [])
    if res:
        body.append("<p class='missing'>Resolution: " + "; ".join(_e(w) for w in res) + "</p>")
    if paper.empty:
        body.append("<p class='missing'>No scored rows for the paper tables.</p>")
    else:
        body.append(_csv_link(paper, "paper_table.csv"))
        letters = ", ".join(f"{'abcdefghijklmnopqrstuvwxyz'[i]}: {m}" for i, m in enumerate(dict.fromkeys(paper["model"]))
                            if i < 26)
        for metric in metrics:
            wide = paper_table_wide(paper, metric)
            body.append(f"<h3>{_e(METRIC_LABELS.get(metric, metric))}</h3>"
                        + _html_table(wide, text_cols=list(wide.columns)))
        body.append(f"<p class='note'>Letters: {_e(letters)}.</p>")
        body.append(_details("LaTeX (booktabs)", f"<pre>{_e(paper_table_latex(paper))}</pre>"))
    body.append("<h3>Methods</h3><p>" + _e(methods_paragraph(ctx.provenance, ctx.stats)) + "</p>")
    return Section("paper", "Paper tables", "\n".join(body))


#: The report's sections in page order; each builder takes the :class:`ReportContext`.
SECTIONS: list[Callable[[ReportContext], Section]] = [
    _section_headline,
    _section_paper,
    _section_accuracy,
    _section_robustness,
    _section_absent,
    _section_failures,
    _section_provenance,
]


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
    noise_floor: pd.DataFrame | str | Path | None = None,
    absent_pairs: pd.DataFrame | str | Path | None = None,
    options: ReportOptions | None = None,
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
        The statistics table (``stats.csv``); summarised per comparison, every row
        in a collapsible table with ``p_adjusted < 0.05`` marked.
    robustness:
        Results rows under robustness conditions (``robustness.csv``, results-table
        columns); when None, the non-original rows of ``table`` are used.
    absent:
        The absent-organ table (``absent.csv``); false-positive rates per model
        and threshold are computed from it.
    gallery_dir:
        A folder written by :func:`oarbench.gallery.build_gallery`.
    provenance:
        The run record (dict or path to ``run.json``): versions, options, input hashes.
    noise_floor:
        The robustness noise floor (``noise_floor.csv``).
    absent_pairs:
        The between-model tests of the absent-organ analysis (``absent_pairs.csv``);
        computed from ``absent`` when not given.
    options:
        Thresholds and flags (:class:`ReportOptions`).
    filename:
        Name of the HTML file.
    title:
        Page title (default from the study name).
    notes:
        Lines shown under the title (e.g. which inputs were not found).
    box_plots:
        Draw the box plots (the slowest part; off for quick tests).
    """
    from oarbench.tables import check_keys, read_table

    if table is None:
        raise ValueError("results table: none given")
    tbl = table if isinstance(table, pd.DataFrame) else read_table(table)
    missing = [c for c in ("centre", "model", "case", "structure", "status") if c not in tbl.columns]
    if missing:
        raise ValueError(f"results table: missing column(s) {', '.join(missing)}")
    check_keys(tbl, "results table")
    opts = options if options is not None else ReportOptions()
    if not box_plots:
        opts = replace(opts, box_plots=False)
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
    ctx = ReportContext(
        table=_normalise(tbl),
        stats=_load(stats, "statistics table"),
        robustness=robustness if robustness is None or isinstance(robustness, pd.DataFrame)
        else read_table(robustness, what="robustness table"),
        noise_floor=_load(noise_floor, "noise-floor table"),
        absent=_load(absent, "absent-organ table"),
        absent_pairs=_load(absent_pairs, "absent-organ pairs table"),
        gallery_dir=Path(gallery_dir) if gallery_dir is not None else None,
        provenance=prov,
        options=opts,
    )
    _ = ctx.criteria  # read the gallery's selection.json early: a broken one is an input error
    if title is None:
        studies = sorted(set(ctx.table["study"]) - {"(not given)"}) if "study" in ctx.table.columns else []
        title = f"oarbench report: {', '.join(studies)}" if studies else "oarbench report"

    sections = [build(ctx) for build in SECTIONS]
    nav = "<nav>" + "".join(f"<a href='#{_e(s.id)}'>{_e(s.title.split(':')[0])}</a>" for s in sections) + "</nav>"
    note_html = "".join(f"<p class='missing'>{_e(n)}</p>" for n in notes)
    doc = (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n{note_html}\n{nav}\n" + "\n".join(s.html() for s in sections) + "\n</body>\n</html>\n"
    )
    from oarbench.io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / filename, doc)
