"""The report in a real headless browser (Debian ``chromium``).

Three runs of chromium:

1. the report as written, with ``--screenshot`` and console logging to stderr:
   the screenshot must not be blank and no console message may be logged (the
   report has no script, so any ``CONSOLE`` line means an error such as an
   uncaught exception or a refused resource);
2. a copy of the report with a small probe script appended that, after the
   ``load`` event, writes into ``document.title`` how many ``<img>`` there are
   and how many failed to load (``naturalWidth == 0``); read back with
   ``--dump-dom``;
3. a negative control: the same copy plus a broken image and a console error,
   proving that both checks do detect failures.

Layout checks at a 1,400 px wide window, with a probe script that measures the
page after ``load`` (every ``<details>`` closed, as the report opens): the page
height of a report of the demo study (a reduced demo run) stays below 15,000 px,
no table is wider than the layout (its right edge within the body's, and no
table container that has to scroll), and a report of a plain reference/prediction
folder pair evaluated in folder mode has one section per structure. A negative
control (an over-wide table appended to a copy) proves the width check fires.

Skipped (with the reason) where no chromium is installed: ``apt-get install chromium``.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

pytestmark = pytest.mark.browser

_CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)

_PROBE = (
    "<script>window.addEventListener('load', function () {"
    " var im = document.images, broken = 0;"
    " for (var i = 0; i < im.length; i++) { if (!im[i].complete || im[i].naturalWidth === 0) broken++; }"
    " document.title = 'probe images=' + im.length + ' broken=' + broken; });</script>"
)


def _chromium(args: list[str], profile: Path, timeout: float = 50.0) -> subprocess.CompletedProcess:
    cmd = [
        _CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        "--enable-logging=stderr", "--v=0", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if ":CONSOLE" in line or "Uncaught" in line or "Failed to load" in line]


def _probe(html_path: Path, profile: Path) -> tuple[int, int, subprocess.CompletedProcess]:
    res = _chromium(["--virtual-time-budget=5000", "--dump-dom", html_path.as_uri()], profile)
    match = re.search(r"<title>probe images=(\d+) broken=(\d+)</title>", res.stdout)
    assert match, f"probe did not run; chromium rc={res.returncode}, stderr tail: {res.stderr[-800:]}"
    return int(match.group(1)), int(match.group(2)), res


def _report(tmp_path: Path) -> Path:
    from oarbench.gallery import make_tile
    from oarbench.plots import montage_figure, save_png
    from oarbench.report import build_report

    rows = []
    rng = np.random.default_rng(0)
    for model in ("local-A", "fl"):
        for centre in ("A", "B"):
            for i in range(6):
                rows.append(dict(study="demo", centre=centre, model=model, condition="original", case=f"{centre}{i}",
                                 structure="Liver", label=1, status="ok", dsc=float(rng.uniform(0.85, 0.97)),
                                 hd95=float(rng.uniform(2, 9)), msd=float(rng.uniform(0.5, 2))))
    rows.append(dict(study="demo", centre="B", model="fl", condition="original", case="B9", structure="Liver", label=1,
                     status="missed", dsc=0.0, hd95=math.inf, msd=math.inf))
    table = pd.DataFrame(rows)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    ref = np.zeros((12, 40, 40), bool)
    ref[3:9, 10:30, 10:30] = True
    tile = make_tile(rng.normal(40, 30, ref.shape), ref, np.roll(ref, 4, axis=2), (2.5, 0.8, 0.8), structure="Liver",
                     meta=dict(case="A0", model="fl", centre="A", dsc=0.8, hd95=3.2))
    save_png(montage_figure([tile, tile], ncols=2, title="Liver"), gallery / "Liver.png")
    stats = pd.DataFrame([dict(structure="Liver", metric="dsc", comparison="fl vs local-A", centre="A", n=6,
                               p=0.03, p_adjusted=0.03, verdict="different")])
    return build_report(tmp_path / "out", table, stats=stats, gallery_dir=gallery, provenance={"seed": 1})


@pytest.mark.skipif(_CHROMIUM is None, reason="no chromium/google-chrome on PATH (apt-get install chromium)")
def test_report_opens_in_headless_chromium(tmp_path):
    from matplotlib.image import imread

    report = _report(tmp_path)
    text = report.read_text()
    n_img = text.count("<img ")
    assert n_img == 2  # one box-plot figure + one montage

    # 1. the report as written: screenshot, no console messages
    shot = tmp_path / "shot.png"
    res = _chromium(["--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}", report.as_uri()],
                    tmp_path / "profile1")
    assert shot.is_file(), f"no screenshot; rc={res.returncode}, stderr tail: {res.stderr[-800:]}"
    assert _console_lines(res.stderr) == []
    pixels = imread(str(shot))[..., :3]
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    dark = (pixels.mean(axis=2) < 0.5).mean()
    assert 0.005 < dark < 0.6, f"screenshot looks blank or black (dark fraction {dark:.4f})"

    # 2. every image loads
    probed = tmp_path / "probe.html"
    probed.write_text(text.replace("</body>", _PROBE + "</body>"))
    images, broken, res = _probe(probed, tmp_path / "profile2")
    assert (images, broken) == (n_img, 0)
    assert _console_lines(res.stderr) == []

    # 3. negative control: the same checks catch a broken image and a console error
    bad = tmp_path / "bad.html"
    bad.write_text(text.replace("</body>", "<img src='does-not-exist.png' alt='x'>"
                                "<script>console.error('deliberate')</script>" + _PROBE + "</body>"))
    images, broken, res = _probe(bad, tmp_path / "profile3")
    assert (images, broken) == (n_img + 1, 1)
    assert any("deliberate" in line for line in _console_lines(res.stderr))


# --------------------------------------------------------------------------- layout at 1,400 px

_LAYOUT_PROBE = (
    "<script>window.addEventListener('load', function () {"
    " var b = document.body.getBoundingClientRect(), wide = [];"
    " var ts = document.querySelectorAll('table');"
    " for (var i = 0; i < ts.length; i++) { var r = ts[i].getBoundingClientRect();"
    "   if (r.width > 0 && (r.right > b.right + 1 || r.width > b.width + 1)) wide.push(i); }"
    " var ws = document.querySelectorAll('.tw');"
    " for (var j = 0; j < ws.length; j++) { if (ws[j].clientWidth > 0 && ws[j].scrollWidth > ws[j].clientWidth + 1) wide.push('c' + j); }"
    " var open = document.querySelectorAll('details[open]').length;"
    " document.title = 'layout height=' + document.documentElement.scrollHeight + ' body=' + Math.round(b.width)"
    "  + ' tables=' + ts.length + ' wide=' + wide.length + ' open=' + open"
    "  + ' structures=' + document.querySelectorAll('details.structure').length; });</script>"
)


def _layout(html_path: Path, profile: Path, width: int = 1400) -> dict[str, int]:
    probed = html_path.with_name(html_path.stem + "-layout.html")
    probed.write_text(html_path.read_text().replace("</body>", _LAYOUT_PROBE + "</body>"))
    res = _chromium([f"--window-size={width},1000", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                    profile, timeout=120.0)
    match = re.search(r"<title>layout ([^<]*)</title>", res.stdout)
    assert match, f"layout probe did not run; chromium rc={res.returncode}, stderr tail: {res.stderr[-800:]}"
    return {k: int(v) for k, v in (kv.split("=") for kv in match.group(1).split())}


@pytest.mark.slow
@pytest.mark.skipif(_CHROMIUM is None, reason="no chromium/google-chrome on PATH (apt-get install chromium)")
def test_demo_report_is_short_and_no_table_is_wider_than_the_layout(tmp_path):
    from oarbench.demo import run_demo
    from tests.test_demo import _small_config

    outputs = run_demo(tmp_path / "demo", config=_small_config(tmp_path, 3), workers=1, log=lambda _m: None)
    report = outputs["report"]
    got = _layout(report, tmp_path / "profile-demo")
    assert got["open"] == 0 and got["tables"] >= 10
    assert got["structures"] == 19  # one closed section per structure of the 19-OAR map
    assert got["height"] < 15000, got
    assert got["body"] <= 1400 and got["wide"] == 0, got
    # negative control: a table wider than the layout is caught
    wide = tmp_path / "wide.html"
    cells = "".join(f"<td>{'x' * 30}{i}</td>" for i in range(60))
    wide.write_text(report.read_text().replace("</body>", f"<table style='white-space:nowrap'><tr>{cells}</tr></table></body>"))
    assert _layout(wide, tmp_path / "profile-wide")["wide"] >= 1


def _write_label(path: Path, array: np.ndarray) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(img, str(path))


@pytest.mark.skipif(_CHROMIUM is None, reason="no chromium/google-chrome on PATH (apt-get install chromium)")
def test_folder_mode_report_has_per_structure_sections(tmp_path):
    from click.testing import CliRunner

    from oarbench.cli import main

    ref_dir, pred_dir, out = tmp_path / "reference", tmp_path / "predictions", tmp_path / "results"
    ref_dir.mkdir()
    pred_dir.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        ref = np.zeros((12, 40, 40), np.uint8)
        ref[2:10, 5:25, 5:25] = 1          # Liver
        ref[3:8, 28:36, 5:14] = 2          # Spleen
        ref[3:8, 28:36, 22:30] = 3         # Kidney_L
        pred = ref.copy()
        pred[np.roll(ref == 1, int(rng.integers(1, 4)), axis=2) & (ref == 0)] = 1
        _write_label(ref_dir / f"ct{i:03d}.nii.gz", ref)
        _write_label(pred_dir / f"ct{i:03d}.nii.gz", pred)
    res = CliRunner().invoke(main, ["evaluate", "--reference", str(ref_dir), "--prediction", str(pred_dir),
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["report", str(out), "--no-box-plots"])
    assert res.exit_code == 0, res.output
    report = out / "report.html"
    text = report.read_text()
    for structure in ("Liver", "Spleen", "Kidney_L"):
        assert f"id='s-{structure}'" in text, structure
    assert "Centres: none" not in text and "nan @ nan" not in text
    got = _layout(report, tmp_path / "profile-folder")
    assert got["structures"] >= 3 and got["wide"] == 0, got
