"""The HTML report: numbers in its tables, self-containment, escaping, the CLI."""

from __future__ import annotations

import base64
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from click.testing import CliRunner  # noqa: E402

from oarbench.gallery import FailureCriteria  # noqa: E402
from oarbench.report import (  # noqa: E402
    ReportOptions,
    build_report,
    headline_table,
    noise_floor_table,
    quantile_inf,
    robustness_deltas,
    summary_table,
    suspicious_values,
)

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
    # Figure 1, the per-case figure, the robustness figure (flip_lr rows) and the gallery montage; no per-structure
    # box plots: no model/centre group has MIN_BOX_N ok rows
    assert len(imgs) == 4
    assert [a["alt"] for a in imgs if "box plots" in a["alt"]] == []
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
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in text
    assert "&lt;b&gt;FP&lt;/b&gt;" in text and "<b>FP</b>" not in text
    # exactly one significant p_adjusted cell, marked
    sig = [a for t, a in tags if t == "td" and "sig" in a.get("class", "").split()]
    assert len(sig) == 1
    assert ">0.01 *</td>" in text and "0.2 *" not in text
    # sections
    for anchor in ("headline", "accuracy", "summary", "explanations", "stats", "robustness", "absent", "failures",
                   "gallery", "provenance", "s-Liver", "s-Kidney_L"):
        assert f"id='{anchor}'" in text, anchor
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
    # without box plots only the summary figures are drawn: Figure 1 and the per-case figure (flip_lr rows: and
    # the robustness figure)
    alts = [a["alt"] for t, a in _parse(text).tags if t == "img"]
    assert alts and not [a for a in alts if a.startswith("box plots")]
    assert any(a.startswith("Figure 1") for a in alts)


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


# --------------------------------------------------------------------------- paper layout


def _sections(text: str) -> dict[str, str]:
    """Section id -> its HTML (between <section id=...> and </section>)."""
    out = {}
    for part in text.split("<section id='")[1:]:
        sid, rest = part.split("'", 1)
        out[sid] = rest.split("</section>", 1)[0]
    return out


def test_headline_table_per_case_mean_dsc_within_and_cross():
    rows = []
    # m1 at A: case a1 structures DSC .9 and .7 -> mean .8; a2: .6 and missed (0) -> .3; a3 absent only -> no score.
    rows += [_row("a1", "ok", 0.9, 3.0, 1.0), _row("a1", "ok", 0.7, 3.0, 1.0, structure="Spleen", label=2)]
    rows += [_row("a2", "ok", 0.6, 3.0, 1.0), _row("a2", "missed", 0.0, inf, inf, structure="Spleen", label=2)]
    rows += [_row("a3", "absent", nan, nan, nan)]
    # m1 at B: one case, DSC 1.0
    rows += [_row("b1", "ok", 1.0, 0.0, 0.0, centre="B")]
    h = headline_table(pd.DataFrame(rows), trained_on={"m1": ["A"]}).set_index("centre")
    # per-case means [.8, .3]: median .55, Q1 .3 + .25 * .5 = .425, Q3 .675
    assert h.loc["A", "n_cases"] == 2 and h.loc["A", "n_missed"] == 1
    assert (h.loc["A", "dsc_median"], h.loc["A", "dsc_q1"], h.loc["A", "dsc_q3"]) == pytest.approx((0.55, 0.425, 0.675))
    assert h.loc["A", "setting"] == "within" and h.loc["B", "setting"] == "cross"
    assert set(headline_table(pd.DataFrame(rows))["setting"]) == {""}


