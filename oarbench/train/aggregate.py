"""Federated averaging and the guards every site update passes first.

One module for every federated engine (the shared-storage coordinator of
:mod:`oarbench.train.federated` and the Flower server of
:mod:`oarbench.train.flower`), so both average the same way and refuse the
same updates.

Rules (documented in docs/training.md, "What a dishonest site can and cannot do"):

* **Case counts are pinned.** A site's case count is the one the
  coordinator froze in its signed plans (from the site's fingerprint at
  planning time), never a number it claims later; an update claiming another
  count is refused. Counts are integers in ``1 .. rules.max_cases``. The
  FedAvg weight follows the coordinator's policy (:func:`fedavg_weights`:
  ``cases``, ``equal`` or ``capped:N``).
* **Same tensors.** An update holds exactly the global model's tensor names,
  shapes and dtypes.
* **Finite and bounded.** Every floating value is finite and
  ``|w| <= rules.max_abs_weight``.
* **Norm near a reference no site can move.** With ``||.||`` the Euclidean
  norm over all floating tensors together and ``g0`` the reference (the
  first global model, published by the coordinator before any site
  contributed), an update ``u`` is refused unless
  ``||g0|| / r <= ||u|| <= r * ||g0||`` with ``r = rules.max_norm_ratio``
  (default 10). Against the *current* global this bound would compound: a
  site sending 9.9 times the global every round grows it without limit.
* **Small step.** An update trained from the global model ``g`` is refused
  if ``||u - g|| > rules.max_delta_ratio * ||g||`` (default 1.3): a sign-flipped
  model (``||u - g|| = 2 ||g||``) or noise of the global's norm (about
  ``1.41 ||g||``) is refused.

Both bounds apply when the caller passes the first global as ``reference``
(the storage coordinator always does); without it only the older per-round
norm bound against ``g`` applies.
* The norm rules cannot scale an all-zero model; then only the absolute bound applies.

The combination (:func:`combine`) is FedAvg by default, or a robust
aggregator: the coordinate-wise median or trimmed mean of the accepted
updates (``rules.aggregator``). A coordinator may add server momentum to it
(:func:`server_momentum_step`, off by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "MAX_CASES",
    "Weights",
    "AggregationRules",
    "RejectedUpdate",
    "Aggregate",
    "fedavg",
    "check_update",
    "check_tensors",
    "check_case_count",
    "check_fingerprint_body",
    "aggregate",
    "combine",
    "check_server_momentum",
    "server_momentum_step",
    "fedavg_weights",
    "parse_weighting",
    "weights_norm",
    "MAX_INTENSITY",
]

#: Largest case count a site may report.
MAX_CASES = 1_000_000
#: Largest absolute intensity statistic in a fingerprint (CT: about -1024..4000 HU; MR: arbitrary units).
MAX_INTENSITY = 1e9
#: Largest voxel spacing in a fingerprint (mm).
MAX_SPACING = 1e4

#: Named arrays: the network's state (one entry per distinct tensor).
Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class AggregationRules:
    """Limits an update must keep to be averaged (see the module docstring).

    Attributes
    ----------
    max_norm_ratio: ``r``: the update's norm lies within ``[||g|| / r, r ||g||]``.
    max_abs_weight: largest absolute value of any floating weight.
    max_cases: largest case count of a site.
    max_delta_ratio: ``||u - g|| <= max_delta_ratio * ||g||``.
    aggregator: ``fedavg`` (weighted mean), ``median`` (coordinate-wise) or
        ``trimmed:F`` (coordinate-wise mean without the fraction F, 0 <= F < 0.5,
        of the lowest and of the highest values).
    """

    max_norm_ratio: float = 10.0
    max_abs_weight: float = 1e6
    max_cases: int = MAX_CASES
    max_delta_ratio: float = 1.3
    aggregator: str = "fedavg"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_delta_ratio) and self.max_delta_ratio > 0):
            raise ValueError(f"max_delta_ratio must be a positive finite number, got {self.max_delta_ratio}")
        _parse_aggregator(self.aggregator)
        if not (math.isfinite(self.max_norm_ratio) and self.max_norm_ratio >= 1.0):
            raise ValueError(f"max_norm_ratio must be a finite number >= 1, got {self.max_norm_ratio}")
        if not (math.isfinite(self.max_abs_weight) and self.max_abs_weight > 0):
            raise ValueError(f"max_abs_weight must be a positive finite number, got {self.max_abs_weight}")
        if not 1 <= self.max_cases <= MAX_CASES:
            raise ValueError(f"max_cases must be between 1 and {MAX_CASES}, got {self.max_cases}")


class RejectedUpdate(ValueError):
    """A site update failed a guard; it must not be averaged."""


def _is_float(arr: np.ndarray) -> bool:
    return bool(np.issubdtype(arr.dtype, np.floating))


def weights_norm(weights: Mapping[str, np.ndarray]) -> float:
    """Euclidean norm over all floating tensors together (float64 accumulation)."""
    total = 0.0
    for v in weights.values():
        a = np.asarray(v)
        if _is_float(a):
            a64 = a.astype(np.float64, copy=False).ravel()
            total += float(np.dot(a64, a64))
    return math.sqrt(total)


def check_case_count(site: str, claimed: Any, pinned: Mapping[str, int], rules: AggregationRules) -> int:
    """The FedAvg weight of ``site``: its pinned count; refuse a missing pin or a different claim."""
    if site not in pinned:
        raise RejectedUpdate(f"site {site!r} has no accepted fingerprint that pins its case count")
    n = pinned[site]
    if type(n) is not int or not 1 <= n <= rules.max_cases:
        raise RejectedUpdate(f"site {site!r}: pinned case count {n!r} is not an integer in 1..{rules.max_cases}")
    if claimed is not None and (type(claimed) is not int or claimed != n):
        raise RejectedUpdate(f"site {site!r} claims {claimed!r} cases, its fingerprint has {n}")
    return n


def check_tensors(update: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray],
                  rules: AggregationRules) -> None:
    """Raise :class:`RejectedUpdate` unless ``update`` has the global model's tensors, finite and bounded."""
    if set(update) != set(global_weights):
        diff = sorted(set(update) ^ set(global_weights))
        raise RejectedUpdate(f"tensor names differ from the global model: {diff[:5]}")
    for k, ref in global_weights.items():
        u = np.asarray(update[k])
        ref = np.asarray(ref)
        if u.shape != ref.shape or u.dtype != ref.dtype:
            raise RejectedUpdate(f"tensor {k!r}: {u.dtype}{u.shape}, global model has {ref.dtype}{ref.shape}")
        if _is_float(u) and u.size:
            if not np.all(np.isfinite(u)):
                raise RejectedUpdate(f"tensor {k!r} holds NaN or inf")
            biggest = float(np.max(np.abs(u)))
            if biggest > rules.max_abs_weight:
                raise RejectedUpdate(f"tensor {k!r} holds |w| = {biggest:.3g} > {rules.max_abs_weight:.3g}")


