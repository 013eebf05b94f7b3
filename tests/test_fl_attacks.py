"""Attacks on the storage federation by another site, a bucket writer or a replayed object, each planted here.

Availability: one bad object never wedges the federation (the owner replaces
it, readers wait within their timeout, nothing blocks on a FIFO). Influence:
a site cannot set its own FedAvg weight or steer the model with scaled,
sign-flipped or noise updates. Confidentiality: per-party keys, no shared
secret. Accountability: a hash-chained audit log per party.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cryptography")
pytest.importorskip("safetensors")
pytest.importorskip("fsspec")

from oarbench.train.aggregate import (  # noqa: E402
    AggregationRules,
    RejectedUpdate,
    check_fingerprint_body,
    check_update,
    combine,
    weights_norm,
)
from oarbench.train.exchange import (  # noqa: E402
    COORDINATOR,
    Exchange,
    RejectedObject,
    generate_keys,
    load_keyring,
    tensors_from_bytes,
    tensors_to_bytes,
)
from oarbench.train.federated import (  # noqa: E402
    FederationConfig,
    make_shared_plans,
    merge_fingerprints,
    merge_site_messages,
    publish_fingerprint,
    run_coordinator,
    run_site,
    shared_dataset_header,
)

FAST = 0.02
HEADER = {"labels": {"background": 0, "Liver": 1}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}


def _fp(n: int, mean: float = 10.0) -> dict:
    return {
        "spacings": [[3.0, 1.0, 1.0]] * n,
        "shapes_after_crop": [[10, 20, 20]] * n,
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": mean, "std": 2.0, "min": 0.0, "percentile_00_5": 1.0, "median": 10.0,
                  "percentile_99_5": 19.0, "max": 20.0}
        },
        "median_relative_size_after_cropping": 1.0,
    }


def _init() -> dict[str, np.ndarray]:
    return {"w": np.ones((2, 3), np.float32), "b": np.ones(4, np.float64)}


def _step(d: float):  # noqa: ANN202 - local training that adds d to every weight
    def train(round_: int, w: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        return {k: (v + d).astype(v.dtype) for k, v in w.items()}, 1
    return train


def _thread(fn, *args, **kw) -> tuple[threading.Thread, dict]:  # noqa: ANN001
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _flip(path: Path, at: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _bin(ex: Exchange, slot: str) -> Path:
    return next(Path(ex.root).glob(slot + ".*.bin"))


# --------------------------------------------------------------------------- availability


def test_copied_round0_global_manifest_in_round1_slot_is_replaced(fed: dict[str, Exchange]) -> None:
    """A bucket writer copies the round-0 global manifest into round 1 before the coordinator publishes it."""
    coord, root = fed[COORDINATOR], Path(fed[COORDINATOR].root)
    g0 = coord.put("global", 0, tensors_to_bytes(_init()))
    for s, d in (("A", 0.5), ("B", 0.25)):
        fed[s].put("update", 0, tensors_to_bytes({k: v + d for k, v in _init().items()}), parent=g0.sha256,
                   num_cases=1)
    (root / "round_00001/global").mkdir(parents=True)
    shutil.copy(root / "round_00000/global/global.manifest.json", root / "round_00001/global/global.manifest.json")
    cfg = FederationConfig(("A", "B"), rounds=1, poll_s=FAST)
    results = run_coordinator(coord, cfg, _init, case_counts={"A": 1, "B": 1})
    assert [r.round for r in results] == [0]
    g1 = tensors_from_bytes(fed["A"].get("global", 1, "global").payload)
    np.testing.assert_array_equal(g1["w"], np.full((2, 3), 1.375, np.float32))  # 1 + (0.5 + 0.25) / 2
    assert run_coordinator(coord, cfg, _init, case_counts={"A": 1, "B": 1}) == []  # restart: finished


def test_flipped_byte_in_published_global_recovers_at_restart(fed: dict[str, Exchange]) -> None:
    """One flipped byte of the last global: the restarted coordinator aggregates that round again, same model."""
    coord = fed[COORDINATOR]
    cfg = FederationConfig(("A", "B"), rounds=1, poll_s=FAST)
    g0 = coord.put("global", 0, tensors_to_bytes(_init()))
    for s, d in (("A", 0.5), ("B", 0.25)):
        fed[s].put("update", 0, tensors_to_bytes({k: v + d for k, v in _init().items()}), parent=g0.sha256,
                   num_cases=1)
    first = run_coordinator(coord, cfg, _init, case_counts={"A": 1, "B": 1})[0].global_sha256
    _flip(_bin(coord, "round_00001/global/global"))
    fresh = Exchange(coord.url, coord.keyring)  # a restarted process: nothing cached
    assert fed["B"].get_valid("global", 1, "global") is None  # a site waits instead of failing
    again = run_coordinator(fresh, cfg, _init, case_counts={"A": 1, "B": 1})
    assert [r.round for r in again] == [0] and again[0].global_sha256 == first
    assert fed["B"].get("global", 1, "global").header.sha256 == first


def test_flipped_byte_in_current_global_repaired_while_running(fed: dict[str, Exchange]) -> None:
    """The coordinator re-verifies its current global every recheck_s and writes it again when damaged."""
    coord = fed[COORDINATOR]
    cfg = FederationConfig(("A", "B"), rounds=1, poll_s=FAST, recheck_s=0.1, timeout_s=20)
    t, out = _thread(run_coordinator, coord, cfg, _init, case_counts={"A": 1, "B": 1})
    deadline = time.monotonic() + 10
    while not list(Path(coord.root).glob("round_00000/global/global.*.bin")) and time.monotonic() < deadline:
        time.sleep(0.01)
    _flip(_bin(coord, "round_00000/global/global"))
    sites = [_thread(run_site, fed[s], cfg, _step(d), timeout_s=20) for s, d in (("A", 0.5), ("B", 0.25))]
    t.join(30)
    for st, so in sites:
        st.join(30)
        assert "error" not in so, so
    assert "error" not in out, out
    np.testing.assert_array_equal(sites[0][1]["result"]["w"], np.full((2, 3), 1.375, np.float32))


def test_replayed_own_manifest_does_not_silence_a_site(fed: dict[str, Exchange]) -> None:
    """A's round-0 manifest copied into its round-1 slot: A trains and writes round 1 anyway."""
    coord, root = fed[COORDINATOR], Path(fed[COORDINATOR].root)
    cfg = FederationConfig(("A",), rounds=2, poll_s=FAST, timeout_s=20)
    g0 = coord.put("global", 0, tensors_to_bytes(_init()))
    fed["A"].put("update", 0, tensors_to_bytes({k: v + 0.5 for k, v in _init().items()}), parent=g0.sha256,
                 num_cases=1)
    (root / "round_00001/update").mkdir(parents=True)
    shutil.copy(root / "round_00000/update/A.manifest.json", root / "round_00001/update/A.manifest.json")
    t, out = _thread(run_coordinator, coord, cfg, _init, case_counts={"A": 1})
    final = run_site(fed["A"], cfg, _step(0.5), timeout_s=20)
    t.join(30)
    assert "error" not in out, out
    assert [r.contributors for r in out["result"]] == [(("A", 1),), (("A", 1),)]
    np.testing.assert_array_equal(final["w"], np.full((2, 3), 2.0, np.float32))  # 1 + 0.5 + 0.5