def test_suspicious_values_follow_from_real_masks():
    from oarbench.metrics import dice, hd, hd95

    # 1. a 10-voxel cube and the same cube plus one voxel on its face, 3 mm voxels: DSC < 1 but almost every
    #    surface element coincides, so HD95 = 0 (HD = 3 mm, the one voxel).
    a = np.zeros((20, 20, 20), bool)
    a[5:15, 5:15, 5:15] = True
    b = a.copy()
    b[15, 9, 9] = True
    d1, h1, hmax = dice(a, b), hd95(a, b, (3, 3, 3)), hd(a, b, (3, 3, 3))
    assert d1 < 1 and h1 == 0.0 and hmax == 3.0
    # 2. reference = a 4-voxel cube plus a 2-voxel cube 25 voxels away (an island); prediction = the main cube.
    #    The island is 8 of 72 voxels (DSC 2*64/136 = .941) but a large share of the surface, so HD95 is its distance.
    r = np.zeros((40, 40, 40), bool)
    r[5:9, 5:9, 5:9] = True
    p = r.copy()
    r[33:35, 33:35, 33:35] = True
    d2, h2 = dice(r, p), hd95(r, p, (1, 1, 1))
    assert d2 == pytest.approx(128 / 136) and h2 > 20
    rows = [
        dict(_row("cube", "ok", d1, h1, 0.0), hd=hmax, tp=1000, fn=0, fp=1),
        dict(_row("island", "ok", d2, h2, 1.0), tp=64, fn=8, fp=0),
        dict(_row("dot", "missed", 0.0, inf, inf), tp=0, fn=1, fp=0),          # a one-voxel reference
        dict(_row("fine", "ok", 0.95, 2.0, 0.5), tp=5000, fn=100, fp=100),
        dict(_row("perfect", "ok", 1.0, 0.0, 0.0), tp=50, fn=0, fp=0),         # DSC 1 with HD95 0 is no puzzle
    ]
    sus = suspicious_values(pd.DataFrame(rows), hd95_above=10, high_dsc=0.9, small_reference_voxels=10)
    got = sorted(zip(sus["case"], sus["kind"]))
    assert got == [("cube", "hd95_zero"), ("dot", "small_reference"), ("island", "far_island")]
    assert sus.set_index("case").loc["dot", "ref_voxels"] == 1
    assert suspicious_values(pd.DataFrame(rows), small_reference_voxels=0)["kind"].tolist().count("small_reference") == 0


def test_noise_floor_table_lossless_zero_and_resampled_from_the_floor_rows():
    floor = pd.DataFrame([
        dict(condition="rot_z+10", case="c1", structure="Liver", dsc=0.98, hd95=1.0, status="ok"),
        dict(condition="rot_z+10", case="c2", structure="Liver", dsc=0.96, hd95=2.0, status="ok"),
        dict(condition="rot_z+10", case="c3", structure="Liver", dsc=nan, hd95=nan, status="absent"),
    ])
    t = noise_floor_table(floor, ["flip_lr", "rot_z+10", "rot_x-5", "prone"]).set_index("condition")
    assert t.loc["flip_lr", "kind"] == "lossless" and t.loc["flip_lr", "floor_delta_dsc_min"] == 0.0
    assert t.loc["prone", "kind"] == "lossless"
    # ΔDSC = dsc - 1 over defined rows: [-.02, -.04] -> median -.03, min -.04; HD95 median 1.5 mm
    r = t.loc["rot_z+10"]
    assert (r.kind, r.n) == ("resampled", 2)
    assert (r.floor_delta_dsc_median, r.floor_delta_dsc_min, r.floor_hd95_median) == pytest.approx((-0.03, -0.04, 1.5))
    assert t.loc["rot_x-5", "kind"] == "not given"


def _robust_rows():
    rows = []
    for i, (d0, d1) in enumerate([(0.9, 0.85), (0.8, 0.8), (0.95, 0.5)]):
        rows.append(_row(f"c{i}", "ok", d0, 3.0, 1.0))
        rows.append(_row(f"c{i}", "ok", d1, 4.0, 1.0, condition="rot_z+10"))
    return pd.DataFrame(rows)


def test_report_robustness_shows_the_noise_floor_and_pairs_below_it(tmp_path):
    floor = pd.DataFrame([dict(condition="rot_z+10", case=f"c{i}", structure="Liver", dsc=v, hd95=1.0, status="ok")
                          for i, v in enumerate([0.99, 0.97, 0.98])])
    table = _robust_rows()
    text = build_report(tmp_path, table[table.condition == "original"], robustness=table, noise_floor=floor,
                        box_plots=False).read_text()
    rob = _sections(text)["robustness"]
    # ΔDSC per pair: -.05, 0, -.45 -> median -.05, Q1 -.25, Q3 -.025; floor ΔDSC median -.02, min -.03:
    # pairs below the floor's minimum: -.05 and -.45 -> 2.
    assert "-0.050 [-0.250–-0.025]" in rob
    assert "<td class=\"t\">-0.020</td>" in rob and "<td>2</td>" in rob
    assert "resampled" in rob


