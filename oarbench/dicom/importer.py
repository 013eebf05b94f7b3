"""``oarbench dicom import``: a tree of CT series + RTSTRUCTs -> an nnU-Net v2 raw dataset.

Layout written under ``DATASET_DIR``::

    imagesTr/CASE_0000.nii.gz    CT in HU on the DICOM grid
    labelsTr/CASE.nii.gz         the label map (values of --labels, default 19-OAR map)
    dataset.json                 nnU-Net v2 (channel CT, labels, numTraining, file_ending)
    import.csv                   one row per case x ROI: names, mapping, voxels, mL, overlaps, off-image points
    metadata.csv                 case, centre, age, sex, position, patient_position (study TOML form)
    cases.csv                    case -> StudyInstanceUID, SeriesInstanceUID, FrameOfReferenceUID, RTSTRUCT SOPInstanceUID
    .oarbench-import/CASE.json   per-case record: a rerun skips cases whose inputs and settings are unchanged

One case is one (CT series, RTSTRUCT) pair. Case ids are pseudonyms ``PREFIX_0001``,
``PREFIX_0002``, ... numbered in the order of the series UIDs and kept across reruns
through cases.csv; no patient name or id is written anywhere.
"""

from __future__ import annotations

import csv
import hashlib
import io as _stdio
import json
import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable

import numpy as np

from oarbench.dicom.ct import SeriesGeometry, read_ct, read_geometry
from oarbench.dicom.discover import Inventory, StructureSet, scan
from oarbench.dicom.names import Aliases, NameResolver
from oarbench.dicom.rtstruct import Grid, RoiMask, check_contours, rasterise, read_rtstruct
from oarbench.executors import LocalExecutor
from oarbench.io import atomic_write_text, write_volume
from oarbench.labels import LabelMap
from oarbench.tables import csv_row, restore_cell

__all__ = ["ImportOptions", "ImportResult", "import_dicom", "IMPORT_COLUMNS", "METADATA_COLUMNS", "CASES_COLUMNS",
           "position_of", "age_years"]

RULES_VERSION = 2  # bump when a rule changes so that reruns recompute
RECORDS = ".oarbench-import"
IMPORT_COLUMNS = ("case", "roi_number", "roi_name", "structure", "status", "rule", "label", "voxels", "ml",
                  "overlap_ml", "lost_ml", "contours", "skipped_contours", "points", "points_off_image", "note")
#: import.csv ``status``: the ROI is in the label map / mapped but nothing to draw / not imported.
STATUSES = ("imported", "no contours", "no voxels", "unmapped", "ambiguous")
WITHHELD = "(withheld)"
METADATA_COLUMNS = ("case", "centre", "age", "sex", "position", "patient_position")
CASES_COLUMNS = ("case", "study_instance_uid", "series_instance_uid", "frame_of_reference_uid",
                 "rtstruct_sop_instance_uid")
_POSITIONS = {"HFS": "supine", "FFS": "supine", "HFP": "prone", "FFP": "prone",
              "HFDR": "decubitus", "HFDL": "decubitus", "FFDR": "decubitus", "FFDL": "decubitus"}


@dataclass(frozen=True)
class ImportOptions:
    labels: LabelMap
    aliases: Aliases = field(default_factory=Aliases)
    centre: str = "local"
    case_prefix: str = "case"
    force: bool = False
    strict: bool = False  # a mapped ROI without contours is an error, not a warning
    keep_unmapped_names: bool = False  # write the names of ROIs not imported into import.csv


@dataclass
class ImportResult:
    out: Path
    cases: list[str]
    computed: int
    from_cache: int
    rows: list[dict]
    warnings: list[str]
    overlap_ml: float

    #: (ROI name, structure, rule) -> cases, for ROIs not mapped in the cases converted by this run
    #: (names are kept in memory only, unless ImportOptions.keep_unmapped_names)
    unmapped_names: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)

    @property
    def unmapped(self) -> dict[str, int]:
        """ROI name -> number of cases, for names that were not mapped (unmapped or ambiguous)."""
        return {name: len(set(cases)) for (name, _s, _r), cases in self.unmapped_names.items()}


