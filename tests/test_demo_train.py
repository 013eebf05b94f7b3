"""`oarbench demo --train` end to end with the quick schedule, shortened, on a shrunken study.

Trains local-A, local-B (nnU-Net v2) and the federated model (FedAvg through the
encrypted local-folder exchange), predicts both centres' test sets, and runs the
analysis including robustness with the trained models. Asserts that the local
models' training loss falls and that every output of the analysis is written. It
does not yet assert that the federated model segments better than untrained
weights: the shortened schedule does not learn that far (docs/demo.md).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from oarbench.labels import DEFAULT_LABELS

pytest.importorskip("nnunetv2")

DEMO_TOML = Path(__file__).resolve().parents[1] / "cases" / "demo.toml"
TEST_EPOCHS = 4
TEST_ITERATIONS = 50


def _tiny_config(tmp_path: Path) -> Path:
    text = DEMO_TOML.read_text()
    text = re.sub(r"(?m)^test_cases_per_centre = \d+", "test_cases_per_centre = 2", text)
    text = re.sub(r"(?m)^train_cases_per_centre = \d+", "train_cases_per_centre = 2", text)
    # Half the matrix at twice the spacing: the same field of view, an eighth of the voxels.
    text = text.replace("size_xyz = [128, 128, 64]", "size_xyz = [64, 64, 32]")
    text = text.replace("spacing_xyz_mm = [2.8, 2.8, 4.0]", "spacing_xyz_mm = [5.6, 5.6, 8.0]")
    text = text.replace("size_xyz = [96, 96, 44]", "size_xyz = [48, 48, 22]")
    text = text.replace("spacing_xyz_mm = [4.0, 4.0, 6.0]", "spacing_xyz_mm = [8.0, 8.0, 12.0]")
    assert text.count("size_xyz = [64, 64, 32]") == 1 and text.count("size_xyz = [48, 48, 22]") == 1
    path = tmp_path / "tiny-demo.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
@pytest.mark.nnunet
def test_demo_train_end_to_end(tmp_path):
    from oarbench.demo import TrainSettings, run_demo

    settings = dataclasses.replace(TrainSettings.schedule("quick", epochs=TEST_EPOCHS, iterations=TEST_ITERATIONS),
                                   conditions=("flip_lr",), robustness_cases=1, curve_cases=1)
    assert settings.rounds * settings.local_epochs == settings.epochs  # fl sites follow the local schedule
    out = tmp_path / "demo"
    outputs = run_demo(out, config=_tiny_config(tmp_path), workers=1, train=settings, log=lambda _: None)

    for model in ("local-A", "local-B", "fl"):
        folder = Path((out / "models" / model / "model_folder.txt").read_text())
        assert (folder / "plans.json").is_file() and (folder / "fold_all" / "checkpoint_final.pth").is_file()
    res = out / "results"
    table = pd.read_csv(res / "metrics.csv")
    assert len(table) == 2 * 3 * 2 * len(DEFAULT_LABELS)
    assert set(table["model"]) == {"local-A", "local-B", "fl"}
    # predictions of the trained models, not the simulated ones
    preds = sorted((out / "trained" / "original").glob("*/*/*.nii.gz"))
    assert len(preds) == 2 * 3 * 2
    # robustness predictions mapped back onto the reference grid, one case per centre
    assert len(sorted((out / "trained" / "flip_lr").glob("*/*/*.nii.gz"))) == 3 * 2
    robustness = pd.read_csv(res / "robustness.csv")
    assert set(robustness["condition"]) == {"original", "flip_lr"}
    assert len(robustness) == 3 * 2 * 2 * len(DEFAULT_LABELS)  # models x centres x conditions x structures
    index = pd.read_csv(res / "gallery" / "index.csv")
    drops = index[index["condition"] == "flip_lr"]
    assert len(drops) > 0 and drops["drawn"].all()
    assert outputs["report"].is_file()
    assert "flip_lr" in outputs["report"].read_text()

    # training lowers the loss (the local models' per-epoch snapshots record it)
    for model in ("local-A", "local-B"):
        losses = [json.loads(f.read_text())["train_loss"]
                  for f in sorted((out / "models" / model / "snapshots").glob("epoch_*.json"))]
        assert len(losses) == TEST_EPOCHS
        assert losses[-1] < losses[0] - 0.1, (model, losses)
    # the learning curves cover the federated model's rounds, from the untrained weights on
    curves = pd.read_csv(res / "learning_curves.csv")
    fl_liver = curves[(curves["model"] == "fl") & (curves["structure"] == "Liver")]
    assert set(fl_liver["iteration"]) == {r * TEST_ITERATIONS for r in range(TEST_EPOCHS + 1)}
    assert fl_liver["dsc"].fillna(0.0).between(0.0, 1.0).all()  # a missed liver has no DSC
    # Not asserted: that the federated model segments the liver far better than its untrained
    # weights. This shortened schedule does not learn the liver yet on the reduced study (measured:
    # fl liver DSC at most 0.06 against 0.01 untrained; docs/demo.md).
