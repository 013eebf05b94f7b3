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

__all__ = ["run_demo", "SCHEDULES", "TrainSettings", "train_models", "predict_study", "run_study_robustness",
           "learning_curves"]

# The quick schedule (measured on the phantoms, docs/demo.md): 24 epochs of 50 iterations, so that the
# federated sites average every 50 iterations (24 rounds of one epoch); averaging every 100 left the
# federated model further below the local one on its own centre (docs/demo.md, the ablation).
QUICK_EPOCHS = 24
QUICK_ITERATIONS = 50
QUICK_BATCH = 8
QUICK_LR = 0.01
QUICK_OPTIMIZER = "adam"
QUICK_FOREGROUND = 1.0
#: The quick schedule's training arithmetic: bfloat16 forward passes where the CPU has native
#: bfloat16 instructions (docs/demo.md, "Schedules"), float32 elsewhere.
QUICK_PRECISION = "auto"
#: Iterations between two points of the quick schedule's learning curves (every other epoch).
QUICK_CURVE_EVERY = 100


#: Named training schedules of ``oarbench demo --train`` (docs/demo.md). ``quick`` trains on a
#: 2-core CPU in minutes: nnU-Net's 2d configuration at the phantoms' grid, the tiny width, light
#: augmentation, AdamW from 0.01 (nnU-Net's SGD learned far more slowly in the same number of
#: iterations), every patch centred on a structure (small organs are learned sooner). ``full`` is
#: nnU-Net's default (3d_fullres, planned width, 1000 epochs of 250 iterations, default
#: augmentation), for a GPU; its federated model runs 100 rounds of 10 epochs.
SCHEDULES: dict[str, dict[str, Any]] = {
    "quick": dict(configuration="2d", width="tiny", epochs=QUICK_EPOCHS, iterations=QUICK_ITERATIONS,
                  rounds=QUICK_EPOCHS, local_epochs=1, augmentation="light", batch_size=QUICK_BATCH,
                  initial_lr=QUICK_LR, optimizer=QUICK_OPTIMIZER, foreground_oversampling=QUICK_FOREGROUND,
                  curve_every=QUICK_CURVE_EVERY, pseudo_dice=False, precision=QUICK_PRECISION),
    "full": dict(configuration="3d_fullres", width="default", epochs=1000, iterations=250, rounds=100,
                 local_epochs=10, augmentation="default", batch_size=None, initial_lr=None, optimizer="sgd",
                 foreground_oversampling=None, curve_every=25_000, pseudo_dice=True, precision="fp32"),
}


