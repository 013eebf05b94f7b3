"""Statistics on the results table: paired and cross-centre comparisons.

Reads only the tidy results table (one row per case x structure x model x condition, see
docs/statistics.md) and answers two questions per structure and metric:

* **paired** (same patients): is model A better than model B on the patients of one test
  centre? Wilcoxon signed-rank test on the per-patient differences ``A - B``, matched-pairs
  rank-biserial correlation, Hodges-Lehmann shift with a confidence interval, bootstrap
  intervals of the median and mean difference, and optionally a one-sided non-inferiority
  test against a declared margin (ICH E9 / CONSORT: one-sided alpha 0.025 with the matching
  two-sided 95 % interval).
* **cross-centre** (different patients): does one model do better on centre X's patients than
  on centre Y's? Mann-Whitney U (Wilcoxon rank-sum) test, rank-biserial correlation and the
  two-sample Hodges-Lehmann shift.

The unit of analysis is the patient by default (a patient's scans are averaged per structure,
:mod:`oarbench.stats.clusters`); p-values are corrected within families
(:mod:`oarbench.stats.families`). Failed segmentations are never dropped: ``missed``,
``hallucinated`` and ``missing`` rows enter as the worst value of the metric (DSC/surface DSC 0,
distances ``inf``). Distances are in mm, like the table they come from.
"""

from __future__ import annotations

import math
import warnings
from itertools import combinations
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from oarbench.stats.bootstrap import BootstrapOptions, bootstrap_ci, cluster_bootstrap_ci
from oarbench.stats.clusters import UNITS, aggregate_by_patient, patient_differences, patients_of, warn_if_clustered
from oarbench.stats.families import CORRECTIONS, FAMILIES, apply_correction
from oarbench.stats.ranktests import (
    ZERO_METHODS,
    _signed_rank_ci,
    paired_differences,
    quantile_inf,
    rank_sum_test,
    signed_rank_test,
)

__all__ = [
    "METRIC_DIRECTIONS",
    "DEFAULT_METRICS",
    "COLUMNS",
    "ONE_ARM_ABSENT_COLUMNS",
    "read_results",
    "paired_comparisons",
    "centre_comparisons",
    "one_arm_absent",
    "run_stats",
    "write_stats",
]

#: True where higher is better (DSC, surface DSC, volumetric similarity), False where lower is
#: better (distances and added path length, mm).
METRIC_DIRECTIONS: dict[str, bool] = {
    "dsc": True,
    "sdsc": True,
    "hd95": False,
    "hd": False,
    "msd": False,
    "assd": False,
    "vs": True,
    "centroid_mm": False,
    "apl_mm": False,
    "apl_mm_per_slice": False,
}
#: Metrics compared when the caller names none.
DEFAULT_METRICS: tuple[str, ...] = ("dsc", "hd95", "msd")

_STATUSES = ("ok", "missed", "hallucinated", "absent", "missing")
_WORST_STATUSES = ("missed", "hallucinated", "missing")
_REQUIRED = ("model", "case", "structure", "status")
#: Metrics whose value is defined for a missed or hallucinated structure (evaluate writes it):
#: added path length (the whole reference contour, or 0) and volumetric similarity (0).
_DEFINED_ON_FAILURE = frozenset({"apl_mm", "apl_mm_per_slice", "vs"})
_ID_COLUMNS = ("study", "centre", "model", "condition", "case", "patient", "structure", "status")


# ---------------------------------------------------------------------------
# Reading and checking the table
# ---------------------------------------------------------------------------


def read_results(path: str | Path) -> pd.DataFrame:
    """Read a results CSV (``inf`` for failed distances, empty for NaN), or a
    ``metrics.parquet`` dataset, with :func:`oarbench.tables.read_table`: key
    columns as text and never empty, the file checked against its run record.

    Raises
    ------
    FileNotFoundError, ValueError
        naming ``path`` when it is missing, unreadable, lacks the required columns or has an empty key.
    """
    from oarbench.tables import read_table

    try:
        return read_table(path, required=_REQUIRED)
    except ValueError as exc:
        if "missing required column" not in str(exc):
            raise
        raise ValueError(f"{exc}; give the metrics.csv (or metrics.parquet) that `oarbench evaluate` wrote, "
                         "one row per case x structure") from None


