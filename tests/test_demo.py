"""`oarbench demo` end to end on a reduced copy of the shipped demo study."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from oarbench.cli import main
from oarbench.labels import DEFAULT_LABELS

DEMO_TOML = Path(__file__).resolve().parents[1] / "cases" / "demo.toml"


def _small_config(tmp_path: Path, n_test: int) -> Path:
    text = DEMO_TOML.read_text()
    text = re.sub(r"(?m)^test_cases_per_centre = \d+", f"test_cases_per_centre = {n_test}", text)
    text = re.sub(r"(?m)^train_cases_per_centre = \d+", "train_cases_per_centre = 1", text)
    path = tmp_path / "small-demo.toml"
    path.write_text(text)
    return path


def test_demo_runs_every_step_and_resumes(tmp_path):
    n_test = 6
    config = _small_config(tmp_path, n_test)
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--config", str(config), "--workers", "1"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    res = out / "results"
    for name in ("metrics.csv", "summary.csv", "run.json", "absent.csv", "absent_summary.csv", "stats.csv",
                 "gallery/index.csv", "report.html"):
        assert (res / name).is_file(), name
    table = pd.read_csv(res / "metrics.csv")
    # 2 centres x (3 models + the second observer) x n_test cases x 19 structures
    assert len(table) == 2 * 4 * n_test * len(DEFAULT_LABELS)
    assert set(table["model"]) == {"local-A", "local-B", "fl", "observer-2"} and set(table["centre"]) == {"A", "B"}
    assert set(table["status"]) <= {"ok", "missed", "hallucinated", "absent"}
    stats = pd.read_csv(res / "stats.csv")
    assert {"p", "p_adjusted", "verdict"} <= set(stats.columns) and len(stats) > 0
    # the human baseline: every model against the second observer, by non-inferiority
    human = stats[stats["analysis"] == "observer"]
    assert set(zip(human["arm_a"], human["arm_b"])) == {(m, "observer-2") for m in ("local-A", "local-B", "fl")}
    assert human.loc[human["metric"] == "dsc", "margin"].eq(0.01).all()
    assert "observer-2" not in set(stats.loc[stats["analysis"] == "paired", "arm_a"]) | set(
        stats.loc[stats["analysis"] == "paired", "arm_b"])
    html = (res / "report.html").read_text()
    assert "<img" in html and "Liver" in html
    # the report names the second observer in the accuracy section and in the paper tables' legend
    assert "observer-2: a second observer&#39;s contours" in html
    assert "observer-2: a second observer (the human" in html
    # the finding: both local models on the other centre, fl against each local model on both centres
    finding = pd.read_csv(res / "finding.csv")
    local = finding[finding["question"] == "local on other centre"]
    # paired on the other centre's patients, against the model trained there
    assert set(zip(local["model"], local["reference"], local["centre"], local["other"])) == {
        ("local-A", "local-B", "B", "A"), ("local-B", "local-A", "A", "B")}
    fed = finding[finding["question"] == "federated vs local"]
    assert set(zip(fed["reference"], fed["centre"])) == {(m, c) for m in ("local-A", "local-B") for c in ("A", "B")}
    assert "local-A (trained on A) against local-B (trained on B) on centre B&#39;s patients (paired" in html
    # A second run finds the study and every case cached.
    again = CliRunner().invoke(main, ["demo", "--out", str(out), "--config", str(config), "--workers", "1"],
                               catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert pd.read_csv(res / "metrics.csv").equals(table)
