"""Federated averaging over the secure storage exchange (:mod:`oarbench.train.exchange`).

Round protocol (round ``r`` counts aggregations done so far):

1. the coordinator publishes global weights ``round_r/global`` (round 0: the
   initial weights);
2. each site downloads them, trains E local epochs with its own optimizer
   state (never shared), and uploads ``round_r/update/<site>`` with its
   training-case count and the sha256 of the global weights it started from;
3. the coordinator waits until every site's update is accepted or rejected,
   or, after ``timeout_s``, until at least ``quorum`` are accepted; it
   averages the accepted updates weighted by case count (FedAvg) and
   publishes ``round_{r+1}/global``. After ``rounds`` aggregations the last
   global model is final.

Both sides keep no state of their own beyond storage (and the site's local
trainer state): restarted at any time they read storage, find the last
completed round and carry on.

Shared plans: before round 0 each site uploads its nnU-Net dataset
fingerprint (a summary: per-case spacing and shape after cropping, foreground
intensity statistics), the coordinator merges them with
:func:`merge_fingerprints`, plans once and publishes one signed plans file
(at the finest site's target spacing by default, :func:`nnunet_plans`).

The local training step is a plain callable (:class:`LocalTraining`), so the
protocol runs with a tiny numpy model in tests and with nnU-Net for real.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    from oarbench.train.nnunet import TrainerOptions

from oarbench.train._plans import PLAN_SPACINGS, check_plan_spacing
from oarbench.train.aggregate import (
    MAX_CASES,
    MAX_INTENSITY,
    AggregationRules,
    RejectedUpdate,
    Weights,
    check_case_count,
    check_fingerprint_body,
    check_server_momentum,
    check_tensors,
    check_update,
    combine,
    fedavg,
    fedavg_weights,
    parse_weighting,
    server_momentum_step,
    weights_norm,
)
from oarbench.train.exchange import (
    COORDINATOR,
    Exchange,
    RejectedObject,
    tensors_from_bytes,
    tensors_to_bytes,
)

__all__ = [
    "Weights",
    "LocalTraining",
    "FederationConfig",
    "RoundResult",
    "fedavg",
    "pinned_case_counts",
    "merge_fingerprints",
    "run_coordinator",
    "run_site",
    "publish_fingerprint",
    "make_shared_plans",
    "merge_site_messages",
    "nnunet_plans",
    "PLAN_SPACINGS",
    "check_plan_spacing",
    "fetch_plans",
    "frozen_counts",
    "latest_global_round",
    "simulate",
    "FEDERATED_DATASET",
    "shared_dataset_header",
    "nnunet_coordinator",
    "NnunetSite",
    "nnunet_site",
    "nnunet_simulate",
    "Stopped",
]

log = logging.getLogger(__name__)

class LocalTraining(Protocol):
    """One site's local training step.

    Called with the round number and the global weights; returns the new
    local weights (same names, shapes and dtypes) and the number of training
    cases they were trained on.
    """

    def __call__(self, round_: int, global_weights: Weights) -> tuple[Weights, int]: ...


@dataclass(frozen=True)
class FederationConfig:
    """Settings shared by the coordinator and the sites.

    Attributes
    ----------
    sites: names of the sites taking part.
    rounds: number of aggregation rounds.
    quorum: fewest accepted updates that may be aggregated after the timeout
        (default: all sites, i.e. wait for everyone).
    timeout_s: seconds the coordinator waits for the updates of one round
        before it aggregates a quorum (None: wait for all sites forever).
    poll_s: seconds between storage polls.
    recheck_s: seconds between full re-verifications (download, hash,
        decrypt) of a party's own latest object while it waits; a cheaper check
        (manifest, ciphertext size) runs at every poll. A missing or damaged
        own object is written again.
    server_momentum: the coordinator's momentum ``beta`` (0 <= beta < 1; 0, the
        default, is plain FedAvg): each new global model is the round's average
        plus ``beta`` times the last global step
        (:func:`oarbench.train.aggregate.server_momentum_step`).
    """

    sites: tuple[str, ...]
    rounds: int
    quorum: int | None = None
    timeout_s: float | None = None
    poll_s: float = 1.0
    recheck_s: float = 60.0
    server_momentum: float = 0.0

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError("a federation needs at least one site")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"site names must be distinct: {self.sites}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.quorum is not None and not 1 <= self.quorum <= len(self.sites):
            raise ValueError(f"quorum must be between 1 and {len(self.sites)}, got {self.quorum}")
        check_server_momentum(self.server_momentum)

    @property
    def min_sites(self) -> int:
        return len(self.sites) if self.quorum is None else self.quorum


@dataclass(frozen=True)
class RoundResult:
    """What the coordinator did in one round.

    Attributes
    ----------
    round: the round whose updates were aggregated (its result is global ``round + 1``).
    contributors: ``(site, case count)`` of the aggregated updates.
    rejected: reasons for refused objects.
    global_sha256: sha256 of the published global weights (serialised).
    seconds: wall-clock time from publishing global ``round`` to publishing ``round + 1``.
    """

    round: int
    contributors: tuple[tuple[str, int], ...]
    rejected: tuple[str, ...]
    global_sha256: str
    seconds: float


# --------------------------------------------------------------------------- aggregation


def _site_check(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> str | None:
    """A site's own sanity check of its training result (tensors, finite, bounded); the norm rules are the
    coordinator's."""
    try:
        check_tensors(update, reference, AggregationRules())
    except RejectedUpdate as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- fingerprints


