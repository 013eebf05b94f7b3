"""Secure exchange of federated-learning objects through shared storage.

The federation has no server that sites connect to: every party (the
coordinator and each site) only reads and writes objects in one shared
storage location, given as an fsspec URL (a local folder ``file:///...`` by
default; ``s3://bucket/prefix``, ``gs://``, ``az://``, ``webdav`` when the
matching fsspec back-end is installed). Hospitals therefore need outbound
connections only.

Keys: every party makes its own Ed25519 key pair (:func:`generate_party_key`)
and hands out only the public key; the coordinator makes the federation's
AES-256 key and a random federation id (:func:`create_federation`) and gives
both to the sites. :func:`generate_keys` makes all of it in one folder, for a
federation simulated on one machine only.

Every object is

* serialised in a safe format: tensors as safetensors (never pickles), other
  payloads as UTF-8 JSON;
* encrypted with AES-256-GCM under the federation key, with a 12-byte random
  nonce. The object *header* (federation id and name, round, sender, kind,
  slot name, plaintext size and sha256, parent model hash, case count) is
  the GCM associated data, so a ciphertext moved to another round, sender,
  kind or federation fails to decrypt;
* described by a *manifest* (JSON) that carries the header, the path of the
  ciphertext (a name unique to this write), the sha256 and byte size of the
  ciphertext, and an Ed25519 signature of the sender over all of that.
  Readers trust only senders whose public key they hold, and every slot is
  bound to its sender: a site can only fill its own slots.

Uploads: the ciphertext goes to a fresh, unique name (create-only), then the
manifest is committed create-only. Readers look only at manifests, so they
never see half an object; of two writers of one slot the first committed
manifest wins, and the other removes only its own ciphertext.

Every check that fails raises :class:`RejectedObject` with a reason that
names the object; :meth:`Exchange.collect` logs it and leaves the object out.
Anything in storage is untrusted input: manifests are read with a size cap
and parsed against a fixed schema before any other step.

Storage layout under the root URL::

    setup/fingerprint/<site>.<id>.bin, <site>.manifest.json   # kind "fingerprint"
    setup/plans/plans.<id>.bin, plans.manifest.json          # kind "plans"
    round_00000/global/global.<id>.bin, .manifest.json        # kind "global"
    round_00000/update/<site>.<id>.bin, <site>.manifest.json  # kind "update"
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from oarbench.train.aggregate import MAX_CASES

__all__ = [
    "COORDINATOR",
    "KINDS",
    "Header",
    "KeyRing",
    "Received",
    "RejectedObject",
    "Exchange",
    "generate_keys",
    "generate_party_key",
    "create_federation",
    "load_keyring",
    "tensors_to_bytes",
    "tensors_from_bytes",
    "object_slot",
]

log = logging.getLogger(__name__)

#: Name of the coordinator as a sender.
COORDINATOR = "coordinator"
#: Object kinds and who may send them.
KINDS: dict[str, str] = {
    "fingerprint": "site",
    "plans": COORDINATOR,
    "global": COORDINATOR,
    "update": "site",
}
_MANIFEST_VERSION = 2
_NONCE_BYTES = 12
_TAG_BYTES = 16
_KEY_BYTES = 32
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_NAME_MAX = 64
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FED_ID = re.compile(r"[0-9a-f]{32}")
#: Largest manifest read from storage (bytes); a signed manifest is well under 2 KiB.
MAX_MANIFEST_BYTES = 16 * 1024
#: Largest round number accepted.
MAX_ROUND = 1_000_000
#: Default cap on one object's plaintext (bytes); readers pass a tighter one where they know the model size.
DEFAULT_MAX_OBJECT_BYTES = 4 * 1024**3
#: Cap on fingerprints and plans (JSON summaries).
MAX_JSON_OBJECT_BYTES = 64 * 1024**2
_MANIFEST_KEYS = {"version", "header", "object", "ciphertext_sha256", "ciphertext_size", "signature"}


class RejectedObject(ValueError):
    """An object in storage failed a check; it must never be used."""


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not name or len(name) > _NAME_MAX or not set(name) <= _NAME_OK:
        raise ValueError(f"{what} {str(name)[:80]!r} must be 1-{_NAME_MAX} letters, digits, '_' or '-'")
    return name


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _short(value: Any, n: int = 60) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= n else text[:n] + "..."


# --------------------------------------------------------------------------- payloads


def tensors_to_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise named numpy arrays with safetensors (no pickle, no code)."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return save(arrays, metadata=dict(metadata) if metadata else None)


def tensors_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`tensors_to_bytes`."""
    from safetensors.numpy import load

    return dict(load(data))


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class KeyRing:
    """What one party holds.

    Attributes
    ----------
    federation_key:
        32-byte AES-256-GCM key shared by all parties of one federation.
    identity:
        This party's name (``"coordinator"`` or a site name).
    signing_key:
        This party's Ed25519 private key, raw 32 bytes (never leaves the party).
    trusted:
        Public keys (raw 32 bytes) of the parties whose objects this party
        accepts, by name (the coordinator holds the sites' keys; a site holds
        the coordinator's).
    federation_id:
        Random id (32 hex digits) made with the federation key; bound into
        every object so that objects of one federation never verify in another.
    """

    federation_key: bytes
    identity: str
    signing_key: bytes
    trusted: Mapping[str, bytes] = field(default_factory=dict)
    federation_id: str = "0" * 32

    def __post_init__(self) -> None:
        if len(self.federation_key) != _KEY_BYTES:
            raise ValueError(f"federation key must be {_KEY_BYTES} bytes, got {len(self.federation_key)}")
        _check_name(self.identity, "party name")
        if not _FED_ID.fullmatch(self.federation_id):
            raise ValueError(f"federation id must be 32 hex digits, got {self.federation_id[:40]!r}")

    def sign(self, message: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.signing_key).sign(message)

    def public_key(self) -> bytes:
        """This party's Ed25519 public key, raw 32 bytes."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return (
            Ed25519PrivateKey.from_private_bytes(self.signing_key)
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )

    def verify(self, sender: str, message: bytes, signature: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        raw = self.trusted.get(sender)
        if raw is None and sender == self.identity:
            raw = self.public_key()  # a party always trusts what it signed itself
        if raw is None:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


def _write_key_file(path: Path, text: str, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600 if private else 0o644)
        os.link(tmp, path)  # create-only: never overwrite an existing key
    except FileExistsError as exc:
        raise FileExistsError(f"{path}: key file exists already; refusing to overwrite it") from exc
    finally:
        os.unlink(tmp)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii") + "\n"


def _check_private_mode(path: Path) -> None:
    if os.name != "posix":
        return
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(
            f"{path}: private key file is readable or writable by group/others (mode {stat.S_IMODE(mode):04o}); "
            f"run 'chmod 600 {path}'"
        )


def _read_key_file(path: Path, n: int, *, private: bool = False) -> bytes:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: key file not found") from None
    if private:
        _check_private_mode(path)
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:
        raise ValueError(f"{path}: not a base64 key file ({exc})") from exc
    if len(data) != n:
        raise ValueError(f"{path}: key must be {n} bytes, got {len(data)}")
    return data


def generate_party_key(out: str | Path, name: str) -> dict[str, Path]:
    """Make one party's Ed25519 key pair in ``out``: ``<name>.ed25519`` (0600) and ``public/<name>.pub``.

    Each party runs this itself and hands out only ``public/<name>.pub``.
    Existing files are never overwritten.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out)
    _check_name(name, "party name")
    key = Ed25519PrivateKey.generate()
    raw_priv = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    raw_pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    paths = {name: out / f"{name}.ed25519", f"{name}.pub": out / "public" / f"{name}.pub"}
    _write_key_file(paths[f"{name}.pub"], _b64(raw_pub), private=False)
    _write_key_file(paths[name], _b64(raw_priv), private=True)
    return paths


