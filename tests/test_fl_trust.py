"""Federated exchange under hostile parties: no site, bucket writer or racing process can harm another.

Each test plants what a dishonest site or an unauthenticated writer of the
bucket could plant, and checks that it is refused per object (never a crash,
never a wrong aggregate).
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cryptography")
pytest.importorskip("safetensors")
pytest.importorskip("fsspec")

from oarbench.train.aggregate import (  # noqa: E402
    AggregationRules,
    RejectedUpdate,
    aggregate,
    check_update,
    fedavg,
)
from oarbench.train.exchange import (  # noqa: E402
    COORDINATOR,
    Exchange,
    Header,
    RejectedObject,
    _canonical,
    _sha256,
    generate_keys,
    generate_party_key,
    load_keyring,
    tensors_from_bytes,
    tensors_to_bytes,
)
from oarbench.train.federated import (  # noqa: E402
    FederationConfig,
    latest_global_round,
    make_shared_plans,
    pinned_case_counts,
    publish_fingerprint,
    run_coordinator,
)

FAST = 0.02
HEADER = {"labels": {"background": 0, "Liver": 1}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}


def _fp(n: int, mean: float = 10.0) -> dict:
    return {
        "spacings": [[3.0, 1.0, 1.0]] * n,
        "shapes_after_crop": [[10, 20, 20]] * n,
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": mean, "std": 2.0, "min": 0.0, "percentile_00_5": 1.0, "median": mean,
                  "percentile_99_5": 19.0, "max": 20.0}
        },
        "median_relative_size_after_cropping": 1.0,
    }


def _init() -> dict[str, np.ndarray]:
    return {"w": np.ones((2, 3), np.float32), "b": np.ones(4, np.float64)}


def _forge(ex: Exchange, kind: str, round_: int, name: str, payload: bytes, num_cases: int = 0,
           parent: str = "") -> None:
    """What a dishonest party writes with its own keys, bypassing put()'s own checks."""
    header = Header(federation=ex.federation, round=round_, sender=ex.keyring.identity, kind=kind, name=name,
                    size=len(payload), sha256=_sha256(payload), parent=parent, num_cases=num_cases,
                    federation_id=ex.keyring.federation_id)
    slot = (f"setup/{kind}/{name}" if round_ < 0 else f"round_{round_:05d}/{kind}/{name}")
    obj = f"{slot}.{'ab' * 16}.bin"
    ciphertext, manifest = ex.seal(header, payload, obj)
    root = Path(ex.root)
    (root / slot).parent.mkdir(parents=True, exist_ok=True)
    (root / obj).write_bytes(ciphertext)
    (root / f"{slot}.manifest.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- slot hijack


def test_site_cannot_fill_another_sites_fingerprint_slot(fed: dict[str, Exchange]) -> None:
    """A signs a fingerprint claiming 1000 cases and puts it in B's slot: refused, never merged."""
    a, b, coord = fed["A"], fed["B"], fed[COORDINATOR]
    with pytest.raises(ValueError, match="may not write slot 'B'"):
        a.put("fingerprint", -1, b"{}", name="B", num_cases=1000)
    body = {"fingerprint": _fp(1000), "dataset": HEADER, "num_cases": 1000}
    _forge(a, "fingerprint", -1, "B", json.dumps(body).encode(), num_cases=1000)
    publish_fingerprint(a, _fp(2), HEADER, 2)
    accepted, rejected = coord.collect("fingerprint", -1)
    assert list(accepted) == ["A"]
    assert "slot hijack" in rejected["setup/fingerprint/B.manifest.json"]
    assert pinned_case_counts(coord, ["A", "B"]) == {"A": 2}
    # B finds its slot taken by a manifest it did not sign: it removes it and uploads its own
    publish_fingerprint(b, _fp(3), HEADER, 3)
    assert pinned_case_counts(coord, ["A", "B"]) == {"A": 2, "B": 3}
    # but a committed manifest that B signed itself is never replaced (restart: the first upload stands)
    publish_fingerprint(b, _fp(4), HEADER, 4)
    assert pinned_case_counts(coord, ["A", "B"]) == {"A": 2, "B": 3}


def test_site_cannot_fill_another_sites_update_slot(fed: dict[str, Exchange]) -> None:
    a, coord = fed["A"], fed[COORDINATOR]
    g = coord.put("global", 0, tensors_to_bytes(_init()))
    _forge(a, "update", 0, "B", tensors_to_bytes(_init()), num_cases=1, parent=g.sha256)
    accepted, rejected = coord.collect("update", 0)
    assert accepted == {} and "slot hijack" in rejected["round_00000/update/B.manifest.json"]


# --------------------------------------------------------------------------- racing writers


def _race(exchanges: list[Exchange], slots: int) -> None:
    """``len(exchanges)`` writers (one coordinator identity, several processes) race on every slot."""
    barrier = threading.Barrier(len(exchanges))
    wins: dict[int, list[int]] = {r: [] for r in range(slots)}
    errors: list[BaseException] = []

    def writer(i: int, ex: Exchange) -> None:
        for r in range(slots):
            try:
                barrier.wait(timeout=30)
                payload = tensors_to_bytes({"w": np.full(64, i, np.float32)})
                ex.put("global", r, payload)
                wins[r].append(i)
            except FileExistsError:
                pass
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i, ex)) for i, ex in enumerate(exchanges)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    reader = exchanges[0]
    for r in range(slots):
        assert len(wins[r]) == 1, (r, wins[r])  # exactly one writer committed
        got = reader.get("global", r, "global")
        assert got is not None  # readable, never corrupted
        np.testing.assert_array_equal(tensors_from_bytes(got.payload)["w"], np.full(64, wins[r][0], np.float32))
    # losers removed their own ciphertext: one object and one manifest per slot
    rels = [rel for rel, _ in reader.list_objects()]
    assert len(rels) == 2 * slots, rels[:6]


