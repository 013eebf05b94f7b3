"""Run a predictor on perturbed images, map its output back, score it.

For every condition: perturb each image, predict, map the prediction back onto
the original (reference) grid, and score it against the untouched reference
with :func:`oarbench.metrics.evaluate_labels`. The reference is never
resampled. Small-angle conditions also get an interpolation noise floor: the
reference pushed forward (nearest neighbour) and back, scored against itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from oarbench.io import Volume, check_same_grid, find_cases, read_volume, write_volume
from oarbench.labels import DEFAULT_LABELS, LabelMap, contralateral, laterality
from oarbench.metrics import RESULT_COLUMNS, dice, evaluate_labels
from oarbench.robustness.predictors import Predictor
from oarbench.progress import progress_bar
from oarbench.tables import DEFAULT_CENTRE, DEFAULT_STUDY, check_keys, csv_text
from oarbench.robustness.transforms import (
    Identity,
    Perturbation,
    ResampleControl,
    Reorient,
    SmallRotation,
    control_for,
    parse_conditions,
)
from oarbench.storage import as_location

if TYPE_CHECKING:
    from oarbench.executors import Executor

__all__ = [
    "RobustnessResult",
    "TABLE_COLUMNS",
    "SUMMARY_COLUMNS",
    "SKIPPED_COLUMNS",
    "RobustnessWarning",
    "run_robustness",
    "noise_floor",
    "laterality_swaps",
    "laterality_errors",
    "summarise",
    "write_robustness",
]

#: Columns of ``robustness.csv`` / ``noise_floor.csv`` in order.
TABLE_COLUMNS: tuple[str, ...] = (
    "study", "centre", "model", "condition", "case", *RESULT_COLUMNS, "laterality_swap", "laterality_error", "params",
)

#: Columns of ``robustness_summary.csv``.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "study", "centre", "model", "structure", "condition", "n_cases", "n_pairs_dsc", "median_delta_dsc",
    "worst_delta_dsc", "worst_dsc_case", "n_pairs_hd95", "median_delta_hd95", "worst_delta_hd95",
    "worst_hd95_case", "n_laterality_swaps", "median_floor_dsc", "median_floor_hd95",
    "control_condition", "control_median_delta_dsc", "control_median_delta_hd95",
    "n_pairs_effect_dsc", "model_effect_dsc", "model_effect_dsc_ci_low", "model_effect_dsc_ci_high",
    "n_pairs_effect_hd95", "model_effect_hd95", "model_effect_hd95_ci_low", "model_effect_hd95_ci_high",
    "model_effect_ci_level", "n_skipped",
)

#: Columns of ``robustness_skipped.csv``: case x condition pairs not run, and why.
SKIPPED_COLUMNS: tuple[str, ...] = ("study", "centre", "model", "condition", "case", "reason")


class RobustnessWarning(UserWarning):
    """A condition was skipped for a case (e.g. a re-orientation that would change nothing)."""


@dataclass(frozen=True)
class RobustnessResult:
    """Tables of one robustness run.

    ``table``: one row per case x structure x condition (``TABLE_COLUMNS``);
    ``noise_floor``: the same columns for the round-tripped reference of every
    small-angle condition and resample control; ``summary``: per structure x
    condition against ``original`` (``SUMMARY_COLUMNS``); ``skipped``: case x
    condition pairs not run, with the reason (``SKIPPED_COLUMNS``).
    """

    table: pd.DataFrame
    noise_floor: pd.DataFrame
    summary: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(SKIPPED_COLUMNS)))


def _as_case_map(source: Mapping[str, Path] | str | Path, *, images: bool) -> dict[str, Path]:
    if isinstance(source, Mapping):
        return {str(k): as_location(v) for k, v in source.items()}  # type: ignore[misc]
    return find_cases(source, images=images)


def laterality_errors(reference: np.ndarray, prediction: np.ndarray, labels: LabelMap) -> dict[str, str]:
    """Laterality error per lateral structure of ``labels``: ``""`` or the kind of error.

    For each pair X_L / X_R in the label map, with ``cover(P, S)`` the fraction of reference
    side S's voxels that the prediction labels P:

    * ``swap``: both reference sides present, and each predicted side overlaps the other side's
      reference more than its own (``DSC(pred X_L, ref X_R) > DSC(pred X_L, ref X_L)`` and the
      same for X_R);
    * ``same_side``: both reference sides present and one predicted label covers more than half
      of each (both kidneys labelled left, or both right);
    * ``wrong_side``: one reference side present only (e.g. the remaining kidney after a
      nephrectomy) and more than half of it labelled as the other side, less than half as its own.

    Both structures of the pair get the kind. Structures without a partner in the map get nothing.
    """
    names = dict((n, v) for v, n in labels)
    out: dict[str, str] = {}
    for v, name in labels:
        other = contralateral(name)
        if laterality(name) != "L" or other not in names:
            continue
        vl, vr = v, names[other]
        ref = {"L": reference == vl, "R": reference == vr}
        pred = {"L": prediction == vl, "R": prediction == vr}
        n_ref = {k: int(np.count_nonzero(m)) for k, m in ref.items()}

        def cover(p: str, s: str) -> float:
            return float(np.count_nonzero(pred[p] & ref[s])) / n_ref[s] if n_ref[s] else 0.0

        def d(a: np.ndarray, b: np.ndarray) -> float:
            x = dice(a, b)
            return 0.0 if math.isnan(x) else x

        kind = ""
        if n_ref["L"] and n_ref["R"]:
            if d(ref["R"], pred["L"]) > d(ref["L"], pred["L"]) and d(ref["L"], pred["R"]) > d(ref["R"], pred["R"]):
                kind = "swap"
            elif any(cover(p, "L") > 0.5 and cover(p, "R") > 0.5 for p in ("L", "R")):
                kind = "same_side"
        else:
            for side, opposite in (("L", "R"), ("R", "L")):
                if n_ref[side] and cover(opposite, side) > 0.5 and cover(side, side) < 0.5:
                    kind = "wrong_side"
        out[name] = kind
        out[other] = kind
    return out


def laterality_swaps(reference: np.ndarray, prediction: np.ndarray, labels: LabelMap) -> dict[str, bool]:
    """True for every lateral structure with any laterality error (:func:`laterality_errors`):
    a swapped pair, both sides labelled the same, or a single remaining organ given the wrong side."""
    return {k: bool(v) for k, v in laterality_errors(reference, prediction, labels).items()}


def _rows(
    ref: Volume,
    pred: np.ndarray,
    labels: LabelMap,
    tolerance_mm: float,
    base: dict[str, object],
    params: dict[str, object],
) -> list[dict[str, object]]:
    results = evaluate_labels(ref.array, pred, ref.spacing, labels, tolerance_mm=tolerance_mm, backend="numpy")
    errors = laterality_errors(ref.array, pred, labels)
    params_json = json.dumps(params, sort_keys=True)
    rows = []
    for r in results:
        row = dict(base)
        row.update(r.as_dict())
        row["laterality_error"] = errors.get(r.structure, "")
        row["laterality_swap"] = bool(row["laterality_error"])
        row["params"] = params_json
        rows.append(row)
    return rows


def _read_pair(case: str, image: Path, reference: Path) -> tuple[Volume, Volume]:
    img = read_volume(image)
    ref = read_volume(reference)
    check_same_grid(ref, img, reference, image)
    return img, ref


def _save_folder(pattern: str | Path | None, pert: Perturbation, centre: str, model: str) -> str | None:
    if pattern is None or pert.condition == "original":
        return None
    return str(pattern).format(condition=pert.condition, centre=centre, model=model)


@dataclass(frozen=True)
class _CaseCondition:
    """One robustness task: paths and small objects only (workers read the images)."""

    case: str
    image: str
    reference: str
    perturbation: Perturbation
    predictor: Predictor
    labels: LabelMap
    tolerance_mm: float
    base: dict[str, object]
    work_dir: str | None
    save_folder: str | None


class _TaskCache:
    """Finished case x condition results under ``CACHE/robustness-<key>/<centre>/<condition>/<case>.json``."""

    def __init__(self, root: str | Path, predictor: Predictor, labels: LabelMap, tolerance_mm: float,
                 base: dict[str, object]) -> None:
        from oarbench import __version__, storage

        describe = getattr(predictor, "describe", None)
        payload = json.dumps({"predictor": describe() if describe is not None else type(predictor).__qualname__,
                              "labels": {str(k): v for k, v in labels.labels.items()}, "tolerance_mm": tolerance_mm,
                              "base": base, "version": __version__}, sort_keys=True, default=str)
        key = hashlib.sha256(payload.encode()).hexdigest()[:16]
        self.storage = storage
        self.root = storage.join(storage.as_location(root), f"robustness-{key}", str(base.get("centre") or "-"))

    def _path(self, task: _CaseCondition) -> Any:
        return self.storage.join(self.root, task.perturbation.condition, f"{task.case}.json")

    def _inputs(self, task: _CaseCondition) -> Any:
        params = json.loads(json.dumps(task.perturbation.params(), sort_keys=True, default=str))
        return [self.storage.stamp(as_location(task.image)), self.storage.stamp(as_location(task.reference)), params]

    def load(self, task: _CaseCondition) -> Any:
        try:
            data = json.loads(self.storage.read_text(self._path(task)))
        except (OSError, ValueError):
            return None
        if data.get("inputs") != self._inputs(task):
            return None
        return data["rows"], data["floor"]

    def store(self, task: _CaseCondition, result: Any) -> None:
        rows, floor = result
        payload = {"inputs": self._inputs(task), "rows": rows, "floor": floor}
        self.storage.write_text(self._path(task), json.dumps(payload, allow_nan=True, default=str))


#: Predictors already loaded in this (worker) process, so that a model is loaded once per worker.
_LOADED: dict[str, Predictor] = {}


def _worker_predictor(predictor: Predictor) -> Predictor:
    describe = getattr(predictor, "describe", None)
    if describe is None:
        return predictor
    key = type(predictor).__qualname__ + json.dumps(describe(), sort_keys=True, default=str)
    return _LOADED.setdefault(key, predictor)


def _run_case_condition(task: _CaseCondition) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Perturb one image, predict, map back, score: (rows, noise-floor rows)."""
    case, pert = task.case, task.perturbation
    img, ref = _read_pair(case, as_location(task.image), as_location(task.reference))  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="oarbench-robustness-") as tmp:
        root = Path(task.work_dir) if task.work_dir is not None else Path(tmp)
        if root.exists():
            shutil.rmtree(root)
        in_dir = root / "images"
        in_dir.mkdir(parents=True)
        path = in_dir / f"{case}_0000.nii.gz"
        write_volume(pert.apply(img), path)
        outputs = _worker_predictor(task.predictor).predict([path], root / "predictions")
        pred = read_volume(outputs[case])
    back = pert.map_back(pred, ref)
    if task.save_folder is not None:
        write_volume(back, Path(task.save_folder) / f"{case}.nii.gz")
    base = {**task.base, "condition": pert.condition, "case": case}
    rows = _rows(ref, back.array, task.labels, task.tolerance_mm, base, pert.params())
    floor: list[dict[str, object]] = []
    if isinstance(pert, (SmallRotation, ResampleControl)):
        for r in noise_floor(ref, pert, task.labels, tolerance_mm=task.tolerance_mm):
            r.update(task.base)
            r["case"] = case
            floor.append(r)
    return rows, floor


