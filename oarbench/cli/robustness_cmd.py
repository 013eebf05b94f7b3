"""``oarbench robustness``: run a model on perturbed images, map back, score (docs/robustness.md)."""

from __future__ import annotations

from pathlib import Path

import click

from oarbench.cli._common import executor_options, open_executor, user_errors

_INTERPRETERS = {"python", "python3", "bash", "sh", "env", "uv", "conda", "docker", "singularity", "apptainer"}


def default_model_name(spec: str) -> str:
    """A model name from a predictor spec: the nnU-Net model folder's name, or the tool's name.

    ``nnunet:/models/Dataset501/nnUNetTrainer__nnUNetPlans__3d_fullres:0`` ->
    ``nnUNetTrainer__nnUNetPlans__3d_fullres``; ``command:TotalSegmentator -i ...``
    -> ``TotalSegmentator``; ``command:python3 my_model.py ...`` -> ``my_model``.
    """
    import re
    import shlex

    kind, _, rest = spec.partition(":")
    if kind == "nnunet":
        m = re.fullmatch(r"(.+):((?:\d+|all)(?:,(?:\d+|all))*)", rest)
        folder = m.group(1) if m and not Path(rest).exists() else rest
        return Path(folder).resolve().name or "model"
    try:
        words = shlex.split(rest)
    except ValueError:
        words = rest.split()
    for word in words:
        name = Path(word).name
        base = re.sub(r"[\d.]+$", "", name)
        if "{" in word or word.startswith("-") or base in _INTERPRETERS:
            continue
        return Path(name).stem if name.endswith((".py", ".sh")) else name
    return "model"


def _resolve_spec(spec: str, root: Path) -> str:
    """Make the folder of an ``nnunet:`` spec from a study file relative to the study's folder."""
    if spec.startswith("nnunet:"):
        rest = spec[len("nnunet:"):]
        if not Path(rest).is_absolute():
            return "nnunet:" + str(root / rest)
    return spec


@click.command()
@click.option("--rotate", is_flag=True, help="Run the default orientation set (docs/robustness.md) unless --conditions is given.")
@click.option("--conditions", help="Comma-separated conditions, e.g. flip_lr,prone,rot_z+10,reorient_RAS.")
@click.option("--images", help="Folder of CT images (CASE_0000.nii.gz): a path or URL (s3://..., file://...).")
@click.option("--reference", help="Folder of reference label maps (CASE.nii.gz): a path or URL.")
@click.option("--predictor", "predictor_spec",
              help="'nnunet:/path/to/model_folder[:fold]', 'command:TOOL ... {input} ... {output}' (folders, one call) "
                   "or 'command:TOOL ... {input_file} ... {output_file}' (one call per case); docs/robustness.md.")
@click.option("--out", required=True,
              help="Output folder, a path or URL (s3://...; not with --keep-work) (with --workers > 1 or --executor dask, OUT/cache keeps finished case x condition "
                   "results, so that a re-run resumes).")
@click.option("--labels", "labels_path", metavar="MAP",
              help="default, totalsegmentator, or an nnU-Net dataset.json / labels TOML [default: the dataset.json "
                   "beside or above --reference, else the 19-OAR map] (docs/labels.md).")
@click.option("--structures", metavar="NAMES", help="Comma-separated structures to score, e.g. Liver,Kidney_L.")
@click.option("--study", type=click.Path(dir_okay=False, path_type=Path), help="Study TOML (docs/study-toml.md).")
@click.option("--model", "model_name", help="With --study: the model to test (its predictor from [robustness.predictors]). "
              "With folders: the model's name in the tables [default: the nnU-Net model folder's or the tool's name].")
@click.option("--centre", "centres", multiple=True,
              help="With --study: only these centres. With folders: the centre's name [default: all].")
@click.option("--study-name", default=None, help="With folders: the study name [default: own-data].")
@click.option("--device", default="cpu", show_default=True, help="nnU-Net device: cpu, cuda or cuda:N.")
@click.option("--mirroring/--no-mirroring", default=True, show_default=True, help="nnU-Net test-time mirroring.")
@click.option("--trust-checkpoint", is_flag=True,
              help="Load nnU-Net checkpoints with full pickle, which can run code stored in the file; only for "
                   "checkpoints from a source you trust (default: PyTorch's restricted loader, model data only).")
@click.option("--tolerance", type=float, default=None, help="Surface-DSC tolerance in mm [default: 2.0 or the study's].")
@click.option("--keep-work", is_flag=True, help="Keep perturbed images and raw predictions under OUT/work.")
@click.option("--save-predictions", default=None,
              help="Folder pattern with {condition} (and {centre}, {model}) for the predictions mapped back onto the reference grid, e.g. 'robust/{model}/{centre}/{condition}': a gallery can then draw them.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Parallel case x condition tasks (processes, or workers of a local Dask cluster); "
                   "1 with the local executor: one predictor call per condition.")