def test_racing_writers_first_manifest_wins_local(tmp_path: Path) -> None:
    generate_keys(tmp_path / "keys", ["A"])
    ring = load_keyring(tmp_path / "keys", COORDINATOR)
    url = str(tmp_path / "bucket")
    _race([Exchange(url, ring) for _ in range(4)], slots=60)


def _moto():
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "eu-west-1"},
            "skip_instance_cache": True}
    return server, opts


def test_racing_writers_first_manifest_wins_s3(tmp_path: Path) -> None:
    """The same race against a real S3 endpoint on loopback (moto): conditional PUTs decide."""
    server, opts = _moto()
    try:
        generate_keys(tmp_path / "keys", ["A"])
        ring = load_keyring(tmp_path / "keys", COORDINATOR)
        exs = [Exchange("s3://race/fl", ring, storage_options=opts) for _ in range(3)]
        exs[0].fs.mkdir("race")
        _race(exs, slots=8)
    finally:
        server.stop()


# --------------------------------------------------------------------------- unauthenticated writers


def _plant(ex: Exchange, rel: str, data: bytes) -> None:
    p = Path(ex.root) / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def _good_manifest(ex: Exchange) -> dict:
    header = Header(federation=ex.federation, round=0, sender="A", kind="update", name="A", size=1,
                    sha256=_sha256(b"x"), federation_id=ex.keyring.federation_id, recipients=("A", COORDINATOR))
    return {"version": 3, "header": header.as_dict(), "object": "round_00000/update/A." + "0" * 32 + ".bin",
            "ciphertext_sha256": "0" * 64, "ciphertext_size": 32 + 2 * 48 + 12 + 1 + 16,
            "signature": base64.b64encode(b"s" * 64).decode()}


