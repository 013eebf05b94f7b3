"""A missing optional extra is one line naming the pip command, never a traceback."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from oarbench._optional import MissingDependencyError, missing_message, require
from oarbench.cli import main


def _hide(monkeypatch, top: str) -> None:
    """Make ``import top`` (and every ``top.sub``) fail as if the package were not installed."""
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, top, None)


def _one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for needle in needles:
        assert needle in text, text


def test_require_names_the_extra(monkeypatch):
    _hide(monkeypatch, "cryptography")
    with pytest.raises(MissingDependencyError, match=r"key files needs cryptography, which is not installed: "
                                                     r"pip install 'oarbench\[fl\]'"):
        require("cryptography.hazmat.primitives", "key files")
    assert missing_message("nnunetv2.inference", "x") == "x needs nnunetv2, which is not installed: pip install 'oarbench[nnunet]'"
    assert missing_message("somepkg") == "this command needs somepkg, which is not installed: pip install somepkg"


def test_fl_keys_without_cryptography(monkeypatch, tmp_path):
    _hide(monkeypatch, "cryptography")
    result = CliRunner().invoke(main, ["fl", "keys", "--out", str(tmp_path / "k"), "--name", "A"])
    _one_line_error(result, "oarbench fl keys needs cryptography", "pip install 'oarbench[fl]'")


def test_train_local_without_nnunet(monkeypatch, tmp_path):
    _hide(monkeypatch, "nnunetv2")
    import json

    from tests._owndata import make_folder_pair

    own = make_folder_pair(tmp_path / "own")
    ds = tmp_path / "Dataset501_X"
    ds.mkdir()
    own["images"].rename(ds / "imagesTr")
    own["reference"].rename(ds / "labelsTr")
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "Liver": 1, "Spleen": 2, "Kidney_L": 3, "Kidney_R": 4},
        "numTraining": 6, "file_ending": ".nii.gz"}))
    result = CliRunner().invoke(main, ["train", "local", "--dataset", str(ds), "--out", str(tmp_path / "w")])
    _one_line_error(result, "nnunetv2, which is not installed", "pip install 'oarbench[nnunet]'")


def test_cuda_evaluate_without_torch(monkeypatch, tmp_path):
    _hide(monkeypatch, "torch")
    ref = tmp_path / "ref"
    ref.mkdir()
    result = CliRunner().invoke(main, ["evaluate", "--reference", str(ref), "--prediction", str(ref),
                                       "--labels", "default", "--device", "cuda", "--out", str(tmp_path / "o"),
                                       "--no-progress"])
    # the label note goes first on stderr; the error itself is one line
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error: the torch backend needs torch, which is not installed: pip install 'oarbench[torch]'" in result.output


def test_nnunet_predictor_without_nnunet(monkeypatch, tmp_path):
    _hide(monkeypatch, "nnunetv2")
    from oarbench.robustness.predictors import NnUNetModelPredictor

    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("plans.json", "dataset.json"):
        (folder / name).write_text("{}")
    with pytest.raises(MissingDependencyError, match=r"pip install 'oarbench\[nnunet\]'"):
        NnUNetModelPredictor(folder).load()
