"""Secure storage exchange: round trips, and every planted failure is rejected with its reason."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cryptography")
pytest.importorskip("safetensors")
pytest.importorskip("fsspec")

from oarbench.train.exchange import (  # noqa: E402
    COORDINATOR,
    Exchange,
    generate_keys,
    load_keyring,
    tensors_from_bytes,
    tensors_to_bytes,
)


@pytest.fixture()
def keys(tmp_path: Path) -> Path:
    generate_keys(tmp_path / "keys", ["A", "B"])
    return tmp_path / "keys"


@pytest.fixture()
def parties(tmp_path: Path, keys: Path) -> dict[str, Exchange]:
    url = f"file://{tmp_path / 'bucket'}"
    return {
        name: Exchange(url, load_keyring(keys, name))
        for name in (COORDINATOR, "A", "B")
    }


def _bin(root: Path, slot: str) -> Path:
    """The one ciphertext file of a slot (its name is unique to the write)."""
    found = sorted(root.glob(slot + ".*.bin"))
    assert len(found) == 1, found
    return found[0]


def _payload() -> bytes:
    return tensors_to_bytes({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float64)})


def test_keys_files_and_no_overwrite(keys: Path) -> None:
    """One folder per party: its own private keys only, the public files it needs, the signed roster."""
    assert sorted(p.name for p in (keys / COORDINATOR / "public").iterdir()) == ["A.pub", "B.pub", "coordinator.pub"]
    assert sorted(p.name for p in (keys / "A" / "public").iterdir()) == ["A.pub", "coordinator.pub"]
    for party in (COORDINATOR, "A", "B"):
        private = sorted(p.name for p in (keys / party).iterdir() if p.is_file() and p.suffix != ".json")
        assert private == [f"{party}.ed25519", f"{party}.x25519"]
        assert oct((keys / party / f"{party}.x25519").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        generate_keys(keys, ["A"])
    ring = load_keyring(keys, COORDINATOR)
    assert sorted(ring.trusted) == ["A", "B"]
    assert sorted(load_keyring(keys, "A").trusted) == [COORDINATOR]


def test_round_trip_update_and_global(parties: dict[str, Exchange]) -> None:
    coord, a = parties[COORDINATOR], parties["A"]
    g = coord.put("global", 0, b"global-weights")
    a.put("update", 0, _payload(), parent=g.sha256, num_cases=7)
    accepted, rejected = coord.collect("update", 0, parent=g.sha256)
    assert rejected == {}
    assert list(accepted) == ["A"]
    assert accepted["A"].header.num_cases == 7
    arrays = tensors_from_bytes(accepted["A"].payload)
    np.testing.assert_array_equal(arrays["w"], np.arange(12, dtype=np.float32).reshape(3, 4))
    # the site reads the coordinator's global model
    got = a.get("global", 0, "global")
    assert got is not None and got.payload == b"global-weights"
    # nothing in storage is plaintext
    for rel, _ in a.list_objects():
        assert b"global-weights" not in a._read(rel)


def _only_rejection(coord: Exchange, round_: int = 0, parent: str | None = None) -> str:
    accepted, rejected = coord.collect("update", round_, parent=parent)
    assert accepted == {}
    assert len(rejected) == 1
    return next(iter(rejected.values()))


def test_tampered_byte_rejected(parties: dict[str, Exchange], caplog: pytest.LogCaptureFixture) -> None:
    coord, a = parties[COORDINATOR], parties["A"]
    a.put("update", 0, _payload(), num_cases=3)
    obj = _bin(Path(a.root), "round_00000/update/A")
    data = bytearray(obj.read_bytes())
    data[40] ^= 0x01
    obj.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="oarbench.train.exchange"):
        reason = _only_rejection(coord)
    assert "sha256 mismatch" in reason
    assert "sha256 mismatch" in caplog.text


def test_tampered_byte_with_rewritten_hash_fails_signature(parties: dict[str, Exchange]) -> None:
    import hashlib

    coord, a = parties[COORDINATOR], parties["A"]
    a.put("update", 0, _payload(), num_cases=3)
    obj = _bin(Path(a.root), "round_00000/update/A")
    man = Path(a.root) / "round_00000/update/A.manifest.json"
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0x80
    obj.write_bytes(bytes(data))
    m = json.loads(man.read_text())
    m["ciphertext_sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    man.write_text(json.dumps(m))
    assert "bad signature" in _only_rejection(coord)


def test_wrong_encryption_key_rejected(tmp_path: Path, parties: dict[str, Exchange], keys: Path) -> None:
    """A encrypts to a coordinator key that is not the coordinator's (an old or forged one): decryption fails."""
    from dataclasses import replace

    coord = parties[COORDINATOR]
    ring = load_keyring(keys, "A")
    ring = replace(ring, recipients=dict(ring.recipients, coordinator=os.urandom(32)))
    Exchange(coord.url, ring).put("update", 0, _payload(), num_cases=3)
    assert "decryption failed" in _only_rejection(coord)