@dataclass(frozen=True)
class TrainSettings:
    """nnU-Net schedules for ``oarbench demo --train`` (docs/demo.md).

    Each local model trains ``epochs`` x ``iterations``; the federated model runs
    ``rounds`` rounds of ``local_epochs`` epochs of ``iterations`` at each site, so
    with ``rounds * local_epochs == epochs`` every site follows the local schedule
    (same iterations, same poly learning-rate decay). :meth:`schedule` builds the
    named schedules of :data:`SCHEDULES`.
    ``harmonise``: bring every case to the canonical orientation before nnU-Net sees it
    (:mod:`oarbench.train.harmonise`; off reproduces training on the arrays as stored).
    ``optimizer_state``: ``"kept"``, ``"reset"`` or ``"momentum_reset"`` across federated rounds
    (:class:`TrainerOptions`).
    ``pseudo_dice``: nnU-Net's validation forward passes at every epoch end (the same
    weights either way; :class:`TrainerOptions`); the quick schedule skips them.
    ``precision``: the training step's forward pass on a CPU (:class:`TrainerOptions`); the
    quick schedule's ``auto`` runs it in bfloat16 where the CPU computes it natively.
    ``warmup``: iterations of linear learning-rate warm-up at the start of every model's
    schedule (:class:`TrainerOptions`; 0: none).
    ``seed``: every model's training seed (:class:`TrainerOptions`: a local model's initial
    weights, the federated model's initial global weights, every training call's data order).
    ``server_momentum``: the federated coordinator's momentum (0: plain FedAvg;
    :func:`oarbench.train.aggregate.server_momentum_step`), on both engines.
    ``plan_spacing``: the federated model's target spacing, ``"finest"`` (the finest site's
    grid) or ``"pooled"`` (nnU-Net's median over both centres' cases;
    :func:`oarbench.train.federated.nnunet_plans`).
    ``robustness_cases``: test cases per centre scored under ``conditions``;
    ``curve_cases``: test cases per centre scored for the learning curves (0: none);
    ``curve_every``: iterations between two points of a curve (the weights after every
    epoch or round where the iteration count is a multiple of it, and the final weights).
    """

    epochs: int = QUICK_EPOCHS
    iterations: int = QUICK_ITERATIONS
    rounds: int = QUICK_EPOCHS
    local_epochs: int = 1
    width: str = "tiny"
    configuration: str = "2d"
    augmentation: str = "light"
    batch_size: int | None = QUICK_BATCH
    initial_lr: float | None = QUICK_LR
    optimizer: str = QUICK_OPTIMIZER
    foreground_oversampling: float | None = QUICK_FOREGROUND
    harmonise: bool = True
    optimizer_state: str = "kept"
    plan_spacing: str = "finest"
    device: str = "cpu"
    mirroring: bool = False
    conditions: tuple[str, ...] = ("flip_lr", "prone", "rot_z+10")
    robustness_cases: int = 2
    engine: str = "storage"
    curve_cases: int = 3
    curve_every: int = QUICK_CURVE_EVERY
    pseudo_dice: bool = False
    precision: str = QUICK_PRECISION
    seed: int = 0
    warmup: int = 0
    server_momentum: float = 0.0

    def __post_init__(self) -> None:
        if min(self.epochs, self.iterations, self.rounds, self.local_epochs) < 1:
            raise ValueError("epochs, iterations, rounds and local_epochs must be at least 1")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.robustness_cases < 0 or self.curve_cases < 0:
            raise ValueError("robustness_cases and curve_cases must be at least 0")
        if self.curve_every < 1:
            raise ValueError("curve_every must be at least 1")
        from oarbench.train._plans import check_plan_spacing

        check_plan_spacing(self.plan_spacing)
        from oarbench.train.aggregate import check_server_momentum

        check_server_momentum(self.server_momentum)
        self.options()  # the trainer options check their own values (the seed among them) now, not at training

    @classmethod
    def schedule(cls, name: str, **overrides: Any) -> "TrainSettings":
        """The named schedule (``quick`` or ``full``) with ``overrides`` (``None`` values ignored)."""
        if name not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
        given = {k: v for k, v in overrides.items() if v is not None}
        merged = {**SCHEDULES[name], **given}
        if "local_epochs" not in given and ("epochs" in given or "rounds" in given):
            # the federated sites follow the local schedule: rounds x local epochs = epochs
            epochs, local = merged["epochs"], SCHEDULES[name]["local_epochs"]
            if "rounds" not in given:
                merged["rounds"] = epochs // local if epochs % local == 0 else epochs
            if epochs % merged["rounds"]:
                raise ValueError(f"epochs ({epochs}) must be a multiple of rounds ({merged['rounds']}), so that "
                                 "each federated site trains the same schedule as a local model")
            merged["local_epochs"] = epochs // merged["rounds"]
        return cls(**merged)

    def options(self) -> Any:
        """The trainer options (:class:`oarbench.train.nnunet.TrainerOptions`)."""
        from oarbench.train.nnunet import TrainerOptions

        return TrainerOptions(augmentation=self.augmentation, initial_lr=self.initial_lr, batch_size=self.batch_size,
                              optimizer=self.optimizer, foreground_oversampling=self.foreground_oversampling,
                              harmonise=self.harmonise, optimizer_state=self.optimizer_state,
                              pseudo_dice=self.pseudo_dice, precision=self.precision, seed=self.seed,
                              warmup=self.warmup)

    def training_key(self, federated: bool = True) -> dict[str, Any]:
        """What a trained model depends on: a re-run reuses models only when this matches.

        A local model (``federated=False``) does not depend on the federated settings
        (:data:`FEDERATED_ONLY`), so a run that changes only those reuses the local models.
        """
        keys = ("epochs", "iterations", "rounds", "local_epochs", "width", "configuration", "augmentation",
                "batch_size", "initial_lr", "optimizer", "foreground_oversampling", "harmonise", "optimizer_state",
                "plan_spacing", "engine", "precision", "seed", "warmup", "server_momentum")
        return {k: getattr(self, k) for k in keys if federated or k not in FEDERATED_ONLY}


