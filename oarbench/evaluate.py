"""Score folders of predictions against reference label maps: the results table.

One *job* is one reference folder against one prediction folder (one centre x
model x condition). Each case's rows are cached under ``OUT/cache/`` as soon as
they are computed, so an interrupted run resumes where it stopped; the final
tables are written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import platform
import stat
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

if TYPE_CHECKING:
    import pandas as pd  # imported where used: a process pool forks before it (docs/performance.md)

from oarbench import __version__
from oarbench import storage
from oarbench.executors import Executor, LocalExecutor
from oarbench.io import (
    MAX_IMAGE_BYTES,
    OutputLock,
    Volume,
    case_id,
    check_header_size,
    check_same_grid,
    content_sha256,
    find_cases,
    read_header,
    read_volume,
    resample_nearest,
    safe_name,
    same_grid,
    write_output_set,
)
from oarbench.labels import LABELS_HINT, LabelMap
from oarbench.metrics import RESULT_COLUMNS, STATUSES, evaluate_labels, resolve_backend, surface_kernel
from oarbench.progress import progress_bar
from oarbench.tables import DEFAULT_CENTRE, DEFAULT_STUDY, TABLE_COLUMNS, check_keys, csv_text, restore_cell

__all__ = [
    "TABLE_COLUMNS",
    "EvalOptions",
    "Job",
    "evaluate_case",
    "evaluate_jobs",
    "jobs_from_folders",
    "DEFAULT_STUDY",
    "DEFAULT_CENTRE",
    "jobs_from_study",
    "read_patients",
    "resolution_warnings",
    "summarise",
    "write_outputs",
]

SUMMARY_METRICS = ("dsc", "hd95", "msd")


@dataclass(frozen=True)
class EvalOptions:
    """How cases are scored (everything that changes a number)."""

    labels: LabelMap
    tolerance_mm: float = 2.0
    backend: str = "auto"
    device: str | None = None
    resample_prediction: bool = False
    allow_missing: bool = False
    threads: int | None = None  # per case; None: the cores left per worker process
    tolerances: tuple[tuple[str, float], ...] = ()  # per-structure tolerances (mm), overriding tolerance_mm
    apl_convention: str = "exact"
    # Largest voxel data an input's header may announce (bytes; None: no limit). Changes no number.
    max_image_bytes: int | None = MAX_IMAGE_BYTES

    def tolerance_of(self, structure: str) -> float:
        return dict(self.tolerances).get(structure, self.tolerance_mm)

    def cache_key(self) -> str:
        payload = json.dumps(
            {
                "labels": self.labels.labels,
                "tolerance_mm": self.tolerance_mm,
                "tolerances": sorted(self.tolerances),
                "apl_convention": self.apl_convention,
                "resample": self.resample_prediction,
                "columns": RESULT_COLUMNS,
                "version": __version__,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Job:
    """One reference folder scored against one prediction folder (paths or fsspec URLs)."""

    reference: storage.Location
    prediction: storage.Location
    study: str
    centre: str
    model: str
    condition: str = "original"
    cases: tuple[str, ...] = field(default=())
    patients: tuple[tuple[str, str], ...] = field(default=())  # (case, patient); default: the case

    def __post_init__(self) -> None:
        for what in ("study", "centre", "model", "condition"):
            value = getattr(self, what)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{self.prediction}: the {what} name must be a non-empty text, got {value!r}")
            safe_name(value, what)

    @property
    def tag(self) -> str:
        return _short_name("__".join(x or "-" for x in (self.study, self.centre, self.model, self.condition)))


def _short_name(text: str, limit: int = 120) -> str:
    """``text`` as a file name within the file system's 255-byte limit (long names: prefix + hash)."""
    if len(text.encode("utf-8")) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return f"{text.encode('utf-8')[:80].decode('utf-8', 'ignore')}-{digest}"


