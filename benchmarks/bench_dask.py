"""The Dask executor against the local one: throughput, scheduler memory, per-task overhead.

Run by hand (not a test)::

    python benchmarks/bench_dask.py [--cases 1000] [--repeats 2] [--folder /tmp/oarbench-bench/dask]

1. Writes ``--cases`` small synthetic cases (reference + prediction, 24 x 48 x 48
   voxels, three structures, the prediction shifted by 0-2 voxels; deterministic).
2. Throughput: ``evaluate`` on all cases with the local executor (a process pool of
   2 workers); a ``distributed.LocalCluster`` of 2 worker processes (1 thread
   each; its scheduler runs in this process) with the default ``batch="auto"``,
   with one case per Dask task, and with ``--batch`` cases per Dask task; and a
   ``dask scheduler`` process with 2 ``dask worker`` processes (auto);
   alternated round by round ``--repeats`` times; the time of the
   task map (pool start included for the local executor; the cluster's start-up
   is reported apart; a warm-up run of 10 cases on each first, not timed),
   median over repeats, and the ratio to the local executor's cases per second. All metrics.csv are compared byte for byte.
3. Scheduler memory: a ``dask scheduler`` process and two ``dask worker``
   processes on 127.0.0.1; ``evaluate`` on the first 250, 500 and 1,000 cases;
   the scheduler process's resident memory (RSS, psutil) before each run and its
   peak while the run goes (sampled every 20 ms).
4. Per-task overhead of the engine: 2,000 no-op tasks on the LocalCluster.
5. With ``--realistic DIR`` (the output of ``make_case.py``: a 200 x 512 x 512
   reference and prediction with 19 structures): the CPU time of one task at CT
   size, 1 thread, median of ``--repeats``: an evaluate task (read both files,
   score) and the CPU part of a robustness task for ``flip_lr`` and
   ``rot_z+10`` (perturb the image, map a prediction back, score, noise floor
   for the small rotation); the prediction image stands in for the CT (same
   grid), and the model's inference is not included (it is measured on the GPU
   that runs it). These feed the scaling estimate in docs/performance.md.

Prints one JSON object (and a readable summary on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oarbench.evaluate import EvalOptions, Job, evaluate_jobs, write_outputs  # noqa: E402
from oarbench.executors import DaskExecutor, LocalExecutor  # noqa: E402
from oarbench.labels import LabelMap  # noqa: E402

LABELS = LabelMap({1: "Liver", 2: "Kidney_L", 3: "Kidney_R"})
SHAPE = (24, 48, 48)


def make_cases(folder: Path, n: int) -> tuple[Path, Path]:
    ref_dir, pred_dir = folder / "ref", folder / "pred"
    if ref_dir.is_dir() and len(list(ref_dir.glob("*.nii.gz"))) >= n:
        return ref_dir, pred_dir
    shutil.rmtree(folder, ignore_errors=True)
    ref_dir.mkdir(parents=True)
    pred_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        ref = np.zeros(SHAPE, np.uint8)
        z0, y0, x0 = rng.integers(2, 5, size=3)
        ref[z0:z0 + 14, y0 + 4:y0 + 30, x0 + 4:x0 + 30] = 1
        ref[z0 + 4:z0 + 12, y0 + 32:y0 + 40, x0 + 2:x0 + 12] = 2
        ref[z0 + 4:z0 + 12, y0 + 32:y0 + 40, x0 + 28:x0 + 38] = 3
        pred = np.roll(ref, int(rng.integers(0, 3)), axis=2)
        for arr, d in ((ref, ref_dir), (pred, pred_dir)):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((0.9, 0.9, 2.5))
            sitk.WriteImage(img, str(d / f"c{i:05d}.nii.gz"), useCompression=True)
    return ref_dir, pred_dir


def run(job: Job, out: Path, **kw) -> tuple[float, dict]:
    table, prov = evaluate_jobs([job], EvalOptions(labels=LABELS), out, force=True, progress=False, **kw)
    write_outputs(out, table, prov)
    return prov["seconds_computing"], prov


def _noop(x: int) -> int:
    return x


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _SeparateScheduler:
    """A ``dask scheduler`` process and ``dask worker --nworkers 2 --nthreads 1`` on 127.0.0.1."""

    def __init__(self) -> None:
        dask_cli = shutil.which("dask", path=str(Path(sys.executable).parent)) or "dask"
        port = _free_port()
        address = f"tcp://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.sched = subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                       "--dashboard-address", "127.0.0.1:0", "--no-show"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        self.workers = subprocess.Popen([dask_cli, "worker", address, "--host", "127.0.0.1", "--nworkers", "2",
                                         "--nthreads", "1", "--no-dashboard"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(2)
        self.executor = DaskExecutor(address, echo=None)
        self.executor.client.wait_for_workers(2, timeout=60)

    def close(self) -> None:
        self.executor.close()
        self.workers.terminate()
        self.sched.terminate()
        for p in (self.workers, self.sched):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def scheduler_memory(job_for, sizes, work: Path) -> list[dict]:
    import psutil

    cluster = _SeparateScheduler()
    ex = cluster.executor
    rows = []
    try:
        proc = psutil.Process(cluster.sched.pid)
        for n in sizes:
            before = proc.memory_info().rss
            peak = [before]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], proc.memory_info().rss)
                    time.sleep(0.02)

            t = threading.Thread(target=sample)
            t.start()
            secs, _ = run(job_for(n), work / f"sched-{n}", executor=ex)
            stop.set()
            t.join()
            rows.append({"cases": n, "rss_before_mib": round(before / 2**20, 1),
                         "rss_peak_mib": round(peak[0] / 2**20, 1), "seconds": round(secs, 2),
                         "cases_per_s": round(n / secs, 1)})
            print(f"scheduler memory, {n} cases: {rows[-1]}", file=sys.stderr)
    finally:
        cluster.close()
    return rows


def realistic(case_dir: Path, repeats: int) -> dict:
    from oarbench.evaluate import evaluate_case
    from oarbench.io import read_volume
    from oarbench.labels import DEFAULT_LABELS
    from oarbench.robustness.run import _rows, noise_floor
    from oarbench.robustness.transforms import SmallRotation, parse_conditions

    ref_path, pred_path = case_dir / "reference.nii.gz", case_dir / "prediction.nii.gz"
    opts = EvalOptions(labels=DEFAULT_LABELS, backend="numpy", threads=1)
    out: dict = {}
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        evaluate_case(ref_path, pred_path, opts)
        times.append(time.perf_counter() - t)
    out["evaluate_task_s"] = round(statistics.median(times), 3)
    ref, img = read_volume(ref_path), read_volume(pred_path)
    for pert in parse_conditions(["flip_lr", "rot_z+10"]):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            pert.apply(img)
            pred = pert.apply(ref, labels=True)  # a perfect model's output on the perturbed grid
            back = pert.map_back(pred, ref)
            _rows(ref, back.array, DEFAULT_LABELS, 2.0, {}, pert.params())
            if isinstance(pert, SmallRotation):
                noise_floor(ref, pert, DEFAULT_LABELS)
            times.append(time.perf_counter() - t)
        out[f"robustness_{pert.condition}_cpu_s"] = round(statistics.median(times), 3)
        print(f"realistic: {pert.condition} {out[f'robustness_{pert.condition}_cpu_s']} s", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--folder", type=Path, default=Path("/tmp/oarbench-bench/dask"))
    ap.add_argument("--batch", type=int, default=8, help="tasks per Dask task of the batched variant")
    ap.add_argument("--realistic", type=Path, help="output folder of make_case.py (CT-size per-task times)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    ref_dir, pred_dir = make_cases(args.folder / "cases", args.cases)
    print(f"cases ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    cases = tuple(sorted(p.name[: -len(".nii.gz")] for p in ref_dir.glob("*.nii.gz")))[: args.cases]

    def job_for(n: int) -> Job:
        return Job(ref_dir, pred_dir, study="bench", centre="A", model="m", cases=cases[:n])

    load_start = os.getloadavg()
    t = time.perf_counter()
    cluster = DaskExecutor(workers=2, echo=None)  # batch="auto", the default
    cluster_start = time.perf_counter() - t

    def sharing(batch: int | str) -> DaskExecutor:  # the same cluster, another batch size
        ex = DaskExecutor.__new__(DaskExecutor)
        ex.__dict__.update(cluster.__dict__, batch=batch)
        return ex

    separate = _SeparateScheduler()
    variants = {"local": LocalExecutor(2), "dask_auto": cluster, "dask_batch1": sharing(1),
                f"dask_batch{args.batch}": sharing(args.batch), "dask_separate_scheduler_auto": separate.executor}
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for label, ex in variants.items():  # warm-up, not timed: imports on the workers and the scheduler
            run(job_for(min(10, args.cases)), args.folder / f"warmup-{label}", executor=ex)
        for r in range(args.repeats):
            for label, ex in variants.items():
                secs, _ = run(job_for(args.cases), args.folder / label, executor=ex)
                seconds[label].append(secs)
                print(f"repeat {r}: {label} {secs:.2f} s (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
        identical = all((args.folder / label / "metrics.csv").read_bytes()
                        == (args.folder / "local" / "metrics.csv").read_bytes() for label in variants)
        t = time.perf_counter()
        sharing(1).map(_noop, list(range(2000)))
        noop_s = time.perf_counter() - t
    finally:
        t = time.perf_counter()
        cluster.close()
        cluster_stop = time.perf_counter() - t
        separate.close()
    sizes = [n for n in (250, 500, 1000) if n <= args.cases]
    memory = scheduler_memory(job_for, sizes, args.folder)
    load_end = os.getloadavg()
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    result = {
        "cases": args.cases,
        "shape": SHAPE,
        "cpu_count": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
        "seconds": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
        "cases_per_s": {k: round(args.cases / m, 1) for k, m in medians.items()},
        "throughput_over_local": {k: round(medians["local"] / m, 3) for k, m in medians.items()},
        "metrics_csv_identical": identical,
        "local_cluster_start_s": round(cluster_start, 2),
        "local_cluster_stop_s": round(cluster_stop, 2),
        "noop_tasks_per_s": round(2000 / noop_s, 1),
        "noop_ms_per_task": round(1000 * noop_s / 2000, 3),
        "scheduler_memory": memory,
    }
    if args.realistic is not None:
        result["realistic"] = realistic(args.realistic, args.repeats)
    result["loadavg_after_all"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