def _mixture_quantile(q: float, cdfs: Sequence[tuple[np.ndarray, np.ndarray]], weights: np.ndarray) -> float:
    """Quantile ``q`` of a weighted mixture of piecewise-linear CDFs given as (x, F(x)) knots."""
    xs = np.unique(np.concatenate([x for x, _ in cdfs]))
    mix = np.zeros_like(xs)
    for (x, f), w in zip(cdfs, weights):
        mix += w * np.interp(xs, x, f, left=0.0, right=1.0)
    return float(np.interp(q, mix, xs))


def merge_fingerprints(fingerprints: Mapping[str, tuple[Mapping[str, Any], int]]) -> dict[str, Any]:
    """Merge sites' nnU-Net dataset fingerprints into one, weighted by case count.

    Parameters
    ----------
    fingerprints:
        site -> (fingerprint dict as nnU-Net's ``dataset_fingerprint.json``, case count).

    Returns
    -------
    dict
        A fingerprint in nnU-Net's format. Field by field:

        * ``spacings``, ``shapes_after_crop``: per-case lists concatenated in
          site-name order: exact (the same lists a pooled extraction gives, in
          another case order, which the planner does not use).
        * foreground intensity ``mean``: case-weighted mean of the site means;
          ``std``: pooled population standard deviation from the site means,
          standard deviations and case counts, ``sqrt(sum n_k (s_k^2 + m_k^2) / N
          - m^2)``; ``min``/``max``: minimum/maximum. These are exact for
          nnU-Net's sampled foreground pool, in which every case contributes
          the same number of samples, so a site weighs in proportion to its
          case count.
        * ``median``, ``percentile_00_5``, ``percentile_99_5``: approximated.
          Each site's intensity CDF is modelled as piecewise linear through
          (min, 0), (p0.5, 0.005), (median, 0.5), (p99.5, 0.995), (max, 1);
          the case-weighted mixture of these CDFs is inverted. Exact when all
          sites have the same distribution; otherwise an approximation.
        * ``median_relative_size_after_cropping``: case-weighted mean of the
          site medians (approximation; nnU-Net only compares it with 0.75).
    """
    try:
        with np.errstate(over="raise", invalid="raise"):
            return _merge_fingerprints(fingerprints)
    except (OverflowError, FloatingPointError):
        raise ValueError(f"fingerprints of {sorted(fingerprints)} hold values too large to merge (intensity "
                         f"statistics overflow); every value must lie within +-{MAX_INTENSITY:g}") from None


def _merge_fingerprints(fingerprints: Mapping[str, tuple[Mapping[str, Any], int]]) -> dict[str, Any]:
    if not fingerprints:
        raise ValueError("no fingerprints to merge")
    sites = sorted(fingerprints)
    counts = np.array([int(fingerprints[s][1]) for s in sites], dtype=np.float64)
    if np.any(counts <= 0):
        raise ValueError(f"case counts must be positive: {dict(zip(sites, counts))}")
    w = counts / counts.sum()
    fps = [fingerprints[s][0] for s in sites]
    for s, fp, n in zip(sites, fps, counts):
        if len(fp["spacings"]) != n or len(fp["shapes_after_crop"]) != n:
            raise ValueError(
                f"fingerprint of site {s!r} lists {len(fp['spacings'])} cases, but its case count is {int(n)}"
            )
    channels = [sorted(fp["foreground_intensity_properties_per_channel"], key=str) for fp in fps]
    if any(c != channels[0] for c in channels):
        raise ValueError(f"sites have different channels: {dict(zip(sites, channels))}")
    intensity: dict[str, dict[str, float]] = {}
    for ch in channels[0]:
        st = [fp["foreground_intensity_properties_per_channel"][ch] for fp in fps]
        means = np.array([s["mean"] for s in st], dtype=np.float64)
        stds = np.array([s["std"] for s in st], dtype=np.float64)
        mean = float(np.sum(w * means))
        var = float(np.sum(w * (stds**2 + means**2)) - mean**2)
        cdfs = []
        for s in st:
            x = np.array([s["min"], s["percentile_00_5"], s["median"], s["percentile_99_5"], s["max"]], float)
            f = np.array([0.0, 0.005, 0.5, 0.995, 1.0])
            x = np.maximum.accumulate(x)
            x = x + np.arange(5) * 1e-9 * max(1.0, abs(float(x[-1])))  # strictly increasing knots
            cdfs.append((x, f))
        intensity[str(ch)] = {
            "mean": mean,
            "median": _mixture_quantile(0.5, cdfs, w),
            "std": float(np.sqrt(max(var, 0.0))),
            "min": float(min(s["min"] for s in st)),
            "max": float(max(s["max"] for s in st)),
            "percentile_99_5": _mixture_quantile(0.995, cdfs, w),
            "percentile_00_5": _mixture_quantile(0.005, cdfs, w),
        }
    return {
        "spacings": [list(map(float, sp)) for fp in fps for sp in fp["spacings"]],
        "shapes_after_crop": [list(map(int, sh)) for fp in fps for sh in fp["shapes_after_crop"]],
        "foreground_intensity_properties_per_channel": intensity,
        "median_relative_size_after_cropping": float(
            np.sum(w * np.array([fp["median_relative_size_after_cropping"] for fp in fps], dtype=np.float64))
        ),
    }


def publish_fingerprint(exchange: Exchange, fingerprint: Mapping[str, Any], dataset_header: Mapping[str, Any],
                        num_cases: int) -> None:
    """Site side: upload the local fingerprint and the dataset's public header.

    ``dataset_header`` carries only ``labels``, ``channel_names`` and
    ``file_ending`` of the site's dataset.json (no file lists).
    """
    body = {"fingerprint": dict(fingerprint), "dataset": dict(dataset_header), "num_cases": int(num_cases)}
    me = exchange.keyring.identity
    try:
        exchange.put("fingerprint", -1, json.dumps(body, sort_keys=True).encode("utf-8"), num_cases=num_cases)
    except FileExistsError:  # a valid fingerprint of this site is committed (restart): it stands
        log.info("%s: fingerprint already uploaded (restart); keeping the committed one", me)


