"""Federated averaging protocol over the local-folder exchange, with a tiny numpy "model".

These run in seconds; the nnU-Net trainer plugs into the same protocol in
tests/test_train_nnunet.py.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cryptography")
pytest.importorskip("safetensors")

from oarbench.train.aggregate import AggregationRules  # noqa: E402
from oarbench.train.exchange import COORDINATOR, Exchange, tensors_to_bytes  # noqa: E402
from oarbench.train.federated import (  # noqa: E402
    FederationConfig,
    fedavg,
    make_shared_plans,
    fetch_plans,
    merge_fingerprints,
    publish_fingerprint,
    run_coordinator,
    run_site,
    simulate,
)

FAST = 0.02  # poll interval in seconds
ONE = {"A": 1, "B": 1}  # pinned case counts
HEADER = {"labels": {"background": 0, "Liver": 1}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}


def _init() -> dict[str, np.ndarray]:
    return {"w": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float64)}


class AddConstant:
    """Local 'training' that adds a constant to every weight; counts its calls."""

    def __init__(self, delta: float, n_cases: int) -> None:
        self.delta, self.n_cases, self.calls = delta, n_cases, 0

    def __call__(self, round_: int, w: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        self.calls += 1
        return {k: (v + self.delta).astype(v.dtype) for k, v in w.items()}, self.n_cases


def test_fedavg_is_case_weighted_mean() -> None:
    # (1*1 + 3*4)/4 = 3.25 and (1*2 + 3*8)/4 = 6.5; the int tensor: (1*1 + 3*2)/4 = 1.75 -> 2
    a = {"x": np.array([1.0, 2.0], np.float32), "n": np.array([1], np.int64)}
    b = {"x": np.array([4.0, 8.0], np.float32), "n": np.array([2], np.int64)}
    out = fedavg([(a, 1), (b, 3)])
    assert out["x"].dtype == np.float32
    np.testing.assert_array_equal(out["x"], np.array([3.25, 6.5], np.float32))
    np.testing.assert_array_equal(out["n"], np.array([2]))
    with pytest.raises(ValueError, match="shapes"):
        fedavg([(a, 1), ({"x": np.zeros(3, np.float32), "n": a["n"]}, 1)])
    with pytest.raises(ValueError, match="positive"):
        fedavg([(a, 0)])


def test_published_global_equals_weighted_mean_of_fixed_updates(fed: dict[str, Exchange]) -> None:
    """Aggregation correctness end to end through storage: fixed updates in, weighted mean out."""
    rng = np.random.default_rng(7)
    init = {"conv": rng.normal(size=(4, 3, 3)).astype(np.float32), "bias": rng.normal(size=5).astype(np.float32)}
    # updates near the global model (the step rule refuses an update farther from it than its norm)
    up_a = {k: (v + 0.2 * rng.normal(size=v.shape)).astype(np.float32) for k, v in init.items()}
    up_b = {k: (v + 0.2 * rng.normal(size=v.shape)).astype(np.float32) for k, v in init.items()}
    coord = fed[COORDINATOR]
    g0 = coord.put("global", 0, tensors_to_bytes(init))
    fed["A"].put("update", 0, tensors_to_bytes(up_a), parent=g0.sha256, num_cases=3)
    fed["B"].put("update", 0, tensors_to_bytes(up_b), parent=g0.sha256, num_cases=5)
    # the case counts come from the sites' signed fingerprints (3 and 5 cases)
    publish_fingerprint(fed["A"], _fp([[3, 1, 1]] * 3, [[10, 20, 20]] * 3, 10, 2, 0, 1, 10, 19, 20, 1.0), HEADER, 3)
    publish_fingerprint(fed["B"], _fp([[2, 1, 1]] * 5, [[12, 20, 20]] * 5, 30, 4, 5, 6, 30, 50, 60, 0.5), HEADER, 5)
    results = run_coordinator(coord, FederationConfig(("A", "B"), rounds=1, poll_s=FAST), init)
    assert results[0].contributors == (("A", 3), ("B", 5))
    got = fed["A"].get("global", 1, "global")
    assert got is not None and got.header.num_cases == 8 and got.header.parent == g0.sha256
    from oarbench.train.exchange import tensors_from_bytes

    g1 = tensors_from_bytes(got.payload)
    for k in init:
        expected = (3 * up_a[k].astype(np.float64) + 5 * up_b[k].astype(np.float64)) / 8
        assert g1[k].dtype == np.float32
        np.testing.assert_allclose(g1[k], expected, rtol=1e-6, atol=1e-7)


def test_simulate_three_rounds(fed: dict[str, Exchange]) -> None:
    # each round: global += (2 * 1 + 6 * 4) / 8 = 3.25, so after 3 rounds from 0: 9.75
    # (steps of up to 4 / 3.25 times the global's norm: the step rule is widened to let them through)
    a, b = AddConstant(1.0, 2), AddConstant(4.0, 6)
    cfg = FederationConfig(("A", "B"), rounds=3, poll_s=FAST)
    results, finals = simulate(fed[COORDINATOR], {"A": (fed["A"], a), "B": (fed["B"], b)}, cfg, _init,
                               case_counts={"A": 2, "B": 6}, rules=AggregationRules(max_delta_ratio=2.0))
    assert [r.round for r in results] == [0, 1, 2]
    assert a.calls == b.calls == 3
    for site in ("A", "B"):
        np.testing.assert_array_equal(finals[site]["w"], np.full((2, 3), 9.75, np.float32))
        np.testing.assert_array_equal(finals[site]["b"], np.full(4, 9.75))


def test_quorum_after_timeout(fed: dict[str, Exchange]) -> None:
    """B never answers: with quorum 1 the coordinator aggregates A alone after the timeout."""
    coord = fed[COORDINATOR]
    cfg = FederationConfig(("A", "B"), rounds=1, quorum=1, timeout_s=0.3, poll_s=FAST)
    t = threading.Thread(target=run_site, args=(fed["A"], cfg, AddConstant(2.0, 5)), kwargs={"timeout_s": 20})
    t.start()
    results = run_coordinator(coord, cfg, _init, case_counts={"A": 5, "B": 1})
    t.join()
    assert results[0].contributors == (("A", 5),)
    cfg_all = FederationConfig(("A", "B"), rounds=2, timeout_s=0.2, poll_s=FAST)
    with pytest.raises(RuntimeError, match="quorum is 2"):
        run_coordinator(coord, cfg_all, _init, case_counts={"A": 5, "B": 1})


def test_rejected_update_never_aggregated(fed: dict[str, Exchange]) -> None:
    coord = fed[COORDINATOR]
    g0 = coord.put("global", 0, tensors_to_bytes(_init()))
    fed["A"].put("update", 0, tensors_to_bytes({k: v + 1 for k, v in _init().items()}), parent=g0.sha256,
                 num_cases=1)
    fed["B"].put("update", 0, tensors_to_bytes({k: v + 100 for k, v in _init().items()}), parent=g0.sha256,
                 num_cases=1)
    obj = next((Path(coord.root) / "round_00000/update").glob("B.*.bin"))
    data = bytearray(obj.read_bytes())
    data[20] ^= 0xFF
    obj.write_bytes(bytes(data))
    # a damaged object is waited for (its owner may replace it) until the timeout, then refused
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        run_coordinator(coord, FederationConfig(("A", "B"), rounds=1, timeout_s=0.3, poll_s=FAST), _init,
                        case_counts=ONE)
    results = run_coordinator(coord, FederationConfig(("A", "B"), rounds=1, quorum=1, timeout_s=0.3, poll_s=FAST),
                              _init, case_counts=ONE)
    assert results[0].contributors == (("A", 1),)
    assert any("sha256 mismatch" in r for r in results[0].rejected)
    g1 = fed["A"].get("global", 1, "global")
    from oarbench.train.exchange import tensors_from_bytes

    np.testing.assert_array_equal(tensors_from_bytes(g1.payload)["w"], np.ones((2, 3), np.float32))


def test_update_with_wrong_shapes_rejected(fed: dict[str, Exchange]) -> None:
    coord = fed[COORDINATOR]
    g0 = coord.put("global", 0, tensors_to_bytes(_init()))
    fed["A"].put("update", 0, tensors_to_bytes({"w": np.zeros((3, 3), np.float32), "b": np.zeros(4)}),
                 parent=g0.sha256, num_cases=1)
    with pytest.raises(RuntimeError, match="global model has float32"):
        run_coordinator(coord, FederationConfig(("A",), rounds=1, poll_s=FAST), _init, case_counts=ONE)


def test_restart_resumes_from_last_completed_round(fed: dict[str, Exchange]) -> None:
    a, b = AddConstant(1.0, 1), AddConstant(3.0, 1)
    cfg1 = FederationConfig(("A", "B"), rounds=1, poll_s=FAST)
    wide = AggregationRules(max_delta_ratio=2.0)  # B's steps are 1.5 x the global's norm
    simulate(fed[COORDINATOR], {"A": (fed["A"], a), "B": (fed["B"], b)}, cfg1, _init, case_counts=ONE, rules=wide)
    # round 0 done: global 1 = 0 + (1 + 3) / 2 = 2. A also uploads its round-1 update, then "crashes".
    cfg2 = FederationConfig(("A", "B"), rounds=2, poll_s=FAST)
    from oarbench.train.exchange import tensors_from_bytes

    g1 = fed["A"].get("global", 1, "global")
    w1 = tensors_from_bytes(g1.payload)
    fed["A"].put("update", 1, tensors_to_bytes(a(1, w1)[0]), parent=g1.header.sha256, num_cases=1)
    calls_before = a.calls

    def never_called() -> dict:
        raise AssertionError("a resumed coordinator must not publish initial weights again")

    results, finals = simulate(fed[COORDINATOR], {"A": (fed["A"], a), "B": (fed["B"], b)}, cfg2, never_called,
                               case_counts=ONE, rules=wide)
    assert [r.round for r in results] == [1]
    assert a.calls == calls_before  # A's committed update was reused, not retrained
    # global 2 = 2 + (1 + 3) / 2 = 4
    np.testing.assert_array_equal(finals["B"]["w"], np.full((2, 3), 4.0, np.float32))


def _fp(spacings, shapes, mean, std, lo, p005, med, p995, hi, rel) -> dict:
    return {
        "spacings": spacings,
        "shapes_after_crop": shapes,
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": mean, "std": std, "min": lo, "percentile_00_5": p005, "median": med,
                  "percentile_99_5": p995, "max": hi}
        },
        "median_relative_size_after_cropping": rel,
    }


def test_merge_fingerprints_exact_and_approximate_fields() -> None:
    fa = _fp([[3, 1, 1]], [[10, 20, 20]], 10.0, 2.0, 0.0, 1.0, 10.0, 19.0, 20.0, 1.0)
    fb = _fp([[2, 1, 1]] * 3, [[12, 20, 20]] * 3, 30.0, 4.0, 5.0, 6.0, 30.0, 50.0, 60.0, 0.5)
    m = merge_fingerprints({"B": (fb, 3), "A": (fa, 1)})
    # per-case lists: A's case then B's three (site-name order)
    assert m["spacings"] == [[3, 1, 1], [2, 1, 1], [2, 1, 1], [2, 1, 1]]
    assert m["shapes_after_crop"][0] == [10, 20, 20]
    st = m["foreground_intensity_properties_per_channel"]["0"]
    # mean = (1*10 + 3*30)/4 = 25; E[x^2] = (1*(4+100) + 3*(16+900))/4 = 713; var = 713 - 625 = 88
    assert st["mean"] == pytest.approx(25.0)
    assert st["std"] == pytest.approx(np.sqrt(88.0))
    assert (st["min"], st["max"]) == (0.0, 60.0)
    # relative size: (1*1.0 + 3*0.5)/4 = 0.625
    assert m["median_relative_size_after_cropping"] == pytest.approx(0.625)
    # median of the mixture lies between the site medians
    assert 10.0 < st["median"] < 30.0
    # identical sites: the approximate quantiles reproduce the site's own
    same = merge_fingerprints({"A": (fa, 1), "B": (fa, 1)})["foreground_intensity_properties_per_channel"]["0"]
    for key in ("median", "percentile_00_5", "percentile_99_5", "mean", "std"):
        assert same[key] == pytest.approx(fa["foreground_intensity_properties_per_channel"]["0"][key], abs=1e-6)
    with pytest.raises(ValueError, match="case count"):
        merge_fingerprints({"A": (fa, 2)})


def test_privacy_only_summaries_and_encrypted_weights_in_storage(fed: dict[str, Exchange]) -> None:
    """List everything the federation wrote: fingerprints, plans, encrypted weights, manifests; nothing else."""
    header = {"labels": {"background": 0, "Liver": 1}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}
    fps = {
        "A": _fp([[3, 1, 1]] * 2, [[10, 20, 20]] * 2, 10, 2, 0, 1, 10, 19, 20, 1.0),
        "B": _fp([[2, 1, 1]] * 3, [[12, 20, 20]] * 3, 30, 4, 5, 6, 30, 50, 60, 0.5),
    }
    cfg = FederationConfig(("A", "B"), rounds=2, poll_s=FAST)
    for s, fp in fps.items():
        publish_fingerprint(fed[s], fp, header, len(fp["spacings"]))
    seen = {}

    def plan(merged: dict, dataset: dict) -> dict:
        seen["n"] = dataset["numTraining"]
        return {"plans_name": "shared", "spacing": merged["spacings"][0]}

    plans = make_shared_plans(fed[COORDINATOR], cfg, plan)
    assert seen["n"] == 5
    assert fetch_plans(fed["B"], poll_s=FAST, timeout_s=5) == plans
    simulate(fed[COORDINATOR], {"A": (fed["A"], AddConstant(1, 2)), "B": (fed["B"], AddConstant(2, 3))}, cfg, _init,
             rules=AggregationRules(max_delta_ratio=2.0))

    weights_bytes = len(tensors_to_bytes(_init()))  # same names, shapes, dtypes every round
    objects = fed[COORDINATOR].list_objects()
    allowed = {"setup/fingerprint/A", "setup/fingerprint/B", "setup/plans/plans"}
    allowed |= {f"round_{r:05d}/global/global" for r in range(3)}
    allowed |= {f"round_{r:05d}/update/{s}" for r in range(2) for s in "AB"}
    stems = set()
    for rel, size in objects:
        stem, ext = rel.split(".", 1)
        if ext != "manifest.json":
            assert re.fullmatch(r"[0-9a-f]{32}\.bin", ext), rel
            ext = "bin"
        stems.add(stem)
        if ext == "manifest.json":
            assert size < 2000
            assert "signature" in json.loads((Path(fed[COORDINATOR].root) / rel).read_text())
        elif "/global/" in rel or "/update/" in rel:
            # ephemeral X25519 key (32) + per recipient a 32-byte content key with its 16-byte GCM tag
            # + 12-byte nonce + plaintext + 16-byte tag; a global goes to 3 parties, an update to 2
            recipients = 3 if "/global/" in rel else 2
            assert size == 32 + recipients * (32 + 16) + 12 + weights_bytes + 16, rel
        else:
            assert size < 4000, rel  # fingerprints and plans: small JSON summaries
    assert stems == allowed


def test_a_failing_party_ends_the_nnunet_simulation_instead_of_hanging(tmp_path: Path) -> None:
    """A site whose step fails (here: its dataset folder is missing) ends the run with that site's error; the
    coordinator and the other site stop waiting for it (before, the coordinator waited for its fingerprint forever)."""
    import time

    from oarbench.train.exchange import generate_keys
    from oarbench.train.federated import FederationConfig, nnunet_simulate

    generate_keys(tmp_path / "keys", ["A", "B"])
    storage = tmp_path / "storage"
    storage.mkdir()
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            nnunet_simulate(storage.as_uri(), tmp_path / "keys", {"A": tmp_path / "missing-A",
                                                                   "B": tmp_path / "missing-B"},
                            tmp_path / "parties", FederationConfig(("A", "B"), rounds=1, poll_s=0.05))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the simulation still waits for the failed sites"
    assert time.monotonic() - start < 60
    error = outcome["error"]
    assert "missing-" in str(error), error  # the failing site's own error, not the coordinator's stop


def test_the_trainer_options_seed_seeds_the_coordinator_and_reaches_every_site(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """nnunet_simulate gives the options' seed to the coordinator (the initial global weights) and passes the
    options, seed included, to every site's trainer (its data order); without options both are seed 0."""
    pytest.importorskip("nnunetv2")
    from oarbench.train import federated
    from oarbench.train.exchange import generate_keys
    from oarbench.train.nnunet import TrainerOptions

    generate_keys(tmp_path / "keys", ["A", "B"])
    seen: dict[str, object] = {}

    def coordinator(exchange, config, work, **kw):
        seen["coordinator"] = kw["seed"]
        return Path(work)

    def site(exchange, config, dataset_dir, work, **kw):
        seen[Path(dataset_dir).name] = kw["options"]
        return Path(work)

    monkeypatch.setattr(federated, "nnunet_coordinator", coordinator)
    monkeypatch.setattr(federated, "nnunet_site", site)
    storage = tmp_path / "storage"
    storage.mkdir()
    for options, seed in ((TrainerOptions(seed=7), 7), (None, 0)):
        seen.clear()
        federated.nnunet_simulate(storage.as_uri(), tmp_path / "keys", {"A": tmp_path / "A", "B": tmp_path / "B"},
                                  tmp_path / "parties", FederationConfig(("A", "B"), rounds=1, poll_s=FAST),
                                  options=options)
        assert seen == {"coordinator": seed, "A": options, "B": options}
