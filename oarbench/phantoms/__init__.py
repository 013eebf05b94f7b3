"""Synthetic multi-centre paediatric CT study, deterministic from a seed.

* :mod:`oarbench.phantoms.anatomy`: anatomy in patient coordinates and its rendering
  to CT (int16 HU) and label maps of the default 19 structures;
* :mod:`oarbench.phantoms.errors`: the error model behind simulated predictions;
* :mod:`oarbench.phantoms.study`: configuration (``[phantoms]`` / ``[error_model]`` of a
  study TOML), nnU-Net v2 raw datasets, metadata, predictions and ``study.toml``.

See docs/phantoms.md.
"""

from oarbench.phantoms.anatomy import CONTRAST_PHASES, Grid, age_dimensions, build_anatomy, render
from oarbench.phantoms.errors import ErrorModel, InjectedError, simulate_case
from oarbench.phantoms.study import (
    DEFAULT_DEMO_CONFIG,
    CaseSpec,
    CentreProtocol,
    DemoConfig,
    ModelSpec,
    PhantomConfig,
    StudyPaths,
    case_rng,
    draw_cases,
    generate_study,
    load_demo_config,
    parse_demo_config,
    render_case,
    simulate_predictions,
)

__all__ = [
    "CONTRAST_PHASES",
    "DEFAULT_DEMO_CONFIG",
    "CaseSpec",
    "CentreProtocol",
    "DemoConfig",
    "ErrorModel",
    "Grid",
    "InjectedError",
    "ModelSpec",
    "PhantomConfig",
    "StudyPaths",
    "age_dimensions",
    "build_anatomy",
    "case_rng",
    "draw_cases",
    "generate_study",
    "load_demo_config",
    "parse_demo_config",
    "render",
    "render_case",
    "simulate_case",
    "simulate_predictions",
]
