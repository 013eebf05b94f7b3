"""Secure exchange of federated-learning objects through shared storage.

The federation has no server that sites connect to: every party (the
coordinator and each site) only reads and writes objects in one shared
storage location, given as an fsspec URL (a local folder ``file:///...`` by
default; ``s3://bucket/prefix``, ``gs://``, ``az://``, ``webdav`` when the
matching fsspec back-end is installed). Hospitals therefore need outbound
connections only.

Every object is

* serialised in a safe format: tensors as safetensors (never pickles), other
  payloads as UTF-8 JSON;
* encrypted with AES-256-GCM under the federation key (32 random bytes from a
  key file shared by all parties), with a 12-byte random nonce. The object
  *header* (federation, round, sender, kind, name, plaintext size and sha256,
  parent model hash, case count) is the GCM associated data, so a ciphertext
  moved to another round, sender or kind fails to decrypt;
* described by a *manifest* (JSON) that carries the header, the object's
  path, the sha256 and byte size of the ciphertext, and an Ed25519 signature
  of the sender over all of that. Readers trust only senders whose public key
  they hold.

Uploads are atomic: the ciphertext is committed first (create-only), the
manifest last (create-only). Readers look only at manifests, so they never see
half an object, and an upload into a slot that is already committed fails.

Every check that fails raises :class:`RejectedObject` with a reason that
names the object; :meth:`Exchange.collect` logs it and leaves the object out.

Storage layout under the root URL::

    setup/fingerprint/<site>.bin, <site>.manifest.json   # kind "fingerprint"
    setup/plans/plans.bin, plans.manifest.json          # kind "plans"
    round_00000/global/global.bin, .manifest.json        # kind "global"
    round_00000/update/<site>.bin, <site>.manifest.json  # kind "update"
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = [
    "COORDINATOR",
    "KINDS",
    "Header",
    "KeyRing",
    "Received",
    "RejectedObject",
    "Exchange",
    "generate_keys",
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
_MANIFEST_VERSION = 1
_NONCE_BYTES = 12
_KEY_BYTES = 32
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class RejectedObject(ValueError):
    """An object in storage failed a check; it must never be used."""


def _check_name(name: str, what: str) -> str:
    if not name or not set(name) <= _NAME_OK:
        raise ValueError(f"{what} {name!r} must be non-empty and use only letters, digits, '_' and '-'")
    return name


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
        32-byte AES-256-GCM key shared by all parties.
    identity:
        This party's name (``"coordinator"`` or a site name).
    signing_key:
        This party's Ed25519 private key, raw 32 bytes.
    trusted:
        Public keys (raw 32 bytes) of the parties whose objects this party
        accepts, by name (the coordinator holds the sites' keys; a site holds
        the coordinator's).
    """

    federation_key: bytes
    identity: str
    signing_key: bytes
    trusted: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.federation_key) != _KEY_BYTES:
            raise ValueError(f"federation key must be {_KEY_BYTES} bytes, got {len(self.federation_key)}")
        _check_name(self.identity, "party name")

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


def _write_key_file(path: Path, data: bytes, private: bool) -> None:
    text = base64.b64encode(data).decode("ascii") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        if private:
            os.chmod(tmp, 0o600)
        os.link(tmp, path)  # create-only: never overwrite an existing key
    except FileExistsError as exc:
        raise FileExistsError(f"{path}: key file exists already; refusing to overwrite it") from exc
    finally:
        os.unlink(tmp)


def _read_key_file(path: Path, n: int) -> bytes:
    try:
        data = base64.b64decode(path.read_text().strip(), validate=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: key file not found") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not a base64 key file ({exc})") from exc
    if len(data) != n:
        raise ValueError(f"{path}: key must be {n} bytes, got {len(data)}")
    return data


