"""What a report is built from: the options, the loaded and checked inputs, and the per-report cache.

:class:`ReportContext` is what every section function reads. Tables are loaded once
(:func:`load_table`), paths named inside a results folder are resolved inside it
(:func:`inside`), and inputs older than the results table or about other models are
named (:func:`stale_inputs`).
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from oarbench.gallery.selection import FailureCriteria, select_failures
from oarbench.report.data import (
    _KEYS,
    _ORIGINAL,
    _normalise,
    _structure_order,
    _summaries,
    headline_table,
    model_order,
    suspicious_values,
)

__all__ = ["ReportOptions", "ReportContext", "inside", "load_table", "stale_inputs", "gallery_criteria"]


@dataclass(frozen=True)
class ReportOptions:
    """What the report flags and how.

    Attributes
    ----------
    criteria:
        What counts as a failure case (:class:`oarbench.gallery.FailureCriteria`);
        ``None``: the criteria the gallery was drawn with (its ``selection.json``),
        else the defaults.
    high_dsc:
        A row with DSC >= this and HD95 above ``criteria.hd95_above`` (default
        10 mm) is explained as a far-away island.
    small_reference_voxels:
        A reference structure of at most this many voxels (``tp + fn``) is flagged
        as tiny (0 turns the flag off).
    fp_thresholds_ml:
        Volume thresholds (mL) of the false-positive kidney rates.
    trained_on:
        Model -> centres it was trained on, for the within/cross-centre view
        (``None``: not known; the CLI reads it from the study TOML in run.json).
    box_plots:
        Draw the per-structure box plots (the slowest part; off for quick tests).
    models:
        The model order of every table and figure (the ``--prediction`` order or the
        study file's); models not named follow in order of first appearance.
    strict:
        Refuse (ValueError) a gallery or robustness table that is older than the
        results table or about other models, instead of noting it on the page.
    """

    criteria: FailureCriteria | None = None
    high_dsc: float = 0.9
    small_reference_voxels: int = 10
    fp_thresholds_ml: tuple[float, ...] | None = None
    trained_on: Mapping[str, Sequence[str]] | None = None
    box_plots: bool = True
    models: Sequence[str] | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        if not 0 <= float(self.high_dsc) <= 1:
            raise ValueError(f"high_dsc must lie in [0, 1], got {self.high_dsc}")
        if int(self.small_reference_voxels) < 0:
            raise ValueError(f"small_reference_voxels must be >= 0, got {self.small_reference_voxels}")


def inside(folder: str | Path, name: str, what: str) -> Path:
    """``folder / name`` when it stays inside ``folder`` after resolving ``..`` and links; else ValueError.

    ``name`` is a path read from a file of a results folder (a montage of the gallery
    index, say). An absolute path, a drive or a ``..`` part is refused outright; a
    relative path whose link target lies outside ``folder`` is refused after resolving.
    A results folder received from elsewhere can therefore not make the report embed or
    read a file from anywhere else on the machine.
    """
    text = str(name)
    parts = set(PurePosixPath(text.replace("\\", "/")).parts)
    if (not text or PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute()
            or PureWindowsPath(text).drive or text.startswith(("/", "\\", "~")) or ".." in parts):
        raise ValueError(f"{folder}: {what} {text!r} is not a plain path inside the folder; refused")
    base = Path(folder).resolve()
    target = (base / text).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"{folder}: {what} {text!r} leads outside the folder (to {target}); refused")
    return target


def load_table(obj: Any, name: str) -> pd.DataFrame | None:
    """A DataFrame as given, or read from a CSV/parquet path (one run's set: ``check_output_set``)."""
    if obj is None:
        return None
    if isinstance(obj, pd.DataFrame):
        return obj
    path = Path(obj)
    from oarbench.io import check_output_set  # the tables of one run, not a mixed set

    if path.suffix == ".parquet":
        from oarbench.tables import read_table

        check_output_set(path)
        return read_table(path)
    if not path.is_file():
        raise ValueError(f"{path}: {name} file not found")
    check_output_set(path)
    from oarbench.tables import restore_cells

    try:
        return restore_cells(pd.read_csv(path))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read {name} as CSV: {exc}") from exc


def gallery_criteria(gallery_dir: Path | None) -> FailureCriteria | None:
    """The rules a gallery was drawn with (its ``selection.json``), None when it has none."""
    if gallery_dir is None:
        return None
    from oarbench.gallery.build import SELECTION_FILE

    path = Path(gallery_dir) / SELECTION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return FailureCriteria.from_dict(data) if isinstance(data, Mapping) else None
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the gallery's selection criteria: {exc}") from exc


@dataclass(frozen=True)
class ReportContext:
    """Everything a section builder may read (tables already loaded and checked)."""

    table: pd.DataFrame
    stats: pd.DataFrame | None = None
    robustness: pd.DataFrame | None = None
    noise_floor: pd.DataFrame | None = None
    robustness_summary: pd.DataFrame | None = None
    absent: pd.DataFrame | None = None
    absent_pairs: pd.DataFrame | None = None
    gallery_dir: Path | None = None
    provenance: Mapping[str, Any] | None = None
    options: ReportOptions = field(default_factory=ReportOptions)
    #: Section id -> lines shown at the top of that section (facts about its inputs, such as cases
    #: where a prediction equals its reference, or rows of a second observer).
    section_notes: Mapping[str, Sequence[str]] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per report (sections share summaries and selections)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def next_figure(self) -> int:
        """The next figure number (figures are numbered in page order)."""
        n = int(self._cache.get("_figures", 0)) + 1
        self._cache["_figures"] = n
        return n

    @property
    def models(self) -> list[str]:
        """Every model in the one order the page uses (:attr:`ReportOptions.models`, then first appearance)."""
        return self.cached("models", lambda: model_order(self.table, self.options.models))

    def model_rank(self, model: str) -> int:
        order = self.models
        return order.index(model) if model in order else len(order)

    @property
    def centres(self) -> list[str]:
        return self.cached("centres", lambda: sorted(set(map(str, self.original["centre"]))))

    @property
    def original(self) -> pd.DataFrame:
        """Rows of condition ``original``."""
        return self.cached("original", lambda: self.table[self.table["condition"] == _ORIGINAL])

    def summaries(self) -> dict[str, pd.DataFrame]:
        """:func:`~oarbench.report.data.summary_table` of every structure, rows in model order."""
        def compute() -> dict[str, pd.DataFrame]:
            out = {}
            for s, t in _summaries(self.table).items():
                t = t.assign(_r=t["model"].map(self.model_rank)).sort_values(["centre", "_r"], kind="mergesort")
                out[s] = t.drop(columns="_r").reset_index(drop=True)
            return out
        return self.cached("summaries", compute)

    def headline(self) -> pd.DataFrame:
        """:func:`~oarbench.report.data.headline_table`, rows in model order."""
        def compute() -> pd.DataFrame:
            h = headline_table(self.table, self.options.trained_on)
            h = h.assign(_r=h["model"].map(self.model_rank)).sort_values(["_r", "centre"], kind="mergesort")
            return h.drop(columns="_r").reset_index(drop=True)
        return self.cached("headline", compute)

    def settings(self) -> dict[tuple[str, str], str]:
        return {(r.model, r.centre): r.setting for r in self.headline().itertuples()}

    def failures(self, capped: bool = False) -> pd.DataFrame:
        """:func:`~oarbench.gallery.select_failures` on all conditions (every failing row, or at most k per rule)."""
        crit = self.criteria if capped else replace(self.criteria, k=None)
        return self.cached(f"failures-{capped}", lambda: select_failures(self.all_conditions(), crit, source="results table"))

    @property
    def criteria(self) -> FailureCriteria:
        if self.options.criteria is not None:
            return self.options.criteria
        recorded = self.cached("gallery_criteria", lambda: gallery_criteria(self.gallery_dir))
        return recorded if recorded is not None else FailureCriteria()

    def all_conditions(self) -> pd.DataFrame:
        """The results table plus the robustness rows it lacks (one row per key)."""
        return self.cached("all_conditions", self._all_conditions)

    def _all_conditions(self) -> pd.DataFrame:
        if self.robustness is None or not {"centre", "model", "case", "structure", "status", "dsc"}.issubset(self.robustness.columns):
            return self.table
        rob = _normalise(self.robustness)
        both = pd.concat([self.table, rob], ignore_index=True)
        return both.drop_duplicates([c for c in _KEYS if c in both.columns], keep="first").reset_index(drop=True)

    def suspicious(self) -> pd.DataFrame:
        crit = self.criteria
        return self.cached("suspicious", lambda: suspicious_values(
            self.table, hd95_above=crit.hd95_above if crit.hd95_above is not None else 10.0,
            high_dsc=self.options.high_dsc, small_reference_voxels=self.options.small_reference_voxels))

    def present_structures(self) -> list[str]:
        """Structures (label order) with at least one row that is not ``absent`` under condition original."""
        def compute() -> list[str]:
            orig = self.original
            present = set(orig.loc[orig["status"] != "absent", "structure"])
            return [s for s in _structure_order(orig) if s in present]
        return self.cached("present_structures", compute)

    def gallery_index(self) -> pd.DataFrame | None:
        """The gallery's index.csv (None without a gallery or index)."""
        def compute() -> pd.DataFrame | None:
            if self.gallery_dir is None:
                return None
            path = self.gallery_dir / "index.csv"
            return load_table(path, "gallery index") if path.is_file() else None
        return self.cached("gallery_index", compute)

    def gallery_islands(self) -> pd.DataFrame:
        """Rows of the gallery index whose reference has small islands (columns of the index; empty when none)."""
        def compute() -> pd.DataFrame:
            index = self.gallery_index()
            if index is None or "ref_small_islands" not in index.columns:
                return pd.DataFrame()
            n = pd.to_numeric(index["ref_small_islands"], errors="coerce").fillna(0)
            return _normalise(index[n > 0])
        return self.cached("gallery_islands", compute)


def _mtime(path: Path) -> float:
    if path.is_dir():
        times = [p.stat().st_mtime for p in path.rglob("*") if p.is_file()]
        return max(times) if times else path.stat().st_mtime
    return path.stat().st_mtime


def _when(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def stale_inputs(ctx: ReportContext, *, results_path: Path | None = None,
                 robustness_path: Path | None = None) -> dict[str, list[str]]:
    """Section id -> notes on inputs that may not belong to the results table.

    * the gallery (its index.csv) or the robustness table written before the results
      table (file times; only for inputs given as files);
    * a gallery that has montages of models the results table does not have, or none
      of models that fail the gallery's rules now;
    * a robustness table about models the results table does not have.

    With ``ctx.options.strict`` the first such note is raised as ValueError instead.
    """
    notes: dict[str, list[str]] = {}
    models = set(ctx.models)

    def add(section: str, path: Path | None, text: str) -> None:
        if ctx.options.strict:
            raise ValueError(f"{path if path is not None else section}: {text} (--strict)")
        notes.setdefault(section, []).append(text)

    index = ctx.gallery_index()
    index_path = ctx.gallery_dir / "index.csv" if ctx.gallery_dir is not None else None
    if index is not None and index_path is not None:
        if results_path is not None and results_path.exists() and _mtime(index_path) < _mtime(results_path):
            add("failures", index_path, f"The gallery was drawn before {results_path.name} was last written "
                f"(index.csv {_when(_mtime(index_path))}, {results_path.name} {_when(_mtime(results_path))}): its "
                "montages may not show the current results; run `oarbench gallery` again.")
        if "model" in index.columns:
            drawn = set(map(str, index["model"].dropna()))
            other = sorted(drawn - models)
            if other:
                add("failures", index_path, f"The gallery has montages of models that are not in the results "
                    f"table: {', '.join(other)}.")
            failing = set(map(str, ctx.failures()["model"])) if len(ctx.failures()) else set()
            lacking = [m for m in ctx.models if m in failing and m not in drawn]
            if lacking:
                add("failures", index_path, f"The gallery has no montages of {', '.join(lacking)}, which fail the "
                    "rules below: it was drawn before these models were added; run `oarbench gallery` again.")
    if ctx.robustness is not None and "model" in ctx.robustness.columns:
        if (robustness_path is not None and results_path is not None and robustness_path.exists()
                and results_path.exists() and _mtime(robustness_path) < _mtime(results_path)):
            add("robustness", robustness_path, f"The robustness table was written before {results_path.name} "
                f"({robustness_path.name} {_when(_mtime(robustness_path))}, {results_path.name} "
                f"{_when(_mtime(results_path))}); its original rows may be of an earlier evaluation.")
        other = sorted(set(map(str, ctx.robustness["model"].dropna())) - models)
        if other:
            add("robustness", robustness_path, f"The robustness table is about models that are not in the results "
                f"table: {', '.join(other)}; their changes are measured against the robustness table's own original "
                "rows; they are not in the headline, paper or accuracy sections.")
    return notes


def run_record_facts(run_json: Path) -> tuple[dict[str, tuple[str, ...]] | None, list[str] | None]:
    """(model -> training centres, model order) from a run record, each None when not known.

    The study TOML named in run.json (when it still exists) gives both: ``trained_on``
    and the order of its ``[[models]]``; without it, the order of the evaluation jobs
    recorded in run.json (the ``--prediction`` order).
    """
    try:
        run = json.loads(Path(run_json).read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(run, Mapping):
        return None, None
    from oarbench.stats.paper import trained_on_from_run

    trained = trained_on_from_run(run)
    models: list[str] | None = None
    study = run.get("study")
    if isinstance(study, str) and study.endswith(".toml") and Path(study).is_file():
        try:
            from oarbench.study import load_study

            models = [m.name for m in load_study(study).models]
        except (ValueError, OSError):
            models = None
    if not models and isinstance(run.get("jobs"), list):
        models = list(dict.fromkeys(str(j["model"]) for j in run["jobs"] if isinstance(j, Mapping) and "model" in j))
    return trained, models or None


def run_record_notes(run_json: Path) -> dict[str, list[str]]:
    """:func:`record_notes` of the run record at ``run_json`` (empty when it cannot be read)."""
    try:
        run = json.loads(Path(run_json).read_text())
    except (OSError, ValueError):
        return {}
    return record_notes(run) if isinstance(run, Mapping) else {}


def record_notes(run: Mapping[str, Any]) -> dict[str, list[str]]:
    """Section notes a run record calls for: predictions equal to their reference, second observers.

    ``{"accuracy": [...]}`` from the record's ``same_as_reference`` (written by
    ``oarbench evaluate`` when a prediction's content equals its reference's) and
    ``observers`` (models that are a second observer's contours); empty when there is
    nothing to say.
    """
    notes: list[str] = []
    same = [s for s in run.get("same_as_reference") or [] if isinstance(s, Mapping)]
    if same:
        listed = ", ".join(f"{s.get('model', '?')}/{s.get('case', '?')}" for s in same[:10])
        more = f" and {len(same) - 10} more" if len(same) > 10 else ""
        notes.append(f"{len(same)} prediction(s) have the same content as their reference ({listed}{more}): their "
                     "DSC 1 and HD95 0 say nothing about a model (run.json, same_as_reference).")
    observers = [str(o) for o in run.get("observers") or [] if isinstance(o, str)]
    if observers:
        notes.append(f"{', '.join(observers)}: a second observer's contours, scored against the reference like a "
                     "model: the human baseline. stats.csv's observer rows test each model for non-inferiority to it.")
    return {"accuracy": notes} if notes else {}