def test_unknown_and_unsigned_site_rejected(tmp_path: Path, parties: dict[str, Exchange]) -> None:
    coord = parties[COORDINATOR]
    other = tmp_path / "other-keys"
    generate_keys(other, ["C"])
    ring_c = load_keyring(other, "C")
    from dataclasses import replace

    ring_c = replace(ring_c, federation_id=coord.keyring.federation_id,
                     recipients=dict(ring_c.recipients, coordinator=coord.keyring.encryption_public_key()))
    Exchange(coord.url, ring_c).put("update", 0, _payload(), num_cases=3)
    assert "unknown sender 'C'" in _only_rejection(coord)

    # B's manifest with its signature removed
    parties["B"].put("update", 1, _payload(), num_cases=3)
    man = Path(coord.root) / "round_00001/update/B.manifest.json"
    m = json.loads(man.read_text())
    del m["signature"]
    man.write_text(json.dumps(m))
    assert "unsigned" in _only_rejection(coord, round_=1)


def test_site_impersonating_another_site_rejected(parties: dict[str, Exchange], keys: Path) -> None:
    """B signs with its own key but claims to be A: the signature does not verify with A's public key."""
    from dataclasses import replace

    coord = parties[COORDINATOR]
    ring_b = load_keyring(keys, "B")
    ring_b_as_a = replace(ring_b, identity="A", recipients=dict(ring_b.recipients, A=ring_b.encryption_public_key()))
    Exchange(coord.url, ring_b_as_a).put("update", 0, _payload(), num_cases=3)
    assert "bad signature for sender 'A'" in _only_rejection(coord)


def test_replay_from_other_round_rejected(parties: dict[str, Exchange]) -> None:
    coord, a = parties[COORDINATOR], parties["A"]
    a.put("update", 0, _payload(), num_cases=3)
    root = Path(a.root)
    (root / "round_00001/update").mkdir(parents=True)
    ext = ".manifest.json"
    (root / f"round_00001/update/A{ext}").write_bytes((root / f"round_00000/update/A{ext}").read_bytes())
    assert "replay: object is for round 0, expected round 1" in _only_rejection(coord, round_=1)


def test_stale_parent_rejected(parties: dict[str, Exchange]) -> None:
    coord, a = parties[COORDINATOR], parties["A"]
    a.put("update", 0, _payload(), parent="0" * 64, num_cases=3)
    assert "trained from global model" in _only_rejection(coord, parent="f" * 64)


def test_duplicate_upload_refused(parties: dict[str, Exchange]) -> None:
    coord, a = parties[COORDINATOR], parties["A"]
    a.put("update", 0, _payload(), num_cases=3)
    with pytest.raises(FileExistsError, match="duplicate upload"):
        a.put("update", 0, _payload(), num_cases=4)
    accepted, _ = coord.collect("update", 0)
    assert accepted["A"].header.num_cases == 3  # the first upload stands


def test_copied_manifest_in_other_slot_rejected(parties: dict[str, Exchange]) -> None:
    """A second copy of A's update under another slot name is not counted twice."""
    coord, a = parties[COORDINATOR], parties["A"]
    a.put("update", 0, _payload(), num_cases=3)
    root = Path(a.root) / "round_00000/update"
    (root / "A2.manifest.json").write_bytes((root / "A.manifest.json").read_bytes())
    accepted, rejected = coord.collect("update", 0)
    assert list(accepted) == ["A"]
    assert len(rejected) == 1 and "not the one it was found in" in next(iter(rejected.values()))


