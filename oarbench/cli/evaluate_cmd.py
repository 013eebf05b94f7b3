"""``oarbench evaluate``: score predictions against references, write the results table."""

from __future__ import annotations

from pathlib import Path

import click

from oarbench.cli._common import executor_options, open_executor, user_errors


def print_summary(table, echo=click.echo) -> None:
    """A readable per-structure summary: median DSC / HD95 / MSD and status counts."""
    from oarbench.evaluate import summarise

    summary = summarise(table)
    if summary.empty:
        echo("no rows")
        return
    cols = ["centre", "model", "condition", "structure", "n_ok", "n_missed", "n_hallucinated",
            "dsc_median", "hd95_median", "msd_median"]
    view = summary[[c for c in cols if c in summary.columns]].copy()
    for c in ("centre", "model", "condition"):
        if c in view and (view[c].fillna("") == view[c].iloc[0]).all():
            view = view.drop(columns=c)
    view = view.rename(columns={"dsc_median": "DSC", "hd95_median": "HD95 mm", "msd_median": "MSD mm",
                                "n_ok": "ok", "n_missed": "missed", "n_hallucinated": "halluc."})
    echo(view.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


@click.command()
@click.argument("study", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reference", help="Folder of reference label maps (CASE.nii.gz): a path or URL (s3://..., file://...).")
@click.option("--prediction", "predictions", multiple=True,
              help="Folder of predicted label maps (a path or URL); repeat for several models.")
@click.option("--labels", "labels_path", metavar="MAP",
              help="default, totalsegmentator, or an nnU-Net dataset.json / labels TOML [default: the dataset.json "
                   "beside or above --reference, else the 19-OAR map] (docs/labels.md).")
@click.option("--structures", metavar="NAMES",
              help="Comma-separated structures to score, e.g. Liver,Kidney_L,Kidney_R (aliases accepted); "
                   "the map's other values are ignored.")
@click.option("--out", default="oarbench-out", show_default=True, help="Output folder: a path or URL (s3://...).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Parallel processes (CPU backend), or workers of a local Dask cluster.")
@executor_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA (torch backend) when a GPU is visible, else the numpy backend.")
@click.option("--tolerance", type=float, default=None, help="Surface-DSC tolerance in mm [default: 2.0 or the study's].")
@click.option("--apl-convention", type=click.Choice(["exact", "platipy"]), default="exact", show_default=True,
              help="Added path length: exact in-plane distance <= tolerance, or platipy's dilation by "
                   "ceil(tolerance / pixel) pixels (docs/metrics.md).")
@click.option("--resample-prediction", is_flag=True, help="Resample predictions on another grid onto the reference grid (nearest neighbour) instead of failing.")
@click.option("--allow-missing", is_flag=True, help="Score reference cases without a prediction as status 'missing' instead of failing.")
@click.option("--model", "models", multiple=True,
              help="With folders: the model name of each --prediction, in order [default: the prediction folder's "
                   "name]. With a study: only these models.")
@click.option("--centre", "centres", multiple=True,
              help="With folders: the centre name [default: all]. With a study: only these centres.")
@click.option("--observer", "observer", default=None, metavar="DIR",
              help="With folders: a second observer's contours (CASE.nii.gz), scored against --reference like a "
                   "model and compared with each model by non-inferiority in `oarbench stats` (docs/statistics.md).")
@click.option("--observer-name", default="observer", show_default=True,
              help="With --observer: its name in the model column.")
@click.option("--condition", default=None, help="With folders: the condition name [default: original].")
@click.option("--study-name", default=None, help="With folders: the study name [default: own-data].")
@click.option("--force", is_flag=True, help="Recompute cached cases.")
@click.option("--strict", is_flag=True,
              help="Refuse a prediction with the same content as its reference (by default: scored, with a warning).")
@click.option("--follow-links", is_flag=True,
              help="Read images that are symbolic links to files outside their folder (by default: refused).")
@click.option("--max-image-gib", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Refuse an image whose header announces more voxel data than this, before reading it.")
@click.option("--quiet", is_flag=True, help="No summary table (the progress bar stays; see --no-progress).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@user_errors
def evaluate(study, reference, predictions, labels_path, structures, out, workers, device, tolerance, apl_convention,
             resample_prediction, allow_missing, models, centres, observer, observer_name, condition, study_name, force,
             strict, follow_links, max_image_gib, quiet, no_progress, executor_kind, scheduler, resources, batch):
    """Score predictions against references: metrics.csv, summary.csv, run.json.

    Either a STUDY.toml (several centres x models, docs/study-toml.md) or
    --reference DIR --prediction DIR [--prediction DIR ...]; in folder mode every
    row gets the names given by --study-name, --centre, --model and --condition
    (listed below) or their defaults.
    """
    from oarbench.evaluate import EvalOptions, evaluate_jobs, jobs_from_folders, jobs_from_study, write_outputs
    from oarbench.io import OutputLock
    from oarbench.labels import ResolvedLabels, resolve_labels, with_structures
    from oarbench.study import read_label_tolerances
    from oarbench.tables import DEFAULT_CENTRE, DEFAULT_STUDY

    if study is not None:
        if reference or predictions:
            raise click.UsageError("give either STUDY.toml or --reference/--prediction, not both")
        if condition is not None or study_name is not None or observer is not None:
            raise click.UsageError("--condition, --study-name and --observer are for --reference/--prediction "
                                   "folders; a study file names its own study and [[observers]]")
        from oarbench.study import load_study

        st = load_study(study)
        if labels_path:
            resolved = resolve_labels(labels_path, structures=structures)
        else:
            resolved = with_structures(ResolvedLabels(st.labels, str(study), f"labels: from {study}"), structures)
        labels = resolved.labels
        jobs = jobs_from_study(st, models=models, centres=centres)
        observers = [o.name for o in st.observers if not models or o.name in models]
        tol = tolerance if tolerance is not None else st.tolerance_mm
        tolerances = dict(st.tolerances_mm)
        if labels_path:
            tolerances.update(read_label_tolerances(labels_path, labels))
        tolerances = {k: v for k, v in tolerances.items() if k in labels.names}
    else:
        if not reference or not predictions:
            raise click.UsageError("give STUDY.toml, or both --reference and --prediction")
        if len(centres) > 1:
            raise click.UsageError("with folders give one --centre (the centre these cases come from)")
        resolved = resolve_labels(labels_path, reference, structures)
        labels = resolved.labels
        jobs = jobs_from_folders(reference, predictions, models=models or None,
                                 study=DEFAULT_STUDY if study_name is None else study_name,
                                 centre=centres[0] if centres else DEFAULT_CENTRE,
                                 condition="original" if condition is None else condition)
        observers = []
        if observer is not None:
            if observer_name in {j.model for j in jobs}:
                raise click.UsageError(f"--observer-name {observer_name!r} is also a model name")
            jobs += jobs_from_folders(reference, [observer], models=[observer_name], study=jobs[0].study,
                                      centre=jobs[0].centre, condition=jobs[0].condition)
            observers = [observer_name]
        tol = 2.0 if tolerance is None else tolerance
        tolerances = read_label_tolerances(labels_path, labels)
    click.echo(resolved.note, err=True)
    options = EvalOptions(labels=labels, tolerance_mm=tol, tolerances=tuple(sorted(tolerances.items())),
                          apl_convention=apl_convention, backend="auto",
                          device=None if device == "auto" else device,
                          resample_prediction=resample_prediction, allow_missing=allow_missing,
                          max_image_bytes=int(max_image_gib * 2**30))
    executor = None
    if executor_kind != "local" or scheduler or resources or batch != "auto":
        executor = open_executor(executor_kind, workers, scheduler, resources, batch)
    # One run at a time per output folder; the outputs are written as one set.
    with OutputLock(out):
        try:
            table, provenance = evaluate_jobs(jobs, options, out, workers=workers, force=force, progress=not no_progress,
                                              executor=executor, strict=strict, follow_links=follow_links)
        finally:
            if executor is not None:
                executor.close()
        provenance["command"] = "evaluate"
        provenance.update(resolved.provenance())
        if observers:
            provenance["observers"] = observers
        paths = write_outputs(out, table, provenance)
    for w in [*provenance["warnings"], *provenance.get("resolution_warnings", [])]:
        click.echo(f"warning: {w}", err=True)
    if not quiet:
        print_summary(table)
    same = provenance.get("same_as_reference") or []
    if same:
        n_pairs = sum(j["cases"] for j in provenance["jobs"])
        click.echo(f"warning: {len(same)} of {n_pairs} predictions have the same content as their reference; "
                   "their DSC 1 says nothing about a model (listed in run.json, same_as_reference)", err=True)
    click.echo(
        f"{len(table)} rows ({provenance['cases_computed']} cases computed, "
        f"{provenance['cases_from_cache']} from cache) -> {paths['metrics']}"
    )
