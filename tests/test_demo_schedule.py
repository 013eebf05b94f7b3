"""`oarbench demo --train` settings and model orchestration, without training (fast)."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from oarbench.demo import SCHEDULES, TrainSettings, train_models
from oarbench.train.nnunet import NnunetPaths, TrainerOptions, nnunet_env


def test_quick_schedule_options_and_key() -> None:
    quick = TrainSettings.schedule("quick")
    assert (quick.configuration, quick.width, quick.optimizer) == ("2d", "tiny", "adam")
    assert quick.rounds * quick.local_epochs == quick.epochs  # federated sites follow the local schedule
    opts = quick.options()
    assert opts == TrainerOptions(augmentation="light", initial_lr=quick.initial_lr, batch_size=quick.batch_size,
                                  optimizer="adam", foreground_oversampling=1.0, pseudo_dice=False, precision="auto")
    # skipping the validation's forward passes leaves the weights as they are: not part of the key
    assert "pseudo_dice" not in quick.training_key()
    # the arithmetic changes the weights: a model trained in float32 is not reused by a bfloat16 run
    assert quick.training_key()["precision"] == quick.training_key(federated=False)["precision"] == "auto"
    assert opts.spec()["foreground_oversampling"] == 1.0
    # a model trained with another oversampling is another model
    assert "foreground_oversampling" in quick.training_key()
    full = TrainSettings.schedule("full")
    assert full.options() == TrainerOptions()  # nnU-Net's own trainer settings
    assert SCHEDULES["full"]["foreground_oversampling"] is None


def test_the_training_seed_reaches_the_trainer_options_and_the_key() -> None:
    """The demo's seed is every model's (local and federated: both keys hold it) and travels in the trainer
    options, which both engines hand to the sites; a seed that is not a 32-bit count is refused."""
    s = TrainSettings.schedule("quick", seed=3)
    assert s.options().seed == 3 and TrainSettings.schedule("quick").options().seed == 0
    assert s.training_key()["seed"] == s.training_key(federated=False)["seed"] == 3
    assert json.loads(s.options().to_json())["seed"] == 3
    assert TrainerOptions.from_json(s.options().to_json()) == s.options()
    for bad in (-1, 2**32, 1.5, True, "3"):
        with pytest.raises(ValueError, match="seed must be an integer"):
            TrainSettings.schedule("quick", seed=bad)
        with pytest.raises(ValueError, match="seed must be an integer"):
            TrainerOptions(seed=bad)


def test_the_warmup_reaches_the_trainer_options_and_both_keys() -> None:
    """The warm-up is every model's (a federated site counts it from its first round, so both keys hold it)
    and travels in the trainer options; a warm-up that is not a count of iterations is refused."""
    s = TrainSettings.schedule("quick", warmup=40)
    assert s.options().warmup == 40
    assert s.training_key()["warmup"] == s.training_key(federated=False)["warmup"] == 40
    assert json.loads(s.options().to_json())["warmup"] == 40
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="warmup must be a non-negative number of iterations"):
            TrainSettings.schedule("quick", warmup=bad)


def test_demo_train_seed_needs_train_and_reaches_the_settings(tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    import oarbench.demo as demo
    from oarbench.cli import main

    got = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: got.update(kw) or {"report": out / "report.html"})
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--train-seed", "2"])
    assert result.exit_code == 2 and "--train-seed need --train" in result.output
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--train", "--train-seed", "2"])
    assert result.exit_code == 0, result.output
    assert got["train"] == TrainSettings.schedule("quick", seed=2)


def test_schedule_overrides_keep_fl_sites_on_the_local_schedule() -> None:
    s = TrainSettings.schedule("quick", epochs=4, iterations=20)
    assert (s.epochs, s.rounds, s.local_epochs, s.iterations) == (4, 4, 1, 20)
    s = TrainSettings.schedule("quick", epochs=6, rounds=3)
    assert (s.rounds, s.local_epochs) == (3, 2)
    with pytest.raises(ValueError, match="multiple of rounds"):
        TrainSettings.schedule("quick", epochs=5, rounds=2)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_foreground_oversampling_is_checked(bad: float) -> None:
    with pytest.raises(ValueError, match="foreground_oversampling must be in"):
        TrainerOptions(foreground_oversampling=bad)


def test_training_threads_reach_the_child_environment(tmp_path: Path) -> None:
    env = nnunet_env(NnunetPaths.under(tmp_path), training=True, threads=1)
    assert env["OMP_NUM_THREADS"] == "1"


def _study(tmp_path: Path) -> SimpleNamespace:
    models = [SimpleNamespace(name="local-A", trained_on=("A",)), SimpleNamespace(name="local-B", trained_on=("B",)),
              SimpleNamespace(name="fl", trained_on=("A", "B"))]
    return SimpleNamespace(models=models, path=tmp_path / "study.toml")


def test_models_train_at_the_same_time_sharing_the_cores(tmp_path: Path, monkeypatch) -> None:
    import oarbench.demo as demo

    barrier = threading.Barrier(3, timeout=20)  # breaks unless all three models train at once
    calls = {}

    def fake(model, datasets, work, settings, threads):
        calls[model.name] = threads
        barrier.wait()
        folder = work / "model"
        folder.mkdir(parents=True)
        return folder

    monkeypatch.setattr(demo, "_train_model", fake)
    datasets = {"A": tmp_path / "A", "B": tmp_path / "B"}
    settings = TrainSettings.schedule("quick")
    folders = train_models(_study(tmp_path), datasets, tmp_path / "models", settings, log=lambda _: None)
    assert list(folders) == ["local-A", "local-B", "fl"]
    # four training processes (two local models, two federated sites) share the machine's cores
    assert set(calls.values()) == {max(1, (os.cpu_count() or 1) // 4)}
    for name, folder in folders.items():
        assert Path((tmp_path / "models" / name / "model_folder.txt").read_text()) == folder.resolve()
        key = settings.training_key(federated=name == "fl")
        assert json.loads((tmp_path / "models" / name / "training.json").read_text()) == key
    assert "plan_spacing" not in settings.training_key(federated=False)
    assert settings.training_key()["plan_spacing"] == "finest"
    # a re-run reuses them; another schedule is refused, naming what differs
    calls.clear()
    assert train_models(_study(tmp_path), datasets, tmp_path / "models", settings, log=lambda _: None) == folders
    assert calls == {}
    other = TrainSettings.schedule("quick", iterations=7)
    with pytest.raises(ValueError, match=r"other settings \(iterations differ\)"):
        train_models(_study(tmp_path), datasets, tmp_path / "models", other, log=lambda _: None)
    # a folder whose training.json predates the recorded arithmetic (trained in float32) is refused too
    key_file = tmp_path / "models" / "local-A" / "training.json"
    recorded = key_file.read_text()
    key_file.write_text(json.dumps({k: v for k, v in json.loads(recorded).items() if k != "precision"}))
    with pytest.raises(ValueError, match=r"models/local-A: holds a model trained with other settings \(precision differ"):
        train_models(_study(tmp_path), datasets, tmp_path / "models", settings, log=lambda _: None)
    # a folder whose training.json predates the recorded seed and warm-up was trained with seed 0 and no
    # warm-up: reused with those only
    key_file.write_text(json.dumps({k: v for k, v in json.loads(recorded).items() if k not in ("seed", "warmup")}))
    assert train_models(_study(tmp_path), datasets, tmp_path / "models", settings, log=lambda _: None) == folders
    assert calls == {}
    seeded = TrainSettings.schedule("quick", seed=1)
    with pytest.raises(ValueError, match=r"models/local-A: holds a model trained with other settings \(seed differ"):
        train_models(_study(tmp_path), datasets, tmp_path / "models", seeded, log=lambda _: None)
    warmed = TrainSettings.schedule("quick", warmup=100)
    with pytest.raises(ValueError, match=r"models/local-A: holds a model trained with other settings \(warmup differ"):
        train_models(_study(tmp_path), datasets, tmp_path / "models", warmed, log=lambda _: None)
    key_file.write_text(recorded)
    # a change of a federated setting retrains the federated model only: the local models are reused
    pooled = TrainSettings.schedule("quick", plan_spacing="pooled")
    with pytest.raises(ValueError, match=r"models/fl: holds a model trained with other settings \(plan_spacing differ"):
        train_models(_study(tmp_path), datasets, tmp_path / "models", pooled, log=lambda _: None)
    import shutil

    shutil.rmtree(tmp_path / "models" / "fl")

    def fake_alone(model, datasets, work, settings, threads):
        calls[model.name] = threads
        (work / "model").mkdir(parents=True)
        return work / "model"

    monkeypatch.setattr(demo, "_train_model", fake_alone)
    again = train_models(_study(tmp_path), datasets, tmp_path / "models", pooled, log=lambda _: None)
    assert list(calls) == ["fl"] and again["local-A"] == folders["local-A"]
    assert json.loads((tmp_path / "models" / "fl" / "training.json").read_text())["plan_spacing"] == "pooled"


def test_a_failing_model_fails_the_run(tmp_path: Path, monkeypatch) -> None:
    import oarbench.demo as demo

    def fake(model, datasets, work, settings, threads):
        if model.name == "local-B":
            raise RuntimeError("nnU-Net step 'train' failed (exit 1)")
        return work

    monkeypatch.setattr(demo, "_train_model", fake)
    with pytest.raises(RuntimeError, match="'train' failed"):
        train_models(_study(tmp_path), {"A": tmp_path, "B": tmp_path}, tmp_path / "models",
                     TrainSettings.schedule("quick"), log=lambda _: None)
    # the failed model is not marked trained; the ones that finished are, and a re-run reuses them
    assert not (tmp_path / "models" / "local-B" / "model_folder.txt").exists()
    assert (tmp_path / "models" / "local-A" / "model_folder.txt").is_file()
    assert (tmp_path / "models" / "fl" / "model_folder.txt").is_file()


def test_learning_curve_points_every_curve_every_iterations_and_the_last(tmp_path):
    """The curves predict the snapshots at multiples of ``curve_every`` iterations and the final
    weights: for a local model's epochs and for a federated model's rounds (initial weights at 0)."""

    from oarbench.demo import _snapshots

    settings = TrainSettings.schedule("quick", epochs=5, iterations=50)  # 5 rounds of one epoch
    assert settings.curve_every == 100
    snaps = tmp_path / "local-A" / "snapshots"
    snaps.mkdir(parents=True)
    for epoch in range(1, 6):
        (snaps / f"epoch_{epoch:05d}.safetensors").write_bytes(b"")
        (snaps / f"epoch_{epoch:05d}.json").write_text(json.dumps({"iterations": epoch * 50}))
    local = SimpleNamespace(name="local-A", trained_on=("A",))
    assert [i for i, _ in _snapshots(local, tmp_path, settings)] == [100, 200, 250]
    rounds = tmp_path / "fl" / "parties" / "A" / "rounds"
    rounds.mkdir(parents=True)
    for r in range(5):
        (rounds / f"global_{r:05d}.safetensors").write_bytes(b"")
    (tmp_path / "fl" / "parties" / "coordinator").mkdir()
    (tmp_path / "fl" / "parties" / "coordinator" / "final.safetensors").write_bytes(b"")
    fl = SimpleNamespace(name="fl", trained_on=("A", "B"))
    points = _snapshots(fl, tmp_path, settings)
    assert [i for i, _ in points] == [0, 100, 200, 250]
    assert points[-1][1].name == "final.safetensors"
    every = _snapshots(fl, tmp_path, dataclasses.replace(settings, curve_every=50))
    assert [i for i, _ in every] == [0, 50, 100, 150, 200, 250]
    with pytest.raises(ValueError, match="curve_every"):
        dataclasses.replace(settings, curve_every=0)
