"""Accuracy of the DICOM RT rules (docs/dicom.md), measured.

1. Disc areas: a disc of radius r (720-gon) at random sub-pixel positions, rasterised by
   the pixel-centre rule; relative area error against pi r^2 at 1 mm and 3 mm pixels.
2. Round trip: the synthetic study (the demo centres A and B at their demo grids, plus a
   centre C with non-square slices, anisotropic spacing and an oblique orientation) written
   as DICOM CT + RTSTRUCT (contours traced from the label maps), imported again, and
   compared with the label maps it came from: DSC and HD95 per structure, voxels that differ.

    python benchmarks/bench_dicom.py --out /tmp/oarbench-dicom --cases 2
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from oarbench.dicom.importer import ImportOptions, import_dicom
from oarbench.dicom.phantoms import generate_dicom_study
from oarbench.dicom.rtstruct import Grid, Roi, rasterise
from oarbench.io import read_volume, resample_nearest
from oarbench.labels import DEFAULT_LABELS
from oarbench.metrics import compute_surface_distances, dice, hd95
from oarbench.phantoms import CentreProtocol, draw_cases, load_demo_config, render_case


def discs(trials: int) -> None:
    rng = np.random.default_rng(0)
    t = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    print("pixel_mm radius_mm radius_px mean_% sd_% max_abs_%")
    for px in (1.0, 3.0):
        for r in (5.0, 10.0, 20.0, 30.0, 50.0, 60.0):
            n = int(2 * r / px) + 8
            grid = Grid((1, n, n), (2.0, px, px), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
            errs = []
            for _ in range(trials):
                c = n * px / 2 + rng.random(2) * px
                pts = np.column_stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t), np.zeros_like(t)])
                m = rasterise(Roi(1, "disc", "", (("CLOSED_PLANAR", pts),)), grid)
                errs.append(m.indices.size * px * px / (math.pi * r * r) - 1)
            e = 100 * np.asarray(errs)
            print(f"{px:.0f} {r:.0f} {r / px:.1f} {e.mean():+.2f} {e.std():.2f} {np.abs(e).max():.2f}")


def round_trip(out: Path, cases: int) -> None:
    cfg = load_demo_config().with_overrides(cases_per_centre=cases)
    a, b = math.radians(25), math.radians(15)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    oblique = CentreProtocol("C", 903, (120, 96, 50), (2.6, 3.1, 5.0), tuple((rz @ rx).ravel()))
    ph = replace(cfg.phantoms, train_cases_per_centre=0, centres=(*cfg.phantoms.centres, oblique))
    cfg = replace(cfg, phantoms=ph)
    src, ds = out / "dicom", out / "dataset"
    t0 = time.perf_counter()
    generate_dicom_study(src, cfg)
    t1 = time.perf_counter()
    result = import_dicom(src, ds, ImportOptions(DEFAULT_LABELS, force=True))
    t2 = time.perf_counter()
    print(f"write {t1 - t0:.1f} s, import {t2 - t1:.1f} s for {len(result.cases)} cases (1 worker)")
    manifest = {r["series_instance_uid"]: r for r in csv.DictReader(open(src / "dicom_manifest.csv"))}
    with open(ds / "cases.csv") as fh:
        case_of = {r["case"]: r["series_instance_uid"] for r in csv.DictReader(fh)}
    specs = {s.case: s for s in draw_cases(cfg.phantoms)}
    centres = {c.name: c for c in cfg.phantoms.centres}
    print("centre case structures>=10mL min_dsc max_hd95_mm voxels_differing")
    for cid, uid in sorted(case_of.items()):
        spec = specs[manifest[uid]["case"]]
        _, ref = render_case(spec, centres[spec.centre], cfg.phantoms.seed)
        got = resample_nearest(read_volume(ds / "labelsTr" / f"{cid}.nii.gz"), ref)
        voxel_ml = float(np.prod(ref.spacing)) / 1000
        dscs, hds = [], []
        for value, _name in DEFAULT_LABELS:
            r, g = ref.array == value, got.array == value
            if r.sum() * voxel_ml < 10:
                continue
            dscs.append(dice(r, g))
            hds.append(hd95(compute_surface_distances(r, g, ref.spacing)))
        diff = int(np.count_nonzero(ref.array != got.array))
        print(f"{spec.centre} {spec.case} {len(dscs)} {min(dscs):.4f} {max(hds):.2f} {diff}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", type=int, default=2, help="test cases per centre")
    ap.add_argument("--trials", type=int, default=300, help="random placements per disc")
    args = ap.parse_args()
    discs(args.trials)
    round_trip(args.out, args.cases)


if __name__ == "__main__":
    main()