def test_transiently_missing_ciphertext_is_waited_for(fed: dict[str, Exchange], tmp_path: Path) -> None:
    coord = fed[COORDINATOR]
    g0 = coord.put("global", 0, tensors_to_bytes(_init()))
    for s in ("A", "B"):
        fed[s].put("update", 0, tensors_to_bytes({k: v + 0.5 for k, v in _init().items()}), parent=g0.sha256,
                   num_cases=1)
    obj = _bin(coord, "round_00000/update/B")
    parked = tmp_path / "parked.bin"
    shutil.move(obj, parked)
    cfg = FederationConfig(("A", "B"), rounds=1, poll_s=FAST, timeout_s=20)
    t, out = _thread(run_coordinator, coord, cfg, _init, case_counts={"A": 1, "B": 1})
    time.sleep(0.5)
    assert t.is_alive()  # not aborted: waiting
    shutil.move(parked, obj)
    t.join(30)
    assert "error" not in out, out
    assert out["result"][0].contributors == (("A", 1), ("B", 1))


def test_site_writes_its_update_again_when_the_ciphertext_is_deleted(fed: dict[str, Exchange]) -> None:
    coord = fed[COORDINATOR]
    cfg = FederationConfig(("A", "B"), rounds=1, poll_s=FAST, timeout_s=20)
    g0 = coord.put("global", 0, tensors_to_bytes(_init()))
    fed["B"].put("update", 0, tensors_to_bytes({k: v + 0.5 for k, v in _init().items()}), parent=g0.sha256,
                 num_cases=1)
    t, out = _thread(run_coordinator, coord, cfg, _init, case_counts={"A": 1, "B": 1})
    sa, oa = _thread(run_site, fed["A"], cfg, _step(0.25), timeout_s=20)
    os.remove(_bin(coord, "round_00000/update/B"))  # B believes it contributed
    fb = run_site(fed["B"], cfg, _step(0.5), timeout_s=20)  # resumes: its update is gone, it writes it again
    t.join(30)
    sa.join(30)
    assert "error" not in out and "error" not in oa, (out, oa)
    np.testing.assert_array_equal(fb["w"], np.full((2, 3), 1.375, np.float32))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_planted_fifos_never_block(fed: dict[str, Exchange]) -> None:
    """A FIFO in place of A's manifest and of B's ciphertext: nobody blocks; both owners replace them."""
    coord, root = fed[COORDINATOR], Path(fed[COORDINATOR].root)
    g0 = coord.put("global", 0, tensors_to_bytes(_init()))
    fed["B"].put("update", 0, tensors_to_bytes({k: v + 0.5 for k, v in _init().items()}), parent=g0.sha256,
                 num_cases=1)
    obj = _bin(coord, "round_00000/update/B")
    obj.unlink()
    os.mkfifo(obj)
    os.mkfifo(root / "round_00000/update/A.manifest.json")
    cfg = FederationConfig(("A", "B"), rounds=1, poll_s=FAST, timeout_s=0.5)
    t, out = _thread(run_coordinator, coord, cfg, _init, case_counts={"A": 1, "B": 1})
    t.join(20)
    assert not t.is_alive(), "the coordinator blocked on a FIFO"
    assert isinstance(out.get("error"), RuntimeError) and "unreadable" in str(out["error"])
    # the owners replace what sits in their slots, and the round completes
    cfg = FederationConfig(("A", "B"), rounds=1, poll_s=FAST, timeout_s=20)
    t, out = _thread(run_coordinator, coord, cfg, _init, case_counts={"A": 1, "B": 1})
    sites = [_thread(run_site, fed[s], cfg, _step(d), timeout_s=20) for s, d in (("A", 0.5), ("B", 0.5))]
    for th, o in [*sites, (t, out)]:
        th.join(30)
        assert not th.is_alive() and "error" not in o, o


