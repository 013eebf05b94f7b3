"""The report's figures: drawn with matplotlib (no pyplot state), embedded as PNG data URIs.

Every figure here is drawn at the size it prints at (inches; at most :data:`PRINT_WIDTH_IN`
wide, the text width of an A4 page with 12 mm margins) with no text smaller than
:data:`MIN_FONT_PT`, and the page shows it at that size (``width: Win``), so 9 pt in
the figure is 9 pt on paper. Colours are the Okabe-Ito palette (colour-blind safe); the
models keep their colour in every figure, in the one model order of the report, and
marker shapes tell centres apart where colour is not available (grey-scale print).
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from oarbench.report.data import MIN_BOX_N, _ORIGINAL, quantile_inf

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["OKABE_ITO", "MIN_FONT_PT", "PRINT_WIDTH_IN", "Drawn", "model_colours", "figure_one", "casewise_figure",
           "robustness_figure", "fp_figure", "structure_box_figure", "png_data_uri"]

#: Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision deficiency.
OKABE_ITO: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
#: Smallest text in a figure, in points at print size.
MIN_FONT_PT = 9.0
#: Text width of an A4 page (210 mm) with 12 mm margins, in inches.
PRINT_WIDTH_IN = (210 - 24) / 25.4
_CENTRE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_RC = {"font.size": MIN_FONT_PT, "axes.titlesize": 10, "axes.labelsize": MIN_FONT_PT, "xtick.labelsize": MIN_FONT_PT,
       "ytick.labelsize": MIN_FONT_PT, "legend.fontsize": MIN_FONT_PT, "legend.title_fontsize": MIN_FONT_PT,
       "font.family": "DejaVu Sans", "axes.spines.top": False, "axes.spines.right": False}
#: Figure 1's HD95 axis is logarithmic from this value (mm); smaller values (0 among them) are drawn at it.
HD95_FLOOR_MM = 0.5
#: Figure 1 shows at most this many structures (the lowest median DSC first when there are more).
FIGURE_ONE_MAX_STRUCTURES = 25


@dataclass(frozen=True)
class Drawn:
    """A rendered figure: PNG bytes, its print width (inches) and what the caption must say."""

    png: bytes
    width_in: float
    height_in: float
    note: str = ""

    @property
    def uri(self) -> str:
        return png_data_uri(self.png)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(width: float, height: float) -> "Figure":
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the report's figures need matplotlib: pip install matplotlib") from exc
    fig = Figure(figsize=(min(width, PRINT_WIDTH_IN), height))
    FigureCanvasAgg(fig)
    return fig


def _render(fig: "Figure", dpi: int = 150, note: str = "") -> Drawn:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    w, h = fig.get_size_inches()
    return Drawn(buf.getvalue(), float(w), float(h), note)


def _rc():  # -> context manager
    import matplotlib

    return matplotlib.rc_context(_RC)


def model_colours(models: Sequence[str]) -> dict[str, str]:
    """Model -> Okabe-Ito colour, by position in the report's model order."""
    return {m: OKABE_ITO[i % len(OKABE_ITO)] for i, m in enumerate(models)}


def _centre_marker(centres: Sequence[str], centre: str) -> str:
    return _CENTRE_MARKERS[list(centres).index(centre) % len(_CENTRE_MARKERS)] if centre in centres else "o"


def _legend(fig: "Figure", models: Sequence[str], centres: Sequence[str], settings: bool, y: float) -> None:
    from matplotlib.lines import Line2D

    colours = model_colours(models)
    handles = [Line2D([], [], color=colours[m], marker="o", linestyle="-", linewidth=2, markersize=6, label=m)
               for m in models]
    handles += [Line2D([], [], color="#444444", marker=_centre_marker(centres, c), linestyle="none", markersize=6,
                       markerfacecolor="#444444", label=f"centre {c}") for c in centres]
    if settings:
        handles.append(Line2D([], [], color="#444444", marker="o", linestyle="none", markersize=6,
                              markerfacecolor="white", label="open: cross-centre"))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, y), ncol=min(len(handles), 7), frameon=False,
               handletextpad=0.3, columnspacing=1.0)


