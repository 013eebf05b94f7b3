"""Figures: failure-case tiles and montages, box plots of the results table.

matplotlib is imported inside the functions (Agg backend, never ``show()``);
every function returns a :class:`matplotlib.figure.Figure` or PNG bytes. Colours
are from the Okabe-Ito colour-blind-safe palette and every colour distinction
is doubled by a line style or hatch, so the figures survive grey-scale print.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from oarbench.tiles import Tile, tile_title

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


__all__ = [
    "REFERENCE_COLOUR",
    "PREDICTION_COLOUR",
    "REFERENCE_STYLE",
    "PREDICTION_STYLE",
    "draw_tile",
    "tile_figure",
    "montage_figure",
    "box_plot_figure",
    "figure_png_bytes",
    "save_png",
]

#: Reference contour: Okabe-Ito blue, solid.
REFERENCE_COLOUR = "#0072B2"
REFERENCE_STYLE = "solid"
#: Prediction contour: Okabe-Ito orange, dashed.
PREDICTION_COLOUR = "#E69F00"
PREDICTION_STYLE = "dashed"
CONTOUR_WIDTH = 1.8

_GREYS = ("#ffffff", "#bdbdbd", "#737373", "#f0f0f0", "#969696", "#d9d9d9")
_HATCHES = ("", "///", "...", "xx", "\\\\\\", "++")


def _pyplot_free_figure(**kwargs: Any) -> "Figure":
    """A Figure on the Agg canvas, without touching pyplot's global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover
        raise ImportError("oarbench plots need matplotlib: pip install matplotlib") from exc
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _legend_handles() -> list[Any]:
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], color=REFERENCE_COLOUR, linestyle=REFERENCE_STYLE, linewidth=CONTOUR_WIDTH, label="reference"),
        Line2D([], [], color=PREDICTION_COLOUR, linestyle=PREDICTION_STYLE, linewidth=CONTOUR_WIDTH, label="prediction"),
    ]


def draw_tile(ax: Any, tile: "Tile", *, title: bool = True, fontsize: float = 7.0) -> None:
    """Draw one tile on an axes: windowed CT, reference and prediction contours.

    Pixels are drawn with ``aspect = row spacing / column spacing`` so that
    anisotropic voxels keep their physical proportions. Contours are the 0.5
    iso-line of each mask (matplotlib ``contour``), reference solid blue,
    prediction dashed orange. A plane/orientation note sits in the lower left.
    """
    ax.imshow(
        tile.image,
        cmap="gray",
        vmin=tile.window.vmin,
        vmax=tile.window.vmax,
        aspect=tile.aspect,
        interpolation="nearest",
        origin="upper",
    )
    for mask, colour, style in (
        (tile.reference, REFERENCE_COLOUR, REFERENCE_STYLE),
        (tile.prediction, PREDICTION_COLOUR, PREDICTION_STYLE),
    ):
        if mask.any() and not mask.all():
            # pad by one pixel so a mask touching the crop border still closes
            padded = np.pad(mask.astype(float), 1)
            rows, cols = padded.shape
            ax.contour(
                np.arange(-1, cols - 1),
                np.arange(-1, rows - 1),
                padded,
                levels=[0.5],
                colors=[colour],
                linestyles=[style],
                linewidths=CONTOUR_WIDTH,
            )
    ax.set_xlim(-0.5, tile.image.shape[1] - 0.5)
    ax.set_ylim(tile.image.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    side = {"axial": ("R", "L"), "coronal": ("R", "L"), "sagittal": ("A", "P")}[tile.plane]
    ax.text(0.01, 0.99, side[0], transform=ax.transAxes, ha="left", va="top", color="white", fontsize=fontsize)
    ax.text(0.99, 0.99, side[1], transform=ax.transAxes, ha="right", va="top", color="white", fontsize=fontsize)
    ax.text(
        0.01,
        0.01,
        f"{tile.plane} {tile.slice_index} · {tile.window.name} W{tile.window.width:g}/L{tile.window.level:g}",
        transform=ax.transAxes,
        ha="left",
        va="bottom",
        color="white",
        fontsize=fontsize * 0.85,
    )
    if title:
        ax.set_title(tile.title, fontsize=fontsize)


def tile_figure(tile: "Tile", *, legend: bool = True, size_in: float = 3.0) -> "Figure":
    """One tile as its own figure (``legend=False`` leaves only the image)."""
    fig = _pyplot_free_figure(figsize=(size_in, size_in * 1.25 if legend else size_in * 1.15))
    ax = fig.add_subplot(1, 1, 1)
    draw_tile(ax, tile)
    if legend:
        fig.legend(handles=_legend_handles(), loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if legend else 0, 1, 1))
    return fig


