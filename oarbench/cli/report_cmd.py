"""``oarbench gallery`` and ``oarbench report``: failure-case montages and the HTML report."""

from __future__ import annotations

from pathlib import Path

import click

from oarbench.cli._common import user_errors


def _off_or_float(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None or value.strip().lower() in {"off", "none"}:
        return None
    try:
        v = float(value)
    except ValueError:
        raise click.BadParameter(f"expected a number or 'off', got {value!r}") from None
    if not v >= 0 or v == float("inf"):
        raise click.BadParameter(f"expected a finite number >= 0 or 'off', got {value!r}")
    return v


def failure_options(fn):  # type: ignore[no-untyped-def]
    """--dsc-below, --hd95-above, --drop-above: what counts as a failure (gallery and report)."""
    fn = click.option("--drop-above", default="0.1", show_default=True, callback=_off_or_float,
                      help="A DSC drop under a robustness condition larger than this is a failure ('off' to turn off).")(fn)
    fn = click.option("--hd95-above", default="10", show_default=True, callback=_off_or_float,
                      help="An HD95 (mm) above this is a failure ('off' to turn off).")(fn)
    fn = click.option("--dsc-below", default="0.7", show_default=True, callback=_off_or_float,
                      help="A DSC below this is a failure ('off' to turn off).")(fn)
    return fn


def _read_table(path: Path, what: str):  # -> pandas.DataFrame
    from oarbench.tables import read_table

    return read_table(path, what=what)


def _tile_progress(enabled: bool):  # -> callable(done, total)
    """A ``progress(done, total)`` callback drawing one bar (created at the first call)."""
    from oarbench.progress import progress_bar

    state: dict = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = progress_bar(total, desc="gallery", unit="tile", enabled=enabled)
        state["bar"].update(1)
        if done >= total:
            state["bar"].close()

    return update


@click.command()
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option("--study", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Study TOML giving images/reference per centre and predictions per model.")
@click.option("--images", type=str, help="CT folder (CASE_0000.nii.gz); may contain {centre}.")
@click.option("--reference", type=str, help="Reference label folder (CASE.nii.gz); may contain {centre}.")
@click.option("--predictions", type=str, help="Prediction folder; may contain {model}, {centre}, {condition}.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Analysis folder; the gallery goes to OUT/gallery/.")
@click.option("--k", default=3, show_default=True, type=click.IntRange(min=1), help="At most this many rows per structure, model and centre for each threshold rule (and per condition for drops), worst first.")
@failure_options
@click.option("--small-island-voxels", default=10, show_default=True, type=click.IntRange(min=0),
              help="Count reference islands (connected components) of at most this many voxels in index.csv.")
@click.option("--ncols", default=4, show_default=True, type=click.IntRange(min=1), help="Tiles per montage row.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes that draw the montages (the same files with any number).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@user_errors
def gallery(results: Path, study: Path | None, images: str | None, reference: str | None, predictions: str | None,
            out_dir: Path, k: int, dsc_below: float | None, hd95_above: float | None, drop_above: float | None,
            small_island_voxels: int, ncols: int, workers: int, no_progress: bool) -> None:
    """Draw failure-case montages (OUT/gallery/STRUCTURE.png, index.csv, index.html) from RESULTS.csv
    (or a metrics.parquet dataset).

    Only rows where something failed are drawn (docs/report.md): DSC below
    --dsc-below, HD95 above --hd95-above, Tukey outliers, missed/hallucinated
    structures, laterality swaps, DSC drops above --drop-above under robustness
    conditions.
    """
    from oarbench.gallery import FailureCriteria, PathResolver, build_gallery

    folders = (images, reference, predictions)
    if study is not None and any(f is not None for f in folders):
        raise click.UsageError("give either --study or --images/--reference/--predictions, not both")
    if study is None and not all(f is not None for f in folders):
        raise click.UsageError("give --study STUDY.toml, or all of --images, --reference and --predictions")
    resolver = PathResolver.from_study(study) if study is not None else PathResolver.from_folders(images, reference, predictions)  # type: ignore[arg-type]
    table = _read_table(results, "results table")
    criteria = FailureCriteria(dsc_below=dsc_below, hd95_above=hd95_above, drop_above=drop_above, k=k)
    result = build_gallery(table, resolver, out_dir / "gallery", criteria=criteria, ncols=ncols, source=str(results),
                           small_island_voxels=small_island_voxels, progress=_tile_progress(not no_progress),
                           workers=workers)
    drawn = int(result.index["drawn"].sum()) if len(result.index) else 0
    if not len(result.index):
        click.echo(f"no failures: {criteria.describe()}")
    click.echo(f"selected {len(result.index)} rows, drew {drawn} tiles in {len(result.montages)} montages -> {result.folder}")
    if len(result.index) and drawn < len(result.index):
        notes = result.index.loc[~result.index["drawn"].astype(bool), "note"].astype(str)
        if drawn == 0:  # every file it needed was missing or damaged: no gallery at all
            raise ValueError(f"none of the {len(notes)} selected rows could be drawn (see "
                             f"{result.folder / 'index.csv'} 'note'), e.g.: {notes.iloc[0]}")
        click.echo(f"{len(notes)} rows not drawn (see index.csv 'note'), e.g.: {notes.iloc[0]}", err=True)


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), help="HTML file to write (default FOLDER/report.html).")
@click.option("--no-box-plots", is_flag=True, help="Leave out the per-structure box plots (faster).")
@click.option("--dsc-below", default=None, callback=_off_or_float,
              help="Failure rule: DSC below this ('off' to turn off) [default: the gallery's rules, else 0.7].")
@click.option("--hd95-above", default=None, callback=_off_or_float,
              help="Failure rule: HD95 (mm) above this ('off' to turn off) [default: the gallery's rules, else 10].")
@click.option("--drop-above", default=None, callback=_off_or_float,
              help="Failure rule: DSC drop under a robustness condition above this ('off') [default: the gallery's rules, else 0.1].")
@click.option("--high-dsc", default=0.9, show_default=True, type=click.FloatRange(0, 1),
              help="Explain rows with HD95 above the failure threshold and DSC at least this as far-away islands.")
@click.option("--small-reference-voxels", default=10, show_default=True, type=click.IntRange(min=0),
              help="Flag reference structures of at most this many voxels (0: off).")
@click.option("--fp-thresholds", default=None, help="Volume thresholds (mL) of the false-positive kidney rates, e.g. 0,0.5,1,5.")
@click.option("--strict", is_flag=True,
              help="Refuse a gallery or robustness table older than the results table or about other models "
                   "(default: build the report and say so on the page).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@user_errors
def report(folder: Path, out_file: Path | None, no_box_plots: bool, dsc_below: float | None, hd95_above: float | None,
           drop_above: float | None, high_dsc: float, small_reference_voxels: int, fp_thresholds: str | None,
           strict: bool, no_progress: bool) -> None:
    """Build one self-contained HTML report from an analysis FOLDER.

    Reads FOLDER/metrics.csv (or, without it, FOLDER/metrics.parquet) and,
    where present, stats.csv, robustness.csv, noise_floor.csv, absent.csv,
    absent_pairs.csv, gallery/ and run.json (whose study TOML, when it still
    exists, tells which centres each model was trained on and the model order).
    Every input must lie inside FOLDER (links leading out of it are refused).
    """
    from dataclasses import replace

    from oarbench.report import ReportOptions, build_report, inside
    from oarbench.report.context import run_record_facts, run_record_notes

    metrics = folder / "metrics.csv"
    if not metrics.is_file():
        metrics = folder / "metrics.parquet"
        if not metrics.is_dir():
            raise ValueError(f"{folder}: no metrics.csv or metrics.parquet (run `oarbench evaluate` first)")
    optional = {
        "stats": "stats.csv",
        "robustness": "robustness.csv",
        "noise_floor": "noise_floor.csv",
        "robustness_summary": "robustness_summary.csv",
        "absent": "absent.csv",
        "absent_pairs": "absent_pairs.csv",
        "gallery_dir": "gallery",
        "provenance": "run.json",
    }
    found: dict[str, object] = {}
    notes = []
    for key, name in optional.items():
        path = folder / name
        exists = path.is_dir() if key == "gallery_dir" else path.is_file()
        if exists:
            found[key] = inside(folder, name, "input")
            click.echo(f"using {path}")
        elif key not in ("noise_floor", "robustness_summary", "absent_pairs"):
            notes.append(f"not found: {name}{'/' if key == 'gallery_dir' else ''}")
            click.echo(f"not found, section left empty: {path}", err=True)
    thresholds = None
    if fp_thresholds is not None:
        try:
            thresholds = tuple(float(t) for t in fp_thresholds.split(",") if t.strip())
        except ValueError:
            raise click.BadParameter(f"expected numbers separated by commas, got {fp_thresholds!r}", param_hint="--fp-thresholds") from None
        if not thresholds or any(not (t >= 0) or t == float("inf") for t in thresholds):
            raise click.BadParameter(f"expected finite numbers >= 0, got {fp_thresholds!r}", param_hint="--fp-thresholds")
    trained_on, models = run_record_facts(folder / "run.json")
    options = ReportOptions(high_dsc=high_dsc, small_reference_voxels=small_reference_voxels, fp_thresholds_ml=thresholds,
                            trained_on=trained_on, models=models, strict=strict)
    given = {"dsc_below": dsc_below, "hd95_above": hd95_above, "drop_above": drop_above}
    ctx = click.get_current_context()
    explicit = {k: v for k, v in given.items() if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    if explicit:
        from oarbench.gallery import FailureCriteria
        from oarbench.report import gallery_criteria

        base = gallery_criteria(found.get("gallery_dir")) or FailureCriteria()  # type: ignore[arg-type]
        options = replace(options, criteria=replace(base, **explicit))
    target = out_file if out_file is not None else folder / "report.html"
    from oarbench.progress import progress_bar

    with progress_bar(1, desc="report", unit="report", enabled=not no_progress) as bar:
        bar.set_postfix_str("figures, tables, galleries")
        path = build_report(target.parent, metrics, filename=target.name, notes=notes, box_plots=not no_box_plots,
                            options=options, section_notes=run_record_notes(folder / "run.json"), **found)  # type: ignore[arg-type]
        bar.update(1)
    click.echo(f"wrote {path}")
