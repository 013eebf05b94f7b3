"""Progress bars on all long work, off only with --no-progress (--quiet keeps the bar)."""

from __future__ import annotations

import io

import pytest
from click.testing import CliRunner

import oarbench.evaluate
import oarbench.progress
import oarbench.robustness.run
from oarbench.cli import main
from oarbench.progress import NoBar, progress_bar
from tests._owndata import N_CASES, make_folder_pair


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_draws_on_a_terminal_only():
    tty = _Tty()
    bar = progress_bar(3, desc="evaluate", enabled=True, file=tty)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "evaluate" in tty.getvalue() and "/3 [" in tty.getvalue()
    assert isinstance(progress_bar(3, desc="x", enabled=False, file=_Tty()), NoBar)  # --no-progress
    assert isinstance(progress_bar(3, desc="x", enabled=True, file=io.StringIO()), NoBar)  # piped / a log file


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, total, *, desc, unit="case", enabled=True, file=None):
        self.calls.append((desc.split()[0], total, enabled))
        return NoBar()


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    return make_folder_pair(tmp_path_factory.mktemp("own"))


def _run(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_every_long_command_has_a_bar_and_no_progress_turns_it_off(own, tmp_path, monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(oarbench.evaluate, "progress_bar", rec)
    monkeypatch.setattr(oarbench.robustness.run, "progress_bar", rec)
    monkeypatch.setattr(oarbench.progress, "progress_bar", rec)  # commands that import it when they run
    out = tmp_path / "o"
    base = ["--reference", own["reference"], "--labels", own["dataset_json"], "--out", out]
    _run(["evaluate", "--prediction", own["model_a"], *base, "--quiet", "--force"])
    _run(["evaluate", "--prediction", own["model_a"], *base, "--quiet", "--force", "--no-progress"])
    spec = f"command:{own['python']} {own['script']} --in {{input}} --out {{output}}"
    _run(["robustness", "--images", own["images"], "--reference", own["reference"], "--predictor", spec,
          "--conditions", "flip_lr", "--labels", own["dataset_json"], "--out", out])
    _run(["gallery", out / "metrics.csv", "--images", own["images"], "--reference", own["reference"],
          "--predictions", own["model_a"], "--out", out, "--dsc-below", "0.99"])
    _run(["report", out, "--no-box-plots"])
    _run(["report", out, "--no-box-plots", "--no-progress"])
    _run(["phantoms", "--out", tmp_path / "ph", "--cases-per-centre", "1", "--no-progress"])
    got = {}
    for name, total, enabled in rec.calls:
        got.setdefault(name, []).append((total, enabled))
    assert got["evaluate"] == [(N_CASES, True), (N_CASES, False)]  # --quiet keeps the bar
    assert got["robustness"] == [(2 * N_CASES, True)]  # case x condition (original + flip_lr)
    assert got["gallery"][0][1] is True and got["gallery"][0][0] >= 1
    assert got["report"] == [(1, True), (1, False)]
    assert got["phantoms"][0][1] is False
