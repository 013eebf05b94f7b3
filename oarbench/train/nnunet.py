"""nnU-Net v2 driven with explicit paths: verify, fingerprint, plan, preprocess, train, predict.

Every nnU-Net step runs in a child process (``python -m
oarbench.train._worker``) whose environment is built per call from a
:class:`NnunetPaths`; the caller's ``os.environ`` is never changed. Inside the
child nnU-Net is driven in-process (the trainer class is imported, the
predictor built with ``manual_initialization``), never through nnU-Net's
trainer lookup by name, which imports every trainer module (and so
torchvision) and fails where torchvision is broken.

Folder conventions are nnU-Net's: ``<raw>/DatasetXXX_Name/{dataset.json,
imagesTr, labelsTr}``, ``<preprocessed>/DatasetXXX_Name/``, and model folders
``<results>/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/`` with
``dataset.json``, ``plans.json`` and ``fold_<f>/checkpoint_final.pth``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from oarbench.train._plans import check_warmup

__all__ = [
    "NnunetPaths",
    "StepServer",
    "TrainResult",
    "TrainerOptions",
    "nnunet_env",
    "dataset_name",
    "link_dataset",
    "verify_dataset",
    "extract_fingerprint",
    "plan_and_preprocess",
    "plan_from_fingerprint",
    "install_plans",
    "preprocess",
    "initial_weights",
    "train",
    "write_model_folder",
    "predict",
    "train_local",
    "snapshot_dsc",
    "NnunetSiteTraining",
]

_DATASET_RE = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_\-]+$")


def _require_nnunet() -> None:
    import importlib.util

    from oarbench._optional import MissingDependencyError, missing_message

    for module in ("torch", "nnunetv2"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(missing_message(module, "nnU-Net training"))


@dataclass(frozen=True)
class NnunetPaths:
    """nnU-Net's three folders, passed explicitly."""

    raw: Path
    preprocessed: Path
    results: Path

    @classmethod
    def under(cls, root: str | Path) -> "NnunetPaths":
        """``root/nnUNet_raw``, ``root/nnUNet_preprocessed``, ``root/nnUNet_results``."""
        root = Path(root)
        return cls(root / "nnUNet_raw", root / "nnUNet_preprocessed", root / "nnUNet_results")

    def make(self) -> "NnunetPaths":
        for p in (self.raw, self.preprocessed, self.results):
            p.mkdir(parents=True, exist_ok=True)
        return self


def nnunet_env(paths: NnunetPaths, *, base: Mapping[str, str] | None = None, threads: int | None = None,
               training: bool = False) -> dict[str, str]:
    """Environment for one nnU-Net child process (a new dict; ``base`` defaults to a copy of os.environ).

    Sets the three nnU-Net folders, ``nnUNet_def_n_proc=1``,
    ``nnUNet_compile=false`` and ``nnUNet_n_proc_DA``: 0 for training (data
    augmentation in the training process, no worker processes), 1 otherwise
    (the planner passes it to ``torch.set_num_threads``, which refuses 0).
    """
    env = dict(os.environ if base is None else base)
    env.update(
        nnUNet_raw=str(Path(paths.raw).resolve()),
        nnUNet_preprocessed=str(Path(paths.preprocessed).resolve()),
        nnUNet_results=str(Path(paths.results).resolve()),
        nnUNet_n_proc_DA="0" if training else "1",
        nnUNet_def_n_proc="1",
        nnUNet_compile="false",
        PYTHONUNBUFFERED="1",
    )
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


class StepServer:
    """One child process that runs a site's training steps one after another (:func:`_worker.serve`).

    A federated site trains once per round. In a fresh process per round every
    round pays Python's, torch's and nnU-Net's imports again (about 5 s of CPU on
    a 2-core machine, against about 25 s of training in the demo's quick schedule).
    The server pays them once. Every step still builds its trainer and seeds its
    generators as a fresh process does, so the weights are the same bit for bit
    (tests/test_train_nnunet.py::test_step_server_trains_the_same_weights_as_fresh_processes).

    ``socket``: the Unix socket's path (in a new folder only this user can
    enter), for :func:`train` (``server=``) or a Flower SuperNode's node config.
    Use as a context manager, or call :meth:`close`; the server also ends when
    the process that started it does.
    """

    def __init__(self, paths: NnunetPaths, *, threads: int | None = None, log_file: Path | None = None) -> None:
        _require_nnunet()
        self._dir = tempfile.mkdtemp(prefix="oarbench-steps-")
        self.socket = os.path.join(self._dir, "socket")
        out = open(log_file, "a") if log_file else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oarbench.train._worker", "--serve", self.socket],
                env=nnunet_env(paths, training=True, threads=threads), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        finally:
            if log_file:
                out.close()

    def close(self) -> None:
        """End the server (it finishes the step it is running first only if that step ends within 5 s)."""
        import shutil

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "StepServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _write_spec(folder: Path, step: str, spec: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write a worker step's spec file in ``folder``; (spec file, the result file the worker will write)."""
    spec_path, result_path = folder / "spec.json", folder / "result.json"
    spec_path.write_text(json.dumps(dict(spec, step=step, result=str(result_path))))
    return spec_path, result_path


