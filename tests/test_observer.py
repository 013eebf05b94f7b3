"""The human baseline: a second observer's contours, scored against the reference like a model,
and each model tested for non-inferiority to it (paired, patient as unit, the run's margin)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats as st

from oarbench.stats import run_stats
from oarbench.stats.paper import paper_table


def _table(values: dict[str, list[float]], structure: str = "Liver") -> pd.DataFrame:
    rows = []
    for model, v in values.items():
        for i, x in enumerate(v):
            rows.append({"study": "s", "centre": "A", "model": model, "condition": "original", "case": f"c{i:02d}",
                         "patient": f"p{i:02d}", "structure": structure, "status": "ok", "dsc": x, "hd95": 2.0,
                         "msd": 1.0})
    return pd.DataFrame(rows)


OBS = [0.90, 0.88, 0.93, 0.91, 0.87, 0.92, 0.89, 0.94, 0.90, 0.86]
# model "near": within 0.004 of the observer on every patient; "far": 0.05 below
NEAR = [o + d for o, d in zip(OBS, [0.003, -0.002, 0.001, -0.004, 0.002, 0.0015, -0.001, 0.0025, 0.0035, -0.003])]
FAR = [o - 0.05 + d for o, d in zip(OBS, [0.001, -0.002, 0.003, 0.0, 0.002, -0.001, 0.0015, -0.0025, 0.0005, 0.004])]


def test_models_against_the_observer_by_non_inferiority():
    t = _table({"observer-2": OBS, "near": NEAR, "far": FAR})
    df = run_stats(t, metrics=("dsc",), margins={"dsc": 0.01}, observers=["observer-2"], bootstrap=None)
    obs = df[df["analysis"] == "observer"].set_index("arm_a")
    assert set(obs.index) == {"near", "far"} and (obs["arm_b"] == "observer-2").all()
    # the observer leaves the model pairs and the cross-centre analysis
    paired = df[df["analysis"] == "paired"]
    assert set(zip(paired["arm_a"], paired["arm_b"])) == {("near", "far")}
    assert "observer-2" not in set(df.loc[df["analysis"] == "cross-centre", "model"])
    # oracle: one-sided exact signed-rank of model - observer + margin, per patient
    for model, v in (("near", NEAR), ("far", FAR)):
        d = np.round(np.array(v) - np.array(OBS) + 0.01, 12)
        method = "exact" if np.unique(np.abs(d)).size == d.size else st.PermutationMethod(n_resamples=np.inf)
        p = st.wilcoxon(d, alternative="greater", method=method).pvalue
        assert obs.loc[model, "p_noninferiority"] == pytest.approx(p)
    assert obs.loc["near", "noninferiority_verdict"] == "near non-inferior (margin 0.01)"
    assert obs.loc["far", "noninferior"] == False  # noqa: E712 - pandas boolean
    # one family per (centre, model and observer), as for model pairs
    assert (obs["family_size"] == 1).all()
    # the terminal table titles them like paired comparisons: by centre
    from oarbench.stats import summary_frame

    view = summary_frame(df[df["analysis"] == "observer"])
    assert view["family"].str.startswith("observer | centre A | a = ").all()


def test_paper_table_marks_the_models_within_the_observer_variation():
    t = _table({"observer-2": OBS, "near": NEAR, "far": FAR})
    df = run_stats(t, metrics=("dsc",), margins={"dsc": 0.01}, observers=["observer-2"], bootstrap=None)
    paper = paper_table(t, df, metrics=("dsc",), bootstrap=None, observers=["observer-2"]).set_index("model")
    assert paper.loc["observer-2", "block"] == "observer"
    assert paper.loc["near", "vs_observer"] == "observer-2: non-inferior" and paper.loc["near", "cell"].endswith("=")
    assert paper.loc["far", "vs_observer"] == "observer-2: not shown" and not paper.loc["far", "cell"].endswith("=")
    from oarbench.stats.paper import methods_paragraph, paper_table_latex

    assert "non-inferior to the second observer" in paper_table_latex(paper.reset_index())
    text = methods_paragraph({}, df, None)
    assert "second observer's contours (observer-2)" in text and "non-inferiority to the observer" in text


def test_unknown_observer_is_an_error():
    with pytest.raises(ValueError, match="observer"):
        run_stats(_table({"a": OBS, "b": NEAR}), metrics=("dsc",), observers=["nobody"], bootstrap=None)


def test_study_observers_are_scored_like_models(tmp_path):
    from oarbench.evaluate import jobs_from_study
    from oarbench.study import load_study, study_toml_text

    (tmp_path / "study.toml").write_text(
        '[study]\nname = "s"\n\n[[centres]]\nname = "A"\nreference = "ref"\n\n'
        '[[models]]\nname = "m"\npredictions = "pred/{centre}"\n\n'
        '[[observers]]\nname = "observer-2"\npredictions = "obs/{centre}"\n')
    s = load_study(tmp_path / "study.toml")
    assert [m.name for m in s.models] == ["m"] and [o.name for o in s.observers] == ["observer-2"]
    assert s.observers[0].observer and s.observers[0].predictions_dir("A") == tmp_path / "obs" / "A"
    assert [j.model for j in jobs_from_study(s)] == ["m", "observer-2"]
    assert "[[observers]]" in study_toml_text(s)
    (tmp_path / "bad.toml").write_text((tmp_path / "study.toml").read_text().replace('"observer-2"', '"m"'))
    with pytest.raises(ValueError, match="more than once"):
        load_study(tmp_path / "bad.toml")


def test_cli_observer_folder_then_stats(tmp_path):
    from oarbench.cli import main
    from tests.test_evaluate import _write

    rng = np.random.default_rng(7)
    for i in range(8):
        ref = np.zeros((10, 24, 24), np.uint8)
        ref[2:8, 4:18, 4:18] = 1
        obs = ref.copy()
        obs[2:8, 4:18, 18] = int(rng.random() < 0.5)  # the observer draws one column more, sometimes
        pred = np.roll(ref, 1, axis=2) if i % 2 else ref.copy()
        _write(tmp_path / "ref" / f"c{i}.nii.gz", ref)
        _write(tmp_path / "obs" / f"c{i}.nii.gz", obs)
        _write(tmp_path / "pred" / f"c{i}.nii.gz", pred)
    (tmp_path / "labels.toml").write_text("[labels]\nLiver = 1\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["evaluate", "--reference", str(tmp_path / "ref"), "--prediction",
                                  str(tmp_path / "pred"), "--model", "m", "--observer", str(tmp_path / "obs"),
                                  "--observer-name", "observer-2", "--labels", str(tmp_path / "labels.toml"),
                                  "--out", str(out), "--quiet", "--no-progress"])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(out / "metrics.csv")
    assert set(table["model"]) == {"m", "observer-2"}
    assert json.loads((out / "run.json").read_text())["observers"] == ["observer-2"]
    r2 = CliRunner().invoke(main, ["stats", str(out / "metrics.csv"), "--out", str(tmp_path / "st"),
                                   "--margin", "dsc=0.01", "--no-table", "--n-resamples", "0"])
    assert r2.exit_code == 0, r2.output
    s = pd.read_csv(tmp_path / "st" / "stats.csv")
    rows = s[s["analysis"] == "observer"]
    assert set(zip(rows["arm_a"], rows["arm_b"])) == {("m", "observer-2")} and rows["margin"].eq(0.01).any()
    paper = pd.read_csv(tmp_path / "st" / "paper_table.csv")
    assert (paper.loc[paper["model"] == "observer-2", "block"] == "observer").all()
    assert paper.loc[(paper["model"] == "m") & (paper["metric"] == "dsc"), "vs_observer"].str.startswith(
        "observer-2: ").all()
    # a study file declares observers itself
    r3 = CliRunner().invoke(main, ["evaluate", str(tmp_path / "x.toml"), "--observer", str(tmp_path / "obs")])
    assert r3.exit_code != 0 and "--observer" in r3.output
