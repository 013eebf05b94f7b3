"""Optional dependencies, imported when a function needs them, with an install hint when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependency", "require"]


class MissingDependency(ModuleNotFoundError):
    """An optional dependency is not installed; the message says which pip command installs it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming ``pip install 'oarbench[extra]'``.

    ``purpose`` completes "... needs MODULE", e.g. ``"the nnU-Net predictor"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingDependency(
            f"{purpose} needs {top}, which is not installed: pip install 'oarbench[{extra}]'"
        ) from exc
