"""Optional dependencies: import them lazily, and say in one line what to install when missing.

:func:`require` imports a module of an optional extra or raises
:class:`MissingDependencyError` with the pip command. The command line turns
that error, and any ``ModuleNotFoundError`` of a module listed in
:data:`EXTRAS` raised deeper down, into one line and exit code 1
(:func:`oarbench.cli._common.user_errors`), never a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingDependencyError", "missing_message", "require", "extra_of"]

#: Top-level module -> the oarbench extra that installs it (pyproject.toml).
EXTRAS: dict[str, str] = {
    "torch": "torch",
    "nnunetv2": "nnunet",
    "cryptography": "fl",
    "fsspec": "remote",
    "safetensors": "fl",
    "s3fs": "s3",
    "flwr": "flower",
}


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the pip command."""


def extra_of(module: str) -> str | None:
    """The extra that installs ``module`` (``"nnunetv2.inference"`` -> ``"nnunet"``), or None."""
    return EXTRAS.get(module.split(".")[0])


def missing_message(module: str, purpose: str | None = None) -> str:
    """``"<purpose> needs <module>, which is not installed: pip install 'oarbench[<extra>]'"``."""
    top = module.split(".")[0]
    extra = extra_of(top)
    command = f"pip install 'oarbench[{extra}]'" if extra else f"pip install {top}"
    return f"{purpose or 'this command'} needs {top}, which is not installed: {command}"


def require(module: str, purpose: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the pip command."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = (exc.name or module).split(".")[0]
        # a module of the package itself missing is a broken install, not an absent extra
        name = missing if missing in EXTRAS or missing == module.split(".")[0] else module
        raise MissingDependencyError(missing_message(name, purpose)) from exc