def jobs_from_folders(
    reference: str | Path,
    predictions: str | Path | Iterable[str | Path],
    *,
    models: Iterable[str] | None = None,
    study: str = DEFAULT_STUDY,
    centre: str = DEFAULT_CENTRE,
    condition: str = "original",
) -> list[Job]:
    """One job per prediction folder against one reference folder.

    ``models`` names the predictions in order; by default each model is named
    after its prediction folder (``preds/nnunet_fast`` -> ``nnunet_fast``).
    Raises ValueError when two predictions would get the same model name.
    """
    if isinstance(predictions, (str, Path)):
        predictions = [predictions]
    preds = [storage.as_location(p) for p in predictions]
    if not preds:
        raise ValueError("no prediction folder given")
    names = list(models) if models else []
    if names and len(names) != len(preds):
        raise ValueError(f"{len(names)} model name(s) for {len(preds)} prediction folder(s); give one --model per --prediction")
    if not names:
        names = [(p.resolve().name if isinstance(p, Path) else storage.name(p)) or str(p) for p in preds]
    seen: dict[str, storage.Location] = {}
    for name, pred in zip(names, preds):
        if name in seen:
            raise ValueError(f"{seen[name]} and {pred} would both be model {name!r}; name them with --model A --model B")
        seen[name] = pred
    return [Job(storage.as_location(reference), pred, study=study, centre=centre, model=name, condition=condition)
            for name, pred in zip(names, preds)]


def read_patients(path: str | Path | None) -> tuple[tuple[str, str], ...]:
    """``(case, patient)`` pairs from a metadata CSV's ``case`` and ``patient`` columns.

    No file or no ``patient`` column: empty (every case is its own patient). An empty patient
    cell falls back to the case.
    """
    if path is None:
        return ()
    import pandas as pd

    path = Path(path)
    try:
        meta = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the metadata CSV ({exc})") from None
    if "patient" not in meta.columns:
        return ()
    if "case" not in meta.columns:
        raise ValueError(f"{path}: metadata has a 'patient' column but no 'case' column")
    pairs = {}
    for case, patient in zip(meta["case"].str.strip().map(restore_cell), meta["patient"].str.strip().map(restore_cell)):
        if case in pairs and pairs[case] != (patient or case):
            raise ValueError(f"{path}: case {case!r} is listed with two patients")
        pairs[case] = patient or case
    return tuple(sorted(pairs.items()))


def jobs_from_study(study: Any, models: Iterable[str] | None = None, centres: Iterable[str] | None = None) -> list[Job]:
    """One job per centre x model of a :class:`oarbench.study.Study` (patients from the
    centre's metadata ``patient`` column, where given)."""
    wanted_models = set(models) if models else None
    wanted_centres = set(centres) if centres else None
    jobs = []
    for centre in study.centres:
        if wanted_centres and centre.name not in wanted_centres:
            continue
        patients = read_patients(centre.metadata)
        for model in (*study.models, *getattr(study, "observers", ())):  # observers are scored like models
            if wanted_models and model.name not in wanted_models:
                continue
            jobs.append(
                Job(
                    reference=centre.reference,
                    prediction=model.predictions_dir(centre.name),
                    study=study.name,
                    centre=centre.name,
                    model=model.name,
                    patients=patients,
                )
            )
    if not jobs:
        raise ValueError(f"{study.path}: no centre x model pairs selected")
    return jobs


def _missing_rows(options: EvalOptions) -> list[dict[str, Any]]:
    nan = math.nan
    return [
        {
            "label": value, "structure": name, "status": "missing",
            "dsc": nan, "hd95": nan, "hd": nan, "msd": nan, "assd": nan, "sdsc": nan,
            "ref_ml": nan, "pred_ml": nan, "tp": 0, "fp": 0, "fn": 0,
            "tolerance_mm": options.tolerance_of(name), "vs": nan, "centroid_mm": nan, "apl_mm": nan,
            "apl_mm_per_slice": nan, "spacing_max_mm": nan, "spacing_inplane_max_mm": nan,
        }
        for value, name in options.labels
    ]


def _read_pair(reference: Path, prediction: Path, options: EvalOptions) -> tuple[Volume, Volume]:
    """Both images, read at the same time when the case has two threads (decompression and
    SimpleITK's reader release the GIL); an error names the reference first when both fail."""
    if (options.threads or 1) < 2:
        return (read_volume(reference, max_bytes=options.max_image_bytes),
                read_volume(prediction, max_bytes=options.max_image_bytes))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        ref, pred = (pool.submit(read_volume, p, max_bytes=options.max_image_bytes) for p in (reference, prediction))
        return ref.result(), pred.result()


