"""Secure exchange of federated-learning objects through shared storage.

The federation has no server that sites connect to: every party (the
coordinator and each site) only reads and writes objects in one shared
storage location, given as an fsspec URL (a local folder ``file:///...`` by
default; ``s3://bucket/prefix``, ``gs://``, ``az://``, ``webdav`` when the
matching fsspec back-end is installed). Hospitals therefore need outbound
connections only.

Keys (:mod:`oarbench.train.keys`): every party makes its own Ed25519
(signing) and X25519 (encryption) key pairs and hands out only the public
halves; the coordinator signs a roster of every party's public keys and the
federation's random id. There is no shared secret. :func:`generate_keys`
makes every party's folder under one folder, for a federation simulated on
one machine only.

Every object is

* serialised in a safe format: tensors as safetensors (never pickles), other
  payloads as UTF-8 JSON;
* encrypted with AES-256-GCM under a random content key and a 12-byte random
  nonce; the content key is encrypted to each recipient (ephemeral X25519,
  HKDF-SHA256, AES-256-GCM): a site's objects to the coordinator and the site,
  the coordinator's to every party on the roster. The object *header*
  (federation id and name, round, sender, kind, slot name, plaintext size and
  sha256, parent model hash, case count, recipients) is the GCM associated
  data, so a ciphertext moved to another round, sender, kind or federation
  fails to decrypt;
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
A party that finds in one of its own slots anything that does not verify as
an object of that slot replaces it with its next put; only regular files
are ever opened.
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
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from oarbench.train.aggregate import MAX_CASES
from oarbench.train.audit import AuditLog
from oarbench.train.keys import COORDINATOR, MAX_PARTIES, generate_keys, generate_party_key, load_party

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
    "load_keyring",
    "tensors_to_bytes",
    "tensors_from_bytes",
    "object_slot",
]

log = logging.getLogger(__name__)

#: Object kinds and who may send them.
KINDS: dict[str, str] = {
    "fingerprint": "site",
    "plans": COORDINATOR,
    "global": COORDINATOR,
    "update": "site",
}
_MANIFEST_VERSION = 3
_NONCE_BYTES = 12
_TAG_BYTES = 16
_WRAPPED_BYTES = 32 + _TAG_BYTES  # a content key encrypted to one recipient
_HKDF_INFO = b"oarbench-fl-v3 content key"
_KEY_BYTES = 32
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_NAME_MAX = 64
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FED_ID = re.compile(r"[0-9a-f]{32}")
#: Largest manifest read from storage (bytes); a signed manifest of 100 recipients is under 10 KiB.
MAX_MANIFEST_BYTES = 16 * 1024
#: Largest round number accepted.
MAX_ROUND = 1_000_000
#: Default cap on one object's plaintext (bytes); readers pass a tighter one where they know the model size.
DEFAULT_MAX_OBJECT_BYTES = 4 * 1024**3
#: Cap on fingerprints and plans (JSON summaries).
MAX_JSON_OBJECT_BYTES = 64 * 1024**2
_MANIFEST_KEYS = {"version", "header", "object", "ciphertext_sha256", "ciphertext_size", "signature"}


class RejectedObject(ValueError):
    """An object in storage failed a check; it must never be used.

    ``transient``: the object could not be read in time (it may be fine); its
    owner does not replace it for that.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


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