def test_huge_fingerprint_value_refused_in_one_line() -> None:
    """mean 1e200 (finite) used to raise OverflowError in the merge at every start of both engines."""
    body = {"fingerprint": _fp(2, mean=1e200), "dataset": HEADER, "num_cases": 2}
    with pytest.raises(ValueError, match=r"within \+-1e\+09"):
        check_fingerprint_body(body)
    with pytest.raises(ValueError, match="too large to merge"):
        merge_fingerprints({"A": (_fp(2, mean=1e200), 2), "B": (_fp(3), 3)})
    with pytest.raises(ValueError, match="too large to merge"):
        merge_site_messages({"A": body, "B": {"fingerprint": _fp(3), "dataset": HEADER, "num_cases": 3}})


# --------------------------------------------------------------------------- FedAvg weight


def _plan(merged: dict, header: dict) -> dict:
    return {"plans_name": "shared"}


def test_case_counts_frozen_in_signed_plans(fed: dict[str, Exchange]) -> None:
    """After planning, B deletes its fingerprint and publishes one of 1,000,000 cases: its weight stays 20."""
    coord, root = fed[COORDINATOR], Path(fed[COORDINATOR].root)
    cfg = FederationConfig(("A", "B"), rounds=1, poll_s=FAST, quorum=1, timeout_s=20)
    publish_fingerprint(fed["A"], _fp(20), HEADER, 20)
    publish_fingerprint(fed["B"], _fp(20), HEADER, 20)
    make_shared_plans(coord, cfg, _plan)
    os.remove(root / "setup/fingerprint/B.manifest.json")
    publish_fingerprint(fed["B"], _fp(1_000_000), HEADER, 1_000_000)
    assert shared_dataset_header(coord, cfg)["numTraining"] == 40
    g0 = coord.put("global", 0, tensors_to_bytes(_init()))
    fed["A"].put("update", 0, tensors_to_bytes({k: v + 0.5 for k, v in _init().items()}), parent=g0.sha256,
                 num_cases=20)
    fed["B"].put("update", 0, tensors_to_bytes({k: v + 0.25 for k, v in _init().items()}), parent=g0.sha256,
                 num_cases=20)
    results = run_coordinator(coord, cfg, _init)
    assert results[0].contributors == (("A", 20), ("B", 20))
    g1 = tensors_from_bytes(fed["A"].get("global", 1, "global").payload)
    np.testing.assert_array_equal(g1["w"], np.full((2, 3), 1.375, np.float32))  # (20*1.5 + 20*1.25) / 40
    # an update claiming the new count is refused: the claim must match the frozen count
    fed["B"].put("update", 1, tensors_to_bytes(_init()), parent=results[0].global_sha256, num_cases=1_000_000)
    cfg2 = FederationConfig(("A", "B"), rounds=2, poll_s=FAST, quorum=1, timeout_s=0.3)
    with pytest.raises(RuntimeError, match="claims 1000000 cases, its fingerprint has 20"):
        run_coordinator(coord, cfg2, _init)


