"""What the command line prints besides results: warnings as one line, progress lines in logs."""

from __future__ import annotations

import io
import warnings

from click.testing import CliRunner


def test_warnings_are_one_clean_line_without_the_source_line(capsys):
    from oarbench.cli._common import one_line_warnings

    before = warnings.showwarning
    with one_line_warnings():
        warnings.warn("case P001: image already RAS, reorient_RAS skipped", UserWarning, stacklevel=1)
    assert warnings.showwarning is before  # restored
    err = capsys.readouterr().err
    assert err == "warning: case P001: image already RAS, reorient_RAS skipped\n"
    assert ".py" not in err and "warnings.warn" not in err


def test_line_progress_in_logs_and_none_when_off():
    from oarbench.progress import LineBar, NoBar, progress_bar

    log = io.StringIO()  # not a terminal
    bar = progress_bar(40, desc="phantoms (dicom)", unit="patients", lines=True, file=log)
    assert isinstance(bar, LineBar)
    with bar:
        for i in range(40):
            bar.set_postfix_str(f"A case{i}")
            bar.update(1)
    lines = log.getvalue().splitlines()
    # one line every 2 steps (5 % of 40), the last one at 40/40; never a carriage return
    assert len(lines) == 20 and lines[-1] == "phantoms (dicom): 40/40 patients (A case39)"
    assert "\r" not in log.getvalue()
    assert isinstance(progress_bar(40, desc="x", lines=True, enabled=False, file=log), NoBar)
    assert isinstance(progress_bar(40, desc="x", file=io.StringIO()), NoBar)  # without lines: silent as before


def test_phantoms_dicom_prints_progress_lines_when_not_a_terminal(tmp_path, monkeypatch):
    import oarbench.dicom.phantoms as dp
    from oarbench.cli import main

    def fake(out_dir, config, *, progress=None):
        for i in range(3):
            progress(f"A case{i}")
        path = tmp_path / "out" / "dicom_manifest.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("centre,case\nA,case0\n")
        return path

    monkeypatch.setattr(dp, "generate_dicom_study", fake)
    res = CliRunner().invoke(main, ["phantoms", "--format", "dicom", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    import re

    # the default study has 52 patients: a line every 2 (5 %), here after the second of the three
    assert re.search(r"^phantoms \(dicom\): 2/52 patients \(A case1\)$", res.output, re.M), res.output
    res = CliRunner().invoke(main, ["phantoms", "--format", "dicom", "--out", str(tmp_path / "out2"), "--no-progress"])
    assert res.exit_code == 0 and "phantoms (dicom):" not in res.output
