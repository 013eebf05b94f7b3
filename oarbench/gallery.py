"""Failure-case galleries: which rows to look at, and the slice that shows them.

Three steps, each a pure function except the last:

1. :func:`select_failures` picks rows of the results table worth looking at
   (lowest DSC, highest HD95, Tukey outliers, missed / hallucinated structures,
   laterality swaps, largest DSC drops under robustness conditions) and says
   why in a ``reason`` column.
2. :func:`make_tile` turns one case's CT, reference and prediction arrays
   (already reoriented to LPS with :func:`orient_lps`) into a :class:`Tile`: the
   2D slice with the most disagreement voxels, cropped and windowed.
3. :func:`build_gallery` resolves the image files (:class:`PathResolver`), makes
   the tiles and writes per-structure PNG montages (``STRUCTURE.png``) plus
   ``index.csv`` and ``index.html`` (drawing lives in :mod:`oarbench.plots`).

Display conventions (docs/report.md): every volume is reoriented with
SimpleITK ``DICOMOrient(image, "LPS")`` so that, in the array (z, y, x), x grows
toward the patient's Left, y toward Posterior and z toward Superior. Tiles are
shown in radiological convention: axial slices seen from the feet (patient
left on image right, anterior up), coronal slices seen from the front (patient
left on image right, superior up), sagittal slices seen from the patient's left
(anterior on image left, superior up).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

__all__ = [
    "REASONS",
    "PLANES",
    "select_failures",
    "Window",
    "window_for",
    "Tile",
    "orient_lps",
    "disagreement_per_slice",
    "choose_slice",
    "make_tile",
    "tile_for_row",
    "PathResolver",
    "GalleryResult",
    "build_gallery",
]

#: Selection reasons, in the order they are listed in the ``reason`` column.
REASONS: tuple[str, ...] = (
    "missed",
    "hallucinated",
    "laterality_swap",
    "lowest_dsc",
    "highest_hd95",
    "outlier_dsc",
    "outlier_hd95",
    "robustness_drop",
)

#: Planes in tie-break order: the first wins when two show equal disagreement.
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")

_ORIGINAL = "original"
_GROUP = ["structure", "model", "centre"]
_KEY = ["centre", "model", "condition", "case", "structure"]
_REQUIRED = ("centre", "model", "case", "structure", "status", "dsc", "hd95")


# --------------------------------------------------------------------------- selection


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "y", "t"}
    try:
        if pd.isna(value):
            return False
    except (TypeError, ValueError):
        pass
    return bool(value)


def _check_columns(table: pd.DataFrame, required: Iterable[str], what: str) -> None:
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {', '.join(missing)} (have {', '.join(map(str, table.columns))})")


def select_failures(
    table: pd.DataFrame,
    k: int = 3,
    *,
    tukey_factor: float = 1.5,
    source: str = "results table",
) -> pd.DataFrame:
    """Rows of a results table worth looking at, with the reasons why.

    Selection is made per structure x model x centre:

    * ``lowest_dsc`` / ``highest_hd95``: the ``k`` rows with the lowest DSC and the
      ``k`` rows with the highest HD95 (mm) among ``ok`` rows of condition
      ``original`` (ties broken by case name, so the choice is deterministic);
    * ``outlier_dsc`` / ``outlier_hd95``: Tukey outliers among the same rows: DSC
      strictly below Q1 - f*IQR, HD95 strictly above Q3 + f*IQR (f =
      ``tukey_factor``; quartiles by linear interpolation, numpy's default);
    * ``missed`` / ``hallucinated``: every row with that status, any condition;
    * ``laterality_swap``: every row whose ``laterality_swap`` column (if the table
      has one) is truthy, any condition;
    * ``robustness_drop``: for each condition other than ``original``, the ``k``
      rows with the largest DSC drop (original DSC minus DSC under the condition,
      same case/structure/model/centre; only drops > 0; rows with NaN DSC, i.e.
      ``absent``, never enter).

    Parameters
    ----------
    table:
        The results table (columns per the shared contract; ``condition`` is
        optional and taken as ``original`` when missing).
    k:
        How many rows per ranking (>= 1).
    tukey_factor:
        Fence factor for the outlier rule (1.5 = Tukey's inner fences).
    source:
        Name of the table used in error messages (e.g. its file name).

    Returns
    -------
    pandas.DataFrame
        One row per selected case/structure/model/centre/condition (duplicates
        merged), the table's columns plus ``reason`` (``;``-joined reasons in the
        order of :data:`REASONS`) and ``dsc_drop`` (NaN unless a robustness drop).
        Sorted by structure, model, centre, condition, case.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{source}: expected a pandas DataFrame, got {type(table).__name__}")
    _check_columns(table, _REQUIRED, source)
    df = table.copy()
    if "condition" not in df.columns:
        df["condition"] = _ORIGINAL
    df["condition"] = df["condition"].fillna(_ORIGINAL).astype(str)
    for col in ("case", "structure", "model", "centre", "status"):
        df[col] = df[col].astype(str)
    df["dsc"] = pd.to_numeric(df["dsc"], errors="coerce")
    df["hd95"] = pd.to_numeric(df["hd95"], errors="coerce")
    df = df.reset_index(drop=True)
    dup = df.duplicated(_KEY, keep=False)
    if dup.any():
        first = df.loc[dup, _KEY].iloc[0].to_dict()
        raise ValueError(f"{source}: {int(dup.sum())} rows share case/structure/model/centre/condition, e.g. {first}")

    reasons: dict[int, set[str]] = {}
    drops: dict[int, float] = {}

    def add(index: Iterable[int], reason: str) -> None:
        for i in index:
            reasons.setdefault(int(i), set()).add(reason)

    add(df.index[df["status"] == "missed"], "missed")
    add(df.index[df["status"] == "hallucinated"], "hallucinated")
    if "laterality_swap" in df.columns:
        add(df.index[df["laterality_swap"].map(_truthy)], "laterality_swap")

    ok = df[(df["status"] == "ok") & (df["condition"] == _ORIGINAL)]
    for _, group in ok.groupby(_GROUP, sort=True):
        dsc = group.dropna(subset=["dsc"]).sort_values(["dsc", "case"], kind="mergesort")
        add(dsc.index[:k], "lowest_dsc")
        hd = group.dropna(subset=["hd95"]).sort_values(["hd95", "case"], ascending=[False, True], kind="mergesort")
        add(hd.index[:k], "highest_hd95")
        if len(dsc):
            q1, q3 = np.percentile(dsc["dsc"].to_numpy(float), [25, 75])
            add(dsc.index[dsc["dsc"] < q1 - tukey_factor * (q3 - q1)], "outlier_dsc")
        finite = hd[np.isfinite(hd["hd95"])]
        if len(finite):
            q1, q3 = np.percentile(finite["hd95"].to_numpy(float), [25, 75])
            add(finite.index[finite["hd95"] > q3 + tukey_factor * (q3 - q1)], "outlier_hd95")

    perturbed = df[df["condition"] != _ORIGINAL]
    if len(perturbed):
        base = df[df["condition"] == _ORIGINAL].set_index(["centre", "model", "case", "structure"])["dsc"]
        keys = pd.MultiIndex.from_frame(perturbed[["centre", "model", "case", "structure"]])
        original_dsc = base.reindex(keys).to_numpy(float)
        drop = pd.Series(original_dsc - perturbed["dsc"].to_numpy(float), index=perturbed.index)
        cand = perturbed.assign(_drop=drop)
        cand = cand[np.isfinite(cand["_drop"]) & (cand["_drop"] > 0)]
        for _, group in cand.groupby(_GROUP + ["condition"], sort=True):
            top = group.sort_values(["_drop", "case"], ascending=[False, True], kind="mergesort").index[:k]
            add(top, "robustness_drop")
            for i in top:
                drops[int(i)] = float(group.at[i, "_drop"])

    order = {r: n for n, r in enumerate(REASONS)}
    rows = sorted(reasons)
    out = df.loc[rows].copy()
    out["reason"] = [";".join(sorted(reasons[i], key=order.__getitem__)) for i in rows]
    out["dsc_drop"] = [drops.get(i, np.nan) for i in rows]
    sort_cols = ["structure", "model", "centre", "condition", "case"]
    if "label" in out.columns:
        sort_cols = ["label"] + sort_cols
    return out.sort_values(sort_cols, kind="mergesort").reset_index(drop=True)


# --------------------------------------------------------------------------- windows


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


ABDOMEN_WINDOW = Window(400.0, 40.0, "abdomen")
LUNG_WINDOW = Window(1500.0, -600.0, "lung")
_LUNG_STRUCTURES = {"Lung_L", "Lung_R"}


def window_for(structure: str) -> Window:
    """Lung window (W1500/L-600) for ``Lung_L``/``Lung_R``, abdomen window (W400/L40) otherwise."""
    from oarbench.labels import canonical_name

    return LUNG_WINDOW if canonical_name(structure) in _LUNG_STRUCTURES else ABDOMEN_WINDOW


# --------------------------------------------------------------------------- tiles


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


def orient_lps(image: Any) -> Any:
    """Reorient a SimpleITK image so that its direction is the identity (LPS).

    After this, ``GetArrayFromImage`` gives axes (z, y, x) with x toward the
    patient's Left, y toward Posterior, z toward Superior. Oblique directions are
    snapped to the closest axis-aligned orientation (ITK's DICOMOrient rule),
    which is exact for a permutation/flip of axes and an approximation otherwise.
    """
    import SimpleITK as sitk

    return sitk.DICOMOrient(image, "LPS")


def disagreement_per_slice(reference: np.ndarray, prediction: np.ndarray) -> dict[str, np.ndarray]:
    """FP + FN voxel counts per slice for each plane.

    ``reference`` and ``prediction`` are bool arrays (z, y, x) in LPS orientation.
    Returns ``{"axial": counts over z, "coronal": counts over y, "sagittal": counts over x}``.
    """
    diff = np.logical_xor(reference, prediction)
    return {
        "axial": diff.sum(axis=(1, 2)),
        "coronal": diff.sum(axis=(0, 2)),
        "sagittal": diff.sum(axis=(0, 1)),
    }


def _plane_pixel_mm(plane: str, spacing: tuple[float, float, float]) -> tuple[float, float]:
    sz, sy, sx = spacing
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[plane]


def choose_slice(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: tuple[float, float, float],
    plane: str = "auto",
) -> tuple[str, int, int]:
    """The plane and slice that show the disagreement best.

    Within a plane, the slice with the most FP + FN voxels (lowest index on
    ties). With ``plane="auto"`` the plane whose best slice shows the largest
    disagreement *area* in mm^2 (voxel count times in-plane pixel area, so a
    thick-slice coronal view does not win just by having few, large pixels
    counted once), ties going to axial, then coronal, then sagittal. When the
    masks agree everywhere (or one is empty and the other too), the slice with
    the most voxels of reference OR prediction is used instead.

    Returns ``(plane, slice_index, disagreement_voxels)``.
    """
    if reference.shape != prediction.shape or reference.ndim != 3:
        raise ValueError(f"reference {reference.shape} and prediction {prediction.shape} must be 3D arrays of one shape")
    if plane != "auto" and plane not in PLANES:
        raise ValueError(f"plane must be 'auto' or one of {', '.join(PLANES)}, got {plane!r}")
    counts = disagreement_per_slice(reference, prediction)
    if not any(c.any() for c in counts.values()):
        union = np.logical_or(reference, prediction)
        counts = {"axial": union.sum(axis=(1, 2)), "coronal": union.sum(axis=(0, 2)), "sagittal": union.sum(axis=(0, 1))}
    candidates = PLANES if plane == "auto" else (plane,)
    best: tuple[float, str, int] | None = None
    for p in candidates:
        idx = int(np.argmax(counts[p]))
        rows_mm, cols_mm = _plane_pixel_mm(p, spacing)
        area = float(counts[p][idx]) * rows_mm * cols_mm
        if best is None or area > best[0]:
            best = (area, p, idx)
    assert best is not None
    _, p, idx = best
    diff = np.logical_xor(reference, prediction)
    return p, idx, int(_extract(diff, p, idx).sum())


def _extract(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """A 2D slice of an LPS (z, y, x) array in display orientation.

    axial: rows y (anterior at top), columns x (patient right at left);
    coronal: rows z flipped (superior at top), columns x;
    sagittal: rows z flipped (superior at top), columns y (anterior at left).
    """
    if plane == "axial":
        return volume[index, :, :]
    if plane == "coronal":
        return volume[::-1, index, :]
    if plane == "sagittal":
        return volume[::-1, :, index]
    raise ValueError(f"unknown plane {plane!r}")


def _crop_box(mask: np.ndarray, pixel_mm: tuple[float, float], margin_mm: float, min_size_mm: float) -> tuple[slice, slice]:
    rows, cols = mask.shape
    if not mask.any():
        return slice(0, rows), slice(0, cols)
    r = np.flatnonzero(mask.any(axis=1))
    c = np.flatnonzero(mask.any(axis=0))
    out = []
    for lo, hi, n, mm in ((r[0], r[-1], rows, pixel_mm[0]), (c[0], c[-1], cols, pixel_mm[1])):
        pad = int(math.ceil(margin_mm / mm))
        start, stop = lo - pad, hi + 1 + pad
        min_px = int(math.ceil(min_size_mm / mm))
        if stop - start < min_px:
            extra = min_px - (stop - start)
            start -= extra // 2
            stop += extra - extra // 2
        start, stop = max(start, 0), min(stop, n)
        out.append(slice(int(start), int(stop)))
    return out[0], out[1]


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


def tile_title(meta: Mapping[str, Any]) -> str:
    """``case · structure`` / ``model @ centre [condition]`` / ``DSC x · HD95 y mm`` / reasons."""
    cond = str(meta.get("condition", _ORIGINAL))
    cond_txt = "" if cond == _ORIGINAL else f" [{cond}]"
    status = str(meta.get("status", ""))
    status_txt = "" if status in ("", "ok") else f" ({status})"
    return (
        f"{meta.get('case', '?')} · {meta.get('structure', '?')}{status_txt}\n"
        f"{meta.get('model', '?')} @ {meta.get('centre', '?')}{cond_txt}\n"
        f"DSC {_fmt(meta.get('dsc'))} · HD95 {_fmt(meta.get('hd95'), ' mm', 1)}"
        + (f"\n{str(meta['reason']).replace(';', ', ')}" if meta.get("reason") else "")
    )


def make_tile(
    image: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    structure: str,
    meta: Mapping[str, Any] | None = None,
    plane: str = "auto",
    margin_mm: float = 15.0,
    min_size_mm: float = 60.0,
) -> Tile:
    """Cut the most telling 2D view out of one case.

    Parameters
    ----------
    image:
        CT in HU, axes (z, y, x), LPS orientation (see :func:`orient_lps`).
    reference, prediction:
        Masks of one structure on the same grid (bool or 0/1).
    spacing:
        Voxel size in mm, (z, y, x).
    structure:
        Structure name (chooses the window).
    meta:
        Row fields for the title (case, structure, model, centre, condition,
        status, dsc, hd95).
    plane:
        ``auto`` (see :func:`choose_slice`) or a fixed plane.
    margin_mm:
        Margin around the union of both masks in the crop, in mm.
    min_size_mm:
        Smallest crop side in mm (small structures keep some context).
    """
    image = np.asarray(image)
    reference = np.asarray(reference).astype(bool)
    prediction = np.asarray(prediction).astype(bool)
    if not (image.shape == reference.shape == prediction.shape):
        raise ValueError(
            f"image {image.shape}, reference {reference.shape} and prediction {prediction.shape} must share one grid"
        )
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing}")
    spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    p, idx, n_diff = choose_slice(reference, prediction, spacing, plane)
    img2 = _extract(image, p, idx)
    ref2 = _extract(reference, p, idx)
    pred2 = _extract(prediction, p, idx)
    pixel_mm = _plane_pixel_mm(p, spacing)
    rs, cs = _crop_box(ref2 | pred2, pixel_mm, margin_mm, min_size_mm)
    meta = dict(meta or {})
    meta.setdefault("structure", structure)
    return Tile(
        image=np.ascontiguousarray(img2[rs, cs]),
        reference=np.ascontiguousarray(ref2[rs, cs]),
        prediction=np.ascontiguousarray(pred2[rs, cs]),
        aspect=pixel_mm[0] / pixel_mm[1],
        pixel_mm=pixel_mm,
        plane=p,
        slice_index=idx,
        disagreement=n_diff,
        window=window_for(structure),
        title=tile_title(meta),
        meta=meta,
    )


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class PathResolver:
    """Where a case's CT, reference and prediction files are.

    Each of ``images``, ``reference`` and ``predictions`` is a folder path that may
    contain the placeholders ``{centre}``, ``{model}`` and ``{condition}``
    (``predictions = "preds/{model}/{centre}"``). ``images`` and ``reference``
    may instead be a mapping centre -> folder (as a study TOML gives them).
    Images follow nnU-Net naming (``CASE_0000.nii.gz``), labels ``CASE.nii.gz``.
    A prediction pattern without ``{condition}`` serves condition ``original``
    only; rows of other conditions then have no prediction file.
    """

    images: str | Mapping[str, str]
    reference: str | Mapping[str, str]
    predictions: str | Mapping[str, str]
    source: str = "command line"

    @classmethod
    def from_folders(cls, images: str | Path, reference: str | Path, predictions: str | Path) -> "PathResolver":
        return cls(str(images), str(reference), str(predictions), "command line")

    @classmethod
    def from_study(cls, path: str | Path) -> "PathResolver":
        """Folders from a study TOML (docs/study-toml.md), read with :func:`oarbench.study.load_study`.

        ``[[centres]]`` give ``images`` and ``reference`` per centre, ``[[models]]``
        a ``predictions`` pattern per model (``{model}``, ``{centre}`` and, for
        robustness conditions, ``{condition}`` are filled in); relative paths are
        relative to the TOML file's folder.
        """
        from oarbench.study import load_study

        study = load_study(path)
        images: dict[str, str] = {}
        reference: dict[str, str] = {}
        for c in study.centres:
            if c.images is None:
                raise ValueError(f"{path}: centre {c.name!r} has no 'images' folder; the gallery needs the CT images")
            images[c.name] = str(c.images)
            reference[c.name] = str(c.reference)
        predictions: dict[str, str] = {}
        for m in study.models:
            q = Path(m.predictions).expanduser()
            predictions[m.name] = str(q if q.is_absolute() else m.root / q)
        return cls(images, reference, predictions, str(path))

    def _folder(self, what: str, spec: str | Mapping[str, str], key: str, fields: Mapping[str, str]) -> Path:
        if isinstance(spec, Mapping):
            if fields[key] not in spec:
                raise ValueError(f"{self.source}: no {what} folder for {key} {fields[key]!r} (have {', '.join(spec)})")
            pattern = spec[fields[key]]
        else:
            pattern = spec
        try:
            return Path(pattern.format(**fields))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{self.source}: bad placeholder in {what} path {pattern!r}: {exc}") from exc

    def folders(self, centre: str, model: str, condition: str = _ORIGINAL) -> tuple[Path, Path, Path]:
        """(images, reference, predictions) folders for one centre/model/condition.

        Raises ValueError when the prediction pattern cannot tell conditions apart
        and ``condition`` is not ``original``.
        """
        fields = {"centre": centre, "model": model, "condition": condition}
        pred_pattern = self.predictions[model] if isinstance(self.predictions, Mapping) and model in self.predictions else self.predictions
        if isinstance(pred_pattern, Mapping):
            raise ValueError(f"{self.source}: no predictions pattern for model {model!r} (have {', '.join(pred_pattern)})")
        if condition != _ORIGINAL and "{condition}" not in pred_pattern:
            raise ValueError(
                f"{self.source}: predictions pattern {pred_pattern!r} has no {{condition}} placeholder, "
                f"so predictions under condition {condition!r} cannot be found"
            )
        return (
            self._folder("images", self.images, "centre", fields),
            self._folder("reference", self.reference, "centre", fields),
            self._folder("predictions", pred_pattern, "model", fields),
        )

    def check_unambiguous(self, table: pd.DataFrame) -> None:
        """Raise ValueError when plain folders would serve several centres or models."""
        for what, spec, col, ph in (
            ("images", self.images, "centre", "{centre}"),
            ("reference", self.reference, "centre", "{centre}"),
            ("predictions", self.predictions, "model", "{model}"),
        ):
            if isinstance(spec, str) and ph not in spec:
                values = sorted(set(map(str, table[col])))
                if len(values) > 1:
                    raise ValueError(
                        f"{self.source}: the {what} folder {spec!r} has no {ph} placeholder but the table has "
                        f"{len(values)} {col}s ({', '.join(values)}); use a study TOML or put {ph} in the path"
                    )
        if isinstance(self.predictions, str) and "{centre}" not in self.predictions:
            centres = sorted(set(map(str, table["centre"])))
            if len(centres) > 1:
                raise ValueError(
                    f"{self.source}: the predictions folder {self.predictions!r} has no {{centre}} placeholder but the "
                    f"table has {len(centres)} centres ({', '.join(centres)})"
                )


# --------------------------------------------------------------------------- building


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


def _find(folder: Path, case: str, images: bool, cache: dict[tuple[str, bool], dict[str, Path]]) -> Path:
    from oarbench.io import find_cases

    key = (str(folder), images)
    if key not in cache:
        cache[key] = find_cases(folder, images=images)
    files = cache[key]
    if case not in files:
        raise ValueError(f"{folder}: no file for case {case!r}")
    return files[case]


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
    default label map. Raises ValueError when a file is missing or unreadable.
    """
    import SimpleITK as sitk

    cache = cache if cache is not None else _VolumeCache()
    listing = listing if listing is not None else {}

    centre, model, case = str(row["centre"]), str(row["model"]), str(row["case"])
    condition = str(row.get("condition", _ORIGINAL))
    img_dir, ref_dir, pred_dir = resolver.folders(centre, model, condition)
    img_path = _find(img_dir, case, True, listing)
    ref_path = _find(ref_dir, case, False, listing)
    pred_path = _find(pred_dir, case, False, listing)
    ct_img, ct, spacing = cache.get(img_path)
    label = _label_value(row)
    masks = []
    for path in (ref_path, pred_path):
        lab_img, lab, _ = cache.get(path)
        if lab.shape != ct.shape or not np.allclose(lab_img.GetOrigin(), ct_img.GetOrigin(), atol=1e-3) or not np.allclose(
            lab_img.GetSpacing(), ct_img.GetSpacing(), rtol=1e-4
        ):
            lab_img = sitk.Resample(lab_img, ct_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0, lab_img.GetPixelID())
            lab = sitk.GetArrayFromImage(lab_img)
        masks.append(lab == label)
    meta = {k: row.get(k) for k in ("case", "structure", "model", "centre", "condition", "status", "dsc", "hd95", "reason")}
    return make_tile(ct, masks[0], masks[1], spacing, structure=str(row["structure"]), meta=meta, plane=plane)


def _safe_name(structure: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in structure)
    return keep.strip(".") or "structure"


def build_gallery(
    table: pd.DataFrame,
    resolver: PathResolver,
    out_dir: str | Path,
    *,
    k: int = 3,
    ncols: int = 4,
    dpi: int = 100,
    source: str = "results table",
    progress: Any = None,
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
    k:
        Passed to :func:`select_failures`.
    ncols:
        Tiles per montage row.
    dpi:
        Resolution of the montages.
    progress:
        Optional callable ``progress(done, total)``.
    """
    from oarbench.io import atomic_write_text
    from oarbench.plots import montage_figure, save_png

    out = Path(out_dir)
    selected = select_failures(table, k=k, source=source)
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
        rec.update(drawn=tile is not None, note=note, montage="", panel=np.nan, plane="", slice_index=np.nan)
        if tile is not None:
            lst = tiles_by_structure.setdefault(str(row["structure"]), [])
            lst.append(tile)
            rec.update(montage=f"{_safe_name(str(row['structure']))}.png", panel=len(lst), plane=tile.plane, slice_index=tile.slice_index)
        records.append(rec)
    for structure, tiles in tiles_by_structure.items():
        fig = montage_figure(tiles, ncols=ncols, title=f"{structure}: failure cases ({len(tiles)})")
        path = out / f"{_safe_name(structure)}.png"
        save_png(fig, path, dpi=dpi)
        montages[structure] = path
    index = pd.DataFrame.from_records(records)
    if index.empty:
        index = pd.DataFrame(columns=["structure", "centre", "model", "condition", "case", "status", "dsc", "hd95", "dsc_drop", "reason", "drawn", "note", "montage", "panel", "plane", "slice_index"])
    atomic_write_text(out / "index.csv", index.to_csv(index=False))
    atomic_write_text(out / "index.html", _index_html(index, montages))
    return GalleryResult(out, montages, index)


def _index_html(index: pd.DataFrame, montages: Mapping[str, Path]) -> str:
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>oarbench failure-case gallery</title>",
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;font-size:0.85em}"
        "td,th{border:1px solid #999;padding:2px 6px}img{max-width:100%}</style></head><body>",
        "<h1>Failure-case gallery</h1>",
        "<p>Reference: solid blue line; prediction: dashed orange line. Radiological convention "
        "(patient left on image right).</p>",
    ]
    for structure, path in montages.items():
        parts.append(f"<h2>{html.escape(structure)}</h2><img src='{html.escape(path.name, quote=True)}' alt='{html.escape(structure, quote=True)} montage'>")
    parts.append("<h2>Index</h2>")
    parts.append(index.to_html(index=False, na_rep="", escape=True, border=0))
    parts.append("</body></html>\n")
    return "\n".join(parts)