@pytest.mark.parametrize("weighting,wa,wb", [("cases", 20, 100_000), ("equal", 1, 1), ("capped:50", 20, 50)])
def test_weighting_policy_caps_a_site_claiming_100000_cases(fed: dict[str, Exchange], weighting: str, wa: int,
                                                               wb: int) -> None:
    coord = fed[COORDINATOR]
    cfg = FederationConfig(("A", "B"), rounds=1, poll_s=FAST)
    publish_fingerprint(fed["A"], _fp(20), HEADER, 20)
    publish_fingerprint(fed["B"], _fp(100_000), HEADER, 100_000)  # 100,000 identical spacings
    make_shared_plans(coord, cfg, _plan, weighting=weighting)
    g0 = coord.put("global", 0, tensors_to_bytes(_init()))
    fed["A"].put("update", 0, tensors_to_bytes({k: v + 0.5 for k, v in _init().items()}), parent=g0.sha256,
                 num_cases=20)
    fed["B"].put("update", 0, tensors_to_bytes({k: v - 0.5 for k, v in _init().items()}), parent=g0.sha256,
                 num_cases=100_000)
    results = run_coordinator(coord, cfg, _init)
    assert results[0].contributors == (("A", wa), ("B", wb))
    g1 = tensors_from_bytes(fed["A"].get("global", 1, "global").payload)
    expected = (wa * 1.5 + wb * 0.5) / (wa + wb)
    np.testing.assert_allclose(g1["b"], np.full(4, expected), rtol=1e-12)
    if weighting == "cases":  # the attack: B holds 99.98 % of the average
        assert wb / (wa + wb) > 0.9998


# --------------------------------------------------------------------------- steering the model


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    w = rng.normal(size=(16, 8)).astype(np.float32)
    w[0, 0] = 12.7  # max |w| of the first global, as in the attack report
    return {"w": w, "b": rng.normal(size=8).astype(np.float32)}


def _honest(rng: np.random.Generator, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v + 0.01 * rng.normal(size=v.shape)).astype(v.dtype) for k, v in g.items()}


def test_scaled_model_attack_does_not_compound(fed: dict[str, Exchange]) -> None:
    """B sends 9.9 x the current global every round for 7 rounds (it took max|w| from 12.7 to 3.3e5)."""
    rng = np.random.default_rng(5)
    init = _model(rng)
    cfg = FederationConfig(("A", "B"), rounds=7, poll_s=FAST, quorum=1, timeout_s=20)

    def attacker(r: int, g: dict) -> tuple[dict, int]:
        return {k: (9.9 * v).astype(v.dtype) for k, v in g.items()}, 1

    t, out = _thread(run_coordinator, fed[COORDINATOR], cfg, init, case_counts={"A": 1, "B": 1})
    sb, ob = _thread(run_site, fed["B"], cfg, attacker, timeout_s=20)
    final = run_site(fed["A"], cfg, lambda r, g: (_honest(rng, g), 1), timeout_s=20)
    t.join(30)
    sb.join(30)
    assert all(r.contributors == (("A", 1),) for r in out["result"]) and len(out["result"]) == 7
    assert all(any("B.manifest.json" in x for x in r.rejected) for r in out["result"])
    assert float(np.max(np.abs(final["w"]))) < 12.7 + 1.0  # 7 honest steps of 0.01 noise

    # without the step rule, the norm bound against the first global alone stops the compounding:
    # every accepted update has norm <= 10 ||g0||, so every average does too
    loose = AggregationRules(max_delta_ratio=1e9)
    g, g0n = init, weights_norm(init)
    for _ in range(7):
        ups = [(_honest(rng, g), 1), ({k: 9.9 * v for k, v in g.items()}, 1)]
        ok = []
        for u, n in ups:
            try:
                check_update(u, g, loose, reference=init)
                ok.append((u, n))
            except RejectedUpdate:
                pass
        g = combine(ok, loose)
    assert weights_norm(g) <= 10 * g0n
    assert float(np.max(np.abs(g["w"]))) < 10 * g0n < 3.3e5