class Stopped(RuntimeError):
    """A party of a federation run on one machine gave up waiting because another party failed."""


def _wait(what: str, poll: Callable[[], Any], poll_s: float, timeout_s: float | None,
          stop: threading.Event | None = None) -> Any:
    start = time.monotonic()
    while True:
        got = poll()
        if got is not None:
            return got
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        if stop is not None and stop.is_set():
            raise Stopped(f"stopped waiting for {what}: another party failed")
        time.sleep(poll_s)


def _fingerprint_bodies(exchange: Exchange, sites: Sequence[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Accepted fingerprint messages of ``sites`` that pass :func:`check_fingerprint_body`; reasons for the rest."""
    accepted, rejected = exchange.collect("fingerprint", -1)
    bodies: dict[str, dict[str, Any]] = {}
    bad: dict[str, str] = {}
    for site, rec in accepted.items():
        if site not in sites:
            continue
        try:
            body = json.loads(rec.payload.decode("utf-8"))
            check_fingerprint_body(body, rec.header.num_cases)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            bad[site] = f"{rec.manifest_path}: invalid fingerprint: {exc}"
            continue
        bodies[site] = body
    return bodies, bad


def pinned_case_counts(exchange: Exchange, sites: Sequence[str]) -> dict[str, int]:
    """Case count of each site's accepted fingerprint: its FedAvg weight in every round.

    A site without a valid fingerprint in storage is missing from the result
    (its updates are then refused).
    """
    bodies, _ = _fingerprint_bodies(exchange, sites)
    return {s: int(b["num_cases"]) for s, b in bodies.items()}


def merge_site_messages(bodies: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge validated fingerprint messages by site: ``(merged fingerprint, dataset header with numTraining)``.

    Raises ``ValueError`` if the sites disagree on labels, channel names or file ending.
    """
    sites = sorted(bodies)
    if not sites:
        raise ValueError("no fingerprints to merge")
    ref = bodies[sites[0]]["dataset"]
    for s in sites:
        h = bodies[s]["dataset"]
        for key in ("labels", "channel_names", "file_ending"):
            if h.get(key) != ref.get(key):
                raise ValueError(f"site {s!r} has dataset.json {key} {h.get(key)!r}, site "
                                 f"{sites[0]!r} has {ref.get(key)!r}")
    merged = merge_fingerprints({s: (bodies[s]["fingerprint"], bodies[s]["num_cases"]) for s in sites})
    orientations = {s: bodies[s]["fingerprint"].get("oarbench_orientation") for s in sites}
    if any(o is not None and not isinstance(o, str) for o in orientations.values()) \
            or len(set(orientations.values())) > 1:  # cases harmonised to one orientation (oarbench.train.harmonise)
        raise ValueError(f"sites disagree on the orientation of their cases: "
                         f"{ {s: str(o)[:20] for s, o in orientations.items()} }")
    if orientations[sites[0]]:
        merged["oarbench_orientation"] = str(orientations[sites[0]])
    # which cases are whose (merged lists them site by site): the plans' target spacing may follow the sites
    merged[SITE_CASES_KEY] = [[s, int(bodies[s]["num_cases"])] for s in sites]
    header = {k: ref[k] for k in ("labels", "channel_names", "file_ending")}
    header["numTraining"] = int(sum(bodies[s]["num_cases"] for s in sites))
    return merged, header


#: Merged-fingerprint key: ``[[site, cases], ...]`` in the order its per-case lists hold the sites.
SITE_CASES_KEY = "oarbench_site_cases"

def nnunet_plans(merged: Mapping[str, Any], header: Mapping[str, Any], *, configuration: str = "3d_fullres",
                 width: str = "default", spacing: str = "finest") -> dict[str, Any]:
    """nnU-Net's default plans for the merged fingerprint, with the network width applied.

    ``spacing``: ``"finest"`` plans at the finest of the sites' own target
    spacings, axis by axis (each site's target by nnU-Net's rule on its cases
    alone), so no site's images are coarsened; ``"pooled"`` is nnU-Net's rule on
    all cases together (the median, which lies between the sites' grids).
    """
    from oarbench.train import nnunet as nn
    from oarbench.train._plans import reduce_width

    check_plan_spacing(spacing)
    groups = merged.get(SITE_CASES_KEY) if spacing == "finest" else None
    if spacing == "finest" and not groups:
        raise ValueError("the merged fingerprint does not say which cases are whose; it cannot plan at the finest "
                         "site's spacing")
    fingerprint = {k: v for k, v in merged.items() if k != SITE_CASES_KEY}
    plans = nn.plan_from_fingerprint(fingerprint, dict(header), name=FEDERATED_DATASET, spacing_groups=groups)
    return reduce_width(plans, configuration, width)


def make_shared_plans(
    exchange: Exchange,
    config: FederationConfig,
    plan: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]],
    *,
    timeout_s: float | None = None,
    weighting: str = "cases",
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Coordinator side: wait for all sites' fingerprints, merge, plan once, publish signed plans.

    The plans message also freezes every site's case count (from its
    fingerprint, now) and its FedAvg weight under the ``weighting`` policy
    (:func:`oarbench.train.aggregate.fedavg_weights`): the coordinator uses
    these in every round, whatever a site publishes later.

    ``plan(merged_fingerprint, dataset_header)`` returns the plans dict (for
    nnU-Net: :func:`oarbench.train.nnunet.plan_from_fingerprint`). If plans
    are already published (restart), they are returned unchanged.

    Raises
    ------
    ValueError
        A site's signed fingerprint is malformed (the site cannot replace it:
        the first committed object of a slot stands), or sites disagree on
        labels or channels.
    """
    parse_weighting(weighting)
    _check_roster(exchange, config)
    existing = exchange.get_valid("plans", -1, "plans")
    if existing is not None:
        return _plans_message(existing)["plans"]

    def poll() -> dict | None:
        bodies, bad = _fingerprint_bodies(exchange, config.sites)
        if bad:
            raise ValueError("; ".join(sorted(bad.values())))
        return bodies if len(bodies) == len(config.sites) else None

    bodies = _wait("all sites' fingerprints", poll, config.poll_s, timeout_s, stop)
    merged, header = merge_site_messages(bodies)
    plans = plan(merged, header)
    counts = {s: int(bodies[s]["num_cases"]) for s in sorted(bodies)}
    message = {"plans": plans, "dataset": header, "case_counts": counts, "weighting": weighting,
               "weights": fedavg_weights(counts, weighting)}
    try:
        exchange.put("plans", -1, json.dumps(message, sort_keys=True).encode("utf-8"))
    except FileExistsError:  # a second coordinator process committed first: its plans stand
        got = exchange.get("plans", -1, "plans")
        if got is None:  # pragma: no cover - committed a moment ago
            raise
        return _plans_message(got)["plans"]
    log.info("coordinator: plans published; case counts %s frozen, FedAvg weights (%s) %s", counts, weighting,
             message["weights"])
    return plans


def _check_roster(exchange: Exchange, config: FederationConfig) -> None:
    """The coordinator refuses to wait for sites whose keys are not on its roster (it could never accept them)."""
    missing = sorted(set(config.sites) - set(exchange.keyring.trusted))
    if missing:
        raise ValueError(f"site(s) {missing} are not on the coordinator's roster (no public keys): add their "
                         f"public files and sign the roster again ('oarbench fl roster')")


def _plans_message(rec: Any) -> dict[str, Any]:
    """The coordinator's signed plans message: plans, dataset header, frozen case counts and FedAvg weights."""
    try:
        msg = json.loads(rec.payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{rec.manifest_path}: plans message is not JSON ({exc})") from None
    keys = {"plans", "dataset", "case_counts", "weighting", "weights"}
    if not isinstance(msg, dict) or set(msg) != keys:
        raise ValueError(f"{rec.manifest_path}: plans message must hold exactly {sorted(keys)}")
    for k in ("case_counts", "weights"):
        if not isinstance(msg[k], dict) or not all(type(v) is int and 1 <= v <= MAX_CASES for v in msg[k].values()):
            raise ValueError(f"{rec.manifest_path}: {k} must map sites to integers in 1..{MAX_CASES}")
    return msg


def frozen_counts(exchange: Exchange) -> tuple[dict[str, int], dict[str, int]] | None:
    """``(case counts, FedAvg weights)`` by site, frozen in the coordinator's signed plans; None before planning."""
    got = exchange.get_valid("plans", -1, "plans")
    if got is None:
        return None
    msg = _plans_message(got)
    return dict(msg["case_counts"]), dict(msg["weights"])


def fetch_plans(exchange: Exchange, *, poll_s: float = 1.0, timeout_s: float | None = None,
                stop: threading.Event | None = None) -> dict[str, Any]:
    """Site side: wait for the coordinator's signed plans and return them."""
    got = _wait("the coordinator's plans", lambda: exchange.get_valid("plans", -1, "plans"), poll_s, timeout_s,
                stop)
    return _plans_message(got)["plans"]


# --------------------------------------------------------------------------- rounds


def _global_rounds(exchange: Exchange) -> list[int]:
    """Round numbers that have a global manifest in storage (not yet verified)."""
    try:
        entries = exchange.fs.ls(exchange._full(""), detail=False)
    except FileNotFoundError:
        return []
    rounds = []
    for p in entries:
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("round_") and name[6:].isdigit() and len(name) <= 13:
            if exchange._exists(f"{name}/global/global.manifest.json"):
                rounds.append(int(name[6:]))
    return sorted(rounds)


def latest_global_round(exchange: Exchange, max_round: int | None = None) -> int:
    """Highest round (at most ``max_round``) whose global model passes every check, or -1 if none.

    A global manifest that fails verification (planted, altered, unsigned) is
    logged and skipped, so it can neither end a federation early nor stop it.
    """
    for r in reversed(_global_rounds(exchange)):
        if max_round is not None and r > max_round:
            continue
        try:
            if exchange.get("global", r, "global") is not None:
                return r
        except RejectedObject as exc:
            exchange._log_once(logging.WARNING, str(exc))
    return -1


def _read_global(exchange: Exchange, round_: int) -> tuple[Weights, str] | None:
    got = exchange.get_valid("global", round_, "global")
    if got is None:
        return None
    return tensors_from_bytes(got.payload), got.header.sha256


def _publish_global(exchange: Exchange, round_: int, weights: Mapping[str, np.ndarray], **kw: Any) -> str:
    """Publish global ``round_``; if another coordinator process committed it first, keep theirs."""
    try:
        return exchange.put("global", round_, tensors_to_bytes(dict(weights)), **kw).sha256
    except FileExistsError:
        got = exchange.get("global", round_, "global")
        if got is None:  # pragma: no cover - committed a moment ago
            raise
        log.warning("coordinator: global model of round %d was committed by another process; keeping it", round_)
        return got.header.sha256


def run_coordinator(
    exchange: Exchange,
    config: FederationConfig,
    initial_weights: Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]],
    *,
    stop: threading.Event | None = None,
    case_counts: Mapping[str, int] | None = None,
    rules: AggregationRules | None = None,
    weighting: str = "cases",
) -> list[RoundResult]:
    """Run (or resume) the coordinator until the final global model is published.

    Each site's case count and FedAvg weight are frozen: to ``case_counts``
    (weighted by ``weighting``) where given, else to the counts and weights in
    the coordinator's signed plans, else (no plans: a protocol without
    planning) to the case count of each site's accepted fingerprint when this
    call first sees it. An update claiming another count, or failing a rule of
    :mod:`oarbench.train.aggregate` (norm bound against the first global
    model), is refused for the round.

    An object that fails verification (missing or damaged ciphertext, a
    copied or planted manifest) is not a refusal: its owner replaces it, so
    the round waits for it (within ``config.timeout_s``). The coordinator
    keeps its own current global model intact the same way.

    Returns the results of the rounds aggregated in this call (none if the
    federation had already finished).

    Raises
    ------
    RuntimeError
        Fewer than the quorum of sites delivered a valid update in time.
    """
    if exchange.keyring.identity != COORDINATOR:
        raise ValueError(f"the coordinator must use the {COORDINATOR!r} keys, not {exchange.keyring.identity!r}")
    rules = rules or AggregationRules()
    parse_weighting(weighting)
    _check_roster(exchange, config)
    current = latest_global_round(exchange, config.rounds)
    if current < 0:
        init = initial_weights() if callable(initial_weights) else initial_weights
        _publish_global(exchange, 0, init)
        log.info("coordinator: published initial global model (round 0)")
        current = 0
    first = exchange.get_valid("global", 0, "global")
    if first is None:  # round 0 damaged after later rounds verified: publish it again
        init = initial_weights() if callable(initial_weights) else initial_weights
        _publish_global(exchange, 0, init)
        first = exchange.get("global", 0, "global")
    reference = tensors_from_bytes(first.payload)
    counts: dict[str, int] = {}
    weights: dict[str, int] = {}
    if case_counts is not None:
        counts = dict(case_counts)
        weights = fedavg_weights(counts, weighting)
    results: list[RoundResult] = []
    stepped: set[tuple[int, str]] = set()  # (round, site) whose step size was logged
    previous: Weights | None = None  # the global model of the round before (server momentum)
    while current < config.rounds:
        started = time.monotonic()
        got = exchange.get("global", current, "global")
        if got is None:  # pragma: no cover - listed a moment ago
            raise RuntimeError(f"global model of round {current} vanished from {exchange.url}")
        global_w, global_sha = tensors_from_bytes(got.payload), got.header.sha256
        cap = len(got.payload) + 64 * 1024  # an update has the global model's tensors: about its size
        deadline = None if config.timeout_s is None else started + config.timeout_s
        last_deep = time.monotonic()
        while True:
            deep = time.monotonic() - last_deep >= config.recheck_s
            if deep:
                last_deep = time.monotonic()
            exchange.ensure("global", current, got.payload, parent=got.header.parent,
                            num_cases=got.header.num_cases, deep=deep)
            if case_counts is None:
                frozen = frozen_counts(exchange)
                if frozen is not None:
                    counts, weights = frozen
                else:
                    for s, n in pinned_case_counts(exchange, config.sites).items():
                        if s not in counts:  # frozen at first sight
                            counts[s] = n
                            weights[s] = fedavg_weights({s: n}, weighting)[s]
            accepted, rejected = exchange.collect("update", current, parent=global_sha, max_size=cap)
            valid: dict[str, tuple[Weights, int]] = {}
            refused: set[str] = set()
            for site, rec in accepted.items():
                if site not in config.sites:
                    rejected[rec.manifest_path] = f"{rec.manifest_path}: site {site!r} is not in this federation"
                    continue
                try:
                    w = tensors_from_bytes(rec.payload)
                except Exception as exc:  # safetensors raises its own error types
                    rejected[rec.manifest_path] = f"{rec.manifest_path}: not a safetensors payload ({exc})"
                    refused.add(site)
                    continue
                try:
                    check_case_count(site, rec.header.num_cases, counts, rules)
                    check_update(w, global_w, rules, reference)
                except RejectedUpdate as exc:
                    rejected[rec.manifest_path] = f"{rec.manifest_path}: {exc}"
                    exchange._log_once(logging.WARNING, rejected[rec.manifest_path])
                    refused.add(site)
                    continue
                valid[site] = (w, weights[site])
                if log.isEnabledFor(logging.INFO) and (current, site) not in stepped:
                    stepped.add((current, site))
                    g_norm = weights_norm(global_w)
                    step = weights_norm({k: np.asarray(w[k], np.float64) - np.asarray(global_w[k], np.float64)
                                         for k in global_w if np.issubdtype(np.asarray(global_w[k]).dtype,
                                                                            np.floating)})
                    log.info("coordinator: round %d, site %s: step %.4g x the global's norm (limit %g)", current,
                             site, step / g_norm if g_norm > 0 else float("nan"), rules.max_delta_ratio)
            # a verified update that breaks a rule settles its site for the round; an object that fails
            # verification does not (its owner replaces it), nor does a .bin without manifest
            settled = set(valid) | (refused & set(config.sites))
            if len(valid) == len(config.sites):
                break
            if settled >= set(config.sites) or (deadline is not None and time.monotonic() > deadline):
                if len(valid) >= config.min_sites:
                    break
                raise RuntimeError(
                    f"round {current}: only {len(valid)} valid update(s) ({sorted(valid)}), quorum is "
                    f"{config.min_sites}; rejected: {sorted(rejected.values())}"
                )
            if stop is not None and stop.is_set():
                return results
            time.sleep(config.poll_s)
        order = sorted(valid)
        new = combine([valid[s] for s in order], rules)
        if config.server_momentum and current > 0:
            if previous is None:  # resumed: the last step from storage
                before = exchange.get_valid("global", current - 1, "global")
                if before is None:
                    raise RuntimeError(f"round {current}: the global model of round {current - 1} fails "
                                       "verification, so the server momentum cannot continue")
                previous = tensors_from_bytes(before.payload)
            new = server_momentum_step(new, global_w, previous, config.server_momentum)
        previous = global_w
        total = sum(counts[s] for s in order)
        sha = _publish_global(exchange, current + 1, new, parent=global_sha, num_cases=min(total, MAX_CASES))
        res = RoundResult(
            round=current,
            contributors=tuple((s, valid[s][1]) for s in order),
            rejected=tuple(sorted(rejected.values())),
            global_sha256=sha,
            seconds=time.monotonic() - started,
        )
        log.info("coordinator: round %d aggregated from %s -> global %d", current, res.contributors, current + 1)
        results.append(res)
        current += 1
    return results


