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


def test_local_tables_need_no_fsspec(monkeypatch, tmp_path):
    """A core install (no fsspec) reads and writes local results tables; only URLs need the storage extra."""
    import pandas as pd

    from oarbench.tables import TABLE_COLUMNS, read_table, write_parquet

    _hide(monkeypatch, "fsspec")
    row = {c: 0.5 for c in TABLE_COLUMNS}
    row.update(study="s", centre="A", model="m", condition="original", case="c1", patient="p1", structure="Liver",
               status="ok")
    table = pd.DataFrame([row, {**row, "case": "c2", "dsc": 0.25}], columns=list(TABLE_COLUMNS))
    table.to_csv(tmp_path / "metrics.csv", index=False)
    back = read_table(tmp_path / "metrics.csv")
    assert list(back["case"]) == ["c1", "c2"] and list(back["dsc"]) == [0.5, 0.25]
    assert list(read_table(f"file://{tmp_path / 'metrics.csv'}")["case"]) == ["c1", "c2"]
    pytest.importorskip("pyarrow")
    write_parquet(table, tmp_path / "metrics.parquet")
    write_parquet(table, tmp_path / "metrics.parquet")  # replaces the first dataset
    parquet = read_table(tmp_path / "metrics.parquet")
    assert list(parquet.columns) == list(TABLE_COLUMNS) and list(parquet["dsc"]) == [0.5, 0.25]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.parquet"]  # no leftovers


@pytest.mark.parametrize("url, extra, what", [("s3://bucket/results/metrics.csv", "s3", "fsspec and s3fs"),
                                              ("gs://bucket/results/metrics.csv", "remote", "fsspec")])
def test_a_url_names_the_storage_extra(monkeypatch, url, extra, what):
    from oarbench import storage
    from oarbench.tables import read_table

    _hide(monkeypatch, "fsspec")
    message = f"{url}: a URL needs {what}, which is not installed: pip install 'oarbench[{extra}]'"
    for call in (read_table, storage.read_bytes, storage.is_dir):
        with pytest.raises(ValueError) as err:
            call(url)
        assert str(err.value) == message


def test_an_s3_url_without_s3fs_names_the_s3_extra(monkeypatch):
    pytest.importorskip("fsspec")
    _hide(monkeypatch, "s3fs")
    import importlib

    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is its mapping)
    for protocol in ("s3", "s3a"):  # a class another test imported stays in fsspec's registry
        monkeypatch.delitem(registry._registry, protocol, raising=False)
    from oarbench import storage

    with pytest.raises(ValueError, match=r"^s3://b/x\.csv: a URL needs fsspec and s3fs, .*'oarbench\[s3\]'$"):
        storage.is_file("s3://b/x.csv")