def test_sign_flip_and_noise_of_the_globals_norm_refused() -> None:
    rng = np.random.default_rng(6)
    g = _model(rng)
    rules = AggregationRules()
    check_update(_honest(rng, g), g, rules, reference=g)
    flipped = {k: -v for k, v in g.items()}
    with pytest.raises(RejectedUpdate, match="moves"):
        check_update(flipped, g, rules, reference=g)
    noise = {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in g.items()}
    scale = weights_norm(g) / weights_norm(noise)
    noise = {k: (v * scale).astype(v.dtype) for k, v in noise.items()}
    assert weights_norm(noise) == pytest.approx(weights_norm(g), rel=1e-5)
    step = weights_norm({k: noise[k].astype(np.float64) - g[k] for k in g}) / weights_norm(g)
    assert 1.35 < step < 1.5  # about sqrt(2): noise is nearly orthogonal to the model
    with pytest.raises(RejectedUpdate, match="moves"):
        check_update(noise, g, rules, reference=g)


def test_robust_aggregators_worked_values() -> None:
    ups = [({"x": np.array([1.0, 10.0], np.float32)}, 1), ({"x": np.array([2.0, 20.0], np.float32)}, 1),
           ({"x": np.array([100.0, -1e5], np.float32)}, 50)]
    # coordinate-wise median: [2, 10]; weights are ignored
    np.testing.assert_array_equal(combine(ups, AggregationRules(aggregator="median"))["x"], [2.0, 10.0])
    five = [({"x": np.array([v], np.float64)}, 1) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    # trimmed:0.2 drops floor(0.2 * 5) = 1 value at each end: mean(2, 3, 4) = 3
    np.testing.assert_array_equal(combine(five, AggregationRules(aggregator="trimmed:0.2"))["x"], [3.0])
    with pytest.raises(ValueError, match="aggregator"):
        AggregationRules(aggregator="trimmed:0.5")


# --------------------------------------------------------------------------- per-party keys


def test_no_shared_secret_a_site_cannot_read_another_sites_update(fed: dict[str, Exchange], tmp_path: Path) -> None:
    from dataclasses import replace

    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from oarbench.train.exchange import _canonical, _wrap_key

    coord, a, b = fed[COORDINATOR], fed["A"], fed["B"]
    g = coord.put("global", 0, b"global weights")
    assert a.get("global", 0, "global").payload == b.get("global", 0, "global").payload == b"global weights"
    a.put("update", 0, b"A's update", parent=g.sha256, num_cases=1)
    assert coord.get("update", 0, "A").payload == b"A's update"
    # B even trusts A's signature key: still, the object is not encrypted to B
    b_trusting = Exchange(b.url, replace(b.keyring, trusted=dict(b.keyring.trusted, A=a.keyring.public_key())))
    with pytest.raises(RejectedObject, match="not encrypted to this party"):
        b_trusting.get("update", 0, "A")
    # and no part of the ciphertext opens with B's private key
    manifest = json.loads((Path(coord.root) / "round_00000/update/A.manifest.json").read_text())
    data = (Path(coord.root) / manifest["object"]).read_bytes()
    eph = data[:32]
    mine = X25519PrivateKey.from_private_bytes(b.keyring.decryption_key)
    kek = _wrap_key(mine.exchange(X25519PublicKey.from_public_bytes(eph)), eph, b.keyring.encryption_public_key())
    aad = _canonical(manifest["header"])
    for i in range(len(manifest["header"]["recipients"])):
        with pytest.raises(InvalidTag):
            AESGCM(kek).decrypt(b"\0" * 12, data[32 + 48 * i:32 + 48 * (i + 1)], aad)
    # no key file in any folder is shared between two parties
    files = {}
    for p in (tmp_path / "keys").rglob("*"):
        if p.is_file() and p.suffix in (".ed25519", ".x25519"):
            files.setdefault(p.read_bytes(), []).append(p)
    assert all(len(v) == 1 for v in files.values()) and len(files) == 6


def test_revoked_site_refused_and_locked_out_of_new_globals(fed: dict[str, Exchange], tmp_path: Path) -> None:
    from oarbench.train.keys import sign_roster

    keys = tmp_path / "keys"
    roster = sign_roster(keys / COORDINATOR, revoke=["B"])
    assert roster.serial == 2 and roster.sites == ["A"]
    coord = Exchange(fed[COORDINATOR].url, load_keyring(keys, COORDINATOR))
    g = coord.put("global", 0, b"g0")
    with pytest.raises(RejectedObject, match="not encrypted to this party"):
        fed["B"].get("global", 0, "global")
    fed["B"].put("update", 0, b"u", parent=g.sha256, num_cases=1)
    accepted, rejected = coord.collect("update", 0)
    assert accepted == {} and "unknown sender 'B'" in next(iter(rejected.values()))
    shutil.copy(keys / COORDINATOR / "roster.json", keys / "B" / "roster.json")
    with pytest.raises(ValueError, match="'B' is not on it"):
        load_keyring(keys, "B")


def test_rotated_site_key_needs_the_roster_signed_again(fed: dict[str, Exchange], tmp_path: Path) -> None:
    from oarbench.train.keys import rotate_party_key, sign_roster

    keys = tmp_path / "keys"
    rotate_party_key(keys / "A", "A")
    with pytest.raises(ValueError, match="rotated"):
        load_keyring(keys, "A")
    shutil.copy(keys / "A" / "public" / "A.pub", keys / COORDINATOR / "public" / "A.pub")
    assert sign_roster(keys / COORDINATOR).serial == 2
    shutil.copy(keys / COORDINATOR / "roster.json", keys / "A" / "roster.json")
    new_a = Exchange(fed["A"].url, load_keyring(keys, "A"))
    coord = Exchange(fed[COORDINATOR].url, load_keyring(keys, COORDINATOR))
    g = coord.put("global", 0, b"g0")
    assert new_a.get("global", 0, "global").payload == b"g0"
    fed["A"].put("update", 0, b"old key", parent=g.sha256, num_cases=1)  # the retired key still signs
    assert "bad signature" in next(iter(coord.collect("update", 0)[1].values()))
    new_a.put("update", 0, b"new key", parent=g.sha256, num_cases=1)  # replaces the refused object
    assert coord.collect("update", 0)[0]["A"].payload == b"new key"


def test_tampered_roster_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys, ["A"])
    doc = json.loads((keys / "A" / "roster.json").read_text())
    doc["parties"]["Mallory"] = doc["parties"]["A"]
    (keys / "A" / "roster.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="roster.json: roster signature does not verify"):
        load_keyring(keys, "A")


# --------------------------------------------------------------------------- audit log


def test_audit_log_hash_chain_and_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from oarbench.cli import main
    from oarbench.train.audit import AuditLog, verify

    generate_keys(tmp_path / "keys", ["A"])
    url = str(tmp_path / "bucket")
    coord = Exchange(url, load_keyring(tmp_path / "keys", COORDINATOR),
                     audit=AuditLog(tmp_path / "logs" / "coordinator.jsonl", COORDINATOR))
    a = Exchange(url, load_keyring(tmp_path / "keys", "A"), audit=AuditLog(tmp_path / "logs" / "A.jsonl", "A"))
    g = coord.put("global", 0, b"g0")
    a.get("global", 0, "global")
    a.put("update", 0, b"u", parent=g.sha256, num_cases=1)
    (Path(url) / "round_00000/update/B.manifest.json").write_text("{}")
    coord.collect("update", 0)
    log = tmp_path / "logs" / "coordinator.jsonl"
    s = verify(log)
    assert s.ok and s.actions == {"wrote": 1, "read": 1, "accepted": 1, "refused": 1}
    assert "B.manifest.json" in s.refused[0]
    res = CliRunner().invoke(main, ["fl", "audit", str(tmp_path / "logs")])
    assert res.exit_code == 0 and res.output.count("chain intact") == 2, res.output
    # an edited line, a removed line: the chain breaks at that line
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join([lines[0], lines[1].replace('"refused"', '"accepted"').replace('"read"', '"wrote"'),
                            *lines[2:]]))
    assert not verify(log).ok and "line 2: hash mismatch" in verify(log).problem
    log.write_text("".join([lines[0], *lines[2:]]))
    assert "line 2: does not follow" in verify(log).problem
    res = CliRunner().invoke(main, ["fl", "audit", str(log)])
    assert res.exit_code != 0 and "BROKEN at line 2" in res.output and "Traceback" not in res.output
    with pytest.raises(ValueError, match="coordinator.jsonl: audit log does not verify .line 2"):
        AuditLog(log, COORDINATOR)  # a party never appends to a broken chain
    # a restarted party continues an intact chain
    log.write_text("".join(lines))
    AuditLog(log, COORDINATOR).append("wrote", object="x")
    assert verify(log).ok and verify(log).lines == len(lines) + 1


