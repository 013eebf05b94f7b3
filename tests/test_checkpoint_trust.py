"""nnU-Net checkpoints from a model folder are loaded without running code stored in them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): a stand-in for any code a hostile file could run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _nnunet_like_checkpoint() -> dict:
    """What nnUNetTrainer.save_checkpoint writes: weights, optimizer state, a log of numpy
    scalars, the best EMA Dice (numpy float64), init args with a torch.device."""
    net = torch.nn.Conv3d(1, 2, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    net(torch.zeros(1, 1, 4, 4, 4)).sum().backward()
    opt.step()
    log = {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
           "dice_per_class_or_region": [[np.float64(0.4), np.float32(0.6)]], "train_losses": [np.float32(-0.3)],
           "lrs": [0.01], "epoch_start_timestamps": [1.0], "epoch_end_timestamps": [2.0]}
    return {"network_weights": net.state_dict(), "optimizer_state": opt.state_dict(), "grad_scaler_state": None,
            "logging": log, "_best_ema": np.float64(0.55), "current_epoch": 3,
            "init_args": {"plans": {"a": [1, 2]}, "configuration": "3d_fullres", "fold": 0, "dataset_json": {},
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}


def test_nnunet_checkpoint_loads_without_full_pickle(tmp_path):
    from oarbench.robustness.predictors import load_checkpoint

    ckpt = _nnunet_like_checkpoint()
    torch.save(ckpt, tmp_path / "c.pth")
    loaded = load_checkpoint(tmp_path / "c.pth")
    for key, value in ckpt["network_weights"].items():
        assert torch.equal(loaded["network_weights"][key], value)
    assert loaded["_best_ema"] == 0.55 and loaded["init_args"]["device"] == torch.device("cpu")
    assert loaded["logging"]["dice_per_class_or_region"][0][1] == np.float32(0.6)
    assert loaded["inference_allowed_mirroring_axes"] == (0, 1, 2)


def test_checkpoint_that_runs_code_is_refused_unless_trusted(tmp_path):
    from oarbench.robustness.predictors import load_checkpoint

    marker = tmp_path / "code-ran"
    ckpt = _nnunet_like_checkpoint()
    ckpt["logging"]["extra"] = _RunsCode(str(marker))
    torch.save(ckpt, tmp_path / "c.pth")
    with pytest.raises(ValueError, match=r"c\.pth: the checkpoint holds an object that is not model data "
                                         r"\(posix\.mkdir\).*--trust-checkpoint"):
        load_checkpoint(tmp_path / "c.pth")
    assert not marker.exists()
    load_checkpoint(tmp_path / "c.pth", trust=True)  # the explicit opt-in loads with full pickle
    assert marker.is_dir()


@pytest.mark.nnunet
def test_model_folder_with_hostile_checkpoint_is_refused(tmp_path):
    pytest.importorskip("nnunetv2")
    from oarbench.robustness import parse_predictor
    from tests.test_robustness_nnunet import _plans

    folder = tmp_path / "model"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(_plans()))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                     "labels": {"background": 0, "Liver": 1}, "numTraining": 1}))
    marker = tmp_path / "code-ran"
    ckpt = {"network_weights": {}, "trainer_name": "nnUNetTrainer", "init_args": {"configuration": "3d_fullres"},
            "payload": _RunsCode(str(marker))}
    torch.save(ckpt, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ValueError, match="--trust-checkpoint"):
        parse_predictor(f"nnunet:{folder}:0").load()
    assert not marker.exists()


def test_robustness_cli_offers_the_trust_flag():
    from oarbench.cli import main

    result = CliRunner().invoke(main, ["robustness", "--help"])
    assert result.exit_code == 0 and "--trust-checkpoint" in result.output


def test_checkpoints_load_from_two_threads_at_once(tmp_path, monkeypatch):
    """PyTorch's allowed globals are one set per process: a thread leaving ``safe_globals`` removes them
    while another thread still loads (seen as a sporadic "not model data (numpy...scalar)" refusal when
    two predictors loaded in threads). Each load here holds the file open for 0.3 s, the second starting
    0.1 s after the first; both must load, and each must still see the numpy types it needs at the end."""
    import threading
    import time

    from oarbench.robustness import predictors

    torch.save(_nnunet_like_checkpoint(), tmp_path / "c.pth")
    real_load = torch.load
    seen: list[bool] = []

    def slow_load(*args, **kwargs):
        time.sleep(0.3)
        seen.append(any(getattr(g, "__name__", "") == "scalar" for g in torch.serialization.get_safe_globals()))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", slow_load)
    results: list = []

    def load() -> None:
        results.append(predictors.load_checkpoint(tmp_path / "c.pth")["_best_ema"])

    threads = [threading.Thread(target=load) for _ in range(2)]
    threads[0].start()
    time.sleep(0.1)
    threads[1].start()
    for t in threads:
        t.join(timeout=30)
    assert seen == [True, True] and results == [0.55, 0.55]
