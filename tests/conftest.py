"""Shared test fixtures."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261128)


@pytest.fixture
def sd_lib():
    """The reference library (DeepMind surface-distance 0.1), with the NumPy 2 shim.

    surface-distance 0.1 uses ``np.Inf`` on its empty-mask path, which NumPy 2
    removed; docs/metrics.md documents the shim.
    """
    sd = pytest.importorskip("surface_distance")
    if not hasattr(np, "Inf"):
        np.Inf = np.inf  # type: ignore[attr-defined]
    return sd
