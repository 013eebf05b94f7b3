"""One self-contained HTML report of a benchmark run, laid out like a paper.

:func:`build_report` writes ``report.html``: every figure is embedded as a base64 PNG
data URI, every detail table can be downloaded as CSV from an embedded ``data:`` link,
the CSS is inline, there is no script and no external resource, so the file can be
mailed, archived or printed (A4) as it is.

The package, by concern:

* :mod:`~oarbench.report.data`: the numbers (summaries, headline, robustness deltas,
  noise floor, values that look like bugs); pandas in, pandas out;
* :mod:`~oarbench.report.context`: the options and the loaded, checked inputs
  (:class:`ReportContext`, with a per-report cache); paths read from a results folder
  are resolved inside it; stale inputs are named;
* :mod:`~oarbench.report.figures`: the figures (Figure 1 and one summary figure per
  section), drawn at print size;
* :mod:`~oarbench.report.sections`: one function per section, listed in
  :data:`SECTIONS`, each with one Jinja2 template in ``templates/``;
* :mod:`~oarbench.report.build`: the page (autoescaping Jinja2 environment) and
  :func:`build_report`.
"""

from oarbench.report.build import build_report
from oarbench.report.context import ReportContext, ReportOptions, gallery_criteria, inside
from oarbench.report.data import (
    EXPLANATIONS,
    MIN_BOX_N,
    SIGNIFICANCE,
    STATUSES,
    headline_table,
    lowest_median_dsc,
    noise_floor_table,
    quantile_inf,
    robustness_deltas,
    stats_counts,
    summary_table,
    suspicious_values,
)
from oarbench.report.sections import SECTIONS, Section

__all__ = [
    "STATUSES",
    "SIGNIFICANCE",
    "EXPLANATIONS",
    "MIN_BOX_N",
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
    "lowest_median_dsc",
    "stats_counts",
    "gallery_criteria",
    "inside",
    "build_report",
]