def evaluate_case(reference: Path, prediction: Path | None, options: EvalOptions) -> list[dict[str, Any]]:
    """Rows (dicts of the metric columns) for one case; ``prediction=None`` means missing."""
    if prediction is None:
        return _missing_rows(options)
    # The headers first: a grid that cannot match, or more voxel data than the limit, is refused
    # before any voxel is decompressed.
    ref_head = read_header(reference)
    check_header_size(ref_head, reference, options.max_image_bytes)
    pred_head = read_header(prediction)
    check_header_size(pred_head, prediction, options.max_image_bytes)
    for head, path in ((ref_head, reference), (pred_head, prediction)):
        if len(head.size) > 3:
            raise ValueError(f"{path}: is a {len(head.size)}D image; expected 3D (or 2D)")
    if ref_head.size != pred_head.size and not options.resample_prediction:
        raise ValueError(
            f"{prediction} is not on the grid of {reference}: size {ref_head.size} vs {pred_head.size} (from the "
            "headers; use --resample-prediction to resample it onto the reference grid)"
        )
    ref, pred = _read_pair(reference, prediction, options)
    if not same_grid(ref, pred):
        if options.resample_prediction and ref.array.ndim == pred.array.ndim:
            pred = resample_nearest(pred, ref)
        else:
            check_same_grid(ref, pred, reference, prediction)
    try:
        results = evaluate_labels(
            ref.array,
            pred.array,
            ref.spacing,
            options.labels,
            tolerance_mm=options.tolerance_mm,
            backend=options.backend,
            device=options.device,
            threads=options.threads,
            tolerances=dict(options.tolerances),
            apl_convention=options.apl_convention,
        )
    except ValueError as exc:
        msg = str(exc)
        if "not in the label map" in msg:
            msg += f"; {LABELS_HINT}"
        if msg.startswith("reference"):
            raise ValueError(f"{reference}: {msg.split(': ', 1)[-1]}") from None
        if msg.startswith("prediction"):
            raise ValueError(f"{prediction}: {msg.split(': ', 1)[-1]}") from None
        raise ValueError(f"{reference} vs {prediction}: {msg}") from None
    return [r.as_dict() for r in results]


#: Format of a cache entry (``OUT/cache/<options>/<job>/CASE.json``).
CACHE_FORMAT = 2
_MAX_ENTRY_BYTES = 16 << 20  # an entry of 200 structures is about 100 kB
_DISTANCES = ("hd95", "hd", "msd", "assd", "centroid_mm", "apl_mm", "apl_mm_per_slice")
_FRACTIONS = ("sdsc", "vs")