def run_site(
    exchange: Exchange,
    config: FederationConfig,
    train: LocalTraining,
    *,
    stop: threading.Event | None = None,
    timeout_s: float | None = None,
) -> Weights | None:
    """Run (or resume) one site until the final global model is published; return it.

    Resumes at the latest global round in storage: if this site's valid
    update for that round is already committed it waits for the next one. A
    global model that fails verification counts as not there yet (its owner
    replaces it); while it waits, the site keeps its own last update intact
    (written again if it went missing or was damaged). ``timeout_s`` bounds
    every wait. Returns ``None`` if ``stop`` is set first.
    """
    me = exchange.keyring.identity
    if me not in config.sites:
        raise ValueError(f"site {me!r} is not in this federation ({config.sites})")
    r = max(latest_global_round(exchange, config.rounds), 0)
    mine: tuple[int, bytes, str, int] | None = None  # (round, payload, parent, cases) of this site's last update
    last_deep = [time.monotonic()]
    while True:
        def poll() -> tuple[Weights, str] | None:
            if stop is not None and stop.is_set():
                return ({}, "")
            if mine is not None:
                deep = time.monotonic() - last_deep[0] >= config.recheck_s
                if deep:
                    last_deep[0] = time.monotonic()
                exchange.ensure("update", mine[0], mine[1], parent=mine[2], num_cases=mine[3], deep=deep)
            return _read_global(exchange, r)

        global_w, sha = _wait(f"global model of round {r}", poll, config.poll_s, timeout_s)
        if stop is not None and stop.is_set():
            return None
        if r >= config.rounds:
            log.info("%s: final global model (round %d) received", me, r)
            return global_w
        try:
            have = exchange.get("update", r, me, parent=sha)
        except RejectedObject as exc:  # e.g. an old manifest of this site copied into the slot: replaced below
            log.warning("%s: own update slot of round %d fails verification (%s); training and writing it", me,
                        r, exc)
            have = None
        if have is not None:
            log.info("%s: update for round %d already committed (resumed)", me, r)
            mine = (r, have.payload, sha, have.header.num_cases)
        else:
            local_w, n_cases = train(r, global_w)
            problem = _site_check(local_w, global_w)
            if problem:
                raise ValueError(f"site {me!r}, round {r}: local training returned bad weights: {problem}")
            payload = tensors_to_bytes(local_w)
            try:
                exchange.put("update", r, payload, parent=sha, num_cases=int(n_cases))
                log.info("%s: uploaded update for round %d (%d cases)", me, r, n_cases)
            except FileExistsError:  # another process of this site committed a valid update first: it stands
                log.warning("%s: update for round %d was committed by another process; keeping it", me, r)
            mine = (r, payload, sha, int(n_cases))
        r += 1