HOSTILE = {
    "round 1e999": lambda m: m["header"].__setitem__("round", "__INF__"),
    "round as float": lambda m: m["header"].__setitem__("round", 0.0),
    "header as list": lambda m: m.__setitem__("header", [1, 2]),
    "signature not a string": lambda m: m.__setitem__("signature", 12345),
    "signature a list": lambda m: m.__setitem__("signature", ["a"]),
    "case count 10**400": lambda m: m["header"].__setitem__("num_cases", 10**400),
    "size negative": lambda m: m["header"].__setitem__("size", -5),
    "extra field": lambda m: m.__setitem__("evil", 1),
    "sender not a string": lambda m: m["header"].__setitem__("sender", {"a": 1}),
    "object outside the slot": lambda m: m.__setitem__("object", "../../etc/passwd"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_malformed_manifest_rejected_per_object(fed: dict[str, Exchange], case: str) -> None:
    coord = fed[COORDINATOR]
    m = _good_manifest(coord)
    HOSTILE[case](m)
    text = json.dumps(m).replace('"__INF__"', "1e999")
    _plant(coord, "round_00000/update/A.manifest.json", text.encode())
    accepted, rejected = coord.collect("update", 0)
    assert accepted == {} and list(rejected) == ["round_00000/update/A.manifest.json"]


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b"[" * 5000 + b"]" * 5000, b"\xff\xfe",
                                 b'{"a": ' * 3000 + b"1" + b"}" * 3000, b"null", b" " * 20_000])
def test_hostile_json_rejected_per_object(fed: dict[str, Exchange], raw: bytes) -> None:
    coord = fed[COORDINATOR]
    _plant(coord, "round_00000/update/A.manifest.json", raw)
    accepted, rejected = coord.collect("update", 0)
    assert accepted == {} and len(rejected) == 1


def test_coordinator_survives_planted_garbage_and_fake_final_round(fed: dict[str, Exchange]) -> None:
    """Garbage in every slot and an empty round_99999 global manifest: the federation still runs to the end."""
    coord = fed[COORDINATOR]
    _plant(coord, "round_99999/global/global.manifest.json", b"")
    _plant(coord, "round_00001/global/global.manifest.json", json.dumps({"header": []}).encode())
    _plant(coord, "round_00000/update/C.manifest.json", b"[" * 50_000)
    assert latest_global_round(coord) == -1  # nothing valid: not "finished"
    cfg = FederationConfig(("A", "B"), rounds=1, poll_s=FAST)
    a_done = threading.Event()

    def sites() -> None:
        g = None
        while g is None:
            g = fed["A"].get("global", 0, "global")
        for s, d in (("A", 0.5), ("B", 0.75)):  # steps within the global's norm
            w = {k: v + d for k, v in tensors_from_bytes(g.payload).items()}
            fed[s].put("update", 0, tensors_to_bytes(w), parent=g.header.sha256, num_cases=1)
        a_done.set()

    t = threading.Thread(target=sites)
    t.start()
    results = run_coordinator(coord, cfg, _init, case_counts={"A": 1, "B": 1})
    t.join()
    assert a_done.is_set() and [r.round for r in results] == [0]
    g1 = tensors_from_bytes(fed["B"].get("global", 1, "global").payload)
    np.testing.assert_array_equal(g1["w"], np.full((2, 3), 1.625, np.float32))  # 1 + (0.5 + 0.75) / 2
    assert latest_global_round(coord) == 1
    assert run_coordinator(coord, cfg, _init) == []  # finished means: a valid global of the last round


def test_planted_folders_in_place_of_manifest_and_object(fed: dict[str, Exchange]) -> None:
    coord = fed[COORDINATOR]
    (Path(coord.root) / "round_00000/update/A.manifest.json").mkdir(parents=True)
    g = coord.put("global", 0, tensors_to_bytes(_init()))
    fed["B"].put("update", 0, tensors_to_bytes(_init()), parent=g.sha256, num_cases=1)
    obj = next((Path(coord.root) / "round_00000/update").glob("B.*.bin"))
    obj.unlink()
    obj.mkdir()
    accepted, rejected = coord.collect("update", 0)
    assert accepted == {} and len(rejected) == 2
    assert "manifest unreadable" in rejected["round_00000/update/A.manifest.json"]


def test_oversized_manifest_not_read_whole(fed: dict[str, Exchange]) -> None:
    coord = fed[COORDINATOR]
    _plant(coord, "round_00000/update/A.manifest.json", b"{" + b" " * (2 * 1024**2) + b"}")
    _, rejected = coord.collect("update", 0)
    assert "larger than" in rejected["round_00000/update/A.manifest.json"]