def test_report_failure_section_uses_stated_thresholds_and_says_no_failures(tmp_path):
    good = pd.DataFrame([_row(f"c{i}", "ok", d, h, 0.5) for i, (d, h) in enumerate(zip([1.0, 0.98, 0.97, 0.96, 0.95],
                                                                                       [0, 1, 2, 3, 4]))])
    text = build_report(tmp_path, good, box_plots=False).read_text()
    fail = _sections(text)["failures"]
    assert "No failures" in fail and "DSC &lt; 0.7" in fail and "HD95 &gt; 10 mm" in fail
    bad = pd.concat([good, pd.DataFrame([_row("x", "ok", 0.65, 12.0, 3.0)])], ignore_index=True)
    opts = ReportOptions(criteria=FailureCriteria(dsc_below=0.6, hd95_above=11, tukey_factor=None))
    fail = _sections(build_report(tmp_path, bad, box_plots=False, options=opts).read_text())["failures"]
    # DSC .65 is not below .6; HD95 12 is above 11: one failing row, for one reason only
    assert "No failures" not in fail and "1 failing rows in 1 structures" in fail
    assert "the counts and the table below have every failing row" in fail  # the k limit is the gallery's
    assert "DSC &lt; 0.6" in fail and "high_hd95" in fail and "low_dsc" not in fail.split("All failing rows")[0]


def test_report_false_positive_rates_per_model_and_threshold(tmp_path):
    # absent.csv rows: m1 volumes 0, 0.3, 2.0 and one missing; m2 volumes 0, 0, 6.0
    absent = pd.DataFrame([
        dict(study="s", centre="A", model=m, case=c, side="left", structure="Kidney_L", label=3, status=st, pred_ml=v,
             n_components=1, largest_ml=v, reference_ml=0.0, prediction="")
        for m, c, st, v in [("m1", "k1", "clean", 0.0), ("m1", "k2", "fp", 0.3), ("m1", "k3", "fp", 2.0),
                            ("m1", "k4", "missing", nan), ("m2", "k1", "clean", 0.0), ("m2", "k2", "clean", 0.0),
                            ("m2", "k3", "fp", 6.0)]
    ])
    text = build_report(tmp_path, results(), absent=absent, box_plots=False,
                        options=ReportOptions(fp_thresholds_ml=(0.0, 1.0, 5.0))).read_text()
    sec = _sections(text)["absent"]
    head = sec.split("<details")[0]
    # m1 over its 3 predicted cases: > 0 mL: 2 (0.3, 2.0); > 1 mL: 1; > 5 mL: 0. m2: 1, 1, 1.
    assert "2/3 (67 %)" in head and "1/3 (33 %)" in head and "0/3 (0 %)" in head
    assert head.count("1/3 (33 %)") == 4  # m1 at 1 mL, m2 at 0, 1 and 5 mL
    assert "FP &gt; 0 mL" in head and "FP &gt; 5 mL" in head
    assert "m1 2/3, m2 1/3" in _sections(text)["headline"]


def test_report_explains_suspicious_values_inline(tmp_path):
    rows = [dict(_row("c1", "ok", 0.97, 0.0, 0.1), tp=900, fn=10, fp=20),
            dict(_row("c2", "ok", 0.95, 40.0, 2.0), tp=900, fn=50, fp=0),
            dict(_row("c3", "ok", 0.5, 3.0, 1.0, structure="Kidney_L", label=3), tp=3, fn=1, fp=2)]
    text = build_report(tmp_path, pd.DataFrame(rows), box_plots=False).read_text()
    liver = text.split("id='s-Liver'")[1].split("</details>")[0]
    assert "HD95 0 mm, DSC &lt; 1" in liver and "surface elements" in liver
    assert "large HD95, high DSC" in liver and "island" in liver
    kidney = text.split("id='s-Kidney_L'")[1].split("</details>")[0]
    assert "tiny reference" in kidney and "annotation" in kidney
    assert "tiny reference" not in liver