def create_federation(out: str | Path) -> dict[str, Path]:
    """Make a federation's AES-256 key (``federation.key``, 0600) and random id (``federation.id``) in ``out``.

    The coordinator runs this once and gives both files to every site over a
    confidential channel. Existing files are never overwritten.
    """
    out = Path(out)
    paths = {"federation": out / "federation.key", "federation.id": out / "federation.id"}
    _write_key_file(paths["federation"], _b64(secrets.token_bytes(_KEY_BYTES)), private=True)
    _write_key_file(paths["federation.id"], secrets.token_hex(16) + "\n", private=False)
    return paths


def generate_keys(out: str | Path, sites: list[str]) -> dict[str, Path]:
    """All keys of a federation in one folder: for a federation simulated on one machine only.

    Writes ``federation.key`` and ``federation.id`` (:func:`create_federation`)
    and every party's key pair (:func:`generate_party_key`). Whoever holds this
    folder can sign as any party, so a real federation never uses it: there
    each party runs :func:`generate_party_key` itself.

    Returns
    -------
    dict
        File paths by role (``"federation"``, ``"federation.id"``, ``"<party>"``, ``"<party>.pub"``).
    """
    out = Path(out)
    names = [COORDINATOR] + [_check_name(s, "site name") for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be distinct and not {COORDINATOR!r}: {sites}")
    paths = create_federation(out)
    for name in names:
        paths.update(generate_party_key(out, name))
    return paths


def load_keyring(keys: str | Path, identity: str, *, trust: list[str] | None = None) -> KeyRing:
    """Load a party's :class:`KeyRing` from its key folder.

    Parameters
    ----------
    keys:
        Folder with ``federation.key``, ``federation.id``, ``<identity>.ed25519``
        and ``public/`` (the public keys of the parties to trust).
    identity:
        ``"coordinator"`` or the site name.
    trust:
        Names whose public keys to trust. Default: for the coordinator every
        ``public/*.pub`` except its own; for a site only the coordinator.

    Raises
    ------
    PermissionError
        The private key or the federation key is readable by group or others.
    """
    keys = Path(keys)
    _check_name(identity, "party name")
    fed = _read_key_file(keys / "federation.key", _KEY_BYTES, private=True)
    id_path = keys / "federation.id"
    try:
        fed_id = id_path.read_text().strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"{id_path}: federation id file not found (made with the federation key)") from None
    if not _FED_ID.fullmatch(fed_id):
        raise ValueError(f"{id_path}: federation id must be 32 hex digits")
    priv = _read_key_file(keys / f"{identity}.ed25519", 32, private=True)
    pub_dir = keys / "public"
    if trust is None:
        if identity == COORDINATOR:
            trust = sorted(p.name[: -len(".pub")] for p in pub_dir.glob("*.pub") if p.stem != COORDINATOR)
        else:
            trust = [COORDINATOR]
    trusted = {_check_name(name, "party name"): _read_key_file(pub_dir / f"{name}.pub", 32) for name in trust}
    return KeyRing(federation_key=fed, identity=identity, signing_key=priv, trusted=trusted, federation_id=fed_id)


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class Header:
    """What an object claims to be; bound into the ciphertext and the signature.

    Attributes
    ----------
    federation: name of the federation (same for all parties).
    round: training round the object belongs to (-1 for setup objects).
    sender: ``"coordinator"`` or the site name.
    kind: one of :data:`KINDS`.
    name: slot name inside the round/kind folder (the sender's name for site
        objects, ``global`` or ``plans`` for the coordinator's).
    size: plaintext size in bytes.
    sha256: sha256 (hex) of the plaintext.
    parent: sha256 of the plaintext of the global model this object was
        trained from ("" where not applicable).
    num_cases: number of training cases behind the object (0 where not applicable).
    federation_id: the federation's random id (from ``federation.id``).
    """

    federation: str
    round: int
    sender: str
    kind: str
    name: str
    size: int
    sha256: str
    parent: str = ""
    num_cases: int = 0
    federation_id: str = "0" * 32

    def as_dict(self) -> dict[str, Any]:
        return {
            "federation": self.federation,
            "federation_id": self.federation_id,
            "round": int(self.round),
            "sender": self.sender,
            "kind": self.kind,
            "name": self.name,
            "size": int(self.size),
            "sha256": self.sha256,
            "parent": self.parent,
            "num_cases": int(self.num_cases),
        }

    @classmethod
    def from_dict(cls, d: Any) -> "Header":
        """Parse a header from untrusted JSON: exact fields, exact types, bounded values."""
        fields = ("federation", "federation_id", "round", "sender", "kind", "name", "size", "sha256", "parent",
                  "num_cases")
        if not isinstance(d, dict):
            raise RejectedObject(f"header is {type(d).__name__}, not an object")
        if set(d) != set(fields):
            extra = sorted(str(k)[:30] for k in set(d) ^ set(fields))[:6]
            raise RejectedObject(f"header fields differ from the schema: {extra}")
        for k in ("federation", "federation_id", "sender", "kind", "name", "sha256", "parent"):
            if not isinstance(d[k], str) or len(d[k]) > 128:
                raise RejectedObject(f"header field {k!r} is not a short string: {_short(d[k])}")
        for k in ("round", "size", "num_cases"):
            if type(d[k]) is not int:
                raise RejectedObject(f"header field {k!r} is not an integer: {_short(d[k])}")
        if not -1 <= d["round"] <= MAX_ROUND:
            raise RejectedObject(f"header round {_short(d['round'])} outside -1..{MAX_ROUND}")
        if not 0 <= d["size"] <= 2**40:
            raise RejectedObject(f"header size {_short(d['size'])} out of range")
        if not 0 <= d["num_cases"] <= MAX_CASES:
            raise RejectedObject(f"header case count {_short(d['num_cases'])} outside 0..{MAX_CASES}")
        if d["kind"] not in KINDS:
            raise RejectedObject(f"unknown object kind {_short(d['kind'])}")
        if not _HEX64.fullmatch(d["sha256"]) or not (d["parent"] == "" or _HEX64.fullmatch(d["parent"])):
            raise RejectedObject("header sha256/parent are not sha256 hex digests")
        if not _FED_ID.fullmatch(d["federation_id"]):
            raise RejectedObject("header federation_id is not 32 hex digits")
        for k in ("sender", "name", "federation"):
            try:
                _check_name(d[k], k)
            except ValueError as exc:
                raise RejectedObject(f"header: {exc}") from None
        return cls(**{k: d[k] for k in fields})