def simulate(
    coordinator: Exchange,
    sites: Mapping[str, tuple[Exchange, LocalTraining]],
    config: FederationConfig,
    initial_weights: Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]],
    *,
    case_counts: Mapping[str, int] | None = None,
    rules: AggregationRules | None = None,
) -> tuple[list[RoundResult], dict[str, Weights]]:
    """Run the coordinator and every site in threads of this process.

    ``case_counts`` pins the sites' FedAvg weights (default: their fingerprints
    in storage). Returns the coordinator's round results and each site's final
    global weights. Any exception in a thread stops the others and is re-raised.
    """
    stop = threading.Event()
    jobs: dict[str, Callable[[], Any]] = {
        COORDINATOR: lambda: run_coordinator(coordinator, config, initial_weights, stop=stop,
                                             case_counts=case_counts, rules=rules),
    }
    for name, (ex, tr) in sites.items():
        jobs[name] = lambda ex=ex, tr=tr: run_site(ex, config, tr, stop=stop)
    out = _run_threads(jobs, stop=stop)
    results = list(out.pop(COORDINATOR))
    finals = {name: w for name, w in out.items() if w is not None}
    return results, finals


# --------------------------------------------------------------------------- nnU-Net glue

#: nnU-Net dataset name the coordinator plans under (sites keep their own names).
FEDERATED_DATASET = "Dataset999_Federated"