def _chars_per_line(width_in: float, fontsize: float) -> int:
    """Characters of DejaVu Sans at ``fontsize`` pt that fit in ``width_in`` inches (a safe underestimate)."""
    return max(8, int(width_in * 72.0 / (0.62 * fontsize)))


def montage_figure(tiles: Sequence["Tile"], *, ncols: int = 4, title: str = "", tile_in: float = 2.6,
                   fontsize: float = 7.0) -> "Figure":
    """A grid of tiles (row-major, in the given order) with one shared legend.

    The layout is computed, not left to ``tight_layout``: tile titles are
    wrapped to the tile's width, each row of tiles gets the height its longest
    title needs, and the figure title and legend have their own band at the
    top, so no text is clipped or overlaps another tile.
    """
    import textwrap

    if not tiles:
        raise ValueError("montage_figure needs at least one tile")
    ncols = max(1, min(ncols, len(tiles)))
    nrows = math.ceil(len(tiles) / ncols)
    gap, margin = 0.2, 0.1
    width = ncols * tile_in + (ncols - 1) * gap + 2 * margin
    wrap = _chars_per_line(tile_in, fontsize)
    titles = [tile_title(tile.meta, width=wrap) if tile.meta else "\n".join(textwrap.wrap(tile.title, wrap)) for tile in tiles]
    line_in = fontsize * 1.25 / 72.0
    row_title_in = [max(t.count("\n") + 1 for t in titles[r * ncols:(r + 1) * ncols]) * line_in + 0.12 for r in range(nrows)]
    head_lines = textwrap.wrap(title, _chars_per_line(width - 2 * margin, 10.0)) if title else []
    head_in = margin + len(head_lines) * 10.0 * 1.3 / 72.0 + 0.3  # title lines + legend band
    height = head_in + sum(row_title_in) + nrows * tile_in + (nrows - 1) * gap + margin
    fig = _pyplot_free_figure(figsize=(width, height))
    top = height - head_in
    for n, tile in enumerate(tiles):
        r, c = divmod(n, ncols)
        top_of_row = top - sum(row_title_in[:r]) - r * (tile_in + gap)
        bottom = top_of_row - row_title_in[r] - tile_in
        left = margin + c * (tile_in + gap)
        ax = fig.add_axes((left / width, bottom / height, tile_in / width, tile_in / height))
        draw_tile(ax, tile, title=False, fontsize=fontsize)
        ax.set_title(titles[n], fontsize=fontsize, pad=4)
    if head_lines:
        fig.text(0.5, 1 - margin / height, "\n".join(head_lines), ha="center", va="top", fontsize=10)
    fig.legend(handles=_legend_handles(), loc="upper center", ncol=2, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, (height - head_in + 0.3) / height))
    return fig