@dataclass(frozen=True)
class Received:
    """An object that passed every check."""

    header: Header
    payload: bytes
    manifest_path: str


def object_slot(kind: str, round_: int, name: str) -> str:
    """Path (relative to the storage root) of a slot, without extension."""
    if kind not in KINDS:
        raise ValueError(f"unknown object kind {kind!r}; expected one of {sorted(KINDS)}")
    _check_name(name, "object name")
    if kind in ("fingerprint", "plans"):
        return f"setup/{kind}/{name}"
    if not 0 <= round_ <= MAX_ROUND:
        raise ValueError(f"round must be in 0..{MAX_ROUND} for kind {kind!r}, got {round_}")
    return f"round_{round_:05d}/{kind}/{name}"


def _slot_owner(kind: str, name: str) -> str:
    """Who may fill slot ``name`` of ``kind``: a site only its own slot; the coordinator ``global``/``plans``."""
    return name if KINDS[kind] == "site" else COORDINATOR


def _coordinator_slot(kind: str) -> str:
    """The one slot name of a coordinator kind (``plans``, ``global``)."""
    return kind


class Exchange:
    """One party's view of the shared storage.

    Parameters
    ----------
    url:
        fsspec URL of the storage root (a plain path means a local folder).
    keyring:
        This party's keys.
    federation:
        Federation name, bound into every object (with the key ring's federation id).
    storage_options:
        Passed to fsspec (e.g. ``{"key": ..., "secret": ..., "client_kwargs":
        {"endpoint_url": ...}}`` for s3fs).
    max_object_bytes:
        Largest plaintext accepted for weights (readers that know the model
        size pass a tighter cap to :meth:`collect`/:meth:`get`).
    cache_bytes:
        Accepted objects are kept by manifest hash up to this many payload
        bytes, so a poll does not download and decrypt them again.
    """

    def __init__(
        self,
        url: str,
        keyring: KeyRing,
        *,
        federation: str = "oarbench",
        storage_options: Mapping[str, Any] | None = None,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
        cache_bytes: int = 2 * 1024**3,
    ) -> None:
        import fsspec.core
        from fsspec.implementations.local import LocalFileSystem

        self.url = url
        self.keyring = keyring
        self.federation = _check_name(federation, "federation name")
        self.fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        self.root = root.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)
        self._logged: set[str] = set()
        self.max_object_bytes = int(max_object_bytes)
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[str, tuple[Header, bytes]] = OrderedDict()
        self._cached_bytes = 0
        self._bad: dict[str, str] = {}  # manifest sha256 -> reason, for failures of the stored object itself
        #: Ciphertext downloads done (for tests and diagnostics).
        self.downloads = 0
        if self._local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def _log_once(self, level: int, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.log(level, "rejected: %s", reason)

    # -- low level ---------------------------------------------------------------------------

    def _full(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _create(self, rel: str, data: bytes) -> None:
        """Write ``data`` at ``rel`` atomically and create-only (FileExistsError if present)."""
        path = self._full(rel)
        if self._local:
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".upload-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.link(tmp, path)  # atomic, fails if the name exists
            finally:
                os.unlink(tmp)
            return
        try:
            self.fs.pipe_file(path, data, mode="create")
        except TypeError:  # back-end without create-only writes: check-then-write (racy)
            if self.fs.exists(path):
                raise FileExistsError(path) from None
            self.fs.pipe_file(path, data)

    def _read(self, rel: str, limit: int | None = None) -> bytes:
        """Read ``rel``; with ``limit``, read at most ``limit + 1`` bytes (callers reject longer)."""
        if limit is None:
            return self.fs.cat_file(self._full(rel))
        return self.fs.cat_file(self._full(rel), start=0, end=limit + 1)

    def _exists(self, rel: str) -> bool:
        return self.fs.exists(self._full(rel))

    def list_objects(self) -> list[tuple[str, int]]:
        """Every file under the storage root as ``(relative path, size in bytes)``, sorted."""
        out = []
        prefix = self.root + "/"
        for path, info in self.fs.find(self.root, detail=True).items():
            rel = path[len(prefix):] if path.startswith(prefix) else path
            out.append((rel, int(info.get("size") or 0)))
        return sorted(out)

    # -- writing -----------------------------------------------------------------------------

    def seal(self, header: Header, payload: bytes, object_rel: str | None = None) -> tuple[bytes, dict[str, Any]]:
        """Encrypt ``payload`` and build the signed manifest (without writing anything).

        ``object_rel`` is where the ciphertext will be stored (default: a new
        unique name in the header's slot).
        """
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if header.sender != self.keyring.identity:
            raise ValueError(f"header sender {header.sender!r} is not this party ({self.keyring.identity!r})")
        if object_rel is None:
            object_rel = f"{object_slot(header.kind, header.round, header.name)}.{secrets.token_hex(16)}.bin"
        aad = _canonical(header.as_dict())
        nonce = secrets.token_bytes(_NONCE_BYTES)
        ciphertext = nonce + AESGCM(self.keyring.federation_key).encrypt(nonce, payload, aad)
        body = {
            "version": _MANIFEST_VERSION,
            "header": header.as_dict(),
            "object": object_rel,
            "ciphertext_sha256": _sha256(ciphertext),
            "ciphertext_size": len(ciphertext),
        }
        signature = self.keyring.sign(_canonical(body))
        manifest = dict(body, signature=base64.b64encode(signature).decode("ascii"))
        return ciphertext, manifest

    def put(
        self,
        kind: str,
        round_: int,
        payload: bytes,
        *,
        name: str | None = None,
        parent: str = "",
        num_cases: int = 0,
    ) -> Header:
        """Encrypt, sign and upload one object; the manifest is committed last.

        The ciphertext goes to a name unique to this write; the create-only
        manifest decides which of several writers of one slot wins (the first).
        A writer that loses removes its own ciphertext, never another's.

        Raises
        ------
        FileExistsError
            The slot already holds a committed object (duplicate upload).
        """
        me = self.keyring.identity
        expected_sender = KINDS.get(kind)
        if expected_sender is None:
            raise ValueError(f"unknown object kind {kind!r}")
        if (expected_sender == COORDINATOR) != (me == COORDINATOR):
            raise ValueError(f"{me!r} may not send objects of kind {kind!r}")
        name = name or (kind if me == COORDINATOR else me)
        if _slot_owner(kind, name) != me or (me == COORDINATOR and name != _coordinator_slot(kind)):
            raise ValueError(f"{me!r} may not write slot {name!r} of kind {kind!r} (each party fills only its own)")
        if kind in ("fingerprint", "plans"):
            round_ = -1
        header = Header(
            federation=self.federation,
            round=round_,
            sender=me,
            kind=kind,
            name=name,
            size=len(payload),
            sha256=_sha256(payload),
            parent=parent,
            num_cases=num_cases,
            federation_id=self.keyring.federation_id,
        )
        slot = object_slot(kind, round_, name)
        manifest_rel = slot + ".manifest.json"
        duplicate = f"{self.url}/{slot}: duplicate upload refused, the slot is already committed"
        if self._exists(manifest_rel) and not self._clear_foreign_manifest(manifest_rel):
            raise FileExistsError(duplicate)
        object_rel = f"{slot}.{secrets.token_hex(16)}.bin"
        ciphertext, manifest = self.seal(header, payload, object_rel)
        self._create(object_rel, ciphertext)
        data = json.dumps(manifest, indent=1).encode("utf-8")
        for attempt in (0, 1):
            try:
                self._create(manifest_rel, data)
                return header
            except FileExistsError as exc:
                if attempt == 0 and self._clear_foreign_manifest(manifest_rel):
                    continue
                try:  # another writer committed first: remove our own, never-referenced ciphertext
                    self.fs.rm_file(self._full(object_rel))
                except OSError as rm_exc:  # pragma: no cover - storage refused the delete
                    log.warning("%s/%s: could not remove unused object: %s", self.url, object_rel, rm_exc)
                raise FileExistsError(duplicate) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _clear_foreign_manifest(self, manifest_rel: str) -> bool:
        """Remove a manifest in one of this party's slots that this party did not sign; True if removed.

        Only this party can sign manifests for its own slots, so a manifest there that
        is not a well-formed manifest signed by this party was planted (or is garbage)
        and no reader would ever accept it. A manifest this party signed (another of
        its processes committed first) is never touched.
        """
        where = f"{self.url}/{manifest_rel}"
        try:
            raw = self._read(manifest_rel, limit=MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # cannot read it, so cannot tell: leave it and report the slot as taken
        try:
            header, manifest, signature = self._parse_manifest(raw, where)
            mine = header.sender == self.keyring.identity and self.keyring.verify(
                self.keyring.identity, _canonical(manifest), signature)
        except RejectedObject:
            mine = False
        if mine:
            return False
        log.warning("%s: removing a manifest this party did not sign from its own slot", where)
        try:
            self.fs.rm_file(self._full(manifest_rel))
        except FileNotFoundError:
            pass
        return True

    # -- reading -----------------------------------------------------------------------------

    def _parse_manifest(self, raw: bytes, where: str) -> tuple[Header, dict[str, Any], bytes]:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise RejectedObject(f"{where}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise RejectedObject(f"{where}: manifest is not valid JSON ({type(exc).__name__})") from None
        if not isinstance(manifest, dict):
            raise RejectedObject(f"{where}: manifest is {type(manifest).__name__}, not a JSON object")
        if "signature" not in manifest:
            raise RejectedObject(f"{where}: manifest is unsigned")
        if set(manifest) != _MANIFEST_KEYS:
            extra = sorted(str(k)[:30] for k in set(manifest) ^ _MANIFEST_KEYS)[:6]
            raise RejectedObject(f"{where}: manifest fields differ from the schema: {extra}")
        if manifest["version"] != _MANIFEST_VERSION or type(manifest["version"]) is not int:
            raise RejectedObject(f"{where}: manifest version {_short(manifest['version'])}, "
                                 f"expected {_MANIFEST_VERSION}")
        sig_b64 = manifest.pop("signature")
        if not isinstance(sig_b64, str) or len(sig_b64) > 200:
            raise RejectedObject(f"{where}: signature is not a short string")
        try:
            signature = base64.b64decode(sig_b64, validate=True)
        except ValueError:
            raise RejectedObject(f"{where}: signature is not base64") from None
        if not isinstance(manifest["object"], str) or len(manifest["object"]) > 512:
            raise RejectedObject(f"{where}: object path is not a short string")
        if not isinstance(manifest["ciphertext_sha256"], str) or not _HEX64.fullmatch(manifest["ciphertext_sha256"]):
            raise RejectedObject(f"{where}: ciphertext_sha256 is not a sha256 hex digest")
        if type(manifest["ciphertext_size"]) is not int:
            raise RejectedObject(f"{where}: ciphertext_size is not an integer")
        try:
            header = Header.from_dict(manifest["header"])
        except RejectedObject as exc:
            raise RejectedObject(f"{where}: {exc}") from None
        return header, manifest, signature

    def open_manifest(
        self,
        manifest_rel: str,
        *,
        kind: str,
        round_: int,
        parent: str | None = None,
        max_size: int | None = None,
    ) -> Received:
        """Read, verify and decrypt one object; raise :class:`RejectedObject` on any failure.

        Checks, in order: manifest at most :data:`MAX_MANIFEST_BYTES`, valid
        JSON of the fixed schema with typed, bounded fields; signed by a trusted
        sender; sender allowed for the kind and owner of the slot; federation
        name and id, kind, round (replay) and slot match what the reader
        expects; plaintext size within ``max_size``; ciphertext at the unique
        name the manifest gives, of the signed size (truncation) and sha256
        (tampering); AES-GCM decryption with the header as associated data;
        plaintext size and sha256; parent model hash where ``parent`` is given.

        Objects that passed are cached by manifest hash: a second read of the
        same manifest does not download the ciphertext again.
        """
        where = f"{self.url}/{manifest_rel}"
        try:
            raw = self._read(manifest_rel, limit=MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise RejectedObject(f"{where}: manifest missing") from None
        except OSError as exc:  # a planted folder or unreadable file in the manifest's place
            raise RejectedObject(f"{where}: manifest unreadable ({type(exc).__name__})") from None
        header, manifest, signature = self._parse_manifest(raw, where)
        if header.sender not in self.keyring.trusted and header.sender != self.keyring.identity:
            raise RejectedObject(f"{where}: unknown sender {header.sender!r} (no trusted public key)")
        if not self.keyring.verify(header.sender, _canonical(manifest), signature):
            raise RejectedObject(f"{where}: bad signature for sender {header.sender!r} (manifest altered or forged)")
        if header.kind != kind:
            raise RejectedObject(f"{where}: object kind {header.kind!r}, expected {kind!r}")
        if (KINDS[kind] == COORDINATOR) != (header.sender == COORDINATOR):
            raise RejectedObject(f"{where}: sender {header.sender!r} may not send kind {kind!r}")
        want_name = header.sender if KINDS[kind] == "site" else _coordinator_slot(kind)
        if header.name != want_name:
            raise RejectedObject(f"{where}: slot {header.name!r} of kind {kind!r} does not belong to sender "
                                 f"{header.sender!r} (slot hijack)")
        if header.federation != self.federation:
            raise RejectedObject(f"{where}: federation {header.federation!r}, expected {self.federation!r}")
        if header.federation_id != self.keyring.federation_id:
            raise RejectedObject(f"{where}: object belongs to another federation (id {header.federation_id[:8]}..., "
                                 f"expected {self.keyring.federation_id[:8]}...)")
        want_round = -1 if kind in ("fingerprint", "plans") else round_
        if header.round != want_round:
            raise RejectedObject(f"{where}: replay: object is for round {header.round}, expected round {want_round}")
        slot = object_slot(kind, header.round, header.name)
        if manifest_rel != slot + ".manifest.json":
            raise RejectedObject(f"{where}: manifest names slot {slot!r}, not the one it was found in")
        obj = manifest["object"]
        if not re.fullmatch(re.escape(slot) + r"\.[0-9a-f]{32}\.bin", obj):
            raise RejectedObject(f"{where}: manifest points at {_short(obj)}, not a unique object of slot {slot!r}")
        cap = max_size if max_size is not None else (
            MAX_JSON_OBJECT_BYTES if kind in ("fingerprint", "plans") else self.max_object_bytes)
        if header.size > cap:
            raise RejectedObject(f"{where}: object of {header.size} bytes exceeds the cap of {cap} bytes")
        if manifest["ciphertext_size"] != header.size + _NONCE_BYTES + _TAG_BYTES:
            raise RejectedObject(f"{where}: ciphertext size {manifest['ciphertext_size']} does not match the "
                                 f"plaintext size {header.size}")
        if parent is not None and header.parent != parent:
            raise RejectedObject(
                f"{where}: trained from global model {header.parent[:12]}..., expected {parent[:12]}..."
            )
        key = _sha256(raw)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return Received(header=hit[0], payload=hit[1], manifest_path=manifest_rel)
        if key in self._bad:
            raise RejectedObject(self._bad[key])
        payload = self._download(where, obj, manifest, header, key)
        self._remember(key, header, payload)
        return Received(header=header, payload=payload, manifest_path=manifest_rel)

    def _download(self, where: str, obj: str, manifest: Mapping[str, Any], header: Header, key: str) -> bytes:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        def bad(reason: str) -> RejectedObject:
            self._bad[key] = reason
            return RejectedObject(reason)

        want = manifest["ciphertext_size"]
        try:
            stored = int(self.fs.size(self._full(obj)) or 0)
            if stored != want:
                raise bad(f"{where}: truncated or padded object: {stored} bytes, manifest says {want}")
            ciphertext = self._read(obj, limit=want)
        except FileNotFoundError:
            raise RejectedObject(f"{where}: object {obj} is missing") from None
        except OSError as exc:  # a folder or unreadable file in the object's place
            raise RejectedObject(f"{where}: object {obj} unreadable ({type(exc).__name__})") from None
        self.downloads += 1
        if len(ciphertext) != want:
            raise bad(f"{where}: truncated or padded object: {len(ciphertext)} bytes, manifest says {want}")
        if _sha256(ciphertext) != manifest["ciphertext_sha256"]:
            raise bad(f"{where}: ciphertext sha256 mismatch (object tampered)")
        aad = _canonical(header.as_dict())
        try:
            payload = AESGCM(self.keyring.federation_key).decrypt(
                ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], aad
            )
        except InvalidTag:
            raise bad(f"{where}: decryption failed (wrong federation key, or object/header altered)") from None
        if len(payload) != header.size or _sha256(payload) != header.sha256:
            raise bad(f"{where}: plaintext size/sha256 differ from the signed header")
        return payload

    def _remember(self, key: str, header: Header, payload: bytes) -> None:
        if len(payload) > self.cache_bytes:
            return
        self._cache[key] = (header, payload)
        self._cached_bytes += len(payload)
        while self._cached_bytes > self.cache_bytes:
            _, (_, old) = self._cache.popitem(last=False)
            self._cached_bytes -= len(old)

    def get(self, kind: str, round_: int, name: str, *, parent: str | None = None,
            max_size: int | None = None) -> Received | None:
        """The object in one slot, or ``None`` if its manifest is not (yet) there.

        Raises :class:`RejectedObject` if it is there but fails a check.
        """
        slot = object_slot(kind, -1 if kind in ("fingerprint", "plans") else round_, name)
        if not self._exists(slot + ".manifest.json"):
            return None
        return self.open_manifest(slot + ".manifest.json", kind=kind, round_=round_, parent=parent,
                                  max_size=max_size)

    def collect(
        self, kind: str, round_: int, *, parent: str | None = None, max_size: int | None = None
    ) -> tuple[dict[str, Received], dict[str, str]]:
        """All valid objects of one kind in one round, keyed by slot name.

        Returns
        -------
        accepted, rejected
            ``accepted`` maps slot name to :class:`Received`; ``rejected`` maps
            the path of each refused object to the reason (logged once at
            WARNING). A ciphertext in a slot without manifest is reported
            under its ``.bin`` path (logged at INFO): it may be an upload in
            progress and is never used.
        """
        folder = object_slot(kind, -1 if kind in ("fingerprint", "plans") else round_, "x").rsplit("/", 1)[0]
        full = self._full(folder)
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(full, detail=False)]
        except FileNotFoundError:
            names = []
        accepted: dict[str, Received] = {}
        rejected: dict[str, str] = {}
        manifests = {n[: -len(".manifest.json")] for n in names if n.endswith(".manifest.json")}
        for n in sorted(names):
            if n.endswith(".bin") and n.split(".", 1)[0] not in manifests:
                reason = f"{self.url}/{folder}/{n}: manifest missing (upload incomplete or manifest removed); ignored"
                rejected[f"{folder}/{n}"] = reason
                self._log_once(logging.INFO, reason)
        for stem in sorted(manifests):
            rel = f"{folder}/{stem}.manifest.json"
            try:
                got = self.open_manifest(rel, kind=kind, round_=round_, parent=parent, max_size=max_size)
            except RejectedObject as exc:
                rejected[rel] = str(exc)
                self._log_once(logging.WARNING, str(exc))
                continue
            accepted[got.header.name] = got
        return accepted, rejected
