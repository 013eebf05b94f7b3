"""``oarbench absent``: false-positive kidneys after nephrectomy (docs/absent.md)."""

from __future__ import annotations

from pathlib import Path

import click

from oarbench.cli._common import executor_options, open_executor, user_errors


def _parse_thresholds(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"thresholds must be comma-separated numbers (mL), got {text!r}") from None


@click.command()
@click.argument("study", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--metadata", type=click.Path(dir_okay=False, path_type=Path), help="CSV with columns case, nephrectomy (none/left/right).")
@click.option("--predictions", "predictions", multiple=True,
              help="MODEL=DIR of predicted label maps (repeat per model; DIR a path or URL); a bare DIR is model 'model'.")
@click.option("--reference", help="Reference label maps (a path or URL), to warn about empty kidneys the metadata does not explain.")
@click.option("--labels", "labels_path", metavar="MAP",
              help="default, totalsegmentator, or an nnU-Net dataset.json / labels TOML [default: the dataset.json "
                   "beside or above --reference, else the 19-OAR map] (docs/labels.md).")
@click.option("--thresholds", help="Comma-separated FP volume thresholds in mL [default: 0,0.5,1,5 or the study's].")
@click.option("--model", "models", multiple=True, help="With a study: only these models.")
@click.option("--centre", default=None, help="With --metadata/--predictions: the centre's name [default: all].")
@click.option("--study-name", default=None, help="With --metadata/--predictions: the study name [default: own-data].")
@click.option("--out", default="oarbench-out", show_default=True, help="Output folder: a path or URL (s3://...).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Parallel per-case tasks (processes, or workers of a local Dask cluster).")
@executor_options
@user_errors
def absent(study, metadata, predictions, reference, labels_path, thresholds, models, centre, study_name, out, workers,
           executor_kind, scheduler, resources, batch):
    """False-positive kidneys on the removed side: absent.csv, absent_summary.csv, absent_pairs.csv, absent_cases.csv.

    Either STUDY.toml (each centre's metadata, reference and every model's
    predictions) or --metadata CSV --predictions MODEL=DIR [...].
    """
    from oarbench.absent import write_absent

    thr = _parse_thresholds(thresholds)
    if study is not None and (metadata or predictions or centre is not None or study_name is not None):
        raise click.UsageError("give either STUDY.toml or --metadata/--predictions (with --centre/--study-name), not both")
    if study is None and not (metadata and predictions):
        raise click.UsageError("give STUDY.toml, or --metadata and --predictions")
    executor = open_executor(executor_kind, workers, scheduler, resources, batch)
    try:
        result = _analyse(study, metadata, predictions, reference, labels_path, thr, models, executor,
                          centre, study_name)
    finally:
        executor.close()
    paths = write_absent(result, out)
    for w in result.warnings.itertuples():
        click.echo(f"warning: {w.centre + '/' if w.centre else ''}{w.case}: {w.message}", err=True)
    click.echo(f"{len(result.cases)} case x model rows, {len(result.fp_cases)} with a false-positive kidney")
    for p in paths.values():
        click.echo(f"wrote {p}")


def _analyse(study, metadata, predictions, reference, labels_path, thr, models, executor, centre=None, study_name=None):
    from oarbench.absent import DEFAULT_THRESHOLDS_ML, analyse_absent, read_nephrectomy
    from oarbench.io import find_cases
    from oarbench.labels import load_label_map, resolve_labels
    from oarbench.tables import DEFAULT_CENTRE, DEFAULT_STUDY

    if study is not None:
        if metadata or predictions:
            raise click.UsageError("give either STUDY.toml or --metadata/--predictions, not both")
        from oarbench.absent import analyse_study_absent
        from oarbench.study import load_study

        labels = load_label_map(labels_path) if labels_path else None
        return analyse_study_absent(load_study(study), models=models or None, thresholds_ml=thr, labels=labels,
                                    warn=lambda msg: click.echo(msg, err=True), executor=executor)
    else:
        if not metadata or not predictions:
            raise click.UsageError("give STUDY.toml, or --metadata and --predictions")
        resolved = resolve_labels(labels_path, reference)
        click.echo(resolved.note, err=True)
        labels = resolved.labels
        thr = thr or DEFAULT_THRESHOLDS_ML
        names = {"study": DEFAULT_STUDY if study_name is None else study_name,
                 "centre": DEFAULT_CENTRE if centre is None else centre}
        for key, value in names.items():
            if not value.strip():
                raise click.BadParameter(f"the {key} name must not be empty")
        preds = {}
        for item in predictions:
            name, sep, folder = item.rpartition("=")
            name = name if sep else "model"
            if name in preds:
                raise click.UsageError(f"model {name!r} given twice in --predictions")
            preds[name] = find_cases(folder)
        refs = find_cases(reference) if reference else None
    return analyse_absent(read_nephrectomy(metadata), preds, references=refs, labels=labels, thresholds_ml=thr,
                          executor=executor, **names)