def _prepare(table: pd.DataFrame, metrics: Sequence[str], condition: str | None, source: str,
             allow_no_metrics: bool = False) -> pd.DataFrame:
    """Validate and normalise the table: column checks, condition filter, numeric metrics, patients."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{source}: expected a pandas DataFrame, got {type(table).__name__}")
    metrics = list(metrics)
    if not metrics and not allow_no_metrics:
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
    t["patient"] = patients_of(t, source)
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
    fail = np.isin(s, _WORST_STATUSES)
    if metric in _DEFINED_ON_FAILURE:  # computed for a failed structure: keep it where present
        fail &= np.isnan(v)
    v[fail] = _worst(metric)
    v[s == "absent"] = math.nan
    return v


def _describe(v: np.ndarray, arm: str) -> dict[str, float]:
    return {f"median_{arm}": quantile_inf(v, 0.5), f"q1_{arm}": quantile_inf(v, 0.25), f"q3_{arm}": quantile_inf(v, 0.75)}


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


def _check_options(zero_method: str, correction: str, alpha: float, ni_alpha: float = 0.025,
                   unit: str = "patient", family: str = "comparison") -> None:
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if not 0.0 < ni_alpha < 0.5:
        raise ValueError(f"ni_alpha (one-sided) must be in (0, 0.5), got {ni_alpha}")
    if zero_method not in ZERO_METHODS:
        raise ValueError(f"zero_method must be one of {', '.join(ZERO_METHODS)}, got {zero_method!r}")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")



def _bounds(values: np.ndarray, patients: np.ndarray, unit: str, statistic: str,
            boot: BootstrapOptions | None) -> tuple[float, float]:
    """Bootstrap interval resampling patients: ordinary bootstrap of one value per patient,
    cluster bootstrap of scan values."""
    if boot is None or values.size == 0:
        return math.nan, math.nan
    if unit == "patient":
        return bootstrap_ci(values, statistic, boot)
    return cluster_bootstrap_ci(values, patients, statistic, boot)


def _units(va: np.ndarray, vb: np.ndarray, patients: np.ndarray, unit: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-unit arm values: patient means (unit ``patient``) or the scans themselves."""
    if unit == "scan":
        return va, vb, patients
    ma, ids = aggregate_by_patient(va, patients)
    mb, _ = aggregate_by_patient(vb, patients)
    return ma, mb, ids


def _diff_summary(d: np.ndarray, clusters: np.ndarray, unit: str, boot: BootstrapOptions | None) -> dict:
    from oarbench.stats.bootstrap import mean_inf, median_inf

    out = {"diff_median": median_inf(d) if d.size else math.nan,
           "diff_mean": mean_inf(d) if d.size else math.nan}
    for stat in ("median", "mean"):
        lo, hi = _bounds(d, clusters, unit, stat, boot)
        out[f"diff_{stat}_ci_low"], out[f"diff_{stat}_ci_high"] = lo, hi
    return out


# ---------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------

#: Column order of the output (both analyses share it; unused cells are NaN/empty).
COLUMNS: tuple[str, ...] = (
    "analysis", "study", "condition", "centre", "model", "comparison", "arm_a", "arm_b",
    "structure", "metric", "higher_is_better", "unit", "n_patients", "n_scans", "n", "n_a", "n_b",
    "n_missed_a", "n_hallucinated_a", "n_missing_a", "n_missed_b", "n_hallucinated_b", "n_missing_b",
    "n_absent", "n_absent_one_arm", "n_unpaired", "n_inf", "n_zero",
    "median_a", "q1_a", "q3_a", "median_b", "q1_b", "q3_b",
    "diff_median", "diff_median_ci_low", "diff_median_ci_high",
    "diff_mean", "diff_mean_ci_low", "diff_mean_ci_high", "bootstrap",
    "test", "zero_method", "p_method", "statistic", "p", "p_adjusted", "correction", "family", "family_size",
    "rank_biserial", "hl_shift", "ci_low", "ci_high", "ci_level", "ci_method", "verdict",
    "margin", "ni_alpha", "ni_ci_low", "ni_ci_high", "ni_ci_level",
    "statistic_noninferiority", "p_noninferiority", "p_noninferiority_adjusted",
    "noninferior", "noninferiority_verdict",
)