# --------------------------------------------------------------------------- the CLI


def test_every_fl_command_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    """Bad input to each ``oarbench fl`` command: exit code != 0, one line naming the file and the problem."""
    from click.testing import CliRunner

    from oarbench.cli import main

    runner = CliRunner()
    keys = tmp_path / "k"
    assert runner.invoke(main, ["fl", "keys", "--out", str(keys), "--sites", "A,B"]).exit_code == 0
    site_a = tmp_path / "kA"
    shutil.copytree(keys / "A", site_a)
    (site_a / "roster.json").write_text("garbage")
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "opts.json").write_text("{bad")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    fifo = tmp_path / "fifo.jsonl"
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
    else:
        fifo.mkdir()
    common = ["--storage", str(tmp_path / "s"), "--sites", "A,B", "--rounds", "1", "--work", str(tmp_path / "w")]
    cases = [
        (["keys", "--out", str(tmp_path / "x")], "give either --name"),
        (["keys", "--out", str(tmp_path / "x"), "--name", "A/B"], "party name 'A/B'"),
        (["keys", "--out", str(keys / "A"), "--name", "A"], "refusing to overwrite"),
        (["keys", "--out", str(tmp_path / "none"), "--name", "A", "--rotate"], "no complete key pair"),
        (["roster", "--keys", str(data)], "coordinator.ed25519: private key file not found"),
        (["roster", "--keys", str(keys / COORDINATOR), "--revoke", "Z"], "Z.pub: no public key of site 'Z'"),
        (["audit", str(tmp_path / "bad.jsonl")], "audit chain broken in"),
        (["audit", str(fifo)], "fifo.jsonl"),
        (["audit", str(tmp_path / "missing")], "missing"),
        (["site", *common, "--keys", str(site_a), "--site", "A", "--dataset", str(data)],
         "roster.json: roster is not JSON"),
        (["site", *common, "--keys", str(keys), "--site", "C", "--dataset", str(data)],
         "C.ed25519: private key file not found"),
        (["coordinator", *common, "--keys", str(keys), "--weighting", "most"], "weighting must be"),
        (["coordinator", *common, "--keys", str(keys), "--aggregator", "trimmed:0.9"], "aggregator must be"),
        (["coordinator", *common, "--keys", str(keys), "--max-step", "-1"], "max_delta_ratio must be"),
        (["coordinator", *common, "--keys", str(keys), "--storage-options", str(tmp_path / "opts.json")],
         "opts.json: --storage-options must be JSON"),
        (["coordinator", *common, "--keys", str(tmp_path / "nowhere")], "nowhere"),
        (["coordinator", "--work", str(tmp_path / "w")], "--engine storage needs --storage"),
        (["simulate", "--work", str(tmp_path / "w"), "--dataset", "A", "--rounds", "1"], "must be SITE=DIR"),
    ]
    for args, needle in cases:
        res = runner.invoke(main, ["fl", *args])
        lines = res.output.strip().splitlines()
        assert res.exit_code != 0 and "Traceback" not in res.output, (args, res.output)
        assert needle in lines[-1] and lines[-1].startswith("Error: "), (args, res.output)
        if args[0] != "audit":  # audit prints its per-file summary first
            assert len(lines) == 1, (args, res.output)