def _wrap_key(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    """Key that encrypts an object's content key to one recipient: HKDF-SHA256 over the X25519 secret."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient_pub, info=_HKDF_INFO).derive(shared)


def _ciphertext_size(header: "Header") -> int:
    """Ephemeral public key, one wrapped content key per recipient, nonce, ciphertext and tag."""
    return 32 + _WRAPPED_BYTES * len(header.recipients) + _NONCE_BYTES + header.size + _TAG_BYTES


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
    """What one party holds (:func:`load_keyring` reads it from the party's key folder).

    Attributes
    ----------
    identity:
        This party's name (``"coordinator"`` or a site name).
    signing_key:
        This party's Ed25519 private key, raw 32 bytes (never leaves the party).
    decryption_key:
        This party's X25519 private key, raw 32 bytes (never leaves the party):
        objects encrypted to this party are opened with it.
    trusted:
        Ed25519 public keys (raw 32 bytes) of the parties whose objects this
        party accepts, by name (the coordinator holds the sites'; a site the
        coordinator's).
    recipients:
        X25519 public keys of the parties this party encrypts to, by name (the
        coordinator: every party on the roster; a site: the coordinator).
    federation_id:
        Random id (32 hex digits) from the roster; bound into every object so
        that objects of one federation never verify in another.
    """

    identity: str
    signing_key: bytes
    decryption_key: bytes = b"\0" * _KEY_BYTES
    trusted: Mapping[str, bytes] = field(default_factory=dict)
    recipients: Mapping[str, bytes] = field(default_factory=dict)
    federation_id: str = "0" * 32

    def __post_init__(self) -> None:
        _check_name(self.identity, "party name")
        if len(self.signing_key) != _KEY_BYTES or len(self.decryption_key) != _KEY_BYTES:
            raise ValueError(f"private keys must be {_KEY_BYTES} bytes")
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

    def encryption_public_key(self) -> bytes:
        """This party's X25519 public key, raw 32 bytes."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        return (
            X25519PrivateKey.from_private_bytes(self.decryption_key)
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


def load_keyring(keys: str | Path, identity: str) -> KeyRing:
    """Load a party's :class:`KeyRing` from its key folder (:mod:`oarbench.train.keys`).

    ``keys`` is the party's own folder (its private keys, ``roster.json``,
    and for a site ``public/coordinator.pub``), or a folder made by
    :func:`generate_keys` holding one such folder per party. The coordinator
    trusts and encrypts to every party on the roster; a site trusts only the
    coordinator and encrypts to the coordinator and itself.

    Raises
    ------
    PermissionError
        A private key is readable by group or others.
    ValueError
        The roster is not signed by the coordinator's pinned key, or does not
        list this party's current keys (revoked, or rotated and not signed again).
    """
    party = load_party(keys, identity)
    roster = party.roster
    if identity == COORDINATOR:
        names = list(roster.parties)
    else:
        names = [COORDINATOR, identity]
    trusted = {n: roster.parties[n][0] for n in names if n != identity}
    recipients = {n: roster.parties[n][1] for n in names}
    return KeyRing(identity=identity, signing_key=party.ed_priv, decryption_key=party.x_priv, trusted=trusted,
                   recipients=recipients, federation_id=roster.federation_id)


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
    recipients: tuple[str, ...] = ()

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
            "recipients": list(self.recipients),
        }

    @classmethod
    def from_dict(cls, d: Any) -> "Header":
        """Parse a header from untrusted JSON: exact fields, exact types, bounded values."""
        fields = ("federation", "federation_id", "round", "sender", "kind", "name", "size", "sha256", "parent",
                  "num_cases", "recipients")
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
        rec = d["recipients"]
        if not isinstance(rec, list) or not 1 <= len(rec) <= MAX_PARTIES or len(set(map(str, rec))) != len(rec):
            raise RejectedObject(f"header recipients must be a list of 1..{MAX_PARTIES} distinct names")
        for name in rec:
            try:
                _check_name(name, "recipient")
            except ValueError as exc:
                raise RejectedObject(f"header: {exc}") from None
        return cls(**dict({k: d[k] for k in fields}, recipients=tuple(rec)))


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
    audit:
        The party's hash-chained audit log (:class:`oarbench.train.audit.AuditLog`).
    read_timeout_s:
        A read of one object that has not finished after this many seconds is
        given up (the object counts as unreadable, the party goes on waiting
        within its own timeout); None: no limit.
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
        audit: AuditLog | None = None,
        read_timeout_s: float | None = 300.0,
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
        #: Where this party records what it read, wrote, accepted and refused (None: nowhere).
        self.audit = audit
        self._audited: set[str] = set()
        self.read_timeout_s = read_timeout_s
        if self._local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def recipients_for(self, kind: str) -> tuple[str, ...]:
        """Who can decrypt an object of ``kind`` this party writes.

        Coordinator objects (plans, global models): every party on the roster.
        Site objects (fingerprint, update): the coordinator and the site itself.
        """
        me = self.keyring.identity
        if me == COORDINATOR:
            return tuple(sorted(set(self.keyring.recipients) | {me}))
        return tuple(sorted({COORDINATOR, me}))

    def _audit(self, action: str, rel: str, round_: int, *, digest: str = "", reason: str = "",
               sender: str = "") -> None:
        if self.audit is not None:
            self.audit.append(action, object=rel, round=round_, digest=digest, reason=reason, sender=sender)

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
        """:meth:`_read_now` in a helper thread, given up after ``read_timeout_s`` (a hung read never blocks)."""
        if self.read_timeout_s is None:
            return self._read_now(rel, limit)
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["data"] = self._read_now(rel, limit)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc

        t = threading.Thread(target=run, name=f"read {rel[-40:]}", daemon=True)
        t.start()
        t.join(self.read_timeout_s)
        if t.is_alive():
            raise TimeoutError(f"{self.url}/{rel}: read did not finish within {self.read_timeout_s:g} s")
        if "error" in box:
            raise box["error"]
        return box["data"]

    def _read_now(self, rel: str, limit: int | None = None) -> bytes:
        """Read ``rel`` if it is a regular file; with ``limit``, at most ``limit + 1`` bytes (callers reject longer).

        A FIFO, device, socket, folder or link planted in storage is never opened
        (it could block a reader forever): local files are checked with
        ``os.fstat`` on a descriptor opened non-blocking and without following
        links; other back-ends by the type fsspec reports.
        """
        path = self._full(rel)
        if self._local:
            flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{path} is not a regular file")
            fd = os.open(path, flags)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between lstat and open
                    raise OSError(f"{path} is not a regular file")
                with os.fdopen(fd, "rb", closefd=False) as fh:
                    return fh.read() if limit is None else fh.read(limit + 1)
            finally:
                os.close(fd)
        info = self.fs.info(path)
        if info.get("type") != "file":
            raise OSError(f"{path} is not a file ({info.get('type')})")
        if limit is None:
            return self.fs.cat_file(path)
        return self.fs.cat_file(path, start=0, end=limit + 1)

    def _remove(self, rel: str) -> None:
        """Remove whatever is at ``rel`` (a file, a planted folder, FIFO or link)."""
        path = self._full(rel)
        try:
            if self._local:
                folder = os.path.isdir(path) and not os.path.islink(path)
            else:
                folder = self.fs.info(path).get("type") == "directory"
            if folder:
                self.fs.rm(path, recursive=True)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass

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
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if header.sender != self.keyring.identity:
            raise ValueError(f"header sender {header.sender!r} is not this party ({self.keyring.identity!r})")
        if object_rel is None:
            object_rel = f"{object_slot(header.kind, header.round, header.name)}.{secrets.token_hex(16)}.bin"
        if not header.recipients:
            header = replace(header, recipients=self.recipients_for(header.kind))
        missing = [r for r in header.recipients if r not in self.keyring.recipients]
        if missing:
            raise ValueError(f"no public encryption key for recipient(s) {missing} on this party's roster")
        aad = _canonical(header.as_dict())
        # one random content key per object, encrypted to each recipient with X25519 + HKDF-SHA256 + AES-GCM
        content_key = AESGCM.generate_key(bit_length=256)
        ephemeral = X25519PrivateKey.generate()
        eph_pub = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        parts = [eph_pub]
        for name in header.recipients:
            pub = self.keyring.recipients[name]
            kek = _wrap_key(ephemeral.exchange(X25519PublicKey.from_public_bytes(pub)), eph_pub, pub)
            parts.append(AESGCM(kek).encrypt(b"\0" * _NONCE_BYTES, content_key, aad))
        nonce = secrets.token_bytes(_NONCE_BYTES)
        ciphertext = b"".join(parts) + nonce + AESGCM(content_key).encrypt(nonce, payload, aad)
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
            recipients=self.recipients_for(kind),
        )
        slot = object_slot(kind, round_, name)
        manifest_rel = slot + ".manifest.json"
        duplicate = f"{self.url}/{slot}: duplicate upload refused, the slot is already committed"
        if self._exists(manifest_rel) and not self._clear_bad_manifest(kind, round_, manifest_rel, parent):
            raise FileExistsError(duplicate)
        object_rel = f"{slot}.{secrets.token_hex(16)}.bin"
        ciphertext, manifest = self.seal(header, payload, object_rel)
        self._create(object_rel, ciphertext)
        data = json.dumps(manifest, indent=1).encode("utf-8")
        for attempt in (0, 1):
            try:
                self._create(manifest_rel, data)
                self._audit("wrote", manifest_rel, round_, digest=header.sha256, sender=me)
                return header
            except FileExistsError as exc:
                if attempt == 0 and self._clear_bad_manifest(kind, round_, manifest_rel, parent):
                    continue
                try:  # another writer committed first: remove our own, never-referenced ciphertext
                    self.fs.rm_file(self._full(object_rel))
                except OSError as rm_exc:  # pragma: no cover - storage refused the delete
                    log.warning("%s/%s: could not remove unused object: %s", self.url, object_rel, rm_exc)
                raise FileExistsError(duplicate) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _clear_bad_manifest(self, kind: str, round_: int, manifest_rel: str, parent: str = "") -> bool:
        """Remove what sits in one of this party's slots unless it is a valid object of that slot; True if removed.

        Only this party can sign objects for its own slots, so anything there
        that fails verification for exactly this slot (planted, a copy of one of
        its own manifests from another round, a manifest whose ciphertext is
        missing or damaged, a folder or FIFO) is useless to every reader: the
        owner replaces it. A valid object of the slot (another process of this
        party committed first) is never touched.
        """
        where = f"{self.url}/{manifest_rel}"
        if not self._exists(manifest_rel):
            return True
        try:
            self.open_manifest(manifest_rel, kind=kind, round_=round_, parent=parent or None, fresh=True)
            return False
        except RejectedObject as exc:
            if exc.transient:  # not read in time: it may be valid, so the slot counts as taken
                return False
            log.warning("%s: replacing an object in this party's own slot that fails verification: %s", where, exc)
            self._audit("replaced", manifest_rel, round_, reason=str(exc))
        self._remove(manifest_rel)
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
        fresh: bool = False,
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
        same manifest does not download the ciphertext again (``fresh``:
        download and check it again all the same).
        """
        try:
            return self._open_manifest(manifest_rel, kind=kind, round_=round_, parent=parent, max_size=max_size,
                                       fresh=fresh)
        except RejectedObject as exc:
            if str(exc) not in self._audited:
                self._audited.add(str(exc))
                self._audit("refused", manifest_rel, round_, reason=str(exc))
            raise

    def _open_manifest(self, manifest_rel: str, *, kind: str, round_: int, parent: str | None,
                       max_size: int | None, fresh: bool) -> Received:
        where = f"{self.url}/{manifest_rel}"
        try:
            raw = self._read(manifest_rel, limit=MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise RejectedObject(f"{where}: manifest missing") from None
        except OSError as exc:  # a planted folder or unreadable file in the manifest's place
            raise RejectedObject(f"{where}: manifest unreadable ({type(exc).__name__})",
                                 transient=isinstance(exc, TimeoutError)) from None
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
        if manifest["ciphertext_size"] != _ciphertext_size(header):
            raise RejectedObject(f"{where}: ciphertext size {manifest['ciphertext_size']} does not match the "
                                 f"plaintext size {header.size}")
        if parent is not None and header.parent != parent:
            raise RejectedObject(
                f"{where}: trained from global model {header.parent[:12]}..., expected {parent[:12]}..."
            )
        if self.keyring.identity not in header.recipients:
            raise RejectedObject(f"{where}: not encrypted to this party ({self.keyring.identity!r}; recipients "
                                 f"{list(header.recipients)[:5]})")
        key = _sha256(raw)
        hit = None if fresh else self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return Received(header=hit[0], payload=hit[1], manifest_path=manifest_rel)
        if key in self._bad and not fresh:
            raise RejectedObject(self._bad[key])
        payload = self._download(where, obj, manifest, header, key)
        self._bad.pop(key, None)
        self._remember(key, header, payload)
        self._audit("accepted", manifest_rel, header.round, digest=header.sha256, sender=header.sender)
        return Received(header=header, payload=payload, manifest_path=manifest_rel)

    def _download(self, where: str, obj: str, manifest: Mapping[str, Any], header: Header, key: str) -> bytes:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
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
            raise RejectedObject(f"{where}: object {obj} unreadable ({type(exc).__name__})",
                                 transient=isinstance(exc, TimeoutError)) from None
        self.downloads += 1
        self._audit("read", obj, header.round, digest=_sha256(ciphertext), sender=header.sender)
        if len(ciphertext) != want:
            raise bad(f"{where}: truncated or padded object: {len(ciphertext)} bytes, manifest says {want}")
        if _sha256(ciphertext) != manifest["ciphertext_sha256"]:
            raise bad(f"{where}: ciphertext sha256 mismatch (object tampered)")
        aad = _canonical(header.as_dict())
        me = self.keyring.identity
        eph_pub = ciphertext[:32]
        at = 32 + _WRAPPED_BYTES * header.recipients.index(me)
        body = 32 + _WRAPPED_BYTES * len(header.recipients)
        try:
            mine = X25519PrivateKey.from_private_bytes(self.keyring.decryption_key)
            my_pub = self.keyring.encryption_public_key()
            kek = _wrap_key(mine.exchange(X25519PublicKey.from_public_bytes(eph_pub)), eph_pub, my_pub)
            content_key = AESGCM(kek).decrypt(b"\0" * _NONCE_BYTES, ciphertext[at:at + _WRAPPED_BYTES], aad)
            payload = AESGCM(content_key).decrypt(ciphertext[body:body + _NONCE_BYTES],
                                                  ciphertext[body + _NONCE_BYTES:], aad)
        except (InvalidTag, ValueError):
            raise bad(f"{where}: decryption failed (not encrypted to this party's key, or object/header "
                      f"altered)") from None
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
            max_size: int | None = None, fresh: bool = False) -> Received | None:
        """The object in one slot, or ``None`` if its manifest is not (yet) there.

        Raises :class:`RejectedObject` if it is there but fails a check.
        """
        slot = object_slot(kind, -1 if kind in ("fingerprint", "plans") else round_, name)
        if not self._exists(slot + ".manifest.json"):
            return None
        return self.open_manifest(slot + ".manifest.json", kind=kind, round_=round_, parent=parent,
                                  max_size=max_size, fresh=fresh)

    def get_valid(self, kind: str, round_: int, name: str, *, parent: str | None = None,
                  max_size: int | None = None) -> Received | None:
        """Like :meth:`get`, but an object that fails a check counts as not there yet (logged once).

        For waits: the owner replaces a bad object with its next put, so a
        reader keeps waiting (within its timeout) instead of failing.
        """
        try:
            return self.get(kind, round_, name, parent=parent, max_size=max_size)
        except RejectedObject as exc:
            self._log_once(logging.WARNING, str(exc))
            return None

    def ensure(self, kind: str, round_: int, payload: bytes, *, parent: str = "", num_cases: int = 0,
               deep: bool = False) -> bool:
        """Check that this party's own object in a slot is still there and intact; put it again if not.

        Cheap by default (the manifest, and the stored ciphertext's type and
        size); ``deep`` downloads and verifies the object again. Returns True
        if the object had to be written again.
        """
        name = kind if self.keyring.identity == COORDINATOR else self.keyring.identity
        slot = object_slot(kind, -1 if kind in ("fingerprint", "plans") else round_, name)
        rel = slot + ".manifest.json"
        try:
            if deep:
                ok = self.get(kind, round_, name, fresh=True) is not None
            else:
                got = self.get(kind, round_, name)
                ok = got is not None
                if ok:
                    raw = self._read(rel, limit=MAX_MANIFEST_BYTES)
                    obj = json.loads(raw)["object"]
                    info = self.fs.info(self._full(obj))
                    ok = info.get("type") == "file" and int(info.get("size") or 0) == json.loads(raw)[
                        "ciphertext_size"]
        except (RejectedObject, OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok:
            return False
        log.warning("%s/%s: own object missing or damaged; writing it again", self.url, rel)
        try:
            self.put(kind, round_, payload, parent=parent, num_cases=num_cases)
        except FileExistsError:  # another process of this party wrote a valid one meanwhile
            return False
        return True

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