def _boot_label(boot: BootstrapOptions | None) -> str:
    if boot is None or boot.n_resamples == 0:
        return ""
    return (f"{boot.method} {100 * boot.confidence:g}%, {boot.n_resamples} resamples of patients, "
            f"seed {boot.seed}")


def _finish(rows: list[dict], correction: str, alpha: float, family: str | None) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(columns=list(COLUMNS))
    df = pd.DataFrame(rows)
    if family is not None:
        df = apply_correction(df, family=family, correction=correction, alpha=alpha)
    return df


def _select(df: pd.DataFrame) -> pd.DataFrame:
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
    ni_alpha: float = 0.025,
    condition: str | None = "original",
    confidence: float = 0.95,
    unit: str = "patient",
    family: str = "comparison",
    bootstrap: BootstrapOptions | None = BootstrapOptions(),
    source: str = "results table",
    _correct: bool = True,
) -> pd.DataFrame:
    """Wilcoxon signed-rank comparisons of model pairs on identical patients.

    For each (study, condition, test centre), model pair ``(a, b)``, structure and metric,
    the scans both models have are paired; by default (``unit="patient"``) each arm's values
    are averaged per patient and ``d = a - b`` per patient is tested (two-sided).

    Pairing rules (docs/statistics.md): pairs where both arms are ``absent`` are dropped
    (``n_absent``); ``missed``/``hallucinated``/``missing`` take the worst value (DSC/surface
    DSC 0, distances inf); an ``absent`` arm facing a non-absent one (the other model
    hallucinated an organ that is not there) takes the best value in the *test* (DSC 1,
    distance 0 mm; ``n_absent_one_arm``) but not in the medians/IQRs, which describe the
    pairs with the organ present in both arms; :func:`one_arm_absent` lists those rows.

    Parameters
    ----------
    table : the results table (see :func:`read_results`).
    pairs : model pairs, as ``("fl", "local-A")`` tuples or ``"fl:local-A"`` strings; default
        all pairs in order of first appearance in the table.
    metrics : metric columns (keys of :data:`METRIC_DIRECTIONS`).
    zero_method : passed to :func:`scipy.stats.wilcoxon` (``pratt``, ``wilcox``, ``zsplit``).
    correction : :func:`statsmodels.stats.multitest.multipletests` method.
    alpha : two-sided significance level for verdicts (on adjusted p-values).
    margins : non-inferiority margins per metric in the metric's unit (e.g. ``{"dsc": 0.01,
        "hd95": 1.0}`` mm): arm ``a`` is tested for non-inferiority to arm ``b``.
    ni_alpha : one-sided level of the non-inferiority test (ICH E9: 0.025); the interval shown
        with it is the two-sided ``1 - 2 ni_alpha`` Hodges-Lehmann interval.
    condition : only rows of this condition (default ``original``); ``None``: each separately.
    confidence : coverage of the Hodges-Lehmann interval of the two-sided comparison.
    unit : ``patient`` (default; scans averaged per patient) or ``scan`` (warns when a patient
        has several scans).
    family : ``comparison`` (one family per centre x model pair) or ``study`` (all tests).
    bootstrap : bootstrap options for the intervals of the median and mean difference
        (resampling patients); ``None``: no intervals.
    source : name used in error messages (the CSV path).

    Returns
    -------
    pandas.DataFrame with the columns :data:`COLUMNS`, one row per comparison.
    """
    _check_options(zero_method, correction, alpha, ni_alpha, unit, family)
    margins = _check_margins(margins)
    t = _prepare(table, metrics, condition, source)
    warn_if_clustered(t, unit, source)
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
                base = dict(analysis="paired", study=study, condition=cond, centre=centre, model="",
                            comparison=f"{a} vs {b}", arm_a=a, arm_b=b, structure=structure,
                            n_unpaired=n_unpaired)
                for metric in metrics:
                    rows.append(_paired_row(
                        ga.loc[idx], gb.loc[idx], metric, margins.get(metric, math.nan), zero_method,
                        confidence, ni_alpha, unit, bootstrap, base,
                    ))
    df = _finish(rows, correction, alpha, family if _correct else None)
    return _select(df) if _correct and not df.empty else df


