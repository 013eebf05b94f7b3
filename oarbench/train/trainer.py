"""The nnU-Net v2 trainer that oarbench ships, and helpers around nnU-Net checkpoints.

:class:`OarbenchTrainer` is ``nnUNetTrainer`` with the training length as
parameters (epochs, training and validation iterations per epoch), a
``stop_after_epoch`` so a federated site can run E epochs per round while the
poly learning-rate schedule spans all rounds, and an optional ``light`` data
augmentation for short CPU schedules (see :meth:`OarbenchTrainer.configure`). It does not change the network:
a reduced width is written into the plans (:func:`reduce_width`), so the
plans.json in the model folder describes the network exactly and any nnU-Net
predictor rebuilds it with the plain ``nnUNetTrainer``.

This module imports torch and nnunetv2 at import time; it is only imported
inside nnU-Net worker processes (:mod:`oarbench.train._worker`) and by code
that already needs nnU-Net.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np
import torch
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from oarbench.train._plans import WIDTHS, check_warmup, reduce_width

__all__ = [
    "AUGMENTATIONS",
    "OarbenchTrainer",
    "WIDTHS",
    "reduce_width",
    "state_to_arrays",
    "arrays_to_state",
]

#: Data augmentation choices of :class:`OarbenchTrainer`.
AUGMENTATIONS = ("default", "light")

#: Optimizer choices of :class:`OarbenchTrainer`.
OPTIMIZERS = ("sgd", "adam")

#: Arithmetic of the training step's forward pass on a CPU (:meth:`OarbenchTrainer.train_step`);
#: ``auto``: bf16 where the CPU computes bfloat16 natively (:func:`native_bf16`), else fp32.
PRECISIONS = ("fp32", "bf16", "auto")

#: ``light`` augmentation: rotation range (radians, each axis) and scaling range.
LIGHT_ROTATION = (-15.0 / 180.0 * np.pi, 15.0 / 180.0 * np.pi)
LIGHT_SCALING = (0.85, 1.2)


#: Epochs between two redraws of nnU-Net's progress.png (and the schedule's last epoch).
PROGRESS_EVERY = 5


class OarbenchTrainer(nnUNetTrainer):
    """``nnUNetTrainer`` with a configurable training length.

    Construct it like ``nnUNetTrainer`` (same arguments: nnU-Net records
    them by name), then call :meth:`configure` before training.
    """

    def configure(
        self,
        *,
        num_epochs: int,
        iterations_per_epoch: int,
        val_iterations_per_epoch: int,
        stop_after_epoch: int | None = None,
        save_every: int | None = None,
        augmentation: str = "default",
        initial_lr: float | None = None,
        snapshot_dir: str | None = None,
        optimizer: str = "sgd",
        foreground_oversampling: float | None = None,
        pseudo_dice: bool = True,
        precision: str = "fp32",
        warmup: int = 0,
    ) -> None:
        """Set the schedule.

        Parameters
        ----------
        num_epochs: epochs of the whole schedule (sets the poly learning-rate decay).
        iterations_per_epoch: training iterations (batches) per epoch.
        val_iterations_per_epoch: validation iterations per epoch.
        stop_after_epoch: end this call of ``run_training`` after this many
            epochs in total (federated rounds), default ``num_epochs``.
        save_every: write checkpoint_latest every this many epochs.
        augmentation: ``"default"`` (nnU-Net's: rotation, scaling, noise, blur,
            brightness, contrast, low resolution, gamma, mirroring) or
            ``"light"``: rotation up to 15 degrees and scaling 0.85-1.2 (each
            with probability 0.2), no intensity transforms and no mirroring,
            so left/right structures keep their side; for short schedules on
            the synthetic phantoms (docs/demo.md).
        initial_lr: start of the poly learning-rate schedule (nnU-Net: 0.01).
        optimizer: ``"sgd"`` (nnU-Net's: SGD, Nesterov momentum 0.99) or ``"adam"``
            (AdamW, same weight decay); both follow the poly learning-rate decay.
        foreground_oversampling: share of each batch's patches centred on a
            structure (a class drawn at random among those in the case, then
            one of its voxels); nnU-Net: 0.33, the rest at random. 1.0 samples
            every structure alike, which teaches small ones sooner.
        pseudo_dice: nnU-Net's validation at every epoch end (the pseudo Dice in the log).
            ``False`` still draws the validation batches, so the data order of
            the training batches stays that of a run that validates (the same
            weights, bit for bit), but skips their forward pass, logs NaN and
            writes no checkpoint_best.pth (there is no best epoch to pick).
        precision: ``"fp32"`` (nnU-Net's on a CPU), ``"bf16"``: on a CPU the
            forward pass of each training step under bfloat16 autocast
            (:meth:`train_step`), or ``"auto"``: bf16 where :func:`native_bf16`, else
            fp32; on CUDA nnU-Net's own float16 autocast either way.
        warmup: iterations of linear learning-rate warm-up at the schedule's start:
            iteration ``i`` (counted from the schedule's first, across epochs and
            federated rounds) steps with the epoch's poly learning rate times
            ``(i + 1) / warmup`` while ``i < warmup``; 0 (nnU-Net's) none.
        snapshot_dir: save the weights after every epoch there
            (``epoch_<NNNNN>.safetensors`` and ``epoch_<NNNNN>.json`` with the
            epoch's mean training loss and the iterations done).
        """
        if min(num_epochs, iterations_per_epoch) < 1 or val_iterations_per_epoch < 0:
            raise ValueError("epochs and iterations must be positive")
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
        if initial_lr is not None:
            if not 0 < initial_lr < 1:
                raise ValueError(f"initial_lr must be in (0, 1), got {initial_lr}")
            self.initial_lr = float(initial_lr)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if foreground_oversampling is not None:
            if not 0 <= foreground_oversampling <= 1:
                raise ValueError(f"foreground_oversampling must be in [0, 1], got {foreground_oversampling}")
            self.oversample_foreground_percent = float(foreground_oversampling)
        self.augmentation = augmentation
        self.pseudo_dice = bool(pseudo_dice)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "auto":
            precision = "bf16" if native_bf16() else "fp32"
        self.precision = precision
        if not self.pseudo_dice:
            # no pseudo Dice, no "best" epoch: nnU-Net would write the first epoch as checkpoint_best.pth
            self._best_ema = float("inf")
        self.warmup = check_warmup(warmup)
        self.optimizer_name = optimizer
        self.snapshot_dir = snapshot_dir
        self.num_epochs = int(num_epochs)
        self.num_iterations_per_epoch = int(iterations_per_epoch)
        self.num_val_iterations_per_epoch = int(val_iterations_per_epoch)
        self._stop_after = int(stop_after_epoch) if stop_after_epoch is not None else self.num_epochs
        if save_every is not None:
            self.save_every = int(save_every)

    def configure_optimizers(self):
        """nnU-Net's SGD, or AdamW with the same poly learning-rate schedule."""
        if getattr(self, "optimizer_name", "sgd") == "sgd":
            return super().configure_optimizers()
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):  # noqa: N802 - nnU-Net's name
        """nnU-Net's choice, narrowed for ``light`` augmentation (smaller rotation, no mirroring)."""
        rotation, dummy_2d, initial_patch, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if getattr(self, "augmentation", "default") == "default":
            return rotation, dummy_2d, initial_patch, mirror_axes
        patch = self.configuration_manager.patch_size
        dim = len(patch)
        initial_patch = get_patch_size(patch[-dim:], LIGHT_ROTATION, LIGHT_ROTATION, LIGHT_ROTATION, LIGHT_SCALING)
        if dummy_2d:
            initial_patch[0] = patch[0]
        self.inference_allowed_mirroring_axes = None
        return LIGHT_ROTATION, dummy_2d, initial_patch, None

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,  # noqa: N803
                                do_dummy_2d_data_aug, **kwargs):
        """nnU-Net's transforms, or for ``light`` augmentation only the spatial one."""
        if getattr(self, "augmentation", "default") == "default":
            return nnUNetTrainer.get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales,
                                                         mirror_axes, do_dummy_2d_data_aug, **kwargs)
        if kwargs.get("is_cascaded") or kwargs.get("regions") is not None:
            raise ValueError("light augmentation supports plain label maps only (no cascade, no regions)")
        spatial_patch = patch_size[1:] if do_dummy_2d_data_aug else patch_size
        spatial = SpatialTransform(spatial_patch, patch_center_dist_from_border=0, random_crop=False,
                                   p_elastic_deform=0, p_rotation=0.2, rotation=rotation_for_DA, p_scaling=0.2,
                                   scaling=LIGHT_SCALING, p_synchronize_scaling_across_axes=1,
                                   bg_style_seg_sampling=False, border_mode_seg="constant", padding_value_seg=-1)
        if do_dummy_2d_data_aug:  # anisotropic 3D patch: augment in-plane, slice by slice
            transforms = [Convert3DTo2DTransform(), spatial, Convert2DTo3DTransform()]
        else:
            transforms = [spatial]
        transforms.append(RemoveLabelTansform(-1, 0))
        if deep_supervision_scales is not None:
            transforms.append(DownsampleSegForDSTransform(ds_scales=deep_supervision_scales))
        return ComposeTransforms(transforms)

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step; without ``pseudo_dice`` nothing (the batch was drawn all the same)."""
        if getattr(self, "pseudo_dice", True):
            return super().validation_step(batch)
        return {}

    def on_validation_epoch_end(self, val_outputs: list) -> None:
        """nnU-Net's pseudo Dice; without ``pseudo_dice`` NaN (the logger keeps one value per epoch)."""
        if getattr(self, "pseudo_dice", True):
            return super().on_validation_epoch_end(val_outputs)
        nan = float("nan")
        lm = self.label_manager
        classes = len(lm.foreground_regions if lm.has_regions else lm.foreground_labels)
        self.logger.log("mean_fg_dice", nan, self.current_epoch)
        self.logger.log("dice_per_class_or_region", [nan] * classes, self.current_epoch)
        self.logger.log("val_losses", nan, self.current_epoch)

    def on_epoch_end(self) -> None:
        """nnU-Net's epoch end, then the weight snapshot (when configured).

        nnU-Net redraws ``progress.png`` at every epoch end (about 0.8 s of CPU);
        here every :data:`PROGRESS_EVERY` epochs and at the schedule's last epoch.
        """
        epoch = self.current_epoch
        full = getattr(self, "_schedule_epochs", self.num_epochs)
        skip_plot = (epoch + 1) % PROGRESS_EVERY != 0 and epoch + 1 < full
        if skip_plot:
            self.logger.plot_progress_png = lambda output_folder: None  # this epoch only (an instance attribute)
        try:
            super().on_epoch_end()  # increments current_epoch
        finally:
            if skip_plot:
                del self.logger.plot_progress_png
        folder = getattr(self, "snapshot_dir", None)
        if folder and self.local_rank == 0:
            import json
            import os

            from safetensors.numpy import save_file

            os.makedirs(folder, exist_ok=True)
            stem = os.path.join(folder, f"epoch_{self.current_epoch:05d}")
            save_file(state_to_arrays(self.network.state_dict()), stem + ".safetensors.tmp")
            os.replace(stem + ".safetensors.tmp", stem + ".safetensors")
            info = {"epoch": self.current_epoch, "iterations": self.current_epoch * self.num_iterations_per_epoch,
                    "train_loss": float(self.logger.get_value("train_losses", step=-1)),
                    "pseudo_dice": float(self.logger.get_value("mean_fg_dice", step=-1))}
            with open(stem + ".json.tmp", "w") as fh:
                json.dump(info, fh)
            os.replace(stem + ".json.tmp", stem + ".json")

    def on_train_epoch_start(self) -> None:
        """nnU-Net's epoch start (it sets the epoch's poly learning rate); the warm-up counts from here."""
        super().on_train_epoch_start()
        self._epoch_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self._epoch_step = 0
        warmup = getattr(self, "warmup", 0)
        first = self.current_epoch * self.num_iterations_per_epoch
        if first < warmup:
            last = min(first + self.num_iterations_per_epoch, warmup)  # 1-based, the epoch's last warm-up iteration
            lr = self._epoch_lrs[0]
            self.print_to_log_file(f"oarbench: learning-rate warm-up, iterations {first + 1}-{last} of {warmup}: "
                                   f"learning rate {lr * (first + 1) / warmup:.6g} to {lr * last / warmup:.6g}")

    def _warm_up(self) -> None:
        """Scale this iteration's learning rate during the warm-up (:meth:`configure`)."""
        warmup = getattr(self, "warmup", 0)
        step = getattr(self, "_epoch_step", None)
        if not warmup or step is None:
            return
        i = self.current_epoch * self.num_iterations_per_epoch + step
        self._epoch_step = step + 1
        if i >= warmup:  # the last warm-up iteration ran at the epoch's rate (factor 1)
            return
        factor = (i + 1) / warmup
        for group, lr in zip(self.optimizer.param_groups, self._epoch_lrs):
            group["lr"] = lr * factor

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's training step, timed (``step_seconds``, ``step_count``) for the docs' per-iteration figures.

        With ``precision="bf16"`` on a CPU the network's forward pass runs under
        bfloat16 autocast (nnU-Net autocasts only on CUDA, to float16); the loss,
        the gradients and the weights stay float32.
        """
        t0 = time.perf_counter()
        self._warm_up()
        if getattr(self, "precision", "fp32") == "bf16" and self.device.type == "cpu":
            out = self._train_step_bf16(batch)
        else:
            out = super().train_step(batch)
        self.step_seconds = getattr(self, "step_seconds", 0.0) + time.perf_counter() - t0
        self.step_count = getattr(self, "step_count", 0) + 1
        return out

    def _train_step_bf16(self, batch: dict) -> dict:
        data = batch["data"].to(self.device)
        target = batch["target"]
        target = [t.to(self.device) for t in target] if isinstance(target, list) else target.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = self.network(data)
        # the loss in float32: its Dice sums run over whole patches
        output = [o.float() for o in output] if isinstance(output, (list, tuple)) else output.float()
        loss = self.loss(output, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def run_training(self) -> None:
        """Train from ``current_epoch`` up to ``stop_after_epoch`` (keeping the full LR schedule)."""
        full = self.num_epochs
        self._schedule_epochs = full
        stop = getattr(self, "_stop_after", full)
        if not self.was_initialized:
            self.initialize()  # the LR scheduler is built here, from the full schedule length
        self.num_epochs = min(stop, full)
        if self.device.type == "cpu":
            self.print_to_log_file(f"oarbench: the training steps' forward passes in {getattr(self, 'precision', 'fp32')}")
        try:
            super().run_training()
        finally:
            self.num_epochs = full

    def save_checkpoint(self, filename: str) -> None:
        """Save as nnU-Net does, under the name ``nnUNetTrainer``.

        This class changes only the schedule, not the network or inference, so
        the model folder stays usable by nnU-Net's own predictor, which looks
        trainers up by name among nnU-Net's classes.
        """
        super().save_checkpoint(filename)
        if self.local_rank == 0 and not self.disable_checkpointing:
            ckpt = torch.load(filename, map_location="cpu", weights_only=False)  # our own file, just written
            ckpt["trainer_name"] = "nnUNetTrainer"
            ckpt["oarbench_trainer"] = type(self).__name__
            torch.save(ckpt, filename)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: x86 with AVX512-BF16 or AMX (torch's CPU
    capability check). Elsewhere bfloat16 autocast is emulated or unsupported, and no faster
    than float32, so ``auto`` keeps float32 there."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(check()) for check in checks if check is not None)
    except RuntimeError:
        return False


def state_to_arrays(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A state dict as numpy arrays, each distinct tensor once.

    nnU-Net's U-Net registers modules twice (the encoder again in the
    decoder), so several keys share one storage; only the first key of each
    group is kept. :func:`arrays_to_state` restores the aliases.
    """
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out: dict[str, np.ndarray] = {}
    for k, t in state.items():
        sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if sig in seen:
            continue
        seen[sig] = k
        out[k] = t.detach().cpu().numpy().copy()
    return out


def arrays_to_state(arrays: Mapping[str, np.ndarray], network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict for ``network`` from :func:`state_to_arrays` output (aliases filled in)."""
    target = network.state_dict()
    canonical: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out: dict[str, torch.Tensor] = {}
    for k, t in target.items():
        sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        src = canonical.setdefault(sig, k)
        if src not in arrays:
            raise ValueError(f"weights lack tensor {src!r} (needed for {k!r})")
        a = arrays[src]
        if tuple(a.shape) != tuple(t.shape):
            raise ValueError(f"tensor {src!r}: shape {tuple(a.shape)}, network needs {tuple(t.shape)}")
        out[k] = torch.from_numpy(np.array(a, copy=True)).to(t.dtype)
    extra = set(arrays) - set(canonical.values())
    if extra:
        raise ValueError(f"weights hold tensors the network does not have: {sorted(extra)[:5]}")
    return out
