"""Folder throughput: ``oarbench evaluate`` (all metrics) vs nnU-Net's folder evaluation (Dice only).

Run by hand (not a test), after ``make_case.py``::

    python benchmarks/bench_folder.py --folder /tmp/oarbench-bench/folder [--repeats 2] [--warmup 1]

Both tools run as fresh commands on the same folder pair (``labelsTr`` =
references, ``predictions``), so both pay interpreter start-up, imports, file
reading and metrics, as a user would:

* ``oarbench evaluate --reference ... --prediction ... --labels dataset.json
  --device cpu --force --quiet --workers N`` (numpy backend, every metric, writes
  metrics.csv / summary.csv / run.json);
* nnU-Net v2's ``compute_metrics_on_folder`` (what ``nnUNetv2_evaluate_folder``
  runs) with ``SimpleITKIO`` and N processes, called from a fresh interpreter
  with nnU-Net's environment variables set for that process only.

Before the timed runs every file of the folder pair is read once, and each command runs once
untimed (``--warmup``), so that neither tool pays for files the page cache has dropped, its own
libraries included (the first command after other heavy work on the machine would, and only that
one); then the two tools' commands alternate, round by round, as in ``bench_metrics.py``. Reports
the median wall time per command and the throughput in cases per second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NNUNET_CHILD = r"""
import sys, time, json
t0 = time.perf_counter()
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
t1 = time.perf_counter()
ref, pred, out, nproc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
compute_metrics_on_folder(ref, pred, out, SimpleITKIO(), ".nii.gz", list(range(1, 20)), num_processes=nproc)
print(json.dumps({"import_s": t1 - t0, "call_s": time.perf_counter() - t1}))
"""


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return wall, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/oarbench-bench/folder"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each command first")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    ref_dir, pred_dir = args.folder / "labelsTr", args.folder / "predictions"
    n_cases = len(list(ref_dir.glob("*.nii.gz")))
    load = os.getloadavg()
    print(f"{n_cases} cases in {args.folder}; {os.cpu_count()} cores; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    for f in sorted(ref_dir.iterdir()) + sorted(pred_dir.iterdir()):  # warm the page cache for both tools
        f.read_bytes()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="oarbench-bench-folder-") as tmp:
        tmp_path = Path(tmp)
        nn_env = dict(os.environ)
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (tmp_path / var).mkdir()
            nn_env[var] = str(tmp_path / var)
        for workers in args.workers:
            ours = [sys.executable, "-m", "oarbench", "evaluate", "--reference", str(ref_dir),
                    "--prediction", str(pred_dir), "--labels", str(args.folder / "dataset.json"),
                    "--out", str(tmp_path / "oarbench-out"), "--device", "cpu", "--force", "--quiet",
                    "--workers", str(workers)]
            theirs = [sys.executable, "-c", NNUNET_CHILD, str(ref_dir), str(pred_dir), str(tmp_path / "summary.json"),
                      str(workers)]
            for _ in range(args.warmup):
                run(ours)
                run(theirs, env=nn_env)
            walls, nn_walls, calls = [], [], []
            for _ in range(args.repeats):  # alternated: a change of the machine's speed hits both tools
                wall, _ = run(ours)
                walls.append(wall)
                wall, out = run(theirs, env=nn_env)
                nn_walls.append(wall)
                calls.append(json.loads(out.strip().splitlines()[-1])["call_s"])
            name = f"oarbench evaluate, all metrics, --workers {workers}"
            results[name] = {"wall_s": statistics.median(walls)}
            print(f"{name}: {[round(w, 2) for w in walls]} s")
            name = f"nnU-Net compute_metrics_on_folder, Dice only, {workers} process{'es' if workers > 1 else ''}"
            results[name] = {"wall_s": statistics.median(nn_walls), "call_s": statistics.median(calls)}
            print(f"{name}: {[round(w, 2) for w in nn_walls]} s (function call alone {[round(c, 2) for c in calls]} s)")

    print()
    print(f"{'command':62s} {'median s':>9s} {'cases/s':>8s}")
    for name, r in results.items():
        print(f"{name:62s} {r['wall_s']:9.2f} {n_cases / r['wall_s']:8.3f}")
    load = os.getloadavg()
    print(f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cases": n_cases, "results": results}, indent=2))


if __name__ == "__main__":
    main()
