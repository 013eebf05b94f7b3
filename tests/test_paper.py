"""The manuscript tables (CSV, LaTeX booktabs) and the generated methods paragraph."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from oarbench import stats as S
from oarbench.cli import main
from oarbench.stats.paper import paper_table_wide


def _table():
    # centre A: models a, b on 10 patients, two scans each (20 scans); a beats b on every scan.
    # centre B: 8 patients, one scan each.
    rng = np.random.default_rng(3)
    rows = []
    for centre, n_pat, n_scan in (("A", 10, 2), ("B", 8, 1)):
        for p in range(n_pat):
            for k in range(n_scan):
                base = 0.8 + 0.01 * p + 0.002 * k
                for model, shift in (("a", 0.05), ("b", 0.0)):
                    rows.append(dict(study="s", centre=centre, model=model, condition="original",
                                     case=f"{centre}{p}-{k}", patient=f"{centre}{p}", structure="Kidney_L",
                                     status="ok", dsc=base + shift + rng.normal(0, 0.001),
                                     hd95=3.0 - shift * 10 + rng.normal(0, 0.01), msd=1.0))
    return pd.DataFrame(rows)


def test_paper_table_values_blocks_and_marks():
    t = _table()
    stats = S.run_stats(t, bootstrap=None)
    opts = S.BootstrapOptions(n_resamples=300, seed=1)
    paper = S.paper_table(t, stats, metrics=["dsc", "hd95"], trained_on={"a": ["A"], "b": ["B"]}, bootstrap=opts)
    row = paper[(paper.metric == "dsc") & (paper.centre == "A") & (paper.model == "a")].iloc[0]
    v = t[(t.centre == "A") & (t.model == "a")]["dsc"].to_numpy()
    assert row["median"] == pytest.approx(np.median(v)) and row["q1"] == pytest.approx(np.quantile(v, 0.25))
    assert row["q3"] == pytest.approx(np.quantile(v, 0.75))
    assert (row["n_patients"], row["n_scans"]) == (10, 20)
    assert row["ci_low"] <= row["median"] <= row["ci_high"]
    assert (row["ci_low"], row["ci_high"]) == S.cluster_bootstrap_ci(v, t[(t.centre == "A") & (t.model == "a")]["patient"], "median", opts)
    assert row["block"] == "within-centre"
    assert paper[(paper.centre == "A") & (paper.model == "b")]["block"].iloc[0] == "cross-centre"
    # a beats b on all 10 patients of A (exact p = 2/1024, Holm over the family): letter b on a's cells
    assert row["better_than"] == "b" and row["marks"] == "b" and row["cell"].endswith(" b")
    hd = paper[(paper.metric == "hd95") & (paper.centre == "A") & (paper.model == "a")].iloc[0]
    assert hd["marks"] == "b"  # lower HD95 is better: a wins there too
    assert paper[(paper.centre == "A") & (paper.model == "b")]["marks"].eq("").all()
    # 8 patients on B: a beats b as well
    assert paper[(paper.metric == "dsc") & (paper.centre == "B") & (paper.model == "a")]["n_scans"].iloc[0] == 8
    wide = paper_table_wide(paper, "dsc")
    assert list(wide["structure"]) == ["Kidney_L", "patients / scans"]
    assert wide.columns[1] == "a on A (within-centre)"


def test_latex_is_booktabs_escaped_and_rectangular():
    t = _table()
    paper = S.paper_table(t, S.run_stats(t, bootstrap=None), metrics=["dsc"],
                          trained_on={"a": ["A"], "b": ["B"]}, bootstrap=S.BootstrapOptions(n_resamples=100))
    tex = S.paper_table_latex(paper)
    for cmd in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lcccc}", r"\multicolumn{2}{c}{within-centre}"):
        assert cmd in tex
    assert r"Kidney\_L" in tex and "Kidney_L" not in tex.replace(r"Kidney\_L", "")
    body = tex[tex.index(r"\midrule"):tex.index(r"\bottomrule")]
    rows = [ln for ln in body.splitlines() if ln.endswith(r"\\")]
    assert rows and all(ln.count("&") == 4 for ln in rows)  # 1 + 4 columns in every row
    assert "$^{b}$" in tex and "a: a, b: b" in tex
    assert tex.count("{") == tex.count("}")


def test_methods_paragraph_states_what_was_done():
    t = _table()
    stats = S.run_stats(t, bootstrap=S.BootstrapOptions(n_resamples=50), family="study", margins={"dsc": 0.02})
    run = {"oarbench": "9.9", "python": "3.11.7", "numpy": "2.1", "pandas": "2.2",
           "options": {"tolerance_mm": 2.0, "tolerances_mm": {"Liver": 4.0}, "apl_convention": "exact"},
           "resolution_warnings": ["tolerance 2 mm (Kidney_R) is below the coarsest voxel spacing"]}
    text = S.methods_paragraph(run, stats, S.BootstrapOptions(n_resamples=2000, seed=7))
    for needle in ("oarbench 9.9", "2 mm (structure-specific: Liver 4 mm)", "unit of analysis was the patient",
                   "Wilcoxon signed-rank", "Mann-Whitney U", "Holm method over all tests of the study",
                   "alpha = 0.025", "margins of 0.02 (dsc)", "two-sided 95% Hodges-Lehmann", "2000 resamples, seed 7",
                   "Python 3.11.7", "below the coarsest voxel spacing", "DeepMind"):
        assert needle in text, needle
    # nothing invented when nothing is given
    bare = S.methods_paragraph(None, None, None)
    assert "tolerance of surface DSC" not in bare and "Holm" not in bare and "unit of analysis" not in bare


def test_cli_writes_paper_files_with_run_json(tmp_path):
    t = _table()
    t.to_csv(tmp_path / "metrics.csv", index=False)
    (tmp_path / "run.json").write_text(json.dumps({"oarbench": "1.2.3", "options": {"tolerance_mm": 3.0}}))
    res = CliRunner().invoke(main, ["stats", str(tmp_path / "metrics.csv"), "--out", str(tmp_path / "o"),
                                    "--n-resamples", "100", "--no-table"])
    assert res.exit_code == 0, res.output
    paper = pd.read_csv(tmp_path / "o" / "paper_table.csv")
    assert set(paper["metric"]) == {"dsc", "hd95", "msd"} and len(paper) == 3 * 2 * 2
    assert r"\toprule" in (tmp_path / "o" / "paper_table.tex").read_text()
    methods = (tmp_path / "o" / "methods.md").read_text()
    assert "oarbench 1.2.3" in methods and "3 mm" in methods and "100 resamples" in methods
    bad = CliRunner().invoke(main, ["stats", str(tmp_path / "metrics.csv"), "--out", str(tmp_path / "p"),
                                    "--run-json", str(tmp_path / "nope.json"), "--no-table"])
    assert bad.exit_code != 0 and "nope.json" in bad.output and "Traceback" not in bad.output


def test_report_has_the_paper_section(tmp_path):
    from oarbench.report import build_report

    t = _table()
    stats = S.run_stats(t, bootstrap=None, family="study")
    html = build_report(tmp_path, t, stats=stats, box_plots=False,
                        provenance={"oarbench": "4.5", "resolution_warnings": ["tolerance 1 mm (X) is below"]}).read_text()
    sec = html[html.index("<section id='paper'>"):]
    sec = sec[:sec.index("</section>")]
    assert "within the <b>study</b> family" in sec and "Unit of analysis: patient" in sec
    assert "oarbench 4.5" in sec and "tolerance 1 mm (X) is below" in sec and "booktabs" in sec
    assert re.search(r"paper_table\.csv \(\d+ rows\)", sec)
    # the statistics table of the report says patients and scans and the bootstrap interval
    stats_html = html[html.index("id='stats'"):]
    for header in ("<th>patients</th>", "<th>scans</th>", "median difference [bootstrap CI]"):
        assert header in stats_html, header