def box_plot_figure(table: pd.DataFrame, structure: str, metrics: Sequence[tuple[str, str]] | None = None) -> "Figure":
    """Box plots of one structure's metrics, one box per model x centre.

    Uses condition ``original`` rows with status ``ok`` (finite values); the
    number of ``missed``/``hallucinated`` rows left out is written under each
    box (x tick label). Boxes are told apart by grey fill and hatch per model (print-safe),
    explained by a legend; x labels say ``model`` and ``centre``.

    Parameters
    ----------
    table:
        The results table.
    structure:
        Structure to plot.
    metrics:
        ``(column, axis label)`` pairs; default DSC, HD95 (mm) and MSD (mm).
    """
    if metrics is None:
        metrics = (("dsc", "DSC"), ("hd95", "HD95 (mm)"), ("msd", "MSD (mm)"))
    metrics = [m for m in metrics if m[0] in table.columns]
    if not metrics:
        raise ValueError("box_plot_figure: the table has none of the metric columns to plot")
    df = table[table["structure"].astype(str) == structure]
    if "condition" in df.columns:
        df = df[df["condition"].fillna("original").astype(str) == "original"]
    models = sorted(df["model"].astype(str).unique())
    centres = sorted(df["centre"].astype(str).unique())
    groups = [(m, c) for c in centres for m in models]
    width = max(4.0, 0.8 * len(groups) + 1.2)
    fig = _pyplot_free_figure(figsize=(width * len(metrics) / 1.6 if len(metrics) > 1 else width, 4.0))
    for n, (col, label) in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), n + 1)
        data, left_out = [], []
        for m, c in groups:
            g = df[(df["model"].astype(str) == m) & (df["centre"].astype(str) == c)]
            vals = pd.to_numeric(g.loc[g["status"] == "ok", col], errors="coerce").to_numpy(float)
            data.append(vals[np.isfinite(vals)])
            left_out.append(int(g["status"].isin(["missed", "hallucinated"]).sum()))
        positions = np.arange(1, len(groups) + 1)
        plotted = [d if len(d) else np.array([np.nan]) for d in data]
        bp = ax.boxplot(plotted, positions=positions, widths=0.6, patch_artist=True, showfliers=True,
                        medianprops={"color": "black", "linewidth": 1.5},
                        flierprops={"marker": "o", "markersize": 3, "markerfacecolor": "none", "markeredgecolor": "black"})
        for patch, (m, _c) in zip(bp["boxes"], groups):
            i = models.index(m)
            patch.set_facecolor(_GREYS[i % len(_GREYS)])
            patch.set_hatch(_HATCHES[i % len(_HATCHES)])
            patch.set_edgecolor("black")
        ax.set_xticks(positions)
        ax.set_xticklabels(
            [f"{m}\n{c}\nn={len(d)}" + (f"\n+{nout} m/h" if nout else "") for (m, c), d, nout in zip(groups, data, left_out)],
            fontsize=7,
        )
        ax.set_xlabel("model / centre / n", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", color="#dddddd", linewidth=0.5)
        ax.set_axisbelow(True)
        if col == "dsc":
            ax.set_ylim(-0.02, 1.02)
    fig.suptitle(f"{structure} (condition original, status ok; m/h = missed/hallucinated rows not drawn)", fontsize=8)
    fig.legend(handles=_model_handles(models), loc="upper center", ncol=min(len(models), 6), fontsize=7,
               frameon=False, bbox_to_anchor=(0.5, 0.93), title="model (fill and hatch)", title_fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.86 if len(models) <= 6 else 0.8))
    return fig


def _model_handles(models: Sequence[str]) -> list[Any]:
    from matplotlib.patches import Patch

    return [Patch(facecolor=_GREYS[i % len(_GREYS)], hatch=_HATCHES[i % len(_HATCHES)], edgecolor="black", label=m)
            for i, m in enumerate(models)]


def figure_png_bytes(fig: "Figure", *, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes (white background)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def save_png(fig: "Figure", path: str | Path, *, dpi: int = 100) -> Path:
    """Write a figure as PNG atomically; returns the path."""
    from oarbench.io import atomic_write_bytes

    return atomic_write_bytes(path, figure_png_bytes(fig, dpi=dpi))
