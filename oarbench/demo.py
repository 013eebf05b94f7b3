"""The whole analysis on the synthetic two-centre study: ``oarbench demo``.

Layout of ``OUT``::

    OUT/study/      the generated study (nnU-Net raw datasets, metadata, predictions, study.toml)
    OUT/results/    metrics.csv, summary.csv, run.json, absent*.csv, robustness*.csv,
                    stats.csv, gallery/, report.html

Each step reads only what the steps before it wrote, so every step is also a
command of its own (docs/demo.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["run_demo", "TrainSettings", "train_models", "predict_study", "run_study_robustness"]


@dataclass(frozen=True)
class TrainSettings:
    """Short nnU-Net schedules for ``oarbench demo --train`` (docs/demo.md).

    ``epochs`` x ``iterations`` per local model; the federated model runs
    ``rounds`` rounds of ``local_epochs`` epochs of ``iterations`` at each site.
    ``robustness_cases``: test cases per centre scored under ``conditions``.
    """

    epochs: int = 2
    iterations: int = 10
    rounds: int = 2
    local_epochs: int = 1
    width: str = "tiny"
    device: str = "cpu"
    mirroring: bool = False
    conditions: tuple[str, ...] = ("flip_lr", "prone", "rot_z+10")
    robustness_cases: int = 2
    engine: str = "storage"


def train_models(study: Any, datasets: dict[str, Path], out_dir: Path, settings: TrainSettings,
                 *, log: Callable[[str], Any] = print) -> dict[str, Path]:
    """Train every model of ``study``: a model trained on one centre is a local nnU-Net model,
    one trained on several a federated model (FedAvg through an encrypted local-folder
    exchange). Returns model name -> nnU-Net model folder. Models already trained are reused.
    """
    from oarbench.train.exchange import generate_keys
    from oarbench.train.federated import FederationConfig, nnunet_simulate
    from oarbench.train.nnunet import train_local

    folders: dict[str, Path] = {}
    for model in study.models:
        done_marker = out_dir / model.name / "model_folder.txt"
        if done_marker.is_file():
            folders[model.name] = Path(done_marker.read_text().strip())
            log(f"[demo]   {model.name}: already trained")
            continue
        missing = [c for c in model.trained_on if c not in datasets]
        if not model.trained_on or missing:
            raise ValueError(f"{study.path}: model {model.name!r} is trained on unknown centres {missing or '[]'}")
        if len(model.trained_on) == 1:
            log(f"[demo]   {model.name}: local nnU-Net on centre {model.trained_on[0]}")
            summary = train_local(datasets[model.trained_on[0]], out_dir / model.name, fold="all",
                                  epochs=settings.epochs, iterations=settings.iterations,
                                  width=settings.width, device=settings.device)
            folder = Path(summary["model_folder"])
        else:
            log(f"[demo]   {model.name}: federated nnU-Net across {', '.join(model.trained_on)} "
                f"({settings.engine} engine)")
            work = out_dir / model.name
            if settings.engine == "flower":
                from oarbench.train.flower import run_local

                summary = run_local({c: datasets[c] for c in model.trained_on}, work / "flower",
                                    rounds=settings.rounds, local_epochs=settings.local_epochs,
                                    iterations=settings.iterations, width=settings.width, device=settings.device)
                folder = Path(summary["model"])
                done_marker.parent.mkdir(parents=True, exist_ok=True)
                done_marker.write_text(str(folder.resolve()))
                folders[model.name] = folder
                continue
            keys = work / "keys"
            if not (keys / "federation.key").is_file():
                generate_keys(keys, list(model.trained_on))
            storage = (work / "storage").resolve()
            storage.mkdir(parents=True, exist_ok=True)
            parties = nnunet_simulate(
                storage.as_uri(), keys, {c: datasets[c] for c in model.trained_on}, work / "parties",
                FederationConfig(tuple(model.trained_on), rounds=settings.rounds, poll_s=0.5),
                local_epochs=settings.local_epochs, iterations=settings.iterations,
                width=settings.width, device=settings.device)
            folder = Path(parties["coordinator"])
        done_marker.parent.mkdir(parents=True, exist_ok=True)
        done_marker.write_text(str(folder.resolve()))
        folders[model.name] = folder
    return folders


def _predictor(folder: Path, settings: TrainSettings) -> Any:
    from oarbench.robustness.predictors import NnUNetModelPredictor

    return NnUNetModelPredictor(folder, folds=("all",), device=settings.device, use_mirroring=settings.mirroring)


def predict_study(study: Any, models: dict[str, Path], out_dir: Path, settings: TrainSettings,
                  *, force: bool = False) -> Path:
    """Predict every centre's test images with every trained model into
    ``out_dir/original/{model}/{centre}``; returns a study file whose predictions pattern
    ``out_dir/{condition}/{model}/{centre}`` also finds the robustness predictions."""
    from oarbench.io import atomic_write_text, find_cases
    from oarbench.study import study_toml_text

    for model in study.models:
        predictor = _predictor(models[model.name], settings)
        for centre in study.centres:
            target = out_dir / "original" / model.name / centre.name
            images = find_cases(centre.images, images=True)
            have = set(find_cases(target)) if target.is_dir() and any(target.iterdir()) else set()
            todo = [p for c, p in sorted(images.items()) if force or c not in have]
            if todo:
                predictor.predict(todo, target)
    pattern = str(out_dir.resolve()) + "/{condition}/{model}/{centre}"
    return atomic_write_text(out_dir / "study.toml", study_toml_text(study, predictions=pattern,
                                                                     name=f"{study.name}-trained"))


def run_study_robustness(study: Any, models: dict[str, Path], out_dir: Path, settings: TrainSettings) -> Any:
    """Robustness of every trained model on the first test cases of each centre.

    Writes robustness.csv, noise_floor.csv and robustness_summary.csv into
    ``out_dir``; returns the combined table.
    """
    from oarbench.io import find_cases
    from oarbench.robustness.run import combine, run_robustness, write_robustness

    results = []
    for model in study.models:
        predictor = _predictor(models[model.name], settings)
        for centre in study.centres:
            images = find_cases(centre.images, images=True)
            refs = find_cases(centre.reference)
            cases = sorted(set(images) & set(refs))[: settings.robustness_cases]
            results.append(run_robustness({c: images[c] for c in cases}, {c: refs[c] for c in cases}, predictor,
                                          settings.conditions, study.labels, tolerance_mm=study.tolerance_mm,
                                          study=study.name, centre=centre.name, model=model.name,
                                          save_predictions=str(Path(model.root, model.predictions))))
    result = combine(results)
    write_robustness(result, out_dir)
    return result.table


def run_demo(
    out_dir: str | Path,
    *,
    config: str | Path | None = None,
    workers: int = 2,
    force: bool = False,
    gallery_k: int = 2,
    train: TrainSettings | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Path]:
    """Generate the demo study (if absent) and run every analysis step on it.

    Returns the paths of the main outputs. ``config`` is a study TOML with
    ``[phantoms]`` and ``[error_model]`` sections (default: cases/demo.toml).
    With ``train``, the models are really trained (nnU-Net v2: a local model per
    centre and a federated one, :func:`train_models`), predict both centres'
    test sets, and the analysis adds robustness with the trained models.
    """
    import pandas as pd

    from oarbench.evaluate import EvalOptions, evaluate_jobs, jobs_from_study, write_outputs
    from oarbench.phantoms import generate_study, load_demo_config
    from oarbench.study import load_study

    out_dir = Path(out_dir)
    results = out_dir / "results"
    timings: dict[str, float] = {}

    def step(name: str) -> Callable[[], None]:
        start = time.perf_counter()
        log(f"[demo] {name} ...")

        def done() -> None:
            timings[name] = round(time.perf_counter() - start, 2)
            log(f"[demo] {name}: {timings[name]:.1f} s")

        return done

    done = step("phantoms")
    cfg = load_demo_config(config)
    paths = generate_study(out_dir / "study", cfg, force=force)
    study = load_study(paths.study_toml)
    done()
    study_toml = paths.study_toml

    if train is not None:
        done = step("train models (nnU-Net v2, local and federated)")
        models = train_models(study, paths.datasets, out_dir / "models", train, log=log)
        done()
        done = step("predict test sets with the trained models")
        study_toml = predict_study(study, models, out_dir / "trained", train, force=force)
        study = load_study(study_toml)
        done()

    done = step("evaluate")
    options = EvalOptions(labels=study.labels, tolerance_mm=study.tolerance_mm,
                          tolerances=tuple(sorted(study.tolerances_mm.items())))
    table, provenance = evaluate_jobs(jobs_from_study(study), options, results, workers=workers, force=force, progress=False)
    provenance["command"] = "demo"
    provenance["study"] = str(study_toml)
    write_outputs(results, table, provenance)
    done()

    outputs: dict[str, Path] = {"study": study_toml, "metrics": results / "metrics.csv"}

    robustness = None
    if train is not None:
        done = step("robustness of the trained models")
        robustness = run_study_robustness(study, models, results, train)
        outputs["robustness"] = results / "robustness.csv"
        done()

    done = step("false-positive kidneys after nephrectomy")
    from oarbench.absent import analyse_study_absent, write_absent

    absent = analyse_study_absent(study, warn=log)
    written = write_absent(absent, results)
    outputs["absent"] = written["absent.csv"]
    done()

    done = step("statistics")
    from oarbench.stats import run_stats, write_stats

    stats = run_stats(table, margins={"dsc": 0.01, "hd95": 1.0}, source=str(results / "metrics.csv"))
    outputs["stats"] = write_stats(stats, results / "stats.csv")
    from oarbench.stats import methods_paragraph, paper_table, write_paper_outputs

    trained = {m.name: tuple(m.trained_on) for m in study.models if m.trained_on} or None
    paper = paper_table(table, stats, trained_on=trained)
    outputs.update(write_paper_outputs(results, paper, methods_paragraph(provenance, stats)))
    done()

    done = step("gallery")
    from oarbench.gallery import FailureCriteria, PathResolver, build_gallery

    gallery_table = table
    if robustness is not None:
        # Perturbed conditions join the table so that their largest drops are drawn too.
        gallery_table = pd.concat([table, robustness[robustness["condition"] != "original"]], ignore_index=True)
    criteria = FailureCriteria(k=gallery_k)
    build_gallery(gallery_table, PathResolver.from_study(study_toml), results / "gallery", criteria=criteria,
                  source=str(results / "metrics.csv"))
    outputs["gallery"] = results / "gallery"
    done()

    done = step("report")
    from oarbench.report import ReportOptions, build_report

    outputs["report"] = build_report(
        results,
        table,
        stats=stats,
        absent=absent.cases,
        absent_pairs=absent.pairs,
        robustness=robustness,
        noise_floor=results / "noise_floor.csv" if (robustness is not None and (results / "noise_floor.csv").is_file()) else None,
        options=ReportOptions(criteria=criteria, trained_on={m.name: m.trained_on for m in study.models if m.trained_on}),
        gallery_dir=results / "gallery",
        provenance={**provenance, "demo_step_seconds": timings},
        title="oarbench demo: synthetic two-centre paediatric study",
    )
    done()
    return outputs
