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

Checks of one report of the demo study (a reduced demo run, built once per module):
at a 1,400 px wide window, with a probe script that measures the page after
``load`` (every ``<details>`` closed, as the report opens), the page height stays
below 15,000 px and no table is wider than the layout (its right edge within the
body's, and no table container that has to scroll); at 1,400 x 900 the headline
table and the whole of Figure 1 are on the first screen; printed to PDF (A4) it
has a bounded page count and every figure lies on one page (an image cut by a page
break is drawn on each page it spans, so it is named by more than one page of the
PDF); every image loads. Each check has a negative control (an over-wide table, a
page pushed down, an image taller than a page). A report of a plain
reference/prediction folder pair evaluated in folder mode has one section per
structure.

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
    assert n_img == 4  # Figure 1, the per-case figure, the Liver box plots (6 ok rows per group) and the montage

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


_NEEDS_CHROMIUM = pytest.mark.skipif(_CHROMIUM is None, reason="no chromium/google-chrome on PATH (apt-get install chromium)")


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> Path:
    """One report of a reduced demo run (3 test cases per centre), shared by the tests of this module."""
    if _CHROMIUM is None:
        pytest.skip("no chromium/google-chrome on PATH (apt-get install chromium)")
    from oarbench.demo import run_demo
    from tests.test_demo import _small_config

    tmp = tmp_path_factory.mktemp("demo-report")
    outputs = run_demo(tmp / "demo", config=_small_config(tmp, 3), workers=1, log=lambda _m: None)
    return outputs["report"]


@pytest.mark.slow
@_NEEDS_CHROMIUM
def test_demo_report_is_short_and_no_table_is_wider_than_the_layout(demo_report, tmp_path):
    report = demo_report
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


_FIRST_SCREEN_PROBE = (
    "<script>window.addEventListener('load', function () {"
    " function bottom(el) { return el ? Math.round(el.getBoundingClientRect().bottom) : -1; }"
    " var head = document.querySelector('#headline table'), fig = document.getElementById('figure-1');"
    " var img = fig ? fig.querySelector('img') : null;"
    " document.title = 'first headline=' + bottom(head) + ' figure=' + bottom(fig)"
    "  + ' figtop=' + (fig ? Math.round(fig.getBoundingClientRect().top) : -1)"
    "  + ' loaded=' + (img && img.complete && img.naturalWidth > 0 ? 1 : 0)"
    "  + ' viewport=' + window.innerHeight; });</script>"
)


def _first_screen(html_path: Path, profile: Path) -> dict[str, int]:
    probed = html_path.with_name(html_path.stem + "-first.html")
    probed.write_text(html_path.read_text().replace("</body>", _FIRST_SCREEN_PROBE + "</body>"))
    res = _chromium(["--window-size=1400,900", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                    profile, timeout=120.0)
    match = re.search(r"<title>first ([^<]*)</title>", res.stdout)
    assert match, f"first-screen probe did not run; chromium rc={res.returncode}, stderr tail: {res.stderr[-800:]}"
    return {k: int(v) for k, v in (kv.split("=") for kv in match.group(1).split())}


@pytest.mark.slow
@_NEEDS_CHROMIUM
def test_demo_first_screen_shows_the_headline_and_figure_one(demo_report, tmp_path):
    """At 1,400 x 900 (no scrolling) the headline table and the whole of Figure 1, caption included, are on screen."""
    got = _first_screen(demo_report, tmp_path / "profile-first")
    assert got["loaded"] == 1, got
    assert 0 < got["headline"] <= 900 and 0 < got["figure"] <= 900, got
    # negative control: the same page with 600 px of text above the headline fails the check
    pushed = tmp_path / "pushed.html"
    pushed.write_text(demo_report.read_text().replace("<section id='headline'>",
                                                      "<div style='height:600px'>x</div><section id='headline'>", 1))
    got = _first_screen(pushed, tmp_path / "profile-pushed")
    assert got["figure"] > 900, got


def _pdf_pages_and_images(pdf: bytes) -> tuple[list[bytes], dict[int, int]]:
    """The page objects of a (Skia) PDF and, per image XObject, on how many pages it is drawn.

    An image cut by a page break is drawn (clipped) on each page it spans, so it is named in the
    resources of more than one page.
    """
    objs = {int(m.group(1)): m.group(2) for m in re.finditer(rb"(\d+) 0 obj(.*?)endobj", pdf, re.S)}
    images = {n for n, body in objs.items() if re.search(rb"/Subtype\s*/Image", body)}
    pages = [body for body in objs.values() if re.search(rb"/Type\s*/Page\b(?!s)", body)]
    count = {i: 0 for i in images}
    for body in pages:
        m = re.search(rb"/XObject\s*<<(.*?)>>", body, re.S)
        for ref in {int(r) for r in re.findall(rb"(\d+) 0 R", m.group(1))} if m else set():
            if ref in count:
                count[ref] += 1
    return pages, count


def _print_pdf(html_path: Path, profile: Path) -> bytes:
    pdf = html_path.with_suffix(".pdf")
    res = _chromium(["--no-pdf-header-footer", f"--print-to-pdf={pdf}", html_path.as_uri()], profile, timeout=120.0)
    assert pdf.is_file(), f"no PDF; chromium rc={res.returncode}, stderr tail: {res.stderr[-800:]}"
    return pdf.read_bytes()


@pytest.mark.slow
@_NEEDS_CHROMIUM
def test_demo_report_prints_to_a4_with_no_figure_cut(demo_report, tmp_path):
    import base64
    import io

    from matplotlib.image import imsave

    text = demo_report.read_text()
    pages, images = _pdf_pages_and_images(_print_pdf(demo_report, tmp_path / "profile-pdf"))
    # A4 portrait: 210 x 297 mm = 595.3 x 841.9 pt (@page size A4; chromium rounds to its pixel grid)
    for page in pages:
        box = re.search(rb"/MediaBox\s*\[0 0 ([\d.]+) ([\d.]+)\]", page)
        assert box and abs(float(box.group(1)) - 595.28) < 1 and abs(float(box.group(2)) - 841.89) < 1, page[:300]
    assert 3 <= len(pages) <= 40, len(pages)
    # every figure shown open is printed, each on one page only (figures are not split: @media print)
    n_figures = text.count("<figure ")
    assert n_figures >= 3 and len(images) >= n_figures, (n_figures, images)
    assert all(n == 1 for n in images.values()), images
    # negative control: an image taller than a page, outside any figure, is cut, and the check sees it
    buf = io.BytesIO()
    imsave(buf, np.random.default_rng(0).random((400, 100)), format="png")
    tall = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    bad = tmp_path / "tall.html"
    bad.write_text(text.replace("</body>", f"<img src='{tall}' style='height:600mm;width:50mm' alt='tall'></body>"))
    _, images = _pdf_pages_and_images(_print_pdf(bad, tmp_path / "profile-pdf-bad"))
    assert max(images.values()) > 1, images


@pytest.mark.slow
@_NEEDS_CHROMIUM
def test_demo_report_every_image_loads(demo_report, tmp_path):
    text = demo_report.read_text()
    probed = tmp_path / "probe.html"
    probed.write_text(text.replace("</body>", _PROBE + "</body>"))
    images, broken, res = _probe(probed, tmp_path / "profile-images")
    assert images == text.count("<img ") and images >= 4 and broken == 0
    assert _console_lines(res.stderr) == []


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
