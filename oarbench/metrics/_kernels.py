"""The compiled kernels of the metric core, where they are built.

``setup.py`` builds ``oarbench/metrics/_ckernels.c`` when the package is installed; where no C
compiler was found the install still succeeds, :data:`ckernels` is None and the metric core runs
its numpy code, which gives the same results (tests/test_ckernels.py). Callers look the attribute
up at call time (``_kernels.ckernels``), so setting it to None selects the numpy code.
"""

from __future__ import annotations

try:
    from oarbench.metrics import _ckernels as ckernels
except ImportError:  # pragma: no cover - where the extension is not built
    ckernels = None


def surface_kernel() -> str:
    """``"c"`` where the compiled kernels are used, else ``"numpy"``."""
    return "c" if ckernels is not None else "numpy"