#: Seconds a client waits for a step server to start listening before it trains in a fresh process.
SERVER_START_S = 120.0


def _call_server(server: str, step: str, spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """Run ``step`` in the step server at socket ``server``; its result, or None when no server answers.

    None (the caller runs the step in a fresh process instead): the socket did not
    appear within :data:`SERVER_START_S`, or refused the connection (the server
    ended). A server that took the step and failed raises RuntimeError.
    """
    import socket

    deadline = time.monotonic() + SERVER_START_S
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        while True:
            try:
                sock.connect(server)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                folder = os.path.dirname(server)
                if (not os.path.isdir(folder) or os.path.exists(os.path.join(folder, "ended"))
                        or time.monotonic() > deadline):
                    return None
                time.sleep(0.1)
        with tempfile.TemporaryDirectory(prefix="oarbench-nnunet-") as tmp:
            spec_path, result_path = _write_spec(Path(tmp), step, spec)
            sock.sendall(f"{spec_path}\n".encode())
            reply = sock.makefile("r").readline().strip()
            if reply == "ok":
                return json.loads(result_path.read_text())
            if reply.startswith("error "):
                raise RuntimeError(f"nnU-Net step {step!r} failed: {reply[6:]}")
            raise RuntimeError(f"nnU-Net step {step!r}: the step server ended during the step (killed?)")
    finally:
        sock.close()


def _run(step: str, paths: NnunetPaths, spec: Mapping[str, Any], *, log_file: Path | None = None,
         threads: int | None = None, server: str | None = None) -> dict[str, Any]:
    """Run one worker step in a child process (``threads``: its CPU threads); return its JSON result.

    ``server``: the socket of a :class:`StepServer` started for the same folders and
    threads, which runs the step instead when it answers (its output goes to the
    server's log).
    """
    _require_nnunet()
    if server:
        result = _call_server(server, step, spec)
        if result is not None:
            return result
    with tempfile.TemporaryDirectory(prefix="oarbench-nnunet-") as tmp:
        spec_path, result_path = _write_spec(Path(tmp), step, spec)
        out = open(log_file, "a") if log_file else None
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "oarbench.train._worker", str(spec_path)],
                env=nnunet_env(paths, training=step == "train", threads=threads),
                stdout=out if out else subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
            )
        finally:
            if out:
                out.close()
        if proc.returncode != 0:
            tail = (proc.stdout or "")[-4000:] if not log_file else f"see {log_file}"
            raise RuntimeError(f"nnU-Net step {step!r} failed (exit {proc.returncode}): {tail}")
        return json.loads(result_path.read_text())


def dataset_name(dataset_dir: str | Path) -> str:
    """The nnU-Net dataset name (``DatasetXXX_Name``) of a raw dataset folder."""
    name = Path(dataset_dir).name
    if not _DATASET_RE.match(name):
        raise ValueError(f"{dataset_dir}: folder name must be DatasetXXX_Name (nnU-Net v2 raw dataset)")
    return name


def _dataset_id(name: str) -> int:
    return int(name[7:10])


def _check_raw_dataset(dataset_dir: Path) -> dict[str, Any]:
    ds = dataset_dir / "dataset.json"
    if not ds.is_file():
        raise FileNotFoundError(f"{ds}: dataset.json not found (expected an nnU-Net v2 raw dataset folder)")
    try:
        meta = json.loads(ds.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ds}: not valid JSON ({exc})") from exc
    for key in ("labels", "channel_names", "file_ending", "numTraining"):
        if key not in meta:
            raise ValueError(f"{ds}: missing required key {key!r}")
    if "dataset" not in meta and not (dataset_dir / "imagesTr").is_dir():
        raise FileNotFoundError(f"{dataset_dir}/imagesTr: folder not found")
    _check_images(dataset_dir, str(meta["file_ending"]))
    return meta


