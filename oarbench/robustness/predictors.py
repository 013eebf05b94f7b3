"""Predictors: image files in, label files out.

A :class:`Predictor` turns CT images (nnU-Net naming, ``CASE_0000.nii.gz``)
into label maps (``CASE.nii.gz``) on each input's grid. Two are provided:

* :class:`NnUNetModelPredictor`, an nnU-Net v2 trained-model folder run in
  process through ``nnUNetPredictor`` (CPU or CUDA, test-time mirroring on or
  off). The network is built from the plans with
  ``get_network_from_plans`` and handed over with ``manual_initialization``:
  nnU-Net's own ``initialize_from_trained_model_folder`` looks the trainer up by
  name, which imports every trainer module (and torchvision with it).
* :class:`CommandPredictor`, any external tool from a command template
  (``my_tool --in {input} --out {output}`` for folders, or
  ``my_tool -i {input_file} -o {output_file}`` once per case), run without a shell.

:func:`parse_predictor` reads the ``--predictor`` strings
``nnunet:/path/to/model_folder[:fold]`` and ``command:TEMPLATE``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from oarbench.io import case_id, find_cases

__all__ = [
    "Predictor",
    "PredictorError",
    "CommandPredictor",
    "NnUNetModelPredictor",
    "parse_predictor",
    "load_checkpoint",
    "stage_inputs",
]


class PredictorError(ValueError):
    """A predictor failed (non-zero exit, missing outputs). The message says why."""


@runtime_checkable
class Predictor(Protocol):
    """Image files in, label files out."""

    def predict(self, image_paths: list[Path], out_dir: Path) -> dict[str, Path]:
        """Predict every image; return case id -> label file in ``out_dir``.

        ``image_paths`` are named ``CASE_0000.<ext>``; each label file must be on
        its image's grid (size, spacing, origin, direction).
        """
        ...


def _image_case(path: Path) -> str:
    cid = case_id(path, channel=True)
    if cid is None:
        raise ValueError(f"{path}: not an image file name")
    return cid


def stage_inputs(image_paths: list[Path], folder: Path) -> Path:
    """A folder holding exactly ``image_paths`` as ``CASE_0000.nii.gz``.

    When the images already are the only images of one folder with that naming,
    that folder is returned; otherwise they are linked (or copied) into ``folder``.
    """
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("no images to predict")
    cases = [_image_case(p) for p in paths]
    if len(set(cases)) != len(cases):
        raise ValueError(f"two images for the same case among {[str(p) for p in paths]}")
    parents = {p.parent.resolve() for p in paths}
    if len(parents) == 1 and all(p.name == f"{c}_0000.nii.gz" for p, c in zip(paths, cases)):
        parent = parents.pop()
        if set(find_cases(parent, images=True)) == set(cases):
            return parent
    folder.mkdir(parents=True, exist_ok=True)
    for p, c in zip(paths, cases):
        target = folder / f"{c}_0000.nii.gz"
        if p.name.endswith(".nii.gz"):
            try:
                os.symlink(p.resolve(), target)
            except OSError:
                shutil.copyfile(p, target)
        else:
            from oarbench.io import read_volume, write_volume

            write_volume(read_volume(p), target)
    return folder


def _collect_outputs(out_dir: Path, cases: list[str], what: str) -> dict[str, Path]:
    found = find_cases(out_dir) if any(case_id(p) for p in out_dir.iterdir()) else {}
    missing = [c for c in cases if c not in found]
    if missing:
        raise PredictorError(f"{what} wrote no label file for case(s) {missing} in {out_dir}")
    return {c: found[c] for c in cases}


def _tail(text: str, lines: int = 12, width: int = 300) -> str:
    """The last ``lines`` non-empty lines of a tool's output, each cut to ``width`` characters."""
    kept = [ln if len(ln) <= width else ln[:width] + " ..." for ln in text.strip().splitlines() if ln.strip()]
    if not kept:
        return "(nothing on stderr)"
    shown = kept[-lines:]
    more = len(kept) - len(shown)
    return (f"({more} earlier line(s) not shown)\n" if more else "") + "\n".join(shown)


_FOLDER_FORM = ("{input}", "{output}")
_FILE_FORM = ("{input_file}", "{output_file}")