# --------------------------------------------------------------------------- a trusted but dishonest site


def _publish_fps(fed: dict[str, Exchange], n_a: int = 2, n_b: int = 3) -> None:
    publish_fingerprint(fed["A"], _fp(n_a), HEADER, n_a)
    publish_fingerprint(fed["B"], _fp(n_b), HEADER, n_b)


def test_case_count_pinned_to_fingerprint(fed: dict[str, Exchange]) -> None:
    """B's fingerprint lists 3 cases; its update claims 10**6: refused, the global is A's alone (quorum 1)."""
    coord = fed[COORDINATOR]
    _publish_fps(fed)
    g = coord.put("global", 0, tensors_to_bytes(_init()))
    fed["A"].put("update", 0, tensors_to_bytes({k: v * 2 for k, v in _init().items()}), parent=g.sha256,
                 num_cases=2)
    fed["B"].put("update", 0, tensors_to_bytes({k: v * 3 for k, v in _init().items()}), parent=g.sha256,
                 num_cases=10**6)
    results = run_coordinator(coord, FederationConfig(("A", "B"), rounds=1, quorum=1, poll_s=FAST), _init)
    assert results[0].contributors == (("A", 2),)
    assert any("claims 1000000 cases, its fingerprint has 3" in r for r in results[0].rejected)
    g1 = tensors_from_bytes(fed["A"].get("global", 1, "global").payload)
    np.testing.assert_array_equal(g1["w"], np.full((2, 3), 2.0, np.float32))


def test_fingerprint_case_count_bounded(fed: dict[str, Exchange]) -> None:
    """A fingerprint must list as many cases as it claims; a malformed one stops planning with the reason."""
    bad = {"fingerprint": _fp(2), "dataset": HEADER, "num_cases": 10**9}
    fed["A"].put("fingerprint", -1, json.dumps(bad).encode(), num_cases=0)
    publish_fingerprint(fed["B"], _fp(3), HEADER, 3)
    with pytest.raises(ValueError, match="invalid fingerprint: num_cases must be an integer"):
        make_shared_plans(fed[COORDINATOR], FederationConfig(("A", "B"), rounds=1, poll_s=FAST),
                          lambda m, h: {}, timeout_s=5)
    assert pinned_case_counts(fed[COORDINATOR], ["A", "B"]) == {"B": 3}


def test_fedavg_refuses_unbounded_counts() -> None:
    a = {"x": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="positive integers"):
        fedavg([(a, 10**400), (a, 1)])
    with pytest.raises(ValueError, match="positive integers"):
        fedavg([(a, 10**9), (a, 1)], max_cases=1000)


def test_update_rules_non_finite_huge_and_norm() -> None:
    rules = AggregationRules(max_norm_ratio=10.0, max_abs_weight=1e6, max_delta_ratio=100.0)  # norm bounds only
    g = {"w": np.full(4, 1.0, np.float32), "step": np.array([3], np.int64)}  # ||g|| = 2
    ok = {"w": np.full(4, 9.5, np.float32), "step": np.array([4], np.int64)}  # ||u|| = 19 <= 20
    check_update(ok, g, rules)
    check_update({"w": np.full(4, 0.2, np.float32), "step": g["step"]}, g, rules)  # 0.4 >= 0.2
    for w, why in ((np.full(4, 10.5, np.float32), "outside"),       # ||u|| = 21 > 20
                   (np.full(4, 0.09, np.float32), "outside"),       # ||u|| = 0.18 < 0.2
                   (np.array([1, 1, 1, 1e30], np.float32), "> 1e+06"),
                   (np.array([1, 1, 1, np.nan], np.float32), "NaN"),
                   (np.array([1, 1, 1, np.inf], np.float32), "NaN or inf")):
        with pytest.raises(RejectedUpdate, match=re.escape(why)):
            check_update({"w": w, "step": g["step"]}, g, rules)
    with pytest.raises(RejectedUpdate, match="float64"):
        check_update({"w": np.ones(4, np.float64), "step": g["step"]}, g, rules)
    # aggregate: the bad update is dropped, the rest averaged with pinned counts (2*9.5 + 1*0.2)/3 = 6.4
    bad = {"w": np.array([1, 1, 1, 1e30], np.float32), "step": g["step"]}
    low = {"w": np.full(4, 0.2, np.float32), "step": g["step"]}
    agg = aggregate({"A": (ok, 2), "B": (bad, 7), "C": (low, None)}, g, {"A": 2, "B": 7, "C": 1}, rules)
    assert agg.contributors == (("A", 2), ("C", 1)) and set(agg.rejected) == {"B"}
    np.testing.assert_allclose(agg.weights["w"], np.full(4, (2 * 9.5 + 0.2) / 3, np.float32), rtol=1e-6)