def test_rotated_coordinator_key_starts_a_new_roster(tmp_path: Path) -> None:
    from oarbench.train.keys import rotate_party_key, sign_roster

    keys = tmp_path / "keys"
    generate_keys(keys, ["A"])
    old_id = json.loads((keys / "roster.json").read_text())["federation_id"]
    rotate_party_key(keys / COORDINATOR, COORDINATOR)
    with pytest.raises(ValueError, match="move .*roster.json aside to start a new roster"):
        sign_roster(keys / COORDINATOR)
    os.replace(keys / COORDINATOR / "roster.json", tmp_path / "old-roster.json")
    new = sign_roster(keys / COORDINATOR)
    assert new.serial == 1 and new.federation_id != old_id
    # A still pins the old coordinator key: the new roster does not verify there until A pins the new one
    shutil.copy(keys / COORDINATOR / "roster.json", keys / "A" / "roster.json")
    with pytest.raises(ValueError, match="roster signature does not verify"):
        load_keyring(keys, "A")
    shutil.copy(keys / COORDINATOR / "public" / "coordinator.pub", keys / "A" / "public" / "coordinator.pub")
    assert load_keyring(keys, "A").federation_id == new.federation_id


def test_coordinator_refuses_sites_not_on_its_roster(fed: dict[str, Exchange]) -> None:
    cfg = FederationConfig(("A", "B", "C"), rounds=1, poll_s=FAST)
    with pytest.raises(ValueError, match=r"\['C'\] are not on the coordinator's roster"):
        run_coordinator(fed[COORDINATOR], cfg, _init)
    with pytest.raises(ValueError, match=r"\['C'\] are not on the coordinator's roster"):
        make_shared_plans(fed[COORDINATOR], cfg, _plan)


