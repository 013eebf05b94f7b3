"""How much one local model of the demo moves with the training seed, in float32 and in bfloat16.

Run by hand (not a test, not in CI)::

    python benchmarks/local_seeds.py --row ABLATION/bf16 --out seeds [--centre B] [--seeds 0,1,2,3,4]
        [--precisions fp32,bf16] [--workers 2]

``--row`` is a finished ``oarbench demo --train`` output (an ablation row): its local model of
``--centre`` is trained again with the quick schedule (``TrainSettings.schedule("quick")``) from
the row's preprocessed cases, once per seed and precision, each training process on one CPU
thread, ``--workers`` at a time. The seed sets the initial weights and every epoch's data order
(docs/training.md, "Seeded data order"); seed 0 with the row's precision is the row's own model
and must give its numbers again (the check that this script trains what the demo trains).

Each model predicts the centre's test cases; printed, and written to ``OUT/seeds.csv``: the median
DSC of Liver, Spleen, Kidney_L, Kidney_R and Stomach per model. DSC follows the demo's
``metrics.csv``: a case whose reference lacks the organ (a kidney after nephrectomy) counts 0 when
the model draws it and is left out when the model leaves it empty.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ORGANS = ("Liver", "Spleen", "Kidney_L", "Kidney_R", "Stomach")
DATASETS = {"A": "Dataset901_CentreA", "B": "Dataset902_CentreB"}


def dsc_medians(pred_dir: Path, images: list[Path], labels_dir: Path, labels: dict[str, int]) -> dict[str, float]:
    """Median DSC per organ over the cases (the demo's convention for an organ absent from the reference)."""
    import numpy as np
    import SimpleITK as sitk

    values: dict[str, list[float]] = {o: [] for o in ORGANS}
    for image in images:
        case = image.name[: -len("_0000.nii.gz")]
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_dir / f"{case}.nii.gz")))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / f"{case}.nii.gz")))
        for organ in ORGANS:
            r, p = ref == labels[organ], pred == labels[organ]
            if not r.any():
                if p.any():
                    values[organ].append(0.0)
                continue
            values[organ].append(2.0 * float((r & p).sum()) / (float(r.sum()) + float(p.sum())))
    return {o: float(statistics.median(v)) for o, v in values.items() if v}


def run_one(row: Path, centre: str, out: Path, precision: str, seed: int) -> dict[str, object]:
    from oarbench.demo import TrainSettings
    from oarbench.robustness.predictors import NnUNetModelPredictor
    from oarbench.train.nnunet import NnunetPaths, train

    dataset = DATASETS[centre]
    work = out / f"{precision}_seed{seed}"
    result = work / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    shutil.rmtree(work, ignore_errors=True)
    paths = NnunetPaths.under(work).make()
    source = row / "models" / f"local-{centre}" / "nnUNet_preprocessed"
    shutil.copytree(source, paths.preprocessed, dirs_exist_ok=True)
    quick = TrainSettings.schedule("quick", precision=precision)
    trained = train(paths, dataset, configuration=quick.configuration, fold="all", epochs=quick.epochs,
                    iterations=quick.iterations, width=quick.width, options=quick.options(), threads=1, seed=seed)
    raw = row / "study" / "nnUNet_raw" / dataset
    images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    NnUNetModelPredictor(trained.model_folder, folds=("all",), use_mirroring=False).predict(images, work / "pred")
    labels = json.loads((source / dataset / "dataset.json").read_text())["labels"]
    medians = dsc_medians(work / "pred", images, raw / "labelsTs", labels)
    out_row = {"precision": precision, "seed": seed, "train_s": round(trained.seconds, 1), **medians}
    result.write_text(json.dumps(out_row))
    return out_row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", type=Path, required=True, help="a finished oarbench demo --train output folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--centre", choices=sorted(DATASETS), default="B")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(p, int(s)) for s in args.seeds.split(",") for p in args.precisions.split(",")]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        rows = list(pool.map(lambda job: run_one(args.row, args.centre, args.out, *job), jobs))
    with open(args.out / "seeds.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["precision", "seed", "train_s", *ORGANS])
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(f"local-{args.centre} {r['precision']} seed {r['seed']}: "
              + ", ".join(f"{o} {r[o]:.3f}" for o in ORGANS if o in r) + f" (training {r['train_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
