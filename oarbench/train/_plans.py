"""Plans edits and choices that need neither torch nor nnU-Net (network width, target spacing policy,
learning-rate warm-up)."""

from __future__ import annotations

import copy
from typing import Any, Mapping

__all__ = ["PLAN_SPACINGS", "WIDTHS", "check_plan_spacing", "check_warmup", "reduce_width"]

#: How a federation's target spacing is chosen (docs/training.md, "The federation's target spacing"):
#: the finest site's, axis by axis, or nnU-Net's rule on all sites' cases together.
PLAN_SPACINGS = ("finest", "pooled")


def check_plan_spacing(policy: str) -> str:
    """``policy`` if it is one of :data:`PLAN_SPACINGS`, else ValueError."""
    if policy not in PLAN_SPACINGS:
        raise ValueError(f"plan spacing must be one of {', '.join(PLAN_SPACINGS)}, got {policy!r}")
    return policy


def check_warmup(warmup: Any) -> int:
    """``warmup`` (iterations of learning-rate warm-up) if it is a non-negative integer, else ValueError."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative number of iterations, got {str(warmup)[:20]!r}")
    return warmup


#: Network widths: ``None`` keeps the planned features; otherwise (base, cap):
#: stage i gets min(base * 2**i, cap) features.
WIDTHS: dict[str, tuple[int, int] | None] = {"default": None, "tiny": (8, 64), "small": (16, 128)}


def reduce_width(plans: Mapping[str, Any], configuration: str, width: str) -> dict[str, Any]:
    """Plans with the network of ``configuration`` narrowed to ``width`` (see :data:`WIDTHS`).

    Returns a deep copy; the input is not changed. ``"default"`` returns an
    unchanged copy.
    """
    if width not in WIDTHS:
        raise ValueError(f"width must be one of {sorted(WIDTHS)}, got {width!r}")
    out = copy.deepcopy(dict(plans))
    spec = WIDTHS[width]
    if spec is None:
        return out
    base, cap = spec
    cfgs = out["configurations"]
    if configuration not in cfgs:
        raise ValueError(f"configuration {configuration!r} not in plans ({sorted(cfgs)})")
    # follow 'inherits_from' to the configuration that holds the architecture
    name = configuration
    while "architecture" not in cfgs[name] and "inherits_from" in cfgs[name]:
        name = cfgs[name]["inherits_from"]
    kwargs = cfgs[name]["architecture"]["arch_kwargs"]
    n = int(kwargs["n_stages"])
    kwargs["features_per_stage"] = [min(base * 2**i, cap) for i in range(n)]
    return out
