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
@click.option("--format", "fmt", type=click.Choice(["nnunet", "dicom"]), default="nnunet", show_default=True,
              help="nnunet: NIfTI datasets, metadata, predictions, study.toml; dicom: CT series + RTSTRUCT per "
                   "patient, in each centre's own structure names (docs/dicom.md).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@user_errors
def phantoms(out_dir: Path, seed: int | None, config_path: Path | None, cases_per_centre: int | None,
             force: bool, fmt: str, no_progress: bool) -> None:
    """Generate synthetic paediatric CT of two centres as nnU-Net raw datasets, with
    metadata, simulated predictions of the configured models and a ready study.toml
    (or, with --format dicom, as DICOM CT + RTSTRUCT as a hospital holds them)."""
    from oarbench.phantoms import generate_study, load_demo_config

    config = load_demo_config(config_path).with_overrides(seed=seed, cases_per_centre=cases_per_centre)
    if fmt == "dicom":
        _dicom(out_dir, config, force, progress=not no_progress)
        return
    from oarbench.progress import progress_bar

    ph = config.phantoms
    n_centres = len(ph.centres)
    # one step per rendered case (training and test) and one per test case's simulated predictions
    total = n_centres * (ph.train_cases_per_centre + 2 * ph.test_cases_per_centre)
    with progress_bar(total, desc="phantoms", unit="case", enabled=not no_progress) as bar:
        def step(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)

        paths = generate_study(out_dir, config, force=force, progress=step)
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


def _dicom(out_dir: Path, config, force: bool, progress: bool = True) -> None:
    from oarbench.progress import progress_bar

    try:
        from oarbench.dicom.phantoms import generate_dicom_study
    except ImportError as exc:
        raise click.ClickException(str(exc)) from exc
    manifest = out_dir / "dicom_manifest.csv"
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise click.ClickException(f"{out_dir}: not empty; use --force to write the DICOM study into it anyway")
    ph = config.phantoms
    total = len(ph.centres) * (ph.train_cases_per_centre + ph.test_cases_per_centre)
    # minutes of work: a bar on a terminal, a line every few percent in a log
    with progress_bar(total, desc="phantoms (dicom)", unit="patients", enabled=progress, lines=True) as bar:
        def step(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)

        try:
            path = generate_dicom_study(out_dir, config, progress=step)
        except ImportError as exc:
            raise click.ClickException(str(exc)) from exc
    n = sum(1 for _ in open(path, encoding="utf-8")) - 1
    click.echo(f"wrote {n} synthetic patients (seed {config.phantoms.seed}) as DICOM CT + RTSTRUCT to {out_dir} "
               f"({manifest.name} lists them)")
