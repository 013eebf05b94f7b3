"""nnU-Net steps run in a child process: ``python -m oarbench.train._worker SPEC.json``.

nnU-Net reads ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` from
the environment, so :mod:`oarbench.train.nnunet` starts this module with an
explicit environment per call and never changes the caller's. The spec is a
JSON object ``{"step": ..., "result": path, ...}``; the step writes its
result as JSON to ``result``. Everything here runs under
``if __name__ == "__main__"`` because nnU-Net spawns worker processes that
re-import the main module.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _load_json(path: str | Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def _save_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def _save_arrays(arrays: dict, path: str) -> None:
    from safetensors.numpy import save_file

    tmp = path + ".tmp"
    save_file(arrays, tmp)
    os.replace(tmp, path)


def _load_arrays(path: str) -> dict:
    from safetensors.numpy import load_file

    return dict(load_file(path))


def step_verify(spec: dict) -> dict:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(spec["raw_dataset"], spec["num_processes"])
    return {"ok": True}


def step_fingerprint(spec: dict) -> dict:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    t0 = time.perf_counter()
    fpe = DatasetFingerprintExtractor(spec["dataset"], spec["num_processes"], verbose=False)
    fingerprint = json.loads(json.dumps(fpe.run(overwrite_existing=True), default=float))
    _record_harmonisation(spec["dataset"], fingerprint)
    return {"fingerprint": fingerprint, "seconds": time.perf_counter() - t0}


def _record_harmonisation(dataset: str, fingerprint: dict) -> None:
    """Add what harmonisation did (and the orientation the cases are in) to the stored fingerprint."""
    from oarbench.train.harmonise import PLANS_KEY, dataset_record, record_summary

    record = dataset_record(Path(os.environ["nnUNet_raw"]) / dataset)
    fingerprint["oarbench_harmonisation"] = record_summary(record)
    if record is not None:
        fingerprint[PLANS_KEY] = record["canonical"]
    _save_json(fingerprint, Path(os.environ["nnUNet_preprocessed"]) / dataset / "dataset_fingerprint.json")


def step_plan(spec: dict) -> dict:
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from oarbench.train.harmonise import PLANS_KEY

    planner = ExperimentPlanner(spec["dataset"], plans_name=spec.get("plans_name", "nnUNetPlans"))
    record = None
    if spec.get("spacing_groups"):
        record = _finest_site_spacing(planner, spec["spacing_groups"])
    plans = json.loads(json.dumps(planner.plan_experiment(), default=float))
    pre = Path(os.environ["nnUNet_preprocessed"]) / spec["dataset"]
    orientation = _load_json(pre / "dataset_fingerprint.json").get(PLANS_KEY)
    if orientation:
        # the orientation the cases were brought to travels with the plans into every model folder
        plans[PLANS_KEY] = orientation
    if record is not None:
        plans[SPACING_KEY] = record
    if orientation or record is not None:
        _save_json(plans, pre / f"{spec.get('plans_name', 'nnUNetPlans')}.json")
    return {"plans": plans}


#: plans.json key recording how a federation's target spacing was chosen.
SPACING_KEY = "oarbench_target_spacing"


def _finest_site_spacing(planner: Any, groups: list) -> dict:
    """Set the planner's target spacing to the finest of the sites' own targets, axis by axis.

    ``groups``: ``[[site, cases], ...]`` in the order the merged fingerprint lists
    the sites' cases. Each site's target is what nnU-Net's rule
    (``determine_fullres_target_spacing``: the median, or the 10th percentile on a
    much coarser axis) gives for that site's cases alone, so a federation of one
    site plans exactly as that site would on its own.
    """
    import numpy as np

    full = planner.dataset_fingerprint
    per_site: dict[str, list[float]] = {}
    start = 0
    for site, n in groups:
        planner.dataset_fingerprint = dict(full, spacings=full["spacings"][start:start + int(n)],
                                           shapes_after_crop=full["shapes_after_crop"][start:start + int(n)])
        per_site[str(site)] = [float(v) for v in planner.determine_fullres_target_spacing()]
        start += int(n)
    if start != len(full["spacings"]):
        raise ValueError(f"the sites' case counts add up to {start}, the fingerprint lists {len(full['spacings'])}")
    planner.dataset_fingerprint = full
    target = [float(v) for v in np.min(np.array(list(per_site.values())), axis=0)]
    planner.overwrite_target_spacing = target
    return {"policy": "finest", "sites": per_site, "target": target}


def step_preprocess(spec: dict) -> dict:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    t0 = time.perf_counter()
    preprocess_dataset(
        spec["dataset_id"],
        spec["plans_name"],
        configurations=spec["configurations"],
        num_processes=[spec["num_processes"]] * len(spec["configurations"]),
        verbose=False,
        show_progress_bar=False,
    )
    return {"seconds": time.perf_counter() - t0}


def _build_network(plans: dict, dataset_json: dict, configuration: str, deep_supervision: bool):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    net = nnUNetTrainer.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=deep_supervision)
    return net, pm, cm


def step_init_weights(spec: dict) -> dict:
    import torch

    from oarbench.train.trainer import state_to_arrays

    torch.manual_seed(int(spec["seed"]))
    net, _, _ = _build_network(_load_json(spec["plans"]), _load_json(spec["dataset_json"]), spec["configuration"], True)
    arrays = state_to_arrays(net.state_dict())
    _save_arrays(arrays, spec["out"])
    return {"tensors": len(arrays), "parameters": int(sum(a.size for a in arrays.values()))}


def _seed_data(seed: int, epoch: int) -> None:
    """Seed every generator the data loader and augmentation draw from (numpy's global one for patch
    sampling, torch's, Python's) from the run's seed and the epoch this call starts at: a repeated call
    draws the same patches, and each federated round (a new process) draws new ones."""
    import random

    import numpy as np
    import torch

    state = int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])
    random.seed(state)
    np.random.seed(state)
    torch.manual_seed(state)


def step_train(spec: dict) -> dict:
    import torch

    from oarbench.train.trainer import OarbenchTrainer, arrays_to_state, reduce_width, state_to_arrays

    torch.manual_seed(int(spec.get("seed", 0)))
    pre = Path(os.environ["nnUNet_preprocessed"]) / spec["dataset"]
    plans = reduce_width(_load_json(pre / f"{spec['plans_name']}.json"), spec["configuration"], spec["width"])
    if spec.get("batch_size"):
        plans["configurations"][spec["configuration"]]["batch_size"] = int(spec["batch_size"])
    dataset_json = _load_json(pre / "dataset.json")
    fold = spec["fold"]
    fold = fold if fold == "all" else int(fold)
    resume_from = spec.get("resume_from")
    plans["continue_training"] = bool(resume_from)
    trainer = OarbenchTrainer(plans, spec["configuration"], fold, dataset_json, torch.device(spec["device"]))
    trainer.configure(
        num_epochs=spec["epochs"],
        iterations_per_epoch=spec["iterations"],
        val_iterations_per_epoch=spec["val_iterations"],
        stop_after_epoch=spec.get("stop_after_epoch"),
        save_every=spec.get("save_every"),
        augmentation=spec.get("augmentation", "default"),
        initial_lr=spec.get("initial_lr"),
        snapshot_dir=spec.get("snapshot_dir"),
        optimizer=spec.get("optimizer", "sgd"),
        foreground_oversampling=spec.get("foreground_oversampling"),
        pseudo_dice=spec.get("pseudo_dice", True),
        precision=spec.get("precision", "fp32"),
        warmup=int(spec.get("warmup", 0)),
    )
    trainer.initialize()
    if resume_from:
        trainer.load_checkpoint(resume_from)
        if spec.get("optimizer_state", "kept") == "reset":
            # a fresh optimizer (no momentum or moments); the epoch counter and poly schedule continue
            trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
        elif spec.get("optimizer_state") == "momentum_reset":
            # the first moment only: AdamW's step count and second moment (its step sizes) stay
            for state in trainer.optimizer.state.values():
                for key in ("exp_avg", "momentum_buffer"):
                    if state.get(key) is not None:
                        state[key].zero_()
    if spec.get("initial_weights"):
        state = arrays_to_state(_load_arrays(spec["initial_weights"]), trainer.network)
        trainer.network.load_state_dict(state)
    start_epoch = trainer.current_epoch
    _seed_data(int(spec.get("seed", 0)), start_epoch)
    t0 = time.perf_counter()
    trainer.run_training()
    seconds = time.perf_counter() - t0
    iterations = (trainer.current_epoch - start_epoch) * trainer.num_iterations_per_epoch
    if spec.get("weights_out"):
        _save_arrays(state_to_arrays(trainer.network.state_dict()), spec["weights_out"])
    if spec.get("validate"):
        trainer.perform_actual_validation(False)
    return {
        "model_folder": trainer.output_folder_base,
        "fold_folder": trainer.output_folder,
        "checkpoint": str(Path(trainer.output_folder) / "checkpoint_final.pth"),
        "epochs_done": trainer.current_epoch,
        "seconds": seconds,
        "iterations": iterations,
        "num_cases": len(trainer.get_tr_and_val_datasets()[0].identifiers),
        "step_seconds": float(getattr(trainer, "step_seconds", 0.0)),
        "precision": trainer.precision,
    }


def step_write_model(spec: dict) -> dict:
    """A normal nnU-Net model folder from plans, dataset.json and weights."""
    import torch

    from oarbench.train.trainer import arrays_to_state

    plans = _load_json(spec["plans"])
    dataset_json = _load_json(spec["dataset_json"])
    configuration, fold = spec["configuration"], spec["fold"]
    net, _, cm = _build_network(plans, dataset_json, configuration, False)
    state = arrays_to_state(_load_arrays(spec["weights"]), net)
    net.load_state_dict(state)
    out = Path(spec["out"])
    (out / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    _save_json(plans, out / "plans.json")
    _save_json(dataset_json, out / "dataset.json")
    mirror = tuple(range(len(cm.patch_size)))  # nnUNetTrainer mirrors every spatial axis (2D: 0,1; 3D: 0,1,2)
    ckpt = {
        "network_weights": net.state_dict(),
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": None,
        "_best_ema": None,
        "current_epoch": int(spec.get("epochs", 0)),
        "init_args": {"plans": plans, "configuration": configuration, "fold": fold, "dataset_json": dataset_json,
                      "device": "cpu"},
        "trainer_name": "nnUNetTrainer",
        "oarbench_trainer": "federated",
        "inference_allowed_mirroring_axes": mirror,
    }
    target = out / f"fold_{fold}" / "checkpoint_final.pth"
    tmp = target.with_name(".checkpoint_final.pth.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, target)
    return {"model_folder": str(out)}


def step_predict(spec: dict) -> dict:
    # The model folder is loaded by the robustness predictor: one place builds
    # nnU-Net's network from plans.json and the checkpoints.
    from oarbench.robustness.predictors import NnUNetModelPredictor

    fold = spec["fold"]
    fold = fold if fold == "all" else int(fold)
    model = NnUNetModelPredictor(
        Path(spec["model_folder"]), folds=(fold,), device=spec["device"], use_mirroring=bool(spec["mirroring"])
    )
    ending = _load_json(Path(spec["model_folder"]) / "dataset.json").get("file_ending", ".nii.gz")
    images = sorted(p for p in Path(spec["input_folder"]).iterdir()
                    if p.name.endswith("_0000" + ending) and not p.name.startswith("."))
    t0 = time.perf_counter()
    if images:
        # harmonised models predict in their canonical orientation, mapped back to each input's grid
        model.predict(images, Path(spec["output_folder"]))
    return {"seconds": time.perf_counter() - t0}


def step_curve(spec: dict) -> dict:
    """DSC of a series of weight files on a few labelled cases (learning curves).

    spec: ``model_folder`` (plans.json, dataset.json), ``snapshots`` (list of
    ``{"weights": file, "iteration": n}``), ``cases`` (list of ``{"case", "centre",
    "image", "label"}``), ``structures`` (name -> label value), ``device``.
    Returns ``rows``: one per snapshot, case and structure present in the reference.
    """
    import numpy as np
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from oarbench.train.trainer import arrays_to_state

    folder = Path(spec["model_folder"])
    plans, dataset_json = _load_json(folder / "plans.json"), _load_json(folder / "dataset.json")
    configuration = spec["configuration"]
    net, pm, cm = _build_network(plans, dataset_json, configuration, False)
    device = torch.device(spec["device"])
    io = SimpleITKIO()
    oriented = plans.get("oarbench_orientation")  # trained on harmonised cases: score them in that orientation
    cases = []
    with tempfile.TemporaryDirectory(prefix="oarbench-curve-cases-") as tmp:
        for k, c in enumerate(spec["cases"]):
            files = [c["image"], c["label"]]
            if oriented:
                from oarbench.io import read_volume, write_volume
                from oarbench.train.harmonise import to_canonical

                files = [str(write_volume(to_canonical(read_volume(f), f), Path(tmp) / f"{k}_{i}.nii.gz"))
                         for i, f in enumerate(files)]
            image, props = io.read_images([files[0]])
            cases.append((c, image, props, io.read_seg(files[1])[0][0]))
    rows = []
    for snap in spec["snapshots"]:
        net.load_state_dict(arrays_to_state(_load_arrays(snap["weights"]), net))
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(net, pm, cm, [net.state_dict()], dataset_json, "nnUNetTrainer", None)
        for c, image, props, ref in cases:
            seg = np.asarray(predictor.predict_single_npy_array(image, props, None, None, False))
            for name, value in spec["structures"].items():
                r, p = ref == value, seg == value
                nr = int(r.sum())
                if nr == 0:
                    continue
                rows.append({"iteration": int(snap["iteration"]), "centre": c["centre"], "case": c["case"],
                             "structure": name, "dsc": 2.0 * float((r & p).sum()) / (nr + float(p.sum()))})
    return {"rows": rows}


def step_plan_and_preprocess(spec: dict) -> dict:
    """verify (optional) + fingerprint + plan + preprocess in one process (nnU-Net's import costs seconds)."""
    import torch

    torch.set_num_threads(max(1, int(spec["num_processes"])))
    raw = Path(os.environ["nnUNet_raw"]) / spec["dataset"]
    t0 = time.perf_counter()
    if spec.get("verify"):
        step_verify({"raw_dataset": str(raw), "num_processes": spec["num_processes"]})
    fp = step_fingerprint(spec)["fingerprint"]
    plans = step_plan(spec)["plans"]
    step_preprocess(spec)
    return {"fingerprint": fp, "plans": plans, "seconds": time.perf_counter() - t0}


STEPS = {
    "plan_and_preprocess": step_plan_and_preprocess,
    "verify": step_verify,
    "fingerprint": step_fingerprint,
    "plan": step_plan,
    "preprocess": step_preprocess,
    "init_weights": step_init_weights,
    "train": step_train,
    "write_model": step_write_model,
    "predict": step_predict,
    "curve": step_curve,
}


#: Steps a step server (:func:`serve`) runs: a federated site's rounds, one after another.
SERVED_STEPS = ("train",)


def serve(socket_path: str) -> int:
    """Run training steps sent over a Unix socket, one at a time, until the parent ends.

    A client connects, sends one line (the path of a spec JSON file), and reads one
    line back: ``ok`` once the step's result is written, or ``error ...``. Each step
    builds its trainer and seeds its generators as a fresh worker process does; what
    the server saves is the imports (Python, torch, nnU-Net: seconds of CPU per
    round). After a failed step the server ends (a step that raised may leave state
    behind); clients then fall back to a fresh process. The socket is created
    readable by this user only; the server ends when its parent process does or on
    a ``quit`` line.
    """
    import gc
    import socket
    import traceback

    import torch  # noqa: F401  (the imports a step needs, paid once, before the first client)

    from oarbench.train import trainer  # noqa: F401

    parent = os.getppid()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        srv.bind(socket_path)
    finally:
        os.umask(old)
    srv.listen(1)
    srv.settimeout(1.0)
    try:
        while os.getppid() == parent:
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(None)
                line = conn.makefile("r").readline().strip()
                if line == "quit":
                    return 0
                if not line:
                    continue
                try:
                    spec = _load_json(line)
                    if spec.get("step") not in SERVED_STEPS:
                        raise ValueError(f"step {spec.get('step')!r} is not served (only {', '.join(SERVED_STEPS)})")
                    _save_json(STEPS[spec["step"]](spec), spec["result"])
                    # a step's trainer holds reference cycles (network, optimizer, data loaders): free them
                    # now, or every round's stay in memory until a full collection and slow the next rounds
                    gc.collect()
                except Exception as exc:  # reported to the client in one line, the traceback to the log
                    traceback.print_exc()
                    sys.stdout.flush()
                    message = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:2000]
                    conn.sendall(f"error {message}\n".encode())
                    return 1
                sys.stdout.flush()
                conn.sendall(b"ok\n")
        return 0
    finally:
        srv.close()
        try:
            os.unlink(socket_path)
        except OSError:
            pass
        # tells clients at once that no server will listen here again
        Path(os.path.dirname(socket_path), "ended").touch()


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--serve":
        return serve(argv[1])
    if len(argv) != 1:
        print("usage: python -m oarbench.train._worker SPEC.json | --serve SOCKET", file=sys.stderr)
        return 2
    spec = _load_json(argv[0])
    result = STEPS[spec["step"]](spec)
    _save_json(result, spec["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