def test_update_with_huge_weights_never_aggregated(fed: dict[str, Exchange]) -> None:
    coord = fed[COORDINATOR]
    _publish_fps(fed, 1, 1)
    g = coord.put("global", 0, tensors_to_bytes(_init()))
    fed["A"].put("update", 0, tensors_to_bytes({k: v + 1 for k, v in _init().items()}), parent=g.sha256,
                 num_cases=1)
    fed["B"].put("update", 0, tensors_to_bytes({k: v * 1e30 for k, v in _init().items()}), parent=g.sha256,
                 num_cases=1)
    results = run_coordinator(coord, FederationConfig(("A", "B"), rounds=1, quorum=1, poll_s=FAST), _init)
    assert results[0].contributors == (("A", 1),)
    assert any("|w| = 1e+30" in r for r in results[0].rejected)


# --------------------------------------------------------------------------- keys


def test_each_party_makes_its_own_key_pair(tmp_path: Path) -> None:
    """The coordinator's folder never holds a site's private key; a site's never holds another's."""
    import shutil

    from oarbench.train.keys import sign_roster

    coord_dir, a_dir = tmp_path / "coordinator", tmp_path / "site-A"
    generate_party_key(coord_dir, COORDINATOR)
    generate_party_key(a_dir, "A")
    # exchange public files only: A's public key to the coordinator, which signs the roster
    shutil.copy(a_dir / "public/A.pub", coord_dir / "public/A.pub")
    sign_roster(coord_dir)
    shutil.copy(coord_dir / "roster.json", a_dir / "roster.json")
    shutil.copy(coord_dir / "public/coordinator.pub", a_dir / "public/coordinator.pub")
    assert sorted(p.name for p in coord_dir.glob("*.ed25519")) == ["coordinator.ed25519"]
    assert sorted(p.name for p in a_dir.glob("*.ed25519")) == ["A.ed25519"]
    assert sorted(p.name for p in a_dir.glob("*.x25519")) == ["A.x25519"]
    url = str(tmp_path / "bucket")
    coord = Exchange(url, load_keyring(coord_dir, COORDINATOR))
    a = Exchange(url, load_keyring(a_dir, "A"))
    g = coord.put("global", 0, b"g")
    assert a.get("global", 0, "global").payload == b"g"
    a.put("update", 0, b"u", parent=g.sha256, num_cases=1)
    assert coord.collect("update", 0)[0]["A"].payload == b"u"


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("victim", ["A.ed25519", "A.x25519"])
def test_group_readable_private_key_refused(tmp_path: Path, victim: str) -> None:
    generate_keys(tmp_path / "k", ["A"])
    os.chmod(tmp_path / "k" / "A" / victim, 0o640)
    with pytest.raises(PermissionError, match=r"readable or writable by group/others \(mode 0640\)"):
        load_keyring(tmp_path / "k", "A")


