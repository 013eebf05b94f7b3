"""The synthetic study as a hospital holds it: DICOM CT series + RTSTRUCT per patient,
with each centre's own structure names (centre A Dutch, centre B German; other centres
TG-263).

Layout under ``OUT``::

    CENTRE/PATIENT_ID/CT/CT_0001.dcm ...   one CT series per case (HU stored with intercept -1024)
    CENTRE/PATIENT_ID/RTSTRUCT.dcm         the reference contours, centre spelling
    dicom_manifest.csv                     centre, case, split, patient id, study / series UIDs

PatientPosition is HFS for supine and HFP for prone cases; PatientAge and PatientSex
come from the case list. Patient ids are invented (``PAT`` + digits), patient names
are ``Synthetic^<case>``: the import must not carry either into its output.
"""

from __future__ import annotations

import csv
import io as _stdio
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from oarbench.dicom.ct import read_geometry
from oarbench.dicom.export import build_rtstruct, new_uid, save_dataset, write_ct_series
from oarbench.io import Volume, atomic_write_text, resample_nearest
from oarbench.labels import DEFAULT_LABELS
from oarbench.phantoms import DemoConfig, draw_cases, render_case
from oarbench.tables import csv_row

__all__ = ["CENTRE_NAMES", "DUTCH_NAMES", "GERMAN_NAMES", "generate_dicom_study", "patient_header"]

#: Dutch clinical names of the 19 default structures (label value -> ROI name).
DUTCH_NAMES: dict[int, str] = {
    1: "Lever", 2: "Milt", 3: "Nier links", 4: "Nier rechts", 5: "Bijnier links", 6: "Bijnier rechts",
    7: "Alvleesklier", 8: "Maag", 9: "Duodenum", 10: "Darm", 11: "Galblaas", 12: "Slokdarm", 13: "Hart",
    14: "Long links", 15: "Long rechts", 16: "Ruggenmerg", 17: "Aorta", 18: "Vena cava inferior", 19: "Wervels",
}
#: German clinical names of the 19 default structures (label value -> ROI name).
GERMAN_NAMES: dict[int, str] = {
    1: "Leber", 2: "Milz", 3: "Niere li.", 4: "Niere re.", 5: "Nebenniere li.", 6: "Nebenniere re.",
    7: "Pankreas", 8: "Magen", 9: "Duodenum", 10: "Darm", 11: "Gallenblase", 12: "Speiseröhre", 13: "Herz",
    14: "Lunge li.", 15: "Lunge re.", 16: "Myelon", 17: "Aorta", 18: "Vena cava inferior", 19: "Wirbelkörper",
}
#: Naming style per centre of the shipped demo study.
CENTRE_NAMES: dict[str, dict[int, str]] = {"A": DUTCH_NAMES, "B": GERMAN_NAMES}


def patient_header(case, seed: int) -> dict:
    """Invented patient and study attributes of one synthetic case (a :class:`CaseSpec`)."""
    key = f"{seed}/{case.centre}/{case.case}"
    pid = f"PAT{zlib.crc32(key.encode()) % 10**8:08d}"
    years = int(case.age)
    age = f"{int(case.age * 12):03d}M" if case.age < 2 else f"{years:03d}Y"
    return {
        "PatientName": f"Synthetic^{case.case}",
        "PatientID": pid,
        "PatientSex": case.sex,
        "PatientAge": age,
        "PatientBirthDate": "",
        "PatientPosition": "HFP" if case.position == "prone" else "HFS",
        "StudyInstanceUID": new_uid(key, "study"),
        "SeriesInstanceUID": new_uid(key, "ct series"),
        "FrameOfReferenceUID": new_uid(key, "frame"),
        "StudyDate": "20260101",
        "StudyID": "1",
        "AccessionNumber": "",
        "ReferringPhysicianName": "",
        "InstitutionName": f"Centre {case.centre}",
        "BodyPartExamined": "ABDOMEN",
    }


def generate_dicom_study(out_dir: str | Path, config: DemoConfig, *,
                         progress: Callable[[str], None] | None = None) -> Path:
    """Write every case of ``config`` (train and test) as DICOM under ``out_dir``; returns the manifest path."""
    out = Path(out_dir)
    centres = {c.name: c for c in config.phantoms.centres}
    rows = []
    for spec in draw_cases(config.phantoms):
        centre = centres[spec.centre]
        image, labels = render_case(spec, centre, config.phantoms.seed)
        header = patient_header(spec, config.phantoms.seed)
        folder = out / spec.centre / header["PatientID"]
        seed_key = f"{config.phantoms.seed}/{spec.centre}/{spec.case}"
        paths = write_ct_series(image, folder / "CT", header, uid_seed=seed_key)
        geometry = read_geometry(header["SeriesInstanceUID"], paths)
        # the written series may run in the opposite slice order: put the labels on its grid
        target = Volume(np.zeros(geometry.shape_zyx, np.uint8), geometry.spacing_zyx, geometry.origin,
                        geometry.direction)
        on_grid = resample_nearest(labels, target)
        ds = build_rtstruct(on_grid, geometry, DEFAULT_LABELS, roi_names=CENTRE_NAMES.get(spec.centre),
                            label="reference", uid_seed=seed_key)
        save_dataset(ds, folder / "RTSTRUCT.dcm")
        rows.append({"centre": spec.centre, "case": spec.case, "split": spec.split,
                     "patient_id": header["PatientID"], "study_instance_uid": header["StudyInstanceUID"],
                     "series_instance_uid": header["SeriesInstanceUID"]})
        if progress is not None:
            progress(f"{spec.centre} {spec.case}")
    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(map(csv_row, rows))
    return atomic_write_text(out / "dicom_manifest.csv", buf.getvalue())
