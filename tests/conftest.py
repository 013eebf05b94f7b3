"""Shared test fixtures."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="session")
def _cache_key_outside_home(tmp_path_factory):
    """`oarbench evaluate` keeps its cache key under XDG_CONFIG_HOME: a folder of the test session,
    never the home of the user who runs the tests."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    yield
    patch.undo()


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


@pytest.fixture()
def fed(tmp_path):
    """The coordinator's and sites A and B's views of one local-folder exchange (keys made here)."""
    pytest.importorskip("cryptography")
    from oarbench.train.exchange import COORDINATOR, Exchange, generate_keys, load_keyring

    generate_keys(tmp_path / "keys", ["A", "B"])
    url = str(tmp_path / "bucket")
    return {n: Exchange(url, load_keyring(tmp_path / "keys", n)) for n in (COORDINATOR, "A", "B")}
