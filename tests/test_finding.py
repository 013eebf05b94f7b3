"""The study finding from a hand-made statistics table: which local model loses accuracy on the
other centre, and whether the federated model holds against each local model."""

from __future__ import annotations

import pandas as pd

from oarbench.finding import FINDING_COLUMNS, centre_shift_finding, finding_lines

TRAINED_ON = {"local-A": ("A",), "local-B": ("B",), "fl": ("A", "B")}


def _row(analysis, model, centre, a, b, structure, med_a, med_b, p_adj, metric="dsc", condition="original"):
    return {"analysis": analysis, "model": model, "centre": centre, "arm_a": a, "arm_b": b, "structure": structure,
            "metric": metric, "condition": condition, "median_a": med_a, "median_b": med_b, "p_adjusted": p_adj,
            "test": "rank-sum" if analysis == "cross-centre" else "signed-rank"}


def _stats() -> pd.DataFrame:
    rows = [
        # local-A: 0.95 on A, 0.60 on B (significant); Spleen lower on B but not significant
        _row("cross-centre", "local-A", None, "A", "B", "Liver", 0.95, 0.60, 0.001),
        _row("cross-centre", "local-A", None, "A", "B", "Spleen", 0.93, 0.90, 0.30),
        # local-B listed with B as arm b: own centre is arm b
        _row("cross-centre", "local-B", None, "A", "B", "Liver", 0.50, 0.94, 0.002),
        _row("cross-centre", "local-B", None, "A", "B", "Spleen", 0.94, 0.92, 0.01),  # better on the other centre
        # fl against local-A on A (arm order fl, local-A) and local-B on B (arm order local-B, fl)
        _row("paired", None, "A", "fl", "local-A", "Liver", 0.94, 0.95, 0.50),
        _row("paired", None, "A", "fl", "local-A", "Spleen", 0.88, 0.93, 0.01),
        _row("paired", None, "B", "local-B", "fl", "Liver", 0.94, 0.935, 0.60),
        # ignored: another metric, another condition, a pair without the federated model
        _row("paired", None, "B", "local-B", "fl", "Liver", 5.0, 1.0, 0.01, metric="hd95"),
        _row("cross-centre", "local-A", None, "A", "B", "Liver", 0.95, 0.10, 0.001, condition="flip_lr"),
        _row("paired", None, "A", "local-A", "local-B", "Liver", 0.95, 0.50, 0.001),
    ]
    return pd.DataFrame(rows)


def test_local_models_on_other_centre() -> None:
    f = centre_shift_finding(_stats(), TRAINED_ON)
    assert list(f.columns) == list(FINDING_COLUMNS)
    q = f[f["question"] == "local on other centre"].set_index(["model", "structure"])
    assert len(q) == 4
    a_liver = q.loc[("local-A", "Liver")]
    assert (a_liver["centre"], a_liver["other"]) == ("A", "B")
    assert a_liver["median_reference"] == 0.95 and a_liver["median_model"] == 0.60
    assert abs(a_liver["difference"] - (-0.35)) < 1e-12 and a_liver["verdict"] == "loses"
    assert q.loc[("local-A", "Spleen"), "verdict"] == "no significant loss"  # p 0.30
    b_liver = q.loc[("local-B", "Liver")]
    assert (b_liver["centre"], b_liver["median_reference"], b_liver["median_model"]) == ("B", 0.94, 0.50)
    assert b_liver["verdict"] == "loses"
    # significant, but higher on the other centre: not a loss
    assert q.loc[("local-B", "Spleen"), "verdict"] == "no significant loss"


def test_federated_against_local_models() -> None:
    f = centre_shift_finding(_stats(), TRAINED_ON, tolerance=0.02)
    q = f[f["question"] == "federated vs local"].set_index(["reference", "structure"])
    assert len(q) == 3
    assert q.loc[("local-A", "Liver"), "verdict"] == "holds"  # 0.94 vs 0.95: -0.01 within 0.02
    assert q.loc[("local-A", "Spleen"), "verdict"] == "lower"  # 0.88 vs 0.93
    b = q.loc[("local-B", "Liver")]
    assert (b["median_model"], b["median_reference"], b["centre"]) == (0.935, 0.94, "B")
    assert b["verdict"] == "holds"


def test_lines_state_counts_and_significance() -> None:
    lines = finding_lines(centre_shift_finding(_stats(), TRAINED_ON))
    text = "\n".join(lines)
    assert "local-A (trained on A) on centre B: median DSC lower than on A for 2 of 2 structures, significantly for 1" in text
    assert "Liver 0.95 -> 0.60" in text
    assert "fl vs local-A on its own centre: within 0.02 DSC of it or better (median) for 1 of 2 structures; " \
           "significantly lower (Wilcoxon signed-rank, Holm-adjusted p < 0.05) for 1: Spleen." in text
    assert "fl vs local-B on its own centre: within 0.02 DSC of it or better (median) for 1 of 1 structures" in text
