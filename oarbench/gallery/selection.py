"""Which rows of a results table a failure-case gallery shows, and why.

Only rows where something failed are selected: DSC below a stated threshold,
HD95 above a stated threshold, Tukey outliers, missed or hallucinated
structures, laterality swaps and DSC drops under robustness conditions above a
stated size. A table in which nothing failed gives an empty selection; a
perfect row (DSC 1, HD95 0 mm) is never selected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

__all__ = ["REASONS", "FailureCriteria", "select_failures"]

#: Selection reasons, in the order they are listed in the ``reason`` column.
REASONS: tuple[str, ...] = (
    "missed",
    "hallucinated",
    "laterality_swap",
    "low_dsc",
    "high_hd95",
    "outlier_dsc",
    "outlier_hd95",
    "robustness_drop",
)

_ORIGINAL = "original"
_GROUP = ["structure", "model", "centre"]
_KEY = ["centre", "model", "condition", "case", "structure"]
_REQUIRED = ("centre", "model", "case", "structure", "status", "dsc", "hd95")


@dataclass(frozen=True)
class FailureCriteria:
    """What counts as a failure (the thresholds a gallery or report states).

    Attributes
    ----------
    dsc_below:
        An ``ok`` row with DSC strictly below this fails (``None``: rule off).
    hd95_above:
        An ``ok`` row with HD95 strictly above this many mm fails (``None``: rule off).
    drop_above:
        A row under a robustness condition whose DSC is lower than the same
        case's original DSC by strictly more than this fails (``None``: rule off).
    tukey_factor:
        Fence factor of the outlier rule (1.5 = Tukey's inner fences; ``None``: rule off).
    outlier_min_dsc, outlier_min_hd95:
        An outlier must also be this much worse than its group's median (DSC lower
        by at least ``outlier_min_dsc``, HD95 higher by at least ``outlier_min_hd95``
        mm), so that a DSC of 0.996 among 0.999s is not called a failure.
    k:
        At most this many rows per structure x model x centre for each of the
        threshold rules (and per condition for drops), worst first; ``None``: all.
    """

    dsc_below: float | None = 0.7
    hd95_above: float | None = 10.0
    drop_above: float | None = 0.1
    tukey_factor: float | None = 1.5
    outlier_min_dsc: float = 0.05
    outlier_min_hd95: float = 2.0
    k: int | None = 3

    def __post_init__(self) -> None:
        if self.k is not None and (not isinstance(self.k, (int, np.integer)) or self.k < 1):
            raise ValueError(f"k must be a whole number of at least 1 (or None), got {self.k!r}")
        for name in ("dsc_below", "hd95_above", "drop_above", "tukey_factor", "outlier_min_dsc", "outlier_min_hd95"):
            v = getattr(self, name)
            if v is not None and (not np.isfinite(float(v)) or float(v) < 0):
                raise ValueError(f"{name} must be a finite number >= 0 (or None), got {v!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FailureCriteria":
        names = ("dsc_below", "hd95_above", "drop_above", "tukey_factor", "outlier_min_dsc", "outlier_min_hd95", "k")
        known = {k: data[k] for k in names if k in data}
        return cls(**known)

    def describe(self) -> str:
        """One sentence naming every rule, for reports and galleries."""
        rules = ["missed or hallucinated structures", "laterality swaps"]
        if self.dsc_below is not None:
            rules.append(f"DSC < {self.dsc_below:g}")
        if self.hd95_above is not None:
            rules.append(f"HD95 > {self.hd95_above:g} mm")
        if self.tukey_factor is not None:
            rules.append(f"Tukey outliers (DSC below Q1 − {self.tukey_factor:g}·IQR and at least {self.outlier_min_dsc:g} "
                         f"below the median, HD95 above Q3 + {self.tukey_factor:g}·IQR and at least "
                         f"{self.outlier_min_hd95:g} mm above the median, per structure, model and centre)")
        if self.drop_above is not None:
            rules.append(f"DSC drops > {self.drop_above:g} under a robustness condition")
        cap = "" if self.k is None else f" At most {self.k} rows per structure, model and centre for each threshold rule, worst first."
        return "A row is a failure case when it shows " + ", ".join(rules) + "." + cap


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "y", "t"}
    try:
        if pd.isna(value):
            return False
    except (TypeError, ValueError):
        pass
    return bool(value)


def _check_columns(table: pd.DataFrame, required: Iterable[str], what: str) -> None:
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {', '.join(missing)} (have {', '.join(map(str, table.columns))})")


def select_failures(
    table: pd.DataFrame,
    criteria: FailureCriteria | None = None,
    *,
    source: str = "results table",
) -> pd.DataFrame:
    """Rows of a results table where something failed, with the reasons why.

    Rules (thresholds from ``criteria``, default :class:`FailureCriteria`()):

    * ``low_dsc`` / ``high_hd95``: ``ok`` rows of condition ``original`` with DSC
      strictly below ``dsc_below`` / HD95 strictly above ``hd95_above`` mm; per
      structure x model x centre at most ``k`` of each, worst first (ties broken
      by case name, so the choice is deterministic);
    * ``outlier_dsc`` / ``outlier_hd95``: Tukey outliers among the same rows: DSC
      strictly below Q1 - f*IQR and at least ``outlier_min_dsc`` below the
      median, HD95 strictly above Q3 + f*IQR and at least ``outlier_min_hd95`` mm
      above the median (f = ``tukey_factor``; quartiles by linear interpolation,
      numpy's default);
    * ``missed`` / ``hallucinated``: every row with that status, any condition;
    * ``laterality_swap``: every row whose ``laterality_swap`` column (if the table
      has one) is truthy, any condition;
    * ``robustness_drop``: rows under a condition other than ``original`` whose
      DSC is lower than the same case/structure/model/centre's original DSC by
      strictly more than ``drop_above``; at most ``k`` per structure x model x
      centre x condition, largest first (rows with NaN DSC, i.e. ``absent``,
      never enter).

    Parameters
    ----------
    table:
        The results table (columns per the shared contract; ``condition`` is
        optional and taken as ``original`` when missing).
    criteria:
        Thresholds and the cap ``k``.
    source:
        Name of the table used in error messages (e.g. its file name).

    Returns
    -------
    pandas.DataFrame
        One row per selected case/structure/model/centre/condition (duplicates
        merged), the table's columns plus ``reason`` (``;``-joined reasons in the
        order of :data:`REASONS`) and ``dsc_drop`` (NaN unless a robustness drop).
        Sorted by label (when present), structure, model, centre, condition, case.
        Empty (with those columns) when nothing failed.
    """
    crit = criteria if criteria is not None else FailureCriteria()
    if not isinstance(crit, FailureCriteria):
        raise ValueError(f"criteria must be a FailureCriteria, got {type(crit).__name__}")
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{source}: expected a pandas DataFrame, got {type(table).__name__}")
    _check_columns(table, _REQUIRED, source)
    df = table.copy()
    if "condition" not in df.columns:
        df["condition"] = _ORIGINAL
    df["condition"] = df["condition"].fillna(_ORIGINAL).astype(str)
    for col in ("case", "structure", "model", "centre", "status"):
        df[col] = df[col].astype(str)
    df["dsc"] = pd.to_numeric(df["dsc"], errors="coerce")
    df["hd95"] = pd.to_numeric(df["hd95"], errors="coerce")
    df = df.reset_index(drop=True)
    dup = df.duplicated(_KEY, keep=False)
    if dup.any():
        first = df.loc[dup, _KEY].iloc[0].to_dict()
        raise ValueError(f"{source}: {int(dup.sum())} rows share case/structure/model/centre/condition, e.g. {first}")
    k = crit.k

    reasons: dict[int, set[str]] = {}
    drops: dict[int, float] = {}

    def add(index: Iterable[int], reason: str) -> None:
        for i in index:
            reasons.setdefault(int(i), set()).add(reason)

    add(df.index[df["status"] == "missed"], "missed")
    add(df.index[df["status"] == "hallucinated"], "hallucinated")
    if "laterality_swap" in df.columns:
        add(df.index[df["laterality_swap"].map(_truthy)], "laterality_swap")

    ok = df.loc[(df["status"] == "ok") & (df["condition"] == _ORIGINAL), _GROUP + ["case", "dsc", "hd95"]]
    for _, group in ok.groupby(_GROUP, sort=True):
        idx = group.index.to_numpy()
        case = group["case"].to_numpy(str)
        d = group["dsc"].to_numpy(float)
        h = group["hd95"].to_numpy(float)
        has_d, has_h = ~np.isnan(d), ~np.isnan(h)
        by_dsc = [i for i in np.lexsort((case, d)) if has_d[i]]            # ascending DSC, then case
        by_hd = [i for i in np.lexsort((case, -h)) if has_h[i]]            # descending HD95, then case
        if crit.dsc_below is not None:
            add([idx[i] for i in by_dsc if d[i] < crit.dsc_below][:k], "low_dsc")
        if crit.hd95_above is not None:
            add([idx[i] for i in by_hd if h[i] > crit.hd95_above][:k], "high_hd95")
        if crit.tukey_factor is not None:
            f = crit.tukey_factor
            if has_d.any():
                q1, med, q3 = np.percentile(d[has_d], [25, 50, 75])
                add(idx[has_d & (d < q1 - f * (q3 - q1)) & (d <= med - crit.outlier_min_dsc)], "outlier_dsc")
            fin = np.isfinite(h)
            if fin.any():
                q1, med, q3 = np.percentile(h[fin], [25, 50, 75])
                add(idx[fin & (h > q3 + f * (q3 - q1)) & (h >= med + crit.outlier_min_hd95)], "outlier_hd95")

    perturbed = df[df["condition"] != _ORIGINAL]
    if len(perturbed) and crit.drop_above is not None:
        base = df[df["condition"] == _ORIGINAL].set_index(["centre", "model", "case", "structure"])["dsc"]
        keys = pd.MultiIndex.from_frame(perturbed[["centre", "model", "case", "structure"]])
        original_dsc = base.reindex(keys).to_numpy(float)
        drop = pd.Series(original_dsc - perturbed["dsc"].to_numpy(float), index=perturbed.index)
        cand = perturbed.assign(_drop=drop)
        cand = cand[np.isfinite(cand["_drop"]) & (cand["_drop"] > crit.drop_above)]
        for _, group in cand.groupby(_GROUP + ["condition"], sort=True):
            top = group.sort_values(["_drop", "case"], ascending=[False, True], kind="mergesort").index[:k]
            add(top, "robustness_drop")
            for i in top:
                drops[int(i)] = float(group.at[i, "_drop"])

    order = {r: n for n, r in enumerate(REASONS)}
    rows = sorted(reasons)
    out = df.loc[rows].copy()
    out["reason"] = pd.Series([";".join(sorted(reasons[i], key=order.__getitem__)) for i in rows], index=out.index, dtype=object)
    out["dsc_drop"] = pd.Series([drops.get(i, np.nan) for i in rows], index=out.index, dtype=float)
    sort_cols = ["structure", "model", "centre", "condition", "case"]
    if "label" in out.columns:
        out["_label"] = pd.to_numeric(out["label"], errors="coerce")
        sort_cols = ["_label"] + sort_cols
    out = out.sort_values(sort_cols, kind="mergesort").reset_index(drop=True)
    return out.drop(columns=["_label"], errors="ignore")