def generate_keys(out: str | Path, sites: list[str]) -> dict[str, Path]:
    """Create a federation's keys in ``out``.

    Writes ``federation.key`` (AES-256 key, base64), ``<party>.ed25519``
    (private signing key, mode 0600) and ``public/<party>.pub`` (public key)
    for the coordinator and every site. Give each party the federation key,
    its own private key and the ``public/`` folder. Existing files are never
    overwritten.

    Returns
    -------
    dict
        File paths by role (``"federation"``, ``"<party>"``, ``"<party>.pub"``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out)
    names = [COORDINATOR] + [_check_name(s, "site name") for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be distinct and not {COORDINATOR!r}: {sites}")
    paths: dict[str, Path] = {"federation": out / "federation.key"}
    _write_key_file(paths["federation"], secrets.token_bytes(_KEY_BYTES), private=True)
    for name in names:
        key = Ed25519PrivateKey.generate()
        raw_priv = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        raw_pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        paths[name] = out / f"{name}.ed25519"
        paths[f"{name}.pub"] = out / "public" / f"{name}.pub"
        _write_key_file(paths[name], raw_priv, private=True)
        _write_key_file(paths[f"{name}.pub"], raw_pub, private=False)
    return paths


def load_keyring(keys: str | Path, identity: str, *, trust: list[str] | None = None) -> KeyRing:
    """Load a party's :class:`KeyRing` from a folder made by :func:`generate_keys`.

    Parameters
    ----------
    keys:
        Folder with ``federation.key``, ``<identity>.ed25519`` and ``public/``.
    identity:
        ``"coordinator"`` or the site name.
    trust:
        Names whose public keys to trust. Default: for the coordinator every
        ``public/*.pub`` except its own; for a site only the coordinator.
    """
    keys = Path(keys)
    fed = _read_key_file(keys / "federation.key", _KEY_BYTES)
    priv = _read_key_file(keys / f"{identity}.ed25519", 32)
    pub_dir = keys / "public"
    if trust is None:
        if identity == COORDINATOR:
            trust = sorted(p.name[: -len(".pub")] for p in pub_dir.glob("*.pub") if p.stem != COORDINATOR)
        else:
            trust = [COORDINATOR]
    trusted = {name: _read_key_file(pub_dir / f"{name}.pub", 32) for name in trust}
    return KeyRing(federation_key=fed, identity=identity, signing_key=priv, trusted=trusted)


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
    name: slot name inside the round/kind folder (the site name, ``global``, ``plans``).
    size: plaintext size in bytes.
    sha256: sha256 (hex) of the plaintext.
    parent: sha256 of the plaintext of the global model this object was
        trained from ("" where not applicable).
    num_cases: number of training cases behind the object (0 where not applicable).
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "federation": self.federation,
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
    def from_dict(cls, d: Mapping[str, Any]) -> "Header":
        try:
            return cls(
                federation=str(d["federation"]),
                round=int(d["round"]),
                sender=str(d["sender"]),
                kind=str(d["kind"]),
                name=str(d["name"]),
                size=int(d["size"]),
                sha256=str(d["sha256"]),
                parent=str(d.get("parent", "")),
                num_cases=int(d.get("num_cases", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RejectedObject(f"malformed header {dict(d)!r}: {exc}") from exc


@dataclass(frozen=True)
class Received:
    """An object that passed every check."""

    header: Header
    payload: bytes
    manifest_path: str


def object_slot(kind: str, round_: int, name: str) -> str:
    """Path (relative to the storage root) of an object, without extension."""
    if kind not in KINDS:
        raise ValueError(f"unknown object kind {kind!r}; expected one of {sorted(KINDS)}")
    _check_name(name, "object name")
    if kind in ("fingerprint", "plans"):
        return f"setup/{kind}/{name}"
    if round_ < 0:
        raise ValueError(f"round must be >= 0 for kind {kind!r}, got {round_}")
    return f"round_{round_:05d}/{kind}/{name}"


class Exchange:
    """One party's view of the shared storage.

    Parameters
    ----------
    url:
        fsspec URL of the storage root (a plain path means a local folder).
    keyring:
        This party's keys.
    federation:
        Federation name, bound into every object.
    storage_options:
        Passed to fsspec (e.g. ``{"key": ..., "secret": ..., "client_kwargs":
        {"endpoint_url": ...}}`` for s3fs).
    """

    def __init__(
        self,
        url: str,
        keyring: KeyRing,
        *,
        federation: str = "oarbench",
        storage_options: Mapping[str, Any] | None = None,
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

    def _read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._full(rel))

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

    def seal(self, header: Header, payload: bytes) -> tuple[bytes, dict[str, Any]]:
        """Encrypt ``payload`` and build the signed manifest (without writing anything)."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if header.sender != self.keyring.identity:
            raise ValueError(f"header sender {header.sender!r} is not this party ({self.keyring.identity!r})")
        aad = _canonical(header.as_dict())
        nonce = secrets.token_bytes(_NONCE_BYTES)
        ciphertext = nonce + AESGCM(self.keyring.federation_key).encrypt(nonce, payload, aad)
        body = {
            "version": _MANIFEST_VERSION,
            "header": header.as_dict(),
            "object": object_slot(header.kind, header.round, header.name) + ".bin",
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
        )
        slot = object_slot(kind, round_, name)
        if self._exists(slot + ".manifest.json"):
            raise FileExistsError(f"{self.url}/{slot}: duplicate upload refused, the slot is already committed")
        ciphertext, manifest = self.seal(header, payload)
        try:
            self._create(slot + ".bin", ciphertext)
        except FileExistsError:
            # an earlier upload died before its manifest: that object was never visible; replace it
            log.warning("%s/%s.bin: uncommitted leftover object without manifest; replacing it", self.url, slot)
            self.fs.rm_file(self._full(slot + ".bin"))
            self._create(slot + ".bin", ciphertext)
        try:
            self._create(slot + ".manifest.json", json.dumps(manifest, indent=1).encode("utf-8"))
        except FileExistsError as exc:
            raise FileExistsError(
                f"{self.url}/{slot}: duplicate upload refused, the slot is already committed"
            ) from exc
        return header

    # -- reading -----------------------------------------------------------------------------

    def open_manifest(
        self,
        manifest_rel: str,
        *,
        kind: str,
        round_: int,
        parent: str | None = None,
    ) -> Received:
        """Read, verify and decrypt one object; raise :class:`RejectedObject` on any failure.

        Checks, in order: manifest readable and well-formed; signed by a
        trusted sender; sender allowed for the kind; federation, kind, round
        (replay) and slot name match what the reader expects; ciphertext present,
        of the signed size (truncation) and sha256 (tampering); AES-GCM
        decryption with the header as associated data (wrong key, tampering);
        plaintext size and sha256; parent model hash where ``parent`` is given.
        """
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        where = f"{self.url}/{manifest_rel}"
        try:
            raw = self._read(manifest_rel)
        except FileNotFoundError:
            raise RejectedObject(f"{where}: manifest missing") from None
        try:
            manifest = json.loads(raw.decode("utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            raise RejectedObject(f"{where}: manifest is not valid JSON ({exc})") from exc
        sig_b64 = manifest.pop("signature", None)
        if not sig_b64:
            raise RejectedObject(f"{where}: manifest is unsigned")
        header = Header.from_dict(manifest.get("header") or {})
        if header.sender not in self.keyring.trusted and header.sender != self.keyring.identity:
            raise RejectedObject(f"{where}: unknown sender {header.sender!r} (no trusted public key)")
        try:
            signature = base64.b64decode(sig_b64, validate=True)
        except ValueError:
            raise RejectedObject(f"{where}: signature is not base64") from None
        if not self.keyring.verify(header.sender, _canonical(manifest), signature):
            raise RejectedObject(f"{where}: bad signature for sender {header.sender!r} (manifest altered or forged)")
        expected_sender = KINDS.get(header.kind)
        if header.kind != kind:
            raise RejectedObject(f"{where}: object kind {header.kind!r}, expected {kind!r}")
        if (expected_sender == COORDINATOR) != (header.sender == COORDINATOR):
            raise RejectedObject(f"{where}: sender {header.sender!r} may not send kind {kind!r}")
        if header.federation != self.federation:
            raise RejectedObject(f"{where}: federation {header.federation!r}, expected {self.federation!r}")
        want_round = -1 if kind in ("fingerprint", "plans") else round_
        if header.round != want_round:
            raise RejectedObject(f"{where}: replay: object is for round {header.round}, expected round {want_round}")
        slot = object_slot(kind, header.round, header.name)
        if manifest_rel != slot + ".manifest.json":
            raise RejectedObject(f"{where}: manifest names slot {slot!r}, not the one it was found in")
        if kind == "update" and header.name != header.sender:
            raise RejectedObject(f"{where}: update slot {header.name!r} does not match sender {header.sender!r}")
        if manifest.get("object") != slot + ".bin":
            raise RejectedObject(f"{where}: manifest points at {manifest.get('object')!r}, expected {slot}.bin")
        try:
            ciphertext = self._read(slot + ".bin")
        except FileNotFoundError:
            raise RejectedObject(f"{where}: object {slot}.bin is missing") from None
        if len(ciphertext) != manifest.get("ciphertext_size"):
            raise RejectedObject(
                f"{where}: truncated or padded object: {len(ciphertext)} bytes, manifest says "
                f"{manifest.get('ciphertext_size')}"
            )
        if _sha256(ciphertext) != manifest.get("ciphertext_sha256"):
            raise RejectedObject(f"{where}: ciphertext sha256 mismatch (object tampered)")
        aad = _canonical(header.as_dict())
        try:
            payload = AESGCM(self.keyring.federation_key).decrypt(
                ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], aad
            )
        except InvalidTag:
            raise RejectedObject(
                f"{where}: decryption failed (wrong federation key, or object/header altered)"
            ) from None
        if len(payload) != header.size or _sha256(payload) != header.sha256:
            raise RejectedObject(f"{where}: plaintext size/sha256 differ from the signed header")
        if parent is not None and header.parent != parent:
            raise RejectedObject(
                f"{where}: trained from global model {header.parent[:12]}..., expected {parent[:12]}..."
            )
        return Received(header=header, payload=payload, manifest_path=manifest_rel)

    def get(self, kind: str, round_: int, name: str, *, parent: str | None = None) -> Received | None:
        """The object in one slot, or ``None`` if its manifest is not (yet) there.

        Raises :class:`RejectedObject` if it is there but fails a check.
        """
        slot = object_slot(kind, -1 if kind in ("fingerprint", "plans") else round_, name)
        if not self._exists(slot + ".manifest.json"):
            return None
        return self.open_manifest(slot + ".manifest.json", kind=kind, round_=round_, parent=parent)

    def collect(
        self, kind: str, round_: int, *, parent: str | None = None
    ) -> tuple[dict[str, Received], dict[str, str]]:
        """All valid objects of one kind in one round, keyed by slot name.

        Returns
        -------
        accepted, rejected
            ``accepted`` maps slot name to :class:`Received`; ``rejected`` maps
            the path of each refused object to the reason (logged once at
            WARNING). An object without a manifest is reported under its
            ``.bin`` path (logged at INFO): it may be an upload in progress
            and is never used.
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
            if n.endswith(".bin") and n[: -len(".bin")] not in manifests:
                reason = f"{self.url}/{folder}/{n}: manifest missing (upload incomplete or manifest removed); ignored"
                rejected[f"{folder}/{n}"] = reason
                self._log_once(logging.INFO, reason)
        for stem in sorted(manifests):
            rel = f"{folder}/{stem}.manifest.json"
            try:
                got = self.open_manifest(rel, kind=kind, round_=round_, parent=parent)
            except RejectedObject as exc:
                rejected[rel] = str(exc)
                self._log_once(logging.WARNING, str(exc))
                continue
            accepted[got.header.name] = got
        return accepted, rejected