#: Settings only a federated model depends on.
FEDERATED_ONLY = ("rounds", "local_epochs", "optimizer_state", "plan_spacing", "engine", "server_momentum")

#: Settings recorded in training.json only since a later version, with the value every model
#: trained before then had: a folder that lacks one was trained with that value.
RECORDED_LATER = {"seed": 0, "warmup": 0, "server_momentum": 0.0}


def train_models(study: Any, datasets: dict[str, Path], out_dir: Path, settings: TrainSettings,
                 *, log: Callable[[str], Any] = print) -> dict[str, Path]:
    """Train every model of ``study``: a model trained on one centre is a local nnU-Net model,
    one trained on several a federated model (FedAvg through an encrypted local-folder
    exchange). Returns model name -> nnU-Net model folder.

    The models train at the same time, each training process with an equal share of
    the CPU cores (one process per local model, one per site of a federated model).
    Models already trained with the same settings (:meth:`TrainSettings.training_key`)
    are reused; a model folder trained with other settings is refused with an error.
    Local training saves the weights after every epoch under ``MODEL/snapshots`` (the
    federated model's global weights of every round stay in its sites' folders) for
    :func:`learning_curves`.
    """
    import json
    import os
    from concurrent.futures import ThreadPoolExecutor

    from oarbench.io import atomic_write_text

    folders: dict[str, Path] = {}
    todo = []
    for model in study.models:
        key = settings.training_key(federated=len(model.trained_on) > 1)
        work = out_dir / model.name
        done_marker = work / "model_folder.txt"
        key_file = work / "training.json"
        if key_file.is_file() or done_marker.is_file():
            old = json.loads(key_file.read_text()) if key_file.is_file() else {}
            diff = sorted(k for k in key if old.get(k, RECORDED_LATER.get(k, "unrecorded")) != key[k])
            if diff:
                raise ValueError(f"{work}: holds a model trained with other settings ({', '.join(diff)} differ); "
                                 "use another --out, or delete that folder to retrain")
        if done_marker.is_file():
            folders[model.name] = Path(done_marker.read_text().strip())
            log(f"[demo]   {model.name}: already trained")
            continue
        missing = [c for c in model.trained_on if c not in datasets]
        if not model.trained_on or missing:
            raise ValueError(f"{study.path}: model {model.name!r} is trained on unknown centres {missing or '[]'}")
        todo.append(model)
    if not todo:
        return folders
    processes = sum(len(m.trained_on) for m in todo)
    threads = max(1, (os.cpu_count() or 1) // processes)
    for model in todo:
        work = out_dir / model.name
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / "training.json",
                          json.dumps(settings.training_key(federated=len(model.trained_on) > 1), indent=1))
        kind = (f"local nnU-Net on centre {model.trained_on[0]}" if len(model.trained_on) == 1 else
                f"federated nnU-Net across {', '.join(model.trained_on)} ({settings.engine} engine)")
        log(f"[demo]   {model.name}: {kind}")
    with ThreadPoolExecutor(max_workers=len(todo)) as pool:
        futures = {m.name: pool.submit(_train_model, m, datasets, out_dir / m.name, settings, threads)
                   for m in todo}
    errors = []
    for model in todo:  # models that finished are kept (reused on a re-run) even when another failed
        error = futures[model.name].exception()
        if error is not None:
            errors.append(error)
            continue
        folder = futures[model.name].result()
        atomic_write_text(out_dir / model.name / "model_folder.txt", str(folder.resolve()))
        folders[model.name] = folder
    if errors:
        raise errors[0]
    return {m.name: folders[m.name] for m in study.models}


