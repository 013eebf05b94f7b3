"""Trust in the Flower engine: the coordinator's app-signing key, signed Flower Apps, the signed roster.

Three things decide who may run code and who is which site in a Flower
federation (docs/training.md, "Flower engine"):

* **The coordinator's signing key** (Ed25519, OpenSSH format), made by
  :func:`make_coordinator_key`. Every hospital's SuperNode starts with
  ``flower-supernode --trusted-entities FILE`` (:func:`write_trusted_entities`),
  so it runs a Flower App (FAB) only if the FAB carries this key's signature;
  Flower's SuperNode checks it before it stores or runs anything of the app.
* **Signed FABs**: :func:`sign_fab` signs what Flower's SuperNode verifies:
  the 8-byte big-endian signing time followed by the SHA-256 digest of the
  FAB's bytes (``flwr.supernode.start_client_internal._verify_fab`` in flwr
  1.42). The signature travels as the FAB's ``verifications`` entry
  ``{key id: {"signature": base64url, "signed_at": seconds}}``.
* **The federation roster** (:func:`make_roster`, :func:`verify_roster`):
  site name -> the SuperNode public key the coordinator registered for it and
  the node id the SuperLink gave that key, signed with the coordinator's key.
  The ServerApp accepts a site's replies only from that node.

Needs ``cryptography`` (the ``flower`` extra).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "KEY_ID_PREFIX",
    "make_coordinator_key",
    "load_signing_key",
    "load_public_key_text",
    "key_id",
    "write_trusted_entities",
    "check_trusted_entities",
    "fab_message",
    "sign_fab",
    "verify_fab",
    "read_node_public_key",
    "make_roster",
    "verify_roster",
    "load_roster",
]

KEY_ID_PREFIX = "oarbench-coordinator-"
_ROSTER_FORMAT = "oarbench-flower-roster-1"
_MAX_KEY_FILE = 64 * 1024
_MAX_ROSTER = 4 * 1024 * 1024


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _read_small(path: Path, limit: int, what: str) -> bytes:
    """Read a regular file of at most ``limit`` bytes (never a FIFO or device)."""
    import stat

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: {what} is not a regular file")
    if st.st_size > limit:
        raise ValueError(f"{path}: {what} is larger than {limit} bytes")
    with open(path, "rb") as fh:
        return fh.read(limit + 1)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_coordinator_key(folder: str | Path, name: str = "coordinator-signing") -> tuple[Path, Path]:
    """The coordinator's Ed25519 app-signing key pair: ``(folder/name (0600, OpenSSH), folder/name.pub)``.

    The same as ``ssh-keygen -t ed25519 -N "" -f folder/name``. The private
    key never leaves the coordinator; the public key goes to every hospital
    (inside the trusted-entities file) and into the Flower App the coordinator
    submits.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    folder = Path(folder)
    key = ed25519.Ed25519PrivateKey.generate()
    priv, pub = folder / name, folder / f"{name}.pub"
    _write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


def load_signing_key(path: str | Path) -> Any:
    """The coordinator's Ed25519 private key from an OpenSSH file; ``ValueError`` naming the file otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = Path(path)
    data = _read_small(path, _MAX_KEY_FILE, "the signing key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not an unencrypted OpenSSH private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: the signing key must be Ed25519 (ssh-keygen -t ed25519), not {type(key).__name__}")
    return key


def _ed25519_public(text: str, where: str) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        key = serialization.load_ssh_public_key(text.strip().encode("utf-8"))
    except (ValueError, TypeError, UnicodeError) as exc:
        raise ValueError(f"{where}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"{where}: the coordinator's key must be Ed25519, not {type(key).__name__}")
    return key


def load_public_key_text(path: str | Path) -> str:
    """The coordinator's Ed25519 public key (one ``ssh-ed25519 ...`` line) read from ``path`` and checked."""
    path = Path(path)
    raw = _read_small(path, _MAX_KEY_FILE, "the public key")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the public key is not text") from None
    _ed25519_public(text, str(path))
    return " ".join(text.split()[:2])  # type and key; a comment is dropped