def test_federation_id_stops_cross_study_replay(tmp_path: Path) -> None:
    """Same party keys in two studies: objects of one never verify in the other."""
    generate_keys(tmp_path / "k", ["A"])
    ring1 = load_keyring(tmp_path / "k", "A")
    ring2 = replace(ring1, federation_id="f" * 32)
    coord1 = Exchange(str(tmp_path / "study1"), load_keyring(tmp_path / "k", COORDINATOR))
    coord2 = Exchange(str(tmp_path / "study2"), replace(coord1.keyring, federation_id="f" * 32))
    Exchange(str(tmp_path / "study1"), ring1).put("update", 0, b"u", num_cases=1)
    # copy study 1's objects into study 2
    import shutil

    shutil.copytree(tmp_path / "study1", tmp_path / "study2", dirs_exist_ok=True)
    assert list(coord1.collect("update", 0)[0]) == ["A"]
    accepted, rejected = coord2.collect("update", 0)
    assert accepted == {} and "another federation" in next(iter(rejected.values()))
    # and the id is in the AES-GCM associated data: rewriting the header alone fails decryption
    assert "federation_id" in json.loads(_canonical(Header("x", 0, "A", "update", "A", 0, "0" * 64).as_dict()))
    del ring2


def test_cli_keys_per_party(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from oarbench.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["fl", "keys", "--out", str(tmp_path / "a"), "--name", "A"])
    assert res.exit_code == 0, res.output
    assert sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*")
                  if p.is_file()) == ["A.ed25519", "A.x25519", "public/A.pub"]
    assert json.loads((tmp_path / "a/public/A.pub").read_text())["name"] == "A"
    again = runner.invoke(main, ["fl", "keys", "--out", str(tmp_path / "a"), "--name", "A"])
    assert again.exit_code != 0 and "refusing to overwrite" in again.output


# --------------------------------------------------------------------------- cache and size cap


def test_accepted_objects_cached_by_manifest_hash(fed: dict[str, Exchange]) -> None:
    coord = fed[COORDINATOR]
    g = coord.put("global", 0, tensors_to_bytes(_init()))
    fed["A"].put("update", 0, tensors_to_bytes(_init()), parent=g.sha256, num_cases=1)
    for _ in range(5):
        accepted, _ = coord.collect("update", 0)
        assert list(accepted) == ["A"]
    assert coord.downloads == 1


def test_object_size_capped_from_model_size(fed: dict[str, Exchange]) -> None:
    """An update far larger than the global model is refused from its manifest, before any download."""
    coord = fed[COORDINATOR]
    g = coord.put("global", 0, tensors_to_bytes(_init()))
    fed["A"].put("update", 0, tensors_to_bytes({"w": np.zeros(300_000, np.float32)}), parent=g.sha256,
                 num_cases=1)
    cap = len(tensors_to_bytes(_init())) + 64 * 1024
    accepted, rejected = coord.collect("update", 0, max_size=cap)
    assert accepted == {} and "exceeds the cap" in next(iter(rejected.values()))
    assert coord.downloads == 0


def test_oversized_object_behind_valid_manifest_not_downloaded(fed: dict[str, Exchange]) -> None:
    """A bucket writer replaces a ciphertext with a much larger file: refused from its stored size."""
    coord = fed[COORDINATOR]
    g = coord.put("global", 0, tensors_to_bytes(_init()))
    fed["A"].put("update", 0, tensors_to_bytes(_init()), parent=g.sha256, num_cases=1)
    obj = next((Path(coord.root) / "round_00000/update").glob("A.*.bin"))
    obj.write_bytes(b"\0" * (8 * 1024**2))
    _, rejected = coord.collect("update", 0)
    assert "padded" in next(iter(rejected.values()))
    assert coord.downloads == 0


def test_header_type_checks() -> None:
    good = Header("oarbench", 0, "A", "update", "A", 1, "0" * 64, federation_id="1" * 32,
                  recipients=("A", "coordinator")).as_dict()
    assert Header.from_dict(good).sender == "A"
    for key, value in (("round", True), ("round", 2**70), ("num_cases", -1), ("sha256", "xyz"),
                       ("federation_id", "short"), ("kind", "weights"), ("recipients", []),
                       ("recipients", ["A", "A"]), ("recipients", ["x"] * 101), ("recipients", "A")):
        with pytest.raises(RejectedObject):
            Header.from_dict(dict(good, **{key: value}))
