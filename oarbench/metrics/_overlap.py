"""Voxel-overlap metrics."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["dice", "dice_from_counts", "overlap_counts"]


def dice_from_counts(tp: int, n_ref: int, n_pred: int) -> float:
    """DSC = 2 |A and B| / (|A| + |B|); NaN when both masks are empty."""
    total = n_ref + n_pred
    if total == 0:
        return math.nan
    return 2.0 * tp / total


def overlap_counts(reference: Any, prediction: Any) -> tuple[int, int, int]:
    """Voxel counts (tp, fp, fn) of two masks of the same shape."""
    from oarbench.metrics._surface import as_bool_mask

    ref = as_bool_mask(reference, "reference")
    pred = as_bool_mask(prediction, "prediction")
    if ref.shape != pred.shape:
        raise ValueError(f"reference shape {ref.shape} differs from prediction shape {pred.shape}")
    tp = int(np.count_nonzero(ref & pred))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(ref)) - tp


def dice(reference: Any, prediction: Any) -> float:
    """Dice similarity coefficient of two masks (bool or 0/1, numpy or torch).

    NaN when both masks are empty (nothing to segment), as nnU-Net's evaluation.
    """
    tp, fp, fn = overlap_counts(reference, prediction)
    return dice_from_counts(tp, tp + fn, tp + fp)