def _train_model(model: Any, datasets: dict[str, Path], work: Path, settings: TrainSettings, threads: int) -> Path:
    """Train one model of the study (local, or federated by ``settings.engine``); its nnU-Net model folder."""
    from oarbench.train.exchange import generate_keys
    from oarbench.train.federated import FederationConfig, nnunet_simulate
    from oarbench.train.nnunet import train_local

    if len(model.trained_on) == 1:
        summary = train_local(datasets[model.trained_on[0]], work, fold="all",
                              configuration=settings.configuration, epochs=settings.epochs,
                              iterations=settings.iterations, width=settings.width, device=settings.device,
                              options=settings.options(), snapshot_dir=work / "snapshots", num_processes=threads,
                              threads=threads)
        return Path(summary["model_folder"])
    if settings.engine == "flower":
        from oarbench.train.flower import run_local

        summary = run_local({c: datasets[c] for c in model.trained_on}, work / "flower",
                            rounds=settings.rounds, local_epochs=settings.local_epochs,
                            iterations=settings.iterations, configuration=settings.configuration,
                            width=settings.width, device=settings.device, options=settings.options(),
                            num_processes=threads, threads=threads, plan_spacing=settings.plan_spacing,
                            server_momentum=settings.server_momentum)
        return Path(summary["model"])
    keys = work / "keys"
    if not (keys / "roster.json").is_file():
        generate_keys(keys, list(model.trained_on))
    storage = (work / "storage").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    parties = nnunet_simulate(
        storage.as_uri(), keys, {c: datasets[c] for c in model.trained_on}, work / "parties",
        FederationConfig(tuple(model.trained_on), rounds=settings.rounds, poll_s=0.5,
                         server_momentum=settings.server_momentum),
        local_epochs=settings.local_epochs, iterations=settings.iterations,
        configuration=settings.configuration, width=settings.width, device=settings.device,
        options=settings.options(), num_processes=threads, threads=threads, plan_spacing=settings.plan_spacing)
    return Path(parties["coordinator"])


#: Structures of the learning curves (the large abdominal organs).
CURVE_STRUCTURES = ("Liver", "Spleen", "Kidney_L", "Kidney_R", "Stomach")


def _snapshots(model: Any, models_dir: Path, settings: TrainSettings) -> list[tuple[int, Path]]:
    """(iterations per site, weights file) of a trained model's learning-curve points, in training order.

    Every ``settings.curve_every`` iterations (from 0, the federated model's initial
    weights), and the last weights.
    """
    every = _all_snapshots(model, models_dir, settings)
    return [(i, f) for k, (i, f) in enumerate(every) if i % settings.curve_every == 0 or k == len(every) - 1]


def _all_snapshots(model: Any, models_dir: Path, settings: TrainSettings) -> list[tuple[int, Path]]:
    """(iterations per site, weights file) of every snapshot a trained model left, in training order."""
    import json

    work = models_dir / model.name
    if len(model.trained_on) == 1:
        out = []
        for f in sorted((work / "snapshots").glob("epoch_*.safetensors")):
            info = json.loads(f.with_name(f.name.replace(".safetensors", ".json")).read_text())
            out.append((int(info["iterations"]), f))
        return out
    # federated: the global weights each round started from (round 0: the initial weights), then the final ones
    if settings.engine == "flower":
        rounds = work / "flower" / "sites" / model.trained_on[0] / "rounds"
        final = work / "flower" / "server" / "final.safetensors"
    else:
        rounds = work / "parties" / model.trained_on[0] / "rounds"
        final = work / "parties" / "coordinator" / "final.safetensors"
    per_round = settings.local_epochs * settings.iterations
    out = [(r * per_round, rounds / f"global_{r:05d}.safetensors") for r in range(settings.rounds)]
    out.append((settings.rounds * per_round, final))
    return [(i, f) for i, f in out if f.is_file()]


