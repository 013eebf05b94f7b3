"""Failure-case galleries: which rows to look at, and the slice that shows them.

The package is split by concern:

* :mod:`oarbench.gallery.selection`: :func:`select_failures` picks the rows of
  the results table where something failed (DSC below / HD95 above stated
  thresholds, Tukey outliers, missed / hallucinated structures, laterality
  swaps, DSC drops under robustness conditions) and says why in a ``reason``
  column.
* :mod:`oarbench.gallery.windows`: the CT display window of each structure.
* :mod:`oarbench.gallery.slices`: slice geometry; :func:`make_tile` turns one
  case's CT, reference and prediction arrays (reoriented to LPS with
  :func:`orient_lps`) into a :class:`Tile`: the 2D slice with the most
  disagreement voxels, cropped and windowed.
* :mod:`oarbench.gallery.paths`: :class:`PathResolver`, where each case's files are.
* :mod:`oarbench.gallery.build`: :func:`build_gallery` loads the volumes, makes the
  tiles and writes per-structure PNG montages (``STRUCTURE.png``) plus
  ``index.csv`` and ``index.html`` (drawing lives in :mod:`oarbench.plots`).
"""

from oarbench.gallery.build import SELECTION_FILE, GalleryResult, build_gallery, tile_for_row
from oarbench.gallery.paths import PathResolver
from oarbench.gallery.selection import REASONS, FailureCriteria, select_failures
from oarbench.gallery.slices import (
    PLANES,
    Tile,
    choose_slice,
    disagreement_per_slice,
    island_sizes,
    make_tile,
    orient_lps,
    tile_title,
)
from oarbench.gallery.windows import ABDOMEN_WINDOW, BONE_WINDOW, BRAIN_WINDOW, LUNG_WINDOW, Window, window_for

__all__ = [
    "REASONS",
    "PLANES",
    "FailureCriteria",
    "select_failures",
    "Window",
    "ABDOMEN_WINDOW",
    "LUNG_WINDOW",
    "BONE_WINDOW",
    "BRAIN_WINDOW",
    "window_for",
    "Tile",
    "orient_lps",
    "disagreement_per_slice",
    "choose_slice",
    "island_sizes",
    "tile_title",
    "make_tile",
    "tile_for_row",
    "PathResolver",
    "SELECTION_FILE",
    "GalleryResult",
    "build_gallery",
]
