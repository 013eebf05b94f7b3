"""GPU check: CUDA values equal the CPU (numpy) values, and how much faster CUDA is.

Run by hand on a machine with a CUDA GPU (not a test)::

    python benchmarks/gpu_check.py [--case /tmp/oarbench-bench] [--repeats 5]

On the 19-structure benchmark case (read from ``--case`` if it holds
``reference.nii.gz`` / ``prediction.nii.gz``, else built in memory by
``make_case.py``, seed 0), it

1. computes every structure's metrics with ``evaluate_labels(backend="numpy")``
   and ``evaluate_labels(backend="torch", device="cuda")`` and prints the largest
   absolute difference per metric (DSC, HD95, HD, MSD, ASSD, surface Dice,
   volumes, voxel counts); any difference above 1e-4 (mm, or exact for the
   statuses and counts) is a mismatch and the script exits with status 1;
2. times both paths on arrays already in memory (file reading excluded; median
   of ``--repeats`` after one warm-up run), plus the surface-distance part alone
   per structure, and prints the speed-up (target: CUDA >= 5x the CPU path).

Without torch or without a CUDA device it says so and exits 0 with
"no CUDA device". ``--device cpu`` runs the same comparison with the torch
backend on the CPU (to try the script on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOLERANCE = 1e-4
SPEEDUP_TARGET = 5.0
METRICS = ("dsc", "hd95", "hd", "msd", "assd", "sdsc", "ref_ml", "pred_ml", "tp", "fp", "fn")


def load_case(case: Path | None) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    if case is not None and (case / "reference.nii.gz").is_file():
        import SimpleITK as sitk

        ref_img = sitk.ReadImage(str(case / "reference.nii.gz"))
        pred_img = sitk.ReadImage(str(case / "prediction.nii.gz"))
        spacing = tuple(float(s) for s in reversed(ref_img.GetSpacing()))
        return sitk.GetArrayFromImage(ref_img), sitk.GetArrayFromImage(pred_img), spacing
    from make_case import SPACING, make_case

    ref, pred = make_case(0)
    return ref, pred, SPACING


def median_time(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(cpu_rows, dev_rows) -> tuple[dict[str, float], list[str]]:
    """Largest absolute difference per metric, and the mismatches (text)."""
    worst = {m: 0.0 for m in METRICS}
    problems = []
    for a, b in zip(cpu_rows, dev_rows):
        if (a.label, a.status) != (b.label, b.status):
            problems.append(f"{a.structure}: status {a.status} on the CPU, {b.status} on the device")
            continue
        for m in METRICS:
            x, y = float(getattr(a, m)), float(getattr(b, m))
            if math.isnan(x) and math.isnan(y) or x == y:
                continue
            diff = abs(x - y) if math.isfinite(x) and math.isfinite(y) else math.inf
            worst[m] = max(worst[m], diff)
            exact = m in ("tp", "fp", "fn")
            if diff > (0 if exact else TOLERANCE):
                problems.append(f"{a.structure} {m}: CPU {x!r}, device {y!r}")
    return worst, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=None, help="folder with reference.nii.gz and prediction.nii.gz")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="host threads of the device path to try (CUDA streams, one per thread)")
    parser.add_argument("--profile", action="store_true", help="print torch's profile of one device run")
    args = parser.parse_args()

    try:
        import torch
    except ImportError:
        print("no CUDA device: torch is not installed (pip install 'oarbench[torch]'); nothing checked")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA device: torch {torch.__version__} sees no CUDA GPU; nothing checked")
        return 0

    from oarbench.labels import DEFAULT_LABELS
    from oarbench.metrics import evaluate_labels
    from oarbench.metrics._surface import surface_distances_cropped
    from oarbench.metrics._torch import surface_distances_torch

    dev = torch.device(args.device)
    if dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, CUDA {torch.version.cuda}")

        def sync() -> None:
            torch.cuda.synchronize(dev)
    else:
        print(f"device: CPU (dry run), torch {torch.__version__}, {torch.get_num_threads()} threads")

        def sync() -> None:
            pass

    ref, pred, spacing = load_case(args.case)
    print(f"case: {ref.shape} (z, y, x), spacing {spacing} mm, {len(np.unique(ref)) - 1} structures")

    import os

    def on_cpu(threads=None):
        return evaluate_labels(ref, pred, spacing, DEFAULT_LABELS, backend="numpy", threads=threads)

    def on_device(threads=None):
        return evaluate_labels(ref, pred, spacing, DEFAULT_LABELS, backend="torch", device=str(dev), threads=threads)

    cpu_rows = on_cpu()
    on_device()  # warm-up (CUDA context, kernels, allocator)
    problems = []
    t_dev_by_threads = {}
    for n in args.threads:
        if n > 1 and dev.type != "cuda":
            continue
        worst, found = compare(cpu_rows, on_device(n))
        problems += [f"threads={n}: {p}" for p in found]
        print(f"threads={n}: largest |CPU - device| per metric: " + ", ".join(f"{m} {v:.3g}" for m, v in worst.items()))
        t_dev_by_threads[n] = median_time(lambda: on_device(n), args.repeats, sync)

    t_cpu = median_time(on_cpu, args.repeats, sync)
    n_cores = os.cpu_count() or 1
    t_cpu_all = median_time(lambda: on_cpu(n_cores), args.repeats, sync)

    if args.profile and dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            on_device(1)
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))

    # Surface distances alone, per structure crop (what the device accelerates).
    from scipy import ndimage

    crops = []
    ref_boxes, pred_boxes = ndimage.find_objects(ref), ndimage.find_objects(pred)
    for value, _ in DEFAULT_LABELS:
        rb = ref_boxes[value - 1] if value <= len(ref_boxes) else None
        pb = pred_boxes[value - 1] if value <= len(pred_boxes) else None
        if rb is None or pb is None:
            continue
        box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(rb, pb))
        crops.append((ref[box] == value, pred[box] == value))
    t_sd_cpu = median_time(lambda: [surface_distances_cropped(r, p, spacing) for r, p in crops], args.repeats, sync)
    t_sd_dev = median_time(
        lambda: [surface_distances_torch(r, p, spacing, device=str(dev)) for r, p in crops], args.repeats, sync)

    t_dev = min(t_dev_by_threads.values())
    best_threads = min(t_dev_by_threads, key=t_dev_by_threads.get)
    print(f"evaluate_labels, 19 structures, arrays in memory (median of {args.repeats}):")
    print(f"  CPU numpy, default threads  {t_cpu:8.3f} s")
    print(f"  CPU numpy, {n_cores:2d} threads        {t_cpu_all:8.3f} s")
    for n, t in t_dev_by_threads.items():
        print(f"  {str(dev):6s} torch, {n} threads   {t:8.3f} s   speed-up vs default CPU {t_cpu / t:.2f}x, "
              f"vs {n_cores}-thread CPU {t_cpu_all / t:.2f}x")
    print(f"best device setting: threads={best_threads}, {t_cpu / t_dev:.2f}x the default CPU path "
          f"(target >= {SPEEDUP_TARGET:g}x)")
    print(f"surface distances only ({len(crops)} crops): CPU numpy {t_sd_cpu:.3f} s, {dev} {t_sd_dev:.3f} s, "
          f"speed-up {t_sd_cpu / t_sd_dev:.2f}x")
    if problems:
        print(f"MISMATCH: {len(problems)} values differ by more than {TOLERANCE:g}:")
        for line in problems[:40]:
            print("  " + line)
        return 1
    print(f"values: device == CPU within {TOLERANCE:g} for every structure and metric")
    return 0


if __name__ == "__main__":
    sys.exit(main())
