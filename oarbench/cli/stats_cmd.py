"""``oarbench stats``: paired and cross-centre statistics of a results table."""

from __future__ import annotations

from pathlib import Path

import click

from oarbench.cli._common import user_errors


def _parse_margins(values: tuple[str, ...]) -> dict[str, float]:
    margins: dict[str, float] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r}: expected METRIC=VALUE, e.g. dsc=0.01", param_hint="--margin")
        try:
            margins[name.strip().lower()] = float(value)
        except ValueError as exc:
            raise click.BadParameter(f"{item!r}: {value!r} is not a number", param_hint="--margin") from exc
    return margins


def _print_table(df) -> None:  # noqa: ANN001 - pandas DataFrame
    """One table per comparison family; rich when installed, plain text otherwise."""
    from oarbench.stats import format_table, summary_frame

    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: plain text works everywhere
        click.echo(format_table(df))
        return
    view = summary_frame(df)
    if view.empty:
        click.echo("(no comparisons)")
        return
    if not (view["non-inferiority"] != "").any():
        view = view.drop(columns="non-inferiority")
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze into 80 columns
        console = Console(width=320)
    for title, block in view.groupby("family", sort=False):
        table = Table(title=title, title_justify="left", header_style="bold")
        cols = [c for c in block.columns if c != "family"]
        for col in cols:
            table.add_column(col)
        for _, row in block.iterrows():
            style = "bold" if str(row["verdict"]).startswith("significant") else None
            table.add_row(*(str(row[c]) for c in cols), style=style)
        console.print(table)


@click.command("stats")
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for stats.csv (created if needed).")
@click.option("--metrics", default="dsc,hd95,msd", show_default=True,
              help="Comma-separated metric columns: dsc, sdsc, vs (higher is better); hd95, hd, msd, assd, "
                   "centroid_mm, apl_mm, apl_mm_per_slice (mm, lower is better).")
@click.option("--correction", type=click.Choice(["holm", "fdr_bh", "bonferroni"]), default="holm",
              show_default=True, help="multipletests method, applied within each comparison family.")
@click.option("--zero-method", type=click.Choice(["pratt", "wilcox", "zsplit"]), default="pratt",
              show_default=True, help="How the signed-rank test treats zero differences.")
@click.option("--margin", "margins", multiple=True, metavar="METRIC=VALUE",
              help="Non-inferiority margin in the metric's unit, e.g. dsc=0.01 or hd95=1.0 (mm). Repeatable.")
@click.option("--pair", "pairs", multiple=True, metavar="A:B",
              help="Model pair to compare, e.g. fl:local-A (A is tested for non-inferiority to B). "
                   "Repeatable; default all pairs.")
@click.option("--observer", "observers", multiple=True, metavar="NAME",
              help="A model of the table that is a second observer's contours: every other model is tested "
                   "for non-inferiority to it (with --margin). Repeatable; default the run record's observers.")
@click.option("--alpha", type=float, default=0.05, show_default=True,
              help="Two-sided significance level (adjusted p).")
@click.option("--ni-alpha", type=float, default=0.025, show_default=True,
              help="One-sided level of the non-inferiority test; the interval shown is the two-sided "
                   "1 - 2 * ni-alpha interval (0.025: 95 %).")
@click.option("--unit", type=click.Choice(["patient", "scan"]), default="patient", show_default=True,
              help="Unit of analysis: average each patient's scans per structure (patient column of the "
                   "table; default the case), or test every scan (warns when a patient has several).")
@click.option("--family", type=click.Choice(["comparison", "study"]), default="comparison", show_default=True,
              help="Correction family: one per centre x model pair (or model x centre pair), or every test "
                   "of the run.")
@click.option("--n-resamples", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Bootstrap resamples (of patients) for the intervals of the median and mean difference; "
                   "0: none.")
@click.option("--seed", type=int, default=12345, show_default=True, help="Seed of the bootstrap.")
@click.option("--bootstrap-method", type=click.Choice(["percentile", "bca"]), default="percentile",
              show_default=True, help="Bootstrap interval (bca only where every value is finite).")
@click.option("--condition", default="original", show_default=True,
              help="Condition rows to analyse; 'all' analyses each condition separately.")
