"""README's "Scoring your own data" runs as written on a plain folder pair and ends in a report with content."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from oarbench.cli import main
from tests._owndata import N_CASES, make_folder_pair

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Scoring your own data"):]
    section = section[: section.index("\n## ", 4)]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section has one bash block of commands"
    return [ln for ln in blocks[0].splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


@pytest.mark.slow
def test_readme_own_data_commands_run_as_written(tmp_path, monkeypatch):
    make_folder_pair(tmp_path)  # the layout the README shows, dataset.json beside labelsTs/
    monkeypatch.chdir(tmp_path)
    commands = _readme_commands()
    assert [c.split()[:2] for c in commands] == [["oarbench", "evaluate"], ["oarbench", "stats"],
                                                 ["oarbench", "gallery"], ["oarbench", "report"]]
    for line in commands:
        words = shlex.split(line.split("#", 1)[0])
        result = CliRunner().invoke(main, words[1:])
        assert result.exit_code == 0, f"{line}\n{result.output}"
    html = (tmp_path / "results" / "report.html").read_text()
    assert "models: model_a, model_b" in html.lower() and f"centres: all ({N_CASES} cases)" in html.lower()
    for structure in ("Liver", "Spleen", "Kidney_L", "Kidney_R"):
        assert f"id='s-{structure}'" in html  # a per-structure section for each
    assert "No statistics table was given" not in html and "model_a" in html
    montages = list((tmp_path / "results" / "gallery").glob("*.png"))
    assert montages  # model_b's two-voxel shifts and missed spleen fail the gallery's rules
    assert html.count("data:image/png;base64,") >= 4 + len(montages)  # box plots and gallery montages
    stats = (tmp_path / "results" / "stats.csv").read_text().splitlines()
    assert len(stats) == 1 + 4 * 3  # header + one comparison per structure x metric
