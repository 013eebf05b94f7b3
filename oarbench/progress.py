"""Progress bars for long work, on stderr, off with ``--no-progress``.

One helper for every command: :func:`progress_bar` returns an object with
``update(n)``, ``set_postfix_str(text)`` and ``close()`` (also a context
manager). The bar is drawn with tqdm on stderr when it is a terminal; piped or
captured output (logs, CI) gets no bar, so no carriage-return noise lands in a
file. ``enabled=False`` (``--no-progress``) turns it off everywhere.
"""

from __future__ import annotations

import sys
from typing import IO, Any

__all__ = ["progress_bar", "NoBar"]


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


def progress_bar(total: int, *, desc: str, unit: str = "case", enabled: bool = True,
                 file: IO[str] | None = None) -> Any:
    """A progress bar over ``total`` steps named ``desc`` (``"evaluate"``, ``"robustness"`` ...).

    Drawn when ``enabled``, ``total >= 1`` and ``file`` (default stderr) is a
    terminal; otherwise a :class:`NoBar`.
    """
    stream = sys.stderr if file is None else file
    isatty = getattr(stream, "isatty", None)
    if not enabled or total < 1 or not (callable(isatty) and isatty()):
        return NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=stream, leave=False, dynamic_ncols=True)