def check_update(update: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray],
                 rules: AggregationRules, reference: Mapping[str, np.ndarray] | None = None) -> None:
    """Raise :class:`RejectedUpdate` unless ``update`` keeps every rule.

    ``global_weights`` is the model the update was trained from; ``reference``
    the fixed model of the norm bound (the first global). Without
    ``reference`` the norm bound is taken against ``global_weights`` and the
    step rule is off: the older per-round rule, which compounds over rounds
    (kept for callers that have not adopted the first global as reference).
    """
    check_tensors(update, global_weights, rules)
    ref = weights_norm(reference if reference is not None else global_weights)
    n = weights_norm(update)
    if ref > 0:
        r = rules.max_norm_ratio
        if not ref / r <= n <= ref * r:
            what = "first global" if reference is not None else "previous global"
            raise RejectedUpdate(
                f"update norm {n:.4g} is outside [{ref / r:.4g}, {ref * r:.4g}] ({what} norm {ref:.4g} "
                f"divided/multiplied by {r:g})"
            )
    g = weights_norm(global_weights)
    if reference is not None and g > 0:
        d = weights_norm({k: np.asarray(update[k], np.float64) - np.asarray(global_weights[k], np.float64)
                          for k in global_weights if _is_float(np.asarray(global_weights[k]))})
        if d > rules.max_delta_ratio * g:
            raise RejectedUpdate(
                f"update moves {d:.4g} away from the global model, more than {rules.max_delta_ratio:g} x its "
                f"norm {g:.4g} (sign flip, noise or a scaled model)"
            )


