"""Progress bars for long work, on stderr, off with ``--no-progress``.

One helper for every command: :func:`progress_bar` returns an object with
``update(n)``, ``set_postfix_str(text)`` and ``close()`` (also a context
manager). The bar is drawn with tqdm on stderr when it is a terminal; piped or
captured output (logs, CI) gets no bar, so no carriage-return noise lands in a
file. ``enabled=False`` (``--no-progress``) turns it off everywhere. Work that
runs for minutes can ask for ``lines=True``: piped output then gets a plain line
every few percent (:class:`LineBar`), so a log shows that it is moving.
"""

from __future__ import annotations

import sys
from typing import IO, Any

__all__ = ["progress_bar", "NoBar", "LineBar"]


class NoBar:
    """A bar that draws nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NoBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LineBar(NoBar):
    """Progress as plain lines (``desc: done/total unit [postfix]``) for logs: one about every
    5 % of ``total`` and one at the end, never a carriage return."""

    def __init__(self, total: int, desc: str, unit: str, stream: IO[str]) -> None:
        self.total, self.desc, self.unit, self.stream = int(total), desc, unit, stream
        self.done, self.postfix, self._every, self._closed = 0, "", max(1, int(total) // 20), False

    def set_postfix_str(self, text: str) -> None:
        self.postfix = str(text)

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        if self.done % self._every == 0 or self.done >= self.total:
            self.stream.write(f"{self.desc}: {self.done}/{self.total} {self.unit}"
                              + (f" ({self.postfix})" if self.postfix else "") + "\n")
            self.stream.flush()

    def close(self) -> None:
        self._closed = True


def progress_bar(total: int, *, desc: str, unit: str = "case", enabled: bool = True,
                 file: IO[str] | None = None, lines: bool = False) -> Any:
    """A progress bar over ``total`` steps named ``desc`` (``"evaluate"``, ``"robustness"`` ...).

    Drawn when ``enabled``, ``total >= 1`` and ``file`` (default stderr) is a
    terminal; otherwise a :class:`NoBar`, or with ``lines`` (and ``enabled``) a
    :class:`LineBar` writing plain lines to ``file``.
    """
    stream = sys.stderr if file is None else file
    isatty = getattr(stream, "isatty", None)
    if not enabled or total < 1:
        return NoBar()
    if not (callable(isatty) and isatty()):
        return LineBar(total, desc, unit, stream) if lines else NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=stream, leave=False, dynamic_ncols=True)
