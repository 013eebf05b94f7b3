"""The demo's federated-versus-local gap, one change at a time: ``oarbench demo --train`` per ablation row.

Run by hand (not a test, not in CI); each row is a whole ``demo --train`` (about 30 minutes on a
quiet 2-core CPU), so run it on a machine with nothing else running, as the timings in
docs/demo.md were::

    python benchmarks/demo_ablation.py --out ablation [--rows today,harmonised,...] [--engine storage]

Every row trains local-A, local-B and the federated model from scratch into ``OUT/<row>/``, with
the same seeds: the phantoms' (cases/demo.toml: every row generates the same study), the initial
global weights (seed 0 unless the row sets another), and each training call's data order (seeded from the run's seed and the
epoch it starts at, docs/training.md). Training is deterministic on the CPU for given seeds: a
repeated row gave byte-identical weights and equal metrics (docs/demo.md), so a difference between
rows is the rows' settings, through the training trajectory they change. The
local models do not depend on the federated settings: rows that share the local schedule retrain
them the same way, and their numbers agreeing across rows is that check. The rows (``ROWS``) differ in one setting each from the row before
them. The first five ran before the quick schedule took its present length; they pin that earlier
schedule (``EARLIER``: 12 epochs of 100 iterations, 12 federated rounds of one epoch):

* ``today``: no site harmonisation (nnU-Net reads the arrays as stored; centre B is x/y flipped),
  and the federated plans at nnU-Net's median spacing over both centres' cases (``pooled``);
* ``harmonised``: every case in LPS before nnU-Net sees it, plans still at the pooled median spacing;
* ``optimizer_reset``: as ``harmonised``, and each federated site starts every round with a fresh
  AdamW (no moments carried over from its previous round; FedAvg averages the weights only, so a
  kept optimizer applies moments gathered on the site's own pre-averaging trajectory);
* ``longer``: as ``harmonised``, 10 epochs of 150 iterations (the earlier, longer schedule);
* ``finest_spacing``: as ``harmonised``, and the federated plans at the finest centre's spacing
  (centre A's 2.8 mm pixels) instead of the median 3.4 mm;
* ``rounds24x50``: as ``finest_spacing`` with the same 1,200 iterations
  per model cut into 24 epochs of 50, so the federated sites average twice as often (24 rounds of
  one epoch);
* ``rounds12x2``: as ``rounds24x50``, 12 rounds of 2 local epochs (averaging every 100 iterations as in
  ``finest_spacing``, with ``rounds24x50``'s local models: run with ``--reuse-local rounds24x50``, it
  tells the averaging interval apart from the local schedule's finer epochs);
* ``rounds48x25``: as ``rounds24x50`` with 48 epochs of 25 iterations for every model (averaging
  every 25 iterations);
* ``bf16``: the quick schedule as shipped: as ``rounds24x50``, with the training steps' forward
  passes in bfloat16 where the CPU computes it natively (``precision="auto"``); the rows above
  trained in float32 (``FP32``);
* ``bf16_seed1``, ``bf16_seed2``: ``bf16`` with another training seed (``TrainSettings.seed``: every
  model's initial weights, the federated model's initial global weights and every training call's
  data order); the phantoms are the same study. They tell one training run's spread apart from
  what a setting changes;
* ``momentum_reset``: as ``bf16``, each federated site zeroes its optimizer's first moment (AdamW's
  ``exp_avg``) at the start of every round and keeps the rest (step count, second moment): the site
  no longer carries its own pre-averaging direction into the new global weights, and its steps keep
  their size (a fresh AdamW, ``optimizer_reset``, restarts both). Run with ``--reuse-local bf16``;
* ``warmup``, ``warmup_seed1``, ``warmup_seed2``: ``bf16`` and its two other seeds with a linear
  learning-rate warm-up over every model's first 100 iterations (``TrainSettings.warmup``): the
  learning curves showed every model sitting on an early plateau for some hundred iterations, and
  the run's outcome following which model left it first.
* ``server_momentum``, ``server_momentum_seed1``, ``server_momentum_seed2``: ``bf16`` and its two
  other seeds with server momentum 0.5 at the coordinator (FedAvgM with server learning rate 1,
  ``TrainSettings.server_momentum``): every new global model is the round's average plus half the
  global model's last step, so the federated model moves further per round along a direction both
  sites keep agreeing on. The local models are those rows' (run with ``--reuse-local bf16``, and so
  on).

Afterwards it prints, and writes to ``OUT/ablation.md`` and ``OUT/ablation.csv``, one row per
ablation row, model and centre: the median DSC over the test cases of Liver, Spleen, Kidney_L,
Kidney_R and Stomach (condition original), the training seconds, and fl minus each local model on
that model's centre. Rows already done (``OUT/<row>/results/metrics.csv`` present) are not run
again. The numbers this prints are what docs/demo.md's ablation table should hold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ORGANS = ("Liver", "Spleen", "Kidney_L", "Kidney_R", "Stomach")

#: The quick schedule's length before it was cut into shorter rounds (the first five rows ran with it).
EARLIER = {"epochs": 12, "iterations": 100, "rounds": 12}

#: The rows before ``bf16`` trained in float32 throughout.
FP32 = {"precision": "fp32"}

#: The coordinator's momentum in the ``server_momentum`` rows (each global step half carried into the next).
SERVER_MOMENTUM = 0.5
#: Iterations of learning-rate warm-up in the ``warmup`` rows (two epochs of the quick schedule).
WARMUP = 100

#: Row name -> overrides of ``TrainSettings.schedule("quick", ...)``.
ROWS: dict[str, dict[str, object]] = {
    "today": {**EARLIER, **FP32, "harmonise": False, "plan_spacing": "pooled"},
    "harmonised": {**EARLIER, **FP32, "plan_spacing": "pooled"},
    "optimizer_reset": {**EARLIER, **FP32, "optimizer_state": "reset", "plan_spacing": "pooled"},
    "longer": {**FP32, "epochs": 10, "iterations": 150, "rounds": 10, "plan_spacing": "pooled"},
    "finest_spacing": {**EARLIER, **FP32},
    "rounds24x50": dict(FP32),
    "rounds12x2": {**FP32, "rounds": 12, "local_epochs": 2},
    "rounds48x25": {**FP32, "epochs": 48, "iterations": 25, "rounds": 48},
    "bf16": {},
    "bf16_seed1": {"seed": 1},
    "bf16_seed2": {"seed": 2},
    "momentum_reset": {"optimizer_state": "momentum_reset"},
    "warmup": {"warmup": WARMUP},
    "warmup_seed1": {"warmup": WARMUP, "seed": 1},
    "warmup_seed2": {"warmup": WARMUP, "seed": 2},
    "server_momentum": {"server_momentum": SERVER_MOMENTUM},
    "server_momentum_seed1": {"server_momentum": SERVER_MOMENTUM, "seed": 1},
    "server_momentum_seed2": {"server_momentum": SERVER_MOMENTUM, "seed": 2},
}


def run_row(name: str, out: Path, engine: str, workers: int, reuse_local: str | None = None) -> dict[str, float]:
    """One ``demo --train`` with the row's settings into ``out/name``; returns its step timings.

    ``reuse_local``: a finished row whose local models this row links to instead of training
    them again (they do not depend on the federated settings; ``demo`` refuses them if the local
    schedule differs). Only the federated model trains then, so the row's time is not a whole run's.
    """
    from oarbench.demo import TrainSettings, run_demo

    row_dir = out / name
    if (row_dir / "results" / "metrics.csv").is_file():
        print(f"[ablation] {name}: done before, reused", flush=True)
        return {}
    row_dir.mkdir(parents=True, exist_ok=True)
    if reuse_local:
        (row_dir / "models").mkdir(exist_ok=True)
        for local in sorted((out / reuse_local / "models").glob("local-*")):
            link = row_dir / "models" / local.name
            if not link.exists():
                link.symlink_to(local.resolve(), target_is_directory=True)
        (row_dir / "reused_local.txt").write_text(f"{reuse_local}\n")
    settings = TrainSettings.schedule("quick", engine=engine, **ROWS[name])
    (row_dir / "settings.json").write_text(json.dumps(settings.training_key(), indent=1))
    t0 = time.perf_counter()
    run_demo(row_dir, train=settings, workers=workers, log=lambda line: print(f"[{name}] {line}", flush=True))
    seconds = time.perf_counter() - t0
    (row_dir / "seconds.txt").write_text(f"{seconds:.1f}\n")
    return {"seconds": seconds}


def summarise(out: Path, names: list[str]) -> "object":
    """Median DSC per row, model, centre and organ (condition original) from each row's metrics.csv."""
    import pandas as pd

    frames = []
    for name in names:
        metrics = out / name / "results" / "metrics.csv"
        if not metrics.is_file():
            continue
        t = pd.read_csv(metrics)
        t = t[(t["condition"] == "original") & t["structure"].isin(ORGANS)]
        med = t.groupby(["model", "centre", "structure"])["dsc"].median().unstack("structure")
        med = med.reindex(columns=list(ORGANS)).reset_index()
        med.insert(0, "row", name)
        seconds = out / name / "seconds.txt"
        med["seconds"] = float(seconds.read_text()) if seconds.is_file() else float("nan")
        frames.append(med)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def gaps(table: "object") -> "object":
    """fl minus local-X on centre X, per row and organ (negative: fl below the local model)."""
    import pandas as pd

    rows = []
    for row, g in table.groupby("row", sort=False):
        for centre in ("A", "B"):
            fl = g[(g["model"] == "fl") & (g["centre"] == centre)]
            local = g[(g["model"] == f"local-{centre}") & (g["centre"] == centre)]
            if len(fl) and len(local):
                rows.append({"row": row, "comparison": f"fl - local-{centre} on {centre}",
                             **{o: float(fl[o].iloc[0] - local[o].iloc[0]) for o in ORGANS}})
    return pd.DataFrame(rows)


def _markdown(table: "object") -> str:
    """A pandas table as a Markdown table (numbers to 3 decimals)."""
    def cell(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--engine", choices=("storage", "flower"), default="storage")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reuse-local", default=None, metavar="ROW",
                    help="link the local models of this finished row instead of training them (federated rows only)")
    args = ap.parse_args()
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        sys.exit(f"unknown row(s) {unknown}; rows: {', '.join(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"[ablation] {len(names)} row(s), engine {args.engine}, {os.cpu_count()} CPU(s)", flush=True)
    for name in names:
        run_row(name, args.out, args.engine, args.workers, args.reuse_local)
    table = summarise(args.out, names)
    if not len(table):
        sys.exit("no row finished")
    diff = gaps(table)
    table.to_csv(args.out / "ablation.csv", index=False)
    text = ("## Median DSC (condition original)\n\n" + _markdown(table)
            + "\n## fl minus the local model on that model's centre\n\n" + _markdown(diff))
    (args.out / "ablation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
