"""``oarbench dicom import`` / ``oarbench dicom export``: CT + RTSTRUCT in, RTSTRUCT / DICOM-SEG out (docs/dicom.md)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import click

from oarbench.cli._common import user_errors


def _needs_dicom(func: Callable[..., Any]) -> Callable[..., Any]:
    """A missing optional dependency is a one-line error, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ImportError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@click.group("dicom")
def dicom() -> None:
    """DICOM RT: import CT series + RTSTRUCTs as an nnU-Net dataset, export label maps as RTSTRUCT / DICOM-SEG."""


@dicom.command("import")
@click.argument("dicom_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="nnU-Net v2 raw dataset folder to write (e.g. nnUNet_raw/Dataset910_SiteA).")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False, path_type=Path),
              help="nnU-Net dataset.json or labels TOML (default: the 19-OAR map, docs/labels.md).")
@click.option("--aliases", "aliases_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML of ROI name aliases: exact names and regular expressions, per centre (docs/dicom.md).")
@click.option("--centre", default="local", show_default=True, help="Centre name: the metadata column and the "
              "[centre.NAME] section of the aliases file.")
@click.option("--case-prefix", default="case", show_default=True, help="Pseudonymous case ids PREFIX_0001, ...")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Parallel processes.")
@click.option("--force", is_flag=True, help="Recompute cases already imported.")
@click.option("--strict", is_flag=True, help="A mapped ROI without contours is an error (default: a warning, "
              "and the organ is absent from the label map).")
@click.option("--keep-unmapped-names", is_flag=True, help="Write the names of ROIs that are not imported into "
              "import.csv (default: withheld; they are printed here, to the terminal, only).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@user_errors
@_needs_dicom
def import_cmd(dicom_dir, out, labels_path, aliases_path, centre, case_prefix, workers, force, strict,
               keep_unmapped_names, no_progress):
    """Import every CT series with its RTSTRUCT(s) under DICOM_DIR (any layout) into an nnU-Net v2 raw
    dataset: imagesTr, labelsTr, dataset.json, import.csv, metadata.csv, cases.csv."""
    from oarbench.dicom.importer import ImportOptions, import_dicom
    from oarbench.dicom.names import load_aliases
    from oarbench.labels import load_label_map

    labels = load_label_map(labels_path)
    aliases = load_aliases(aliases_path, labels)
    options = ImportOptions(labels=labels, aliases=aliases, centre=centre, case_prefix=case_prefix, force=force,
                            strict=strict, keep_unmapped_names=keep_unmapped_names)
    result = import_dicom(dicom_dir, out, options, workers=workers, progress=not no_progress,
                          warn=lambda m: click.echo(f"warning: {m}", err=True))
    for (name, structure, rule), cases in sorted(result.unmapped_names.items()):
        click.echo(f"not imported: ROI {name!r} ({structure}: {rule}) in {len(set(cases))} case(s)", err=True)
    earlier = {r["case"] for r in result.rows if r.get("status") in ("unmapped", "ambiguous")} - {
        c for cases in result.unmapped_names.values() for c in cases}
    if earlier:
        click.echo(f"not imported: ROIs of {len(earlier)} case(s) imported by an earlier run (import.csv)", err=True)
    off = sum(int(r.get("points_off_image") or 0) for r in result.rows)
    if off:
        click.echo(f"warning: {off} contour points lie outside the CT images (clipped; see import.csv)", err=True)
    click.echo(f"{len(result.cases)} cases ({result.computed} imported, {result.from_cache} already there) -> "
               f"{result.out}; overlapping structures: {result.overlap_ml:.2f} mL in total (import.csv)")


@dicom.command("export")
@click.argument("pred_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dicom", "dicom_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding the CT series the predictions were made on.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: OUT/CASE/RTSTRUCT.dcm, OUT/CASE/SEG.dcm, OUT/export.csv.")
@click.option("--format", "formats", default="rtstruct,seg", show_default=True,
              help="Comma-separated: rtstruct, seg.")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False, path_type=Path),
              help="nnU-Net dataset.json or labels TOML (default: the 19-OAR map).")
@click.option("--cases", "cases_csv", type=click.Path(dir_okay=False, path_type=Path),
              help="cases.csv of `oarbench dicom import` (case -> CT series); optional for a single series.")
@click.option("--contour", type=click.Choice(["edges", "centres"]), default="edges", show_default=True,
              help="RTSTRUCT polygons along the voxel edges (planning systems: polygon area = voxel volume) or "
                   "through the boundary voxel centres (rt-utils, platipy); docs/dicom.md has the measured table.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@user_errors
@_needs_dicom
def export_cmd(pred_dir, dicom_dir, out, formats, labels_path, cases_csv, contour, no_progress):
    """Write each predicted label map in PRED_DIR as RTSTRUCT and/or DICOM-SEG referencing its CT series."""
    from oarbench.dicom.export import export_predictions
    from oarbench.labels import load_label_map

    from tqdm.auto import tqdm

    wanted = tuple(f.strip().lower() for f in formats.split(",") if f.strip())
    with tqdm(desc="dicom export", unit="case", disable=no_progress) as bar:
        def _total(n: int) -> None:
            bar.total = n
            bar.refresh()

        result = export_predictions(pred_dir, dicom_dir, out, load_label_map(labels_path), formats=wanted,
                                    cases_csv=cases_csv, progress=lambda _case: bar.update(), contour=contour,
                                    on_plan=_total)
    click.echo(f"{len(result.files)} DICOM objects for {len({r['case'] for r in result.rows})} cases -> {out}")
