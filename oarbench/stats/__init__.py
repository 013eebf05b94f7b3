"""Statistics of the results table.

* :mod:`oarbench.stats.ranktests`: the primitives on vectors (Wilcoxon signed-rank,
  Mann-Whitney U / rank-sum, Hodges-Lehmann shifts and intervals).
* :mod:`oarbench.stats.bootstrap`: bootstrap intervals, resampling patients.
* :mod:`oarbench.stats.clusters`: the unit of analysis (scans clustered by patient).
* :mod:`oarbench.stats.families`: multiple-comparison families, corrections, verdicts.
* :mod:`oarbench.stats.comparisons`: paired and cross-centre comparisons of the results table.
* :mod:`oarbench.stats.display`: terminal views.
* :mod:`oarbench.stats.paper`: the manuscript tables (CSV, LaTeX) and the methods paragraph.

See docs/statistics.md.
"""

from oarbench.stats.bootstrap import BootstrapOptions, bootstrap_ci, cluster_bootstrap_ci
from oarbench.stats.clusters import UNITS, ClusteringWarning, aggregate_by_patient, patient_differences, patients_of
from oarbench.stats.comparisons import (
    COLUMNS,
    DEFAULT_METRICS,
    METRIC_DIRECTIONS,
    ONE_ARM_ABSENT_COLUMNS,
    centre_comparisons,
    one_arm_absent,
    paired_comparisons,
    read_results,
    run_stats,
    write_stats,
)
from oarbench.stats.display import format_table, summary_frame
from oarbench.stats.families import CORRECTIONS, FAMILIES, apply_correction
from oarbench.stats.paper import methods_paragraph, paper_table, paper_table_latex, write_paper_outputs
from oarbench.stats.ranktests import (
    MIN_PAIRS,
    ZERO_METHODS,
    RankSumResult,
    SignedRankResult,
    finite_for_ranking,
    hodges_lehmann,
    paired_differences,
    quantile_inf,
    rank_sum_test,
    round_for_ranking,
    signed_rank_null_cdf,
    signed_rank_test,
    walsh_averages,
)

__all__ = [
    "METRIC_DIRECTIONS", "DEFAULT_METRICS", "ZERO_METHODS", "CORRECTIONS", "FAMILIES", "UNITS", "MIN_PAIRS",
    "COLUMNS", "ONE_ARM_ABSENT_COLUMNS",
    "SignedRankResult", "RankSumResult", "BootstrapOptions", "ClusteringWarning",
    "paired_differences", "finite_for_ranking", "walsh_averages", "hodges_lehmann", "signed_rank_null_cdf",
    "signed_rank_test", "rank_sum_test", "quantile_inf", "round_for_ranking",
    "bootstrap_ci", "cluster_bootstrap_ci", "aggregate_by_patient", "patient_differences", "patients_of", "apply_correction",
    "paired_comparisons", "centre_comparisons", "one_arm_absent", "run_stats", "read_results", "write_stats",
    "summary_frame", "format_table",
    "paper_table", "paper_table_latex", "methods_paragraph", "write_paper_outputs",
]
