"""Do the two federated engines train the same model? Round 1 of the demo's federated model on each.

Run by hand (not a test; a few minutes on a 2-core CPU)::

    python benchmarks/engines_round1.py --out /tmp/engines [--iterations 20] [--study DIR]

Trains the demo study's federated model (``fl``: centres A and B) for one round of one local
epoch of ``--iterations`` iterations, with the quick schedule's trainer options and harmonised
sites, once through the storage engine and once through the Flower engine (SuperLink and two
SuperNodes on loopback), into ``OUT/storage`` and ``OUT/flower``. Both start from the same seeded
initial weights and draw the same seeded training batches (docs/training.md). It then compares,
tensor by tensor: the initial global weights each site received, each site's update, and the
global weights after round 1, and prints for each the number of tensors that are bit-identical
and the largest absolute difference. The demo study is generated into ``OUT/study`` (or reused
from ``--study``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def compare(a: Path, b: Path) -> dict[str, object]:
    """Tensors of two safetensors files: how many are bit-identical, the largest abs difference."""
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if sorted(x) != sorted(y):
        return {"same_keys": False, "only_first": sorted(set(x) - set(y))[:5], "only_second": sorted(set(y) - set(x))[:5]}
    identical = sum(bool(np.array_equal(x[k], y[k])) for k in x)
    worst = max(float(np.max(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64)), initial=0.0)) for k in x)
    scale = max(float(np.max(np.abs(x[k].astype(np.float64)), initial=0.0)) for k in x)
    return {"same_keys": True, "tensors": len(x), "bit_identical": identical, "max_abs_diff": worst,
            "max_abs_value": scale}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--study", type=Path, help="an already generated demo study folder")
    args = ap.parse_args()

    from oarbench.demo import TrainSettings, _train_model
    from oarbench.phantoms import generate_study, load_demo_config
    from oarbench.study import load_study

    args.out.mkdir(parents=True, exist_ok=True)
    paths = generate_study(args.study or args.out / "study", load_demo_config())
    study = load_study(paths.study_toml)
    model = next(m for m in study.models if len(m.trained_on) > 1)
    files = {
        "storage": {"initial (site A)": "parties/A/rounds/global_00000.safetensors",
                    "initial (site B)": "parties/B/rounds/global_00000.safetensors",
                    "update of site A": "parties/A/rounds/update_00000.safetensors",
                    "update of site B": "parties/B/rounds/update_00000.safetensors",
                    "global after round 1": "parties/coordinator/final.safetensors"},
        "flower": {"initial (site A)": "flower/sites/A/rounds/global_00000.safetensors",
                   "initial (site B)": "flower/sites/B/rounds/global_00000.safetensors",
                   "update of site A": "flower/sites/A/rounds/update_00000.safetensors",
                   "update of site B": "flower/sites/B/rounds/update_00000.safetensors",
                   "global after round 1": "flower/server/final.safetensors"},
    }
    seconds = {}
    for engine in ("storage", "flower"):
        work = args.out / engine
        settings = TrainSettings.schedule("quick", engine=engine, epochs=1, rounds=1, iterations=args.iterations)
        if not (work / files[engine]["global after round 1"]).is_file():
            t0 = time.perf_counter()
            _train_model(model, paths.datasets, work, settings, threads=1)
            seconds[engine] = round(time.perf_counter() - t0, 1)
    result = {"model": model.name, "iterations": args.iterations, "seconds": seconds, "compared": {}}
    for what in files["storage"]:
        a, b = args.out / "storage" / files["storage"][what], args.out / "flower" / files["flower"][what]
        result["compared"][what] = compare(a, b) if a.is_file() and b.is_file() else {"missing": [
            str(p) for p in (a, b) if not p.is_file()]}
    text = json.dumps(result, indent=1)
    (args.out / "engines_round1.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