def learning_curves(study: Any, models: dict[str, Path], models_dir: Path, out_dir: Path,
                    settings: TrainSettings, *, workers: int = 1) -> Any:
    """Validation DSC against training iterations for every trained model.

    Each model's weights after every epoch (local) or round (federated) predict the
    first ``settings.curve_cases`` test cases of each centre it was trained on; the
    DSC of :data:`CURVE_STRUCTURES` is written to ``out_dir/learning_curves.csv``
    (model, centre, iteration, case, structure, dsc) and drawn, as the median over
    cases of the mean over structures, in ``out_dir/learning_curves.png``. Returns
    the table (empty when ``curve_cases`` is 0).
    """
    import pandas as pd

    from oarbench.io import atomic_write_text, find_cases
    from oarbench.train.nnunet import snapshot_dsc

    columns = ["model", "centre", "iteration", "case", "structure", "dsc"]
    if settings.curve_cases == 0:
        return pd.DataFrame(columns=columns)
    values = {name: study.labels.value(name) for name in CURVE_STRUCTURES if name in study.labels.names}
    centres = {c.name: c for c in study.centres}
    jobs = []  # one per model and centre: a federated model's two centres are two jobs the workers share
    for order, model in enumerate(study.models):
        snaps = _snapshots(model, models_dir, settings)
        for centre_name in model.trained_on:
            centre = centres[centre_name]
            images, refs = find_cases(centre.images, images=True), find_cases(centre.reference)
            cases = [{"case": case, "centre": centre_name, "image": str(images[case]), "label": str(refs[case])}
                     for case in sorted(set(images) & set(refs))[: settings.curve_cases]]
            if snaps and cases:
                jobs.append((order, model.name, snaps, cases))
    # the largest jobs first, so that no worker is left with a long one at the end
    jobs.sort(key=lambda job: len(job[2]) * len(job[3]), reverse=True)
    threads = _threads_per_worker(workers)

    def score(job: tuple[int, str, list, list]) -> list[dict[str, Any]]:
        order, name, snaps, cases = job
        return [{"order": order, "model": name, **row} for row in snapshot_dsc(
            models[name], snaps, cases, values, configuration=settings.configuration, device=settings.device,
            threads=threads)]

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # each job predicts in its own process
        rows = [row for rows_of_job in pool.map(score, jobs) for row in rows_of_job]
    # the study's model order, then iterations; within an iteration the centres in the model's order
    rows.sort(key=lambda row: (row["order"], row["iteration"],
                               study.models[row["order"]].trained_on.index(row["centre"])))
    table = pd.DataFrame(rows, columns=columns)
    from oarbench.tables import csv_text

    atomic_write_text(out_dir / "learning_curves.csv", csv_text(table))
    if len(table):
        plot_learning_curves(table, out_dir / "learning_curves.png")
    return table


