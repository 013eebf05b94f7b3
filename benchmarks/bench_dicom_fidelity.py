"""RTSTRUCT fidelity between oarbench and other tools, per structure, on real-shaped organs.

One synthetic case (the phantom anatomy of oarbench.phantoms) on a scanner-centred square grid
(origin -(n-1)/2 x spacing; for 512 x 0.9765625 mm that is -249.51171875 mm):

* import: RTSTRUCTs written by rt-utils (this environment) and by platipy 0.7.2 (its own
  environment, tests/_dicom_external.py) from the label map, read by oarbench: DSC per structure;
* export: oarbench's RTSTRUCT in each contour convention (edges, centres) read back by
  oarbench, rt-utils, platipy and a strict centre-in-polygon reader (matplotlib, no tolerance:
  the voxelisation of planning systems and dicompyler-core); the polygon area over the voxel area.

    OARBENCH_PLATIPY_PYTHON=/path/to/venv-platipy/bin/python \\
        python benchmarks/bench_dicom_fidelity.py --size 256 --spacing 1.953125 --slice 3 --slices 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import _dicom_external as X  # noqa: E402
from oarbench.dicom.export import build_rtstruct, save_dataset  # noqa: E402
from oarbench.labels import DEFAULT_LABELS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--spacing", type=float, default=1.953125)
    ap.add_argument("--slice", type=float, default=3.0)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--age", type=float, default=8.0)
    args = ap.parse_args()
    py = X.platipy_python()
    if py is None:
        sys.exit("platipy environment not found (OARBENCH_PLATIPY_PYTHON)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        ct, labels = X.phantom_case((args.size, args.size, args.slices), (args.spacing, args.spacing, args.slice),
                                    age=args.age)
        ct_dir, geo = X.write_case(folder, ct)
        arr = np.asarray(labels.array)
        masks = {n: arr == v for v, n in DEFAULT_LABELS if np.any(arr == v)}
        print(f"grid {arr.shape[::-1]} (x, y, z), spacing {labels.spacing[::-1]} mm, origin {labels.origin} mm; "
              f"case written in {time.perf_counter() - t0:.1f} s")
        times = {}
        t = time.perf_counter()
        rt_in = X.own_read(geo, X.rtutils_write(ct_dir, masks, folder / "rtutils.dcm"))
        times["rt-utils write + oarbench read"] = time.perf_counter() - t
        t = time.perf_counter()
        pl_in = X.own_read(geo, X.platipy_write(ct_dir, masks, folder / "platipy.dcm", py))
        times["platipy write + oarbench read"] = time.perf_counter() - t
        out = {}
        for conv in ("edges", "centres"):
            t = time.perf_counter()
            path = save_dataset(build_rtstruct(labels, geo, DEFAULT_LABELS, contour=conv), folder / f"{conv}.dcm")
            times[f"oarbench export ({conv})"] = time.perf_counter() - t
            t = time.perf_counter()
            own = X.own_read(geo, path)
            times[f"oarbench read ({conv})"] = time.perf_counter() - t
            t = time.perf_counter()
            rtu = X.rtutils_read(ct_dir, path)
            times[f"rt-utils read ({conv})"] = time.perf_counter() - t
            t = time.perf_counter()
            pla = X.platipy_read(ct_dir, path, py, folder)
            times[f"platipy read ({conv})"] = time.perf_counter() - t
            strict = X.strict_centre_read(geo, path)
            out[conv] = (own, rtu, pla, strict, X.polygon_area_ratio(geo, path, masks))

    def d(read, k):
        return X.dice(read[k], masks[k])

    print("\n| structure | voxels | rt-utils -> oarbench | platipy -> oarbench |")
    print("|---|---|---|---|")
    for k, m in masks.items():
        print(f"| {k} | {int(m.sum())} | {d(rt_in, k):.4f} | {d(pl_in, k):.4f} |")
    print("\n| structure | voxels | " + " | ".join(f"{c}: oarbench | {c}: rt-utils | {c}: platipy | {c}: strict centre "
                                               f"| {c}: polygon / voxel area" for c in out) + " |")
    print("|---|---|" + "---|" * 10)
    for k, m in masks.items():
        cells = []
        for conv, (own, rtu, pla, strict, area) in out.items():
            cells += [f"{d(own, k):.4f}", f"{d(rtu, k):.4f}", f"{d(pla, k):.4f}", f"{d(strict, k):.4f}",
                      f"{area[k]:.3f}"]
        print(f"| {k} | {int(m.sum())} | " + " | ".join(cells) + " |")
    for conv, (own, rtu, pla, strict, area) in out.items():
        med = [np.median([d(r, k) for k in masks]) for r in (own, rtu, pla, strict)]
        print(f"\n{conv}: median DSC oarbench {med[0]:.4f}, rt-utils {med[1]:.4f}, platipy {med[2]:.4f}, "
              f"strict centre {med[3]:.4f}; polygon/voxel area {min(area.values()):.3f}-{max(area.values()):.3f}")
    print("\n" + "\n".join(f"{k}: {v:.1f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
