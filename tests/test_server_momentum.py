"""Server momentum at the coordinator (FedAvgM with server learning rate 1), on both engines.

Worked values: sites A (2 cases) and B (3 cases) add +0.25 and +0.5 to every weight of the global
model they receive, so FedAvg moves the global by (2 * 0.25 + 3 * 0.5) / 5 = 0.4 a round. With
momentum 0.5 each new global is that average plus half the last global step:
g0 = 1, g1 = 1.4, g2 = 1.8 + 0.5 * 0.4 = 2.0, g3 = 2.4 + 0.5 * 0.6 = 2.7.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors")

from oarbench.train.aggregate import check_server_momentum, server_momentum_step  # noqa: E402

WORKED = [1.0, 1.4, 2.0, 2.7]  # g0 .. g3, from the module docstring
BETA = 0.5


def test_the_step_adds_beta_times_the_last_global_step_to_floats_only() -> None:
    combined = {"w": np.array([1.0, 2.0], np.float32), "n": np.array([3], np.int64)}
    current = {"w": np.array([0.5, 1.0], np.float32), "n": np.array([9], np.int64)}
    previous = {"w": np.array([0.0, 0.0], np.float32), "n": np.array([1], np.int64)}
    out = server_momentum_step(combined, current, previous, 0.5)
    # 1 + 0.5 * (0.5 - 0) and 2 + 0.5 * (1 - 0); the integer tensor keeps the combination's value
    np.testing.assert_array_equal(out["w"], np.array([1.25, 2.5], np.float32))
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["n"], np.array([3]))
    # the first round (no previous global) and beta 0 are plain FedAvg
    for first in (server_momentum_step(combined, current, None, 0.5), server_momentum_step(combined, current,
                                                                                              previous, 0.0)):
        assert first.keys() == combined.keys()
        assert all(np.array_equal(first[k], combined[k]) for k in combined)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), float("inf"), "half", True, None])
def test_a_momentum_outside_0_to_1_is_refused_everywhere_it_is_set(bad, tmp_path: Path) -> None:
    from oarbench.demo import TrainSettings
    from oarbench.train.federated import FederationConfig

    message = "server momentum must be a number with 0 <= beta < 1"
    with pytest.raises(ValueError, match=message):
        check_server_momentum(bad)
    with pytest.raises(ValueError, match=message):
        FederationConfig(("A", "B"), rounds=1, server_momentum=bad)
    with pytest.raises(ValueError, match=message):
        TrainSettings(server_momentum=bad)
    assert check_server_momentum(0) == 0.0 and check_server_momentum("0.9") == 0.9


def test_the_demo_key_holds_the_momentum_and_a_folder_from_before_counts_as_none() -> None:
    from oarbench.demo import FEDERATED_ONLY, RECORDED_LATER, TrainSettings

    key = TrainSettings.schedule("quick", server_momentum=0.5).training_key()
    assert key["server_momentum"] == 0.5
    assert "server_momentum" not in TrainSettings.schedule("quick").training_key(federated=False)
    assert "server_momentum" in FEDERATED_ONLY and RECORDED_LATER["server_momentum"] == 0.0


class _AddConstant:
    def __init__(self, delta: float, n_cases: int) -> None:
        self.delta, self.n_cases = delta, n_cases

    def __call__(self, round_: int, w: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        return {k: (v + self.delta).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in w.items()}, self.n_cases


def _init() -> dict[str, np.ndarray]:
    return {"w": np.ones(4, np.float32), "k": np.array([1], np.int64)}


def _globals(exchange, rounds: int) -> list[dict[str, np.ndarray]]:
    from oarbench.train.exchange import tensors_from_bytes

    return [tensors_from_bytes(exchange.get("global", r, "global").payload) for r in range(rounds + 1)]


def test_storage_coordinator_applies_the_momentum_and_a_resumed_one_continues_it(fed) -> None:
    """Three rounds in one go give the worked globals; two rounds, then a new coordinator (and sites)
    asked for three, read the last step back from storage and publish the same third global, bit for bit."""
    from oarbench.train.exchange import COORDINATOR
    from oarbench.train.federated import FederationConfig, simulate

    sites = {"A": (fed["A"], _AddConstant(0.25, 2)), "B": (fed["B"], _AddConstant(0.5, 3))}
    counts = {"A": 2, "B": 3}
    simulate(fed[COORDINATOR], sites, FederationConfig(("A", "B"), rounds=2, poll_s=0.02, server_momentum=BETA),
             _init, case_counts=counts)

    def never_called() -> dict:
        raise AssertionError("a resumed coordinator must not publish initial weights again")

    simulate(fed[COORDINATOR], sites, FederationConfig(("A", "B"), rounds=3, poll_s=0.02, server_momentum=BETA),
             never_called, case_counts=counts)
    resumed = _globals(fed["A"], 3)
    for r, value in enumerate(WORKED):
        np.testing.assert_allclose(resumed[r]["w"], np.full(4, value, np.float32), rtol=1e-6)
        np.testing.assert_array_equal(resumed[r]["k"], [1])


def test_storage_coordinator_without_momentum_is_plain_fedavg(fed) -> None:
    from oarbench.train.exchange import COORDINATOR
    from oarbench.train.federated import FederationConfig, simulate

    sites = {"A": (fed["A"], _AddConstant(0.25, 2)), "B": (fed["B"], _AddConstant(0.5, 3))}
    simulate(fed[COORDINATOR], sites, FederationConfig(("A", "B"), rounds=3, poll_s=0.02), _init,
             case_counts={"A": 2, "B": 3})
    for r, g in enumerate(_globals(fed["A"], 3)):
        np.testing.assert_allclose(g["w"], np.full(4, 1 + 0.4 * r, np.float32), rtol=1e-6)


def test_one_run_and_a_resumed_run_publish_the_same_bytes(tmp_path: Path) -> None:
    """The momentum is read from the published globals, so stopping after round 2 changes no bit."""
    from oarbench.train.exchange import COORDINATOR, Exchange, generate_keys, load_keyring
    from oarbench.train.federated import FederationConfig, simulate

    def run(folder: str, splits: tuple[int, ...]) -> list[bytes]:
        generate_keys(tmp_path / folder / "keys", ["A", "B"])
        ex = {n: Exchange(str(tmp_path / folder / "bucket"), load_keyring(tmp_path / folder / "keys", n))
              for n in (COORDINATOR, "A", "B")}
        sites = {"A": (ex["A"], _AddConstant(0.25, 2)), "B": (ex["B"], _AddConstant(0.5, 3))}
        for rounds in splits:
            simulate(ex[COORDINATOR], sites, FederationConfig(("A", "B"), rounds=rounds, poll_s=0.02,
                                                              server_momentum=BETA),
                     _init, case_counts={"A": 2, "B": 3})
        return [ex["A"].get("global", r, "global").payload for r in range(4)]

    assert run("whole", (3,)) == run("resumed", (2, 3))


def test_flower_server_applies_the_same_momentum_as_the_storage_coordinator(tmp_path: Path, fed,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The Flower server (run config ``server-momentum``) publishes the worked globals, and the same
    updates through the storage coordinator give the same global weights, bit for bit."""
    flwr_app = pytest.importorskip("flwr.app")
    from flwr.common.config import parse_config_args
    from safetensors.numpy import load_file

    from oarbench.train.exchange import COORDINATOR
    from oarbench.train.federated import FederationConfig, simulate
    from oarbench.train.flower import ServerSettings, _run_config, serve
    from tests._flower_fakes import _Grid, _Msg, _site, _steps

    monkeypatch.setattr(flwr_app, "Message", _Msg)
    line = _run_config({"sites": "A,B", "rounds": 3, "out": str(tmp_path / "srv"), "server-momentum": BETA})
    settings = ServerSettings.from_run_config(parse_config_args([line]))
    assert settings.server_momentum == BETA
    serve(_Grid({11: _site("A", 2, 0.25), 22: _site("B", 3, 0.5)}), settings, _steps(), roster={"A": 11, "B": 22})
    flower = [load_file(str(tmp_path / "srv" / f"global_{r:05d}.safetensors")) for r in range(4)]
    for r, value in enumerate(WORKED):
        np.testing.assert_allclose(flower[r]["w"], np.full(4, value, np.float32), rtol=1e-6)

    sites = {"A": (fed["A"], _AddConstant(0.25, 2)), "B": (fed["B"], _AddConstant(0.5, 3))}
    simulate(fed[COORDINATOR], sites, FederationConfig(("A", "B"), rounds=3, poll_s=0.02, server_momentum=BETA),
             _init, case_counts={"A": 2, "B": 3})
    for g_flower, g_storage in zip(flower, _globals(fed["A"], 3)):
        assert g_flower.keys() == g_storage.keys()
        for k in g_flower:
            np.testing.assert_array_equal(g_flower[k], g_storage[k])