def test_missing_manifest_rejected(parties: dict[str, Exchange]) -> None:
    coord, a = parties[COORDINATOR], parties["A"]
    a.put("update", 0, _payload(), num_cases=3)
    (Path(a.root) / "round_00000/update/A.manifest.json").unlink()
    assert "manifest missing" in _only_rejection(coord)
    assert coord.get("update", 0, "A") is None


def test_truncated_object_rejected(parties: dict[str, Exchange]) -> None:
    coord, a = parties[COORDINATOR], parties["A"]
    a.put("update", 0, _payload(), num_cases=3)
    obj = _bin(Path(a.root), "round_00000/update/A")
    obj.write_bytes(obj.read_bytes()[:-10])
    assert "truncated" in _only_rejection(coord)


def test_site_cannot_publish_global(parties: dict[str, Exchange]) -> None:
    with pytest.raises(ValueError, match="may not send"):
        parties["A"].put("global", 0, b"x")


def test_s3_round_trip_and_create_only(keys: Path) -> None:
    """Against a real S3 endpoint on loopback (moto server mode) through s3fs."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        opts = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"},
            "skip_instance_cache": True,
        }
        coord = Exchange("s3://fl-bucket/study1", load_keyring(keys, COORDINATOR), storage_options=opts)
        coord.fs.mkdir("fl-bucket")
        a = Exchange("s3://fl-bucket/study1", load_keyring(keys, "A"), storage_options=opts)
        g = coord.put("global", 0, b"g0")
        a.put("update", 0, _payload(), parent=g.sha256, num_cases=5)
        with pytest.raises(FileExistsError):
            a.put("update", 0, _payload(), parent=g.sha256, num_cases=5)
        # create-only at the storage level too (the check before writing is bypassed here)
        with pytest.raises(FileExistsError):
            a._create("round_00000/update/A.manifest.json", b"{}")
        accepted, rejected = coord.collect("update", 0, parent=g.sha256)
        assert rejected == {} and accepted["A"].header.num_cases == 5
        rels = [re.sub(r"\.[0-9a-f]{32}\.bin$", ".ID.bin", r) for r, _ in coord.list_objects()]
        assert rels == [  # the losing duplicate write removed its own ciphertext
            "round_00000/global/global.ID.bin",
            "round_00000/global/global.manifest.json",
            "round_00000/update/A.ID.bin",
            "round_00000/update/A.manifest.json",
        ]
    finally:
        server.stop()


def test_cli_keys_and_clean_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from oarbench.cli import main

    runner = CliRunner()
    for args in (["keys", "--name", "coordinator"], ["keys", "--name", "A"], ["keys", "--name", "B"]):
        res = runner.invoke(main, ["fl", *args, "--out", str(tmp_path / "k")])
        assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["fl", "roster", "--keys", str(tmp_path / "k")])
    assert res.exit_code == 0 and "serial 1, sites A, B" in res.output, res.output
    assert (tmp_path / "k" / "roster.json").is_file() and (tmp_path / "k" / "public" / "B.pub").is_file()
    again = runner.invoke(main, ["fl", "keys", "--name", "A", "--out", str(tmp_path / "k")])
    assert again.exit_code != 0 and "refusing to overwrite" in again.output
    bad = runner.invoke(main, ["fl", "keys", "--out", str(tmp_path / "k2"), "--name", "A/../B"])
    assert bad.exit_code != 0 and "letters, digits" in bad.output
    # a site whose private key is not in the folder: a clean error naming the file, no traceback
    missing = runner.invoke(main, ["fl", "site", "--storage", str(tmp_path / "s"), "--keys", str(tmp_path / "k"),
                                   "--sites", "A,B,C", "--rounds", "1", "--work", str(tmp_path / "w"),
                                   "--site", "C", "--dataset", str(tmp_path)])
    assert missing.exit_code != 0 and "C.ed25519: private key file not found" in missing.output