@click.option("--run-json", "run_json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="run.json of the evaluation, for the methods paragraph [default: beside RESULTS].")
@click.option("--table/--no-table", "show_table", default=True, show_default=True,
              help="Print the readable table on the terminal.")
@user_errors
def stats(results: Path, out_dir: Path, metrics: str, correction: str, zero_method: str,
          margins: tuple[str, ...], pairs: tuple[str, ...], observers: tuple[str, ...], alpha: float,
          ni_alpha: float, unit: str,
          family: str, n_resamples: int, seed: int, bootstrap_method: str, condition: str,
          run_json: Path | None, show_table: bool) -> None:
    """Wilcoxon signed-rank (paired) and Mann-Whitney U (cross-centre) tests on RESULTS.csv (or metrics.parquet).

    Writes OUT/stats.csv, OUT/one_arm_absent.csv (pairs where only one model says the organ
    is absent), and the manuscript's tables and methods paragraph: OUT/paper_table.csv,
    OUT/paper_table.tex (booktabs), OUT/methods.md; see docs/statistics.md.
    """
    import warnings

    from oarbench.stats import BootstrapOptions, one_arm_absent, read_results, run_stats, write_stats

    metric_list = [m.strip().lower() for m in metrics.split(",") if m.strip()]
    table = read_results(results)
    run = _run_record(run_json, results)
    if not observers and run is not None and isinstance(run.get("observers"), list):
        observers = tuple(str(o) for o in run["observers"] if str(o) in set(table["model"].astype(str)))
    boot = BootstrapOptions(n_resamples=n_resamples, seed=seed, method=bootstrap_method)
    cond = None if condition == "all" else condition
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = run_stats(
            table,
            pairs=list(pairs) or None,
            metrics=metric_list,
            zero_method=zero_method,
            correction=correction,
            alpha=alpha,
            margins=_parse_margins(margins),
            ni_alpha=ni_alpha,
            condition=cond,
            unit=unit,
            family=family,
            bootstrap=boot if n_resamples else None,
            source=str(results),
            observers=observers,
        )
    for w in caught:
        if issubclass(w.category, UserWarning):
            click.echo(f"warning: {w.message}", err=True)
    path = write_stats(df, out_dir / "stats.csv")
    absent_rows = one_arm_absent(table, pairs=list(pairs) or None, condition=cond, source=str(results))
    write_stats(absent_rows, out_dir / "one_arm_absent.csv")
    _write_paper(table, df, metric_list, boot if n_resamples else None, alpha, run, out_dir, observers)
    if show_table:
        _print_table(df)
    if df.empty and table["model"].nunique() < 2 and table["centre"].nunique() < 2:
        click.echo(f"one model ({', '.join(sorted(map(str, table['model'].unique())))}) and one centre in "
                   f"{results}: nothing to compare; score two models in one table with "
                   "`oarbench evaluate --prediction A/ --prediction B/` (docs/evaluate.md)", err=True)
    n_sig = int(df["verdict"].astype(str).str.startswith("significant").sum()) if not df.empty else 0
    tested = int(df["p"].notna().sum()) if not df.empty else 0
    click.echo(f"{len(df)} comparisons, {tested} tested, {n_sig} significant at adjusted p < {alpha:g} "
               f"({correction}, {family} family, unit {unit}); {len(absent_rows)} one-arm-absent pair(s) "
               f"listed apart; wrote {path}")


def _run_record(run_json: Path | None, results: Path) -> dict | None:
    """The run record (run.json beside RESULTS, or --run-json), or None when there is none."""
    import json

    path = run_json if run_json is not None else Path(results).parent / "run.json"
    run = None
    if path.is_file():
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"{path}: cannot read the run record ({exc})") from None
        if not isinstance(run, dict):
            raise click.ClickException(f"{path}: the run record must be a JSON object")
    elif run_json is not None:
        raise click.ClickException(f"{path}: run record not found")
    return run


def _write_paper(table, stats_df, metrics, boot, alpha, run, out_dir, observers=()) -> None:  # noqa: ANN001
    """paper_table.csv/.tex and methods.md from the table, the statistics and run.json."""
    from oarbench.stats.paper import methods_paragraph, paper_table, trained_on_from_run, write_paper_outputs

    present = [m for m in metrics if m in table.columns]
    paper = paper_table(table, stats_df, metrics=present, trained_on=trained_on_from_run(run), bootstrap=boot,
                        alpha=alpha, observers=observers)
    written = write_paper_outputs(out_dir, paper, methods_paragraph(run, stats_df, boot))
    click.echo("wrote " + ", ".join(str(p) for p in written.values()))
