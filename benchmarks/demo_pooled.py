"""The centralised bound of the demo's federated model: one nnU-Net model trained on both centres' cases.

Run by hand (not a test, not in CI)::

    python benchmarks/demo_pooled.py --study ABLATION/harmonised/study --out pooled [--iterations 200]
        [--spacing pooled|finest]

FedAvg can at best reach what one model trained on the pooled cases of both centres reaches
(the data never leave the sites in the federation; here they are put together). Training it
with the quick schedule's options (``TrainSettings.schedule("quick")``: 2d, tiny width, AdamW from
0.01, batch 8, light augmentation) tells apart the two reasons the federated model can trail a
local model on that model's own centre:

* the pooled model trails it too: learning both centres at once costs accuracy at this schedule
  and network size (the federation cannot do better);
* the pooled model matches it: the loss comes from federated averaging itself (client drift over
  the local steps of a round, the optimizer state), which the federated settings can address.

``--iterations`` per epoch (12 epochs): 200 gives the pooled model as many gradient steps as the
two federated sites take together (2 x 1,200); 100 as many as one local model.

Prints the median DSC of Liver, Spleen, Kidney_L, Kidney_R and Stomach on each centre's test cases,
and writes them to ``OUT/pooled.csv``. Both centres' cases are harmonised to LPS before nnU-Net sees
them, as the demo's models are. ``--spacing pooled`` (default) plans as nnU-Net plans the pooled cases
(median spacing: 3.4 mm pixels on the demo); ``finest`` at the finer centre's spacing, as the
federated model's plans are by default (``plan_spacing``, docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ORGANS = ("Liver", "Spleen", "Kidney_L", "Kidney_R", "Stomach")
POOLED = "Dataset903_Pooled"
#: The demo study's raw dataset of each centre.
DATASETS = {"A": "Dataset901_CentreA", "B": "Dataset902_CentreB"}


def pooled_dataset(study: Path, out: Path) -> Path:
    """A raw nnU-Net dataset whose training cases are both centres' (links; the demo's case names are unique)."""
    raw = out / "raw" / POOLED
    if (raw / "dataset.json").is_file():
        return raw
    sources = {c: study / "nnUNet_raw" / ds for c, ds in DATASETS.items()}
    meta = json.loads((sources["A"] / "dataset.json").read_text())
    n = 0
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    for src in sources.values():
        for f in sorted((src / "imagesTr").iterdir()):
            (raw / "imagesTr" / f.name).symlink_to(f.resolve())
        for f in sorted((src / "labelsTr").iterdir()):
            (raw / "labelsTr" / f.name).symlink_to(f.resolve())
            n += 1
    meta["numTraining"] = n
    meta.pop("dataset", None)
    (raw / "dataset.json").write_text(json.dumps(meta, indent=1))
    return raw


def dsc_table(study: Path, predictions: dict[str, Path]) -> list[dict[str, object]]:
    """Median DSC per centre and organ (a case where both are empty has none; one empty side gives 0)."""
    import numpy as np

    from oarbench.io import read_volume

    labels = json.loads((study / "nnUNet_raw" / DATASETS["A"] / "dataset.json").read_text())["labels"]
    rows = []
    for centre, folder in predictions.items():
        ds = DATASETS[centre]
        values: dict[str, list[float]] = {o: [] for o in ORGANS}
        for ref_file in sorted((study / "nnUNet_raw" / ds / "labelsTs").glob("*.nii.gz")):
            ref = np.asarray(read_volume(ref_file).array)
            pred = np.asarray(read_volume(folder / ref_file.name).array)
            for organ in ORGANS:
                a, b = ref == labels[organ], pred == labels[organ]
                total = int(a.sum() + b.sum())
                if total:
                    values[organ].append(2.0 * float((a & b).sum()) / total)
        rows.append({"centre": centre, **{o: float(np.median(v)) for o, v in values.items()}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True, help="a demo study folder (DIR/study of demo --train)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spacing", choices=("pooled", "finest"), default="pooled")
    args = ap.parse_args()

    from oarbench.demo import TrainSettings
    from oarbench.train.nnunet import NnunetPaths, link_dataset, plan_and_preprocess, predict, train

    settings = TrainSettings.schedule("quick", epochs=args.epochs, iterations=args.iterations)
    raw = pooled_dataset(args.study, args.out)
    t0 = time.perf_counter()
    paths = NnunetPaths.under(args.out / "model").make()
    name = link_dataset(raw, paths)
    counts = [(c, len(list((raw / "labelsTr").glob(f"{c}_*")))) for c in ("A", "B")]  # nnU-Net's order: by name
    plan_and_preprocess(paths, name, configurations=(settings.configuration,), num_processes=args.threads,
                        spacing_groups=counts if args.spacing == "finest" else None)
    res = train(paths, name, configuration=settings.configuration, fold="all", epochs=settings.epochs,
                iterations=settings.iterations, width=settings.width, options=settings.options(),
                log_file=args.out / "model" / "train.log", threads=args.threads)
    summary = {"model_folder": str(res.model_folder)}
    trained = time.perf_counter() - t0
    preds = {}
    for centre, ds in DATASETS.items():
        preds[centre] = args.out / "predictions" / centre
        predict(summary["model_folder"], args.study / "nnUNet_raw" / ds / "imagesTs", preds[centre])
    rows = dsc_table(args.study, preds)
    lines = ["centre," + ",".join(ORGANS)] + [
        f"{r['centre']}," + ",".join(f"{r[o]:.3f}" for o in ORGANS) for r in rows]
    (args.out / "pooled.csv").write_text("\n".join(lines) + "\n")
    plans = json.loads((Path(summary["model_folder"]) / "plans.json").read_text())
    print(f"pooled model, {settings.epochs} x {settings.iterations} iterations, {args.spacing} spacing "
          f"{plans['configurations'][settings.configuration]['spacing']}, trained in {trained:.0f} s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