def noise_floor(
    reference: Volume, perturbation: SmallRotation | ResampleControl, labels: LabelMap, *, tolerance_mm: float = 2.0
) -> list[dict[str, object]]:
    """Rows for the reference pushed forward (nearest) and back, scored against itself."""
    forward = perturbation.apply(reference, labels=True)
    back = perturbation.map_back(forward, reference)
    return _rows(reference, back.array, labels, tolerance_mm, {"condition": perturbation.condition},
                 {**perturbation.params(), "interpolation": "nearest", "noise_floor": True})


def run_robustness(
    images: Mapping[str, Path] | str | Path,
    reference: Mapping[str, Path] | str | Path,
    predictor: Predictor,
    conditions: Iterable[str | Perturbation] | str,
    labels: LabelMap = DEFAULT_LABELS,
    out_dir: str | Path | None = None,
    *,
    tolerance_mm: float = 2.0,
    study: str = DEFAULT_STUDY,
    centre: str = DEFAULT_CENTRE,
    model: str = "model",
    keep_work: bool = False,
    save_predictions: str | Path | None = None,
    executor: "Executor | None" = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> RobustnessResult:
    """Score ``predictor`` under each condition (``original`` is always added first).

    Parameters
    ----------
    images:
        Folder of ``CASE_0000.<ext>`` CT images (or case -> path).
    reference:
        Folder of ``CASE.<ext>`` reference label maps on the images' grids (or case -> path).
    predictor:
        Any :class:`~oarbench.robustness.predictors.Predictor`.
    conditions:
        Condition names (``flip_lr``, ``rot_z+10`` ...) or perturbation objects.
    labels:
        Label map of reference and predictions.
    out_dir:
        When given, the three CSV files are written there atomically
        (:func:`write_robustness`); perturbed images and raw predictions go to
        ``out_dir/work`` when ``keep_work``.
    tolerance_mm:
        Surface-DSC tolerance in mm.
    study, centre, model:
        Values of those columns (non-empty: they are the table's grouping keys).
    keep_work:
        Keep perturbed images and raw predictions under ``out_dir/work``.
    save_predictions:
        Folder pattern with ``{condition}`` (``{centre}`` and ``{model}`` are
        filled in from the arguments): every prediction mapped back onto the
        reference grid is written there as ``CASE.nii.gz``, so that galleries
        can show it. ``original`` is not written (it is the plain prediction).
    executor:
        ``None`` (default): this process, the predictor called once per
        condition on all cases. Else an :class:`~oarbench.executors.Executor`
        that runs one task per case x condition (perturb, predict, map back,
        score) where its workers are; each worker reads its own image and
        reference. The rows are the same either way.
    cache_dir:
        With an executor: each finished case x condition is stored there
        (path or fsspec URL), and a re-run skips the tasks whose results are
        stored for the same inputs (file size and time), predictor, labels,
        tolerance and condition.
    progress:
        A progress bar on stderr (a terminal only) over case x condition.
    """
    image_map = _as_case_map(images, images=True)
    ref_map = _as_case_map(reference, images=False)
    missing = sorted(set(ref_map) - set(image_map))
    if missing:
        raise ValueError(f"{reference}: reference cases {missing} have no image in {images}")
    cases = sorted(ref_map)
    if not cases:
        raise ValueError(f"{reference}: no reference cases")
    if isinstance(conditions, str):
        perts: list[Perturbation] = parse_conditions(conditions)
    else:
        perts = []
        for c in conditions:
            perts.extend(parse_conditions([c]) if isinstance(c, str) else [c])
    perts = [Identity()] + [p for p in perts if p.condition != "original"]
    if len({p.condition for p in perts}) != len(perts):
        raise ValueError(f"duplicate conditions in {[p.condition for p in perts]}")
    # every small-angle rotation is reported beside its resample-only control
    have = {p.condition for p in perts}
    for p in list(perts):
        if isinstance(p, SmallRotation) and control_for(p).condition not in have:
            perts.append(control_for(p))
            have.add(control_for(p).condition)
    # a re-orientation to the orientation a case is stored in changes nothing: skipped, and said
    skip: set[tuple[str, str]] = set()
    skipped_rows: list[dict[str, object]] = []
    for p in perts:
        if isinstance(p, Reorient):
            for case in cases:
                if p.is_noop(read_volume(image_map[case])):
                    skip.add((p.condition, case))
                    reason = f"the image is stored as {p.target} already: the condition would change nothing"
                    skipped_rows.append({**{"study": study, "centre": centre, "model": model},
                                         "condition": p.condition, "case": case, "reason": reason})
                    warnings.warn(f"{p.condition} skipped for case {case}: {reason}", RobustnessWarning, stacklevel=2)

    base = {"study": study, "centre": centre, "model": model}
    for key, value in base.items():
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"the {key} name must be a non-empty text, got {value!r}")
    if save_predictions is not None and "{condition}" not in str(save_predictions):
        raise ValueError(f"save_predictions {str(save_predictions)!r} needs a {{condition}} placeholder")
    work_root = Path(out_dir) / "work" if (out_dir is not None and keep_work) else None
    tmp = None
    if work_root is None:
        tmp = tempfile.TemporaryDirectory(prefix="oarbench-robustness-")
        work_root = Path(tmp.name)
    rows: list[dict[str, object]] = []
    floor_rows: list[dict[str, object]] = []
    if executor is not None:
        if tmp is not None:
            tmp.cleanup()
        keep = work_root if (out_dir is not None and keep_work) else None
        tasks = [
            _CaseCondition(case, str(image_map[case]), str(ref_map[case]), pert, predictor, labels, tolerance_mm,
                           base, None if keep is None else str(keep / pert.condition / case),
                           _save_folder(save_predictions, pert, centre, model))
            for pert in perts for case in cases if (pert.condition, case) not in skip
        ]
        cache = _TaskCache(cache_dir, predictor, labels, tolerance_mm, base) if cache_dir is not None else None
        results: list[Any] = [cache.load(t) if cache is not None else None for t in tasks]
        todo = [i for i, r in enumerate(results) if r is None]

        def finished(j: int, result: Any) -> None:
            i = todo[j]
            results[i] = result
            if cache is not None:
                cache.store(tasks[i], result)
            bar.update(1)

        bar = progress_bar(len(todo), desc=f"robustness {centre}/{model}", unit="case", enabled=progress)
        try:
            executor.map(_run_case_condition, [tasks[i] for i in todo], name="robustness", on_result=finished)
        finally:
            bar.close()
        for case_rows, case_floor in results:
            rows.extend(case_rows)
            floor_rows.extend(case_floor)
    else:
        n_tasks = sum((p.condition, c) not in skip for p in perts for c in cases)
        bar = progress_bar(n_tasks, desc=f"robustness {centre}/{model}", unit="case", enabled=progress)
        try:
            for pert in perts:
                bar.set_postfix_str(f"{pert.condition}: predicting {len(cases)} case(s)")
                cdir = work_root / pert.condition
                in_dir, pred_dir = cdir / "images", cdir / "predictions"
                if cdir.exists():
                    shutil.rmtree(cdir)
                in_dir.mkdir(parents=True)
                perturbed_paths = []
                run_cases = [c for c in cases if (pert.condition, c) not in skip]
                if not run_cases:
                    continue
                for case in run_cases:
                    img, _ = _read_pair(case, image_map[case], ref_map[case])
                    path = in_dir / f"{case}_0000.nii.gz"
                    write_volume(pert.apply(img), path)
                    perturbed_paths.append(path)
                outputs = predictor.predict(perturbed_paths, pred_dir)
                bar.set_postfix_str(f"{pert.condition}: scoring")
                for case in run_cases:
                    ref = read_volume(ref_map[case])
                    pred = read_volume(outputs[case])
                    back = pert.map_back(pred, ref)
                    if save_predictions is not None and pert.condition != "original":
                        folder = Path(str(save_predictions).format(condition=pert.condition, centre=centre, model=model))
                        write_volume(back, folder / f"{case}.nii.gz")
                    rows.extend(_rows(ref, back.array, labels, tolerance_mm, {**base, "condition": pert.condition, "case": case}, pert.params()))
                    if isinstance(pert, (SmallRotation, ResampleControl)):
                        for r in noise_floor(ref, pert, labels, tolerance_mm=tolerance_mm):
                            r.update(base)
                            r["case"] = case
                            floor_rows.append(r)
                    bar.update(1)
        finally:
            bar.close()
            if tmp is not None:
                tmp.cleanup()
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    floor = pd.DataFrame(floor_rows, columns=list(TABLE_COLUMNS))
    skipped = pd.DataFrame(skipped_rows, columns=list(SKIPPED_COLUMNS))
    result = RobustnessResult(table, floor, summarise(table, floor, skipped), skipped)
    if out_dir is not None:
        write_robustness(result, out_dir)
    return result


