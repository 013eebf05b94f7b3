"""The Flower engine on loopback: a real SuperLink and SuperNodes with TLS and SuperNode authentication.

One federation run (fingerprint round + one training round, tiny nnU-Net) checks:
(a) the global weights equal FedAvg of the two sites' own updates, computed here
from the sites' files; the storage engine aggregates the same updates to the same
bits; (b) a SuperNode whose key was never registered is refused; (c) the federated
model predicts; (d) the storage engine, run on the same datasets with the same seeds,
options and threads, trains the same updates and global weights, bit for bit; and
what the server received is only fingerprints, weights and case counts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_train_nnunet import LABELS, SHAPE, _check_predictions, make_dataset


def test_missing_flower_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from oarbench.train import flower

    monkeypatch.setitem(sys.modules, "flwr", None)
    with pytest.raises(ImportError) as err:
        flower.require_flower()
    assert str(err.value) == flower.FLOWER_HINT and "\n" not in str(err.value)
    assert "pip install" in str(err.value) and "oarbench[flower]" in str(err.value)


def test_run_config_and_records() -> None:
    pytest.importorskip("flwr")
    from oarbench.train.flower import ServerSettings, record_to_weights, weights_to_record

    s = ServerSettings.from_run_config({"sites": "A, B", "rounds": 2, "out": "/tmp/x", "local-epochs": 3})
    assert s.sites == ("A", "B") and s.rounds == 2 and s.local_epochs == 3 and s.iterations == 250
    with pytest.raises(ValueError, match="distinct"):
        ServerSettings.from_run_config({"sites": "A,A", "rounds": 1, "out": "/tmp/x"})
    # the shared plans' target spacing travels in the run config; the finest site's grid by default
    assert s.plan_spacing == "finest"
    assert ServerSettings.from_run_config({"sites": "A", "rounds": 1, "out": "/tmp/x",
                                           "plan-spacing": "pooled"}).plan_spacing == "pooled"
    with pytest.raises(ValueError, match="plan spacing must be one of finest, pooled, got 'median'"):
        ServerSettings.from_run_config({"sites": "A", "rounds": 1, "out": "/tmp/x", "plan-spacing": "median"})
    # Flower refuses a run config key the app does not declare: every key the coordinator sends is declared
    import tomllib

    from oarbench.train.flower import _PYPROJECT, options_to_run_config

    declared = set(tomllib.loads(_PYPROJECT)["tool"]["flwr"]["app"]["config"])
    sent = {"sites", "rounds", "local-epochs", "iterations", "configuration", "width", "seed", "timeout", "out",
            "roster", "plan-spacing", *options_to_run_config(None)}
    assert sent <= declared, sorted(sent - declared)
    w = {"b": np.arange(3, dtype=np.float64), "a": np.ones((2, 2), np.float32), "n": np.array([7], np.int64)}
    back = record_to_weights(weights_to_record(w))
    assert sorted(back) == ["a", "b", "n"]
    for k in w:
        assert back[k].dtype == w[k].dtype
        np.testing.assert_array_equal(back[k], w[k])


def test_weights_travel_as_one_buffer_and_anything_else_is_refused() -> None:
    """A round's weights are a few Flower objects, not one per tensor (each object is a request of its own on
    every hop), and a record that is not one safetensors buffer is refused as a malformed reply."""
    pytest.importorskip("flwr")
    from flwr.app import Array, ArrayRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from oarbench.train.flower import record_to_weights, weights_to_record

    rng = np.random.default_rng(0)
    w = {f"layer{i:03d}.weight": rng.normal(size=(8, 8, 3, 3)).astype(np.float32) for i in range(108)}
    packed = RecordDict({"global": weights_to_record(w)})
    per_tensor = RecordDict({"global": ArrayRecord(array_dict={k: Array(v) for k, v in w.items()})})
    assert len(get_all_nested_objects(packed)) <= 5 < 200 < len(get_all_nested_objects(per_tensor))
    back = record_to_weights(packed["global"])
    assert sorted(back) == sorted(w) and all(np.array_equal(back[k], w[k]) for k in w)
    with pytest.raises(ValueError, match="one 'safetensors' entry"):
        record_to_weights(per_tensor["global"])
    junk = ArrayRecord(array_dict={"safetensors": Array(np.frombuffer(b"\xff" * 64, dtype=np.uint8))})
    with pytest.raises(ValueError, match="not a safetensors buffer"):
        record_to_weights(junk)
    wide = ArrayRecord(array_dict={"safetensors": Array(np.zeros(8, np.float32))})
    with pytest.raises(ValueError, match="must be bytes"):
        record_to_weights(wide)


@pytest.mark.slow
@pytest.mark.nnunet
@pytest.mark.flower
def test_flower_deployment_tls_auth_fedavg_predict(tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    pytest.importorskip("nnunetv2")
    from safetensors.numpy import load_file

    from oarbench.train.exchange import COORDINATOR, Exchange, generate_keys, load_keyring, tensors_from_bytes, \
        tensors_to_bytes
    from oarbench.train.federated import FederationConfig, run_coordinator
    from oarbench.train.flower import LocalFlowerFederation, make_node_key, run_local
    from oarbench.train.nnunet import predict

    a = make_dataset(tmp_path / "data", "Dataset501_A", n=3, seed=1)
    b = make_dataset(tmp_path / "data", "Dataset502_B", n=4, seed=2, offset=30.0)
    run = tmp_path / "run"
    with LocalFlowerFederation(tmp_path / "flower") as fed:
        fed.start_superlink()
        # (b) a SuperNode with a key the SuperLink does not know (it even claims to be site A)
        x_key, _ = make_node_key(tmp_path / "intruder", "X")
        intruder = fed.start_supernode("X", x_key, site="A", dataset=a, work=tmp_path / "xw", max_retries=1)
        summary = run_local({"A": a, "B": b}, run, rounds=1, iterations=2, width="tiny", federation=fed,
                            timeout_s=900, threads=1)
        x_code = intruder.wait(timeout=120)
    x_log = (tmp_path / "flower/logs/supernode-X.log").read_text()
    assert x_code != 0 and "Failed to activate SuperNode" in x_log, x_log[-2000:]
    assert sorted(summary["sites"].values()) == ["A", "B"]  # only the two registered nodes took part
    assert not (tmp_path / "xw").exists()  # the intruder's ClientApp never ran
    assert summary["case_counts"] == {"A": 3, "B": 4}

    # (a) FedAvg of the sites' own updates (their files, not the server's), weighted 3:4
    ua = load_file(str(run / "sites/A/rounds/update_00000.safetensors"))
    ub = load_file(str(run / "sites/B/rounds/update_00000.safetensors"))
    final = load_file(str(run / "server/final.safetensors"))
    assert sorted(final) == sorted(ua) == sorted(ub)
    for k, v in final.items():
        expected = (3 * ua[k].astype(np.float64) + 4 * ub[k].astype(np.float64)) / 7
        np.testing.assert_allclose(v, expected.astype(v.dtype), rtol=1e-6, atol=1e-7)
    for s in ("A", "B"):  # every site ends with the same model
        site_final = load_file(str(run / "sites" / s / "final.safetensors"))
        for k, v in final.items():
            np.testing.assert_array_equal(site_final[k], v)
        assert (run / "sites" / s / "model/fold_all/checkpoint_final.pth").is_file()

    # same updates through the storage engine: the same aggregate, bit for bit
    g0 = load_file(str(run / "server/global_00000.safetensors"))
    generate_keys(tmp_path / "keys", ["A", "B"])
    ex = {n: Exchange(str(tmp_path / "bucket"), load_keyring(tmp_path / "keys", n)) for n in (COORDINATOR, "A", "B")}
    g = ex[COORDINATOR].put("global", 0, tensors_to_bytes(g0))
    ex["A"].put("update", 0, tensors_to_bytes(ua), parent=g.sha256, num_cases=3)
    ex["B"].put("update", 0, tensors_to_bytes(ub), parent=g.sha256, num_cases=4)
    run_coordinator(ex[COORDINATOR], FederationConfig(("A", "B"), rounds=1, poll_s=0.05), g0,
                    case_counts={"A": 3, "B": 4})
    storage_final = tensors_from_bytes(ex["A"].get("global", 1, "global").payload)
    for k, v in final.items():
        np.testing.assert_array_equal(storage_final[k], v)

    # (d) the storage engine trains the same model: same datasets, seeds, options and threads give the
    # same site updates and the same global weights after the round, bit for bit
    from oarbench.train.federated import FederationConfig, nnunet_simulate

    generate_keys(tmp_path / "storage-keys", ["A", "B"])
    nnunet_simulate(str(tmp_path / "storage-bucket"), tmp_path / "storage-keys", {"A": a, "B": b},
                    tmp_path / "storage-work", FederationConfig(("A", "B"), rounds=1, poll_s=0.2),
                    iterations=2, width="tiny", threads=1)
    for site, flower_update in (("A", ua), ("B", ub)):
        storage_update = load_file(str(tmp_path / "storage-work" / site / "rounds/update_00000.safetensors"))
        assert sorted(storage_update) == sorted(flower_update)
        for k, v in flower_update.items():
            np.testing.assert_array_equal(storage_update[k], v, err_msg=f"{site} {k}")
    storage_engine_final = load_file(str(tmp_path / "storage-work/coordinator/final.safetensors"))
    for k, v in final.items():
        np.testing.assert_array_equal(storage_engine_final[k], v, err_msg=k)

    # privacy: what the server received
    received = json.loads((run / "server/received.json").read_text())
    assert {r["step"] for r in received} == {"query", "train", "evaluate"}
    assert all("error" not in r for r in received)
    for r in received:
        c = r["content"]
        if r["step"] == "query":
            assert c == {"fingerprint": {"type": "ConfigRecord", "entries": {
                "site": {"type": "str", "size": 1}, "message": c["fingerprint"]["entries"]["message"]}}}
            assert c["fingerprint"]["entries"]["message"]["size"] < 20000 < int(np.prod(SHAPE)) * 4
        elif r["step"] == "train":
            assert set(c) == {"update", "metrics"}
            assert c["metrics"] == {"type": "MetricRecord", "entries": {"num-cases": {"type": "int"}}}
            assert {k: tuple(e["shape"]) for k, e in c["update"]["entries"].items()} == \
                {k: v.shape for k, v in final.items()}
        else:
            assert c == {"model": {"type": "MetricRecord", "entries": {"written": {"type": "int"}}}}
    bodies = json.loads((run / "server/fingerprints.json").read_text())
    assert set(bodies) == {"A", "B"}
    for body in bodies.values():
        assert set(body) == {"fingerprint", "dataset", "num_cases"}
        assert set(body["dataset"]) == {"labels", "channel_names", "file_ending"}
        assert body["dataset"]["labels"] == LABELS
        text = json.dumps(body)
        assert "case00" not in text and "imagesTr" not in text and str(tmp_path) not in text

    # (c) the federated model predicts
    inputs = [a / "imagesTr" / "case000_0000.nii.gz"]
    in_dir = tmp_path / "test_in"
    in_dir.mkdir()
    (in_dir / inputs[0].name).symlink_to(inputs[0])
    predict(Path(summary["model"]), in_dir, tmp_path / "pred", fold="all")
    _check_predictions(tmp_path / "pred", inputs)


def test_cli_engine_options_checked(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from oarbench.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["fl", "site", "--engine", "flower", "--site", "A", "--dataset", str(tmp_path),
                               "--work", str(tmp_path / "w")])
    assert res.exit_code != 0 and "--engine flower needs --superlink, --root-certificates, --auth-key" in res.output
    res = runner.invoke(main, ["fl", "coordinator", "--work", str(tmp_path / "w")])
    assert res.exit_code != 0 and "--engine storage needs --storage, --keys, --sites, --rounds" in res.output
    assert "Traceback" not in res.output
    for command in ("coordinator", "simulate"):
        res = runner.invoke(main, ["fl", command, "--work", str(tmp_path / "w"), "--plan-spacing", "median"])
        assert res.exit_code != 0 and res.output.strip() == ("Error: Invalid value for '--plan-spacing': 'median' "
                                                             "is not one of 'finest', 'pooled'."), res.output


def test_cli_without_flower_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from oarbench.cli import main
    from oarbench.train.flower import FLOWER_HINT

    monkeypatch.setitem(sys.modules, "flwr", None)
    res = CliRunner().invoke(main, ["fl", "simulate", "--engine", "flower", "--dataset", f"A={tmp_path}",
                                    "--work", str(tmp_path / "w"), "--rounds", "1"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1] == f"Error: {FLOWER_HINT}"


# --------------------------------------------------------------------------- the server logic, in-process


from tests._flower_fakes import _Grid, _Msg, _Reply, _fp_body, _site, _steps  # noqa: E402,F401


def test_server_pins_counts_binds_nodes_and_averages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node 33 claims site X, not in the federation: refused. FedAvg 2:3 of +0.25 and +0.5 adds
    (2*0.25 + 3*0.5)/5 = 0.4 a round: 1 -> 1.8. (Two nodes claiming one site: tests/test_flower_trust.py.)"""
    flwr_app = pytest.importorskip("flwr.app")
    from safetensors.numpy import load_file

    from oarbench.train.flower import ServerSettings, serve

    monkeypatch.setattr(flwr_app, "Message", _Msg)
    grid = _Grid({11: _site("A", 2, 0.25), 22: _site("B", 3, 0.5), 33: _site("X", 50, 9.0)})
    st = ServerSettings(sites=("A", "B"), rounds=2, out=tmp_path / "srv")
    summary = serve(grid, st, _steps(), roster={"A": 11, "B": 22})
    assert summary["sites"] == {"11": "A", "22": "B"} and summary["case_counts"] == {"A": 2, "B": 3}
    assert [c for r in summary["rounds"] for c in r["contributors"]] == [["A", 2], ["B", 3]] * 2
    assert (33, "train") not in grid.sent  # the node that claimed another site never trains
    final = load_file(str(tmp_path / "srv/final.safetensors"))
    np.testing.assert_allclose(final["w"], np.full(4, 1 + 2 * 0.4, np.float32), rtol=1e-6)
    assert json.loads((tmp_path / "srv/plans.json").read_text()) == {"n": 5}