def fedavg(updates: Sequence[tuple[Mapping[str, np.ndarray], int]], *, max_cases: int = MAX_CASES) -> Weights:
    """Average weights, weighted by case count (FedAvg).

    ``w = sum_k n_k w_k / sum_k n_k``, accumulated in float64 and cast back to
    each tensor's dtype (integer tensors are rounded to the nearest integer).

    Raises
    ------
    ValueError
        No updates, a case count that is not an integer in ``1..max_cases``,
        or tensors whose names or shapes differ.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    counts = [n for _, n in updates]
    if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= max_cases
           for n in counts):
        shown = [n if isinstance(n, (int, np.integer)) and abs(n) < 10**12 else "(huge)" for n in counts]
        raise ValueError(f"case counts must be positive integers up to {max_cases}, got {shown}")
    counts = [int(n) for n in counts]
    names = set(updates[0][0])
    for w, _ in updates[1:]:
        if set(w) != names:
            raise ValueError(f"updates hold different tensors: {sorted(names ^ set(w))}")
    total = float(sum(counts))
    out: Weights = {}
    for name in sorted(names):
        first = np.asarray(updates[0][0][name])
        acc = np.zeros(first.shape, dtype=np.float64)
        for (w, _), n in zip(updates, counts):
            arr = np.asarray(w[name])
            if arr.shape != first.shape:
                raise ValueError(f"tensor {name!r}: shapes {first.shape} and {arr.shape} differ")
            acc += arr.astype(np.float64) * (n / total)
        if np.issubdtype(first.dtype, np.integer) or first.dtype == np.bool_:
            acc = np.rint(acc)
        out[name] = acc.astype(first.dtype)
    return out


def _parse_aggregator(text: str) -> tuple[str, float]:
    if text in ("fedavg", "median"):
        return text, 0.0
    if isinstance(text, str) and text.startswith("trimmed:"):
        try:
            f = float(text.split(":", 1)[1])
        except ValueError:
            f = -1.0
        if 0.0 <= f < 0.5:
            return "trimmed", f
    raise ValueError(f"aggregator must be fedavg, median or trimmed:F with 0 <= F < 0.5, got {str(text)[:40]!r}")


def combine(updates: Sequence[tuple[Mapping[str, np.ndarray], int]], rules: AggregationRules) -> Weights:
    """The new global model from accepted ``(weights, FedAvg weight)`` pairs, by ``rules.aggregator``.

    ``fedavg``: :func:`fedavg`. ``median``: coordinate-wise median of the
    updates (weights ignored). ``trimmed:F``: per coordinate, the mean after
    dropping the ``floor(F * n)`` lowest and highest values (weights ignored).
    Accumulated in float64, cast back to each tensor's dtype (integers rounded).
    """
    kind, frac = _parse_aggregator(rules.aggregator)
    if kind == "fedavg":
        return fedavg(updates, max_cases=rules.max_cases)
    if not updates:
        raise ValueError("aggregation needs at least one update")
    names = set(updates[0][0])
    for w, _ in updates[1:]:
        if set(w) != names:
            raise ValueError(f"updates hold different tensors: {sorted(names ^ set(w))}")
    out: Weights = {}
    k = int(math.floor(frac * len(updates)))
    for name in sorted(names):
        first = np.asarray(updates[0][0][name])
        stack = np.stack([np.asarray(w[name], dtype=np.float64) for w, _ in updates])
        if kind == "median":
            acc = np.median(stack, axis=0)
        else:
            stack.sort(axis=0)
            acc = stack[k:len(updates) - k].mean(axis=0)
        if np.issubdtype(first.dtype, np.integer) or first.dtype == np.bool_:
            acc = np.rint(acc)
        out[name] = acc.astype(first.dtype)
    return out


def check_server_momentum(beta: Any) -> float:
    """``beta`` as a float in ``[0, 1)``; ``ValueError`` otherwise."""
    try:
        value = float(beta)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(beta, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"server momentum must be a number with 0 <= beta < 1, got {str(beta)[:40]!r}")
    return value


def server_momentum_step(combined: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray],
                         previous: Mapping[str, np.ndarray] | None, beta: float) -> Weights:
    """The next global model with server momentum: ``combined + beta * (current - previous)``.

    FedAvgM (Hsu, Qi and Brown 2019, arXiv:1909.06335) with server learning rate 1:
    the server's momentum buffer after round ``t`` is the global model's last step
    ``g_t - g_(t-1)``, so the next global is the round's combination (FedAvg or a robust
    aggregator) plus ``beta`` times that step. The step is taken from the two published
    global models themselves (``current`` and ``previous``), so a coordinator that resumes
    from storage continues exactly where it stopped. ``previous`` None (the first round)
    or ``beta`` 0 returns the combination unchanged. Floating tensors only, accumulated
    in float64 and cast back; other tensors keep the combination's values.
    """
    beta = check_server_momentum(beta)
    if previous is None or beta == 0.0:
        return dict(combined)
    out: Weights = {}
    for name, value in combined.items():
        arr = np.asarray(value)
        if not _is_float(arr):
            out[name] = arr
            continue
        step = np.asarray(current[name], np.float64) - np.asarray(previous[name], np.float64)
        out[name] = (arr.astype(np.float64) + beta * step).astype(arr.dtype)
    return out


def parse_weighting(text: str) -> tuple[str, int]:
    """``cases`` | ``equal`` | ``capped:N`` -> (policy, N); ``ValueError`` otherwise."""
    if text in ("cases", "equal"):
        return text, 0
    if isinstance(text, str) and text.startswith("capped:") and text[7:].isdigit() and int(text[7:]) >= 1:
        return "capped", int(text[7:])
    raise ValueError(f"weighting must be cases, equal or capped:N (N >= 1), got {str(text)[:40]!r}")


def fedavg_weights(counts: Mapping[str, int], weighting: str = "cases") -> dict[str, int]:
    """Each site's FedAvg weight from its case count: ``cases`` n_k, ``equal`` 1, ``capped:N`` min(n_k, N)."""
    policy, cap = parse_weighting(weighting)
    if policy == "cases":
        return {s: int(n) for s, n in counts.items()}
    if policy == "equal":
        return {s: 1 for s in counts}
    return {s: min(int(n), cap) for s, n in counts.items()}


