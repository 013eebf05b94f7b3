"""Per-party keys of a storage federation and the coordinator's signed roster.

Every party (the coordinator and each site) makes its own two key pairs and
never shares the private halves:

* Ed25519 (``<name>.ed25519``): signs every object the party writes;
* X25519 (``<name>.x25519``): objects meant for the party are encrypted to it.

``public/<name>.pub`` (JSON: name, both public keys) is what a party hands
out. The coordinator collects the sites' public files in its own
``public/`` folder and signs a *roster* (``roster.json``): the federation's
random id, a serial number that grows with every change, and every party's
public keys. Sites hold the coordinator's public file (their trust anchor,
exchanged out of band) and the roster it signed. There is no shared secret:
a site's update is encrypted to the coordinator only (and to the site
itself), a global model to the parties on the roster.

Rotation: a party makes a new key pair (``rotate_party_key``; the old one
moves to ``retired/``), sends the new public file, the coordinator signs the
roster again. Revocation: the coordinator drops a site from the roster
(``sign_roster(..., revoke=[site])``); from then on its objects are refused
and new global models are not encrypted to it.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "COORDINATOR",
    "ROSTER",
    "PartyKeys",
    "Roster",
    "check_name",
    "generate_party_key",
    "rotate_party_key",
    "read_public",
    "sign_roster",
    "read_roster",
    "generate_keys",
    "load_party",
]

#: Name of the coordinator as a party.
COORDINATOR = "coordinator"
#: File name of the signed roster in a party's key folder.
ROSTER = "roster.json"
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_NAME_MAX = 64
_KEY_BYTES = 32
_ROSTER_VERSION = 1
#: Largest roster or public key file read (bytes).
MAX_KEY_FILE_BYTES = 1024 * 1024
#: Most parties on one roster.
MAX_PARTIES = 100


def check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name or len(name) > _NAME_MAX or not set(name) <= _NAME_OK:
        raise ValueError(f"{what} {str(name)[:80]!r} must be 1-{_NAME_MAX} letters, digits, '_' or '-'")
    return name


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, n: int, where: str) -> bytes:
    if not isinstance(text, str) or len(text) > 200:
        raise ValueError(f"{where}: key is not a short base64 string")
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise ValueError(f"{where}: key is not base64") from None
    if len(data) != n:
        raise ValueError(f"{where}: key must be {n} bytes, got {len(data)}")
    return data


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _write_file(path: Path, text: str, *, private: bool, replace: bool = False) -> None:
    """Write atomically; create-only unless ``replace``; private files get mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600 if private else 0o644)
        if replace:
            os.replace(tmp, path)
            return
        os.link(tmp, path)  # create-only: never overwrite an existing key
    except FileExistsError as exc:
        raise FileExistsError(f"{path}: key file exists already; refusing to overwrite it") from exc
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _read_small(path: Path, what: str) -> str:
    """Read a small regular file as text (never a FIFO or device); one-line errors naming the file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: {what} is not a regular file")
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path}: {what} larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: {what} is not UTF-8 text") from None


def _check_private_mode(path: Path) -> None:
    if os.name != "posix":
        return
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(
            f"{path}: private key file is readable or writable by group/others (mode {stat.S_IMODE(mode):04o}); "
            f"run 'chmod 600 {path}'"
        )


def _read_private(path: Path) -> bytes:
    text = _read_small(path, "private key file")
    _check_private_mode(path)
    return _unb64(text, _KEY_BYTES, str(path))


# --------------------------------------------------------------------------- one party's keys


def _new_pairs() -> tuple[bytes, bytes, bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    raw = (serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig, enc = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    return (sig.private_bytes(*raw), sig.public_key().public_bytes(*pub),
            enc.private_bytes(*raw), enc.public_key().public_bytes(*pub))


def _public_text(name: str, ed_pub: bytes, x_pub: bytes) -> str:
    return json.dumps({"name": name, "ed25519": _b64(ed_pub), "x25519": _b64(x_pub)}, indent=1) + "\n"


def generate_party_key(out: str | Path, name: str) -> dict[str, Path]:
    """Make one party's key pairs in ``out``.

    Writes ``<name>.ed25519`` and ``<name>.x25519`` (private, mode 0600) and
    ``public/<name>.pub`` (JSON with both public keys, the only file to hand
    out). Existing files are never overwritten.
    """
    out = Path(out)
    check_name(name, "party name")
    ed_priv, ed_pub, x_priv, x_pub = _new_pairs()
    paths = {name: out / f"{name}.ed25519", f"{name}.x25519": out / f"{name}.x25519",
             f"{name}.pub": out / "public" / f"{name}.pub"}
    for p in paths.values():
        if p.exists():
            raise FileExistsError(f"{p}: key file exists already; refusing to overwrite it")
    _write_file(paths[f"{name}.pub"], _public_text(name, ed_pub, x_pub), private=False)
    _write_file(paths[name], _b64(ed_priv) + "\n", private=True)
    _write_file(paths[f"{name}.x25519"], _b64(x_priv) + "\n", private=True)
    return paths


def rotate_party_key(out: str | Path, name: str) -> dict[str, Path]:
    """Replace a party's key pairs: the old files move to ``out/retired/<time>/``, new ones are made.

    The new ``public/<name>.pub`` goes to the coordinator, which signs the roster again.
    """
    out = Path(out)
    check_name(name, "party name")
    old = [out / f"{name}.ed25519", out / f"{name}.x25519", out / "public" / f"{name}.pub"]
    if not all(p.is_file() for p in old):
        raise FileNotFoundError(f"{out}: no complete key pair of {name!r} to rotate (make one with 'fl keys')")
    retired = out / "retired" / time.strftime("%Y%m%dT%H%M%S") / secrets.token_hex(2)
    retired.mkdir(parents=True)
    for p in old:
        shutil.move(str(p), str(retired / p.name))
    return generate_party_key(out, name)


def read_public(path: str | Path) -> tuple[str, bytes, bytes]:
    """``(name, ed25519 public, x25519 public)`` from a ``public/<name>.pub`` file."""
    path = Path(path)
    try:
        d = json.loads(_read_small(path, "public key file"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: public key file is not JSON ({exc.msg})") from None
    if not isinstance(d, dict) or set(d) != {"name", "ed25519", "x25519"}:
        raise ValueError(f"{path}: public key file must hold exactly name, ed25519 and x25519")
    name = check_name(d["name"], f"{path}: party name")
    return name, _unb64(d["ed25519"], _KEY_BYTES, str(path)), _unb64(d["x25519"], _KEY_BYTES, str(path))


# --------------------------------------------------------------------------- roster


class Roster:
    """The coordinator-signed list of parties: federation id, serial, public keys by name."""

    def __init__(self, federation_id: str, serial: int, parties: Mapping[str, tuple[bytes, bytes]]) -> None:
        self.federation_id = federation_id
        self.serial = serial
        self.parties = dict(parties)

    @property
    def sites(self) -> list[str]:
        return sorted(p for p in self.parties if p != COORDINATOR)

    def body(self) -> dict[str, Any]:
        return {
            "version": _ROSTER_VERSION,
            "federation_id": self.federation_id,
            "serial": self.serial,
            "parties": {n: {"ed25519": _b64(e), "x25519": _b64(x)} for n, (e, x) in sorted(self.parties.items())},
        }


def _sign(ed_priv: bytes, message: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(ed_priv).sign(message)


def _verify(ed_pub: bytes, message: bytes, signature: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(ed_pub).verify(signature, message)
    except InvalidSignature:
        return False
    return True


def sign_roster(keys: str | Path, *, revoke: list[str] | tuple[str, ...] = ()) -> Roster:
    """Coordinator: sign ``roster.json`` from the public files in ``keys/public/``.

    The first roster gets a new random federation id; every later one keeps
    the id and increments the serial. ``revoke`` names sites to drop: their
    public files move to ``public/revoked/`` first. Sites get a copy of the
    new ``roster.json`` (a public file: it is signed).
    """
    keys = Path(keys)
    ed_priv = _read_private(keys / f"{COORDINATOR}.ed25519")
    for site in revoke:
        check_name(site, "site name")
        if site == COORDINATOR:
            raise ValueError("the coordinator cannot revoke itself")
        src = keys / "public" / f"{site}.pub"
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no public key of site {site!r} to revoke")
        (keys / "public" / "revoked").mkdir(exist_ok=True)
        shutil.move(str(src), str(keys / "public" / "revoked" / f"{site}.{secrets.token_hex(4)}.pub"))
    parties: dict[str, tuple[bytes, bytes]] = {}
    for p in sorted((keys / "public").glob("*.pub")):
        name, e, x = read_public(p)
        if p.name != f"{name}.pub":
            raise ValueError(f"{p}: file name does not match the party name {name!r} inside")
        parties[name] = (e, x)
    if COORDINATOR not in parties:
        raise FileNotFoundError(f"{keys}/public/{COORDINATOR}.pub: the coordinator's public key is missing")
    if len(parties) > MAX_PARTIES:
        raise ValueError(f"{keys}/public: {len(parties)} parties, at most {MAX_PARTIES}")
    fed_id, serial = secrets.token_hex(16), 1
    if (keys / ROSTER).exists():
        try:
            old = read_roster(keys / ROSTER, parties[COORDINATOR][0])
        except ValueError as exc:
            raise ValueError(f"{exc}; if the coordinator's key was rotated, move {keys / ROSTER} aside to "
                             f"start a new roster (a new federation id), and give every site the new "
                             f"public/{COORDINATOR}.pub to pin") from None
        fed_id, serial = old.federation_id, old.serial + 1
    roster = Roster(fed_id, serial, parties)
    body = roster.body()
    doc = dict(body, signature=_b64(_sign(ed_priv, _canonical(body))))
    _write_file(keys / ROSTER, json.dumps(doc, indent=1, sort_keys=True) + "\n", private=False, replace=True)
    return roster


def read_roster(path: str | Path, coordinator_ed25519: bytes) -> Roster:
    """Read ``roster.json`` and verify the coordinator's signature over it (``ValueError`` naming the file)."""
    path = Path(path)
    try:
        doc = json.loads(_read_small(path, "roster"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: roster is not JSON ({exc.msg})") from None
    if not isinstance(doc, dict) or set(doc) != {"version", "federation_id", "serial", "parties", "signature"}:
        raise ValueError(f"{path}: roster fields differ from the schema")
    sig = doc.pop("signature")
    if not isinstance(sig, str) or len(sig) > 200:
        raise ValueError(f"{path}: roster signature is not a short string")
    try:
        signature = base64.b64decode(sig, validate=True)
    except ValueError:
        raise ValueError(f"{path}: roster signature is not base64") from None
    if not _verify(coordinator_ed25519, _canonical(doc), signature):
        raise ValueError(f"{path}: roster signature does not verify with the coordinator's public key "
                         f"(altered, or signed by another coordinator)")
    if doc["version"] != _ROSTER_VERSION:
        raise ValueError(f"{path}: roster version {doc['version']!r}, expected {_ROSTER_VERSION}")
    fed_id = doc["federation_id"]
    if not isinstance(fed_id, str) or len(fed_id) != 32 or not set(fed_id) <= set("0123456789abcdef"):
        raise ValueError(f"{path}: federation_id must be 32 hex digits")
    if type(doc["serial"]) is not int or doc["serial"] < 1:
        raise ValueError(f"{path}: serial must be a positive integer")
    if not isinstance(doc["parties"], dict) or len(doc["parties"]) > MAX_PARTIES:
        raise ValueError(f"{path}: parties must be an object of at most {MAX_PARTIES} entries")
    parties = {}
    for name, d in doc["parties"].items():
        check_name(name, f"{path}: party name")
        if not isinstance(d, dict) or set(d) != {"ed25519", "x25519"}:
            raise ValueError(f"{path}: party {name!r} must hold exactly ed25519 and x25519")
        parties[name] = (_unb64(d["ed25519"], _KEY_BYTES, f"{path}: {name}"),
                         _unb64(d["x25519"], _KEY_BYTES, f"{path}: {name}"))
    if parties.get(COORDINATOR, (None,))[0] != coordinator_ed25519:
        raise ValueError(f"{path}: the roster's coordinator key is not the pinned one")
    return Roster(fed_id, doc["serial"], parties)


def generate_keys(out: str | Path, sites: list[str] | tuple[str, ...]) -> dict[str, Path]:
    """Keys of a federation simulated on one machine: one folder per party under ``out``.

    ``out/<party>/`` holds that party's private keys only, the public files it
    needs and the signed roster (each party's folder as a real deployment
    would have it). Also ``out/roster.json`` (a copy). Returns the folders by
    party name.
    """
    out = Path(out)
    names = [COORDINATOR] + [check_name(s, "site name") for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be distinct and not {COORDINATOR!r}: {list(sites)}")
    folders = {n: out / n for n in names}
    for n, d in folders.items():
        generate_party_key(d, n)
    coord = folders[COORDINATOR]
    for n in names[1:]:
        shutil.copy(folders[n] / "public" / f"{n}.pub", coord / "public" / f"{n}.pub")
    sign_roster(coord)
    for n in names[1:]:
        shutil.copy(coord / "public" / f"{COORDINATOR}.pub", folders[n] / "public" / f"{COORDINATOR}.pub")
        shutil.copy(coord / ROSTER, folders[n] / ROSTER)
    shutil.copy(coord / ROSTER, out / ROSTER)
    return folders


def party_folder(keys: str | Path, identity: str) -> Path:
    """The key folder of ``identity``: ``keys`` itself, or ``keys/<identity>`` in a :func:`generate_keys` folder."""
    keys = Path(keys)
    sub = keys / identity
    if not (keys / f"{identity}.ed25519").exists() and (sub / f"{identity}.ed25519").exists():
        return sub
    return keys


class PartyKeys:
    """What :func:`load_party` reads: own private keys, the verified roster, the pinned coordinator key."""

    def __init__(self, identity: str, ed_priv: bytes, x_priv: bytes, roster: Roster) -> None:
        self.identity = identity
        self.ed_priv = ed_priv
        self.x_priv = x_priv
        self.roster = roster


def load_party(keys: str | Path, identity: str) -> PartyKeys:
    """Read a party's key folder and check it against the roster.

    Raises ``ValueError``/``FileNotFoundError``/``PermissionError`` with one
    line naming the file: a private key readable by others, a roster not
    signed by the pinned coordinator key, or a roster that does not list this
    party's current public keys (rotated but not signed again, or revoked).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    check_name(identity, "party name")
    folder = party_folder(keys, identity)
    ed_priv = _read_private(folder / f"{identity}.ed25519")
    x_priv = _read_private(folder / f"{identity}.x25519")
    pub = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ed_pub = Ed25519PrivateKey.from_private_bytes(ed_priv).public_key().public_bytes(*pub)
    x_pub = X25519PrivateKey.from_private_bytes(x_priv).public_key().public_bytes(*pub)
    if identity == COORDINATOR:
        anchor = ed_pub
    else:
        name, anchor, _ = read_public(folder / "public" / f"{COORDINATOR}.pub")
        if name != COORDINATOR:
            raise ValueError(f"{folder}/public/{COORDINATOR}.pub: names party {name!r}, not the coordinator")
    roster = read_roster(folder / ROSTER, anchor)
    if roster.parties.get(identity) != (ed_pub, x_pub):
        why = "is not on it (revoked, or never added)" if identity not in roster.parties else \
            "lists other public keys for it (rotated: the coordinator must sign the roster again)"
        raise ValueError(f"{folder / ROSTER}: party {identity!r} {why}")
    return PartyKeys(identity, ed_priv, x_priv, roster)