def _raw_public(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: str) -> str:
    """A stable name for the coordinator's key: ``oarbench-coordinator-`` + 16 hex digits of SHA-256 of the raw key."""
    return KEY_ID_PREFIX + hashlib.sha256(_raw_public(_ed25519_public(public_key, "public key"))).hexdigest()[:16]


def write_trusted_entities(path: str | Path, public_key: str) -> Path:
    """The file every hospital gives ``flower-supernode --trusted-entities``: ``key id: "ssh-ed25519 ..."``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{key_id(public_key)}: "{public_key}"\n')
    return path


def check_trusted_entities(path: str | Path) -> dict[str, str]:
    """Read a trusted-entities file as ``flower-supernode`` will (YAML, key id -> Ed25519 OpenSSH key); ``ValueError``
    naming the file and the problem otherwise."""
    import yaml

    path = Path(path)
    raw = _read_small(path, _MAX_KEY_FILE, "the trusted-entities file")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: the trusted-entities file is not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: the trusted-entities file must map a key id to the coordinator's public key")
    for kid, text in data.items():
        if not isinstance(text, str):
            raise ValueError(f"{path}: entry {kid!r} is not an OpenSSH public key line")
        _ed25519_public(text, f"{path}: entry {kid!r}")
    return {str(k): str(v) for k, v in data.items()}


def fab_message(fab: bytes, signed_at: int) -> bytes:
    """What is signed: ``signed_at`` as 8 bytes big-endian, then SHA-256 of the FAB (as Flower's SuperNode checks)."""
    return int(signed_at).to_bytes(8, "big") + hashlib.sha256(fab).digest()


def sign_fab(fab: bytes, private_key: Any, signed_at: int | None = None) -> dict[str, str]:
    """The FAB's ``verifications`` entry: ``{key id: '{"signature": ..., "signed_at": ...}'}``."""
    when = int(time.time()) if signed_at is None else int(signed_at)
    public = private_key.public_key()
    from cryptography.hazmat.primitives import serialization

    openssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    sig = private_key.sign(fab_message(fab, when))
    return {key_id(openssh): json.dumps({"signature": _b64url(sig), "signed_at": when})}


def verify_fab(fab: bytes, verifications: Mapping[str, str], public_key: str) -> bool:
    """True when ``verifications`` holds a valid signature of ``fab`` by ``public_key``."""
    from cryptography.exceptions import InvalidSignature

    entry = verifications.get(key_id(public_key))
    if not entry:
        return False
    try:
        data = json.loads(entry)
        sig, when = _unb64url(str(data["signature"])), data["signed_at"]
        if not isinstance(when, int) or isinstance(when, bool) or not 0 <= when < 2 ** 63:
            return False
        _ed25519_public(public_key, "public key").verify(sig, fab_message(fab, when))
    except (ValueError, TypeError, KeyError, InvalidSignature, RecursionError):
        return False
    return True


# --------------------------------------------------------------------------- the roster


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _node_public_key(text: str, where: str) -> str:
    """A SuperNode's public key (OpenSSH, as registered with ``flwr supernode register``), normalised."""
    from cryptography.hazmat.primitives import serialization

    try:
        serialization.load_ssh_public_key(str(text).strip().encode("utf-8"))
    except (ValueError, TypeError, UnicodeError) as exc:
        raise ValueError(f"{where}: not an OpenSSH public key ({exc})") from None
    return " ".join(str(text).split()[:2])


def read_node_public_key(path: str | Path) -> str:
    """A SuperNode's public key file (OpenSSH, e.g. ``ssh-keygen -t ecdsa -b 384``), checked; one line."""
    path = Path(path)
    raw = _read_small(path, _MAX_KEY_FILE, "the SuperNode public key")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the SuperNode public key is not text") from None
    return _node_public_key(text, str(path))


def make_roster(sites: Mapping[str, tuple[str, int]], private_key: Any, federation: str = "oarbench") -> dict[str, Any]:
    """The signed roster: ``sites`` maps a site name to (its SuperNode public key, the node id the SuperLink gave it).

    Raises ``ValueError`` for an empty roster, a key or node id used by two
    sites, or a node id that is not a positive integer.
    """
    if not sites:
        raise ValueError("the roster needs at least one site")
    entries: dict[str, dict[str, Any]] = {}
    for site, (pub, node) in sorted(sites.items()):
        if not str(site).strip():
            raise ValueError("a site name in the roster is empty")
        if isinstance(node, bool) or not isinstance(node, int) or node <= 0:
            raise ValueError(f"site {site!r}: node id must be a positive integer, got {node!r}")
        entries[str(site)] = {"public_key": _node_public_key(pub, f"site {site!r}"), "node_id": int(node)}
    _check_distinct(entries, "roster")
    from cryptography.hazmat.primitives import serialization

    openssh = private_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                    serialization.PublicFormat.OpenSSH).decode()
    body = {"format": _ROSTER_FORMAT, "federation": str(federation), "issued_at": int(time.time()),
            "sites": entries}
    return {"roster": body, "key_id": key_id(openssh), "signature": _b64url(private_key.sign(_canonical(body)))}


