"""Assemble the page: load the inputs, run every section of :data:`~oarbench.report.sections.SECTIONS`
through its Jinja2 template (autoescape on) and write one self-contained ``report.html``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from oarbench.report.context import ReportContext, ReportOptions, load_table, stale_inputs
from oarbench.report.data import _normalise
from oarbench.report.sections import SECTIONS

__all__ = ["build_report", "environment"]


def environment():  # -> jinja2.Environment
    """The Jinja2 environment of the report's templates (package data ``oarbench/report/templates``).

    Autoescape is on for every template, so any text that comes from a table (model
    names, notes, paths) is escaped; undefined names are errors, not empty strings.
    """
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("oarbench.report", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _read_provenance(provenance: Mapping[str, Any] | str | Path | None) -> Mapping[str, Any] | None:
    if provenance is None or isinstance(provenance, Mapping):
        return provenance
    p = Path(provenance)
    try:
        prov = json.loads(p.read_text())
    except OSError as exc:
        raise ValueError(f"{p}: cannot read run record: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON: {exc}") from exc
    if not isinstance(prov, Mapping):
        raise ValueError(f"{p}: run record must be a JSON object")
    return prov


def build_report(
    out_dir: str | Path,
    table: pd.DataFrame | str | Path,
    stats: pd.DataFrame | str | Path | None = None,
    robustness: pd.DataFrame | str | Path | None = None,
    absent: pd.DataFrame | str | Path | None = None,
    gallery_dir: str | Path | None = None,
    provenance: Mapping[str, Any] | str | Path | None = None,
    *,
    noise_floor: pd.DataFrame | str | Path | None = None,
    robustness_summary: pd.DataFrame | str | Path | None = None,
    absent_pairs: pd.DataFrame | str | Path | None = None,
    options: ReportOptions | None = None,
    filename: str = "report.html",
    title: str | None = None,
    notes: Sequence[str] = (),
    section_notes: Mapping[str, Sequence[str]] | None = None,
    box_plots: bool = True,
) -> Path:
    """Write the self-contained HTML report; returns its path.

    Parameters
    ----------
    out_dir:
        Folder to write into (created).
    table:
        The results table (DataFrame, CSV path or metrics.parquet dataset).
    stats:
        The statistics table (``stats.csv``): the finding, the counts per comparison and
        every row in a collapsible table with ``p_adjusted < 0.05`` marked.
    robustness:
        Results rows under robustness conditions (``robustness.csv``, results-table
        columns); when None, the non-original rows of ``table`` are used.
    absent:
        The absent-organ table (``absent.csv``); false-positive rates per model
        and threshold are computed from it.
    gallery_dir:
        A folder written by :func:`oarbench.gallery.build_gallery`; the montages its
        index names must lie inside it.
    provenance:
        The run record (dict or path to ``run.json``): versions, options, input hashes.
    noise_floor:
        The robustness noise floor (``noise_floor.csv``).
    robustness_summary:
        ``robustness_summary.csv``: its small rotations' model effect (rotation minus
        its resample-only control, with the interval) is shown in the robustness section.
    absent_pairs:
        The between-model tests of the absent-organ analysis (``absent_pairs.csv``);
        computed from ``absent`` when not given.
    options:
        Thresholds, flags, model order, strictness (:class:`ReportOptions`).
    filename:
        Name of the HTML file.
    title:
        Page title (default from the study name).
    notes:
        Lines shown under the title (e.g. which inputs were not found).
    section_notes:
        Section id (``headline``, ``paper``, ``accuracy``, ``robustness``, ``absent``,
        ``failures``, ``provenance``) -> lines shown at the top of that section: facts
        about its inputs the reader must see with the numbers (cases where a prediction
        equals its reference, rows of a second observer, ...). Notes on stale inputs
        are added here by the report itself.
    box_plots:
        Draw the per-structure box plots (the slowest part; off for quick tests).
    """
    from oarbench.tables import check_keys, read_table

    if table is None:
        raise ValueError("results table: none given")
    tbl = table if isinstance(table, pd.DataFrame) else read_table(table)
    missing = [c for c in ("centre", "model", "case", "structure", "status") if c not in tbl.columns]
    if missing:
        raise ValueError(f"results table: missing column(s) {', '.join(missing)}")
    check_keys(tbl, "results table")
    opts = options if options is not None else ReportOptions()
    if not box_plots:
        opts = replace(opts, box_plots=False)
    ctx = ReportContext(
        table=_normalise(tbl),
        stats=load_table(stats, "statistics table"),
        robustness=robustness if robustness is None or isinstance(robustness, pd.DataFrame)
        else read_table(robustness, what="robustness table"),
        noise_floor=load_table(noise_floor, "noise-floor table"),
        robustness_summary=load_table(robustness_summary, "robustness summary"),
        absent=load_table(absent, "absent-organ table"),
        absent_pairs=load_table(absent_pairs, "absent-organ pairs table"),
        gallery_dir=Path(gallery_dir) if gallery_dir is not None else None,
        provenance=_read_provenance(provenance),
        options=opts,
    )
    _ = ctx.criteria  # read the gallery's selection.json early: a broken one is an input error
    merged: dict[str, list[str]] = {k: [str(x) for x in v] for k, v in (section_notes or {}).items()}
    stale = stale_inputs(ctx, results_path=None if isinstance(table, pd.DataFrame) else Path(table),
                         robustness_path=None if robustness is None or isinstance(robustness, pd.DataFrame)
                         else Path(robustness))
    for sid, lines in stale.items():
        merged.setdefault(sid, []).extend(lines)
    ctx = replace(ctx, section_notes=merged)
    if title is None:
        studies = sorted(set(ctx.table["study"]) - {"(not given)"}) if "study" in ctx.table.columns else []
        title = f"oarbench report: {', '.join(studies)}" if studies else "oarbench report"
    stale_lines = [f"{sid}: {line}" for sid, lines in stale.items() for line in lines]

    env = environment()
    sections = []
    for build in SECTIONS:
        s = build(ctx)
        sections.append({"id": s.id, "title": s.title, "nav": s.nav,
                         "html": env.get_template(s.template).render(**s.data)})
    from markupsafe import Markup

    for s in sections:
        s["html"] = Markup(s["html"])  # rendered (and escaped) by its own template
    head = list(notes) + [f"Input note ({line.split(':', 1)[0]} section): {line.split(': ', 1)[1]}"
                          for line in stale_lines]
    doc = env.get_template("page.html.j2").render(title=title, notes=head, sections=sections)
    from oarbench.io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / filename, doc)