def cache_key_path() -> Path:
    """``$XDG_CONFIG_HOME/oarbench/cache.key`` (default ``~/.config/oarbench/cache.key``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "oarbench" / "cache.key"


def cache_secret(warn: Any = None) -> bytes:
    """This user's secret for authenticating cache entries (32 random bytes).

    Kept outside every output folder, in :func:`cache_key_path`, created on
    first use with mode 0600: whoever can write an output folder (or its
    bucket) but not this user's home can neither read nor replace it. Raises
    ValueError when the file is not this user's or others may read or write
    it. When it cannot be created (a read-only home), a key for this run only
    is returned and ``warn`` is called with a message saying so.
    """
    path = cache_key_path()
    if not os.path.lexists(path):
        tmp = path.with_name(f".cache.key.{os.getpid()}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(32))
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)  # complete or absent: a run started at the same moment reads a whole key
        except FileExistsError:
            pass  # made by a run started at the same moment
        except OSError as exc:
            if warn is not None:
                warn(f"{path}: cannot keep a cache key there ({exc.strerror}); cached cases of this run will not "
                     "be reused by later runs (set XDG_CONFIG_HOME to a writable folder)")
            return os.urandom(32)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the cache key ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: the cache key is not a regular file; remove it to make a new one")
        if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o077):
            raise ValueError(f"{path}: the cache key must belong to this user and be readable by no one else "
                             "(chmod 600, or remove it to make a new one)")
        key = fh.read(64)
    if len(key) < 32:
        raise ValueError(f"{path}: the cache key is shorter than 32 bytes; remove it to make a new one")
    return key


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_cached_rows(rows: Any, options: EvalOptions, has_prediction: bool) -> str | None:
    """Why ``rows`` (a cache entry's) cannot be the rows of one case under ``options``, or None.

    The rows must be the label map's structures in order, with every result
    column, a known status, whole non-negative ``tp``/``fp``/``fn``, DSC in
    [0, 1] and equal to 2 tp / (2 tp + fp + fn) (NaN for absent and missing
    structures), non-negative distances and volumes, surface Dice and
    volumetric similarity in [0, 1] and the structure's tolerance.
    """
    if not isinstance(rows, list):
        return f"rows is {type(rows).__name__}, not a list"
    expected = list(options.labels)
    if len(rows) != len(expected):
        return f"{len(rows)} rows for {len(expected)} structures"
    for row, (value, name) in zip(rows, expected):
        if not isinstance(row, dict) or set(row) != set(RESULT_COLUMNS):
            return f"a row of {name} without exactly the result columns"
        where = f"{name}: "
        if row["label"] != value or row["structure"] != name or isinstance(row["label"], bool):
            return f"row for label {row['label']!r} / {row['structure']!r} where {value} / {name} was expected"
        status = row["status"]
        if status not in STATUSES or (status == "missing") == has_prediction:
            return where + f"status {status!r}"
        for col in ("tp", "fp", "fn"):
            if not isinstance(row[col], int) or isinstance(row[col], bool) or row[col] < 0:
                return where + f"{col} {row[col]!r} is not a whole number >= 0"
        for col in ("dsc", "ref_ml", "pred_ml", "tolerance_mm", "spacing_max_mm", *_DISTANCES, *_FRACTIONS):
            if not _is_number(row[col]):
                return where + f"{col} {row[col]!r} is not a number"
            if row[col] < 0:
                return where + f"{col} {row[col]!r} is negative"
        tp, fp, fn, dsc = row["tp"], row["fp"], row["fn"], row["dsc"]
        if status in ("absent", "missing"):
            if not math.isnan(dsc) or tp or fp or fn:
                return where + f"a {status} structure with DSC {dsc!r} and tp/fp/fn {tp}/{fp}/{fn}"
        else:
            if not 0.0 <= dsc <= 1.0:
                return where + f"DSC {dsc!r} is outside [0, 1]"
            if status == "ok" and (tp + fp == 0 or tp + fn == 0):
                return where + f"status ok without both reference and predicted voxels (tp/fp/fn {tp}/{fp}/{fn})"
            if 2 * tp + fp + fn == 0 or not math.isclose(dsc, 2 * tp / (2 * tp + fp + fn), rel_tol=1e-9, abs_tol=1e-12):
                return where + f"DSC {dsc!r} is not 2 tp / (2 tp + fp + fn) for tp/fp/fn {tp}/{fp}/{fn}"
            if status == "missed" and (tp or fp or not fn):
                return where + f"a missed structure with tp/fp/fn {tp}/{fp}/{fn}"
            if status == "hallucinated" and (tp or fn or not fp):
                return where + f"a hallucinated structure with tp/fp/fn {tp}/{fp}/{fn}"
        for col in _FRACTIONS:
            if row[col] > 1.0:
                return where + f"{col} {row[col]!r} is above 1"
        if status == "ok" and not row["hd95"] <= row["hd"] + 1e-9:
            return where + f"hd95 {row['hd95']!r} above hd {row['hd']!r}"
        if row["tolerance_mm"] != options.tolerance_of(name):
            return where + f"tolerance {row['tolerance_mm']!r} mm, not {options.tolerance_of(name)!r}"
    return None


class _CaseCache:
    """Per-case JSON files under ``OUT/cache/<options key>/<job tag>/CASE.json``.

    An entry is used only when the sha256 of the reference and the prediction
    it was computed from equal those of the files now: replacing a file by
    other content of the same size and modification time (``cp -p``, rsync)
    makes the case be scored again. Every entry carries an HMAC-SHA256, with
    this user's secret (:func:`cache_secret`), of its case, job, options key,
    input sha256 and rows; an entry whose MAC or rows (:func:`check_cached_rows`)
    do not check out is never used: the case is scored again and a warning
    names the entry. Temporary files of a killed run are removed under the
    lock on OUT (:class:`oarbench.io.OutputLock`).
    """

    def __init__(self, out_dir: storage.Location, options: EvalOptions, job: Job, secret: bytes) -> None:
        self.key = options.cache_key()
        self.folder = storage.join(out_dir, "cache", self.key, job.tag)
        self.options = options
        self.job = [job.study, job.centre, job.model, job.condition]
        self._secret = secret
        self.rejected: list[str] = []

    def _path(self, case: str) -> storage.Location:
        return storage.join(self.folder, f"{_short_name(case)}.json")

    def _mac(self, case: str, inputs: list[str | None], rows: Any) -> str:
        body = json.dumps({"format": CACHE_FORMAT, "options": self.key, "job": self.job, "case": case,
                           "sha256": inputs, "rows": rows}, sort_keys=True, allow_nan=True, separators=(",", ":"))
        return hmac.new(self._secret, body.encode("utf-8"), hashlib.sha256).hexdigest()

    def load(self, case: str, inputs: list[str | None]) -> list[dict[str, Any]] | None:
        path = self._path(case)
        if isinstance(path, Path):
            try:
                st = path.lstat()
            except OSError:
                return None  # no entry: scored
            if not stat.S_ISREG(st.st_mode):
                return self._reject(path, "not a regular file")  # a FIFO, a device or a link is never opened
            if st.st_size > _MAX_ENTRY_BYTES:
                return self._reject(path, f"{st.st_size} bytes, more than any entry holds")
        try:
            text = storage.read_text(path)
        except (OSError, UnicodeDecodeError):
            return None  # no entry (or an unreadable one): scored
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            return self._reject(path, "not valid JSON")
        if not isinstance(data, dict):
            return self._reject(path, "not a JSON object")
        if data.get("sha256") != inputs and data.get("case") == case:
            return None  # an input changed since: scored again, as it should be
        if data.get("case") != case or data.get("job") != self.job or data.get("format") != CACHE_FORMAT:
            return self._reject(path, f"made for case {data.get('case')!r} of job {data.get('job')!r} "
                                      f"(format {data.get('format')!r})")
        mac = data.get("mac")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, self._mac(case, inputs, data.get("rows"))):
            return self._reject(path, "its authentication code does not match (edited, or written by another user or "
                                      "an older oarbench)")
        why = check_cached_rows(data.get("rows"), self.options, inputs[1] is not None)
        if why:
            return self._reject(path, why)
        return data["rows"]

    def _reject(self, path: storage.Location, why: str) -> None:
        self.rejected.append(f"{path}: cache entry not used ({why}); the case was scored again")
        return None

    def store(self, case: str, inputs: list[str | None], rows: list[dict[str, Any]]) -> None:
        rows = json.loads(json.dumps(rows, allow_nan=True))  # the rows as they will be read back
        payload = {"format": CACHE_FORMAT, "case": case, "job": self.job, "sha256": inputs, "rows": rows,
                   "mac": self._mac(case, inputs, rows)}
        storage.write_text(self._path(case), json.dumps(payload, allow_nan=True))


def _pair_cases(job: Job, options: EvalOptions, follow_links: bool = True) -> tuple[list[tuple[str, Path, Path | None]], list[str]]:
    refs = find_cases(job.reference, follow_links=follow_links)
    if not storage.is_dir(job.prediction):
        if options.allow_missing:
            preds: dict[str, Path] = {}
        else:
            raise ValueError(f"{job.prediction}: prediction folder not found")
    else:
        try:
            preds = find_cases(job.prediction, follow_links=follow_links)
        except ValueError as exc:
            if not options.allow_missing or "no images found" not in str(exc):
                raise
            preds = {}
    if job.cases:
        unknown = sorted(set(job.cases) - set(refs))
        if unknown:
            raise ValueError(f"{job.reference}: no reference for cases {unknown}")
        refs = {c: refs[c] for c in job.cases}
    missing = sorted(set(refs) - set(preds))
    if missing and not options.allow_missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        ignored = _ignored_files(job.prediction, set(refs))
        if ignored:
            listed = ", ".join(ignored[:10]) + (f" ... ({len(ignored)} in all)" if len(ignored) > 10 else "")
            why = (f"; ignored in that folder, as no reference case has their name: {listed} "
                   f"(a prediction must be named like its reference, e.g. {missing[0]}.nii.gz)")
        else:
            why = ""
        raise ValueError(
            f"{job.prediction}: no prediction for {len(missing)} reference case(s): {shown}{why} "
            "(use --allow-missing to score them as status 'missing')"
        )
    extra = sorted(set(preds) - set(refs))
    pairs = [(case, refs[case], preds.get(case)) for case in sorted(refs)]
    return pairs, extra


def _ignored_files(folder: storage.Location, cases: set[str]) -> list[str]:
    """Names of the files in ``folder`` that pair with none of ``cases`` (hidden files left out)."""
    if not storage.is_dir(folder):
        return []
    names = sorted(storage.name(f) for f in storage.list_files(folder))
    return [n for n in names if not n.startswith(".") and case_id(n) not in cases]


def _work(args: tuple[str, Path, Path | None, EvalOptions]) -> tuple[str, list[dict[str, Any]]]:
    case, ref, pred, options = args
    return case, evaluate_case(ref, pred, options)


def evaluate_jobs(
    jobs: list[Job],
    options: EvalOptions,
    out_dir: str | Path,
    *,
    workers: int = 1,
    force: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
    strict: bool = False,
    follow_links: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score every case of every job; returns (results table, provenance).

    One task per case runs on ``executor`` (default: a
    :class:`~oarbench.executors.LocalExecutor` of ``workers`` processes).
    Raises ValueError naming the file(s) on the first bad input; cases already
    scored stay cached, so a corrected re-run resumes.

    A prediction with the same content (sha256) as its reference is scored
    with a warning and listed in the provenance under ``same_as_reference``;
    ``strict=True`` refuses it instead. An image that is a symbolic link
    to a file outside its folder is refused unless ``follow_links=True``.
    """
    out_dir = storage.as_location(out_dir)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with OutputLock(out_dir):
        return _evaluate_jobs(jobs, options, out_dir, workers=workers, force=force, progress=progress,
                              executor=executor, strict=strict, follow_links=follow_links)


def _evaluate_jobs(
    jobs: list[Job], options: EvalOptions, out_dir: storage.Location, *, workers: int, force: bool,
    progress: bool, executor: Executor | None, strict: bool = False, follow_links: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    # Backends that hold a GPU stay in this process.
    backend, device = resolve_backend(options.backend, options.device)
    if executor is None:
        executor = LocalExecutor(1 if backend == "torch" else workers)
    workers = executor.workers
    # numpy: the cores shared among the worker processes; torch: the device's own default.
    threads = options.threads or (None if backend == "torch" else max(1, min(2, os.cpu_count() or 1) // workers))
    options = replace(options, backend=backend, device=device, threads=threads)

    planned: list[tuple[Job, list[tuple[str, Path, Path | None]]]] = []
    warnings: list[str] = []
    for job in jobs:
        pairs, extra = _pair_cases(job, options, follow_links)
        if extra:
            warnings.append(f"{job.prediction}: {len(extra)} prediction(s) without a reference ignored: {', '.join(extra[:5])}")
        planned.append((job, pairs))

    rows: list[dict[str, Any]] = []
    todo: list[tuple[Job, str, Path, Path | None]] = []
    done: dict[tuple[str, str], list[dict[str, Any]]] = {}
    # The content hash of every input keys the cache and goes into run.json.
    inputs: dict[str, str] = {}
    for _, pairs in planned:
        for _, ref, pred in pairs:
            for loc in (ref, pred):
                if loc is not None and str(loc) not in inputs:
                    inputs[str(loc)] = storage.sha256(loc)

    def hashes(ref: Path, pred: Path | None) -> list[str | None]:
        return [inputs[str(ref)], None if pred is None else inputs[str(pred)]]

    # A prediction that is its reference (a copy, a link) scores DSC 1 whatever the model.
    same: list[dict[str, str]] = []
    for job, pairs in planned:
        for case, ref, pred in pairs:
            if pred is not None and inputs[str(ref)] == inputs[str(pred)]:
                if strict:
                    raise ValueError(f"{pred}: has the same content as its reference {ref} (sha256 "
                                     f"{inputs[str(ref)][:12]}...); refused (--strict)")
                same.append({"study": job.study, "centre": job.centre, "model": job.model,
                             "condition": job.condition, "case": case, "reference": str(ref), "prediction": str(pred)})
                warnings.append(f"{pred}: has the same content as its reference {ref}; its scores (DSC 1) say "
                                "nothing about a model")

    secret = cache_secret(warnings.append)
    caches = {job.tag: _CaseCache(out_dir, options, job, secret) for job, _ in planned}
    for job, pairs in planned:
        cache = caches[job.tag]
        for case, ref, pred in pairs:
            cached = None if force else cache.load(case, hashes(ref, pred))
            if cached is None:
                todo.append((job, case, ref, pred))
            else:
                done[(job.tag, case)] = cached
    for cache in caches.values():
        warnings.extend(cache.rejected)

    bar = progress_bar(len(todo), desc="evaluate", unit="case", enabled=progress)
    start = time.perf_counter()

    def finished(i: int, result: tuple[str, list[dict[str, Any]]]) -> None:
        job, case, ref, pred = todo[i]
        caches[job.tag].store(case, hashes(ref, pred), result[1])
        done[(job.tag, case)] = result[1]
        bar.update(1)

    # a local pool lets this process import pandas while its workers score the cases
    meanwhile = {"while_running": _import_tables_library} if isinstance(executor, LocalExecutor) else {}
    try:
        executor.map(_work, [(case, ref, pred, options) for _, case, ref, pred in todo],
                     on_result=finished, name="evaluate", **meanwhile)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start

    for job, pairs in planned:
        patient_of = dict(job.patients)
        for case, ref, pred in pairs:
            for row in done[(job.tag, case)]:
                rows.append({"study": job.study, "centre": job.centre, "model": job.model,
                             "condition": job.condition, "case": case, "patient": patient_of.get(case, case),
                             **row})

    import pandas as pd

    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    check_keys(table, "results table")
    provenance = {
        "oarbench": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        # compiled kernels or the numpy code (same values): docs/performance.md, "Compiled kernels"
        "surface_kernel": surface_kernel(),
        "options": {
            "tolerance_mm": options.tolerance_mm,
            "tolerances_mm": dict(options.tolerances),
            "apl_convention": options.apl_convention,
            "backend": options.backend,
            "device": options.device,
            "executor": type(executor).__name__,
            "workers": workers,
            "threads": threads,
            "resample_prediction": options.resample_prediction,
            "allow_missing": options.allow_missing,
            "labels": {str(k): v for k, v in options.labels.labels.items()},
        },
        "jobs": [
            {"study": j.study, "centre": j.centre, "model": j.model, "condition": j.condition,
             "reference": str(j.reference), "prediction": str(j.prediction), "cases": len(p)}
            for j, p in planned
        ],
        "cases_computed": len(todo),
        "cases_from_cache": sum(len(p) for _, p in planned) - len(todo),
        "seconds_computing": round(elapsed, 3),
        "warnings": warnings,
        "same_as_reference": same,
        "resolution_warnings": resolution_warnings(table),
        "input_sha256": inputs,
    }
    return table, provenance


def resolution_warnings(table: pd.DataFrame) -> list[str]:
    """One message per metric and tolerance below the spacing that limits that metric in some cases.

    Surface Dice is limited by the coarsest voxel spacing (``spacing_max_mm``), APL, an in-plane
    measure, by the coarsest in-plane spacing (``spacing_inplane_max_mm``; tables without it
    give no APL warning): docs/metrics.md, :func:`oarbench.metrics.resolution_warning`.
    """
    from oarbench.metrics import RESOLUTION_LIMITS

    out = []
    for metric, column in (("sdsc", "spacing_max_mm"), ("apl_mm", "spacing_inplane_max_mm")):
        if table.empty or column not in table.columns or "tolerance_mm" not in table.columns:
            continue
        name = "surface Dice" if metric == "sdsc" else "APL"
        t = table[table[column].notna() & table["tolerance_mm"].notna()]
        low = t[t["tolerance_mm"] < t[column]]
        for tol, grp in low.groupby("tolerance_mm", sort=True):
            keys = [k for k in ("study", "centre", "condition", "case") if k in grp.columns]
            n_cases = len(grp.drop_duplicates(keys))
            n_all = len(t[t["tolerance_mm"] == tol].drop_duplicates(keys))
            structures = list(dict.fromkeys(grp["structure"]))
            shown = ", ".join(structures[:6]) + (f" and {len(structures) - 6} more" if len(structures) > 6 else "")
            out.append(
                f"{name}: tolerance {tol:g} mm ({shown}) is below the {RESOLUTION_LIMITS[metric]} (up to "
                f"{grp[column].max():g} mm) in {n_cases} of {n_all} cases: {name} there does not resolve "
                "distances below one voxel"
            )
    return out


def _import_tables_library() -> None:
    """Import pandas in a background thread while the pool's workers score the cases.

    The table is built only after the workers finish; importing pandas then would add its
    import time (about 0.3 s) to every run. The workers are forked before this is called
    (``LocalExecutor.map``), so no worker inherits a half-finished import.
    """
    import importlib
    import threading

    threading.Thread(target=importlib.import_module, args=("pandas",), name="import-pandas", daemon=True).start()


def summarise(table: pd.DataFrame, metrics: Iterable[str] = SUMMARY_METRICS, bootstrap: Any = "default") -> pd.DataFrame:
    """Per study x centre x model x condition x structure: status counts and
    median, IQR and mean of each metric, with bootstrap 95 % intervals of the
    median and the mean that resample patients (:func:`oarbench.stats.cluster_bootstrap_ci`).

    The statistics use the rows with status ok, missed and hallucinated (a
    missed structure has DSC 0 and infinite distances, so it pulls the median
    the way it should); absent and missing rows are counted, not used.
    ``bootstrap``: a :class:`oarbench.stats.BootstrapOptions` (default: 2000
    resamples, seed 12345), or ``None`` for no intervals.
    """
    import pandas as pd

    from oarbench.stats.bootstrap import BootstrapOptions, cluster_bootstrap_ci

    boot = BootstrapOptions() if isinstance(bootstrap, str) else bootstrap
    keys = ["study", "centre", "model", "condition", "structure"]
    out = []
    for key, group in table.groupby(keys, sort=False, dropna=False):
        row: dict[str, Any] = dict(zip(keys, key))
        counts = group["status"].value_counts()
        patients = group["patient"] if "patient" in group.columns else group["case"]
        row["n"] = len(group)
        row["n_patients"] = int(patients.nunique())
        for status in ("ok", "missed", "hallucinated", "absent", "missing"):
            row[f"n_{status}"] = int(counts.get(status, 0))
        used = group[group["status"].isin(["ok", "missed", "hallucinated"])]
        clusters = (used["patient"] if "patient" in used.columns else used["case"]).astype(str).to_numpy()
        for metric in metrics:
            values = used[metric].to_numpy(dtype=float)
            if len(values) == 0:
                q1 = med = q3 = mean = math.nan
            else:
                # Interpolating between two infinite order statistics gives NaN; the
                # quantile is then infinite (NaN rows never reach here).
                with np.errstate(invalid="ignore"):
                    qs = np.quantile(values, [0.25, 0.5, 0.75], method="linear")
                q1, med, q3 = (math.inf if math.isnan(q) else float(q) for q in qs)
                mean = float(np.mean(values))
            row[f"{metric}_median"] = med
            row[f"{metric}_q1"] = q1
            row[f"{metric}_q3"] = q3
            row[f"{metric}_mean"] = mean
            for stat in ("median", "mean"):
                lo = hi = math.nan
                if boot is not None and len(values):
                    lo, hi = cluster_bootstrap_ci(values, clusters, stat, boot)
                row[f"{metric}_{stat}_ci_low"], row[f"{metric}_{stat}_ci_high"] = lo, hi
        out.append(row)
    return pd.DataFrame(out)


def same_as_reference_counts(summary: pd.DataFrame, same: Iterable[dict[str, str]]) -> list[int]:
    """Per row of ``summary``: how many of its group's cases had a prediction with the reference's content."""
    keys = ("study", "centre", "model", "condition")
    counts: dict[tuple[str, ...], int] = {}
    for entry in same:
        k = tuple(str(entry[c]) for c in keys)
        counts[k] = counts.get(k, 0) + 1
    return [counts.get(tuple(str(row[c]) for c in keys), 0) for _, row in summary.iterrows()]


def write_outputs(out_dir: str | Path, table: pd.DataFrame, provenance: dict[str, Any]) -> dict[str, Any]:
    """Write metrics.csv, summary.csv, metrics.parquet (where pyarrow is installed;
    partitioned by centre / model / condition, :mod:`oarbench.tables`) and run.json as one set.

    The tables are written in full before run.json, which comes last and names
    the sha256 of metrics.csv, summary.csv and (local) metrics.parquet under ``outputs``; a set mixed by a
    kill between the writes is refused by readers
    (:func:`oarbench.io.check_output_set`). Locally, all files are written to
    temporary files before any is renamed into place, under the lock on
    ``out_dir``.
    """
    out_dir = storage.as_location(out_dir)
    check_keys(table, str(storage.join(out_dir, "metrics.csv")))
    summary = summarise(table)
    if "same_as_reference" in provenance and not summary.empty:
        summary["n_same_as_reference"] = same_as_reference_counts(summary, provenance["same_as_reference"])
    files = {
        "metrics.csv": csv_text(table, float_format="%.10g").encode("utf-8"),
        "summary.csv": csv_text(summary, float_format="%.6g").encode("utf-8"),
    }
    from oarbench.tables import have_pyarrow, write_parquet

    paths: dict[str, Any] = {}
    in_place: dict[str, str] = {}
    with OutputLock(out_dir):
        if have_pyarrow():
            paths["parquet"] = storage.join(out_dir, "metrics.parquet")
            write_parquet(table, paths["parquet"])
            if isinstance(paths["parquet"], Path):
                in_place["metrics.parquet"] = content_sha256(paths["parquet"])
        written = write_output_set(out_dir, files, "run.json", provenance, written=in_place)
    paths.update({"metrics": written["metrics.csv"], "summary": written["summary.csv"], "run": written["run.json"]})
    return paths
