"""The HTML report: numbers in its tables, self-containment, escaping, the CLI."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from click.testing import CliRunner  # noqa: E402

from oarbench.report import build_report, quantile_inf, robustness_deltas, summary_table  # noqa: E402

inf, nan = math.inf, math.nan


def _row(case, status, dsc, hd95, msd, *, model="m1", centre="A", structure="Liver", condition="original", label=1):
    return dict(study="demo", centre=centre, model=model, condition=condition, case=case, structure=structure,
                label=label, status=status, dsc=dsc, hd95=hd95, msd=msd)


def results() -> pd.DataFrame:
    return pd.DataFrame([
        _row("c1", "ok", 0.9, 3.0, 1.0),
        _row("c2", "ok", 0.8, 4.0, 2.0),
        _row("c3", "missed", 0.0, inf, inf),
        _row("c4", "absent", nan, nan, nan),
        _row("c1", "ok", 0.7, 5.0, 1.5, model="m2"),
        _row("c1", "missed", 0.0, inf, inf, condition="flip_lr"),
        _row("c2", "ok", 0.7, 5.0, 2.5, condition="flip_lr"),
        _row("c1", "ok", 0.85, 6.0, 1.2, structure="Kidney_L", label=3),
    ])


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _parse(text: str) -> _Collector:
    c = _Collector()
    c.feed(text)
    return c


def test_quantile_inf_matches_numpy_on_finite_and_orders_inf_last():
    vals = [4.0, 1.0, 3.0, 2.0]
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        assert quantile_inf(vals, q) == pytest.approx(float(np.quantile(vals, q)))
    # [1, 2, inf]: median 2; Q3 at h = 1.5 lies between 2 and inf -> inf; Q1 at h = 0.5 -> 1.5.
    assert quantile_inf([1.0, inf, 2.0], 0.5) == 2.0
    assert quantile_inf([1.0, inf, 2.0], 0.75) == inf
    assert quantile_inf([1.0, inf, 2.0], 0.25) == 1.5
    # numpy gives NaN for inf - inf; the order statistic is inf.
    assert quantile_inf([inf, inf], 0.5) == inf
    assert math.isnan(quantile_inf([nan], 0.5))


def test_summary_table_counts_statuses_and_ranks_missed_as_worst():
    s = summary_table(results(), "Liver").set_index("model")
    a = s.loc["m1"]
    assert (a.n_ok, a.n_missed, a.n_hallucinated, a.n_absent, a.n_missing) == (2, 1, 0, 1, 0)
    # DSC over ok + missed: [0, .8, .9] -> median .8, Q1 (h=.5) .4, Q3 (h=1.5) .85.
    assert (a.dsc_median, a.dsc_q1, a.dsc_q3) == pytest.approx((0.8, 0.4, 0.85))
    # HD95 [3, 4, inf] -> median 4, Q1 3.5, Q3 inf. Flip rows are not in the summary.
    assert (a.hd95_median, a.hd95_q1, a.hd95_q3) == (4.0, 3.5, inf)
    assert s.loc["m2"].dsc_median == 0.7


def test_robustness_deltas_pair_by_case():
    d = robustness_deltas(results())
    assert len(d) == 1
    r = d.iloc[0]
    assert (r.structure, r.model, r.centre, r.condition) == ("Liver", "m1", "A", "flip_lr")
    # c1: 0 - .9 = -.9 ; c2: .7 - .8 = -.1 -> median -.5, Q1 -.9 + .25*.8 = -.7, Q3 -.3.
    assert r.n_pairs == 2
    assert (r.delta_dsc_median, r.delta_dsc_q1, r.delta_dsc_q3) == pytest.approx((-0.5, -0.7, -0.3))
    # HD95 pairs with both finite: c2 only, 5 - 4 = 1 mm. Status changed: c1 ok -> missed.
    assert (r.n_hd95_pairs, r.delta_hd95_median, r.n_status_changed) == (1, pytest.approx(1.0), 1)
    assert robustness_deltas(results()[lambda t: t.condition == "original"]).empty


def _gallery(folder):
    from oarbench.plots import _pyplot_free_figure, save_png

    folder.mkdir()
    fig = _pyplot_free_figure(figsize=(2, 2))
    fig.add_subplot(1, 1, 1).plot([0, 1], [0, 1])
    save_png(fig, folder / "Liver.png")
    pd.DataFrame([dict(structure="Liver", centre="A", model="m1", condition="original", case="c3", status="missed",
                       dsc=0.0, hd95=inf, reason="missed", drawn=True, note="", montage="Liver.png", panel=1,
                       plane="axial", slice_index=4)]).to_csv(folder / "index.csv", index=False)


def test_report_is_self_contained_marks_significance_and_escapes(tmp_path):
    table = results()
    table.loc[table.model == "m2", "model"] = "<script>alert('x')</script>"
    stats = pd.DataFrame([
        dict(structure="Liver", metric="dsc", comparison="m1 vs m2", centre="A", n=6, p=0.004, p_adjusted=0.01,
             verdict="different"),
        dict(structure="Kidney_L", metric="dsc", comparison="m1 vs m2", centre="A", n=6, p=0.1, p_adjusted=0.2,
             verdict="not significant"),
    ])
    absent = pd.DataFrame([dict(case="c9", side="left", structure="Kidney_L", fp_ml=1.25, note="<b>FP</b>")])
    _gallery(tmp_path / "gallery")
    prov = {"versions": {"oarbench": "0.1.0"}, "options": {"tolerance_mm": 2.0}, "inputs": {"a.nii.gz": "ab" * 32}}
    path = build_report(tmp_path / "out", table, stats=stats, absent=absent, gallery_dir=tmp_path / "gallery",
                        provenance=prov)
    assert path == tmp_path / "out" / "report.html"
    text = path.read_text()
    tags = _parse(text).tags
    imgs = [a for t, a in tags if t == "img"]
    # 2 structures x 1 box-plot figure + 1 gallery montage
    assert len(imgs) == 3
    for a in imgs:
        assert a["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(a["src"].split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
        assert a.get("alt")
    # nothing external, no script at all
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed")]
    for _, a in tags:
        for key in ("src", "href"):
            if key in a:
                assert not a[key].startswith(("http:", "https:", "//")), a[key]
    # the model name with markup appears escaped, as text, never as markup
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "&lt;b&gt;FP&lt;/b&gt;" in text and "<b>FP</b>" not in text
    # exactly one significant p_adjusted cell, marked
    sig = [a for t, a in tags if t == "td" and "sig" in a.get("class", "").split()]
    assert len(sig) == 1
    assert ">0.01 *</td>" in text and "0.2 *" not in text
    # sections
    for anchor in ("study", "summary", "stats", "robustness", "absent", "gallery", "provenance"):
        assert f"id='{anchor}'" in text
    assert "options.tolerance_mm" in text and "ab" * 32 in text
    # summary row of Liver m1 A: DSC median [Q1–Q3] over ok+missed = 0.800 [0.400–0.850]
    assert "0.800 [0.400–0.850]" in text
    # robustness: ΔDSC -0.500 [-0.700–-0.300]
    assert "-0.500 [-0.700–-0.300]" in text


def test_report_says_what_is_missing(tmp_path):
    path = build_report(tmp_path, results(), box_plots=False, notes=["not found: stats.csv"])
    text = path.read_text()
    assert "No statistics table was given" in text
    assert "No absent-organ table was given" in text
    assert "No gallery folder was given" in text
    assert "No run record was given" in text
    assert "not found: stats.csv" in text
    assert "<img" not in text


def test_report_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="missing column"):
        build_report(tmp_path, results().drop(columns=["status"]), box_plots=False)
    with pytest.raises(ValueError, match="stats.csv"):
        build_report(tmp_path, results(), stats=tmp_path / "stats.csv", box_plots=False)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="run.json"):
        build_report(tmp_path, results(), provenance=tmp_path / "run.json", box_plots=False)


def test_cli_report_reads_what_exists(tmp_path):
    from oarbench.cli import main

    results().to_csv(tmp_path / "metrics.csv", index=False)
    (tmp_path / "run.json").write_text(json.dumps({"command": "oarbench evaluate", "seed": 7}))
    pd.DataFrame([dict(structure="Liver", p_adjusted=0.001)]).to_csv(tmp_path / "stats.csv", index=False)
    res = CliRunner().invoke(main, ["report", str(tmp_path), "--no-box-plots"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "report.html"
    text = out.read_text()
    assert "not found: absent.csv" in text and "not found: gallery/" in text
    assert "seed" in text and "0.001 *" in text
    assert "absent.csv" in res.output  # said on the terminal as well
    other = tmp_path / "elsewhere" / "r.html"
    res = CliRunner().invoke(main, ["report", str(tmp_path), "--out", str(other), "--no-box-plots"])
    assert res.exit_code == 0 and other.is_file()


def test_cli_report_without_metrics_fails(tmp_path):
    from oarbench.cli import main

    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code != 0 and "metrics.csv" in res.output


def test_report_marks_exactly_the_significant_rows_of_the_stats_module(tmp_path):
    import oarbench.stats as stats_mod
    # m1 beats m2 on every one of 10 paired cases -> the signed-rank test has its smallest p.
    rows = []
    for i in range(10):
        rows.append(_row(f"c{i}", "ok", 0.90 + 0.005 * i, 3.0 + 0.1 * i, 1.0))
        rows.append(_row(f"c{i}", "ok", 0.80 + 0.004 * i, 5.0 + 0.2 * i, 2.0, model="m2"))
    table = pd.DataFrame(rows)
    stats = stats_mod.run_stats(table)
    expected = int((pd.to_numeric(stats["p_adjusted"], errors="coerce") < 0.05).sum())
    if "p_noninferiority_adjusted" in stats.columns:
        expected += int((pd.to_numeric(stats["p_noninferiority_adjusted"], errors="coerce") < 0.05).sum())
    assert expected >= 1
    text = build_report(tmp_path, table, stats=stats, box_plots=False).read_text()
    sig = [a for t, a in _parse(text).tags if t == "td" and "sig" in a.get("class", "").split()]
    assert len(sig) == expected