def figure_one(summaries: Mapping[str, pd.DataFrame], structures: Sequence[str], models: Sequence[str],
               centres: Sequence[str], settings: Mapping[tuple[str, str], str]) -> Drawn | None:
    """Figure 1 rendered (:func:`figure_one_figure`)."""
    drawn = figure_one_figure(summaries, structures, models, centres, settings)
    return None if drawn is None else _render(drawn[0], note=drawn[1])


def figure_one_figure(summaries: Mapping[str, pd.DataFrame], structures: Sequence[str], models: Sequence[str],
                      centres: Sequence[str], settings: Mapping[tuple[str, str], str]) -> tuple["Figure", str] | None:
    """Figure 1: per structure, median [Q1–Q3] of DSC and of HD95 for every model on every centre.

    One row per structure, one marker per model and centre (colour: model; shape:
    centre; open marker: cross-centre, i.e. the model was not trained there), the line
    spans Q1–Q3. ``summaries`` are :func:`~oarbench.report.data.summary_table` frames.
    More than :data:`FIGURE_ONE_MAX_STRUCTURES` structures: those with the lowest
    median DSC (the note says so). Returns the figure and the note for its caption; None
    when nothing is scored.
    """
    rows = [s for s in structures if s in summaries and len(summaries[s])]
    if not rows:
        return None
    note = ""
    if len(rows) > FIGURE_ONE_MAX_STRUCTURES:
        worst = sorted(rows, key=lambda s: float(np.nanmin(pd.to_numeric(summaries[s]["dsc_median"], errors="coerce")
                                                           .to_numpy(float))) if "dsc_median" in summaries[s] else 1.0)
        keep = set(worst[:FIGURE_ONE_MAX_STRUCTURES])
        note = (f"the {FIGURE_ONE_MAX_STRUCTURES} of {len(rows)} structures with the lowest median DSC of any model "
                "and centre (all of them are in the accuracy section)")
        rows = [s for s in rows if s in keep]
    groups = [(m, c) for m in models for c in centres]
    has_hd = any("hd95_median" in summaries[s] for s in rows)
    colours = model_colours(models)
    use_settings = any(settings.values())
    n = len(rows)
    with _rc():
        fig = _figure(PRINT_WIDTH_IN, (0.27 if n > 12 else 0.42) * n + 1.25)
        axes = fig.subplots(1, 2 if has_hd else 1, sharey=True, squeeze=False)[0]
        step = 0.8 / max(len(groups), 1)
        offsets = {g: -0.4 + step * (i + 0.5) for i, g in enumerate(groups)}
        hd_max = 1.0
        for s in rows:
            t = summaries[s]
            if "hd95_q3" in t:
                q = pd.to_numeric(t["hd95_q3"], errors="coerce").to_numpy(float)
                m = pd.to_numeric(t["hd95_median"], errors="coerce").to_numpy(float)
                fin = np.concatenate([q[np.isfinite(q)], m[np.isfinite(m)]])
                if fin.size:
                    hd_max = max(hd_max, float(fin.max()))
        hd_max = min(b * 10 ** k for k in range(0, 6) for b in (1, 2, 5) if b * 10 ** k >= hd_max / 1.08)
        # the DSC axis starts at the tenth below the lowest Q1 (0 when anything is poor), so small differences show
        q1s = np.concatenate([pd.to_numeric(summaries[s]["dsc_q1"], errors="coerce").to_numpy(float)
                              for s in rows if "dsc_q1" in summaries[s]] or [np.array([0.0])])
        q1s = q1s[np.isfinite(q1s)]
        dsc_lo = min(0.8, math.floor(float(q1s.min()) * 10) / 10) if q1s.size else 0.0
        clipped = low = False
        for ax_i, (col, label, lim) in enumerate((("dsc", "DSC (higher is better)", (max(0.0, dsc_lo), 1.0)),
                                                   ("hd95", "HD95, mm, log scale (lower is better)",
                                                    (HD95_FLOOR_MM, max(hd_max, 10.0))))[:len(axes)]):
            ax = axes[ax_i]
            for y in range(n):
                if y % 2 == 0:
                    ax.axhspan(y - 0.5, y + 0.5, color="#f2f2f2", zorder=0, linewidth=0)
            for y, s in enumerate(rows):
                by = {(r["model"], r["centre"]): r for _, r in summaries[s].iterrows()}
                for g in groups:
                    r = by.get(g)
                    if r is None or f"{col}_median" not in r:
                        continue
                    med, q1, q3 = (float(r[f"{col}_{k}"]) for k in ("median", "q1", "q3"))
                    if math.isnan(med):
                        continue
                    yy = y + offsets[g]
                    if col == "hd95":
                        low = low or min(med, q1) < lim[0]
                        med, q1, q3 = (max(v, lim[0]) if not math.isnan(v) else v for v in (med, q1, q3))
                    hi = min(q3, lim[1]) if not math.isnan(q3) else med
                    lo = q1 if not math.isnan(q1) else med
                    colour = colours[g[0]]
                    ax.plot([min(lo, lim[1]), hi], [yy, yy], color=colour, linewidth=1.6, solid_capstyle="butt", zorder=2)
                    x = min(med, lim[1])
                    if med > lim[1] or q3 > lim[1]:
                        clipped = True
                    open_ = settings.get(g, "") == "cross"
                    ax.plot([x], [yy], marker=">" if med > lim[1] else _centre_marker(centres, g[1]), markersize=4.5,
                            color=colour, markerfacecolor="white" if open_ else colour, markeredgewidth=1.1,
                            linestyle="none", zorder=3)
            if col == "hd95":
                from matplotlib.ticker import FuncFormatter

                ax.set_xscale("log")
                ax.set_xlim(lim[0] * 0.9, lim[1] * 1.05)
                ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if lim[0] <= t <= lim[1]]
                ax.set_xticks(ticks)
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
                ax.xaxis.set_minor_locator(__import__("matplotlib.ticker", fromlist=["NullLocator"]).NullLocator())
            else:
                ax.set_xlim(lim[0] - 0.01 * (lim[1] - lim[0]), lim[1] + 0.01 * (lim[1] - lim[0]))
            ax.set_xlabel(label)
            ax.grid(axis="x", color="#d0d0d0", linewidth=0.6)
            ax.set_axisbelow(True)
            ax.tick_params(axis="y", length=0)
        axes[0].set_yticks(range(n))
        axes[0].set_yticklabels(rows)
        axes[0].set_ylim(n - 0.5, -0.5)
        top = 1 - 0.36 / fig.get_size_inches()[1]
        _legend(fig, models, centres, use_settings, 1.0)
        fig.subplots_adjust(left=0.17, right=0.98, bottom=0.52 / fig.get_size_inches()[1], top=top, wspace=0.08)
    extra = "; ∞ and values beyond the axis are drawn at its right end (▸)" if clipped else ""
    if low:
        extra += f"; HD95 below {HD95_FLOOR_MM:g} mm (0 included) is drawn at {HD95_FLOOR_MM:g} mm"
    return fig, (note + extra).lstrip("; ")


