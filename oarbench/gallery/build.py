"""Build a gallery folder: select rows, load their volumes, draw per-structure montages."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from oarbench.gallery.paths import PathResolver, find_case_file
from oarbench.gallery.selection import FailureCriteria, select_failures
from oarbench.gallery.slices import Tile, island_sizes, make_tile, orient_lps
from oarbench.tables import csv_text

__all__ = ["SELECTION_FILE", "GalleryResult", "tile_for_row", "build_gallery"]

#: The criteria a gallery was selected with, written beside its index.
SELECTION_FILE = "selection.json"

_ORIGINAL = "original"


@dataclass(frozen=True)
class GalleryResult:
    """What :func:`build_gallery` wrote.

    Attributes
    ----------
    folder:
        The gallery folder.
    montages:
        Structure -> montage PNG path.
    index:
        The index table (also written as ``index.csv``): one row per selected
        row, with ``drawn`` (bool), ``note`` (why not drawn), ``montage``,
        ``panel`` (1-based position in the montage), ``plane``, ``slice_index``.
    """

    folder: Path
    montages: Mapping[str, Path]
    index: pd.DataFrame


class _VolumeCache:
    """Keeps the last few oriented volumes (a case's CT is used by many tiles)."""

    def __init__(self, size: int = 6) -> None:
        self.size = size
        self.items: dict[str, Any] = {}

    def get(self, path: Path) -> Any:
        import SimpleITK as sitk

        from oarbench.io import read_volume

        key = str(path)
        if key in self.items:
            self.items[key] = self.items.pop(key)
            return self.items[key]
        volume = read_volume(path)
        if volume.array.ndim != 3:
            raise ValueError(f"{path}: expected a 3D image, got {volume.array.ndim}D")
        image = orient_lps(volume.to_image())
        entry = (image, sitk.GetArrayFromImage(image), tuple(float(s) for s in reversed(image.GetSpacing())))
        self.items[key] = entry
        while len(self.items) > self.size:
            self.items.pop(next(iter(self.items)))
        return entry



def _label_value(row: Mapping[str, Any]) -> int:
    from oarbench.labels import DEFAULT_LABELS

    label = row.get("label")
    try:
        if label is not None and not pd.isna(label):
            return int(label)
    except (TypeError, ValueError):
        pass
    try:
        return DEFAULT_LABELS.value(str(row["structure"]))
    except KeyError as exc:
        raise ValueError(f"no label value for structure {row['structure']!r}: the table has no 'label' column") from exc


def tile_for_row(
    row: Mapping[str, Any],
    resolver: PathResolver,
    *,
    plane: str = "auto",
    cache: "_VolumeCache | None" = None,
    listing: dict | None = None,
) -> Tile:
    """Load one table row's CT, reference and prediction and make its :class:`Tile`.

    Every volume is reoriented to LPS (:func:`orient_lps`); a label image whose
    grid differs from the CT's is resampled onto it by nearest neighbour. The
    structure's label value comes from the row's ``label`` column, else from the
    default label map. The tile's ``meta`` also holds the reference's connected
    components (:func:`~oarbench.gallery.slices.island_sizes`, on the reference's
    own grid): ``ref_islands``, ``ref_smallest_island_voxels``, ``ref_island_sizes``.
    Raises ValueError when a file is missing or unreadable.
    """
    import SimpleITK as sitk

    cache = cache if cache is not None else _VolumeCache()
    listing = listing if listing is not None else {}

    centre, model, case = str(row["centre"]), str(row["model"]), str(row["case"])
    condition = str(row.get("condition", _ORIGINAL))
    img_dir, ref_dir, pred_dir = resolver.folders(centre, model, condition)
    img_path = find_case_file(img_dir, case, True, listing)
    ref_path = find_case_file(ref_dir, case, False, listing)
    pred_path = find_case_file(pred_dir, case, False, listing)
    ct_img, ct, spacing = cache.get(img_path)
    label = _label_value(row)
    masks = []
    islands = np.zeros(0, dtype=np.int64)
    for path in (ref_path, pred_path):
        lab_img, lab, _ = cache.get(path)
        if path == ref_path:
            islands = island_sizes(lab == label)  # on the reference's own grid, before any resampling
        if lab.shape != ct.shape or not np.allclose(lab_img.GetOrigin(), ct_img.GetOrigin(), atol=1e-3) or not np.allclose(
            lab_img.GetSpacing(), ct_img.GetSpacing(), rtol=1e-4
        ):
            lab_img = sitk.Resample(lab_img, ct_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0, lab_img.GetPixelID())
            lab = sitk.GetArrayFromImage(lab_img)
        masks.append(lab == label)
    meta = {k: row.get(k) for k in ("case", "structure", "model", "centre", "condition", "status", "dsc", "hd95", "reason")}
    meta.update(ref_islands=int(islands.size), ref_smallest_island_voxels=int(islands[0]) if islands.size else 0,
                ref_island_sizes=tuple(int(v) for v in islands))
    return make_tile(ct, masks[0], masks[1], spacing, structure=str(row["structure"]), meta=meta, plane=plane)


def _safe_name(structure: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in structure)
    return keep.strip(".") or "structure"


def build_gallery(
    table: pd.DataFrame,
    resolver: PathResolver,
    out_dir: str | Path,
    *,
    criteria: FailureCriteria | None = None,
    small_island_voxels: int = 10,
    ncols: int = 4,
    dpi: int = 100,
    source: str = "results table",
    progress: Any = None,
    workers: int = 1,
) -> GalleryResult:
    """Select failure cases, draw them and write the gallery folder.

    Writes ``out_dir/STRUCTURE.png`` (one montage per structure with at least one
    drawable tile), ``out_dir/index.csv`` and ``out_dir/index.html``. Rows whose
    files cannot be found or read are listed in the index with ``drawn=False``
    and the reason in ``note``; they never stop the rest of the gallery.

    Parameters
    ----------
    table:
        The results table.
    resolver:
        Where the images are (:class:`PathResolver`).
    out_dir:
        The gallery folder (created).
    criteria:
        What counts as a failure (:class:`FailureCriteria`, passed to
        :func:`select_failures`); written to ``selection.json`` so the report
        can state it.
    small_island_voxels:
        Reference islands (connected components, 26-connectivity) of at most
        this many voxels are counted in the index column ``ref_small_islands``.
    ncols:
        Tiles per montage row.
    dpi:
        Resolution of the montages.
    progress:
        Optional callable ``progress(done, total)``.
    workers:
        Processes that draw the montages (one structure each, the largest first);
        1 draws them in this process. The files are the same either way.
    """
    from oarbench.executors import LocalExecutor
    from oarbench.io import atomic_write_text

    out = Path(out_dir)
    crit = criteria if criteria is not None else FailureCriteria()
    selected = select_failures(table, crit, source=source)
    resolver.check_unambiguous(selected if len(selected) else table)
    out.mkdir(parents=True, exist_ok=True)
    cache = _VolumeCache()
    listing: dict = {}
    records: list[dict[str, Any]] = []
    tiles_by_structure: dict[str, list[Tile]] = {}
    # Visit rows case by case so the volume cache hits; keep index order as selected.
    visit = sorted(range(len(selected)), key=lambda i: (str(selected.at[i, "centre"]), str(selected.at[i, "case"])))
    results: dict[int, tuple[Tile | None, str]] = {}
    for n, i in enumerate(visit):
        row = selected.iloc[i].to_dict()
        try:
            results[i] = (tile_for_row(row, resolver, cache=cache, listing=listing), "")
        except ValueError as exc:
            results[i] = (None, str(exc))
        if progress is not None:
            progress(n + 1, len(visit))
    montages: dict[str, Path] = {}
    for i in range(len(selected)):
        row = selected.iloc[i].to_dict()
        tile, note = results[i]
        rec = {k2: row.get(k2) for k2 in ("structure", "label", "centre", "model", "condition", "case", "status", "dsc", "hd95", "dsc_drop", "reason") if k2 in row}
        rec.update(drawn=tile is not None, note=note, montage="", panel=np.nan, plane="", slice_index=np.nan,
                   ref_islands=np.nan, ref_small_islands=np.nan, ref_smallest_island_voxels=np.nan)
        if tile is not None:
            sizes = np.asarray(tile.meta.get("ref_island_sizes", ()), dtype=np.int64)
            rec.update(ref_islands=int(sizes.size), ref_small_islands=int((sizes <= small_island_voxels).sum()),
                       ref_smallest_island_voxels=int(sizes[0]) if sizes.size else np.nan)
            lst = tiles_by_structure.setdefault(str(row["structure"]), [])
            lst.append(tile)
            rec.update(montage=f"{_safe_name(str(row['structure']))}.png", panel=len(lst), plane=tile.plane, slice_index=tile.slice_index)
        records.append(rec)
    drawing = [(tiles, ncols, f"{structure}: failure cases ({len(tiles)})", out / f"{_safe_name(structure)}.png", dpi)
               for structure, tiles in tiles_by_structure.items()]
    order = sorted(range(len(drawing)), key=lambda j: -len(drawing[j][0]))  # the largest montages first
    LocalExecutor(max(1, workers)).map(_draw_montage, [drawing[j] for j in order])
    for structure, task in zip(tiles_by_structure, drawing):
        montages[structure] = task[3]
    index = pd.DataFrame.from_records(records)
    if index.empty:
        index = pd.DataFrame(columns=["structure", "centre", "model", "condition", "case", "status", "dsc", "hd95", "dsc_drop", "reason", "drawn", "note", "montage", "panel", "plane", "slice_index", "ref_islands", "ref_small_islands", "ref_smallest_island_voxels"])
    atomic_write_text(out / "index.csv", csv_text(index))
    atomic_write_text(out / "index.html", _index_html(index, montages, crit))
    atomic_write_text(out / SELECTION_FILE, json.dumps({**crit.as_dict(), "small_island_voxels": int(small_island_voxels)}, indent=2) + "\n")
    return GalleryResult(out, montages, index)


def _draw_montage(task: tuple[list[Tile], int, str, Path, int]) -> Path:
    """Draw one structure's montage and write it (a task of :func:`build_gallery`'s workers)."""
    from oarbench.plots import montage_figure, save_png

    tiles, ncols, title, path, dpi = task
    return save_png(montage_figure(tiles, ncols=ncols, title=title), path, dpi=dpi)


def _index_html(index: pd.DataFrame, montages: Mapping[str, Path], criteria: FailureCriteria) -> str:
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>oarbench failure-case gallery</title>",
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;font-size:0.85em}"
        "td,th{border:1px solid #999;padding:2px 6px}img{max-width:100%}</style></head><body>",
        "<h1>Failure-case gallery</h1>",
        "<p>Reference: solid blue line; prediction: dashed orange line. Radiological convention "
        "(patient left on image right).</p>",
        f"<p>{html.escape(criteria.describe())}</p>",
    ]
    if index.empty:
        parts.append("<p>No failures: no row meets any of these rules.</p>")
    for structure, path in montages.items():
        parts.append(f"<h2>{html.escape(structure)}</h2><img src='{html.escape(path.name, quote=True)}' alt='{html.escape(structure, quote=True)} montage'>")
    parts.append("<h2>Index</h2>")
    parts.append(index.to_html(index=False, na_rep="", escape=True, border=0))
    parts.append("</body></html>\n")
    return "\n".join(parts)