def test_flower_run_config_refuses_a_bad_momentum() -> None:
    pytest.importorskip("flwr")
    from oarbench.train.flower import ServerSettings

    with pytest.raises(ValueError, match="run config 'server-momentum': server momentum must be a number"):
        ServerSettings.from_run_config({"sites": "A", "rounds": 1, "out": "/tmp/x", "server-momentum": 1.5})
    assert ServerSettings.from_run_config({"sites": "A", "rounds": 1, "out": "/tmp/x"}).server_momentum == 0.0


def test_a_resumed_coordinator_refuses_a_tampered_previous_global(fed, tmp_path: Path) -> None:
    """A bucket writer without keys flips one byte of the round-1 global model after two rounds. The
    coordinator resumed for a third round needs that model's step for the momentum: it stops with the
    round and the reason, and publishes no third global model from a step it cannot verify."""
    from oarbench.train.exchange import COORDINATOR, Exchange, load_keyring
    from oarbench.train.federated import FederationConfig, simulate

    sites = {"A": (fed["A"], _AddConstant(0.25, 2)), "B": (fed["B"], _AddConstant(0.5, 3))}
    counts = {"A": 2, "B": 3}
    simulate(fed[COORDINATOR], sites, FederationConfig(("A", "B"), rounds=2, poll_s=0.02, server_momentum=BETA),
             _init, case_counts=counts)
    (ciphertext,) = sorted(Path(tmp_path / "bucket").glob("round_00001/global/global.*.bin"))
    data = bytearray(ciphertext.read_bytes())
    data[40] ^= 0x01
    ciphertext.write_bytes(bytes(data))
    # a coordinator started again (its own exchange, nothing verified in memory)
    restarted = Exchange(str(tmp_path / "bucket"), load_keyring(tmp_path / "keys", COORDINATOR))
    with pytest.raises(RuntimeError, match="round 2: the global model of round 1 fails verification, so the "
                                           "server momentum cannot continue"):
        simulate(restarted, sites, FederationConfig(("A", "B"), rounds=3, poll_s=0.02, server_momentum=BETA,
                                                           timeout_s=30), _init, case_counts=counts)
    assert not list(Path(tmp_path / "bucket").glob("round_00003/global/*"))