def position_of(code: str) -> str:
    """``supine`` / ``prone`` / ``decubitus`` from a PatientPosition code, ``unknown`` otherwise."""
    return _POSITIONS.get(code.strip().upper(), "unknown")


def age_years(patient_age: str, birth_date: str = "", study_date: str = "") -> int | None:
    """Age in whole years (completed years) from PatientAge (``nnnY``/``M``/``W``/``D``), else from the
    birth and study dates. Whole years only: an age to a fraction of a year together with the study
    date would give the birth date to within days."""
    m = re.fullmatch(r"\s*(\d{1,3})\s*([YMWD])\s*", patient_age or "", re.IGNORECASE)
    if m:
        n, unit = int(m.group(1)), m.group(2).upper()
        return {"Y": n, "M": n // 12, "W": int(n * 7 // 365.25), "D": int(n // 365.25)}[unit]
    try:
        b = date(int(birth_date[:4]), int(birth_date[4:6]), int(birth_date[6:8]))
        s = date(int(study_date[:4]), int(study_date[4:6]), int(study_date[6:8]))
    except (ValueError, TypeError):
        return None
    if s < b:
        return None
    return s.year - b.year - ((s.month, s.day) < (b.month, b.day))


@dataclass(frozen=True)
class _Job:
    case: str
    series_uid: str
    sop_uids: tuple[str, ...]
    geometry: SeriesGeometry
    rtstruct: StructureSet
    fingerprint: str


def _csv_text(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(csv_row(r))
    return buf.getvalue()


def _read_cases_csv(path: Path) -> dict[tuple[str, str], str]:
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read cases table: {exc}") from exc
    out = {}
    for r in rows:
        try:
            out[(r["series_instance_uid"], r["rtstruct_sop_instance_uid"])] = restore_cell(r["case"])
        except KeyError as exc:
            raise ValueError(f"{path}: cases table without column {exc}") from exc
    return out


def _settings_key(options: ImportOptions) -> str:
    a = options.aliases
    settings = {"rules": RULES_VERSION, "labels": options.labels.labels, "centre": options.centre,
                "names": options.keep_unmapped_names,
                "aliases": [a.exact, a.patterns, a.centre_exact, a.centre_patterns]}
    return json.dumps(settings, sort_keys=True, default=str)


def _plan(inventory: Inventory, out: Path, options: ImportOptions, warn: Callable[[str], None]) -> list[_Job]:
    """Check every paired series and RTSTRUCT completely, then give each (series, RTSTRUCT) a case id."""
    for ss, why in inventory.unpaired:
        warn(f"{ss.file.path}: RTSTRUCT not imported: {why}")
    for note in inventory.notes:
        warn(note)
    for uid, s in sorted(inventory.series.items()):
        if uid not in inventory.pairs and s.modality == "CT":
            warn(f"series {uid} ({s.first_path.parent}): CT without an RTSTRUCT, not imported")
    errors: list[str] = []
    geometries: dict[str, SeriesGeometry] = {}
    for uid in sorted(inventory.pairs):
        s = inventory.series[uid]
        try:
            geometries[uid] = read_geometry(uid, [f.path for f in s.files])
        except ValueError as exc:
            errors.append(str(exc))
    if not errors:
        errors = _check_structures(inventory, geometries, options)
    if errors:
        raise ValueError("\n".join(errors))
    if not geometries:
        raise ValueError(f"{inventory.root}: no CT series with an RTSTRUCT found "
                         f"({len(inventory.series)} image series, {len(inventory.structures)} RTSTRUCTs)")

    known = _read_cases_csv(out / "cases.csv")
    used = set(known.values())
    pattern = re.compile(rf"{re.escape(options.case_prefix)}_(\d+)")
    next_n = 1 + max((int(m.group(1)) for c in used if (m := pattern.fullmatch(c))), default=0)
    settings = _settings_key(options)
    jobs = []
    for uid in sorted(geometries):
        for ss in sorted(inventory.pairs[uid], key=lambda x: x.file.sop_instance_uid):
            key = (uid, ss.file.sop_instance_uid)
            case = known.get(key)
            if case is None:
                case = f"{options.case_prefix}_{next_n:04d}"
                next_n += 1
            geo = geometries[uid]
            fp = hashlib.sha256("\n".join([settings, *geo.sop_uids, ss.file.sop_instance_uid]).encode()).hexdigest()
            jobs.append(_Job(case, uid, tuple(geo.sop_uids), geo, ss, fp))
    return jobs


def _check_structures(inventory: Inventory, geometries: dict[str, SeriesGeometry], options: ImportOptions) -> list[str]:
    """Every problem that would stop the conversion of an RTSTRUCT: unreadable file, ROI in
    another frame of reference, contours of imported ROIs off the CT slices (the message names
    the CT series and the series the RTSTRUCT references), and with ``--strict`` a mapped ROI
    without contours."""
    errors = []
    resolver = NameResolver(options.labels, options.aliases, options.centre)
    for uid, geo in sorted(geometries.items()):
        grid = Grid(geo.shape_zyx, geo.spacing_zyx, geo.origin, geo.direction)
        ct_frame = inventory.series[uid].frame_of_reference_uid
        for ss in inventory.pairs[uid]:
            path = ss.file.path
            try:
                rois, _ = read_rtstruct(path)
                for roi, match in zip(rois, resolver.resolve_all([r.name for r in rois])):
                    if not match.mapped:
                        continue
                    if roi.frame_of_reference_uid and ct_frame and roi.frame_of_reference_uid != ct_frame:
                        raise ValueError(f"{path}: ROI {roi.name!r} is drawn in frame of reference "
                                         f"{roi.frame_of_reference_uid}, the CT series {uid} is in {ct_frame}")
                    try:
                        check_contours(roi, grid, path)
                    except ValueError as exc:
                        refs = ", ".join(ss.referenced_series) or "none"
                        raise ValueError(f"{exc}; checked against CT series {uid} ({geo.slices[0].path.parent}), "
                                         f"the RTSTRUCT references series {refs}") from exc
                    if options.strict and not any(kind in ("CLOSED_PLANAR", "CLOSED_PLANAR_XOR") and len(pts)
                                                  for kind, pts in roi.contours):
                        raise ValueError(f"{path}: ROI {roi.name!r} ({match.structure}) has no closed contour "
                                         "(--strict)")
            except ValueError as exc:
                errors.append(str(exc))
    return errors


def _header_facts(path: Path) -> dict[str, Any]:
    from oarbench.dicom._deps import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    g = lambda k: str(ds.get(k, "") or "").strip()  # noqa: E731
    sex = g("PatientSex").upper()
    return {"age": age_years(g("PatientAge"), g("PatientBirthDate"), g("StudyDate") or g("SeriesDate")),
            "sex": sex if sex in ("M", "F", "O") else "unknown",
            "patient_position": g("PatientPosition").upper() or "unknown",
            "study_instance_uid": g("StudyInstanceUID"), "frame_of_reference_uid": g("FrameOfReferenceUID")}


def _run_case(job: _Job, out: Path, options: ImportOptions) -> dict:
    """Convert one (series, RTSTRUCT) pair; returns the case record (also written as JSON)."""
    ct = read_ct(job.geometry)
    facts = _header_facts(job.geometry.slices[0].path)
    grid = Grid.of(ct)
    rs_path = job.rtstruct.file.path
    rois, _ = read_rtstruct(rs_path)
    ct_frame = facts["frame_of_reference_uid"]
    resolver = NameResolver(options.labels, options.aliases, options.centre)
    matches = resolver.resolve_all([r.name for r in rois])
    rows: list[dict] = []
    masks: dict[int, RoiMask] = {}
    warnings: list[str] = []
    unmapped: list[list[str]] = []
    for roi, match in zip(rois, matches):
        shown = roi.name if (match.mapped or options.keep_unmapped_names) else WITHHELD
        row: dict[str, Any] = {"case": job.case, "roi_number": roi.number, "roi_name": shown,
                               "structure": match.structure, "status": match.structure, "rule": match.rule,
                               "label": "", "note": ""}
        if not match.mapped:
            # not imported: nothing of it is drawn, and its name stays out of the tables unless asked
            unmapped.append([roi.name, match.structure, match.rule])
            row["contours"] = len(roi.contours)
            rows.append(row)
            continue
        if roi.frame_of_reference_uid and ct_frame and roi.frame_of_reference_uid != ct_frame:
            raise ValueError(f"{rs_path}: ROI {roi.name!r} is drawn in frame of reference "
                             f"{roi.frame_of_reference_uid}, the CT series {job.series_uid} is in {ct_frame}")
        mask = rasterise(roi, grid, rs_path)
        row.update(voxels=int(mask.indices.size), contours=mask.contours, skipped_contours=mask.skipped_contours,
                   points=mask.points, points_off_image=mask.points_off_image)
        if mask.contours == 0 or mask.indices.size == 0:
            row["status"] = "no contours" if mask.contours == 0 else "no voxels"
            what = ("has no closed contour" if mask.contours == 0 else
                    f"has {mask.contours} contour(s) that enclose no voxel centre")
            strict = " (--strict makes this an error)" if mask.contours == 0 else ""
            warnings.append(f"{job.case}: ROI {roi.name!r} ({match.structure}) {what} in {rs_path}: "
                            f"{match.structure} is absent from the label map{strict}")
        else:
            row["status"] = "imported"
            row["label"] = options.labels.value(match.structure)
            masks[roi.number] = mask
        rows.append(row)

    # Overlaps: the structure with fewer voxels keeps a shared voxel (ties: lower label value).
    voxel_ml = ct.voxel_volume_ml
    flat = np.zeros(ct.array.size, np.uint16 if options.labels.max_value > 255 else np.uint8)
    count = np.zeros(ct.array.size, np.uint8)
    for m in masks.values():
        count[m.indices] += 1
    by_number = {r["roi_number"]: r for r in rows}
    order = sorted(masks, key=lambda n: (-masks[n].indices.size, -int(by_number[n]["label"])))
    for n in order:  # largest first; smaller structures overwrite
        flat[masks[n].indices] = by_number[n]["label"]
    for n, m in masks.items():
        r = by_number[n]
        shared = int(np.count_nonzero(count[m.indices] > 1))
        kept = int(np.count_nonzero(flat[m.indices] == r["label"]))
        r["overlap_ml"] = round(shared * voxel_ml, 4)
        r["lost_ml"] = round((m.indices.size - kept) * voxel_ml, 4)
    for r in rows:
        if r.get("voxels", "") != "":
            r["ml"] = round(r["voxels"] * voxel_ml, 4)
    overlap_ml = float(np.count_nonzero(count > 1)) * voxel_ml
    labels = ct.with_array(flat.reshape(ct.array.shape))
    write_volume(ct, out / "imagesTr" / f"{job.case}_0000.nii.gz")
    write_volume(labels, out / "labelsTr" / f"{job.case}.nii.gz")
    position = facts["patient_position"]
    record = {
        "fingerprint": job.fingerprint,
        "case": job.case,
        "rows": rows,
        "overlap_ml": round(overlap_ml, 4),
        "metadata": {"case": job.case, "centre": options.centre,
                     "age": "" if facts["age"] is None else facts["age"], "sex": facts["sex"],
                     "position": position_of(position), "patient_position": position},
        "uids": {"case": job.case, "study_instance_uid": facts["study_instance_uid"] or job.geometry.series_uid,
                 "series_instance_uid": job.series_uid, "frame_of_reference_uid": ct_frame,
                 "rtstruct_sop_instance_uid": job.rtstruct.file.sop_instance_uid},
    }
    if warnings:
        record["warnings"] = warnings
    atomic_write_text(out / RECORDS / f"{job.case}.json", json.dumps(record, indent=1) + "\n")
    record["unmapped_names"] = unmapped  # in memory only: names of ROIs not imported
    return record


def _run_task(task: tuple[_Job, Path, ImportOptions]) -> dict:
    return _run_case(*task)


def _cached(job: _Job, out: Path) -> dict | None:
    path = out / RECORDS / f"{job.case}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != job.fingerprint:
        return None
    if not (out / "imagesTr" / f"{job.case}_0000.nii.gz").is_file() or not (out / "labelsTr" / f"{job.case}.nii.gz").is_file():
        return None
    return record


def _dataset_json(out: Path, labels: LabelMap, n: int) -> str:
    data = {"name": out.name, "description": "imported from DICOM CT + RTSTRUCT by oarbench dicom import",
            "channel_names": {"0": "CT"}, "labels": labels.to_dataset_json_labels(), "numTraining": n,
            "file_ending": ".nii.gz"}
    return json.dumps(data, indent=2) + "\n"


def import_dicom(dicom_dir: str | Path, out: str | Path, options: ImportOptions, *, workers: int = 1,
                 progress: bool = False, warn: Callable[[str], None] | None = None) -> ImportResult:
    """Import every (CT series, RTSTRUCT) pair under ``dicom_dir`` into the dataset ``out``.

    All series are checked before anything is converted; any problem raises one
    ValueError listing every bad series. Cases already imported with the same inputs
    and settings are kept (``options.force`` recomputes them).
    """
    out = Path(out)
    warnings: list[str] = []

    def _warn(msg: str) -> None:
        warnings.append(msg)
        if warn is not None:
            warn(msg)

    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", options.case_prefix):
        raise ValueError(f"case prefix {options.case_prefix!r} must be letters, digits and '-', starting with a letter")
    if progress:
        from tqdm.auto import tqdm

        with tqdm(desc="reading DICOM headers", unit="file") as scan_bar:
            def _total(n: int) -> None:
                scan_bar.total = n
                scan_bar.refresh()

            inventory = scan(dicom_dir, progress=lambda _n: scan_bar.update(), on_total=_total)
    else:
        inventory = scan(dicom_dir)
    jobs = _plan(inventory, out, options, _warn)
    records: dict[str, dict] = {}
    todo = []
    for job in jobs:
        rec = None if options.force else _cached(job, out)
        if rec is not None:
            records[job.case] = rec
        else:
            todo.append(job)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="dicom import", unit="case")

    def _done(i: int, record: dict) -> None:
        records[todo[i].case] = record
        if bar is not None:
            bar.update()

    try:
        LocalExecutor(workers).map(_run_task, [(job, out, options) for job in todo], on_result=_done,
                                   name="dicom import")
    finally:
        if bar is not None:
            bar.close()

    cases = [j.case for j in jobs]
    unmapped_names: dict[tuple[str, str, str], list[str]] = {}
    for job in jobs:
        record = records[job.case]
        for msg in record.get("warnings", []):
            _warn(msg)
        for name, structure, rule in record.pop("unmapped_names", []):
            unmapped_names.setdefault((name, structure, rule), []).append(job.case)
    # cases imported by an earlier run from files that are no longer in this tree stay in the
    # dataset and in every table (their images are still in imagesTr/labelsTr)
    known = _read_cases_csv(out / "cases.csv")
    current = {(j.series_uid, j.rtstruct.file.sop_instance_uid) for j in jobs}
    old_cases = sorted(c for k, c in known.items() if k not in current)
    for c in old_cases:
        try:
            records[c] = json.loads((out / RECORDS / f"{c}.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{out / 'cases.csv'} lists case {c} from an earlier run, but its record "
                             f"{out / RECORDS / (c + '.json')} is unreadable ({exc}); use a new --out") from exc
    every = sorted(cases + old_cases)
    rows = [r for c in every for r in records[c]["rows"]]
    atomic_write_text(out / "import.csv", _csv_text(rows, IMPORT_COLUMNS))
    atomic_write_text(out / "metadata.csv", _csv_text([records[c]["metadata"] for c in every], METADATA_COLUMNS))
    atomic_write_text(out / "cases.csv", _csv_text([records[c]["uids"] for c in every], CASES_COLUMNS))
    atomic_write_text(out / "dataset.json", _dataset_json(out, options.labels, len(every)))
    if old_cases:
        _warn(f"{out}: keeps {len(old_cases)} case(s) imported earlier from files not found now "
              f"({', '.join(old_cases[:5])}{', ...' if len(old_cases) > 5 else ''})")
    overlap = sum(float(records[c]["overlap_ml"]) for c in cases)
    return ImportResult(out, cases, len(todo), len(jobs) - len(todo), [r for c in cases for r in records[c]["rows"]],
                        warnings, overlap, unmapped_names)