def plot_learning_curves(table: Any, path: Path) -> Path:
    """Median over cases of the mean DSC over structures, against iterations, per model and centre."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from oarbench.io import atomic_write_bytes

    per_case = table.groupby(["model", "centre", "iteration", "case"], as_index=False)["dsc"].mean()
    curve = per_case.groupby(["model", "centre", "iteration"], as_index=False)["dsc"].median()
    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=100)
    for (model, centre), g in curve.groupby(["model", "centre"]):
        g = g.sort_values("iteration")
        ax.plot(g["iteration"], g["dsc"], marker="o", markersize=3, label=f"{model} on {centre}")
    ax.set_xlabel("training iterations (per site)")
    ax.set_ylabel("validation DSC")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"mean DSC of {', '.join(sorted(set(table['structure'])))}", fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _predictor(folder: Path, settings: TrainSettings) -> Any:
    from oarbench.robustness.predictors import NnUNetModelPredictor

    return NnUNetModelPredictor(folder, folds=("all",), device=settings.device, use_mirroring=settings.mirroring)


def _threads_per_worker(workers: int) -> int | None:
    """CPU threads for each of ``workers`` processes sharing the machine (None: one worker, torch's default)."""
    import os

    return None if workers <= 1 else max(1, (os.cpu_count() or 1) // workers)


def _limit_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _predict_task(task: tuple[Path, TrainSettings, list[Path], Path, int | None]) -> int:
    """Predict ``images`` with one model into ``target`` (a process of :func:`predict_study`)."""
    folder, settings, images, target, threads = task
    _limit_threads(threads)
    _predictor(folder, settings).predict(images, target)
    return len(images)


def predict_study(study: Any, models: dict[str, Path], out_dir: Path, settings: TrainSettings,
                  *, force: bool = False, workers: int = 1) -> Path:
    """Predict every centre's test images with every trained model into
    ``out_dir/original/{model}/{centre}``; returns a study file whose predictions pattern
    ``out_dir/{condition}/{model}/{centre}`` also finds the robustness predictions.
    ``workers`` processes predict at once (one model and centre each)."""
    from oarbench.executors import LocalExecutor
    from oarbench.io import atomic_write_text, find_cases
    from oarbench.study import study_toml_text

    threads = _threads_per_worker(workers)
    tasks = []
    for model in study.models:
        for centre in study.centres:
            target = out_dir / "original" / model.name / centre.name
            images = find_cases(centre.images, images=True)
            have = set(find_cases(target)) if target.is_dir() and any(target.iterdir()) else set()
            todo = [p for c, p in sorted(images.items()) if force or c not in have]
            if todo:
                tasks.append((models[model.name], settings, todo, target, threads))
    LocalExecutor(workers).map(_predict_task, tasks)
    pattern = str(out_dir.resolve()) + "/{condition}/{model}/{centre}"
    return atomic_write_text(out_dir / "study.toml", study_toml_text(study, predictions=pattern,
                                                                     name=f"{study.name}-trained"))


def _robustness_task(task: tuple) -> Any:
    """Robustness of one model on one centre's cases (a process of :func:`run_study_robustness`)."""
    from oarbench.robustness.run import run_robustness

    folder, settings, images, refs, labels, tolerance_mm, names, save_to, threads = task
    _limit_threads(threads)
    study, centre, model = names
    return run_robustness(images, refs, _predictor(folder, settings), settings.conditions, labels,
                          tolerance_mm=tolerance_mm, study=study, centre=centre, model=model,
                          save_predictions=save_to, progress=False)


def run_study_robustness(study: Any, models: dict[str, Path], out_dir: Path, settings: TrainSettings,
                         *, workers: int = 1) -> Any:
    """Robustness of every trained model on the first test cases of each centre.

    Writes robustness.csv, noise_floor.csv and robustness_summary.csv into
    ``out_dir``; returns the combined table. ``workers`` processes run at once (one
    model and centre each).
    """
    from oarbench.executors import LocalExecutor
    from oarbench.io import find_cases
    from oarbench.robustness.run import combine, write_robustness

    threads = _threads_per_worker(workers)
    tasks = []
    for model in study.models:
        for centre in study.centres:
            images = find_cases(centre.images, images=True)
            refs = find_cases(centre.reference)
            cases = sorted(set(images) & set(refs))[: settings.robustness_cases]
            tasks.append((models[model.name], settings, {c: images[c] for c in cases}, {c: refs[c] for c in cases},
                          study.labels, study.tolerance_mm, (study.name, centre.name, model.name),
                          str(Path(model.root, model.predictions)), threads))
    result = combine(LocalExecutor(workers).map(_robustness_task, tasks))
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
    outputs_extra: dict[str, Path] = {}

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
        study_toml = predict_study(study, models, out_dir / "trained", train, force=force, workers=workers)
        study = load_study(study_toml)
        done()
        if train.curve_cases:
            done = step("learning curves")
            results.mkdir(parents=True, exist_ok=True)
            learning_curves(study, models, out_dir / "models", results, train, workers=workers)
            outputs_extra["learning_curves"] = results / "learning_curves.csv"
            done()

    done = step("evaluate")
    options = EvalOptions(labels=study.labels, tolerance_mm=study.tolerance_mm,
                          tolerances=tuple(sorted(study.tolerances_mm.items())))
    table, provenance = evaluate_jobs(jobs_from_study(study), options, results, workers=workers, force=force, progress=False)
    provenance["command"] = "demo"
    provenance["study"] = str(study_toml)
    observers = [o.name for o in study.observers]
    if observers:
        provenance["observers"] = observers
    write_outputs(results, table, provenance)
    done()

    outputs: dict[str, Path] = {"study": study_toml, "metrics": results / "metrics.csv", **outputs_extra}

    robustness = None
    if train is not None:
        done = step("robustness of the trained models")
        robustness = run_study_robustness(study, models, results, train, workers=workers)
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

    stats = run_stats(table, margins={"dsc": 0.01, "hd95": 1.0}, source=str(results / "metrics.csv"),
                      observers=observers)
    outputs["stats"] = write_stats(stats, results / "stats.csv")
    from oarbench.stats import methods_paragraph, paper_table, write_paper_outputs

    trained = {m.name: tuple(m.trained_on) for m in study.models if m.trained_on} or None
    paper = paper_table(table, stats, trained_on=trained, observers=observers)
    outputs.update(write_paper_outputs(results, paper, methods_paragraph(provenance, stats)))
    done()

    done = step("finding: local models on the other centre, federated model against local ones")
    from oarbench.finding import centre_shift_finding, finding_lines
    from oarbench.io import atomic_write_text

    finding = centre_shift_finding(stats, {m.name: m.trained_on for m in study.models if m.trained_on}, table=table)
    from oarbench.tables import csv_text

    outputs["finding"] = atomic_write_text(results / "finding.csv", csv_text(finding))
    notes = finding_lines(finding)
    for line in notes:
        log(f"[demo]   {line}")
    done()

    done = step("gallery")
    from oarbench.gallery import FailureCriteria, PathResolver, build_gallery

    gallery_table = table
    if robustness is not None:
        # Perturbed conditions join the table so that their largest drops are drawn too.
        gallery_table = pd.concat([table, robustness[robustness["condition"] != "original"]], ignore_index=True)
    criteria = FailureCriteria(k=gallery_k)
    build_gallery(gallery_table, PathResolver.from_study(study_toml), results / "gallery", criteria=criteria,
                  source=str(results / "metrics.csv"), workers=workers)
    outputs["gallery"] = results / "gallery"
    done()

    done = step("report")
    from oarbench.report import ReportOptions, build_report
    from oarbench.report.context import record_notes

    summary_csv = results / "robustness_summary.csv"
    outputs["report"] = build_report(
        results,
        table,
        stats=stats,
        absent=absent.cases,
        absent_pairs=absent.pairs,
        robustness=robustness,
        noise_floor=results / "noise_floor.csv" if (robustness is not None and (results / "noise_floor.csv").is_file()) else None,
        robustness_summary=summary_csv if (robustness is not None and summary_csv.is_file()) else None,
        section_notes=record_notes(provenance),
        options=ReportOptions(criteria=criteria, trained_on={m.name: m.trained_on for m in study.models if m.trained_on},
                              models=[m.name for m in study.models]),
        gallery_dir=results / "gallery",
        provenance={**provenance, "demo_step_seconds": timings},
        title="oarbench demo: synthetic two-centre paediatric study",
    )
    done()
    return outputs