@dataclass(frozen=True)
class Aggregate:
    """Result of :func:`aggregate`.

    Attributes
    ----------
    weights: the new global weights.
    contributors: ``(site, case count)`` of the averaged updates, by site name.
    rejected: reason by site for every refused update.
    """

    weights: Weights
    contributors: tuple[tuple[str, int], ...]
    rejected: Mapping[str, str] = field(default_factory=dict)


def aggregate(
    updates: Mapping[str, tuple[Mapping[str, np.ndarray], int | None]],
    global_weights: Mapping[str, np.ndarray],
    pinned: Mapping[str, int],
    rules: AggregationRules | None = None,
    *,
    min_updates: int = 1,
    reference: Mapping[str, np.ndarray] | None = None,
    weights: Mapping[str, int] | None = None,
) -> Aggregate:
    """Check every site's update, then FedAvg the accepted ones with their pinned case counts.

    Parameters
    ----------
    updates: site -> (weights, claimed case count or None).
    global_weights: the global model the updates were trained from.
    pinned: site -> case count of its accepted fingerprint.
    rules: the limits (default :class:`AggregationRules`).
    min_updates: fewest accepted updates; fewer raise ``ValueError``.
    reference: the fixed model of the norm bound (the first global model);
        with it the step rule applies too. Default: the per-round bound against
        ``global_weights`` only, which compounds over rounds.
    weights: site -> FedAvg weight (default the pinned case counts; see
        :func:`fedavg_weights`).
    """
    rules = rules or AggregationRules()
    valid: list[tuple[str, Mapping[str, np.ndarray], int]] = []
    rejected: dict[str, str] = {}
    for site in sorted(updates):
        w, claimed = updates[site]
        try:
            n = check_case_count(site, claimed, pinned, rules)
            check_update(w, global_weights, rules, reference)
        except RejectedUpdate as exc:
            rejected[site] = str(exc)
            continue
        valid.append((site, w, n if weights is None else int(weights[site])))
    if len(valid) < max(1, min_updates):
        raise ValueError(f"only {len(valid)} acceptable update(s), need {max(1, min_updates)}; "
                         f"rejected: {rejected}")
    new = combine([(w, n) for _, w, n in valid], rules)
    return Aggregate(new, tuple((s, n) for s, _, n in valid), rejected)