@executor_options
@click.option("--no-progress", is_flag=True, help="No progress bar (it shows case x condition on a terminal).")
@user_errors
def robustness(rotate, conditions, images, reference, predictor_spec, out, labels_path, structures, study, model_name,
               centres, study_name, device, mirroring, trust_checkpoint, tolerance, keep_work, save_predictions, workers,
               executor_kind, scheduler, resources, batch, no_progress):
    """Robustness to orientation: robustness.csv, noise_floor.csv, robustness_summary.csv.

    Either --images DIR --reference DIR --predictor SPEC, or --study STUDY.toml
    --model NAME (every centre with images).
    """
    from oarbench.labels import ResolvedLabels, resolve_labels, with_structures
    from oarbench.tables import DEFAULT_CENTRE, DEFAULT_STUDY
    from oarbench.robustness import DEFAULT_ROTATE_CONDITIONS, parse_conditions, parse_predictor, run_robustness
    from oarbench.robustness.run import combine, write_robustness

    section: dict = {}
    if study is not None:
        if images or reference:
            raise click.UsageError("give either --study or --images/--reference, not both")
        if not model_name:
            raise click.UsageError("--study needs --model NAME")
        if study_name is not None:
            raise click.UsageError("--study-name is for --images/--reference folders; a study file names its own study")
        from oarbench.study import load_study

        st = load_study(study)
        st.model(model_name)  # raises when unknown
        section = st.raw.get("robustness", {}) or {}
        if not predictor_spec:
            spec = (section.get("predictors") or {}).get(model_name)
            if not spec:
                raise click.UsageError(f"{study}: no [robustness.predictors] entry for {model_name!r}; give --predictor")
            predictor_spec = _resolve_spec(str(spec), st.root)
        if labels_path:
            resolved = resolve_labels(labels_path, structures=structures)
        else:
            resolved = with_structures(ResolvedLabels(st.labels, str(study), f"labels: from {study}"), structures)
        tol = tolerance if tolerance is not None else st.tolerance_mm
        jobs = []
        for c in st.centres:
            if centres and c.name not in centres:
                continue
            if c.images is None:
                click.echo(f"centre {c.name}: no images in the study file, skipped", err=True)
                continue
            jobs.append((c.name, c.images, c.reference))
        if not jobs:
            raise click.UsageError(f"{study}: no centre with images to run")
        study_name = st.name
        if not study_name.strip():
            raise click.UsageError(f"{study}: the study has an empty name")
    else:
        if not (images and reference and predictor_spec):
            raise click.UsageError("give --images, --reference and --predictor (or --study and --model)")
        if len(centres) > 1:
            raise click.UsageError("with folders give one --centre (the centre these cases come from)")
        resolved = resolve_labels(labels_path, reference, structures)
        tol = 2.0 if tolerance is None else tolerance
        jobs = [(centres[0] if centres else DEFAULT_CENTRE, images, reference)]
        study_name = DEFAULT_STUDY if study_name is None else study_name
        model_name = model_name or default_model_name(predictor_spec)

    if conditions:
        names = [n.strip() for n in conditions.split(",") if n.strip()]
    elif section.get("conditions"):
        names = [str(n) for n in section["conditions"]]
    elif rotate:
        names = list(DEFAULT_ROTATE_CONDITIONS)
    else:
        raise click.UsageError("give --rotate (the default set) or --conditions")
    perts = parse_conditions(names)
    labels = resolved.labels
    click.echo(resolved.note, err=True)
    predictor = parse_predictor(predictor_spec, device=device, use_mirroring=mirroring,
                                trust_checkpoint=trust_checkpoint)

    from oarbench.storage import as_location, is_remote

    out = as_location(out)
    if keep_work and is_remote(out):
        raise click.UsageError("--keep-work needs a local --out folder")
    executor = None
    if executor_kind != "local" or workers > 1 or scheduler or resources or batch != "auto":
        executor = open_executor(executor_kind, workers, scheduler, resources, batch)
    results = []
    try:
        for centre, img_dir, ref_dir in jobs:
            results.append(run_robustness(img_dir, ref_dir, predictor, perts, labels, out if keep_work else None,
                                          tolerance_mm=tol, study=study_name, centre=centre,
                                          model=model_name, keep_work=keep_work,
                                          save_predictions=save_predictions, executor=executor,
                                          cache_dir=None if executor is None else str(out) + "/cache",
                                          progress=not no_progress))
    finally:
        if executor is not None:
            executor.close()
    result = combine(results)
    table = result.table
    paths = write_robustness(result, out)
    n_swaps = int(result.summary["n_laterality_swaps"].sum()) if len(result.summary) else 0
    click.echo(f"{len(table)} rows, {table['condition'].nunique()} conditions, {n_swaps} laterality-error rows, "
               f"{len(result.skipped)} case x condition pair(s) skipped (robustness_skipped.csv)")
    for p in paths.values():
        click.echo(f"wrote {p}")
