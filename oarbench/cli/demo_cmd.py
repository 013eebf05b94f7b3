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
@user_errors
def demo(out: Path, config: Path | None, workers: int, force: bool) -> None:
    """Synthetic two-centre study: evaluate, false-positive kidneys, statistics, gallery, report."""
    from oarbench.demo import run_demo

    outputs = run_demo(out, config=config, workers=workers, force=force, log=click.echo)
    click.echo(f"report: {outputs['report']}")
