"""``oarbench demo``: generate the synthetic two-centre study and run the whole analysis on it."""

from __future__ import annotations

from pathlib import Path

import click

from oarbench.cli._common import user_errors


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True)
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Study TOML with [phantoms] and [error_model] [default: cases/demo.toml].")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--force", is_flag=True, help="Regenerate the study and recompute every step.")
@click.option("--train", is_flag=True, help="Really train the models (nnU-Net v2: local-A, local-B, federated) instead of simulating their predictions; adds robustness.")
@click.option("--schedule", type=click.Choice(["quick", "full"]), default="quick", show_default=True,
              help="--train: quick (2d, tiny network, minutes on a CPU) or full (nnU-Net's default: 3d_fullres, "
                   "1000 epochs x 250 iterations, for a GPU).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="--train: epochs of each local model [schedule's].")
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="--train: iterations per epoch [schedule's].")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="--train: federated rounds [schedule's]; local epochs per round = epochs / rounds.")
@click.option("--width", type=click.Choice(["tiny", "small", "default"]), default=None, help="--train: network width [schedule's].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="--train: training and inference device.")
@click.option("--engine", type=click.Choice(["storage", "flower"]), default="storage", show_default=True, help="--train: federated engine (flower: a SuperLink and SuperNodes on loopback; needs the flower extra).")
@click.option("--train-seed", type=click.IntRange(min=0, max=2**32 - 1), default=None,
              help="--train: seed of every model's training (initial weights, data order) [0].")
@user_errors
def demo(out: Path, config: Path | None, workers: int, force: bool, train: bool, schedule: str, epochs: int | None,
         iterations: int | None, rounds: int | None, width: str | None, device: str, engine: str,
         train_seed: int | None) -> None:
    """Synthetic two-centre study: evaluate, false-positive kidneys, statistics, gallery, report."""
    from oarbench.demo import TrainSettings, run_demo

    settings = None
    if train:
        settings = TrainSettings.schedule(schedule, epochs=epochs, iterations=iterations, rounds=rounds,
                                          width=width, device=device, engine=engine, seed=train_seed)
    elif (any(v is not None for v in (epochs, iterations, rounds, width, train_seed)) or schedule != "quick"
          or device != "cpu" or engine != "storage"):
        raise click.UsageError("--schedule, --epochs, --iterations, --rounds, --width, --device, --engine and "
                               "--train-seed need --train")
    outputs = run_demo(out, config=config, workers=workers, force=force, train=settings, log=click.echo)
    click.echo(f"report: {outputs['report']}")
