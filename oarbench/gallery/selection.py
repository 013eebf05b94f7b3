"""Which rows of a results table a failure-case gallery shows, and why."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pandas as pd

__all__ = ["REASONS", "select_failures"]

#: Selection reasons, in the order they are listed in the ``reason`` column.
REASONS: tuple[str, ...] = (
    "missed",
    "hallucinated",
    "laterality_swap",
    "lowest_dsc",
    "highest_hd95",
    "outlier_dsc",
    "outlier_hd95",
    "robustness_drop",
)


_ORIGINAL = "original"
_GROUP = ["structure", "model", "centre"]
_KEY = ["centre", "model", "condition", "case", "structure"]
_REQUIRED = ("centre", "model", "case", "structure", "status", "dsc", "hd95")


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
    k: int = 3,
    *,
    tukey_factor: float = 1.5,
    source: str = "results table",
) -> pd.DataFrame:
    """Rows of a results table worth looking at, with the reasons why.

    Selection is made per structure x model x centre:

    * ``lowest_dsc`` / ``highest_hd95``: the ``k`` rows with the lowest DSC and the
      ``k`` rows with the highest HD95 (mm) among ``ok`` rows of condition
      ``original`` (ties broken by case name, so the choice is deterministic);
    * ``outlier_dsc`` / ``outlier_hd95``: Tukey outliers among the same rows: DSC
      strictly below Q1 - f*IQR, HD95 strictly above Q3 + f*IQR (f =
      ``tukey_factor``; quartiles by linear interpolation, numpy's default);
    * ``missed`` / ``hallucinated``: every row with that status, any condition;
    * ``laterality_swap``: every row whose ``laterality_swap`` column (if the table
      has one) is truthy, any condition;
    * ``robustness_drop``: for each condition other than ``original``, the ``k``
      rows with the largest DSC drop (original DSC minus DSC under the condition,
      same case/structure/model/centre; only drops > 0; rows with NaN DSC, i.e.
      ``absent``, never enter).

    Parameters
    ----------
    table:
        The results table (columns per the shared contract; ``condition`` is
        optional and taken as ``original`` when missing).
    k:
        How many rows per ranking (>= 1).
    tukey_factor:
        Fence factor for the outlier rule (1.5 = Tukey's inner fences).
    source:
        Name of the table used in error messages (e.g. its file name).

    Returns
    -------
    pandas.DataFrame
        One row per selected case/structure/model/centre/condition (duplicates
        merged), the table's columns plus ``reason`` (``;``-joined reasons in the
        order of :data:`REASONS`) and ``dsc_drop`` (NaN unless a robustness drop).
        Sorted by structure, model, centre, condition, case.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
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

    reasons: dict[int, set[str]] = {}
    drops: dict[int, float] = {}

    def add(index: Iterable[int], reason: str) -> None:
        for i in index:
            reasons.setdefault(int(i), set()).add(reason)

    add(df.index[df["status"] == "missed"], "missed")
    add(df.index[df["status"] == "hallucinated"], "hallucinated")
    if "laterality_swap" in df.columns:
        add(df.index[df["laterality_swap"].map(_truthy)], "laterality_swap")

    ok = df[(df["status"] == "ok") & (df["condition"] == _ORIGINAL)]
    for _, group in ok.groupby(_GROUP, sort=True):
        dsc = group.dropna(subset=["dsc"]).sort_values(["dsc", "case"], kind="mergesort")
        add(dsc.index[:k], "lowest_dsc")
        hd = group.dropna(subset=["hd95"]).sort_values(["hd95", "case"], ascending=[False, True], kind="mergesort")
        add(hd.index[:k], "highest_hd95")
        if len(dsc):
            q1, q3 = np.percentile(dsc["dsc"].to_numpy(float), [25, 75])
            add(dsc.index[dsc["dsc"] < q1 - tukey_factor * (q3 - q1)], "outlier_dsc")
        finite = hd[np.isfinite(hd["hd95"])]
        if len(finite):
            q1, q3 = np.percentile(finite["hd95"].to_numpy(float), [25, 75])
            add(finite.index[finite["hd95"] > q3 + tukey_factor * (q3 - q1)], "outlier_hd95")

    perturbed = df[df["condition"] != _ORIGINAL]
    if len(perturbed):
        base = df[df["condition"] == _ORIGINAL].set_index(["centre", "model", "case", "structure"])["dsc"]
        keys = pd.MultiIndex.from_frame(perturbed[["centre", "model", "case", "structure"]])
        original_dsc = base.reindex(keys).to_numpy(float)
        drop = pd.Series(original_dsc - perturbed["dsc"].to_numpy(float), index=perturbed.index)
        cand = perturbed.assign(_drop=drop)
        cand = cand[np.isfinite(cand["_drop"]) & (cand["_drop"] > 0)]
        for _, group in cand.groupby(_GROUP + ["condition"], sort=True):
            top = group.sort_values(["_drop", "case"], ascending=[False, True], kind="mergesort").index[:k]
            add(top, "robustness_drop")
            for i in top:
                drops[int(i)] = float(group.at[i, "_drop"])

    order = {r: n for n, r in enumerate(REASONS)}
    rows = sorted(reasons)
    out = df.loc[rows].copy()
    out["reason"] = [";".join(sorted(reasons[i], key=order.__getitem__)) for i in rows]
    out["dsc_drop"] = [drops.get(i, np.nan) for i in rows]
    sort_cols = ["structure", "model", "centre", "condition", "case"]
    if "label" in out.columns:
        sort_cols = ["label"] + sort_cols
    return out.sort_values(sort_cols, kind="mergesort").reset_index(drop=True)

