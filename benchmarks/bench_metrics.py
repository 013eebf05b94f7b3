"""Side-by-side timing of the full metric set on the 19-structure benchmark case.

Run by hand (not a test)::

    python benchmarks/make_case.py --out /tmp/oarbench-bench
    python benchmarks/bench_metrics.py --case /tmp/oarbench-bench [--repeats 5] [--json out.json]

On the same arrays, in one process, it times (median of repeats):

* oarbench ``evaluate_labels`` with the numpy backend and the torch backend on
  the CPU (1 and 2 torch threads);
* the reference library (DeepMind ``surface-distance`` 0.1) looping over the
  structures: ``compute_surface_distances`` + robust HD95 + HD + average surface
  distance + surface Dice at 2 mm + Dice;
* MONAI per structure: ``HausdorffDistanceMetric(percentile=95)`` +
  ``SurfaceDistanceMetric(symmetric=True)`` + ``DiceMetric`` on the full-size
  one-channel masks with the spacing passed;
* nnU-Net v2's ``compute_metrics`` (Dice/IoU only), fed the arrays already in
  memory through a reader that returns them (so file reading is excluded as for
  the others), and once more reading the two files itself.

It checks that oarbench equals the reference library (max abs difference per
metric), measures the peak memory of the oarbench numpy path in a fresh
subprocess, and splits the end-to-end time into file reading and metrics.

``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` here (set before torch loads; an
explicit setting is kept): with OpenMP's default spin-waiting, torch's CPU
kernels with 2 threads ran 10x slower on the shared, oversubscribed 2-core
machine (docs/performance.md). It affects torch (oarbench torch-CPU, MONAI) only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import numpy as np
import SimpleITK as sitk

from oarbench.labels import DEFAULT_LABELS
from oarbench.metrics import _kernels, evaluate_labels

TOLERANCE_MM = 2.0
READ = "read 2 files (SimpleITK)"


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """Median wall time (s), all times, and the last result of ``fn``."""
    times = []
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def read_case(case: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    ref_img = sitk.ReadImage(str(case / "reference.nii.gz"))
    pred_img = sitk.ReadImage(str(case / "prediction.nii.gz"))
    spacing = tuple(float(s) for s in reversed(ref_img.GetSpacing()))
    return sitk.GetArrayFromImage(ref_img), sitk.GetArrayFromImage(pred_img), spacing  # type: ignore[return-value]


# --- peers ------------------------------------------------------------------------------


def reference_library(ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...]) -> dict[int, dict[str, float]]:
    """The reference library looped over the structures (present in both masks)."""
    if not hasattr(np, "Inf"):
        np.Inf = np.inf  # type: ignore[attr-defined]  # surface-distance 0.1 on NumPy 2
    import surface_distance as sdl

    out = {}
    for value, _ in DEFAULT_LABELS:
        gt = ref == value
        pr = pred == value
        if not gt.any() or not pr.any():
            continue
        sd = sdl.compute_surface_distances(gt, pr, spacing)
        mean_gt, mean_pr = sdl.compute_average_surface_distance(sd)
        out[value] = {
            "hd95": float(sdl.compute_robust_hausdorff(sd, 95)),
            "hd": float(sdl.compute_robust_hausdorff(sd, 100)),
            "msd": float((mean_gt + mean_pr) / 2),
            "sdsc": float(sdl.compute_surface_dice_at_tolerance(sd, TOLERANCE_MM)),
            "dsc": float(sdl.compute_dice_coefficient(gt, pr)),
        }
    return out


def monai_metrics(ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...]) -> dict[int, dict[str, float]]:
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric

    hd95 = HausdorffDistanceMetric(include_background=True, percentile=95)
    asd = SurfaceDistanceMetric(include_background=True, symmetric=True)
    dsc = DiceMetric(include_background=True)
    out = {}
    for value, _ in DEFAULT_LABELS:
        gt = torch.from_numpy(ref == value)[None, None]
        pr = torch.from_numpy(pred == value)[None, None]
        if not bool(gt.any()) or not bool(pr.any()):
            continue
        out[value] = {
            "hd95": float(hd95(pr, gt, spacing=spacing)),
            "msd": float(asd(pr, gt, spacing=spacing)),
            "dsc": float(dsc(pr, gt)),
        }
    return out


class _ArrayReader:
    """Stands in for nnU-Net's image reader: returns arrays already in memory."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def read_seg(self, path: str) -> tuple[np.ndarray, dict]:
        return self.arrays[path][None], {}


def nnunet_dice(ref: np.ndarray, pred: np.ndarray) -> dict[int, float]:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics

    reader = _ArrayReader({"ref": ref, "pred": pred})
    res = compute_metrics("ref", "pred", reader, list(DEFAULT_LABELS.values))  # type: ignore[arg-type]
    return {k: v["Dice"] for k, v in res["metrics"].items()}


