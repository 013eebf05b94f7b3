"""What a gallery tile is: one 2D view of a case ready to draw, its CT display window and its title.

The gallery (:mod:`oarbench.gallery`) makes tiles and :mod:`oarbench.plots`
draws them; both import these types from here, so neither imports the other's
package at module level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

__all__ = ["Window", "Tile", "tile_title"]

_ORIGINAL = "original"


@dataclass(frozen=True)
class Window:
    """A CT display window in HU: ``width`` and ``level`` (centre)."""

    width: float
    level: float
    name: str = ""

    @property
    def vmin(self) -> float:
        return self.level - self.width / 2.0

    @property
    def vmax(self) -> float:
        return self.level + self.width / 2.0


@dataclass(frozen=True, eq=False)
class Tile:
    """One 2D view of a case, ready to draw (see :func:`oarbench.plots.draw_tile`).

    Attributes
    ----------
    image, reference, prediction:
        2D arrays (rows, columns) in display orientation: row 0 at the top,
        column 0 at the left, already cropped. ``image`` in HU; the masks bool.
    aspect:
        Height/width of one pixel (row spacing / column spacing), for
        ``imshow(aspect=...)``.
    pixel_mm:
        (row spacing, column spacing) in mm.
    plane:
        ``axial``, ``coronal`` or ``sagittal``.
    slice_index:
        Index of the slice along the plane's normal in the LPS-oriented array
        (z for axial counted from inferior, y for coronal from anterior, x for
        sagittal from patient right).
    disagreement:
        FP + FN voxels in the shown slice (before cropping; the crop keeps them all).
    window:
        The display window.
    title:
        Text above the tile.
    meta:
        The table row's fields that identify the tile (case, structure, ...).
    """

    image: np.ndarray
    reference: np.ndarray
    prediction: np.ndarray
    aspect: float
    pixel_mm: tuple[float, float]
    plane: str
    slice_index: int
    disagreement: int
    window: Window
    title: str
    meta: Mapping[str, Any] = field(default_factory=dict)


def _fmt(value: Any, unit: str = "", digits: int = 3) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}{unit}"


def tile_title(meta: Mapping[str, Any], width: int | None = None) -> str:
    """``case · structure`` / ``model @ centre [condition]`` / ``DSC x · HD95 y mm`` / reasons.

    With ``width``, every line is wrapped to at most that many characters
    (long case or structure names then take two lines instead of being cut).
    """
    import textwrap

    cond = str(meta.get("condition", _ORIGINAL))
    cond_txt = "" if cond == _ORIGINAL else f" [{cond}]"
    status = str(meta.get("status", ""))
    status_txt = "" if status in ("", "ok") else f" ({status})"
    lines = [
        f"{meta.get('case', '?')} · {meta.get('structure', '?')}{status_txt}",
        f"{meta.get('model', '?')} @ {meta.get('centre', '?')}{cond_txt}",
        f"DSC {_fmt(meta.get('dsc'))} · HD95 {_fmt(meta.get('hd95'), ' mm', 1)}",
    ]
    if meta.get("reason"):
        lines.append(str(meta["reason"]).replace(";", ", "))
    n_islands = meta.get("ref_islands")
    if isinstance(n_islands, (int, np.integer)) and n_islands > 1:
        lines.append(f"reference: {int(n_islands)} islands, smallest {int(meta.get('ref_smallest_island_voxels') or 0)} voxels")
    if width is None:
        return "\n".join(lines)
    out: list[str] = []
    for line in lines:
        out.extend(textwrap.wrap(line, width=max(8, int(width)), break_long_words=True, break_on_hyphens=False) or [""])
    return "\n".join(out)
