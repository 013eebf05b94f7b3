"""Bootstrap confidence intervals: by patient (cluster bootstrap) and for independent values.

Two cases occur in a study:

* **scan-level values clustered by patient** (a patient may have several CTs): resample
  *patients* with replacement and keep all of a drawn patient's scans
  (:func:`cluster_bootstrap_ci`). Drawing ``P`` patients with replacement is the same as
  giving patient ``j`` a weight ``c_j`` with ``(c_1 .. c_P) ~ Multinomial(P, 1/P)``; the
  statistic of a resample is then the weighted median or mean of the scan values, which is
  computed for all resamples at once.
* **one value per patient** (after aggregating a patient's scans): the ordinary bootstrap,
  through :func:`scipy.stats.bootstrap` (:func:`bootstrap_ci`).

Both give percentile intervals by default (``bca`` is offered for the second when every value
is finite). Values may hold ``+-inf`` (a failed distance); medians follow them, a mean with
both ``+inf`` and ``-inf`` is undefined (NaN). Every interval is reproducible: the generator is
seeded from ``seed``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from oarbench.stats.ranktests import quantile_inf

__all__ = [
    "BootstrapOptions",
    "BOOTSTRAP_STATISTICS",
    "cluster_bootstrap_ci",
    "bootstrap_ci",
    "median_inf",
    "mean_inf",
]

#: Statistics the intervals are offered for.
BOOTSTRAP_STATISTICS: tuple[str, ...] = ("median", "mean")
_METHODS = ("percentile", "bca")


@dataclass(frozen=True)
class BootstrapOptions:
    """How bootstrap intervals are drawn.

    Attributes
    ----------
    n_resamples : number of bootstrap resamples (0: no intervals).
    seed : seed of :func:`numpy.random.default_rng`; the same seed gives the same intervals.
    confidence : two-sided coverage of the interval (0.95: the 2.5 % and 97.5 % percentiles).
    method : ``percentile`` or ``bca`` (bias-corrected and accelerated; used only for one value
        per patient with every value finite, else the percentile interval is used).
    min_clusters : fewer patients than this give NaN bounds (a bootstrap of 1 or 2 patients
        says nothing).
    """

    n_resamples: int = 2000
    seed: int = 12345
    confidence: float = 0.95
    method: str = "percentile"
    min_clusters: int = 3

    def __post_init__(self) -> None:
        if int(self.n_resamples) != self.n_resamples or self.n_resamples < 0:
            raise ValueError(f"n_resamples must be an integer >= 0, got {self.n_resamples}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"bootstrap confidence must be in (0, 1), got {self.confidence}")
        if self.method not in _METHODS:
            raise ValueError(f"bootstrap method must be one of {', '.join(_METHODS)}, got {self.method!r}")
        if self.min_clusters < 2:
            raise ValueError(f"min_clusters must be >= 2, got {self.min_clusters}")


def median_inf(x: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """Median along ``axis`` on the extended reals: the middle two of ``-inf`` and ``+inf`` give 0."""
    x = np.asarray(x, dtype=float)
    s = np.sort(x, axis=axis)
    n = s.shape[axis]
    lo = np.take(s, (n - 1) // 2, axis=axis)
    hi = np.take(s, n // 2, axis=axis)
    out = _mid(lo, hi)
    return float(out) if np.ndim(out) == 0 else out


def mean_inf(x: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """Mean along ``axis``; ``+inf`` if any value is ``+inf`` (``-inf`` likewise), NaN if both."""
    x = np.asarray(x, dtype=float)
    with np.errstate(invalid="ignore"):
        out = np.mean(x, axis=axis)
    return float(out) if np.ndim(out) == 0 else out


def _mid(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        out = np.where(lo == hi, lo, (lo + hi) / 2.0)
    return np.where(np.isnan(out) & np.isinf(lo) & np.isinf(hi), 0.0, out)


def _percentile_interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    if np.isnan(boot).any():
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    return quantile_inf(boot, tail), quantile_inf(boot, 1.0 - tail)


def _check_values(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    if np.isnan(v).any():
        raise ValueError(f"{name} contains NaN; drop absent values first")
    return v


@functools.lru_cache(maxsize=8)
def _cluster_draws(seed: int, n_clusters: int, n_resamples: int) -> np.ndarray:
    """How often each of ``n_clusters`` patients is drawn in each resample (read-only).

    It depends only on the seed and the two counts, so every metric and statistic of a
    group, and every group with as many patients, shares one draw (as before, when each
    call drew it again from the same seed).
    """
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_resamples)
    counts.setflags(write=False)
    return counts


def cluster_bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence[object] | np.ndarray,
    statistic: str,
    options: BootstrapOptions = BootstrapOptions(),
) -> tuple[float, float]:
    """Percentile interval of the median or mean of ``values``, resampling whole clusters.

    Parameters
    ----------
    values : one value per scan (may hold ``+-inf``, not NaN), in the metric's unit.
    clusters : the patient of each scan (any hashable labels), same length as ``values``.
    statistic : ``median`` or ``mean`` (of all scan values of the drawn patients, with a
        patient drawn twice counting twice).
    options : resamples, seed, confidence.

    Returns
    -------
    (low, high); NaN when there are no resamples, fewer than ``options.min_clusters``
    patients, or a mean with both ``+inf`` and ``-inf``.
    """
    if statistic not in BOOTSTRAP_STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(BOOTSTRAP_STATISTICS)}, got {statistic!r}")
    v = _check_values(values, "values")
    labels = np.asarray(clusters, dtype=object).ravel()
    if labels.size != v.size:
        raise ValueError(f"values and clusters differ in length: {v.size} and {labels.size}")
    _, cl = np.unique(labels.astype(str), return_inverse=True)
    n_clusters = int(cl.max()) + 1 if cl.size else 0
    if options.n_resamples == 0 or n_clusters < options.min_clusters:
        return math.nan, math.nan
    counts = _cluster_draws(options.seed, n_clusters, options.n_resamples)
    order = np.argsort(v, kind="stable")
    v, cl = v[order], cl[order]
    weights = counts[:, cl].astype(np.int64)  # resample x scan, in sorted order of the values
    if statistic == "mean":
        finite = np.where(np.isinf(v), 0.0, v)
        total = weights.sum(axis=1)
        boot = weights @ finite / total
        pos = (weights[:, v == np.inf] > 0).any(axis=1)
        neg = (weights[:, v == -np.inf] > 0).any(axis=1)
        boot = np.where(pos, np.inf, boot)
        boot = np.where(neg, -np.inf, boot)
        boot = np.where(pos & neg, np.nan, boot)
    else:
        cum = np.cumsum(weights, axis=1)
        total = cum[:, -1]
        # element j holds the expanded positions cum[j-1] .. cum[j]-1 (0-based)
        lo = (cum <= ((total - 1) // 2)[:, None]).sum(axis=1)
        hi = (cum <= (total // 2)[:, None]).sum(axis=1)
        boot = _mid(v[lo], v[hi])
    return _percentile_interval(np.asarray(boot, dtype=float), options.confidence)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: str,
    options: BootstrapOptions = BootstrapOptions(),
) -> tuple[float, float]:
    """Interval of the median or mean of independent values (one per patient), by
    :func:`scipy.stats.bootstrap`.

    ``percentile`` always; ``bca`` when ``options.method`` asks for it and every value is
    finite (the jackknife of BCa is undefined with infinities; the percentile interval is used
    then). NaN bounds when there are fewer than ``options.min_clusters`` values or no
    resamples. All values equal: every resample gives that value, so the interval is
    ``(value, value)``.
    """
    from scipy.stats import bootstrap

    if statistic not in BOOTSTRAP_STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(BOOTSTRAP_STATISTICS)}, got {statistic!r}")
    v = _check_values(values, "values")
    if options.n_resamples == 0 or v.size < options.min_clusters:
        return math.nan, math.nan
    if np.all(v == v[0]):
        return float(v[0]), float(v[0])
    func = median_inf if statistic == "median" else mean_inf
    method = "BCa" if (options.method == "bca" and np.isfinite(v).all()) else "percentile"
    if method == "percentile":
        # the same draws scipy makes, with the inf-safe percentile of this module
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # scipy's standard error of an inf sample
            res = bootstrap((v,), func, n_resamples=options.n_resamples, confidence_level=options.confidence,
                            method="percentile", rng=np.random.default_rng(options.seed), vectorized=True)
        boot = np.asarray(res.bootstrap_distribution, dtype=float)
        return _percentile_interval(boot, options.confidence)
    res = bootstrap((v,), func, n_resamples=options.n_resamples, confidence_level=options.confidence,
                    method=method, rng=np.random.default_rng(options.seed), vectorized=True)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