def test_report_first_screen_has_the_headline_and_tables_are_collapsible_csv(tmp_path):
    import oarbench.stats as stats_mod

    rows = []
    for i in range(8):
        for m, base in (("local-A", 0.9), ("fl", 0.85)):
            for c in ("A", "B"):
                rows.append(_row(f"{c}{i}", "ok", base - (0.1 if (m, c) == ("local-A", "B") else 0) + 0.005 * i,
                                 3.0, 1.0, model=m, centre=c))
    table = pd.DataFrame(rows)
    stats = stats_mod.run_stats(table)
    text = build_report(tmp_path, table, stats=stats, box_plots=False,
                        options=ReportOptions(trained_on={"local-A": ["A"], "fl": ["A", "B"]})).read_text()
    secs = list(_sections(text))
    assert secs[:3] == ["headline", "paper", "accuracy"] and secs[-1] == "provenance"
    head = _sections(text)["headline"]
    assert "within" in head and "cross" in head and "Within- vs cross-centre" in head
    # local-A: within (A) median per-case DSC .9175, cross (B) .8175 -> cross − within -0.100
    assert "-0.100" in head
    # the statistics detail table is in a closed <details> with a CSV download carrying every column
    acc = _sections(text)["accuracy"]
    stats_part = acc.split("id='stats'")[1]
    assert "<details><summary>All statistics rows" in stats_part
    link = stats_part.split("href='data:text/csv;charset=utf-8;base64,")[1].split("'")[0]
    csv = pd.read_csv(__import__("io").StringIO(base64.b64decode(link).decode("utf-8")))
    assert list(csv.columns) == list(stats.columns) and len(csv) == len(stats)
    # model and comparison columns are in the shown statistics table
    shown = stats_part.split("<details>")[1]
    assert ">comparison<" in shown and ">where<" in shown and "model local-A" in shown


def test_cli_report_threshold_options_and_training_centres_from_the_study(tmp_path):
    from oarbench.cli import main

    results().to_csv(tmp_path / "metrics.csv", index=False)
    (tmp_path / "study.toml").write_text(
        '[study]\nname = "demo"\n\n[[centres]]\nname = "A"\nreference = "ref"\n\n'
        '[[models]]\nname = "m1"\ntrained_on = ["A"]\npredictions = "p/{model}"\n'
        '[[models]]\nname = "m2"\ntrained_on = ["B"]\npredictions = "p/{model}"\n')
    (tmp_path / "run.json").write_text(json.dumps({"study": str(tmp_path / "study.toml")}))
    res = CliRunner().invoke(main, ["report", str(tmp_path), "--no-box-plots", "--dsc-below", "0.75",
                                    "--hd95-above", "off", "--fp-thresholds", "0,2"])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "report.html").read_text()
    secs = _sections(text)
    assert "DSC &lt; 0.75" in secs["failures"] and "HD95 &gt;" not in secs["failures"].split("</p>")[0]
    # m1 trained on A scores A: within; m2 trained on B scores A: cross
    head = secs["headline"]
    assert "within" in head and "cross" in head
    for bad, message in ((["--fp-thresholds", "a,b"], "numbers"), (["--dsc-below", "-1"], "number")):
        res = CliRunner().invoke(main, ["report", str(tmp_path), "--no-box-plots", *bad])
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output


def test_cli_report_of_a_real_robustness_run_shows_floor_and_swaps(tmp_path):
    """An atlas 'model' (always the original reference) under flip_lr and a 10-degree rotation."""
    from oarbench.cli import main
    from oarbench.io import read_volume
    from oarbench.robustness import run_robustness, write_robustness
    from tests.test_robustness import LABELS, FunctionPredictor, make_phantom, write_case

    ct, ref = make_phantom()
    img_path, ref_path = write_case(tmp_path / "data", "P001", ct, ref)
    atlas = read_volume(ref_path).array
    def model(v):  # the same label array whatever the input shows (zeros where the grid differs)
        return atlas if v.array.shape == atlas.shape else np.zeros(v.array.shape, np.uint8)

    res = run_robustness({"P001": img_path}, {"P001": ref_path}, FunctionPredictor(model),
                         ["flip_lr", "rot_z+10"], LABELS, study="s", centre="A", model="atlas")
    out = tmp_path / "results"
    write_robustness(res, out)
    res.table[res.table["condition"] == "original"].to_csv(out / "metrics.csv", index=False)
    run = CliRunner().invoke(main, ["report", str(out), "--no-box-plots"])
    assert run.exit_code == 0, run.output
    rob = _sections((out / "report.html").read_text())["robustness"]
    floor_part = rob.split("<h3>Per model and condition</h3>")[0]
    # flip_lr moves voxels without resampling: floor exactly 0; rot_z+10 resamples: floor from noise_floor.csv
    assert "flip_lr</td><td class=\"t\">lossless" in floor_part
    assert "rot_z+10</td><td class=\"t\">resampled" in floor_part
    per_model = rob.split("<h3>Per model and condition</h3>")[1].split("</table>")[0]
    rows = {r.split("</td>")[1].split(">")[-1]: r for r in per_model.split("<tr>")[2:]}
    # under flip_lr the atlas's kidneys cover the other side: both kidney rows are laterality swaps
    assert rows["flip_lr"].endswith("<td>2</td></tr>")
    # the liver mirrored onto the patient's left no longer overlaps the liver: worst ΔDSC -1
    assert "-1.000" in rows["flip_lr"]
    # robustness_summary.csv is read: the rotation's model effect against its resample-only control
    effect = rob.split("Model effect of the small rotations")[1].split("<h3>Noise floor</h3>")[0]
    assert "rot_z+10" in effect and "resample_z+10" in effect


