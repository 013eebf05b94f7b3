"""A core install runs the own-data commands of the README and of docs/robustness.md as written.

A fresh virtual environment (no ``--system-site-packages``: it sees none of
the test environment's extras) gets the README's install line, run as
written from a copy of the clone; then the README's "Scoring your own data"
commands run from inside a plain folder pair, and docs/robustness.md's "own
model" sequence with a command predictor, each command exactly as the text
gives it (read from the files here, so the text and the test cannot drift),
each output checked; and docs/absent.md's command. The environment is built
once for the three tests (``xdist_group``): about 15 s of CPU for the venv and
the install, then each command's own time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests._owndata import N_CASES, make_folder_pair

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ROBUSTNESS_DOC = ROOT / "docs" / "robustness.md"
ABSENT_DOC = ROOT / "docs" / "absent.md"
#: What ``pip install .`` reads from the clone.
CLONE_FILES = ("pyproject.toml", "README.md", "constraints.txt", "oarbench")
#: Modules of the extras (pyproject.toml): none may be importable in the core install.
EXTRA_MODULES = ("fsspec", "s3fs", "pyarrow", "torch", "nnunetv2", "cryptography", "safetensors", "flwr", "dask",
                 "distributed", "pydicom", "highdicom", "skimage")
STRUCTURES = ("Liver", "Spleen", "Kidney_L", "Kidney_R")

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("core_install")]


def _section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(heading)
    level = heading.split(" ")[0]
    ends = [i for i in (text.find(f"\n{h} ", start + len(heading)) for h in ("#" * n for n in range(1, len(level) + 1)))
            if i != -1]
    return text[start: min(ends) if ends else len(text)]


def _bash_blocks(section: str, language: str = "bash") -> list[list[str]]:
    """The commands of each ```bash block: continuation lines joined, comment-only lines left out."""
    blocks = []
    for block in re.findall(rf"```{language}\n(.*?)```", section, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        blocks.append([ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")])
    return blocks


def _run(command: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}\n(exit {result.returncode})\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    """(environment variables with the fresh venv first on PATH, the venv) after the README's install line."""
    install = _bash_blocks(_section(README, "## Scoring your own data"))[0]
    assert install == ["python3 -m pip install ."], "the section starts with the one-line core install"
    base = tmp_path_factory.mktemp("core")
    clone, venv = base / "clone", base / "venv"
    clone.mkdir()
    for name in CLONE_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, clone / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, clone / name)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONDONTWRITEBYTECODE")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(venv))
    # Speed only: pip skips compiling every installed module (pip reads PIP_NO_COMPILE=0 as --no-compile;
    # about 13 s of CPU), and Python compiles the modules the commands import, once, when first imported.
    env["PIP_NO_COMPILE"] = "0"
    _run(install[0], clone, env, timeout=600)  # what `source venv/bin/activate` then the line does
    probe = subprocess.run([str(venv / "bin" / "python3"), "-c", "import importlib.util as u, oarbench; "
                            f"print(oarbench.__file__); print([m for m in {EXTRA_MODULES!r} if u.find_spec(m)])"],
                           cwd=base, env=env, capture_output=True, text=True, timeout=60, check=True)
    where, extras = probe.stdout.strip().splitlines()
    assert Path(where).is_relative_to(venv) and extras == "[]", probe.stdout  # the venv's own copy, no extra
    return env


def test_readme_own_data_commands_on_core_install(core, tmp_path):
    make_folder_pair(tmp_path)  # the layout the README shows, dataset.json beside labelsTs/
    commands = _bash_blocks(_section(README, "## Scoring your own data"))[1]
    assert [c.split()[:2] for c in commands] == [["oarbench", "evaluate"], ["oarbench", "stats"],
                                                 ["oarbench", "gallery"], ["oarbench", "report"]]
    results = tmp_path / "results"
    evaluate, stats, gallery, report = commands

    _run(evaluate, tmp_path, core)
    table = pd.read_csv(results / "metrics.csv", keep_default_na=False, na_values=[""])
    assert len(table) == N_CASES * len(STRUCTURES) * 2 and set(table["model"]) == {"model_a", "model_b"}
    assert set(table["centre"]) == {"all"} and set(table["study"]) == {"own-data"}
    # worked from the folder pair's construction: model_a is the reference in even cases,
    # model_b has no spleen in case000
    even_a = table[(table["model"] == "model_a") & table["case"].isin([f"case{i:03d}" for i in range(0, N_CASES, 2)])]
    assert len(even_a) == len(STRUCTURES) * (N_CASES // 2) and (even_a["dsc"] == 1.0).all()
    spleen0 = table[(table["model"] == "model_b") & (table["case"] == "case000") & (table["structure"] == "Spleen")]
    assert list(spleen0["status"]) == ["missed"] and list(spleen0["dsc"]) == [0.0]
    assert (results / "summary.csv").is_file() and (results / "run.json").is_file()
    assert not (results / "metrics.parquet").exists()  # pyarrow is an extra

    _run(stats, tmp_path, core)
    table = pd.read_csv(results / "stats.csv")
    assert len(table) == len(STRUCTURES) * 3  # one comparison per structure x metric (dsc, hd95, msd)
    assert set(table["structure"]) == set(STRUCTURES) and set(table["metric"]) == {"dsc", "hd95", "msd"}
    assert (results / "paper_table.csv").is_file() and (results / "methods.md").read_text().strip()

    _run(gallery, tmp_path, core)
    index = pd.read_csv(results / "gallery" / "index.csv")
    assert len(index) > 0 and index["drawn"].all() and "model_b" in set(index["model"])
    montages = sorted((results / "gallery").glob("*.png"))
    assert montages and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in montages)

    _run(report, tmp_path, core)
    html = (results / "report.html").read_text()
    assert "models: model_a, model_b" in html.lower() and f"centres: all ({N_CASES} cases)" in html.lower()
    for structure in STRUCTURES:
        assert f"id='s-{structure}'" in html  # a per-structure section for each
    assert "No statistics table was given" not in html
    assert html.count("data:image/png;base64,") >= 4 + len(montages)  # box plots and gallery montages


def test_robustness_own_model_sequence_on_core_install(core, tmp_path):
    commands = _bash_blocks(_section(ROBUSTNESS_DOC, "### Your own model on your own folders"))[0]
    assert [c.split()[:2] for c in commands] == [["oarbench", "evaluate"], ["oarbench", "robustness"],
                                                 ["oarbench", "report"]]
    own = make_folder_pair(tmp_path / "source")
    cases = ("case000", "case001")  # two cases keep the conditions x cases predictor calls short
    for folder, src, suffix in (("ct", own["images"], "_0000.nii.gz"), ("labels", own["reference"], ".nii.gz"),
                                ("my_model", own["reference"], ".nii.gz")):
        (tmp_path / folder).mkdir()
        for case in cases:  # the thresholding model reproduces the reference: its predictions are the reference
            shutil.copy2(src / f"{case}{suffix}", tmp_path / folder / f"{case}{suffix}")
    shutil.copy2(own["dataset_json"], tmp_path / "dataset.json")
    shutil.copy2(own["script"], tmp_path / "my_model.py")
    results = tmp_path / "results"
    evaluate, robustness, report = commands

    _run(evaluate, tmp_path, core)
    table = pd.read_csv(results / "metrics.csv")
    assert len(table) == len(cases) * len(STRUCTURES) and set(table["model"]) == {"my_model"}
    assert (table["dsc"] == 1.0).all()

    _run(robustness, tmp_path, core)
    rob = pd.read_csv(results / "robustness.csv")
    flips = ("flip_lr", "flip_ap", "flip_si", "rot90_si", "rot180_si", "rot270_si", "prone", "feet_first")
    # docs: the --rotate set, and the resampling control of its small rotations
    conditions = {"original", *flips, "rot_z+10", "rot_z-10", "resample_z+10", "resample_z-10"}
    assert set(rob["condition"]) == conditions
    assert set(rob["model"]) == {"my_model"} and set(rob["case"]) == set(cases)
    assert len(rob) == len(conditions) * len(cases) * len(STRUCTURES)
    assert (results / "noise_floor.csv").is_file()
    # voxel permutations map back exactly, and the model segments by HU: the reference again
    assert (rob[rob["condition"].isin(("original",) + flips)]["dsc"] == 1.0).all()
    assert rob["dsc"].between(0.0, 1.0).all()

    _run(report, tmp_path, core)
    html = (results / "report.html").read_text()
    assert "no robustness run" not in html and "rot_z+10" in html and "flip_lr" in html
    assert "models: my_model" in html.lower()


def test_absent_command_of_its_docs_on_core_install(core, tmp_path):
    command = _bash_blocks(_section(ABSENT_DOC, "## CLI"), language="")[0][0]
    assert command.split()[:2] == ["oarbench", "absent"] and "--reference labelsTs/" in command
    own = make_folder_pair(tmp_path)
    shutil.copytree(own["model_a"], tmp_path / "predA")
    shutil.copytree(own["model_b"], tmp_path / "predFL")
    (tmp_path / "meta.csv").write_text("case,nephrectomy\n" + "".join(
        f"case{i:03d},{'left' if i == 0 else 'none'}\n" for i in range(N_CASES)))
    result = _run(command, tmp_path, core)
    cases = pd.read_csv(tmp_path / "absent" / "absent_cases.csv").sort_values("model")
    # both models keep case000's left kidney: 6 x 6 x 5 voxels of 1.5 x 1.5 x 3 mm = 1.215 mL
    assert list(cases["model"]) == ["fl", "local-A"] and set(cases["case"]) == {"case000"}
    assert list(cases["pred_ml"]) == pytest.approx([180 * 1.5 * 1.5 * 3.0 / 1000] * 2)
    table = pd.read_csv(tmp_path / "absent" / "absent.csv")
    assert set(table["centre"]) == {"all"} and set(table["study"]) == {"own-data"}
    # the reference still has that kidney: one warning, shown once
    assert result.stderr.count("metadata says nephrectomy=left but the reference Kidney_L has 180 voxels") == 1
