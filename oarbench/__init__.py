"""oarbench: benchmark CT organ-at-risk auto-contouring models.

The metric core lives in :mod:`oarbench.metrics`; see docs/ for the conventions.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