def nnunet_dice_from_files(case: Path) -> dict[int, float]:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    res = compute_metrics(str(case / "reference.nii.gz"), str(case / "prediction.nii.gz"), SimpleITKIO(),
                          list(DEFAULT_LABELS.values))
    return {k: v["Dice"] for k, v in res["metrics"].items()}


# --- memory -----------------------------------------------------------------------------

_MEMORY_CHILD = r"""
import sys, tracemalloc, json
import numpy as np
def status_mb(key):
    # VmRSS now, VmHWM peak: per address space, so reset by exec (ru_maxrss is not:
    # it would report the forking parent's peak).
    with open('/proc/self/status') as fh:
        for line in fh:
            if line.startswith(key + ':'):
                return int(line.split()[1]) / 1024
def rss_mb():
    return status_mb('VmRSS')
from oarbench.metrics import _kernels, evaluate_labels
from oarbench.labels import DEFAULT_LABELS
import scipy.spatial, scipy.ndimage
base_rss = rss_mb()
ref = np.load(sys.argv[1]); pred = np.load(sys.argv[2]); spacing = tuple(json.loads(sys.argv[3]))
loaded_rss = rss_mb()
tracemalloc.start()
evaluate_labels(ref, pred, spacing, DEFAULT_LABELS, backend="numpy")
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
hwm = status_mb('VmHWM')
print(json.dumps({"base_rss_mb": base_rss, "loaded_rss_mb": loaded_rss, "peak_rss_mb": hwm,
                  "tracemalloc_peak_mb": peak / 2**20}))
"""


def memory_of_numpy_path(ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...], tmp: Path) -> dict[str, float]:
    """Peak memory of evaluate_labels (numpy backend) in a fresh interpreter."""
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "ref.npy", ref)
    np.save(tmp / "pred.npy", pred)
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(tmp / "ref.npy"), str(tmp / "pred.npy"), json.dumps(spacing)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- report -----------------------------------------------------------------------------


def _threads_default() -> int:
    return min(2, os.cpu_count() or 1)