# --------------------------------------------------------------------------- fingerprints

_INTENSITY_KEYS = ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_fingerprint_body(body: Any, claimed: int | None = None, rules: AggregationRules | None = None) -> int:
    """Validate a site's fingerprint message; return its case count.

    ``body`` is ``{"fingerprint": ..., "dataset": {labels, channel_names,
    file_ending}, "num_cases": n}``. Checks every field the merge reads: per-case
    ``spacings`` (3 positive finite numbers) and ``shapes_after_crop`` (3
    positive integers) with exactly ``n`` entries, finite intensity statistics,
    ``1 <= n <= rules.max_cases`` and, where given, ``n == claimed``.

    Raises
    ------
    ValueError
        What is wrong, without echoing the whole body.
    """
    rules = rules or AggregationRules()
    if not isinstance(body, dict) or set(body) != {"fingerprint", "dataset", "num_cases"}:
        raise ValueError("fingerprint message must be an object with keys fingerprint, dataset, num_cases")
    n = body["num_cases"]
    if type(n) is not int or not 1 <= n <= rules.max_cases:
        raise ValueError(f"num_cases must be an integer in 1..{rules.max_cases}")
    if claimed is not None and claimed != n:
        raise ValueError(f"num_cases {n} differs from the signed header's {claimed}")
    ds = body["dataset"]
    if not isinstance(ds, dict) or not {"labels", "channel_names", "file_ending"} <= set(ds):
        raise ValueError("dataset header must hold labels, channel_names and file_ending")
    if not isinstance(ds["labels"], dict) or not isinstance(ds["channel_names"], dict) \
            or not isinstance(ds["file_ending"], str):
        raise ValueError("dataset header: labels and channel_names must be objects, file_ending a string")
    fp = body["fingerprint"]
    if not isinstance(fp, dict):
        raise ValueError("fingerprint must be an object")
    sp, sh = fp.get("spacings"), fp.get("shapes_after_crop")
    if not isinstance(sp, list) or not isinstance(sh, list) or len(sp) != n or len(sh) != n:
        raise ValueError(f"spacings and shapes_after_crop must list exactly num_cases = {n} cases")
    for s in sp:
        if not isinstance(s, list) or len(s) != 3 or not all(_finite(v) and 0 < v <= MAX_SPACING for v in s):
            raise ValueError(f"every spacing must be 3 positive finite numbers up to {MAX_SPACING:g} mm")
    for s in sh:
        if not isinstance(s, list) or len(s) != 3 or not all(type(v) is int and 0 < v < 2**31 for v in s):
            raise ValueError("every shape after cropping must be 3 positive integers")
    props = fp.get("foreground_intensity_properties_per_channel")
    if not isinstance(props, dict) or not props:
        raise ValueError("foreground_intensity_properties_per_channel must be a non-empty object")
    for ch, st in props.items():
        if not isinstance(st, dict) or not all(_finite(st.get(k)) for k in _INTENSITY_KEYS):
            raise ValueError(f"channel {str(ch)[:20]!r}: intensity statistics must be finite numbers "
                             f"({', '.join(_INTENSITY_KEYS)})")
        if not all(abs(st[k]) <= MAX_INTENSITY for k in _INTENSITY_KEYS):
            raise ValueError(f"channel {str(ch)[:20]!r}: intensity statistics must lie within "
                             f"+-{MAX_INTENSITY:g}")
        if st["std"] < 0:
            raise ValueError(f"channel {str(ch)[:20]!r}: negative std")
    if not _finite(fp.get("median_relative_size_after_cropping")):
        raise ValueError("median_relative_size_after_cropping must be a finite number")
    return n
