"""A user's own plain folder pair through every command: no empty grouping keys anywhere."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from oarbench.cli import main
from oarbench.evaluate import jobs_from_folders
from oarbench.tables import check_keys, read_table
from tests._owndata import N_CASES, make_folder_pair

KEYS = ["study", "centre", "model", "condition", "case", "structure"]


def _ok(args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    return make_folder_pair(tmp_path_factory.mktemp("own"))


@pytest.fixture(scope="module")
def evaluated(own, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    _ok(["evaluate", "--reference", own["reference"], "--prediction", own["model_a"], "--prediction", own["model_b"],
         "--labels", own["dataset_json"], "--out", out, "--quiet", "--no-progress"])
    return out


def test_folder_mode_table_has_every_key(own, evaluated):
    table = read_table(evaluated / "metrics.csv")
    # 2 models x 6 cases x 4 structures, every key filled with the documented defaults
    assert len(table) == 2 * N_CASES * 4
    assert set(table["study"]) == {"own-data"} and set(table["centre"]) == {"all"}
    assert set(table["condition"]) == {"original"}
    assert set(table["model"]) == {"model_a", "model_b"}  # the prediction folders' names
    for col in KEYS:
        assert table[col].notna().all() and (table[col].str.strip() != "").all()
    summary = pd.read_csv(evaluated / "summary.csv")
    assert summary[["study", "centre", "model", "condition", "structure"]].notna().all().all()


def test_folder_mode_names_from_options(own, tmp_path):
    out = tmp_path / "o"
    _ok(["evaluate", "--reference", own["reference"], "--prediction", own["model_a"], "--model", "NA",
         "--centre", "Leeds", "--condition", "ct_lowdose", "--study-name", "pilot", "--labels", own["dataset_json"], "--out", out, "--quiet"])
    table = read_table(out / "metrics.csv")
    # a model named "NA" stays a name (pandas would read it as missing by default)
    assert set(table["model"]) == {"NA"} and set(table["centre"]) == {"Leeds"}
    assert set(table["condition"]) == {"ct_lowdose"} and set(table["study"]) == {"pilot"}


def test_folder_mode_name_errors(own, tmp_path):
    r = CliRunner().invoke(main, ["evaluate", "--reference", str(own["reference"]), "--prediction", str(own["model_a"]),
                                  "--prediction", str(own["model_b"]), "--model", "x", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "one --model per --prediction" in r.output
    r = CliRunner().invoke(main, ["evaluate", "--reference", str(own["reference"]), "--prediction", str(own["model_a"]),
                                  "--centre", " ", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "centre name must be a non-empty text" in r.output
    with pytest.raises(ValueError, match="would both be model 'model_a'"):
        jobs_from_folders(own["reference"], [own["model_a"], own["model_a"]])


def test_writer_and_reader_refuse_empty_keys(tmp_path):
    bad = pd.DataFrame({"study": ["s", "s"], "centre": ["A", None], "model": ["m", "m"], "condition": ["original"] * 2,
                        "case": ["c1", "c2"], "structure": ["Liver"] * 2, "status": ["ok"] * 2, "dsc": [1.0, 0.5]})
    with pytest.raises(ValueError, match=r"1 row\(s\) with an empty 'centre' \(first: row 1\)"):
        check_keys(bad, "t")
    path = tmp_path / "metrics.csv"
    bad.assign(centre=["A", ""]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=re.escape(f"{path}: 1 row(s) with an empty 'centre'")):
        read_table(path)
    r = CliRunner().invoke(main, ["stats", str(path), "--out", str(tmp_path / "s")])
    assert r.exit_code == 1 and "empty 'centre'" in r.output and "Traceback" not in r.output
    from oarbench.evaluate import write_outputs

    with pytest.raises(ValueError, match="empty 'centre'"):
        write_outputs(tmp_path / "w", bad, {})
    assert not (tmp_path / "w" / "metrics.csv").exists()


def test_stats_on_folder_mode_table(evaluated, tmp_path):
    result = _ok(["stats", evaluated / "metrics.csv", "--out", tmp_path, "--no-table"])
    stats = pd.read_csv(tmp_path / "stats.csv")
    # one paired comparison (model_a vs model_b) per structure x metric: 4 x 3
    assert len(stats) == 12, result.output
    assert stats["p"].notna().all()
    assert "12 comparisons, 12 tested" in result.output


def test_stats_on_one_model_says_why_nothing_is_compared(own, tmp_path):
    _ok(["evaluate", "--reference", own["reference"], "--prediction", own["model_a"], "--out", tmp_path, "--quiet"])
    result = _ok(["stats", tmp_path / "metrics.csv", "--out", tmp_path, "--no-table"])
    assert "one model (model_a) and one centre" in result.output and "--prediction A/ --prediction B/" in result.output


def test_robustness_gallery_report_absent_on_folder_mode(own, evaluated, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    for name in ("metrics.csv", "run.json"):
        (out / name).write_bytes((evaluated / name).read_bytes())
    spec = f"command:{own['python']} {own['script']} --in {{input}} --out {{output}}"
    _ok(["robustness", "--images", own["images"], "--reference", own["reference"], "--predictor", spec,
         "--conditions", "flip_lr", "--labels", own["dataset_json"], "--out", out, "--no-progress"])
    rob = read_table(out / "robustness.csv")
    assert set(rob["model"]) == {"segment"} and set(rob["centre"]) == {"all"} and set(rob["study"]) == {"own-data"}
    assert set(rob["condition"]) == {"original", "flip_lr"}
    assert (rob["dsc"] == 1.0).all()  # the thresholding model reproduces the reference under a flip

    meta = tmp_path / "meta.csv"
    meta.write_text("case,nephrectomy\n" + "".join(f"case{i:03d},{'left' if i == 0 else 'none'}\n" for i in range(N_CASES)))
    _ok(["absent", "--metadata", meta, "--predictions", f"model_b={own['model_b']}", "--labels", own["dataset_json"],
         "--out", out])
    absent = read_table(out / "absent.csv")
    assert set(absent["centre"]) == {"all"} and set(absent["study"]) == {"own-data"}

    result = _ok(["gallery", out / "metrics.csv", "--images", own["images"], "--reference", own["reference"],
                  "--predictions", str(own["model_a"].parent / "{model}"), "--out", out, "--no-progress"])
    index = pd.read_csv(out / "gallery" / "index.csv")
    assert len(index) > 0 and index["drawn"].all(), result.output
    # model_b (2-voxel shifts, one missed spleen) fails the default rules; every tile names its centre
    assert "model_b" in set(index["model"]) and set(index["centre"]) == {"all"}

    result = _ok(["report", out, "--no-box-plots", "--no-progress"])
    assert f"using {out / 'robustness.csv'}" in result.output
    text = (out / "report.html").read_text()
    assert "centres: all (6 cases)" in text.lower()
    assert "models: model_a, model_b" in text.lower()
    for structure in ("Liver", "Spleen", "Kidney_L", "Kidney_R"):
        assert f"id='s-{structure}'" in text
    assert "no robustness run" not in text and "flip_lr" in text
    assert ">nan<" not in text and "nan @ nan" not in text


def test_unmatched_prediction_names_are_listed(own, tmp_path):
    import shutil

    pred = tmp_path / "fast"
    pred.mkdir()
    for f in sorted(own["model_a"].glob("*.nii.gz")):
        shutil.copyfile(f, pred / f.name.replace(".nii.gz", "_fast.nii.gz"))
    (pred / "notes.txt").write_text("run log")
    r = CliRunner().invoke(main, ["evaluate", "--reference", str(own["reference"]), "--prediction", str(pred),
                                  "--labels", str(own["dataset_json"]), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "no prediction for 6 reference case(s)" in r.output
    for i in range(N_CASES):
        assert f"case{i:03d}_fast.nii.gz" in r.output
    assert "notes.txt" in r.output and "named like its reference, e.g. case000.nii.gz" in r.output


@pytest.mark.slow
def test_command_predictor_per_file_form(own, tmp_path):
    spec = f"command:{own['python']} {own['script']} --in {{input_file}} --out {{output_file}}"
    out = tmp_path / "r"
    _ok(["robustness", "--images", own["images"], "--reference", own["reference"], "--predictor", spec,
         "--conditions", "rot90_si", "--labels", own["dataset_json"], "--out", out, "--no-progress"])
    rob = read_table(out / "robustness.csv")
    # one call per case and condition; the thresholding model is exact under 90-degree turns
    assert set(rob["condition"]) == {"original", "rot90_si"}
    assert len(rob) == 2 * N_CASES * 4 and (rob["dsc"] == 1.0).all()


def test_command_predictor_failure_shows_command_and_stderr_tail(own, tmp_path):
    from oarbench.robustness.predictors import CommandPredictor, PredictorError

    for form in ("--in {input} --out {output}", "--in {input_file} --out {output_file}"):
        spec = f"command:{own['python']} {own['script']} {form} --fail"
        r = CliRunner().invoke(main, ["robustness", "--images", str(own["images"]), "--reference", str(own["reference"]),
                                      "--predictor", spec, "--conditions", "flip_lr", "--labels",
                                      str(own["dataset_json"]), "--out", str(tmp_path / "r"), "--no-progress"])
        assert r.exit_code == 1, r.output
        text = r.output
        assert "predictor command exited with status 3" in text
        assert f"command: {own['python']} {own['script']} --in " in text and "--fail" in text
        assert "RuntimeError: CUDA out of memory (simulated)" in text  # the tool's own last line
        assert "earlier line(s) not shown" in text and "layer0.py" not in text  # not its whole stack
        assert len(text.splitlines()) < 20
    with pytest.raises(ValueError, match="docs/robustness.md"):
        CommandPredictor("tool -i {input_file} -o {output}")
    with pytest.raises(ValueError, match="either"):
        CommandPredictor("tool -i {input} -o {output} {input_file} {output_file}")
    assert isinstance(PredictorError("x"), ValueError)


def test_gallery_fails_when_no_selected_row_can_be_drawn(own, evaluated, tmp_path):
    import shutil

    images = tmp_path / "imagesTs"
    shutil.copytree(own["images"], images)
    for ct in sorted(images.glob("*.nii.gz")):  # half-copied files: the gzip stream ends early
        ct.write_bytes(ct.read_bytes()[: ct.stat().st_size // 2])
    args = ["gallery", evaluated / "metrics.csv", "--images", images, "--reference", own["reference"],
            "--predictions", str(own["model_a"].parent / "{model}"), "--no-progress"]
    result = CliRunner().invoke(main, [str(a) for a in args + ["--out", tmp_path / "all"]])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    error = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(error) == 1 and "none of the" in error[0] and str(images) in error[0], result.output
    index = pd.read_csv(tmp_path / "all" / "gallery" / "index.csv")
    assert len(index) > 0 and not index["drawn"].any()  # the index still says why, row by row

    # one damaged CT among good ones: the others are drawn, the damaged one is named, exit 0
    for ct in sorted(images.glob("*.nii.gz"))[1:]:
        shutil.copy2(own["images"] / ct.name, ct)
    result = _ok(args + ["--out", tmp_path / "some"])
    index = pd.read_csv(tmp_path / "some" / "gallery" / "index.csv")
    assert index["drawn"].any() and not index["drawn"].all()
    assert "rows not drawn" in result.output and "case000_0000.nii.gz" in result.output


def test_top_level_help_shows_whole_sentences():
    import textwrap

    from oarbench.cli import _COMMANDS

    text = _ok(["--help"]).output
    listing = " ".join(text.split("Commands:", 1)[1].split())
    assert "..." not in listing
    for name in _COMMANDS:
        command = main.get_command(None, name)
        first = " ".join(textwrap.dedent(command.help or "").strip().split("\n\n")[0].split())
        first = first.split(". ")[0]  # click's short help: the first sentence
        assert f"{name} {first}" in listing, (name, first)


def test_evaluate_help_points_at_the_naming_options():
    text = " ".join(_ok(["evaluate", "--help"]).output.split())
    assert "options above" not in text
    assert "--study-name, --centre, --model and --condition (listed below)" in text


def test_labels_typo_suggests_the_shipped_map(own, tmp_path):
    result = CliRunner().invoke(main, ["evaluate", "--reference", str(own["reference"]), "--prediction",
                                       str(own["model_a"]), "--labels", "totalsegmentor", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "--labels 'totalsegmentor': no such file and not a shipped map (did you mean 'totalsegmentator'?)" \
        in result.output
    result = CliRunner().invoke(main, ["evaluate", "--reference", str(own["reference"]), "--prediction",
                                       str(own["model_a"]), "--labels", "my_labels.toml", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "did you mean" not in result.output and "my_labels.toml" in result.output


def test_stats_on_the_wrong_csv_names_evaluates_table(evaluated, tmp_path):
    result = CliRunner().invoke(main, ["stats", str(evaluated / "summary.csv"), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "missing required column(s) case, status" in line
    assert line.endswith("give the metrics.csv (or metrics.parquet) that `oarbench evaluate` wrote, one row per "
                         "case x structure")