def _box_or_points(ax: Any, data: Sequence[np.ndarray], positions: Sequence[float], colours: Sequence[str],
                   vertical: bool = True) -> None:
    """A box where a group has at least :data:`MIN_BOX_N` values; every value as a point (jittered) on top."""
    rng = np.random.default_rng(0)
    for d, p, c in zip(data, positions, colours):
        if d.size >= MIN_BOX_N:
            bp = ax.boxplot([d], positions=[p], widths=0.55, orientation="vertical" if vertical else "horizontal", patch_artist=True, showfliers=False,
                            medianprops={"color": "black", "linewidth": 1.6}, whiskerprops={"color": c},
                            capprops={"color": c})
            for patch in bp["boxes"]:
                patch.set_facecolor("white")
                patch.set_edgecolor(c)
                patch.set_linewidth(1.4)
        if d.size:
            jit = rng.uniform(-0.18, 0.18, d.size)
            xs, ys = (p + jit, d) if vertical else (d, p + jit)
            ax.plot(xs, ys, marker="o", linestyle="none", markersize=2.8, color=c, alpha=0.55, zorder=3)


def casewise_figure(table: pd.DataFrame, models: Sequence[str], centres: Sequence[str]) -> Drawn | None:
    """Per case, the mean DSC over its structures (as the headline), one column per model and centre."""
    df = table[(table["condition"] == _ORIGINAL) & table["status"].isin(["ok", "missed", "hallucinated"])]
    if df.empty:
        return None
    df = df.assign(_d=pd.to_numeric(df["dsc"], errors="coerce"))
    per_case = df.groupby(["model", "centre", "case"])["_d"].mean()
    groups = [(m, c) for c in centres for m in models if (m, c) in per_case.index.droplevel(2)]
    data = [per_case.loc[m, c].to_numpy(float) for m, c in groups]
    colours = model_colours(models)
    with _rc():
        fig = _figure(min(PRINT_WIDTH_IN, 1.5 + 0.75 * len(groups)), 3.0)
        ax = fig.subplots()
        pos = np.arange(len(groups), dtype=float)
        _box_or_points(ax, data, pos, [colours[m] for m, _ in groups])
        ax.set_xticks(pos)
        ax.set_xticklabels([f"{m}\n{c}\nn={d.size}" for (m, c), d in zip(groups, data)])
        ax.set_ylabel("mean DSC per case")
        ax.set_ylim(min(0.0, float(np.nanmin(np.concatenate(data))) if data else 0.0) - 0.02, 1.02)
        ax.grid(axis="y", color="#d0d0d0", linewidth=0.6)
        ax.set_axisbelow(True)
        fig.tight_layout()
    return _render(fig)


