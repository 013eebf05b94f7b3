"""How fast the quick schedule's network learns the demo phantoms: DSC against iterations, one centre.

Run by hand (not a test); it trains in this process, so set the thread count::

    python benchmarks/demo_schedule.py --study DIR/study --centre A [--iterations 1000] [--every 100]
        [--lr 0.01] [--optimizer adam] [--foreground 1.0] [--batch 8] [--width tiny] [--threads 1]

``DIR/study`` is a study made by ``oarbench phantoms --out DIR/study`` (or ``oarbench demo``).
The centre's training cases are planned and preprocessed for nnU-Net's ``2d`` configuration
(under ``--work``, reused when present); then ``OarbenchTrainer`` (light augmentation, the poly
learning-rate decay spanning ``--iterations``) trains in this process, and after every ``--every``
iterations the network predicts the centre's first ``--cases`` test cases (no mirroring, as the
demo predicts). Prints one line per evaluation: iterations, seconds of training so far, mean
training loss, and the median DSC over the cases of Liver, Spleen, Kidney_L, Kidney_R and Stomach
(a structure absent from a case's reference is left out for that case).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ORGANS = ("Liver", "Spleen", "Kidney_L", "Kidney_R", "Stomach")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", type=Path, required=True)
    ap.add_argument("--centre", default="A")
    ap.add_argument("--work", type=Path, default=Path("/tmp/oarbench-bench/schedule"))
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    ap.add_argument("--foreground", type=float, default=1.0, help="share of patches centred on a structure")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", default="tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from oarbench.train.nnunet import NnunetPaths, link_dataset, nnunet_env, plan_and_preprocess

    raw = next((args.study / "nnUNet_raw").glob(f"Dataset*_Centre{args.centre}"))
    paths = NnunetPaths.under(args.work / raw.name).make()
    name = link_dataset(raw, paths)
    pre = Path(paths.preprocessed) / name
    if not (pre / "nnUNetPlans_2d").is_dir():
        plan_and_preprocess(paths, name, configurations=("2d",), num_processes=2)
    os.environ.update({k: v for k, v in nnunet_env(paths, training=True).items()
                       if k.startswith("nnUNet")})  # read by nnU-Net when it is imported below

    import numpy as np
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from oarbench.train._worker import _build_network
    from oarbench.train.trainer import OarbenchTrainer, reduce_width

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    plans = reduce_width(json.loads((pre / "nnUNetPlans.json").read_text()), "2d", args.width)
    plans["configurations"]["2d"]["batch_size"] = args.batch
    plans["continue_training"] = False
    dataset_json = json.loads((pre / "dataset.json").read_text())
    trainer = OarbenchTrainer(plans, "2d", "all", dataset_json, torch.device("cpu"))
    epochs = max(1, args.iterations // args.every)
    trainer.configure(num_epochs=epochs, iterations_per_epoch=args.every, val_iterations_per_epoch=1,
                      augmentation="light", initial_lr=args.lr, optimizer=args.optimizer,
                      foreground_oversampling=args.foreground)
    trainer.initialize()
    trainer.on_train_start()

    values = {k: int(dataset_json["labels"][k]) for k in ORGANS}
    reader = SimpleITKIO()
    cases = []
    for image in sorted((raw / "imagesTs").glob("*_0000.nii.gz"))[: args.cases]:
        case = image.name[: -len("_0000.nii.gz")]
        data, props = reader.read_images([str(image)])
        cases.append((data, props, reader.read_seg(str(raw / "labelsTs" / f"{case}.nii.gz"))[0][0]))
    net, plans_manager, configuration = _build_network(plans, dataset_json, "2d", False)

    def validate() -> dict[str, float]:
        net.load_state_dict(trainer.network.state_dict())
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=False, device=torch.device("cpu"),
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(net, plans_manager, configuration, [net.state_dict()], dataset_json,
                                        "nnUNetTrainer", None)
        dsc: dict[str, list[float]] = {k: [] for k in ORGANS}
        for data, props, ref in cases:
            seg = np.asarray(predictor.predict_single_npy_array(data, props, None, None, False))
            for k, v in values.items():
                r, p = ref == v, seg == v
                if r.any():
                    dsc[k].append(2.0 * float((r & p).sum()) / (float(r.sum()) + float(p.sum())))
        return {k: round(float(np.median(x)), 3) for k, x in dsc.items() if x}

    trained_s = 0.0
    print(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}}), flush=True)
    for epoch in range(epochs):
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()  # sets the poly learning rate of this epoch
        t0 = time.perf_counter()
        losses = [float(trainer.train_step(next(trainer.dataloader_train))["loss"]) for _ in range(args.every)]
        trained_s += time.perf_counter() - t0
        trainer.current_epoch += 1
        print(json.dumps({"iterations": (epoch + 1) * args.every, "train_s": round(trained_s, 1),
                          "loss": round(float(np.mean(losses)), 3), "dsc": validate()}), flush=True)


if __name__ == "__main__":
    main()