def _paired_row(ga: pd.DataFrame, gb: pd.DataFrame, metric: str, margin: float, zero_method: str,
                confidence: float, ni_alpha: float, unit: str, boot: BootstrapOptions | None,
                base: dict) -> dict:
    sa, sb = ga["status"].to_numpy(), gb["status"].to_numpy()
    va = _arm_values(ga["status"], ga[metric], metric)
    vb = _arm_values(gb["status"], gb[metric], metric)
    patients = ga["patient"].to_numpy(dtype=object)
    na, nb = np.isnan(va), np.isnan(vb)
    both_absent = na & nb
    one_absent = na ^ nb
    va[na & ~nb] = _best(metric)
    vb[nb & ~na] = _best(metric)
    keep = ~both_absent
    va, vb, sa, sb, patients, one = va[keep], vb[keep], sa[keep], sb[keep], patients[keep], one_absent[keep]
    if unit == "scan":
        d, clusters = paired_differences(va, vb), patients
    else:  # mean of each patient's scan differences (docs/statistics.md, "Infinite distances")
        d, clusters = patient_differences(paired_differences(va, vb), patients)
    res = signed_rank_test(d, zero_method=zero_method, confidence=confidence)
    # medians/IQRs describe the pairs with the organ in both arms (no imputed best values)
    da, db, _ = _units(va[~one], vb[~one], patients[~one], unit)
    higher = METRIC_DIRECTIONS[metric]
    row = dict(base)
    row.update(
        metric=metric, higher_is_better=higher, unit=unit,
        n_patients=int(len(set(patients.tolist()))), n_scans=int(va.size),
        n=res.n, n_a=res.n, n_b=res.n,
        **_status_counts(sa, "a"), **_status_counts(sb, "b"),
        n_absent=int(both_absent.sum()), n_absent_one_arm=int(one_absent.sum()),
        n_inf=res.n_inf, n_zero=res.n - res.n_nonzero,
        **_describe(da, "a"), **_describe(db, "b"),
        **_diff_summary(d, clusters, unit, boot), bootstrap=_boot_label(boot),
        test="wilcoxon signed-rank", zero_method=zero_method, p_method=res.p_method,
        statistic=res.statistic, p=res.p, testable=res.testable, reason=res.reason,
        rank_biserial=res.rank_biserial, hl_shift=res.hl_shift, ci_low=res.ci_low,
        ci_high=res.ci_high, ci_level=res.ci_level, ci_method=res.ci_method, margin=margin,
        ni_alpha=ni_alpha if not math.isnan(margin) else math.nan,
        ni_ci_low=math.nan, ni_ci_high=math.nan, ni_ci_level=math.nan,
        statistic_noninferiority=math.nan, p_noninferiority=math.nan, ni_testable=False, ni_reason="",
    )
    if not math.isnan(margin):
        # H0: a is worse than b by at least the margin. Higher-better: median(a - b) <= -margin,
        # so test d + margin > 0; lower-better: median(a - b) >= margin, so test d - margin < 0.
        shifted = d + margin if higher else d - margin
        ni = signed_rank_test(shifted, zero_method=zero_method, confidence=1.0 - 2.0 * ni_alpha,
                              alternative="greater" if higher else "less")
        lo, hi, level, _ = _signed_rank_ci(d, 1.0 - 2.0 * ni_alpha) if d.size else (math.nan,) * 4
        row.update(statistic_noninferiority=ni.statistic, p_noninferiority=ni.p,
                   ni_testable=ni.testable, ni_reason=ni.reason,
                   ni_ci_low=lo, ni_ci_high=hi, ni_ci_level=level)
    return row


