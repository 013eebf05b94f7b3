"""Where the full metric set spends its time: one thread, cProfile, grouped by stage.

Run by hand (not a test)::

    python benchmarks/make_case.py --out /tmp/oarbench-bench
    python benchmarks/profile_metrics.py --case /tmp/oarbench-bench [--kernels off] [--repeats 3]

``evaluate_labels`` (numpy backend, ``threads=1``, so that every stage runs in the profiled
thread) on the benchmark case, profiled with CPU time (``time.process_time``: other processes on
the machine do not count), after one warm-up call. The cumulative times of the functions of each
stage of docs/performance.md, "Where the time goes", are summed (the profiler's own overhead
lands in them); the median over the repeats is printed.
``--kernels off`` profiles the numpy code an install without a C compiler runs.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_metrics import read_case  # noqa: E402

from oarbench.labels import DEFAULT_LABELS  # noqa: E402
from oarbench.metrics import _kernels, evaluate_labels  # noqa: E402

#: stage -> the functions (cumulative time, none calling another) that make it up.
STAGES = {
    "boxes and counts (one pass over both volumes)": ("label_boxes", "find_objects"),
    "surfels (corner codes, surface corners, areas)": ("_surfels_c", "_surfels"),
    "nearest-surfel search": ("_nearest_c", "_nearest"),
    "sorting": ("_sorted_ranked", "_sorted"),
    "APL": ("added_path_length",),
    "centroid": ("centroid_distance",),
    "HD95, HD, MSD, ASSD, surface Dice from sorted distances": ("hausdorff", "msd", "assd", "surface_dice"),
}


def _name(func: tuple[str, int, str]) -> str:
    name = func[2]
    if name.startswith("<built-in method "):
        name = name[len("<built-in method "):].split(" ")[0]
    return name.split(".")[-1].strip("<>")


def profile_once(ref, pred, spacing) -> dict[str, float]:
    prof = cProfile.Profile(time.process_time)
    t0 = time.process_time()
    prof.enable()
    evaluate_labels(ref, pred, spacing, DEFAULT_LABELS, backend="numpy", threads=1)
    prof.disable()
    total = time.process_time() - t0
    cumulative: dict[str, float] = {}
    for func, (_, _, _, cum, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        # a wrapper and the built-in it calls can share a name: the larger holds the other
        cumulative[_name(func)] = max(cumulative.get(_name(func), 0.0), cum)
    out = {stage: sum(cumulative.get(n, 0.0) for n in names) for stage, names in STAGES.items()}
    out["other (crops, counts inside crops, Python)"] = total - sum(out.values())
    out["total"] = total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", type=Path, default=Path("/tmp/oarbench-bench"))
    ap.add_argument("--kernels", choices=("on", "off"), default="on")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.kernels == "off":
        _kernels.ckernels = None
    ref, pred, spacing = read_case(args.case)
    evaluate_labels(ref, pred, spacing, DEFAULT_LABELS, backend="numpy", threads=1)  # warm-up
    runs = [profile_once(ref, pred, spacing) for _ in range(args.repeats)]
    print(f"surface kernel: {_kernels.surface_kernel()}, one thread, CPU seconds (median of {args.repeats})")
    total = statistics.median(r["total"] for r in runs)
    for stage in runs[0]:
        t = statistics.median(r[stage] for r in runs)
        print(f"| {stage} | {t:.3f} | {100 * t / total:.0f} % |")


if __name__ == "__main__":
    main()
