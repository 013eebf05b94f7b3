"""Where the platipy oracle lives: platipy pins an old pydicom, so it is installed in a virtual
environment of its own and run in a subprocess, never imported into the test process."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

PLATIPY_VERSION = "0.7.2"


def _candidates() -> list[Path]:
    out = []
    given = os.environ.get("OARBENCH_PLATIPY_PYTHON")
    if given:
        out.append(Path(given))
    root = Path(__file__).resolve().parents[1]
    for venv in (Path(sys.prefix).parent / "venv-platipy", root / ".venv-platipy", root / ".tox" / "platipy"):
        out.append(venv / "bin" / "python")
    return out


@functools.lru_cache(maxsize=1)
def platipy_python() -> str | None:
    """The python of an environment holding platipy (``OARBENCH_PLATIPY_PYTHON``, else a
    ``venv-platipy`` beside the running environment, else ``.venv-platipy`` or
    ``.tox/platipy`` in the checkout), checked to import platipy at :data:`PLATIPY_VERSION`;
    ``None`` when there is none."""
    for python in _candidates():
        if not python.is_file():
            continue
        try:
            res = subprocess.run(
                [str(python), "-c", "import importlib.metadata as m; print(m.version('platipy'))"],
                capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if res.returncode == 0 and res.stdout.strip() == PLATIPY_VERSION:
            return str(python)
    return None


def require_platipy() -> str:
    """:func:`platipy_python`; a test skips without it, except under CI (CI=true), where it fails."""
    import pytest

    python = platipy_python()
    if python is None:
        msg = (f"platipy {PLATIPY_VERSION} environment not found: build it with `python3 -m venv .venv-platipy && "
               ".venv-platipy/bin/pip install -r tests/platipy-requirements.txt` (as .ci/run does) or set "
               "OARBENCH_PLATIPY_PYTHON")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return python