def test_server_bounds_updates_against_the_first_global(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Flower server applies the storage engine's bounds against the first global model: a site
    that sends the sign-flipped global (a step of 2x the global's norm, over the 1.3x bound) is refused
    and the run cannot go on without it; an honest step of 0.25 per weight (norm 0.5 against 2) is kept."""
    flwr_app = pytest.importorskip("flwr.app")
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from oarbench.train.flower import ServerSettings, record_to_weights, serve, weights_to_record

    def flipper(kind: str, content):
        if kind == "query":
            return RecordDict({"fingerprint": ConfigRecord({"site": "B", "message": json.dumps(_fp_body(3))})})
        w = {k: (-v if v.dtype.kind == "f" else v) for k, v in record_to_weights(content["global"]).items()}
        return RecordDict({"update": weights_to_record(w), "metrics": MetricRecord({"num-cases": 3})})

    monkeypatch.setattr(flwr_app, "Message", _Msg)
    grid = _Grid({11: _site("A", 2, 0.25), 22: flipper})
    with pytest.raises(RuntimeError, match=r"'B': 'update moves 4 away from the global model, more than 1.3 x"):
        serve(grid, ServerSettings(sites=("A", "B"), rounds=1, out=tmp_path / "srv"), _steps(),
              roster={"A": 11, "B": 22})


def test_server_refuses_a_site_claiming_more_cases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flwr_app = pytest.importorskip("flwr.app")
    from oarbench.train.flower import ServerSettings, serve

    monkeypatch.setattr(flwr_app, "Message", _Msg)
    grid = _Grid({11: _site("A", 2, 1.0), 22: _site("B", 3, 2.0, claim=300)})
    with pytest.raises(RuntimeError, match="claims 300 cases, its fingerprint has 3"):
        serve(grid, ServerSettings(sites=("A", "B"), rounds=1, out=tmp_path / "srv"), _steps(),
              roster={"A": 11, "B": 22})
    grid = _Grid({11: _site("A", 2, 1.0), 22: _site("B", 3, 1e30)})
    with pytest.raises(RuntimeError, match="> 1e\\+06"):
        serve(grid, ServerSettings(sites=("A", "B"), rounds=1, out=tmp_path / "srv2"), _steps(),
              roster={"A": 11, "B": 22})


def test_trainer_options_reach_the_site_trainer_through_the_messages(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick schedule's options go from the coordinator's run config (Flower's own parser) through the
    query, train and evaluate messages to every site's NnunetSite and its trainer, with the schedule."""
    flwr_app = pytest.importorskip("flwr.app")
    from types import SimpleNamespace

    from flwr.common.config import parse_config_args

    from oarbench.demo import TrainSettings
    from oarbench.train import federated
    from oarbench.train.flower import (ServerSettings, _run_config, client_evaluate, client_query, client_train,
                                       options_to_run_config, serve)
    from oarbench.train.nnunet import TrainerOptions

    quick = TrainSettings.schedule("quick", optimizer_state="reset", seed=5, warmup=30)
    opts = quick.options()
    assert opts != TrainerOptions() and opts.optimizer == "adam" and opts.batch_size == 8
    assert opts.optimizer_state == "reset" and opts.harmonise is True and opts.precision == "auto"
    assert opts.seed == 5 and opts.warmup == 30
    line = _run_config({"sites": "A,B", "rounds": 2, "local-epochs": 1, "iterations": quick.iterations,
                        "out": str(tmp_path / "srv"), **options_to_run_config(opts)})
    settings = ServerSettings.from_run_config(parse_config_args([line]))
    assert settings.options == opts and settings.iterations == quick.iterations
    assert settings.seed == 5  # the run's seed: the initial global weights and, in the options, the data order
    with pytest.raises(ValueError, match="run config 'seed' must be a non-negative integer"):
        ServerSettings.from_run_config({"sites": "A", "rounds": 1, "out": "/tmp/x", "seed": "x"})
    with pytest.raises(ValueError, match="run config 'warmup' must be a non-negative integer"):
        ServerSettings.from_run_config({"sites": "A", "rounds": 1, "out": "/tmp/x", "warmup": "ten"})
    # nnU-Net's own choices (None) survive the run config, which holds no null
    plain = ServerSettings.from_run_config(parse_config_args([_run_config(
        {"sites": "A", "rounds": 1, "out": "/tmp/x", **options_to_run_config(TrainerOptions(harmonise=False))})]))
    assert plain.options == TrainerOptions(harmonise=False)

    seen: list[tuple] = []
    counts = {"A": 2, "B": 3}

    class FakeSite:
        def __init__(self, dataset_dir, work, *, configuration, device, num_processes, options, threads,
                     step_server=None):
            self.site, self.work, self.options = Path(dataset_dir).name, Path(work), options
            seen.append(("site", self.site, options))

        def fingerprint_message(self):
            return _fp_body(counts[self.site])

        def install_plans(self, plans):
            seen.append(("plans", self.site, plans))

        def trainer(self, rounds, local_epochs, iterations):
            def step(round_, global_weights):
                seen.append(("train", self.site, self.options, rounds, local_epochs, iterations, round_))
                return {k: (v + 1).astype(v.dtype) for k, v in global_weights.items()}, counts[self.site]
            return step

        def write_model(self, plans, final, num_training):
            seen.append(("model", self.site, num_training))
            return self.work / "model"

    monkeypatch.setattr(federated, "NnunetSite", FakeSite)
    monkeypatch.setattr(flwr_app, "Message", _Msg)

    def node(site: str):
        ctx = SimpleNamespace(node_config={"site": site, "dataset": str(tmp_path / site),
                                           "work": str(tmp_path / "w" / site)})
        steps = {"query": client_query, "train": client_train, "evaluate": client_evaluate}
        return lambda kind, content: steps[kind](content, ctx)

    serve(_Grid({1: node("A"), 2: node("B")}), settings, _steps(), roster={"A": 1, "B": 2})
    trained = [s for s in seen if s[0] == "train"]
    assert sorted((s[1], s[6]) for s in trained) == [("A", 0), ("A", 1), ("B", 0), ("B", 1)]
    for _, site, options, rounds, local_epochs, iterations, _ in trained:
        assert (options, rounds, local_epochs, iterations) == (opts, 2, 1, quick.iterations), site
    # every step's site object got the same options (harmonisation included, so the dataset links agree)
    assert {s[2] for s in seen if s[0] == "site"} == {opts}
    assert sorted(s[1:] for s in seen if s[0] == "model") == [("A", 5), ("B", 5)]