def _dataset_header(dataset_json: Mapping[str, Any]) -> dict[str, Any]:
    return {k: dataset_json[k] for k in ("labels", "channel_names", "file_ending")}


def shared_dataset_header(exchange: Exchange, config: FederationConfig) -> dict[str, Any]:
    """dataset.json for the federated model: the sites' common header plus the total case count.

    From the coordinator's signed plans message where published (frozen at planning), else from the fingerprints.
    """
    got_plans = exchange.get_valid("plans", -1, "plans")
    if got_plans is not None:  # frozen at planning time
        return dict(_plans_message(got_plans)["dataset"])
    got, _ = _fingerprint_bodies(exchange, config.sites)
    bodies = [got[s] for s in config.sites if s in got]
    if not bodies:
        raise ValueError(f"{exchange.url}: no valid fingerprints in storage")
    header = {k: bodies[0]["dataset"][k] for k in ("labels", "channel_names", "file_ending")}
    return dict(header, numTraining=int(sum(b["num_cases"] for b in bodies)))


def nnunet_coordinator(
    exchange: Exchange,
    config: FederationConfig,
    work: str | os.PathLike[str],
    *,
    configuration: str = "3d_fullres",
    width: str = "default",
    seed: int = 0,
    plans_timeout_s: float | None = None,
    weighting: str = "cases",
    rules: AggregationRules | None = None,
    plan_spacing: str = "finest",
    stop: threading.Event | None = None,
) -> Path:
    """The coordinator of a federated nnU-Net: shared plans, rounds, final model folder.

    Returns the final model folder ``work/model`` (dataset.json, plans.json,
    fold_all/checkpoint_final.pth). Restartable at any point. ``plan_spacing``:
    the target spacing of the shared plans (:func:`nnunet_plans`). ``stop``: an event
    that ends every wait with :class:`Stopped` (another party on this machine failed).
    """
    from oarbench.train import nnunet as nn

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)

    def plan(merged: dict[str, Any], header: dict[str, Any]) -> dict[str, Any]:
        return nnunet_plans(merged, header, configuration=configuration, width=width, spacing=plan_spacing)

    check_plan_spacing(plan_spacing)
    plans = make_shared_plans(exchange, config, plan, timeout_s=plans_timeout_s, weighting=weighting, stop=stop)
    header = shared_dataset_header(exchange, config)

    def init() -> Weights:
        f = nn.initial_weights(plans, header, work / "initial.safetensors", configuration=configuration, seed=seed)
        return tensors_from_bytes(f.read_bytes())

    run_coordinator(exchange, config, init, rules=rules, stop=stop)
    if stop is not None and stop.is_set():
        raise Stopped("coordinator stopped before the final round: another party failed")
    got = exchange.get("global", config.rounds, "global")
    if got is None:  # pragma: no cover - run_coordinator returns only after publishing it
        raise RuntimeError(f"{exchange.url}: final global model missing")
    final = work / "final.safetensors"
    final.write_bytes(got.payload)
    return nn.write_model_folder(work / "model", plans, header, final, configuration=configuration, fold="all")


