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
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True, help="--train: epochs of each local model.")
@click.option("--iterations", type=click.IntRange(min=1), default=10, show_default=True, help="--train: iterations per epoch.")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True, help="--train: federated rounds (one local epoch each).")
@click.option("--width", type=click.Choice(["tiny", "default"]), default="tiny", show_default=True, help="--train: network width.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="--train: training and inference device.")
@click.option("--engine", type=click.Choice(["storage", "flower"]), default="storage", show_default=True, help="--train: federated engine (flower: a SuperLink and SuperNodes on loopback; needs the flower extra).")
@user_errors
def demo(out: Path, config: Path | None, workers: int, force: bool, train: bool, epochs: int, iterations: int,
         rounds: int, width: str, device: str, engine: str) -> None:
    """Synthetic two-centre study: evaluate, false-positive kidneys, statistics, gallery, report."""
    from oarbench.demo import TrainSettings, run_demo

    settings = TrainSettings(epochs=epochs, iterations=iterations, rounds=rounds, width=width, device=device,
                             engine=engine) if train else None
    outputs = run_demo(out, config=config, workers=workers, force=force, train=settings, log=click.echo)
    click.echo(f"report: {outputs['report']}")
