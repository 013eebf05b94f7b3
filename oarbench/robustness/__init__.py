"""Robustness to orientation: perturb, predict, map back, score.

* :mod:`~oarbench.robustness.transforms`: flips, 90-degree steps, prone /
  feet-first, small-angle rotations, header-only re-orientation (patient
  coordinates, exact inverses).
* :mod:`~oarbench.robustness.predictors`: the :class:`Predictor` protocol, an
  nnU-Net v2 model folder and an external command.
* :mod:`~oarbench.robustness.run`: :func:`run_robustness` and its tables.

See docs/robustness.md.
"""

from oarbench.robustness.predictors import (
    CommandPredictor,
    NnUNetModelPredictor,
    Predictor,
    PredictorError,
    parse_predictor,
)
from oarbench.robustness.run import (
    SKIPPED_COLUMNS,
    SUMMARY_COLUMNS,
    TABLE_COLUMNS,
    RobustnessResult,
    RobustnessWarning,
    laterality_errors,
    laterality_swaps,
    noise_floor,
    run_robustness,
    summarise,
    write_robustness,
)
from oarbench.robustness.transforms import (
    AIR_HU,
    DEFAULT_ROTATE_CONDITIONS,
    Identity,
    LosslessRigid,
    Perturbation,
    Reorient,
    ResampleControl,
    control_for,
    SmallRotation,
    parse_condition,
    parse_conditions,
    random_small_rotations,
)

__all__ = [
    "AIR_HU",
    "DEFAULT_ROTATE_CONDITIONS",
    "CommandPredictor",
    "Identity",
    "LosslessRigid",
    "NnUNetModelPredictor",
    "Perturbation",
    "Predictor",
    "PredictorError",
    "Reorient",
    "ResampleControl",
    "control_for",
    "RobustnessResult",
    "SUMMARY_COLUMNS",
    "SmallRotation",
    "TABLE_COLUMNS",
    "laterality_swaps",
    "laterality_errors",
    "RobustnessWarning",
    "SKIPPED_COLUMNS",
    "noise_floor",
    "parse_condition",
    "parse_conditions",
    "parse_predictor",
    "random_small_rotations",
    "run_robustness",
    "summarise",
    "write_robustness",
]
