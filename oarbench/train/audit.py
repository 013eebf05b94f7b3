"""Hash-chained audit log of one federation party.

Every party appends one JSON line per event: what it ``read`` (a ciphertext
downloaded), ``wrote`` (an object committed), ``accepted`` (an object that
passed every check), ``refused`` (with the reason) or ``replaced`` (a bad
object in its own slot). Each line carries the sha256 of the line before it
(``prev``) and its own ``hash`` over all its other fields, so editing,
inserting or deleting a line breaks the chain at that line
(:func:`verify`). Removing lines from the end leaves a valid, shorter chain:
record the last hash that :func:`verify` prints somewhere else to detect that.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AuditLog", "AuditSummary", "verify", "GENESIS"]

#: ``prev`` of the first line.
GENESIS = "0" * 64
_FIELDS = ("seq", "time", "party", "action", "object", "round", "digest", "sender", "reason", "prev")
#: Largest audit line read (bytes).
MAX_LINE_BYTES = 64 * 1024


def _hash(entry: dict[str, Any]) -> str:
    body = {k: entry[k] for k in _FIELDS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _last(path: Path) -> tuple[int, str]:
    """(next sequence number, hash of the last line) of an existing log; refuses a broken one."""
    summary = verify(path)
    if not summary.ok:
        raise ValueError(f"{path}: audit log does not verify ({summary.problem}); move it aside to start a new one")
    return summary.lines, summary.head


class AuditLog:
    """Append-only, hash-chained JSON-lines log of one party (thread-safe within a process)."""

    def __init__(self, path: str | os.PathLike[str], party: str) -> None:
        self.path = Path(path)
        self.party = party
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._seq, self._prev = _last(self.path)
        else:
            self._seq, self._prev = 0, GENESIS

    def append(self, action: str, *, object: str = "", round: int = -1, digest: str = "", sender: str = "",
               reason: str = "") -> None:
        with self._lock:
            entry: dict[str, Any] = {
                "seq": self._seq, "time": round_time(time.time()), "party": self.party, "action": action,
                "object": object, "round": int(round), "digest": digest, "sender": sender,
                "reason": reason[:2000], "prev": self._prev,
            }
            entry["hash"] = _hash(entry)
            line = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            self._seq += 1
            self._prev = entry["hash"]


def round_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


@dataclass
class AuditSummary:
    """What :func:`verify` found in one log."""

    path: Path
    ok: bool = True
    lines: int = 0
    head: str = GENESIS
    problem: str = ""
    parties: set[str] = field(default_factory=set)
    actions: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


def verify(path: str | os.PathLike[str]) -> AuditSummary:
    """Check the hash chain of an audit log line by line; summarise it.

    ``ok`` is False at the first line that is not JSON, lacks a field, does not
    follow its predecessor (``seq``, ``prev``) or whose ``hash`` differs from
    the recomputed one; ``problem`` names that line.
    """
    path = Path(path)
    out = AuditSummary(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: audit log not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: audit log is not a regular file")
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if len(raw) > MAX_LINE_BYTES:
                return _broken(out, f"line {number}: longer than {MAX_LINE_BYTES} bytes")
            try:
                entry = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                return _broken(out, f"line {number}: not JSON")
            if not isinstance(entry, dict) or set(entry) != set(_FIELDS) | {"hash"}:
                return _broken(out, f"line {number}: fields differ from the schema")
            if entry["seq"] != out.lines or entry["prev"] != out.head:
                return _broken(out, f"line {number}: does not follow line {number - 1} (a line was removed, "
                                    f"inserted or reordered)")
            if _hash(entry) != entry["hash"]:
                return _broken(out, f"line {number}: hash mismatch (the line was edited)")
            out.lines += 1
            out.head = entry["hash"]
            out.parties.add(str(entry["party"]))
            action = str(entry["action"])
            out.actions[action] = out.actions.get(action, 0) + 1
            if action == "refused":
                out.refused.append(f"{entry['object']}: {entry['reason']}")
    return out


def _broken(out: AuditSummary, problem: str) -> AuditSummary:
    out.ok = False
    out.problem = problem
    return out