def _check_images(dataset_dir: Path, file_ending: str) -> None:
    """Refuse incomplete or NaN-holding images before nnU-Net reads them (it would read them as 0)."""
    from oarbench.io import check_image_file

    for sub in ("imagesTr", "labelsTr"):
        folder = dataset_dir / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.endswith(file_ending) and not path.name.startswith("."):
                if path.is_symlink() and not path.exists():
                    raise ValueError(f"{path}: broken symbolic link (points to {os.readlink(path)})")
                check_image_file(path)


def link_dataset(dataset_dir: str | Path, paths: NnunetPaths, *, harmonise: bool = True) -> str:
    """Make ``dataset_dir`` visible under ``paths.raw`` (a symlink) and return its dataset name.

    With ``harmonise`` (the default) the link points to a copy with every
    training case in the canonical orientation
    (:func:`oarbench.train.harmonise.harmonise_dataset`, written next to
    ``paths.raw`` under ``harmonised/``); without it, to ``dataset_dir`` as stored.
    """
    src = Path(dataset_dir).resolve()
    name = dataset_name(src)
    _check_raw_dataset(src)
    paths.make()
    if harmonise:
        from oarbench.train.harmonise import harmonise_dataset

        src = harmonise_dataset(src, Path(paths.raw).parent / "harmonised").resolve()
    dst = Path(paths.raw) / name
    if dst.is_symlink() or dst.exists():
        if dst.resolve() != src:
            raise ValueError(f"{dst}: already holds another dataset ({dst.resolve()}), not {src}")
    else:
        dst.symlink_to(src, target_is_directory=True)
    return name


def verify_dataset(paths: NnunetPaths, name: str, *, num_processes: int = 2) -> None:
    """nnU-Net's dataset integrity check (file names, geometry, label values)."""
    _run("verify", paths, {"raw_dataset": str(Path(paths.raw) / name), "num_processes": num_processes})


def extract_fingerprint(paths: NnunetPaths, name: str, *, num_processes: int = 2) -> dict[str, Any]:
    """Compute (and store in ``preprocessed``) the dataset fingerprint; return it."""
    return _run("fingerprint", paths, {"dataset": name, "num_processes": num_processes})["fingerprint"]


def _spacing_groups(groups: Sequence[tuple[str, int]]) -> list[list[Any]]:
    return [[str(site), int(n)] for site, n in groups]


def plan(paths: NnunetPaths, name: str, *, plans_name: str = "nnUNetPlans",
         spacing_groups: Sequence[tuple[str, int]] | None = None) -> dict[str, Any]:
    """Run nnU-Net's default ExperimentPlanner on the stored fingerprint; return the plans.

    ``spacing_groups`` (``(site, cases)`` in the fingerprint's case order): plan at
    the finest of the sites' own target spacings, axis by axis, instead of the
    median over all cases (plans.json ``oarbench_target_spacing`` records both).
    """
    spec: dict[str, Any] = {"dataset": name, "plans_name": plans_name}
    if spacing_groups:
        spec["spacing_groups"] = _spacing_groups(spacing_groups)
    return _run("plan", paths, spec)["plans"]


def preprocess(paths: NnunetPaths, name: str, *, plans_name: str = "nnUNetPlans",
               configurations: tuple[str, ...] = ("3d_fullres",), num_processes: int = 2) -> float:
    """Preprocess ``configurations`` with an existing plans file; return seconds taken."""
    res = _run("preprocess", paths, {"dataset_id": _dataset_id(name), "plans_name": plans_name,
                                     "configurations": list(configurations), "num_processes": num_processes})
    return float(res["seconds"])


def plan_and_preprocess(paths: NnunetPaths, name: str, *, configurations: tuple[str, ...] = ("3d_fullres",),
                        num_processes: int = 2, verify: bool = True,
                        spacing_groups: Sequence[tuple[str, int]] | None = None) -> dict[str, Any]:
    """``nnUNetv2_plan_and_preprocess -d ID -c CONFIG -np N -npfp N [--verify_dataset_integrity]``.

    ``spacing_groups``: as :func:`plan` (cases in nnU-Net's order, sorted by name).
    """
    spec: dict[str, Any] = {
        "dataset": name, "dataset_id": _dataset_id(name), "plans_name": "nnUNetPlans", "verify": bool(verify),
        "configurations": list(configurations), "num_processes": num_processes}
    if spacing_groups:
        spec["spacing_groups"] = _spacing_groups(spacing_groups)
    res = _run("plan_and_preprocess", paths, spec)
    return res["plans"]


