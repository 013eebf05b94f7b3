"""``oarbench phantoms``: generate the synthetic two-centre study (docs/phantoms.md)."""

from __future__ import annotations

from pathlib import Path

import click

from oarbench.cli._common import user_errors


@click.command("phantoms")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to generate the study in (created if missing).")
@click.option("--seed", type=int, default=None, help="Random seed (default: [phantoms] seed of the config).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Study TOML with [phantoms] and [error_model] (default: cases/demo.toml).")
@click.option("--cases-per-centre", type=click.IntRange(min=1), default=None,
              help="Test cases per centre (default: [phantoms] test_cases_per_centre).")
@click.option("--force", is_flag=True, help="Replace a study already in --out.")
@user_errors
def phantoms(out_dir: Path, seed: int | None, config_path: Path | None, cases_per_centre: int | None,
             force: bool) -> None:
    """Generate synthetic paediatric CT of two centres as nnU-Net raw datasets, with
    metadata, simulated predictions of the configured models and a ready study.toml."""
    from oarbench.phantoms import generate_study, load_demo_config

    config = load_demo_config(config_path).with_overrides(seed=seed, cases_per_centre=cases_per_centre)
    paths = generate_study(out_dir, config, force=force)
    ph = config.phantoms
    if not paths.generated:
        click.echo(f"{paths.root}: study already present (seed {ph.seed}); nothing written (use --force to regenerate)")
    else:
        click.echo(f"wrote synthetic study (seed {ph.seed}) to {paths.root}")
    for centre in ph.centres:
        click.echo(f"  centre {centre.name}: {paths.datasets[centre.name]} "
                   f"({ph.train_cases_per_centre} training, {ph.test_cases_per_centre} test cases), "
                   f"metadata {paths.metadata[centre.name].name}")
    if config.models:
        names = ", ".join(m.name for m in config.models)
        click.echo(f"  predictions of {names}: {paths.predictions} (injected errors: {paths.injected_errors.name})")
    click.echo(f"  study file: {paths.study_toml}")