def _check_distinct(entries: Mapping[str, Mapping[str, Any]], where: str) -> None:
    for field in ("public_key", "node_id"):
        seen: dict[Any, str] = {}
        for site, e in entries.items():
            if e[field] in seen:
                raise ValueError(f"{where}: sites {seen[e[field]]!r} and {site!r} have the same {field.replace('_', ' ')}")
            seen[e[field]] = site


def verify_roster(doc: Mapping[str, Any] | str, public_key: str, where: str = "roster") -> dict[str, int]:
    """Check the roster's signature by the coordinator's ``public_key``; return site -> node id.

    Raises ``ValueError`` naming ``where`` and the problem (bad signature,
    other key, malformed entries, a key or node id used twice).
    """
    from cryptography.exceptions import InvalidSignature

    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("roster"), Mapping):
        raise ValueError(f"{where}: not a signed roster (needs 'roster', 'key_id', 'signature')")
    body = doc["roster"]
    if doc.get("key_id") != key_id(public_key):
        raise ValueError(f"{where}: signed by key {doc.get('key_id')!r}, not by the coordinator's key "
                         f"{key_id(public_key)}")
    try:
        sig = _unb64url(str(doc.get("signature", "")))
        _ed25519_public(public_key, "public key").verify(sig, _canonical(body))
    except (ValueError, InvalidSignature, TypeError):
        raise ValueError(f"{where}: the coordinator's signature does not match (edited or forged roster)") from None
    if body.get("format") != _ROSTER_FORMAT or not isinstance(body.get("sites"), Mapping) or not body["sites"]:
        raise ValueError(f"{where}: unknown roster format or no sites")
    out: dict[str, int] = {}
    for site, e in body["sites"].items():
        node = e.get("node_id") if isinstance(e, Mapping) else None
        if isinstance(node, bool) or not isinstance(node, int) or node <= 0:
            raise ValueError(f"{where}: site {site!r} has no valid node id")
        _node_public_key(e.get("public_key", ""), f"{where}: site {site!r}")
        out[str(site)] = node
    _check_distinct(body["sites"], where)
    return out


def load_roster(path: str | Path, public_key: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Read and verify a roster file: ``(the signed document, site -> node id)``."""
    path = Path(path)
    raw = _read_small(path, _MAX_ROSTER, "the roster")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: the roster is not JSON ({exc})") from None
    return doc, verify_roster(doc, public_key, where=str(path))
