"""Files wherever they are: local paths, ``file://`` and fsspec URLs (``s3://``, ``gs://``, ...).

A *location* is a :class:`~pathlib.Path` for a local file or folder (plain
paths and ``file://`` URLs) or the URL string for anything else. Remote
locations go through fsspec (``s3://`` needs s3fs); credentials come from
the back-end's usual sources (for S3: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws``, an instance role;
``AWS_ENDPOINT_URL`` for an S3-compatible store), never from oarbench's own
options (docs/scale.md).

Images are read where the task runs: a remote image is copied into a
temporary file on that machine and read from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union
from urllib.parse import unquote, urlparse

__all__ = [
    "Location",
    "is_remote",
    "as_location",
    "join",
    "name",
    "is_dir",
    "is_file",
    "list_files",
    "read_bytes",
    "read_text",
    "write_bytes",
    "write_text",
    "stamp",
    "sha256",
    "local_copy",
    "atomic_write_bytes",
    "PARTIAL_MARK",
]

Location = Union[Path, str]

FSSPEC_INSTALL_HINT = "{url}: a URL needs {what}, which is not installed: pip install 'oarbench[{extra}]'"


def _install_hint(url: str) -> str:
    """What to install for ``url``: the ``s3`` extra for ``s3://``, else ``remote`` (fsspec)."""
    s3 = str(url).startswith(("s3://", "s3a://"))
    return FSSPEC_INSTALL_HINT.format(url=url, what="fsspec and s3fs" if s3 else "fsspec", extra="s3" if s3 else "remote")


def is_remote(loc: Any) -> bool:
    """True for a URL other than ``file://`` (``s3://bucket/x``, ``memory://x`` ...)."""
    if isinstance(loc, Path):
        return False
    text = str(loc)
    return "://" in text and not text.startswith("file://")


def as_location(value: str | os.PathLike[str]) -> Location:
    """A plain path or ``file://`` URL -> Path; any other URL -> the URL string."""
    if isinstance(value, Path):
        return value
    text = os.fspath(value)
    if text.startswith("file://"):
        return Path(unquote(urlparse(text).path))
    if is_remote(text):
        return text.rstrip("/")
    return Path(text)


def _fs(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise ValueError(_install_hint(url)) from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:  # the protocol's back-end (s3fs, gcsfs, ...) is missing
        if str(url).startswith(("s3://", "s3a://")):
            raise ValueError(_install_hint(url)) from None
        raise ValueError(f"{url}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{url}: {exc}") from None


def join(base: Location, *parts: str) -> Location:
    if isinstance(base, Path):
        return base.joinpath(*parts)
    return posixpath.join(str(base), *parts)


def name(loc: Location) -> str:
    return loc.name if isinstance(loc, Path) else posixpath.basename(str(loc).rstrip("/"))


def is_dir(loc: Location) -> bool:
    if isinstance(loc, Path):
        return loc.is_dir()
    fs, path = _fs(loc)
    try:
        return bool(fs.isdir(path))
    except OSError:
        return False


def is_file(loc: Location) -> bool:
    if isinstance(loc, Path):
        return loc.is_file()
    fs, path = _fs(loc)
    try:
        return bool(fs.isfile(path))
    except OSError:
        return False


def list_files(folder: Location) -> list[Location]:
    """The files (not folders, not hidden) directly in ``folder``, sorted by name."""
    if isinstance(folder, Path):
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    fs, path = _fs(folder)
    protocol = str(folder).split("://", 1)[0]
    out = []
    for info in fs.ls(path, detail=True):
        if info.get("type") != "file":
            continue
        base = posixpath.basename(info["name"].rstrip("/"))
        if base.startswith("."):
            continue
        out.append(f"{protocol}://{info['name'].lstrip('/')}" if protocol != "memory" else f"memory://{info['name']}")
    return sorted(out, key=lambda u: name(u))


def read_bytes(loc: Location) -> bytes:
    if isinstance(loc, Path):
        return loc.read_bytes()
    fs, path = _fs(loc)
    try:
        with fs.open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{loc}: file not found") from None


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode("utf-8")


def write_bytes(loc: Location, data: bytes) -> Location:
    """Write atomically: a local file by temporary file and rename; an object
    store's PUT is atomic already (readers see the old object or the new one)."""
    if isinstance(loc, Path):
        return atomic_write_bytes(loc, data)
    fs, path = _fs(loc)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)
    return loc


def write_text(loc: Location, text: str) -> Location:
    return write_bytes(loc, text.encode("utf-8"))


def stamp(loc: Location | None) -> list[Any] | None:
    """What identifies a file's version without reading it: [name, size, mtime or ETag]."""
    if loc is None:
        return None
    if isinstance(loc, Path):
        st = loc.stat()
        return [str(loc.resolve()), st.st_size, st.st_mtime_ns]
    fs, path = _fs(loc)
    info = fs.info(path)
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("created")
    return [str(loc), int(info.get("size") or 0), str(version)]


def sha256(loc: Location, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    if isinstance(loc, Path):
        with open(loc, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                h.update(block)
        return h.hexdigest()
    fs, path = _fs(loc)
    with fs.open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class local_copy:
    """``with local_copy(loc) as path:`` a local file with ``loc``'s content (``loc`` itself when local).

    The temporary copy keeps the file name, so that readers that go by the
    suffix (``.nii.gz``, ``.nrrd``) still do.
    """

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Path:
        if isinstance(self.loc, Path):
            return self.loc
        self._tmp = tempfile.TemporaryDirectory(prefix="oarbench-fetch-")
        target = Path(self._tmp.name) / name(self.loc)
        target.write_bytes(read_bytes(self.loc))
        return target

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


#: Marker in the names of temporary files of unfinished writes (removed by :class:`oarbench.io.OutputLock`).
PARTIAL_MARK = ".partial"


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)[-24:] or ".tmp"
    # A short prefix keeps the temporary name within the file system's name limit.
    stem = path.name.split(".")[0][:64]
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f"{PARTIAL_MARK}{suffix}", dir=path.parent)
    # mkstemp creates 0600; give the final file the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (fd, temporary path) in ``path``'s folder; rename onto ``path`` when the
    block succeeds, remove the temporary file when it fails."""
    fd, tmp = _atomic_target(path)
    try:
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    with _atomic(path) as (fd, _tmp):
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return path