@dataclass
class NnunetSite:
    """The steps of one federated nnU-Net site, shared by every engine.

    Images never leave ``dataset_dir``: what the steps hand out is the
    fingerprint message (:meth:`fingerprint_message`) and weights
    (:meth:`trainer`). All state lives under ``work``, so every step can be
    repeated after a restart.
    """

    dataset_dir: Path
    work: Path
    configuration: str = "3d_fullres"
    device: str = "cpu"
    num_processes: int = 2
    options: TrainerOptions | None = None  # nnU-Net's defaults when None
    threads: int | None = None  # CPU threads of each training process (None: torch's default)
    step_server: str | None = None  # a StepServer's socket that trains the rounds (None: a process per round)

    def __post_init__(self) -> None:
        from oarbench.train import nnunet as nn

        self.work = Path(self.work)
        self.paths = nn.NnunetPaths.under(self.work / "nnunet").make()
        self.name = nn.link_dataset(self.dataset_dir, self.paths,
                                    harmonise=(self.options or nn.TrainerOptions()).harmonise)
        self.dataset_json = json.loads((Path(self.paths.raw) / self.name / "dataset.json").read_text())

    @property
    def dataset_header(self) -> dict[str, Any]:
        """The public part of dataset.json: labels, channel names, file ending."""
        return _dataset_header(self.dataset_json)

    def fingerprint_message(self) -> dict[str, Any]:
        """``{"fingerprint", "dataset", "num_cases"}``: the site's nnU-Net fingerprint (summaries, no images)."""
        from oarbench.train import nnunet as nn

        fp = nn.extract_fingerprint(self.paths, self.name, num_processes=self.num_processes)
        return {"fingerprint": dict(fp), "dataset": self.dataset_header, "num_cases": len(fp["spacings"])}

    def install_plans(self, plans: Mapping[str, Any]) -> None:
        """Install the federation's plans and preprocess locally (skipped if done for these plans)."""
        from oarbench.train import nnunet as nn

        marker = self.work / "preprocessed.sha256"
        digest = hashlib.sha256(json.dumps(plans, sort_keys=True).encode()).hexdigest()
        if not marker.is_file() or marker.read_text() != digest:
            nn.install_plans(self.paths, self.name, plans)
            nn.preprocess(self.paths, self.name, configurations=(self.configuration,),
                          num_processes=self.num_processes)
            marker.write_text(digest)

    def trainer(self, rounds: int, local_epochs: int, iterations: int) -> LocalTraining:
        """The local training step of every round (:class:`oarbench.train.nnunet.NnunetSiteTraining`)."""
        from oarbench.train import nnunet as nn

        return nn.NnunetSiteTraining(self.paths, self.name, self.work / "rounds", rounds=rounds,
                                     local_epochs=local_epochs, iterations=iterations,
                                     configuration=self.configuration, device=self.device,
                                     options=self.options or nn.TrainerOptions(), threads=self.threads,
                                     server=self.step_server)

    def start_step_server(self) -> Any:
        """A :class:`oarbench.train.nnunet.StepServer` for this site's rounds (close it when done)."""
        from oarbench.train import nnunet as nn

        (self.work / "rounds").mkdir(parents=True, exist_ok=True)
        return nn.StepServer(self.paths, threads=self.threads, log_file=self.work / "rounds" / "train.log")

    def write_model(self, plans: Mapping[str, Any], final: Mapping[str, np.ndarray], num_training: int) -> Path:
        """Write the final global weights as an nnU-Net model folder ``work/model``."""
        from oarbench.train import nnunet as nn

        f = self.work / "final.safetensors"
        f.write_bytes(tensors_to_bytes(dict(final)))
        header = dict(self.dataset_header, numTraining=int(num_training))
        return nn.write_model_folder(self.work / "model", plans, header, f, configuration=self.configuration,
                                     fold="all")