def robustness_figure(pairs: pd.DataFrame, floor: pd.DataFrame, models: Sequence[str]) -> Drawn | None:
    """ΔDSC (condition − original) per model and condition, against the noise floor of each condition.

    ``pairs``: columns model, condition, delta (one row per paired case x structure);
    ``floor``: :func:`~oarbench.report.data.noise_floor_table`. The floor's median and
    minimum ΔDSC are drawn as a grey band per condition.
    """
    if pairs.empty:
        return None
    conditions = sorted(set(pairs["condition"]))
    colours = model_colours(models)
    fl = floor.set_index("condition") if len(floor) else floor
    groups = [(c, m) for c in conditions for m in models if ((pairs["condition"] == c) & (pairs["model"] == m)).any()]
    with _rc():
        fig = _figure(PRINT_WIDTH_IN, 0.32 * len(groups) + 1.2)
        ax = fig.subplots()
        data = [pairs.loc[(pairs["condition"] == c) & (pairs["model"] == m), "delta"].to_numpy(float) for c, m in groups]
        data = [d[~np.isnan(d)] for d in data]
        pos = np.arange(len(groups), dtype=float)
        for c in conditions:
            idx = [i for i, g in enumerate(groups) if g[0] == c]
            if c in getattr(fl, "index", []) and not math.isnan(float(fl.at[c, "floor_delta_dsc_min"])):
                lo, med = float(fl.at[c, "floor_delta_dsc_min"]), float(fl.at[c, "floor_delta_dsc_median"])
                ax.fill_betweenx([min(idx) - 0.45, max(idx) + 0.45], lo, 0, color="#bbbbbb", alpha=0.5, linewidth=0,
                                 zorder=0)
                ax.plot([med, med], [min(idx) - 0.45, max(idx) + 0.45], color="#555555", linewidth=1.2,
                        linestyle=":", zorder=1)
        _box_or_points(ax, data, pos, [colours[m] for _, m in groups], vertical=False)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(pos)
        ax.set_yticklabels([f"{c} · {m} (n={d.size})" for (c, m), d in zip(groups, data)])
        ax.set_ylim(len(groups) - 0.5, -0.5)
        ax.set_xlabel("ΔDSC = DSC under the condition − DSC original")
        ax.grid(axis="x", color="#d0d0d0", linewidth=0.6)
        ax.set_axisbelow(True)
        fig.tight_layout()
    return _render(fig)


