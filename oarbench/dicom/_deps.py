"""Lazy imports of the optional DICOM dependencies, with a one-line hint when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

_HINT = "DICOM support needs the 'dicom' extra: pip install 'oarbench[dicom]'"


def _require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{_HINT} ({module} is missing: {exc})") from None


def require_pydicom() -> ModuleType:
    return _require("pydicom")


def require_highdicom() -> ModuleType:
    return _require("highdicom")


def require_skimage_draw() -> ModuleType:
    return _require("skimage.draw")


def require_skimage_measure() -> ModuleType:
    return _require("skimage.measure")