def _median(values: pd.Series) -> float:
    v = values.to_numpy(dtype=float)
    v = v[~np.isnan(v)]
    return float(np.median(v)) if v.size else math.nan


def summarise(table: pd.DataFrame, floor: pd.DataFrame | None = None,
              skipped: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per structure x condition: change against ``original`` on the same cases.

    ``delta = condition - original`` for DSC and HD95 per case. Pairs where
    either side is NaN (status ``absent``) are left out and counted in
    ``n_pairs_*``; an infinite HD95 (missed / hallucinated) gives an infinite
    delta (``inf - inf`` = NaN is left out). Worst case: the smallest DSC
    delta and the largest HD95 delta, with their case. ``median_floor_*``:
    median noise-floor DSC / HD95 of that condition (NaN when it has none).
    ``control_*``: for a small rotation ``rot_<axis>+-N``, the median deltas of
    its control ``resample_<axis>+-N`` on the same structure (every non-model
    step of the rotation without the rotation). ``model_effect_*``: the model's
    rotation effect, rotation minus control per case (same case, same
    structure), as the Hodges-Lehmann estimate with its exact 95 % signed-rank
    interval (:mod:`oarbench.stats.ranktests`; NaN bounds below 6 cases;
    ``n_pairs_effect_*`` pairs, absent ones left out, ``inf - inf`` a tie).
    ``n_skipped``: cases of that condition not
    run (``skipped``; e.g. a re-orientation that would change nothing).
    """
    keys = ["study", "centre", "model", "structure"]
    orig = table[table["condition"] == "original"].set_index(keys + ["case"])
    out = []
    for cond in [c for c in table["condition"].unique() if c != "original"]:
        sub = table[table["condition"] == cond].set_index(keys + ["case"])
        joined = sub.join(orig[["dsc", "hd95"]].add_suffix("_orig"), how="left").reset_index()
        for key, g in joined.groupby(keys, sort=False):
            row: dict[str, object] = dict(zip(keys, key))
            row["condition"] = cond
            row["n_cases"] = int(len(g))
            for metric, worst in (("dsc", "min"), ("hd95", "max")):
                with np.errstate(invalid="ignore"):
                    delta = (g[metric].astype(float) - g[f"{metric}_orig"].astype(float)).to_numpy()
                ok = ~np.isnan(delta)
                row[f"n_pairs_{metric}"] = int(ok.sum())
                row[f"median_delta_{metric}"] = float(np.median(delta[ok])) if ok.any() else math.nan
                if ok.any():
                    idx = int(np.argmin(np.where(ok, delta, np.inf)) if worst == "min" else np.argmax(np.where(ok, delta, -np.inf)))
                    row[f"worst_delta_{metric}"] = float(delta[idx])
                    row[f"worst_{metric}_case"] = str(g["case"].iloc[idx])
                else:
                    row[f"worst_delta_{metric}"] = math.nan
                    row[f"worst_{metric}_case"] = ""
            row["n_laterality_swaps"] = int(g["laterality_swap"].astype(bool).sum())
            if floor is not None and len(floor):
                f = floor[(floor["condition"] == cond) & (floor["structure"] == key[3])]
                row["median_floor_dsc"] = _median(f["dsc"]) if len(f) else math.nan
                row["median_floor_hd95"] = _median(f["hd95"]) if len(f) else math.nan
            else:
                row["median_floor_dsc"] = math.nan
                row["median_floor_hd95"] = math.nan
            row["n_skipped"] = 0
            if skipped is not None and len(skipped):
                row["n_skipped"] = int((skipped["condition"] == cond).sum())
            out.append(row)
    df = pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))
    # each small-angle drop beside its resample-only control
    keys_s = ["study", "centre", "model", "structure"]
    ctrl = df[df["condition"].astype(str).str.startswith("resample_")].set_index(keys_s + ["condition"])
    df["control_condition"] = df["control_condition"].astype(object).where(df["control_condition"].notna(), "")
    for i, row in df.iterrows():
        m = _ROT_RE.match(str(row["condition"]))
        if not m:
            continue
        name = ResampleControl(m.group(1), float(m.group(2))).condition
        key = tuple(row[k] for k in keys_s) + (name,)
        df.at[i, "control_condition"] = name
        if key in ctrl.index:
            df.at[i, "control_median_delta_dsc"] = ctrl.loc[key, "median_delta_dsc"]
            df.at[i, "control_median_delta_hd95"] = ctrl.loc[key, "median_delta_hd95"]
        for col, value in _model_effect(table, dict(zip(keys_s, key[:-1])), str(row["condition"]), name).items():
            df.at[i, col] = value
    if skipped is not None and len(skipped):  # conditions skipped for every case still get a row
        for cond, g in skipped.groupby("condition", sort=False):
            if cond not in set(df["condition"]):
                for key, _ in table.groupby(keys_s, sort=False):
                    r = dict(zip(keys_s, key), condition=cond, n_cases=0, n_skipped=int(len(g)))
                    df = pd.concat([df, pd.DataFrame([r])], ignore_index=True)
    return df.reindex(columns=list(SUMMARY_COLUMNS))


def _model_effect(table: pd.DataFrame, key: dict[str, object], rotation: str, control: str) -> dict[str, float]:
    """Rotation minus control per case: Hodges-Lehmann estimate and exact 95 % interval, DSC and HD95."""
    from oarbench.stats.ranktests import _signed_rank_ci, hodges_lehmann, paired_differences

    sel = np.ones(len(table), bool)
    for k, v in key.items():
        sel &= (table[k] == v).to_numpy()
    sub = table[sel]
    rot = sub[sub["condition"] == rotation].set_index("case")
    ctl = sub[sub["condition"] == control].set_index("case")
    cases = rot.index.intersection(ctl.index, sort=False)
    out: dict[str, float] = {"model_effect_ci_level": math.nan}
    for metric in ("dsc", "hd95"):
        a = rot.loc[cases, metric].to_numpy(dtype=float)
        b = ctl.loc[cases, metric].to_numpy(dtype=float)
        ok = ~(np.isnan(a) | np.isnan(b))
        d = paired_differences(a[ok], b[ok])
        out[f"n_pairs_effect_{metric}"] = int(d.size)
        out[f"model_effect_{metric}"] = hodges_lehmann(d) if d.size else math.nan
        lo, hi, level, _ = _signed_rank_ci(d, 0.95) if d.size else (math.nan,) * 4
        out[f"model_effect_{metric}_ci_low"], out[f"model_effect_{metric}_ci_high"] = lo, hi
        if not math.isnan(level):
            out["model_effect_ci_level"] = level
    return out


_ROT_RE = re.compile(r"^rot_([xyz])([+-]\d+(?:\.\d+)?)$")


def combine(results: Sequence[RobustnessResult]) -> RobustnessResult:
    """One result from several runs (centres, models): tables stacked, summary recomputed."""
    if not results:
        raise ValueError("no robustness results to combine")
    table = pd.concat([r.table for r in results], ignore_index=True)
    floor = pd.concat([r.noise_floor for r in results], ignore_index=True)
    skipped = pd.concat([r.skipped for r in results], ignore_index=True)
    return RobustnessResult(table, floor, summarise(table, floor, skipped), skipped)


def write_robustness(result: RobustnessResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``robustness.csv``, ``noise_floor.csv``, ``robustness_summary.csv`` and
    ``robustness_skipped.csv`` atomically."""
    from oarbench import storage

    out = storage.as_location(out_dir)
    check_keys(result.table, str(storage.join(out, "robustness.csv")))
    if isinstance(out, Path):
        out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, df in (("robustness.csv", result.table), ("noise_floor.csv", result.noise_floor),
                     ("robustness_summary.csv", result.summary), ("robustness_skipped.csv", result.skipped)):
        paths[name] = storage.write_text(storage.join(out, name), csv_text(df))
    return paths