@dataclass(frozen=True)
class CommandPredictor:
    """An external tool run from a command template, without a shell.

    The template is split like a POSIX shell would (``shlex.split``). Two forms:

    * folder form, one call for all cases: ``{input}`` becomes a folder of
      ``CASE_0000.nii.gz`` images and ``{output}`` a folder to receive
      ``CASE.nii.gz`` label files (nnU-Net style tools);
    * file form, one call per case (oarbench loops): ``{input_file}`` becomes
      one ``CASE_0000.nii.gz`` image and ``{output_file}`` the ``CASE.nii.gz``
      label file to write (``TotalSegmentator -i {input_file} -o {output_file} --ml``).
      ``{case}`` gives the case id.

    No shell features (pipes, ``&&``, variables): wrap them in a script, or pass
    ``bash -c '...'`` explicitly. When the tool fails, the error shows the exact
    command and the last lines of its stderr.

    Parameters
    ----------
    template:
        E.g. ``"my_tool --in {input} --out {output}"``.
    timeout_s:
        Seconds before the tool is killed, per call (None: no limit).
    """

    template: str
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        folder = all(p in self.template for p in _FOLDER_FORM)
        per_file = all(p in self.template for p in _FILE_FORM)
        if folder == per_file:
            raise ValueError(
                f"command template {self.template!r} must contain either {{input}} and {{output}} (folders, one call) "
                "or {input_file} and {output_file} (one call per case), not both and not one of them alone "
                "(docs/robustness.md)"
            )
        try:
            words = shlex.split(self.template)
        except ValueError as exc:
            raise ValueError(f"command template {self.template!r}: {exc}") from exc
        if not words:
            raise ValueError("empty command template")

    @property
    def per_file(self) -> bool:
        """True for the file form (``{input_file}``/``{output_file}``): one call per case."""
        return "{input_file}" in self.template

    def argv(self, input_path: Path, output_path: Path, case: str = "") -> list[str]:
        """The command for one call: folders in the folder form, one image and one label file in the file form."""
        if self.per_file:
            subs = {"{input_file}": str(input_path), "{output_file}": str(output_path), "{case}": case}
        else:
            subs = {"{input}": str(input_path), "{output}": str(output_path), "{case}": case}
        out = []
        for word in shlex.split(self.template):
            for key, value in subs.items():
                word = word.replace(key, value)
            out.append(word)
        return out

    def _call(self, argv: list[str]) -> None:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except FileNotFoundError:
            raise PredictorError(f"predictor command not found: {argv[0]!r}\ncommand: {shlex.join(argv)}") from None
        except PermissionError as exc:
            raise PredictorError(f"predictor command not executable: {argv[0]!r} ({exc.strerror})\n"
                                 f"command: {shlex.join(argv)}") from None
        except subprocess.TimeoutExpired:
            raise PredictorError(f"predictor command timed out after {self.timeout_s} s\ncommand: {shlex.join(argv)}") from None
        if proc.returncode != 0:
            raise PredictorError(
                f"predictor command exited with status {proc.returncode}\ncommand: {shlex.join(argv)}\n"
                f"last lines of its stderr:\n{_tail(proc.stderr or proc.stdout)}"
            )

    def predict(self, image_paths: list[Path], out_dir: Path) -> dict[str, Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [Path(p) for p in image_paths]
        cases = [_image_case(p) for p in paths]
        if self.per_file:
            if len(set(cases)) != len(cases):
                raise ValueError(f"two images for the same case among {[str(p) for p in paths]}")
            for path, case in zip(paths, cases):
                target = out_dir / f"{case}.nii.gz"
                argv = self.argv(path, target, case)
                self._call(argv)
                if not target.is_file():
                    raise PredictorError(f"predictor command wrote no {target.name}\ncommand: {shlex.join(argv)}")
            return {c: out_dir / f"{c}.nii.gz" for c in cases}
        with tempfile.TemporaryDirectory(prefix=".stage-", dir=out_dir.parent) as tmp:
            input_dir = stage_inputs(paths, Path(tmp) / "input")
            argv = self.argv(input_dir, out_dir)
            self._call(argv)
        return _collect_outputs(out_dir, cases, f"predictor command {shlex.join(argv)}")

    def describe(self) -> dict[str, str]:
        return {"kind": "command", "template": self.template, "form": "file" if self.per_file else "folder"}


@dataclass
class NnUNetModelPredictor:
    """An nnU-Net v2 trained-model folder (``plans.json``, ``dataset.json``, ``fold_N/``).

    Parameters
    ----------
    model_folder:
        The folder nnU-Net trains into (``.../nnUNetTrainer__nnUNetPlans__3d_fullres``).
    folds:
        Folds to ensemble; None = every ``fold_N`` holding the checkpoint.
    device:
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    use_mirroring:
        Test-time mirroring (nnU-Net's default: on); off is about twice as fast.
    checkpoint:
        Checkpoint file name inside each fold folder.
    tile_step_size:
        Sliding-window step as a fraction of the patch (nnU-Net default 0.5).
    trust_checkpoint:
        Load the checkpoints with full pickle (which can run code stored in
        the file) instead of PyTorch's restricted loader; only for files from
        a source you trust (:func:`load_checkpoint`).
    """

    model_folder: Path
    folds: tuple[int | str, ...] | None = None
    device: str = "cpu"
    use_mirroring: bool = True
    checkpoint: str = "checkpoint_final.pth"
    tile_step_size: float = 0.5
    trust_checkpoint: bool = False
    _predictor: object | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.model_folder = Path(self.model_folder)
        for name in ("plans.json", "dataset.json"):
            if not (self.model_folder / name).is_file():
                raise ValueError(f"{self.model_folder}: not an nnU-Net model folder (no {name})")
        if not (self.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", self.device)):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    def describe(self) -> dict[str, object]:
        return {
            "kind": "nnunet",
            "model_folder": str(self.model_folder),
            "folds": list(self.folds) if self.folds is not None else "auto",
            "device": self.device,
            "use_mirroring": self.use_mirroring,
            "checkpoint": self.checkpoint,
            "trust_checkpoint": self.trust_checkpoint,
            "orientation": self.orientation() or "as stored",
        }

    def _fold_list(self) -> list[int | str]:
        if self.folds is not None:
            return list(self.folds)
        found = []
        for sub in sorted(self.model_folder.glob("fold_*")):
            suffix = sub.name[len("fold_"):]
            if (sub / self.checkpoint).is_file() and (suffix.isdigit() or suffix == "all"):
                found.append(int(suffix) if suffix.isdigit() else suffix)
        if not found:
            raise ValueError(f"{self.model_folder}: no fold_*/{self.checkpoint} found")
        return found

    def load(self) -> object:
        """The initialised ``nnUNetPredictor`` (built once, then reused)."""
        if self._predictor is not None:
            return self._predictor
        from oarbench._optional import require

        torch = require("torch", "the nnU-Net predictor")
        require("nnunetv2", "the nnU-Net predictor")
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        import json

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but torch sees no CUDA GPU")
        plans = json.loads((self.model_folder / "plans.json").read_text())
        dataset_json = json.loads((self.model_folder / "dataset.json").read_text())
        plans_manager = PlansManager(plans)
        parameters = []
        trainer_name = configuration = mirror_axes = None
        for i, fold in enumerate(self._fold_list()):
            path = self.model_folder / f"fold_{fold}" / self.checkpoint
            if not path.is_file():
                raise ValueError(f"{path}: checkpoint not found")
            ckpt = load_checkpoint(path, trust=self.trust_checkpoint)
            if i == 0:
                trainer_name = ckpt.get("trainer_name", "nnUNetTrainer")
                configuration = ckpt["init_args"]["configuration"]
                mirror_axes = ckpt.get("inference_allowed_mirroring_axes")
            parameters.append(ckpt["network_weights"])
        cm = plans_manager.get_configuration(configuration)
        n_in = determine_num_input_channels(plans_manager, cm, dataset_json)
        n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        network = get_network_from_plans(
            cm.network_arch_class_name,
            cm.network_arch_init_kwargs,
            cm.network_arch_init_kwargs_req_import,
            n_in,
            n_out,
            allow_init=False,
            deep_supervision=False,
        )
        try:
            network.load_state_dict(parameters[0])
        except RuntimeError as exc:
            raise ValueError(
                f"{self.model_folder}: the checkpoint does not fit the network in plans.json "
                f"(trainer {trainer_name!r} may build a custom architecture): {str(exc).splitlines()[0]}"
            ) from exc
        predictor = nnUNetPredictor(
            tile_step_size=self.tile_step_size,
            use_gaussian=True,
            use_mirroring=self.use_mirroring,
            perform_everything_on_device=self.device != "cpu",
            device=torch.device(self.device),
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        predictor.manual_initialization(
            network, plans_manager, cm, parameters, dataset_json, trainer_name, mirror_axes
        )
        self._predictor = predictor
        return predictor

    def predict(self, image_paths: list[Path], out_dir: Path) -> dict[str, Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        predictor = self.load()
        ending = predictor.dataset_json.get("file_ending", ".nii.gz")  # type: ignore[attr-defined]
        paths = [Path(p) for p in image_paths]
        bad = [str(p) for p in paths if not p.name.endswith("_0000" + ending)]
        if bad:
            raise ValueError(f"nnU-Net model expects images named CASE_0000{ending}; got {bad}")
        cases = [_image_case(p) for p in paths]

        def run(inputs: list[Path], stems: list[Path]) -> None:
            log = io.StringIO()
            try:
                with contextlib.redirect_stdout(log):
                    predictor.predict_from_files_sequential(  # type: ignore[attr-defined]
                        [[str(p)] for p in inputs], [str(s) for s in stems], save_probabilities=False, overwrite=True
                    )
            except Exception as exc:  # nnU-Net raises bare exceptions/assertions
                raise PredictorError(f"nnU-Net prediction failed ({type(exc).__name__}: {exc})\n{_tail(log.getvalue())}") from exc
            for folder in {Path(s).parent for s in stems}:
                for extra in ("dataset.json", "plans.json", "predict_from_raw_data_args.json"):
                    (folder / extra).unlink(missing_ok=True)

        if self.orientation():
            # trained on harmonised cases: predict in the canonical orientation, map back to each grid
            from oarbench.robustness.orientation import predict_in_canonical

            predict_in_canonical(paths, cases, out_dir, run, ending=ending)
        else:
            run(paths, [out_dir / c for c in cases])
        return _collect_outputs(out_dir, cases, f"nnU-Net model {self.model_folder}")

    def orientation(self) -> str | None:
        """The orientation the model was trained in (plans.json ``oarbench_orientation``), or None: as stored."""
        import json

        from oarbench.robustness.orientation import CANONICAL, PLANS_KEY

        value = json.loads((self.model_folder / "plans.json").read_text()).get(PLANS_KEY)
        if value is not None and value != CANONICAL:
            raise ValueError(f"{self.model_folder / 'plans.json'}: unknown {PLANS_KEY} {str(value)[:20]!r} "
                             f"(expected {CANONICAL!r})")
        return value


def _checkpoint_globals() -> list[Any]:
    """The non-tensor types an nnU-Net checkpoint holds: numpy scalars, arrays and dtypes (its
    training log and best EMA Dice). torch.device, tensors and plain containers are allowed by
    PyTorch's restricted loader already."""
    import numpy as np

    core = getattr(np, "_core", None)
    multiarray = core.multiarray if core is not None else np.core.multiarray  # numpy < 2
    allowed: list[Any] = [np.ndarray, np.dtype, multiarray.scalar, multiarray._reconstruct]
    allowed += sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFD"}, key=str)
    return allowed


#: PyTorch keeps the globals a ``weights_only`` load may build in one set for the whole process, and
#: ``safe_globals`` removes its own on exit: two threads loading at once would take them from each other.
_CHECKPOINT_LOCK = threading.Lock()


def load_checkpoint(path: str | Path, *, trust: bool = False) -> Any:
    """Load an nnU-Net checkpoint (``.pth``) on the CPU without running code from it.

    A checkpoint is a pickle; loading it with full pickle runs whatever code the
    file names. Unless ``trust`` is set, the file is loaded with PyTorch's
    restricted loader (``weights_only=True``), which builds tensors, plain
    containers and the numpy types nnU-Net writes (:func:`_checkpoint_globals`)
    and nothing else; a file that needs more raises ValueError naming the file
    and the refused type. ``trust=True`` loads with full pickle.
    """
    import pickle

    from oarbench._optional import require

    torch = require("torch", "loading an nnU-Net checkpoint")
    path = Path(path)
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with _CHECKPOINT_LOCK, torch.serialization.safe_globals(_checkpoint_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"({found.group(1)})" if found else "(see PyTorch's weights_only loading)"
        raise ValueError(
            f"{path}: the checkpoint holds an object that is not model data {what}; loading it "
            "would run code from the file. If you trust its source, pass --trust-checkpoint"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path}: cannot read the checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def parse_predictor(spec: str, *, device: str = "cpu", use_mirroring: bool = True,
                    trust_checkpoint: bool = False) -> Predictor:
    """A predictor from a ``--predictor`` string.

    ``nnunet:/path/to/model_folder`` (all folds found), ``nnunet:/path:0``
    (fold 0), ``nnunet:/path:all`` (the ``fold_all`` model), ``nnunet:/path:0,1``
    (ensemble); ``command:TEMPLATE`` (see :class:`CommandPredictor`).
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"predictor {spec!r}: expected 'nnunet:/path/to/model_folder[:fold]' or 'command:TEMPLATE'")
    if kind == "command":
        return CommandPredictor(rest)
    if kind == "nnunet":
        folds: tuple[int | str, ...] | None = None
        m = re.fullmatch(r"(.+):((?:\d+|all)(?:,(?:\d+|all))*)", rest)
        folder = rest
        if m and not Path(rest).exists():
            folder = m.group(1)
            folds = tuple(int(f) if f.isdigit() else f for f in m.group(2).split(","))
        return NnUNetModelPredictor(Path(folder), folds=folds, device=device, use_mirroring=use_mirroring,
                                    trust_checkpoint=trust_checkpoint)
    raise ValueError(f"predictor {spec!r}: unknown kind {kind!r} (expected 'nnunet' or 'command')")