def max_abs_diff(ours: dict[int, dict[str, float]], theirs: dict[int, dict[str, float]], key: str) -> float:
    return max(abs(ours[v][key] - theirs[v][key]) for v in theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=Path("/tmp/oarbench-bench"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-repeats", type=int, default=3, help="repeats for the reference library and nnU-Net")
    parser.add_argument("--monai-repeats", type=int, default=1)
    parser.add_argument("--skip-monai", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    import torch

    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    import importlib.metadata as md

    def version(p: str) -> str:
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return "not installed"

    versions = {p: version(p) for p in ("numpy", "scipy", "SimpleITK", "torch", "surface-distance", "monai", "nnunetv2")}
    versions["python"] = platform.python_version()
    versions["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "")
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()))

    ref, pred, spacing = read_case(args.case)
    print(f"case: {ref.shape} (z, y, x) uint8 x 2 = {2 * ref.nbytes / 2**20:.1f} MiB, spacing {spacing} mm, "
          f"{len(np.unique(ref)) - 1} reference structures")

    times: dict[str, float] = {}
    results: dict[str, Any] = {}
    default_threads = torch.get_num_threads()

    def with_threads(n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            torch.set_num_threads(n)
            try:
                return fn()
            finally:
                torch.set_num_threads(default_threads)
        return call

    def torch_cpu() -> Any:
        return evaluate_labels(ref, pred, spacing, DEFAULT_LABELS, backend="torch", device="cpu")

    def without_kernels(fn: Callable[[], Any]) -> Callable[[], Any]:
        """fn with the compiled kernels switched off: the numpy code an install without a C compiler runs."""
        def call() -> Any:
            saved, _kernels.ckernels = _kernels.ckernels, None
            try:
                return fn()
            finally:
                _kernels.ckernels = saved
        return call

    def numpy_path(threads: int | None) -> Callable[[], Any]:
        return lambda: evaluate_labels(ref, pred, spacing, DEFAULT_LABELS, backend="numpy", threads=threads)

    print(f"oarbench surface kernel: {_kernels.surface_kernel()}")
    methods: dict[str, tuple[Callable[[], Any], int]] = {
        READ: (lambda: read_case(args.case), args.repeats),
        "oarbench numpy": (numpy_path(None), args.repeats),
        "oarbench numpy (1 thread)": (numpy_path(1), args.repeats),
    }
    if _kernels.ckernels is not None:
        methods["oarbench numpy, kernels off (numpy code only)"] = (without_kernels(numpy_path(None)), args.repeats)
        methods["oarbench numpy, kernels off, 1 thread"] = (without_kernels(numpy_path(1)), args.repeats)
    for threads in sorted({1, default_threads}):
        methods[f"oarbench torch-CPU ({threads} thread{'s' if threads > 1 else ''})"] = (
            with_threads(threads, torch_cpu), args.repeats)
    methods["reference library (surface-distance 0.1)"] = (lambda: reference_library(ref, pred, spacing), args.peer_repeats)
    methods["nnU-Net compute_metrics (Dice only, arrays)"] = (lambda: nnunet_dice(ref, pred), args.peer_repeats)
    methods["nnU-Net compute_metrics (Dice only, reads the 2 files)"] = (
        lambda: nnunet_dice_from_files(args.case), args.peer_repeats)

    # Warm-up once each, then round-robin repeats, so that a change of machine load
    # (shared cores) hits every method alike.
    last: dict[str, Any] = {name: fn() for name, (fn, _) in methods.items()}
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(max(n for _, n in methods.values())):
        for name, (fn, n) in methods.items():
            if round_ < n:
                t0 = time.perf_counter()
                last[name] = fn()
                samples[name].append(time.perf_counter() - t0)
    for name, values in samples.items():
        times[name] = statistics.median(values)
        print(f"{name}: {[round(x, 3) for x in values]}")

    rows = last["oarbench numpy"]
    ours = {r.label: r.as_dict() for r in rows if r.status == "ok"}
    torch_rows = last[f"oarbench torch-CPU ({default_threads} thread{'s' if default_threads > 1 else ''})"]
    torch_diff = max(
        abs(a.as_dict()[k] - b.as_dict()[k])
        for a, b in zip(rows, torch_rows) if a.status == "ok"
        for k in ("dsc", "hd95", "hd", "msd", "assd", "sdsc")
    )
    print(f"torch-CPU vs numpy: max abs difference over all ok rows and metrics {torch_diff:.3g}")
    lib = last["reference library (surface-distance 0.1)"]
    diffs = {k: max_abs_diff(ours, lib, k) for k in ("dsc", "hd95", "hd", "msd", "sdsc")}
    print("oarbench numpy vs reference library, max abs difference over", len(lib), "structures:",
          ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    nn = last["nnU-Net compute_metrics (Dice only, arrays)"]
    nn_diff = max(abs(ours[v]["dsc"] - nn[v]) for v in ours)
    print(f"oarbench DSC vs nnU-Net Dice: max abs difference {nn_diff:.3g}")
    results["diff_vs_reference_library"] = diffs
    results["diff_torch_cpu_vs_numpy"] = torch_diff
    results["diff_dice_vs_nnunet"] = nn_diff
    results["samples_s"] = samples

    if not args.skip_monai:
        t, all_t, mo = timed(lambda: monai_metrics(ref, pred, spacing), args.monai_repeats)
        times["MONAI 1.6 (HD95 + ASD + Dice, per structure)"] = t
        print(f"MONAI: {[round(x, 3) for x in all_t]}")
        results["monai_minus_oarbench_hd95"] = {int(v): mo[v]["hd95"] - ours[v]["hd95"] for v in mo}

    mem = memory_of_numpy_path(ref, pred, spacing, Path("/tmp/oarbench-bench-mem"))
    volumes_mb = 2 * ref.nbytes / 2**20
    working = mem["peak_rss_mb"] - mem["base_rss_mb"]
    print(f"memory (numpy path, fresh process): label volumes {volumes_mb:.1f} MiB; peak RSS above the "
          f"interpreter+libraries baseline {working:.1f} MiB = {working / volumes_mb:.2f}x the volumes "
          f"(tracemalloc peak inside evaluate_labels {mem['tracemalloc_peak_mb']:.1f} MiB)")
    results["memory"] = {**mem, "volumes_mb": volumes_mb, "peak_over_baseline_mb": working,
                         "ratio_to_volumes": working / volumes_mb}

    ours_t = times["oarbench numpy"]
    print()
    print(f"{'method':58s} {'median s':>9s} {'x oarbench numpy':>17s}")
    for name, t in times.items():
        print(f"{name:58s} {t:9.3f} {t / ours_t:17.2f}")
    end_to_end = times[READ] + ours_t
    print(f"\nend to end (read + oarbench numpy) {end_to_end:.3f} s: reading "
          f"{100 * times['read 2 files (SimpleITK)'] / end_to_end:.0f} %, metrics {100 * ours_t / end_to_end:.0f} %")
    lib_t = times["reference library (surface-distance 0.1)"]
    one_t = times["oarbench numpy (1 thread)"]
    targets = {
        "metrics / reading (target <= 2)": ours_t / times[READ],
        "reference library / oarbench, 1 thread (target >= 10)": lib_t / one_t,
        f"reference library / oarbench, {_threads_default()} threads (target >= 20)": lib_t / ours_t,
    }
    print()
    for name, ratio in targets.items():
        print(f"{name}: {ratio:.2f}")
    results["ratios"] = targets
    load = os.getloadavg()
    print(f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"times_s": times, "versions": versions, **results}, indent=2))


if __name__ == "__main__":
    main()