def one_arm_absent(
    table: pd.DataFrame,
    *,
    pairs: Sequence[tuple[str, str]] | Sequence[str] | None = None,
    condition: str | None = "original",
    source: str = "results table",
) -> pd.DataFrame:
    """Scans where one model of a pair says ``absent`` and the other does not.

    These are reported apart: the model that returned nothing is right when the organ is not
    there (the other hallucinated it), and neither arm has a metric value worth a median. One
    row per (study, condition, centre, pair, case, structure) with both statuses.
    """
    t = _prepare(table, (), condition, source, allow_no_metrics=True)
    models = _order(t["model"])
    pair_list = _parse_pairs(pairs, models, source)
    out = []
    for (study, cond, centre), grp in t.groupby(["study", "condition", "centre"], sort=False):
        for a, b in pair_list:
            ga = grp[grp["model"] == a].set_index(["case", "structure"])
            gb = grp[grp["model"] == b].set_index(["case", "structure"])
            both = ga.index.intersection(gb.index, sort=False)
            sa = ga.loc[both, "status"].to_numpy()
            sb = gb.loc[both, "status"].to_numpy()
            sel = (sa == "absent") ^ (sb == "absent")
            for (case, structure), x, y, p in zip(both[sel], sa[sel], sb[sel],
                                                   ga.loc[both, "patient"].to_numpy()[sel]):
                out.append(dict(study=study, condition=cond, centre=centre, comparison=f"{a} vs {b}",
                                arm_a=a, arm_b=b, structure=structure, case=case, patient=p,
                                status_a=x, status_b=y))
    return pd.DataFrame(out, columns=list(ONE_ARM_ABSENT_COLUMNS))


#: Columns of :func:`one_arm_absent`.
ONE_ARM_ABSENT_COLUMNS: tuple[str, ...] = (
    "study", "condition", "centre", "comparison", "arm_a", "arm_b", "structure", "case", "patient",
    "status_a", "status_b",
)


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
    unit: str = "patient",
    family: str = "comparison",
    source: str = "results table",
    _correct: bool = True,
) -> pd.DataFrame:
    """Mann-Whitney U comparisons of one model's results on two centres' (different) patients.

    ``absent`` rows are dropped (nothing to segment; counted in ``n_absent``), failures enter
    with the worst value; with ``unit="patient"`` each patient's scans are averaged first. The
    ``comparison`` family is one (study, condition, model, centre pair) over all structures and
    metrics. Arm ``a`` is the first centre of the pair.
    """
    _check_options(ZERO_METHODS[0], correction, alpha, 0.025, unit, family)
    t = _prepare(table, metrics, condition, source)
    warn_if_clustered(t, unit, source)
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
                        rows.append(_centre_row(xa, xb, metric, confidence, unit, dict(
                            analysis="cross-centre", study=study, condition=cond, centre="", model=model,
                            comparison=f"{ca} vs {cb}", arm_a=ca, arm_b=cb, structure=structure)))
    df = _finish(rows, correction, alpha, family if _correct else None)
    return _select(df) if _correct and not df.empty else df


def _centre_row(xa: pd.DataFrame, xb: pd.DataFrame, metric: str, confidence: float, unit: str, base: dict) -> dict:
    va = _arm_values(xa["status"], xa[metric], metric)
    vb = _arm_values(xb["status"], xb[metric], metric)
    pa, pb = xa["patient"].to_numpy(dtype=object), xb["patient"].to_numpy(dtype=object)
    n_absent = int(np.isnan(va).sum() + np.isnan(vb).sum())
    ka, kb = ~np.isnan(va), ~np.isnan(vb)
    va, vb, pa, pb = va[ka], vb[kb], pa[ka], pb[kb]
    n_patients = len(set(pa.tolist())) + len(set(pb.tolist()))
    n_scans = int(va.size + vb.size)
    if unit == "patient":
        va, _ = aggregate_by_patient(va, pa)
        vb, _ = aggregate_by_patient(vb, pb)
    res = rank_sum_test(va, vb, confidence=confidence)
    row = dict(base)
    row.update(
        metric=metric, higher_is_better=METRIC_DIRECTIONS[metric], unit=unit,
        n_patients=n_patients, n_scans=n_scans, n=res.n1 + res.n2, n_a=res.n1, n_b=res.n2,
        **_status_counts(xa["status"].to_numpy()[ka], "a"), **_status_counts(xb["status"].to_numpy()[kb], "b"),
        n_absent=n_absent, n_absent_one_arm=0, n_unpaired=0, n_inf=res.n_inf,
        n_zero=0, **_describe(va, "a"), **_describe(vb, "b"),
        diff_median=math.nan, diff_median_ci_low=math.nan, diff_median_ci_high=math.nan,
        diff_mean=math.nan, diff_mean_ci_low=math.nan, diff_mean_ci_high=math.nan, bootstrap="",
        test="mann-whitney u", zero_method="", p_method=res.p_method,
        statistic=res.statistic, p=res.p, testable=res.testable, reason=res.reason,
        rank_biserial=res.rank_biserial, hl_shift=res.hl_shift, ci_low=res.ci_low,
        ci_high=res.ci_high, ci_level=res.ci_level, ci_method=res.ci_method,
        margin=math.nan, ni_alpha=math.nan, ni_ci_low=math.nan, ni_ci_high=math.nan, ni_ci_level=math.nan,
        statistic_noninferiority=math.nan, p_noninferiority=math.nan, ni_testable=False, ni_reason="",
    )
    return row


