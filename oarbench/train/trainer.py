"""The nnU-Net v2 trainer that oarbench ships, and helpers around nnU-Net checkpoints.

:class:`OarbenchTrainer` is ``nnUNetTrainer`` with the training length as
parameters (epochs, training and validation iterations per epoch) and a
``stop_after_epoch`` so a federated site can run E epochs per round while the
poly learning-rate schedule spans all rounds. It does not change the network:
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
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from oarbench.train._plans import WIDTHS, reduce_width

__all__ = [
    "OarbenchTrainer",
    "WIDTHS",
    "reduce_width",
    "state_to_arrays",
    "arrays_to_state",
]

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
        """
        if min(num_epochs, iterations_per_epoch) < 1 or val_iterations_per_epoch < 0:
            raise ValueError("epochs and iterations must be positive")
        self.num_epochs = int(num_epochs)
        self.num_iterations_per_epoch = int(iterations_per_epoch)
        self.num_val_iterations_per_epoch = int(val_iterations_per_epoch)
        self._stop_after = int(stop_after_epoch) if stop_after_epoch is not None else self.num_epochs
        if save_every is not None:
            self.save_every = int(save_every)

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's training step, timed (``step_seconds``, ``step_count``) for the docs' per-iteration figures."""
        t0 = time.perf_counter()
        out = super().train_step(batch)
        self.step_seconds = getattr(self, "step_seconds", 0.0) + time.perf_counter() - t0
        self.step_count = getattr(self, "step_count", 0) + 1
        return out

    def run_training(self) -> None:
        """Train from ``current_epoch`` up to ``stop_after_epoch`` (keeping the full LR schedule)."""
        full = self.num_epochs
        stop = getattr(self, "_stop_after", full)
        if not self.was_initialized:
            self.initialize()  # the LR scheduler is built here, from the full schedule length
        self.num_epochs = min(stop, full)
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
