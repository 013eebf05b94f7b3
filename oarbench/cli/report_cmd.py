"""``oarbench gallery`` and ``oarbench report``: failure-case montages and the HTML report."""

from __future__ import annotations

from pathlib import Path

import click

from oarbench.cli._common import user_errors


def _read_table(path: Path, what: str):  # -> pandas.DataFrame
    import pandas as pd

    if path.suffix == ".parquet":
        from oarbench.tables import read_table

        return read_table(path)
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read {what} as CSV: {exc}") from exc


@click.command()
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option("--study", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Study TOML giving images/reference per centre and predictions per model.")
@click.option("--images", type=str, help="CT folder (CASE_0000.nii.gz); may contain {centre}.")
@click.option("--reference", type=str, help="Reference label folder (CASE.nii.gz); may contain {centre}.")
@click.option("--predictions", type=str, help="Prediction folder; may contain {model}, {centre}, {condition}.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Analysis folder; the gallery goes to OUT/gallery/.")
@click.option("--k", default=3, show_default=True, type=click.IntRange(min=1), help="Cases per ranking (lowest DSC, highest HD95, largest drops).")
@click.option("--ncols", default=4, show_default=True, type=click.IntRange(min=1), help="Tiles per montage row.")
@user_errors
def gallery(results: Path, study: Path | None, images: str | None, reference: str | None, predictions: str | None,
            out_dir: Path, k: int, ncols: int) -> None:
    """Draw failure-case montages (OUT/gallery/STRUCTURE.png, index.csv, index.html) from RESULTS.csv
    (or a metrics.parquet dataset)."""
    from oarbench.gallery import PathResolver, build_gallery

    folders = (images, reference, predictions)
    if study is not None and any(f is not None for f in folders):
        raise click.UsageError("give either --study or --images/--reference/--predictions, not both")
    if study is None and not all(f is not None for f in folders):
        raise click.UsageError("give --study STUDY.toml, or all of --images, --reference and --predictions")
    resolver = PathResolver.from_study(study) if study is not None else PathResolver.from_folders(images, reference, predictions)  # type: ignore[arg-type]
    table = _read_table(results, "results table")
    result = build_gallery(table, resolver, out_dir / "gallery", k=k, ncols=ncols, source=str(results))
    drawn = int(result.index["drawn"].sum()) if len(result.index) else 0
    click.echo(f"selected {len(result.index)} rows, drew {drawn} tiles in {len(result.montages)} montages -> {result.folder}")
    if len(result.index) and drawn < len(result.index):
        notes = result.index.loc[~result.index["drawn"].astype(bool), "note"].astype(str)
        click.echo(f"{len(notes)} rows not drawn (see index.csv 'note'), e.g.: {notes.iloc[0]}", err=True)


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), help="HTML file to write (default FOLDER/report.html).")
@click.option("--no-box-plots", is_flag=True, help="Leave out the box plots (faster).")
@user_errors
def report(folder: Path, out_file: Path | None, no_box_plots: bool) -> None:
    """Build one self-contained HTML report from an analysis FOLDER.

    Reads FOLDER/metrics.csv (or, without it, FOLDER/metrics.parquet) and,
    where present, stats.csv, robustness.csv, absent.csv, gallery/ and run.json.
    """
    from oarbench.report import build_report

    metrics = folder / "metrics.csv"
    if not metrics.is_file():
        metrics = folder / "metrics.parquet"
        if not metrics.is_dir():
            raise ValueError(f"{folder}: no metrics.csv or metrics.parquet (run `oarbench evaluate` first)")
    optional = {
        "stats": folder / "stats.csv",
        "robustness": folder / "robustness.csv",
        "absent": folder / "absent.csv",
        "gallery_dir": folder / "gallery",
        "provenance": folder / "run.json",
    }
    found: dict[str, object] = {}
    notes = []
    for key, path in optional.items():
        exists = path.is_dir() if key == "gallery_dir" else path.is_file()
        if exists:
            found[key] = path
            click.echo(f"using {path}")
        else:
            notes.append(f"not found: {path.name}{'/' if key == 'gallery_dir' else ''}")
            click.echo(f"not found, section left empty: {path}", err=True)
    target = out_file if out_file is not None else folder / "report.html"
    path = build_report(target.parent, metrics, filename=target.name, notes=notes, box_plots=not no_box_plots, **found)  # type: ignore[arg-type]
    click.echo(f"wrote {path}")