def run_stats(
    table: pd.DataFrame,
    *,
    pairs: Sequence[tuple[str, str]] | Sequence[str] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    zero_method: str = "pratt",
    correction: str = "holm",
    alpha: float = 0.05,
    margins: Mapping[str, float] | None = None,
    ni_alpha: float = 0.025,
    condition: str | None = "original",
    confidence: float = 0.95,
    unit: str = "patient",
    family: str = "comparison",
    bootstrap: BootstrapOptions | None = BootstrapOptions(),
    source: str = "results table",
    observers: Sequence[str] = (),
) -> pd.DataFrame:
    """Paired comparisons followed by cross-centre comparisons, in one table.

    ``family="comparison"``: each analysis is corrected within its own families (see
    :func:`paired_comparisons` and :func:`centre_comparisons`); ``family="study"``: every test
    of the run (paired and cross-centre) forms one family.

    ``observers``: models of the table that are a second observer's contours (the human
    baseline). They leave the model pairs and the cross-centre analysis; instead every other
    model is compared with each observer on the same patients (``analysis = "observer"``, arm a
    the model, arm b the observer): the signed-rank test, and with a margin the
    non-inferiority of the model to the observer (docs/statistics.md, "The human baseline").
    """
    _check_options(zero_method, correction, alpha, ni_alpha, unit, family)
    observers = list(dict.fromkeys(observers))
    if observers:
        present = _order(_prepare(table, metrics, condition, source)["model"])
        unknown = [o for o in observers if o not in present]
        if unknown:
            raise ValueError(f"{source}: observer(s) {', '.join(unknown)} not in the table "
                             f"(models: {', '.join(present)})")
        others = [m for m in present if m not in observers]
        if pairs is None:
            pairs = [f"{a}:{b}" for a, b in combinations(others, 2)]
    else:
        others = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warned once below, not per analysis
        paired = paired_comparisons(table, pairs=pairs, metrics=metrics, zero_method=zero_method,
                                    correction=correction, alpha=alpha, margins=margins, ni_alpha=ni_alpha,
                                    condition=condition, confidence=confidence, unit=unit, family=family,
                                    bootstrap=bootstrap, source=source, _correct=False) \
            if pairs is None or len(pairs) else pd.DataFrame()
        cross = centre_comparisons(table, models=others, metrics=metrics, correction=correction, alpha=alpha,
                                   condition=condition, confidence=confidence, unit=unit, family=family,
                                   source=source, _correct=False)
        human = pd.DataFrame()
        if observers and others:
            human = paired_comparisons(table, pairs=[f"{m}:{o}" for m in others for o in observers], metrics=metrics,
                                       zero_method=zero_method, correction=correction, alpha=alpha, margins=margins,
                                       ni_alpha=ni_alpha, condition=condition, confidence=confidence, unit=unit,
                                       family=family, bootstrap=bootstrap, source=source, _correct=False)
            if not human.empty:
                human["analysis"] = "observer"
    warn_if_clustered(_prepare(table, metrics, condition, source), unit, source)
    frames = [f for f in (paired, cross, human) if not f.empty]
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS))
    df = apply_correction(pd.concat(frames, ignore_index=True), family=family, correction=correction, alpha=alpha)
    return _select(df)


def write_stats(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the statistics table as CSV atomically (temp file in the same folder, then rename)."""
    from oarbench.io import atomic_write_text
    from oarbench.tables import csv_text

    return atomic_write_text(path, csv_text(df))