def plan_from_fingerprint(fingerprint: Mapping[str, Any], dataset_header: Mapping[str, Any], *, name: str,
                          plans_name: str = "nnUNetPlans",
                          spacing_groups: Sequence[tuple[str, int]] | None = None) -> dict[str, Any]:
    """Plans from a (merged) fingerprint and a dataset.json header, without any image.

    Used by the federated coordinator. The planner gets a raw dataset folder
    holding only a dataset.json (reader fixed to SimpleITKIO, a placeholder
    case list it never opens) and the fingerprint. ``spacing_groups``: as :func:`plan`.
    """
    with tempfile.TemporaryDirectory(prefix="oarbench-plan-") as tmp:
        paths = NnunetPaths.under(tmp).make()
        raw = Path(paths.raw) / name
        raw.mkdir()
        ending = dataset_header["file_ending"]
        meta = dict(dataset_header)
        meta.setdefault("overwrite_image_reader_writer", "SimpleITKIO")
        meta["dataset"] = {"placeholder": {"images": [f"placeholder_0000{ending}"], "label": f"placeholder{ending}"}}
        (raw / "dataset.json").write_text(json.dumps(meta))
        pre = Path(paths.preprocessed) / name
        pre.mkdir()
        (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
        return plan(paths, name, plans_name=plans_name, spacing_groups=spacing_groups)


def install_plans(paths: NnunetPaths, name: str, plans: Mapping[str, Any], *, plans_name: str = "nnUNetPlans",
                  fingerprint: Mapping[str, Any] | None = None) -> Path:
    """Write externally made plans (e.g. the federation's) for a local dataset; return the plans file.

    The plans' ``dataset_name`` is set to ``name`` and ``plans_name`` to
    ``plans_name``; the local dataset.json is copied next to them as nnU-Net's
    planner would. The fingerprint (local one by default) is stored too.
    """
    from oarbench.train.harmonise import PLANS_KEY, dataset_record

    record = dataset_record(Path(paths.raw) / name)
    mine = record["canonical"] if record else None
    if plans.get(PLANS_KEY) != mine:
        raise ValueError(f"{Path(paths.raw) / name}: the plans are for cases in orientation "
                         f"{plans.get(PLANS_KEY) or 'as stored'}, this dataset is "
                         f"{'harmonised to ' + mine if mine else 'used as stored'} (all sites must use the "
                         "same harmonisation setting)")
    pre = Path(paths.preprocessed) / name
    pre.mkdir(parents=True, exist_ok=True)
    out = dict(plans, dataset_name=name, plans_name=plans_name)
    target = pre / f"{plans_name}.json"
    _atomic_text(target, json.dumps(out, indent=1))
    _atomic_text(pre / "dataset.json", (Path(paths.raw) / name / "dataset.json").read_text())
    if fingerprint is not None:
        _atomic_text(pre / "dataset_fingerprint.json", json.dumps(fingerprint))
    return target


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _atomic_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def initial_weights(plans: Mapping[str, Any], dataset_json: Mapping[str, Any], out: str | Path, *,
                    configuration: str = "3d_fullres", width: str = "default", seed: int = 0) -> Path:
    """Freshly initialised network weights (safetensors, one entry per distinct tensor) for the plans."""
    from oarbench.train._plans import reduce_width

    with tempfile.TemporaryDirectory(prefix="oarbench-init-") as tmp:
        p = Path(tmp) / "plans.json"
        d = Path(tmp) / "dataset.json"
        p.write_text(json.dumps(reduce_width(plans, configuration, width)))
        d.write_text(json.dumps(dataset_json))
        _run("init_weights", NnunetPaths.under(tmp), {"plans": str(p), "dataset_json": str(d), "out": str(out),
                                                       "configuration": configuration, "seed": seed})
    return Path(out)


#: What a federated site does with its optimizer state between rounds (:class:`TrainerOptions`).
OPTIMIZER_STATES = ("kept", "reset", "momentum_reset")


@dataclass(frozen=True)
class TrainerOptions:
    """Trainer settings beyond the schedule length (``None``: nnU-Net's own).

    Attributes
    ----------
    augmentation: ``"default"`` (nnU-Net's) or ``"light"`` (small rotations and
        scaling only, no mirroring; :class:`oarbench.train.trainer.OarbenchTrainer`).
    initial_lr: start of the poly learning-rate schedule (nnU-Net: 0.01).
    batch_size: patches per iteration (nnU-Net: from the plans).
    optimizer: ``"sgd"`` (nnU-Net's) or ``"adam"`` (AdamW).
    foreground_oversampling: share of patches centred on a structure (nnU-Net: 0.33).
    harmonise: bring every training case to the canonical orientation first
        (:mod:`oarbench.train.harmonise`; default on); ``False`` trains on the
        arrays as stored, as nnU-Net does.
    optimizer_state: federated rounds: ``"kept"`` (each site resumes its own optimizer state,
        SGD momentum or AdamW moments, from its checkpoint of the previous round) or
        ``"reset"`` (a fresh optimizer every round; the epoch counter and the learning-rate
        schedule still continue) or ``"momentum_reset"`` (kept, but the first moment, AdamW's
        ``exp_avg`` or SGD's momentum buffer, set to zero: the site's own pre-averaging
        direction is dropped, its step-size statistics kept).
    pseudo_dice: nnU-Net's validation at every epoch end, on the fold's validation
        cases (fold ``all``: its own training cases), logged as the pseudo Dice.
        ``False`` skips its forward passes but still draws its batches, so the
        trained weights are the same bit for bit; the log shows NaN.
    precision: arithmetic of the training step's forward pass on a CPU: ``"fp32"``
        (nnU-Net's), ``"bf16"`` (bfloat16 autocast; the loss, gradients and weights stay
        float32) or ``"auto"`` (bf16 where the CPU computes bfloat16 natively, AMX or
        AVX512-BF16, else fp32). On CUDA nnU-Net's own float16 autocast either way.
    seed: the training's seed: a model trained from scratch draws its initial weights
        from it, and every training call draws its batches and augmentation from
        generators seeded by it and the epoch the call starts at (a federated model's
        initial weights are the coordinator's: :func:`oarbench.train.federated.nnunet_simulate`
        and the Flower run take them from this seed too).
    warmup: iterations of linear learning-rate warm-up at the schedule's start (0: none,
        nnU-Net's); a federated site counts them from the first round, so its schedule is
        the local model's (:meth:`oarbench.train.trainer.OarbenchTrainer.configure`).
    """

    augmentation: str = "default"
    initial_lr: float | None = None
    batch_size: int | None = None
    optimizer: str = "sgd"
    foreground_oversampling: float | None = None
    harmonise: bool = True
    optimizer_state: str = "kept"
    pseudo_dice: bool = True
    precision: str = "fp32"
    seed: int = 0
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.augmentation not in ("default", "light"):
            raise ValueError(f"augmentation must be 'default' or 'light', got {self.augmentation!r}")
        if self.initial_lr is not None and not 0 < self.initial_lr < 1:
            raise ValueError(f"initial_lr must be in (0, 1), got {self.initial_lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.foreground_oversampling is not None and not 0 <= self.foreground_oversampling <= 1:
            raise ValueError(f"foreground_oversampling must be in [0, 1], got {self.foreground_oversampling}")
        if not isinstance(self.harmonise, bool):
            raise ValueError(f"harmonise must be True or False, got {self.harmonise!r}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer_state must be one of {', '.join(OPTIMIZER_STATES)}, "
                             f"got {str(self.optimizer_state)[:20]!r}")
        if not isinstance(self.pseudo_dice, bool):
            raise ValueError(f"pseudo_dice must be True or False, got {self.pseudo_dice!r}")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {str(self.precision)[:20]!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {str(self.seed)[:20]!r}")
        check_warmup(self.warmup)

    def spec(self) -> dict[str, Any]:
        return {"augmentation": self.augmentation, "initial_lr": self.initial_lr, "batch_size": self.batch_size,
                "optimizer": self.optimizer, "foreground_oversampling": self.foreground_oversampling,
                "optimizer_state": self.optimizer_state, "pseudo_dice": self.pseudo_dice,
                "precision": self.precision, "seed": self.seed, "warmup": self.warmup}

    def to_json(self) -> str:
        """Every option as a JSON object (what the Flower engine's messages carry)."""
        return json.dumps(dict(self.spec(), harmonise=self.harmonise), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainerOptions":
        """Inverse of :meth:`to_json`; ValueError for malformed text or unknown options."""
        try:
            values = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"trainer options: not valid JSON ({exc})") from None
        if not isinstance(values, dict):
            raise ValueError("trainer options must be a JSON object")
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"trainer options: unknown option(s) {[str(u)[:30] for u in unknown[:5]]}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ValueError(f"trainer options: {exc}") from None


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one training call.

    Attributes
    ----------
    model_folder: nnU-Net model folder (dataset.json, plans.json, fold_<f>/).
    checkpoint: fold_<f>/checkpoint_final.pth.
    epochs_done: epoch counter after training.
    iterations: training iterations run in this call.
    seconds: wall-clock seconds of ``run_training`` (data loading set-up, training and
        validation iterations, checkpoints).
    num_cases: training cases of the fold.
    step_seconds: seconds spent in the training steps alone (forward, backward, update).
    """

    model_folder: Path
    checkpoint: Path
    epochs_done: int
    iterations: int
    seconds: float
    num_cases: int
    step_seconds: float = float("nan")

    @property
    def seconds_per_iteration(self) -> float:
        """Mean seconds per training iteration (training step only)."""
        return self.step_seconds / self.iterations if self.iterations else float("nan")


def train(
    paths: NnunetPaths,
    name: str,
    *,
    configuration: str = "3d_fullres",
    fold: int | str = 0,
    epochs: int = 1000,
    iterations: int = 250,
    val_iterations: int | None = None,
    width: str = "default",
    device: str = "cpu",
    plans_name: str = "nnUNetPlans",
    initial_weights_file: str | Path | None = None,
    resume_from: str | Path | None = None,
    stop_after_epoch: int | None = None,
    weights_out: str | Path | None = None,
    validate: bool = False,
    seed: int | None = None,
    log_file: Path | None = None,
    options: TrainerOptions = TrainerOptions(),
    snapshot_dir: str | Path | None = None,
    threads: int | None = None,
    server: str | None = None,
) -> TrainResult:
    """Train one configuration and fold with :class:`oarbench.train.trainer.OarbenchTrainer`.

    Parameters
    ----------
    epochs, iterations, val_iterations:
        Schedule length (nnU-Net defaults 1000, 250, 50). ``val_iterations``
        defaults to ``max(1, iterations // 5)``.
    width:
        ``"default"`` (as planned), ``"small"`` or ``"tiny"`` (features per
        stage 16..128 / 8..64), written into the model's plans.json.
    device:
        ``"cpu"`` or ``"cuda"``.
    initial_weights_file, resume_from, stop_after_epoch, weights_out:
        For federated rounds: start from these weights (safetensors), resume
        optimizer state and epoch counter from this checkpoint, stop after this
        epoch, write the trained weights (safetensors).
    validate:
        Run nnU-Net's final validation (predicts the fold's validation cases).
    seed:
        The training's seed (initial weights, every epoch's data order); default
        ``options.seed``.
    options:
        Augmentation, learning rate, batch size, seed (:class:`TrainerOptions`).
    snapshot_dir:
        Save the weights after every epoch there (``epoch_<NNNNN>.safetensors``, one
        entry per distinct tensor, and ``epoch_<NNNNN>.json`` with the epoch's mean
        training loss and iteration count), for learning curves.
    threads:
        CPU threads of the training process (default: torch's, one per core); set it
        when several trainings share the machine.
    server:
        The socket of a :class:`StepServer` for ``paths`` (and ``threads``) that runs
        the step instead of a fresh process (the same weights; the output goes to the
        server's log, not ``log_file``).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    spec = {
        "dataset": name, "configuration": configuration, "fold": fold, "epochs": int(epochs),
        "iterations": int(iterations),
        "val_iterations": int(val_iterations if val_iterations is not None else max(1, iterations // 5)),
        "width": width, "device": device, "plans_name": plans_name,
        "initial_weights": str(initial_weights_file) if initial_weights_file else None,
        "resume_from": str(resume_from) if resume_from else None,
        "stop_after_epoch": stop_after_epoch, "weights_out": str(weights_out) if weights_out else None,
        "validate": bool(validate), "save_every": 50, **options.spec(),
        "seed": options.seed if seed is None else int(seed),
        "snapshot_dir": str(Path(snapshot_dir).resolve()) if snapshot_dir else None,
    }
    r = _run("train", paths, spec, log_file=log_file, threads=threads, server=server)
    return TrainResult(Path(r["model_folder"]), Path(r["checkpoint"]), int(r["epochs_done"]), int(r["iterations"]),
                       float(r["seconds"]), int(r["num_cases"]), float(r["step_seconds"]))


def write_model_folder(out: str | Path, plans: Mapping[str, Any], dataset_json: Mapping[str, Any],
                       weights_file: str | Path, *, configuration: str = "3d_fullres", fold: int | str = "all",
                       width: str = "default") -> Path:
    """Write a normal nnU-Net model folder for weights trained elsewhere (the federated model).

    ``out`` gets dataset.json, plans.json (with the width applied) and
    ``fold_<fold>/checkpoint_final.pth`` (trainer name ``nnUNetTrainer``).
    """
    from oarbench.train._plans import reduce_width

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="oarbench-model-") as tmp:
        p = Path(tmp) / "plans.json"
        d = Path(tmp) / "dataset.json"
        p.write_text(json.dumps(reduce_width(plans, configuration, width)))
        d.write_text(json.dumps(dataset_json))
        _run("write_model", NnunetPaths.under(tmp), {"plans": str(p), "dataset_json": str(d),
                                                      "weights": str(weights_file), "out": str(out),
                                                      "configuration": configuration, "fold": fold})
    return out


def predict(model_folder: str | Path, input_folder: str | Path, output_folder: str | Path, *,
            fold: int | str = "all", device: str = "cpu", mirroring: bool = False,
            num_processes: int = 1) -> float:
    """Predict every case in ``input_folder`` (``<case>_0000.nii.gz`` files) into ``output_folder``.

    Returns the seconds taken. Output files are ``<case><file_ending>`` on
    the input grid, as ``nnUNetv2_predict`` writes them; a model trained on
    harmonised cases (plans.json ``oarbench_orientation``) predicts each input
    in that orientation and maps the labels back (:mod:`oarbench.train.harmonise`).
    Cases are predicted one after another (``num_processes`` is kept for callers).
    """
    model_folder = Path(model_folder)
    for f in ("plans.json", "dataset.json", f"fold_{fold}/checkpoint_final.pth"):
        if not (model_folder / f).is_file():
            raise FileNotFoundError(f"{model_folder / f}: not found (not an nnU-Net model folder for fold {fold})")
    if not Path(input_folder).is_dir():
        raise FileNotFoundError(f"{input_folder}: input folder not found")
    Path(output_folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="oarbench-predict-") as tmp:
        res = _run("predict", NnunetPaths.under(tmp), {
            "model_folder": str(model_folder.resolve()), "input_folder": str(Path(input_folder).resolve()),
            "output_folder": str(Path(output_folder).resolve()), "fold": fold, "device": device,
            "mirroring": bool(mirroring), "num_processes": num_processes})
    return float(res["seconds"])


def snapshot_dsc(model_folder: str | Path, snapshots: list[tuple[int, str | Path]],
                 cases: list[Mapping[str, str]], structures: Mapping[str, int], *,
                 configuration: str = "3d_fullres", device: str = "cpu",
                 threads: int | None = None) -> list[dict[str, Any]]:
    """DSC of each weight snapshot ``(iteration, safetensors file)`` on labelled ``cases``.

    ``model_folder`` supplies plans.json and dataset.json (the network); each case is
    ``{"case", "centre", "image", "label"}`` (image: ``*_0000.nii.gz``). Returns rows
    ``iteration, centre, case, structure, dsc`` for the ``structures`` present in the
    reference (prediction without mirroring, as the demo predicts). ``threads``: CPU
    threads of the child process that predicts (default: torch's).
    """
    model_folder = Path(model_folder)
    for f in ("plans.json", "dataset.json"):
        if not (model_folder / f).is_file():
            raise FileNotFoundError(f"{model_folder / f}: not found (not an nnU-Net model folder)")
    for _, w in snapshots:
        if not Path(w).is_file():
            raise FileNotFoundError(f"{w}: weight snapshot not found")
    with tempfile.TemporaryDirectory(prefix="oarbench-curve-") as tmp:
        res = _run("curve", NnunetPaths.under(tmp), {
            "model_folder": str(model_folder.resolve()), "configuration": configuration, "device": device,
            "snapshots": [{"iteration": int(i), "weights": str(Path(w).resolve())} for i, w in snapshots],
            "cases": [dict(c) for c in cases], "structures": {k: int(v) for k, v in structures.items()}},
            threads=threads)
    return list(res["rows"])


def train_local(dataset_dir: str | Path, out: str | Path, *, configuration: str = "3d_fullres",
                fold: int | str = "all", epochs: int = 1000, iterations: int = 250, width: str = "default",
                device: str = "cpu", num_processes: int = 2, options: TrainerOptions = TrainerOptions(),
                snapshot_dir: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    """Plan, preprocess and train one local model; ``out`` holds nnU-Net's three folders.

    ``num_processes``: preprocessing processes; ``threads``: CPU threads of the training
    process (default: torch's, one per core).

    Unless ``options.harmonise`` is off, the cases are first brought to the canonical
    orientation (:mod:`oarbench.train.harmonise`); the model's plans.json records it and
    its predictions are made in that orientation and mapped back to each input's grid.

    Returns a summary with the model folder, timings (seconds) and what harmonisation did.
    """
    _require_nnunet()
    from oarbench.train.harmonise import dataset_record, record_summary

    paths = NnunetPaths.under(out).make()
    name = link_dataset(dataset_dir, paths, harmonise=options.harmonise)
    t0 = time.perf_counter()
    plan_and_preprocess(paths, name, configurations=(configuration,), num_processes=num_processes)
    t_plan = time.perf_counter() - t0
    res = train(paths, name, configuration=configuration, fold=fold, epochs=epochs, iterations=iterations,
                width=width, device=device, log_file=Path(out) / "train.log", options=options,
                snapshot_dir=snapshot_dir, threads=threads)
    return {"model_folder": str(res.model_folder), "fold": fold, "plan_preprocess_s": t_plan,
            "train_s": res.seconds, "s_per_iteration": res.seconds_per_iteration, "num_cases": res.num_cases,
            "harmonisation": record_summary(dataset_record(Path(paths.raw) / name))}


@dataclass
class NnunetSiteTraining:
    """A federated site's local step (:class:`oarbench.train.federated.LocalTraining`) with nnU-Net.

    The site's nnU-Net folders (``paths``) hold its preprocessed data under
    the federation's plans; ``work`` holds the exchanged weight files. Each
    round trains ``local_epochs`` epochs from the global weights; the
    optimizer state and epoch counter stay in the site's own checkpoint, and
    the learning-rate schedule spans ``rounds * local_epochs`` epochs.
    """

    paths: NnunetPaths
    name: str
    work: Path
    rounds: int
    local_epochs: int = 1
    iterations: int = 250
    configuration: str = "3d_fullres"
    width: str = "default"
    device: str = "cpu"
    fold: int | str = "all"
    options: TrainerOptions = TrainerOptions()
    threads: int | None = None
    server: str | None = None  # a StepServer's socket for these folders and threads
    seconds: list[float] = field(default_factory=list)

    def __call__(self, round_: int, global_weights: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        from safetensors.numpy import load_file

        import hashlib

        from oarbench.train.exchange import tensors_to_bytes

        self.work.mkdir(parents=True, exist_ok=True)
        g = self.work / f"global_{round_:05d}.safetensors"
        u = self.work / f"update_{round_:05d}.safetensors"
        done = self.work / f"update_{round_:05d}.json"
        g_bytes = tensors_to_bytes(dict(global_weights))
        g_sha = hashlib.sha256(g_bytes).hexdigest()
        if done.is_file() and u.is_file():
            # trained in an earlier run that stopped before uploading: reuse, do not train twice
            info = json.loads(done.read_text())
            if info.get("global_sha256") == g_sha:
                return dict(load_file(str(u))), int(info["num_cases"])
        _atomic_bytes(g, g_bytes)
        ckpt = self._checkpoint()
        resume = ckpt if round_ > 0 and ckpt.is_file() else None
        res = train(self.paths, self.name, configuration=self.configuration, fold=self.fold,
                    epochs=self.rounds * self.local_epochs, iterations=self.iterations, width=self.width,
                    device=self.device, initial_weights_file=g, resume_from=resume,
                    stop_after_epoch=(round_ + 1) * self.local_epochs, weights_out=u,
                    log_file=self.work / "train.log", options=self.options, threads=self.threads,
                    server=self.server)
        self.seconds.append(res.seconds)
        _atomic_text(done, json.dumps({"global_sha256": g_sha, "num_cases": res.num_cases,
                                       "seconds": res.seconds, "step_seconds": res.step_seconds}))
        return dict(load_file(str(u))), res.num_cases

    def _checkpoint(self) -> Path:
        return (Path(self.paths.results) / self.name / f"OarbenchTrainer__nnUNetPlans__{self.configuration}"
                / f"fold_{self.fold}" / "checkpoint_final.pth")
