"""Terminal views of the statistics table (plain text; the CLI uses rich when installed)."""

from __future__ import annotations

import math

import pandas as pd

__all__ = ["summary_frame", "format_table"]

def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def _fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _family_title(r) -> str:  # noqa: ANN001 - a row namedtuple
    paired = r.analysis in ("paired", "observer")  # observer: a model against a second observer, paired
    where = f"centre {r.centre}" if paired else f"model {r.model}"
    extra = " ".join(x for x in (r.study, r.condition) if x)
    arms = f"a = {r.arm_a}, b = {r.arm_b}"
    fam = getattr(r, "family", "comparison")
    unit = getattr(r, "unit", "")
    return (f"{r.analysis} | {where} | {arms} | {extra} | {r.correction} over {r.family_size} tests "
            f"({fam} family) | unit: {unit}")


def summary_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A short, string-formatted view of :func:`run_stats` output for the terminal.

    One row per comparison; the ``family`` column titles the group of rows that share a
    multiple-comparison family (same analysis, centre or model, and arms).
    """
    out = []
    for r in df.itertuples(index=False):
        out.append({
            "family": _family_title(r),
            "structure": r.structure,
            "metric": r.metric,
            "n": (f"{r.n_a}+{r.n_b}" if r.analysis not in ("paired", "observer") else str(r.n))
                 + (f" ({r.n_patients} pat., {r.n_scans} scans)" if hasattr(r, "n_patients") else ""),
            "a median [IQR]": f"{_fmt(r.median_a)} [{_fmt(r.q1_a)}, {_fmt(r.q3_a)}]",
            "b median [IQR]": f"{_fmt(r.median_b)} [{_fmt(r.q1_b)}, {_fmt(r.q3_b)}]",
            "p": _fmt_p(r.p),
            "p adj": _fmt_p(r.p_adjusted),
            "r_rb": _fmt(r.rank_biserial, 2),
            "HL shift [CI]": f"{_fmt(r.hl_shift)} [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]",
            "verdict": r.verdict,
            "diff median [boot CI]": (f"{_fmt(r.diff_median)} [{_fmt(r.diff_median_ci_low)}, "
                                      f"{_fmt(r.diff_median_ci_high)}]" if r.analysis in ("paired", "observer")
                                     else "-"),
            "non-inferiority": (r.noninferiority_verdict
                                + (f" [{_fmt(r.ni_ci_low)}, {_fmt(r.ni_ci_high)}]"
                                   if r.noninferiority_verdict and not math.isnan(r.ni_ci_level) else "")),
        })
    return pd.DataFrame(out)


def format_table(df: pd.DataFrame) -> str:
    """Plain-text rendering of :func:`summary_frame`, one block per family (no rich needed)."""
    view = summary_frame(df)
    if view.empty:
        return "(no comparisons)"
    if not (view["non-inferiority"] != "").any():
        view = view.drop(columns="non-inferiority")
    blocks = []
    for title, block in view.groupby("family", sort=False):
        blocks.append(title + "\n" + block.drop(columns="family").to_string(index=False))
    return "\n\n".join(blocks)