def nnunet_site(
    exchange: Exchange,
    config: FederationConfig,
    dataset_dir: str | os.PathLike[str],
    work: str | os.PathLike[str],
    *,
    local_epochs: int = 1,
    iterations: int = 250,
    configuration: str = "3d_fullres",
    device: str = "cpu",
    num_processes: int = 2,
    plans_timeout_s: float | None = None,
    options: TrainerOptions | None = None,
    threads: int | None = None,
    timeout_s: float | None = None,
    stop: threading.Event | None = None,
) -> Path:
    """One site of a federated nnU-Net: fingerprint, shared plans, local rounds, final model folder.

    Images never leave ``dataset_dir``; the site uploads its fingerprint and
    its encrypted weights only. Returns ``work/model`` holding the final
    global model. Restartable at any point. ``timeout_s`` bounds each wait
    for the coordinator's plans or global model (None: wait forever); ``stop``
    ends every wait with :class:`Stopped` (another party on this machine failed).
    """
    site = NnunetSite(Path(dataset_dir), Path(work), configuration=configuration, device=device,
                      num_processes=num_processes, options=options, threads=threads)
    me = exchange.keyring.identity
    # one process trains every round (its imports paid once, while the site waits for the plans)
    with site.start_step_server() as server:
        site.step_server = server.socket
        if exchange.get_valid("fingerprint", -1, me) is None:
            body = site.fingerprint_message()
            publish_fingerprint(exchange, body["fingerprint"], body["dataset"], body["num_cases"])
        plans = fetch_plans(exchange, poll_s=config.poll_s,
                            timeout_s=plans_timeout_s if plans_timeout_s is not None else timeout_s, stop=stop)
        site.install_plans(plans)
        final = run_site(exchange, config, site.trainer(config.rounds, local_epochs, iterations),
                         timeout_s=timeout_s, stop=stop)
    if final is None:  # only with a stop event
        raise Stopped("site stopped before the final round: another party failed")
    got = exchange.get("global", config.rounds, "global")
    return site.write_model(plans, final, got.header.num_cases if got is not None else 0)


def nnunet_simulate(
    url: str,
    keys: str | os.PathLike[str],
    datasets: Mapping[str, str | os.PathLike[str]],
    work: str | os.PathLike[str],
    config: FederationConfig,
    *,
    federation: str = "oarbench",
    storage_options: Mapping[str, Any] | None = None,
    local_epochs: int = 1,
    iterations: int = 250,
    configuration: str = "3d_fullres",
    width: str = "default",
    device: str = "cpu",
    num_processes: int = 1,
    options: TrainerOptions | None = None,
    threads: int | None = None,
    plan_spacing: str = "finest",
) -> dict[str, Path]:
    """A coordinator and one site per dataset on this machine, in threads (nnU-Net steps run in child processes).

    The sites train at the same time; ``threads`` (CPU threads of each site's
    training process) defaults to the machine's cores shared out among them.

    ``keys`` is a folder made by :func:`oarbench.train.exchange.generate_keys` (one key folder per party).
    Each party appends to its audit log ``work/<party>/audit.jsonl``.
    Returns the final model folders by party (``"coordinator"`` and each site);
    all hold the same weights. ``options.seed`` seeds the coordinator's initial weights
    and every site's data order.
    """
    from oarbench.train.exchange import load_keyring

    work = Path(work)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, len(datasets)))

    from oarbench.train.audit import AuditLog

    def ex(name: str) -> Exchange:
        return Exchange(url, load_keyring(keys, name), federation=federation, storage_options=storage_options,
                        audit=AuditLog(work / name / "audit.jsonl", name))

    # a party that fails ends the others' waits (the coordinator would otherwise wait for it forever)
    stop = threading.Event()
    jobs: dict[str, Callable[[], Path]] = {
        COORDINATOR: lambda: nnunet_coordinator(ex(COORDINATOR), config, work / COORDINATOR,
                                                configuration=configuration, width=width,
                                                seed=options.seed if options is not None else 0,
                                                plan_spacing=plan_spacing, stop=stop),
    }
    for site, ds in datasets.items():
        jobs[site] = (lambda s=site, d=ds: nnunet_site(
            ex(s), config, d, work / s, local_epochs=local_epochs, iterations=iterations,
            configuration=configuration, device=device, num_processes=num_processes, options=options,
            threads=threads, stop=stop))
    return _run_threads(jobs, stop=stop)


def _run_threads(jobs: Mapping[str, Callable[[], Any]], stop: threading.Event | None = None) -> dict[str, Any]:
    """Run callables in threads; return their results by name, re-raising the first error.

    A failure sets ``stop`` (when given) so that jobs watching it end; otherwise the
    other threads time out or finish on their own.
    """
    out: dict[str, Any] = {}
    errors: list[BaseException] = []

    def wrap(name: str, fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                out[name] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                log.error("%s failed: %s", name, exc)
                errors.append(exc)
                if stop is not None:
                    stop.set()

        return run

    threads = [threading.Thread(target=wrap(n, f), name=n) for n, f in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out