def test_remote_store_opens_files_only(tmp_path: Path) -> None:
    """On an fsspec back-end (here memory://) a folder planted in place of a manifest is refused by its type."""
    import fsspec

    generate_keys(tmp_path / "keys", ["A"])
    url = f"memory://fl-{os.getpid()}-{time.monotonic_ns()}"
    coord = Exchange(url, load_keyring(tmp_path / "keys", COORDINATOR))
    a = Exchange(url, load_keyring(tmp_path / "keys", "A"))
    g = coord.put("global", 0, b"g0")
    fs = fsspec.filesystem("memory")
    fs.makedirs(f"{coord.root}/round_00000/update/A.manifest.json/inner", exist_ok=True)
    fs.pipe_file(f"{coord.root}/round_00000/update/A.manifest.json/inner/x", b"x")
    accepted, rejected = coord.collect("update", 0)
    assert accepted == {} and "unreadable" in rejected["round_00000/update/A.manifest.json"]
    a.put("update", 0, b"u", parent=g.sha256, num_cases=1)  # the owner replaces it
    assert coord.collect("update", 0)[0]["A"].payload == b"u"


def test_cli_roster_rotation_and_revocation(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from oarbench.cli import main

    runner = CliRunner()
    coord = tmp_path / "keys-coordinator"
    for name, folder in ((COORDINATOR, coord), ("A", tmp_path / "keys-A"), ("B", tmp_path / "keys-B")):
        assert runner.invoke(main, ["fl", "keys", "--out", str(folder), "--name", name]).exit_code == 0
        if name != COORDINATOR:
            shutil.copy(folder / "public" / f"{name}.pub", coord / "public" / f"{name}.pub")
    res = runner.invoke(main, ["fl", "roster", "--keys", str(coord)])
    assert res.exit_code == 0 and "serial 1, sites A, B" in res.output, res.output
    old_pub = (tmp_path / "keys-A" / "public" / "A.pub").read_text()
    res = runner.invoke(main, ["fl", "keys", "--out", str(tmp_path / "keys-A"), "--name", "A", "--rotate"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "keys-A" / "public" / "A.pub").read_text() != old_pub
    assert len(list((tmp_path / "keys-A" / "retired").rglob("A.x25519"))) == 1
    shutil.copy(tmp_path / "keys-A" / "public" / "A.pub", coord / "public" / "A.pub")
    res = runner.invoke(main, ["fl", "roster", "--keys", str(coord), "--revoke", "B"])
    assert res.exit_code == 0 and "serial 2, sites A;" in res.output, res.output
    shutil.copy(coord / "roster.json", tmp_path / "keys-A" / "roster.json")
    shutil.copy(coord / "public" / "coordinator.pub", tmp_path / "keys-A" / "public" / "coordinator.pub")
    ring = load_keyring(tmp_path / "keys-A", "A")
    assert sorted(ring.recipients) == ["A", COORDINATOR]
    assert sorted(load_keyring(coord, COORDINATOR).trusted) == ["A"]


def test_hung_read_is_given_up(tmp_path: Path) -> None:
    """A read that never returns (a hung mount or back-end) counts as unreadable after read_timeout_s."""
    generate_keys(tmp_path / "keys", ["A"])
    url = str(tmp_path / "bucket")
    coord = Exchange(url, load_keyring(tmp_path / "keys", COORDINATOR), read_timeout_s=0.2)
    a = Exchange(url, load_keyring(tmp_path / "keys", "A"))
    g = coord.put("global", 0, tensors_to_bytes(_init()))
    a.put("update", 0, tensors_to_bytes(_init()), parent=g.sha256, num_cases=1)
    release = threading.Event()
    real = coord._read_now

    def hang(rel: str, limit: int | None = None) -> bytes:
        if "update" in rel:
            release.wait(30)
        return real(rel, limit)

    coord._read_now = hang  # type: ignore[method-assign]
    cfg = FederationConfig(("A",), rounds=1, poll_s=FAST, timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"A.manifest.json: manifest unreadable \(TimeoutError\)"):
        run_coordinator(coord, cfg, _init, case_counts={"A": 1})
    assert time.monotonic() - started < 10
    release.set()
