"""False-positive kidneys after nephrectomy: what models predict where no organ is.

Which kidney is absent comes from metadata (column ``nephrectomy``: ``none``,
``left`` or ``right``), never from an empty reference: an empty reference
kidney that the metadata does not explain is reported as a warning.

Per case x model: predicted volume of the absent side's label (mL), number of
connected components (26-connectivity: voxels touching by a face, an edge or a
corner are one component, as ``scipy.ndimage.label`` with a 3x3x3 structure)
and the largest component's volume. Per model: false-positive rates at
volume thresholds (a case is a false positive at threshold t when its
predicted volume is **strictly greater** than t mL, so at t = 0 any voxel
counts), median [IQR] and maximum volume. Between models on the same cases:
McNemar's exact test on FP yes/no and Wilcoxon's signed-rank test on volumes.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from oarbench.io import read_volume
from oarbench.tables import DEFAULT_CENTRE, DEFAULT_STUDY, restore_cells
from oarbench.labels import DEFAULT_LABELS, LabelMap

__all__ = [
    "DEFAULT_THRESHOLDS_ML",
    "AbsentResult",
    "CASE_COLUMNS",
    "read_nephrectomy",
    "absent_side_volume",
    "analyse_absent",
    "summarise_absent",
    "compare_models",
    "write_absent",
    "concat_results",
]

log = logging.getLogger(__name__)

#: Volume thresholds (mL) of the false-positive rates.
DEFAULT_THRESHOLDS_ML: tuple[float, ...] = (0.0, 0.5, 1.0, 5.0)
_SIDES = {"none": None, "left": "Kidney_L", "right": "Kidney_R"}
_ALPHA = 0.05

CASE_COLUMNS = (
    "study", "centre", "model", "case", "side", "structure", "label", "status", "pred_ml",
    "n_components", "largest_ml", "reference_ml", "prediction",
)


@dataclass(frozen=True)
class AbsentResult:
    """Tables of the analysis.

    ``cases``: one row per nephrectomy case x model (``CASE_COLUMNS``);
    ``summary``: per model x threshold; ``pairs``: per model pair x threshold;
    ``fp_cases``: the rows of ``cases`` with any predicted voxel (for the
    gallery); ``warnings``: one row per reference kidney that is empty
    although the metadata does not say it was removed (or the reverse).
    """

    cases: pd.DataFrame
    summary: pd.DataFrame
    pairs: pd.DataFrame
    fp_cases: pd.DataFrame
    warnings: pd.DataFrame


def read_nephrectomy(path: str | Path, *, centre: str | None = None) -> dict[str, str]:
    """case -> ``none`` / ``left`` / ``right`` from a metadata CSV.

    Needs columns ``case`` and ``nephrectomy``; values are matched case-
    insensitively after stripping blanks. Anything else (including an empty
    cell) raises ValueError naming the file and row: a missing value is not
    silently taken as ``none``. With ``centre``, rows of other centres (when a
    ``centre`` column exists) are skipped.
    """
    path = Path(path)
    try:
        df = restore_cells(pd.read_csv(path, dtype=str, keep_default_na=False))
    except FileNotFoundError:
        raise ValueError(f"{path}: metadata file not found") from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{path}: cannot read metadata CSV: {exc}") from exc
    for col in ("case", "nephrectomy"):
        if col not in df.columns:
            raise ValueError(f"{path}: metadata needs a {col!r} column (has {list(df.columns)})")
    if centre is not None and "centre" in df.columns:
        df = df[df["centre"].str.strip() == centre]
    out: dict[str, str] = {}
    for i, (case, value) in enumerate(zip(df["case"], df["nephrectomy"])):
        v = value.strip().lower()
        if v not in _SIDES:
            raise ValueError(f"{path}: row {i + 2} (case {case!r}): nephrectomy must be none, left or right, got {value!r}")
        c = case.strip()
        if c in out:
            raise ValueError(f"{path}: case {c!r} appears twice")
        out[c] = v
    return out


def absent_side_volume(prediction: np.ndarray, label: int, voxel_ml: float) -> tuple[float, int, float]:
    """(volume mL, number of 26-connected components, largest component mL) of one label."""
    mask = np.asarray(prediction) == label
    n_vox = int(np.count_nonzero(mask))
    if n_vox == 0:
        return 0.0, 0, 0.0
    lab, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    sizes = np.bincount(lab.ravel())[1:]
    return n_vox * voxel_ml, int(n), int(sizes.max()) * voxel_ml


def analyse_absent(
    nephrectomy: Mapping[str, str],
    predictions: Mapping[str, Mapping[str, Path]],
    *,
    references: Mapping[str, Path] | None = None,
    labels: LabelMap = DEFAULT_LABELS,
    thresholds_ml: Sequence[float] = DEFAULT_THRESHOLDS_ML,
    study: str = DEFAULT_STUDY,
    centre: str = DEFAULT_CENTRE,
    executor: Any = None,
) -> AbsentResult:
    """Analyse every nephrectomy case for every model.

    Parameters
    ----------
    nephrectomy:
        case -> ``none`` / ``left`` / ``right`` (:func:`read_nephrectomy`).
    predictions:
        model -> (case -> label file).
    references:
        case -> reference label file; used for the warnings (an empty reference
        kidney not explained by the metadata; a reference kidney present on the
        side the metadata says was removed) and the ``reference_ml`` column.
    labels:
        Label map holding ``Kidney_L`` and ``Kidney_R`` (aliases accepted).
    thresholds_ml:
        Thresholds of the false-positive rates, in mL (FP: volume > threshold).

    executor:
        An :class:`~oarbench.executors.Executor` that runs one task per case
        (its reference and every model's prediction, read where the task
        runs); default: this process.

    A nephrectomy case without a prediction file gets status ``missing``
    (counted in ``n_missing``, left out of the rates).
    """
    for t in thresholds_ml:
        if not (t >= 0 and math.isfinite(t)):
            raise ValueError(f"thresholds must be finite and >= 0 mL, got {t}")
    side_label = {}
    for side, name in _SIDES.items():
        if name is not None:
            try:
                side_label[side] = (labels.name(labels.value(name)), labels.value(name))
            except KeyError as exc:
                raise ValueError(f"label map has no {name}: {exc.args[0]}") from None
    rows: list[dict[str, object]] = []
    warn_rows: list[dict[str, object]] = []
    ref_ml: dict[str, float] = {}
    # One task per case: the reference's kidney voxel counts and each model's absent-side volume.
    values = {side: value for side, (_, value) in side_label.items()}
    ref_files = dict(references) if references is not None else {}
    task_cases = sorted(set(ref_files) | {c for c, side in nephrectomy.items() if side != "none"})
    tasks = []
    for case in task_cases:
        side = nephrectomy.get(case)
        preds = []
        if side is not None and side != "none":
            preds = [(model, str(files[case]), values[side]) for model, files in predictions.items()
                     if files.get(case) is not None]
        ref = ref_files.get(case)
        tasks.append((None if ref is None else str(ref), values, preds))
    if executor is None:
        from oarbench.executors import LocalExecutor

        executor = LocalExecutor(1)
    measured = dict(zip(task_cases, executor.map(_absent_case, tasks, name="absent")))
    if references is not None:
        for case in sorted(references):
            counts, voxel_ml = measured[case][0]
            for side, (name, value) in side_label.items():
                n = counts[side]
                listed = nephrectomy.get(case)
                if n == 0 and listed != side:
                    msg = (f"reference {name} is empty but the metadata says nephrectomy="
                           f"{listed if listed is not None else 'missing'}; not analysed as absent")
                    warn_rows.append({"study": study, "centre": centre, "case": case, "structure": name, "message": msg})
                    log.info("%s: %s", case, msg)  # the caller shows result.warnings
                if n > 0 and listed == side:
                    msg = f"metadata says nephrectomy={side} but the reference {name} has {n} voxels"
                    warn_rows.append({"study": study, "centre": centre, "case": case, "structure": name, "message": msg})
                    log.info("%s: %s", case, msg)  # the caller shows result.warnings
                if listed == side:
                    ref_ml[case] = n * voxel_ml
    for model, files in predictions.items():
        for case, side in sorted(nephrectomy.items()):
            if side == "none":
                continue
            name, value = side_label[side]
            row: dict[str, object] = {
                "study": study, "centre": centre, "model": model, "case": case, "side": side,
                "structure": name, "label": value, "reference_ml": ref_ml.get(case, math.nan),
            }
            path = files.get(case)
            if path is None:
                row.update(status="missing", pred_ml=math.nan, n_components=0, largest_ml=math.nan, prediction="")
            else:
                ml, ncomp, largest = measured[case][1][model]
                row.update(status="fp" if ml > 0 else "clean", pred_ml=ml, n_components=ncomp,
                           largest_ml=largest, prediction=str(path))
            rows.append(row)
    cases = pd.DataFrame(rows, columns=list(CASE_COLUMNS))
    warnings_df = pd.DataFrame(warn_rows, columns=["study", "centre", "case", "structure", "message"])
    return _assemble(cases, warnings_df, thresholds_ml)


def _absent_case(
    task: tuple[str | None, dict[str, int], list[tuple[str, str, int]]],
) -> tuple[tuple[dict[str, int], float] | None, dict[str, tuple[float, int, float]]]:
    """One case: (reference kidney voxel counts per side and voxel mL, or None;
    model -> absent-side (mL, components, largest mL))."""
    ref_path, values, preds = task
    ref_counts = None
    if ref_path is not None:
        ref = read_volume(ref_path)
        ref_counts = ({side: int(np.count_nonzero(ref.array == v)) for side, v in values.items()}, ref.voxel_volume_ml)
    out = {}
    for model, path, value in preds:
        vol = read_volume(path)
        out[model] = absent_side_volume(vol.array, value, vol.voxel_volume_ml)
    return ref_counts, out


def _assemble(cases: pd.DataFrame, warnings_df: pd.DataFrame, thresholds_ml: Sequence[float]) -> AbsentResult:
    fp = cases[cases["status"] == "fp"].sort_values(["model", "pred_ml"], ascending=[True, False]).reset_index(drop=True)
    return AbsentResult(cases, summarise_absent(cases, thresholds_ml), compare_models(cases, thresholds_ml), fp, warnings_df)


def summarise_absent(cases: pd.DataFrame, thresholds_ml: Sequence[float] = DEFAULT_THRESHOLDS_ML) -> pd.DataFrame:
    """Per model x threshold: n cases, n FP (volume > threshold), rate, volume median [IQR] and max (mL).

    Volume statistics (quartiles by linear interpolation, numpy's default)
    repeat on each threshold row of a model. ``n_missing`` counts cases
    without a prediction, left out of everything else.
    """
    out = []
    for model, g in cases.groupby("model", sort=True):
        ok = g[g["status"] != "missing"]
        vols = ok["pred_ml"].to_numpy(dtype=float)
        stats = dict(
            median_ml=float(np.median(vols)) if vols.size else math.nan,
            q1_ml=float(np.percentile(vols, 25)) if vols.size else math.nan,
            q3_ml=float(np.percentile(vols, 75)) if vols.size else math.nan,
            max_ml=float(vols.max()) if vols.size else math.nan,
        )
        for t in thresholds_ml:
            n_fp = int(np.count_nonzero(vols > t))
            out.append({
                "study": g["study"].iloc[0], "model": model, "threshold_ml": float(t), "n_cases": int(vols.size),
                "n_missing": int(len(g) - len(ok)), "n_fp": n_fp,
                "fp_rate": n_fp / vols.size if vols.size else math.nan, **stats,
            })
    return pd.DataFrame(out, columns=["study", "model", "threshold_ml", "n_cases", "n_missing", "n_fp", "fp_rate",
                                      "median_ml", "q1_ml", "q3_ml", "max_ml"])


def _min_p(m: int) -> float:
    """Smallest two-sided exact p-value attainable with m informative pairs: 2 / 2^m."""
    return min(1.0, 2.0 ** (1 - m)) if m > 0 else 1.0


#: Columns of :attr:`AbsentResult.pairs`.
PAIR_COLUMNS = ("model_a", "model_b", "threshold_ml", "n_cases", "fp_both", "fp_a_only", "fp_b_only",
                "fp_neither", "mcnemar_p", "mcnemar_p_adjusted", "mcnemar_verdict", "median_diff_ml",
                "wilcoxon_n_nonzero", "wilcoxon_p_method", "wilcoxon_p", "wilcoxon_p_adjusted",
                "wilcoxon_verdict", "correction", "family_size")


def compare_models(
    cases: pd.DataFrame, thresholds_ml: Sequence[float] = DEFAULT_THRESHOLDS_ML, *, alpha: float = _ALPHA,
    correction: str = "holm",
) -> pd.DataFrame:
    """Paired comparison of every model pair on the cases both predicted.

    Per threshold: McNemar's exact test (binomial on the discordant pairs,
    ``statsmodels.stats.contingency_tables.mcnemar(exact=True)``) on FP yes/no;
    per pair (repeated on each threshold row): the Wilcoxon signed-rank test of
    :func:`oarbench.stats.signed_rank_test` on the volumes, the same code as
    ``oarbench stats`` (exact or exact-permutation p-values, zero differences
    ranked (``pratt``), not testable with fewer than 6 non-zero differences).
    All testable p-values of the analysis (every pair's McNemar tests at every
    threshold and every pair's Wilcoxon test, counted once) form one family,
    corrected with ``correction`` (:func:`statsmodels.stats.multitest.multipletests`);
    a test that is not testable has no p-value (NaN) and stays out of the family,
    as in ``oarbench stats``.
    Verdicts use the adjusted p: ``not testable`` when there are no discordant
    pairs / too few non-zero differences (with m discordant pairs the smallest
    two-sided exact p is 2 / 2^m, so m <= 5 can never reach 0.05); else
    ``different`` (adjusted p < alpha) or ``no evidence of a difference``.
    """
    from statsmodels.stats.contingency_tables import mcnemar
    from statsmodels.stats.multitest import multipletests

    from oarbench.stats.ranktests import signed_rank_test

    ok = cases[cases["status"] != "missing"]
    wide = ok.pivot_table(index=["centre", "case"], columns="model", values="pred_ml", aggfunc="first")
    models = sorted(wide.columns)
    out = []
    wilcoxon_p: list[float] = []
    for pair_index, (a, b) in enumerate(itertools.combinations(models, 2)):
        pair = wide[[a, b]].dropna()
        va, vb = pair[a].to_numpy(float), pair[b].to_numpy(float)
        diff = va - vb
        m_w = int(np.count_nonzero(diff))
        if m_w == 0:
            w = None
            w_p, w_method, w_reason = math.nan, "", "not testable: all volumes equal"
        else:
            w = signed_rank_test(diff, zero_method="pratt")
            w_p, w_method = w.p, w.p_method
            w_reason = "" if w.testable else f"not testable: {w.reason}"
        wilcoxon_p.append(w_p)
        for t in thresholds_ml:
            fa, fb = va > t, vb > t
            n11 = int(np.count_nonzero(fa & fb))
            n10 = int(np.count_nonzero(fa & ~fb))
            n01 = int(np.count_nonzero(~fa & fb))
            n00 = int(np.count_nonzero(~fa & ~fb))
            m = n10 + n01
            # not testable (no p below alpha attainable): no p-value, outside the family, as in oarbench stats
            p = math.nan if _min_p(m) > alpha else float(mcnemar(np.array([[n11, n10], [n01, n00]]), exact=True).pvalue)
            out.append({
                "model_a": a, "model_b": b, "threshold_ml": float(t), "n_cases": int(len(pair)),
                "fp_both": n11, "fp_a_only": n10, "fp_b_only": n01, "fp_neither": n00,
                "mcnemar_p": p, "_m": m, "_pair": pair_index,
                "median_diff_ml": float(np.median(diff)) if diff.size else math.nan,
                "wilcoxon_n_nonzero": m_w, "wilcoxon_p_method": w_method, "wilcoxon_p": w_p, "_w_reason": w_reason,
            })
    # one family: McNemar p of every row, Wilcoxon p of every pair once
    family = [r["mcnemar_p"] for r in out] + wilcoxon_p
    finite = [i for i, p in enumerate(family) if not math.isnan(p)]
    adjusted = [math.nan] * len(family)
    if finite:
        adj = multipletests(np.array([family[i] for i in finite]), method=correction)[1]
        for i, v in zip(finite, adj):
            adjusted[i] = float(v)
    for i, r in enumerate(out):
        r["mcnemar_p_adjusted"] = adjusted[i]
        r["wilcoxon_p_adjusted"] = adjusted[len(out) + r.pop("_pair")]
        m = r.pop("_m")
        if m == 0:
            r["mcnemar_verdict"] = "not testable: no discordant cases"
        else:
            r["mcnemar_verdict"] = _verdict(r["mcnemar_p_adjusted"], m, alpha, "discordant cases")
        reason = r.pop("_w_reason")
        r["wilcoxon_verdict"] = reason or ("different" if r["wilcoxon_p_adjusted"] < alpha
                                           else "no evidence of a difference")
        r["correction"] = correction
        r["family_size"] = len(finite)
    return pd.DataFrame(out, columns=list(PAIR_COLUMNS))


def _verdict(p: float, m: int, alpha: float, what: str) -> str:
    if _min_p(m) > alpha:
        return f"not testable: {m} {what} (smallest attainable p {_min_p(m):.3g} > {alpha:g})"
    return "different" if p < alpha else "no evidence of a difference"


def write_absent(result: AbsentResult, out_dir: str | Path) -> dict[str, Path]:
    """Write absent.csv, absent_summary.csv, absent_pairs.csv, absent_cases.csv, absent_warnings.csv atomically."""
    from oarbench import storage

    out = storage.as_location(out_dir)
    if isinstance(out, Path):
        out.mkdir(parents=True, exist_ok=True)
    files = {
        "absent.csv": result.cases,
        "absent_summary.csv": result.summary,
        "absent_pairs.csv": result.pairs,
        "absent_cases.csv": result.fp_cases,
        "absent_warnings.csv": result.warnings,
    }
    from oarbench.tables import csv_text

    return {name: storage.write_text(storage.join(out, name), csv_text(df))  # type: ignore[misc]
            for name, df in files.items()}


def concat_results(results: Sequence[AbsentResult], thresholds_ml: Sequence[float] = DEFAULT_THRESHOLDS_ML) -> AbsentResult:
    """Combine per-centre results (summaries and pairs recomputed on all cases)."""
    cases = pd.concat([r.cases for r in results], ignore_index=True) if results else pd.DataFrame(columns=list(CASE_COLUMNS))
    warns = pd.concat([r.warnings for r in results], ignore_index=True) if results else pd.DataFrame()
    return _assemble(cases, warns, thresholds_ml)


def analyse_study_absent(
    study: Any,
    *,
    models: Sequence[str] | None = None,
    thresholds_ml: Sequence[float] | None = None,
    labels: LabelMap | None = None,
    warn: Any = None,
    executor: Any = None,
) -> AbsentResult:
    """:func:`analyse_absent` for every centre x model of a :class:`oarbench.study.Study`.

    Thresholds come from the argument, else the study's ``[absent] thresholds_ml``,
    else :data:`DEFAULT_THRESHOLDS_ML`. A centre without a metadata file is
    skipped with a warning (the nephrectomy side is never guessed); a study in
    which no centre has metadata is an error.
    """
    from oarbench.io import find_cases

    section = study.raw.get("absent", {}) or {}
    thr = tuple(float(t) for t in (thresholds_ml or section.get("thresholds_ml", DEFAULT_THRESHOLDS_ML)))
    labels = labels or study.labels
    results = []
    for centre in study.centres:
        if centre.metadata is None:
            if warn is not None:
                warn(f"centre {centre.name}: no metadata file in the study, skipped (nephrectomy side unknown)")
            continue
        neph = read_nephrectomy(centre.metadata, centre=centre.name)
        preds = {}
        for model in study.models:
            if models and model.name not in models:
                continue
            folder = model.predictions_dir(centre.name)
            preds[model.name] = find_cases(folder) if folder.is_dir() else {}
        refs = find_cases(centre.reference) if centre.reference.is_dir() else None
        results.append(analyse_absent(neph, preds, references=refs, labels=labels, thresholds_ml=thr,
                                      study=study.name, centre=centre.name, executor=executor))
    if not results:
        raise ValueError(f"{study.path}: nothing to analyse: no centre has a metadata file")
    return concat_results(results, thr)