def fp_figure(summary: pd.DataFrame, models: Sequence[str]) -> Drawn | None:
    """False-positive kidney rate per model against the volume threshold (``summarise_absent`` rows)."""
    if summary.empty or not {"model", "threshold_ml", "fp_rate"}.issubset(summary.columns):
        return None
    colours = model_colours(models)
    thresholds = sorted(set(float(t) for t in summary["threshold_ml"]))
    with _rc():
        fig = _figure(min(PRINT_WIDTH_IN, 1.8 + 0.9 * len(thresholds) * max(1, len(models)) / 2), 2.8)
        ax = fig.subplots()
        width = 0.8 / max(len(models), 1)
        for i, m in enumerate(models):
            g = summary[summary["model"] == m].set_index("threshold_ml")
            if g.empty:
                continue
            ys = [100 * float(g.at[t, "fp_rate"]) if t in g.index else np.nan for t in thresholds]
            xs = np.arange(len(thresholds)) - 0.4 + width * (i + 0.5)
            ax.bar(xs, ys, width=width * 0.92, color=colours[m], label=m, edgecolor="black", linewidth=0.5)
        ax.set_xticks(np.arange(len(thresholds)))
        ax.set_xticklabels([f"> {t:g} mL" for t in thresholds])
        ax.set_ylabel("false-positive cases (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", color="#d0d0d0", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.legend(frameon=False, loc="upper right")
        fig.tight_layout()
    return _render(fig)


def structure_box_figure(table: pd.DataFrame, structure: str, models: Sequence[str], centres: Sequence[str],
                         metrics: Sequence[tuple[str, str]] = (("dsc", "DSC"), ("hd95", "HD95 (mm)"), ("msd", "MSD (mm)")),
                         ) -> Drawn | None:
    """One structure's DSC, HD95 and MSD per model and centre (status ok; boxes only where n allows).

    None when no model/centre group has :data:`MIN_BOX_N` ok rows: a figure of a few
    points says nothing the structure's table does not, and drawing it is the slow part
    of a report of many structures.
    """
    df = table[(table["structure"].astype(str) == structure) & (table["condition"] == _ORIGINAL)]
    metrics = [m for m in metrics if m[0] in df.columns]
    ok = df[df["status"] == "ok"]
    groups = [(m, c) for c in centres for m in models if ((df["model"] == m) & (df["centre"] == c)).any()]
    sizes = [int(((ok["model"] == m) & (ok["centre"] == c)).sum()) for m, c in groups]
    if not metrics or not sizes or max(sizes) < MIN_BOX_N:
        return None
    colours = model_colours(models)
    with _rc():
        fig = _figure(PRINT_WIDTH_IN, 2.9)
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        for ax, (col, label) in zip(axes, metrics):
            data, left = [], []
            for m, c in groups:
                g = df[(df["model"] == m) & (df["centre"] == c)]
                v = pd.to_numeric(g.loc[g["status"] == "ok", col], errors="coerce").to_numpy(float)
                data.append(v[np.isfinite(v)])
                left.append(int(g["status"].isin(["missed", "hallucinated"]).sum()))
            pos = np.arange(len(groups), dtype=float)
            _box_or_points(ax, data, pos, [colours[m] for m, _ in groups])
            ax.set_xticks(pos)
            ax.set_xticklabels([f"{c}\n{d.size}" + (f"+{n}" if n else "") for (m, c), d, n in zip(groups, data, left)])
            ax.set_title(label)
            ax.grid(axis="y", color="#d0d0d0", linewidth=0.6)
            ax.set_axisbelow(True)
            if col == "dsc":
                ax.set_ylim(-0.02, 1.02)
        _legend(fig, [m for m in models if any(g[0] == m for g in groups)], [], False, 1.0)
        fig.tight_layout(rect=(0, 0, 1, 0.88))
    return _render(fig, dpi=100)


def quantiles(values: np.ndarray) -> tuple[float, float, float]:
    return quantile_inf(values, 0.5), quantile_inf(values, 0.25), quantile_inf(values, 0.75)


def montage_head(png: bytes, rows: int = 2) -> tuple[bytes, bool]:
    """The top of a gallery montage: its title band and first ``rows`` rows of tiles.

    Tile rows are found from the image itself: the CT of a tile fills whole pixel rows
    with grey, the titles between tile rows are dark text on white. Returns the PNG
    (unchanged when the montage has no more than ``rows`` rows) and whether it was cut.
    """
    from matplotlib.image import imread

    img = imread(io.BytesIO(png), format="png")
    grey = img[..., :3].mean(axis=2) if img.ndim == 3 else img
    non_white = (grey < 0.94).mean(axis=1)
    in_tile = non_white > 0.12
    bands = []
    start = None
    for y, inside in enumerate(in_tile):
        if inside and start is None:
            start = y
        elif not inside and start is not None:
            if y - start > 20:
                bands.append((start, y))
            start = None
    if start is not None and len(in_tile) - start > 20:
        bands.append((start, len(in_tile)))
    if len(bands) <= rows:
        return png, False
    cut = min(len(grey), bands[rows - 1][1] + max(6, (bands[rows][0] - bands[rows - 1][1]) // 8))
    buf = io.BytesIO()
    from matplotlib.image import imsave

    imsave(buf, img[:cut], format="png")
    return buf.getvalue(), True