def test_structures_absent_everywhere_are_named_once_not_given_sections(tmp_path):
    rows = [_row("c1", "ok", 0.9, 3.0, 1.0), _row("c2", "ok", 0.8, 4.0, 1.0),
            _row("c1", "absent", nan, nan, nan, structure="Spleen", label=2),
            _row("c2", "absent", nan, nan, nan, structure="Spleen", label=2),
            _row("c1", "absent", nan, nan, nan, structure="Kidney_L", label=3),
            _row("c2", "missed", 0.0, inf, inf, structure="Kidney_L", label=3)]
    text = build_report(tmp_path, pd.DataFrame(rows), box_plots=False).read_text()
    assert "id='s-Liver'" in text and "id='s-Kidney_L'" in text and "id='s-Spleen'" not in text
    assert "1 structures of the label map are absent from every reference and prediction" in text
    assert "not listed: Spleen." in text


# --------------------------------------------------------------------------- paths, stale inputs, order, figures


def test_inside_refuses_parent_parts_absolute_paths_and_links_out(tmp_path):
    from oarbench.report import inside

    folder = tmp_path / "gallery"
    folder.mkdir()
    (folder / "Liver.png").write_bytes(b"x")
    assert inside(folder, "Liver.png", "montage") == (folder / "Liver.png").resolve()
    for bad in ("../secret.png", "../../elsewhere/secret.png", "a/../../secret.png", "/etc/passwd",
                str(tmp_path / "secret.png"), "C:\\\\Windows\\\\x.png", "..\\\\secret.png", ""):
        with pytest.raises(ValueError, match="refused"):
            inside(folder, bad, "montage")
    (tmp_path / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(ValueError, match="leads outside the folder"):
        inside(folder, "link.png", "montage")


def _secret_png(path):
    from oarbench.plots import save_png
    from oarbench.report.figures import _figure

    fig = _figure(1, 1)
    fig.text(0.5, 0.5, "secret")
    return save_png(fig, path)


def test_report_refuses_gallery_index_paths_that_leave_the_gallery(tmp_path):
    """A results folder from elsewhere cannot make the report embed a PNG from anywhere on the machine."""
    from oarbench.cli import main

    secret = _secret_png(tmp_path / "elsewhere" / "secret.png")
    results().to_csv(tmp_path / "metrics.csv", index=False)
    import shutil

    for name in ("../elsewhere/secret.png", str(secret)):
        gallery = tmp_path / "gallery"
        shutil.rmtree(gallery, ignore_errors=True)
        _gallery(gallery)
        index = pd.read_csv(gallery / "index.csv")
        index["montage"] = name
        index.to_csv(gallery / "index.csv", index=False)
        with pytest.raises(ValueError, match="refused"):
            build_report(tmp_path / "out", results(), gallery_dir=gallery, box_plots=False)
        res = CliRunner().invoke(main, ["report", str(tmp_path), "--no-box-plots"])
        assert res.exit_code != 0 and "refused" in res.output and "Traceback" not in res.output
        assert "index.csv" in res.output or "gallery" in res.output
    assert not (tmp_path / "report.html").exists()
    # a gallery folder that is a link to somewhere else is refused as well
    shutil.rmtree(tmp_path / "gallery")
    outside = tmp_path.parent / (tmp_path.name + "-outside")
    outside.mkdir(exist_ok=True)
    _secret_png(outside / "Liver.png")
    (tmp_path / "gallery").symlink_to(outside, target_is_directory=True)
    res = CliRunner().invoke(main, ["report", str(tmp_path), "--no-box-plots"])
    assert res.exit_code != 0 and "leads outside the folder" in res.output and "Traceback" not in res.output


def test_stale_gallery_and_robustness_are_named_or_refused_with_strict(tmp_path):
    import os

    from oarbench.cli import main

    _gallery(tmp_path / "gallery")
    index = pd.read_csv(tmp_path / "gallery" / "index.csv")
    index.loc[0, "model"] = "retired-model"
    index.to_csv(tmp_path / "gallery" / "index.csv", index=False)
    rob = results()
    rob.loc[rob.model == "m2", "model"] = "other-model"
    rob.to_csv(tmp_path / "robustness.csv", index=False)
    results().to_csv(tmp_path / "metrics.csv", index=False)
    old = (tmp_path / "metrics.csv").stat().st_mtime - 3600
    for f in (tmp_path / "gallery" / "index.csv", tmp_path / "robustness.csv"):
        os.utime(f, (old, old))
    res = CliRunner().invoke(main, ["report", str(tmp_path), "--no-box-plots"])
    assert res.exit_code == 0, res.output
    secs = _sections((tmp_path / "report.html").read_text())
    assert "The gallery was drawn before metrics.csv was last written" in secs["failures"]
    assert "models that are not in the results table: retired-model" in secs["failures"]
    # m1 fails the rules (a missed Liver) but the gallery has no montage of it
    assert "The gallery has no montages of m1" in secs["failures"]
    assert "The robustness table was written before metrics.csv" in secs["robustness"]
    assert "about models that are not in the results table: other-model" in secs["robustness"]
    res = CliRunner().invoke(main, ["report", str(tmp_path), "--no-box-plots", "--strict"])
    assert res.exit_code != 0 and "--strict" in res.output and "Traceback" not in res.output
    # fresh inputs about the same models: no note
    index["model"] = "m1"
    index.to_csv(tmp_path / "gallery" / "index.csv", index=False)
    results().to_csv(tmp_path / "robustness.csv", index=False)
    res = CliRunner().invoke(main, ["report", str(tmp_path), "--no-box-plots", "--strict"])
    assert res.exit_code == 0, res.output
    assert "class='input-note'" not in (tmp_path / "report.html").read_text()


def test_one_model_order_everywhere(tmp_path):
    rows = [_row(f"c{i}", "ok", 0.9, 3.0, 1.0, model=m) for m in ("zeta", "alpha") for i in range(3)]
    table = pd.DataFrame(rows)
    text = build_report(tmp_path, table, box_plots=False).read_text()
    head = _sections(text)["headline"]
    # first appearance (the order of evaluation) when no order is given, not alphabetical
    assert head.index(">zeta<") < head.index(">alpha<") and "models: zeta, alpha" in head
    text = build_report(tmp_path, table, box_plots=False, options=ReportOptions(models=["alpha", "zeta"])).read_text()
    secs = _sections(text)
    assert secs["headline"].index(">alpha<") < secs["headline"].index(">zeta<")
    acc = secs["accuracy"].split("id='summary'")[1]
    assert acc.index("alpha @ A") < acc.index("zeta @ A")
    paper = secs["paper"]
    assert "Letters: a: alpha, b: zeta" in paper and paper.index("alpha on A") < paper.index("zeta on A")


def test_key_findings_per_model_and_of_n_tested(tmp_path):
    # two models, ten cases: m1 Pancreas DSC 0.81, m2 0.0 (missed); pooled the median would be 0.405
    rows = []
    for i in range(10):
        rows.append(_row(f"c{i}", "ok", 0.81, 3.0, 1.0, structure="Pancreas", label=2))
        rows.append(_row(f"c{i}", "missed", 0.0, inf, inf, model="m2", structure="Pancreas", label=2))
        for m in ("m1", "m2"):
            rows.append(_row(f"c{i}", "ok", 0.95, 2.0, 0.5, model=m))
    stats = pd.DataFrame([dict(analysis="paired", comparison="m1 vs m2", centre="A", structure=f"S{k}", metric="dsc",
                               arm_a="m1", arm_b="m2",
                               verdict="significant (m1 better)" if k < 12 else ("n.s." if k < 16 else "not testable"),
                               p_adjusted=0.01 if k < 12 else (0.5 if k < 16 else nan)) for k in range(18)])
    text = build_report(tmp_path, pd.DataFrame(rows), stats=stats, box_plots=False).read_text()
    head = _sections(text)["headline"]
    assert "m1: lowest median DSC Pancreas 0.810 (n=10)" in head
    assert "m2: lowest median DSC Pancreas 0.000 (n=10)" in head
    assert "0.405" not in head
    # 18 comparisons, 2 not testable: 12 of 16 tested
    assert "m1 better: 12 of 16 tested" in head and "2 not testable" in head


def test_finding_table_is_rendered_from_whatever_columns_it_has(tmp_path, monkeypatch):
    import oarbench.finding as finding_mod

    table = pd.DataFrame([_row(f"c{i}", "ok", 0.9, 3.0, 1.0, model=m, centre=c)
                          for m in ("local-A", "fl") for c in ("A", "B") for i in range(3)])
    stats = pd.DataFrame([dict(analysis="paired", comparison="fl vs local-A", centre="A", structure="Liver",
                               metric="dsc", model="", arm_a="fl", arm_b="local-A", verdict="n.s.", p_adjusted=0.4)])
    fake = pd.DataFrame([
        dict(question="federated vs local", model="fl", reference="local-A", centre="A", other="A", structure=s,
             metric="dsc", estimate=0.01, ci_low=-0.02, ci_high=0.03, margin=0.02, p_adjusted=0.4,
             test="Wilcoxon", design="paired", verdict=v)
        for s, v in (("Liver", "holds"), ("Spleen", "holds"), ("Heart", "not testable"), ("Bowel", "lower"))])
    monkeypatch.setattr(finding_mod, "centre_shift_finding", lambda *a, **k: fake)
    monkeypatch.setattr(finding_mod, "finding_lines", lambda f: ["fl holds against local-A on A."])
    text = build_report(tmp_path, table, stats=stats, box_plots=False,
                        options=ReportOptions(trained_on={"local-A": ["A"], "fl": ["A", "B"]})).read_text()
    head = _sections(text)["headline"]
    compact = head.split("<h3>Findings</h3>")[1].split("</table>")[0]
    assert "holds 2 · lower 1 of 3 tested; 1 not testable" in compact
    full = head.split("The finding per structure")[1]
    for col in ("estimate", "ci_low", "ci_high", "margin", "design"):
        assert f">{col}<" in full, col
    assert "fl holds against local-A on A." in head


def test_section_notes_are_shown_at_the_top_of_their_section(tmp_path):
    text = build_report(tmp_path, results(), box_plots=False,
                        section_notes={"accuracy": ["2 cases: the prediction equals the reference <exactly>."]}).read_text()
    acc = _sections(text)["accuracy"]
    assert "2 cases: the prediction equals the reference &lt;exactly&gt;." in acc.split("<figure")[0]
    assert "prediction equals the reference" not in _sections(text)["headline"]


def test_figure_one_is_readable_at_print_size_in_colour_blind_safe_colours():
    from matplotlib.text import Text

    from oarbench.report.data import _summaries
    from oarbench.report.figures import MIN_FONT_PT, OKABE_ITO, PRINT_WIDTH_IN, figure_one_figure

    rows = [_row(f"c{i}", "ok", 0.9 - 0.01 * i, 3.0 + i, 1.0, model=m, centre=c, structure=s, label=k)
            for m in ("local-A", "local-B", "fl") for c in ("A", "B") for i in range(5)
            for k, s in enumerate(("Liver", "Spleen", "Kidney_L"), 1)]
    summ = _summaries(pd.DataFrame(rows))
    fig, _note = figure_one_figure(summ, ["Liver", "Spleen", "Kidney_L"], ["local-A", "local-B", "fl"], ["A", "B"],
                                   {("local-A", "B"): "cross"})
    assert fig.get_size_inches()[0] <= PRINT_WIDTH_IN + 1e-9
    fig.canvas.draw()
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert texts and min(t.get_fontsize() for t in texts) >= MIN_FONT_PT
    from matplotlib.colors import to_hex

    colours = {to_hex(line.get_color()) for ax in fig.axes for line in ax.get_lines() if line.get_xdata().size}
    assert colours and colours <= {c.lower() for c in OKABE_ITO}
    # the page shows it at its print width (style width in inches)
    text = build_report_html(pd.DataFrame(rows))
    assert re.search(r"id='figure-1'><img [^>]*style=\"width:7\.3\din\"", text)


def build_report_html(table):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return build_report(d, table, box_plots=False).read_text()


def test_box_plots_only_where_n_allows(tmp_path):
    from oarbench.report import MIN_BOX_N

    rows = [_row(f"c{i}", "ok", 0.9, 3.0, 1.0) for i in range(MIN_BOX_N)]
    rows += [_row("c0", "ok", 0.8, 3.0, 1.0, structure="Spleen", label=2)]
    text = build_report(tmp_path, pd.DataFrame(rows)).read_text()
    alts = [a["alt"] for t, a in _parse(text).tags if t == "img"]
    assert "box plots of Liver" in alts and "box plots of Spleen" not in alts
    spleen = text.split("id='s-Spleen'")[1].split("</details>")[0]
    assert f"fewer than {MIN_BOX_N} ok rows" in spleen


def test_legends_come_before_their_tables_and_notes_sit_with_the_table_they_describe(tmp_path):
    import oarbench.stats as stats_mod

    rows = [_row(f"c{i}", "ok", 0.9 - 0.01 * i, 3.0, 1.0, model=m) for m in ("m1", "m2") for i in range(8)]
    table = pd.DataFrame(rows)
    text = build_report(tmp_path, table, stats=stats_mod.run_stats(table), box_plots=False).read_text()
    paper = _sections(text)["paper"]
    assert paper.index("Letters: a: m1, b: m2") < paper.index("<table")
    stats_part = _sections(text)["accuracy"].split("id='stats'")[1]
    counts, detail = stats_part.split("<details>", 1)
    # the note about bold cells with * is inside the details, with the table that has them
    assert "bold with *" not in counts and "bold with *" in detail


def test_cli_report_follows_the_prediction_order_of_the_run_record(tmp_path):
    from oarbench.cli import main

    t = results()
    t = pd.concat([t[t.model == "m2"], t[t.model == "m1"]], ignore_index=True)  # rows: m2 first
    t.to_csv(tmp_path / "metrics.csv", index=False)
    # evaluate --prediction m1/ --prediction m2/: the run record lists m1's jobs first
    jobs = [{"model": m, "centre": "A", "condition": "original"} for m in ("m1", "m2")]
    (tmp_path / "run.json").write_text(json.dumps({"command": "evaluate", "jobs": jobs}))
    res = CliRunner().invoke(main, ["report", str(tmp_path), "--no-box-plots"])
    assert res.exit_code == 0, res.output
    head = _sections((tmp_path / "report.html").read_text())["headline"]
    assert head.index(">m1<") < head.index(">m2<") and "models: m1, m2" in head


def test_figure_one_of_many_structures_shows_the_worst_and_says_so():
    from oarbench.report.data import _summaries
    from oarbench.report.figures import FIGURE_ONE_MAX_STRUCTURES, figure_one_figure

    names = [f"S{k:02d}" for k in range(30)]
    # structure k has DSC 0.5 + k / 100: the lowest medians are S00..S24
    rows = [_row(f"c{i}", "ok", 0.5 + k / 100, 3.0, 1.0, structure=s, label=k + 1)
            for k, s in enumerate(names) for i in range(3)]
    fig, note = figure_one_figure(_summaries(pd.DataFrame(rows)), names, ["m1"], ["A"], {})
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == names[:FIGURE_ONE_MAX_STRUCTURES]
    assert f"the {FIGURE_ONE_MAX_STRUCTURES} of 30 structures with the lowest median DSC" in note


def test_report_robustness_shows_the_model_effect_against_its_control(tmp_path):
    """robustness_summary.csv's model effect (rotation minus control) and its interval, as given."""
    table = _robust_rows()
    summary = pd.DataFrame([dict(study="s", centre="A", model="m1", structure="Liver", condition="rot_z+10",
                                 control_condition="resample_z+10", n_pairs_effect_dsc=7, model_effect_dsc=-0.0125,
                                 model_effect_dsc_ci_low=-0.031, model_effect_dsc_ci_high=0.004,
                                 n_pairs_effect_hd95=7, model_effect_hd95=0.5, model_effect_hd95_ci_low=0.25,
                                 model_effect_hd95_ci_high=1.0),
                            dict(study="s", centre="A", model="m1", structure="Liver", condition="flip_lr",
                                 control_condition=None, n_pairs_effect_dsc=0, model_effect_dsc=float("nan"),
                                 model_effect_dsc_ci_low=float("nan"), model_effect_dsc_ci_high=float("nan"))])
    text = build_report(tmp_path, table[table.condition == "original"], robustness=table,
                        robustness_summary=summary, box_plots=False).read_text()
    rob = _sections(text)["robustness"]
    effect = rob.split("Model effect of the small rotations")[1].split("<h3>Noise floor</h3>")[0]
    assert "resample_z+10" in effect and "-0.013 [-0.031, 0.004]" in effect and "0.50 [0.25, 1.00]" in effect
    assert "flip_lr" not in effect  # a lossless condition has no control, so no model-effect row
    without = build_report(tmp_path / "plain", table[table.condition == "original"], robustness=table,
                           box_plots=False).read_text()
    assert "Model effect of the small rotations" not in without
