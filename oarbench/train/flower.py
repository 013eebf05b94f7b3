"""Federated nnU-Net on Flower (flwr 1.42): a ServerApp and a ClientApp around oarbench's site code.

The same federation as the shared-storage engine (:mod:`oarbench.train.federated`),
on Flower's deployment runtime: the coordinator's locked SuperLink
(:mod:`oarbench.train.flower_link`: Fleet API alone on the public port,
coordinator-signed runs only), one ``flower-supernode`` per hospital (outbound
connections only) that runs only apps signed by the coordinator, TLS and
SuperNode authentication.

Protocol (one Flower run):

1. **Fingerprints** (``query`` messages): every SuperNode sends its site
   name and its nnU-Net fingerprint message (:meth:`NnunetSite.fingerprint_message`).
   The server accepts a site's answer only from the node the coordinator's
   signed roster binds it to (:mod:`oarbench.train.flower_trust`), validates
   it (:func:`oarbench.train.aggregate.check_fingerprint_body`) and pins its
   case count. It merges the fingerprints and plans once
   (:func:`oarbench.train.federated.merge_site_messages`, :func:`nnunet_plans`).
2. **Rounds** (``train`` messages): the global weights, the plans and the
   schedule go to every site; each trains locally with the same trainer and
   settings as the storage engine (:meth:`NnunetSite.trainer`) and returns its
   weights and case count. The server aggregates with
   :func:`oarbench.train.aggregate.aggregate` (FedAvg, pinned counts, the
   same guards as the storage engine).
3. **Final model** (``evaluate`` messages): every site writes the final
   global model as an nnU-Net model folder; so does the server (``OUT/model``).

The server logs what it received (record names, types, array shapes and
sizes) to ``OUT/received.json``.

Needs the ``flower`` extra (``pip install 'oarbench[flower]'``).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from oarbench.train.aggregate import (AggregationRules, aggregate, check_fingerprint_body, check_server_momentum,
                                      server_momentum_step)

__all__ = [
    "FLOWER_HINT",
    "require_flower",
    "ServerSettings",
    "serve",
    "ServerSteps",
    "nnunet_server_steps",
    "make_server_app",
    "make_client_app",
    "write_app",
    "TlsFiles",
    "make_tls",
    "make_node_key",
    "LocalFlowerFederation",
    "run_local",
    "coordinate",
    "supernode_command",
    "superlink_command",
    "register_supernode",
    "write_roster",
    "add_to_roster",
    "weights_to_record",
    "record_to_weights",
    "options_to_run_config",
    "options_from_run_config",
    "client_query",
    "client_train",
    "client_evaluate",
]

log = logging.getLogger(__name__)

FLOWER_HINT = "the Flower engine needs flwr: pip install -c constraints.txt 'oarbench[flower]'"


def require_flower() -> None:
    """Raise a one-line ImportError (``MissingDependencyError``) naming the install command when flwr is missing."""
    from oarbench._optional import MissingDependencyError

    try:
        import flwr  # noqa: F401
    except ImportError:
        raise MissingDependencyError(FLOWER_HINT) from None


# --------------------------------------------------------------------------- records


#: The one entry of a weights record: every tensor in one safetensors buffer (:func:`weights_to_record`).
WEIGHTS_KEY = "safetensors"


def weights_to_record(weights: Mapping[str, np.ndarray]) -> Any:
    """Named numpy arrays as a Flower ``ArrayRecord`` holding one safetensors buffer (sorted names).

    Flower sends every Array of a record as objects of their own, one request each: the demo's
    108 tensors made a message of 218 objects and took seconds to cross each hop of a round.
    One buffer is a handful of objects; safetensors carries no code and is what the storage
    engine's objects hold too.
    """
    from flwr.app import Array, ArrayRecord

    from oarbench.train.exchange import tensors_to_bytes

    data = tensors_to_bytes({k: weights[k] for k in sorted(weights)})
    return ArrayRecord(array_dict={WEIGHTS_KEY: Array(np.frombuffer(data, dtype=np.uint8))})


def record_to_weights(record: Any) -> dict[str, np.ndarray]:
    """Inverse of :func:`weights_to_record`; ValueError for any other record."""
    from oarbench.train.exchange import tensors_from_bytes

    keys = list(record.keys())
    if keys != [WEIGHTS_KEY]:
        raise ValueError(f"weights record must hold one {WEIGHTS_KEY!r} entry, got {[str(k)[:30] for k in keys[:5]]}")
    buf = np.asarray(record[WEIGHTS_KEY].numpy())
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise ValueError(f"weights record: {WEIGHTS_KEY!r} must be bytes (1-D uint8), got {buf.dtype} {buf.shape}")
    try:
        return tensors_from_bytes(buf.tobytes())
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type for a malformed buffer
        raise ValueError(f"weights record: not a safetensors buffer ({str(exc)[:200]})") from None


def _describe(content: Any) -> dict[str, Any]:
    """What a reply carried: record names, types, and per entry its type and shape or size."""
    out: dict[str, Any] = {}
    for name, rec in content.items():
        kind = type(rec).__name__
        entries: dict[str, Any] = {}
        for k in rec.keys():
            v = rec[k]
            if kind == "ArrayRecord" and k == WEIGHTS_KEY:  # the tensors inside the buffer
                try:
                    entries.update({n: {"dtype": str(a.dtype), "shape": list(a.shape)}
                                    for n, a in record_to_weights(rec).items()})
                except ValueError as exc:
                    entries[k] = {"error": str(exc)[:200]}
            elif kind == "ArrayRecord":
                entries[k] = {"dtype": str(v.dtype), "shape": list(v.shape)}
            elif isinstance(v, (bytes, str)):
                entries[k] = {"type": type(v).__name__, "size": len(v)}
            else:
                entries[k] = {"type": type(v).__name__}
        out[name] = {"type": kind, "entries": entries}
    return out


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class ServerSettings:
    """What the ServerApp runs (from the Flower run config, keys in kebab-case).

    Attributes
    ----------
    sites: names of the sites that must take part (every one, in every round).
    rounds, local_epochs, iterations: the schedule (as ``oarbench fl --engine storage``).
    configuration, width: nnU-Net configuration and network width.
    plan_spacing: the shared plans' target spacing (``"finest"`` or ``"pooled"``,
    :func:`oarbench.train.federated.nnunet_plans`).
    out: the server's output folder (plans, global weights, model folder, logs).
    seed: the run's seed: the initial global weights, and every site's data order (it is
        ``options.seed`` too, which the ``train`` messages carry).
    timeout_s: longest wait for SuperNodes and for one round's replies.
    """

    sites: tuple[str, ...]
    rounds: int
    out: Path
    local_epochs: int = 1
    iterations: int = 250
    configuration: str = "3d_fullres"
    width: str = "default"
    seed: int = 0
    timeout_s: float = 24 * 3600.0
    rules: AggregationRules = field(default_factory=AggregationRules)
    options: Any = None  # TrainerOptions sent to every site (None: nnU-Net's defaults, harmonised)
    plan_spacing: str = "finest"
    server_momentum: float = 0.0  # oarbench.train.aggregate.server_momentum_step (0: plain FedAvg)

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> "ServerSettings":
        sites = tuple(s.strip() for s in str(cfg["sites"]).split(",") if s.strip())
        if not sites or len(set(sites)) != len(sites):
            raise ValueError(f"run config 'sites' must name distinct sites, got {cfg['sites']!r}")
        if not str(cfg.get("out", "")):
            raise ValueError("run config 'out' (the server's output folder) is empty")
        from oarbench.train._plans import check_plan_spacing

        options = options_from_run_config(cfg)
        return cls(sites=sites, rounds=int(cfg["rounds"]), out=Path(str(cfg["out"])),
                   local_epochs=int(cfg.get("local-epochs", 1)), iterations=int(cfg.get("iterations", 250)),
                   configuration=str(cfg.get("configuration", "3d_fullres")), width=str(cfg.get("width", "default")),
                   seed=options.seed, timeout_s=float(cfg.get("timeout", 24 * 3600.0)), options=options,
                   plan_spacing=check_plan_spacing(str(cfg.get("plan-spacing", "finest"))),
                   server_momentum=_run_config_momentum(cfg.get("server-momentum", 0.0)))

    def options_json(self) -> str:
        """The trainer options as the messages carry them (JSON)."""
        from oarbench.train.nnunet import TrainerOptions

        return (self.options or TrainerOptions()).to_json()


def _run_config_momentum(value: Any) -> float:
    try:
        return check_server_momentum(value)
    except ValueError as exc:
        raise ValueError(f"run config 'server-momentum': {exc}") from None


#: Trainer options in the Flower run config (kebab-case) -> (TrainerOptions field, the value that stands
#: for nnU-Net's own choice, None; a run config holds no null).
_RUN_CONFIG_OPTIONS: dict[str, tuple[str, Any]] = {
    "augmentation": ("augmentation", None), "initial-lr": ("initial_lr", 0.0), "batch-size": ("batch_size", 0),
    "optimizer": ("optimizer", None), "foreground-oversampling": ("foreground_oversampling", -1.0),
    "harmonise": ("harmonise", None), "optimizer-state": ("optimizer_state", None),
    "pseudo-dice": ("pseudo_dice", None), "precision": ("precision", None), "seed": ("seed", None),
    "warmup": ("warmup", None),
}


def options_to_run_config(options: Any) -> dict[str, Any]:
    """:class:`oarbench.train.nnunet.TrainerOptions` as Flower run config entries (see ``_RUN_CONFIG_OPTIONS``)."""
    from oarbench.train.nnunet import TrainerOptions

    options = options or TrainerOptions()
    out: dict[str, Any] = {}
    for key, (name, none) in _RUN_CONFIG_OPTIONS.items():
        value = getattr(options, name)
        out[key] = none if value is None else value
    return out


def options_from_run_config(cfg: Mapping[str, Any]) -> Any:
    """Inverse of :func:`options_to_run_config`; absent entries take the TrainerOptions defaults."""
    from oarbench.train.nnunet import TrainerOptions

    values: dict[str, Any] = {}
    for key, (name, none) in _RUN_CONFIG_OPTIONS.items():
        if key not in cfg:
            continue
        value = cfg[key]
        if name in ("harmonise", "pseudo_dice"):
            if not isinstance(value, bool):
                text = str(value).strip().lower()
                if text not in ("true", "false"):
                    raise ValueError(f"run config {key!r} must be true or false, got {str(value)[:20]!r}")
                value = text == "true"
        elif none is not None and value == none:
            value = None
        elif name == "batch_size":
            value = int(value)
        elif name in ("initial_lr", "foreground_oversampling"):
            value = float(value)
        elif name in ("seed", "warmup"):
            if isinstance(value, bool) or not (isinstance(value, int) or str(value).strip().isdigit()):
                raise ValueError(f"run config {key!r} must be a non-negative integer, got {str(value)[:20]!r}")
            value = int(value)
        else:
            value = str(value)
        values[name] = value
    return TrainerOptions(**values)


def _save_weights(path: Path, weights: Mapping[str, np.ndarray]) -> str:
    from oarbench.train.exchange import tensors_to_bytes
    from oarbench.train.nnunet import _atomic_bytes

    data = tensors_to_bytes(dict(weights))
    _atomic_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ServerSteps:
    """The model-specific steps of the server (nnU-Net by default; tests plug in a tiny model).

    ``plan(merged_fingerprint, dataset_header, settings) -> plans``,
    ``initial(plans, dataset_header, settings) -> weights``,
    ``write_model(plans, dataset_header, final_weights_file, settings) -> model folder``.
    """

    plan: Callable[[dict[str, Any], dict[str, Any], ServerSettings], dict[str, Any]]
    initial: Callable[[dict[str, Any], dict[str, Any], ServerSettings], dict[str, np.ndarray]]
    write_model: Callable[[dict[str, Any], dict[str, Any], Path, ServerSettings], Path]


def nnunet_server_steps() -> ServerSteps:
    """The nnU-Net steps: plan once from the merged fingerprint, seeded initial weights, model folder."""
    from oarbench.train import nnunet as nn
    from oarbench.train.exchange import tensors_from_bytes
    from oarbench.train.federated import nnunet_plans

    def plan(merged: dict[str, Any], header: dict[str, Any], st: ServerSettings) -> dict[str, Any]:
        return nnunet_plans(merged, header, configuration=st.configuration, width=st.width, spacing=st.plan_spacing)

    def initial(plans: dict[str, Any], header: dict[str, Any], st: ServerSettings) -> dict[str, np.ndarray]:
        f = nn.initial_weights(plans, header, st.out / "initial.safetensors", configuration=st.configuration,
                               seed=st.seed)
        return tensors_from_bytes(f.read_bytes())

    def write_model(plans: dict[str, Any], header: dict[str, Any], final: Path, st: ServerSettings) -> Path:
        return nn.write_model_folder(st.out / "model", plans, header, final, configuration=st.configuration,
                                     fold="all")

    return ServerSteps(plan, initial, write_model)


def serve(grid: Any, settings: ServerSettings, steps: ServerSteps | None = None, *,
          roster: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The ServerApp's work: fingerprint round, shared plans, training rounds, final model.

    ``roster`` maps each site to the node id of the SuperNode key the
    coordinator registered for it (the verified, signed roster:
    :func:`oarbench.train.flower_trust.verify_roster`). A site's replies are
    accepted from that node only; any other node's claim to a site is refused
    and recorded, and two nodes claiming one site stop the run with a message
    naming both.

    Returns the summary also written to ``OUT/summary.json`` (also written,
    with ``"status": "failed"`` and the identity checks, when the run stops
    over a site's identity).

    Raises
    ------
    RuntimeError
        No roster, a listed site missing from it, its SuperNodes not connected
        in time, a site claimed by two nodes, or a site's fingerprint or update
        refused or missing (every listed site must take part).
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    from oarbench.train import nnunet as nn
    from oarbench.train.federated import merge_site_messages

    steps = steps or nnunet_server_steps()
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    received: list[dict[str, Any]] = []
    started = time.monotonic()

    def ask(node_ids: Sequence[int], message_type: str, content: Any) -> dict[int, Any]:
        msgs = [Message(content=content, dst_node_id=n, message_type=message_type) for n in node_ids]
        replies = {}
        for reply in grid.send_and_receive(msgs, timeout=settings.timeout_s):
            src = int(reply.metadata.src_node_id)
            if reply.has_error():
                replies[src] = RuntimeError(f"node {src}: {reply.error.reason}")
                received.append({"step": message_type, "node": src, "error": str(reply.error.reason)[:500]})
                continue
            received.append({"step": message_type, "node": src, "content": _describe(reply.content)})
            replies[src] = reply.content
        return replies

    # 1. SuperNodes (authenticated by the SuperLink), the ones the roster names first
    if roster is None:
        raise RuntimeError("no federation roster: the server accepts a site only from the node the coordinator "
                           "registered for it")
    unlisted = sorted(set(settings.sites) - set(roster))
    if unlisted:
        raise RuntimeError(f"site(s) {unlisted} have no entry in the federation roster")
    wanted = {int(roster[s]) for s in settings.sites}
    while not wanted <= {int(n) for n in grid.get_node_ids()}:
        if time.monotonic() - started > settings.timeout_s:
            absent = sorted(s for s in settings.sites if int(roster[s]) not in {int(n) for n in grid.get_node_ids()})
            raise RuntimeError(f"the SuperNode(s) of site(s) {absent} did not connect within "
                               f"{settings.timeout_s:.0f} s")
        time.sleep(0.5)
    nodes = sorted(int(n) for n in grid.get_node_ids())

    # 2. fingerprint round: a site's claim counts only from its roster node; pin its case count
    options = settings.options_json()  # the same trainer options (and harmonisation) at every site
    replies = ask(nodes, "query", RecordDict({"oarbench": ConfigRecord({"step": "fingerprint",
                                                                        "trainer-options": options})}))
    node_site: dict[int, str] = {}
    bodies: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    claims: list[dict[str, Any]] = []
    claimed_by: dict[str, list[int]] = {}
    for node, content in sorted(replies.items()):
        if isinstance(content, Exception):
            problems.append(str(content))
            continue
        try:
            site = str(content["fingerprint"]["site"])
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"node {node}: invalid fingerprint reply: {exc}")
            continue
        claimed_by.setdefault(site, []).append(node)
        claim: dict[str, Any] = {"node": node, "site": site[:200], "accepted": False}
        claims.append(claim)
        if site not in settings.sites:
            claim["reason"] = f"site {site[:200]!r} is not in this federation {settings.sites}"
        elif int(roster[site]) != node:
            claim["reason"] = f"the roster binds site {site!r} to node {int(roster[site])}"
        else:
            try:
                body = json.loads(str(content["fingerprint"]["message"]))
                check_fingerprint_body(body, rules=settings.rules)
            except (KeyError, TypeError, ValueError, RecursionError) as exc:
                claim["reason"] = f"invalid fingerprint: {exc}"
                problems.append(f"node {node}: invalid fingerprint reply: {exc}")
                continue
            claim["accepted"] = True
            node_site[node], bodies[site] = site, body
            continue
        problems.append(f"node {node}: refused: {claim['reason']}")
        log.warning("flower server: node %d claims site %r: refused (%s)", node, site[:200], claim["reason"])
    identity = {"roster": {s: int(roster[s]) for s in settings.sites}, "claims": claims,
                "ignored_nodes": sorted(set(nodes) - {c["node"] for c in claims} - set(node_site))}
    twice = {s: ns for s, ns in claimed_by.items() if s in settings.sites and len(ns) > 1}
    if twice:
        error = "; ".join(f"site {s!r} is claimed by nodes {' and '.join(str(n) for n in ns)} (the roster binds it "
                          f"to node {int(roster[s])})" for s, ns in sorted(twice.items()))
        _write_failed(out, error, identity, started)
        raise RuntimeError(error)
    missing = sorted(set(settings.sites) - set(bodies))
    if missing:
        error = f"no valid fingerprint from site(s) {missing}: {problems}"
        _write_failed(out, error, identity, started)
        raise RuntimeError(error)
    pinned = {s: int(b["num_cases"]) for s, b in bodies.items()}
    nn._atomic_text(out / "fingerprints.json", json.dumps(bodies, indent=1, sort_keys=True))
    merged, header = merge_site_messages(bodies)
    plans = steps.plan(merged, header, settings)
    nn._atomic_text(out / "plans.json", json.dumps(plans, indent=1, sort_keys=True))
    plans_text = json.dumps(plans, sort_keys=True)

    # 3. rounds
    global_w = steps.initial(plans, header, settings)
    first = global_w  # the bound's reference: no site can move it (oarbench.train.aggregate)
    previous = None  # the global model of the round before (server momentum)
    sha = _save_weights(out / "global_00000.safetensors", global_w)
    rounds_log = []
    for r in range(settings.rounds):
        cfg = ConfigRecord({"round": r, "rounds": settings.rounds, "local-epochs": settings.local_epochs,
                            "iterations": settings.iterations, "plans": plans_text, "parent": sha,
                            "trainer-options": options})
        replies = ask(sorted(node_site), "train", RecordDict({"global": weights_to_record(global_w), "config": cfg}))
        updates: dict[str, tuple[dict[str, np.ndarray], Any]] = {}
        failed: dict[str, str] = {}
        for node, content in replies.items():
            site = node_site.get(node)
            if site is None:
                continue
            if isinstance(content, Exception):
                failed[site] = str(content)
                continue
            try:
                w = record_to_weights(content["update"])
                claimed = content["metrics"]["num-cases"]
            except (KeyError, TypeError, ValueError) as exc:
                failed[site] = f"malformed reply: {exc}"
                continue
            updates[site] = (w, int(claimed) if isinstance(claimed, (int, np.integer)) else claimed)
        try:
            agg = aggregate(updates, global_w, pinned, settings.rules, min_updates=len(settings.sites),
                            reference=first)
        except ValueError as exc:
            raise RuntimeError(f"round {r}: {exc}; failed sites: {failed}") from None
        previous, global_w = global_w, server_momentum_step(agg.weights, global_w, previous,
                                                            settings.server_momentum)
        sha = _save_weights(out / f"global_{r + 1:05d}.safetensors", global_w)
        rounds_log.append({"round": r, "contributors": [list(c) for c in agg.contributors],
                           "rejected": dict(agg.rejected), "failed": failed, "global_sha256": sha})
        log.info("flower server: round %d aggregated from %s", r, agg.contributors)

    # 4. final model everywhere
    final = out / "final.safetensors"
    shutil.copyfile(out / f"global_{settings.rounds:05d}.safetensors", final)
    fin = ConfigRecord({"plans": plans_text, "num-training": int(header["numTraining"]), "trainer-options": options})
    done = ask(sorted(node_site), "evaluate", RecordDict({"global": weights_to_record(global_w), "config": fin}))
    model = steps.write_model(plans, header, final, settings)
    summary = {
        "status": "completed",
        "sites": {str(n): s for n, s in node_site.items()},
        "identity": identity,
        "case_counts": pinned,
        "rounds": rounds_log,
        "final_sha256": sha,
        "model": str(model),
        "site_models_written": sorted(node_site[n] for n, c in done.items()
                                      if n in node_site and not isinstance(c, Exception)),
        "seconds": time.monotonic() - started,
    }
    nn._atomic_text(out / "received.json", json.dumps(received, indent=1))
    nn._atomic_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def _write_failed(out: Path, error: str, identity: Mapping[str, Any], started: float) -> None:
    from oarbench.train import nnunet as nn

    nn._atomic_text(out / "summary.json", json.dumps({"status": "failed", "error": error, "identity": identity,
                                                      "seconds": time.monotonic() - started}, indent=1))


def make_server_app(coordinator_key: str | None = None) -> Any:
    """The Flower ``ServerApp`` (its run config: see :class:`ServerSettings`).

    ``coordinator_key`` (the coordinator's Ed25519 public key, written into
    the signed Flower App by :func:`write_app`) verifies the run config's
    ``roster``; without it the server refuses to run.
    """
    require_flower()
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        from oarbench.train.flower_trust import verify_roster

        if not coordinator_key:
            raise RuntimeError("this Flower App carries no coordinator key; write it with write_app(coordinator_key=...)")
        roster = verify_roster(str(context.run_config.get("roster", "")), coordinator_key,
                               where="run config 'roster'")
        serve(grid, ServerSettings.from_run_config(context.run_config), roster=roster)

    return app


# --------------------------------------------------------------------------- client


def _site_from_context(context: Any, config: Any = None) -> Any:
    """The site's steps (:class:`NnunetSite`) with the trainer options of the server's message ``config``."""
    from oarbench.train import federated
    from oarbench.train.nnunet import TrainerOptions

    cfg = context.node_config
    for key in ("site", "dataset", "work"):
        if not str(cfg.get(key, "")):
            raise ValueError(f"SuperNode --node-config must set {key}=... (site name, dataset folder, work folder)")
    text = config.get("trainer-options") if config is not None else None
    options = TrainerOptions.from_json(str(text)) if text else TrainerOptions()
    return federated.NnunetSite(Path(str(cfg["dataset"])), Path(str(cfg["work"])),
                                configuration=str(cfg.get("configuration", "3d_fullres")),
                                device=str(cfg.get("device", "cpu")), num_processes=int(cfg.get("processes", 1)),
                                options=options, threads=int(cfg["threads"]) if cfg.get("threads") else None,
                                step_server=str(cfg["step-server"]) if cfg.get("step-server") else None)


def client_query(content: Any, context: Any) -> Any:
    """The ClientApp's ``query`` step: the site's name and fingerprint message (a ``RecordDict``)."""
    from flwr.app import ConfigRecord, RecordDict

    step = content["oarbench"]["step"]
    if step != "fingerprint":
        raise ValueError(f"unknown query step {step!r}")
    site = _site_from_context(context, content["oarbench"])
    marker = site.work / "fingerprint_message.json"
    if marker.is_file():
        body = json.loads(marker.read_text())
    else:
        body = site.fingerprint_message()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(body, sort_keys=True))
    rec = ConfigRecord({"site": str(context.node_config["site"]), "message": json.dumps(body, sort_keys=True)})
    return RecordDict({"fingerprint": rec})


def client_train(content: Any, context: Any) -> Any:
    """The ClientApp's ``train`` step: one round from the global weights, with the message's schedule and options."""
    from flwr.app import MetricRecord, RecordDict

    cfg = content["config"]
    site = _site_from_context(context, cfg)
    site.install_plans(json.loads(str(cfg["plans"])))
    trainer = site.trainer(int(cfg["rounds"]), int(cfg["local-epochs"]), int(cfg["iterations"]))
    weights, n = trainer(int(cfg["round"]), record_to_weights(content["global"]))
    return RecordDict({"update": weights_to_record(weights), "metrics": MetricRecord({"num-cases": int(n)})})


def client_evaluate(content: Any, context: Any) -> Any:
    """The ClientApp's ``evaluate`` step: write the final global model as an nnU-Net model folder."""
    from flwr.app import MetricRecord, RecordDict

    cfg = content["config"]
    site = _site_from_context(context, cfg)
    site.write_model(json.loads(str(cfg["plans"])), record_to_weights(content["global"]), int(cfg["num-training"]))
    return RecordDict({"model": MetricRecord({"written": 1})})


def make_client_app() -> Any:
    """The Flower ``ClientApp``: a hospital's side, driven by its SuperNode's ``--node-config``.

    Node config: ``site`` (name), ``dataset`` (nnU-Net raw dataset folder),
    ``work`` (the site's work folder), optional ``device`` and ``processes``.
    Images stay in ``dataset``; replies carry the fingerprint message, weights
    and case counts only.
    """
    require_flower()
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def query(msg: Any, context: Any) -> Any:
        return Message(content=client_query(msg.content, context), reply_to=msg)

    @app.train()
    def train(msg: Any, context: Any) -> Any:
        return Message(content=client_train(msg.content, context), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Any, context: Any) -> Any:
        return Message(content=client_evaluate(msg.content, context), reply_to=msg)

    return app


# --------------------------------------------------------------------------- the Flower App folder

_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "oarbench-fl"
version = "1.0.0"
description = "oarbench federated nnU-Net (ServerApp and ClientApp from oarbench.train.flower)"
license = "Apache-2.0"
dependencies = ["oarbench[nnunet,flower]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "oarbench"

[tool.flwr.app.components]
serverapp = "oarbench_fl_app.server:app"
clientapp = "oarbench_fl_app.client:app"

[tool.flwr.app.config]
sites = ""
rounds = 1
local-epochs = 1
iterations = 250
configuration = "3d_fullres"
width = "default"
seed = 0
timeout = 86400.0
out = ""
roster = ""
augmentation = "default"
initial-lr = 0.0
batch-size = 0
optimizer = "sgd"
foreground-oversampling = -1.0
harmonise = true
optimizer-state = "kept"
pseudo-dice = true
precision = "fp32"
warmup = 0
plan-spacing = "finest"
server-momentum = 0.0
"""


def write_app(folder: str | Path, coordinator_key: str | None = None) -> Path:
    """Write the Flower App (``pyproject.toml`` and small modules) that the coordinator signs and submits.

    ``coordinator_key`` (an ``ssh-ed25519 ...`` line) goes into the app's
    ``trust.py``, inside what the coordinator signs; the ServerApp verifies
    the roster with it.
    """
    folder = Path(folder)
    pkg = folder / "oarbench_fl_app"
    pkg.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(_PYPROJECT)
    (pkg / "__init__.py").write_text('"""oarbench on Flower."""\n')
    (pkg / "trust.py").write_text(f"COORDINATOR_KEY = {json.dumps(coordinator_key or '')}\n")
    (pkg / "server.py").write_text("from oarbench.train.flower import make_server_app\n"
                                   "from oarbench_fl_app.trust import COORDINATOR_KEY\n\n"
                                   "app = make_server_app(COORDINATOR_KEY)\n")
    (pkg / "client.py").write_text("from oarbench.train.flower import make_client_app\n\napp = make_client_app()\n")
    return folder


# --------------------------------------------------------------------------- deployment on one machine


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS set-up: the CA certificate, the SuperLink's certificate and private key."""

    ca: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_tls(folder: str | Path, hosts: Sequence[str] = ("localhost", "127.0.0.1"), days: int = 365) -> TlsFiles:
    """A self-signed CA and a SuperLink certificate for ``hosts`` (EC P-384), written to ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "oarbench federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA384()))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    srv = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(start).not_valid_after(end)
           .add_extension(x509.SubjectAlternativeName(names), critical=False)
           .sign(ca_key, hashes.SHA384()))
    files = TlsFiles(folder / "ca.pem", folder / "superlink.pem", folder / "superlink.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    _write_private(files.key, srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return files


def make_node_key(folder: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format): ``(private 0600, public)``.

    The same as ``ssh-keygen -t ecdsa -b 384 -N "" -f folder/name``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / name, folder / f"{name}.pub"
    _write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _flower_bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.is_file() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH; {FLOWER_HINT}")
    return found


def write_connection(flwr_home: str | Path, name: str, address: str, root_certificates: str | Path) -> Path:
    """Write the Flower CLI configuration (``FLWR_HOME/config.toml``) with one SuperLink connection."""
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
                    f'root-certificates = "{Path(root_certificates).resolve()}"\n')
    return path


#: Flower's switch for its usage telemetry (on by default in flwr: every SuperLink, SuperNode, ServerApp and
#: ClientApp process posts events with the machine's platform details to telemetry.flower.ai).
TELEMETRY_ENV = "FLWR_TELEMETRY_ENABLED"


#: How often a SuperExec asks for a new task (seconds; flwr's default 1).
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def flower_env(flwr_home: str | Path) -> dict[str, str]:
    """Environment for Flower's processes: ``FLWR_HOME``, this Python's scripts first on ``PATH``, Flower's
    telemetry off (``FLWR_TELEMETRY_ENABLED=0``) and the SuperExec's task poll every 0.25 s, each unless the
    caller's environment sets that variable itself."""
    env = dict(os.environ, FLWR_HOME=str(Path(flwr_home).resolve()),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    env.setdefault(TELEMETRY_ENV, "0")
    # a SuperNode's SuperExec looks for a new ClientApp task every second by default (flwr's
    # run_superexec.py); a quarter of a second takes most of that wait out of every message
    env.setdefault(SUPEREXEC_POLL_ENV, "0.25")
    return env


def _run_config(values: Mapping[str, Any]) -> str:
    parts = []
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            v = json.dumps(str(v))
        parts.append(f"{k}={v}")
    return " ".join(parts)


def superlink_command(public_host: str, public_port: int, control_port: int, tls: TlsFiles, coordinator_key: Path,
                      database: str | Path, control_host: str = "127.0.0.1") -> list[str]:
    """The coordinator's locked SuperLink (:mod:`oarbench.train.flower_link`): Flower's SuperLink with TLS and
    SuperNode authentication, the Fleet API alone on ``public_host:public_port``, the Control and Runtime APIs on
    ``control_host:control_port`` (loopback), and only runs signed by ``coordinator_key`` (its public key)."""
    return [sys.executable, "-m", "oarbench.train.flower_link", "superlink", "--public-host", public_host,
            "--public-port", str(public_port), "--coordinator-key", str(Path(coordinator_key).resolve()),
            "--ssl-ca-certfile", str(Path(tls.ca).resolve()), "--ssl-certfile", str(Path(tls.cert).resolve()),
            "--ssl-keyfile", str(Path(tls.key).resolve()), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", control_host, "--port", str(control_port),
            "--database", str(database)]


class LocalFlowerFederation:
    """A locked SuperLink and SuperNodes on this machine (loopback): TLS, SuperNode authentication, signed apps.

    Used by ``oarbench fl simulate --engine flower``, the demo and the tests;
    each process is a real Flower process (the coordinator's SuperLink of
    :func:`superlink_command`, ``flower-supernode``), exactly as at a
    coordinator and in hospitals. ``address`` is the public (Fleet API) port
    the SuperNodes use; ``control_address`` the coordinator's Control API
    (``flwr`` CLI, registration, run submission). The coordinator's
    app-signing key is ``signing_key`` (public: ``signing_public``), and
    ``trusted_entities`` the file each SuperNode is started with.
    """

    def __init__(self, work: str | Path) -> None:
        require_flower()
        from oarbench.train.flower_trust import load_public_key_text, make_coordinator_key, write_trusted_entities

        self.work = Path(work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.tls = make_tls(self.work / "tls")
        self.flwr_home = self.work / "flwr-home"
        self.signing_key, self.signing_public = make_coordinator_key(self.work / "coordinator")
        self.coordinator_key = load_public_key_text(self.signing_public)
        self.trusted_entities = write_trusted_entities(self.work / "trusted-entities.yaml", self.coordinator_key)
        self.port = _free_port()
        self.control_port = _free_port()
        while self.control_port == self.port:
            self.control_port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.control_address = f"127.0.0.1:{self.control_port}"
        write_connection(self.flwr_home, "local", self.control_address, self.tls.ca)
        self.env = flower_env(self.flwr_home)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = self.work / "logs"
        self.logs.mkdir(exist_ok=True)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as fh:
            # own process group: Flower's processes start helpers (SuperExec) that stop() must end too
            proc = subprocess.Popen(args, env=self.env, stdout=fh, stderr=subprocess.STDOUT, cwd=self.work,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_superlink(self, timeout_s: float = 120.0) -> None:
        self._start("superlink", superlink_command("127.0.0.1", self.port, self.control_port, self.tls,
                                                   self.signing_public, self.work / "superlink.db"))
        deadline = time.monotonic() + timeout_s
        for port in (self.control_port, self.port):
            while True:
                if self.procs["superlink"].poll() is not None:
                    raise RuntimeError(f"the SuperLink exited; see {self.logs / 'superlink.log'}")
                try:
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the SuperLink did not listen on 127.0.0.1:{port} within "
                                           f"{timeout_s:.0f} s") from None
                    time.sleep(0.2)

    def register(self, public_key: Path, name: str) -> int:
        """Register a SuperNode's public key through the Control API (``flwr supernode register``); its node id."""
        return register_supernode(self.flwr_home, "local", public_key, name)

    def roster(self, sites: Mapping[str, str | Path], path: str | Path) -> Path:
        """Register each site's SuperNode public key file and write the signed roster (site -> key, node id)."""
        return write_roster(path, {site: (Path(pub), self.register(Path(pub), site)) for site, pub in sites.items()},
                            self.signing_key)

    def start_supernode(self, name: str, private_key: Path, *, site: str, dataset: str | Path, work: str | Path,
                        device: str = "cpu", configuration: str = "3d_fullres", processes: int = 1,
                        max_retries: int | None = None, trusted_entities: Path | None = None,
                        threads: int | None = None, step_server: str | None = None) -> subprocess.Popen[bytes]:
        """Start one hospital's SuperNode (the command of :func:`supernode_command`), trusting the coordinator's key."""
        args = supernode_command(self.address, self.tls.ca, private_key, site=site, dataset=dataset, work=work,
                                 device=device, configuration=configuration, processes=processes,
                                 port=_free_port(), trusted_entities=trusted_entities or self.trusted_entities,
                                 threads=threads, step_server=step_server)
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        return self._start(f"supernode-{name}", args)

    def _signal_group(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group this object created for the process (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self) -> None:
        """End every process this object started, with the helpers they started."""
        import signal

        for proc in self.procs.values():
            self._signal_group(proc, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait()
        time.sleep(0.2)
        for proc in self.procs.values():  # helpers that outlived their parent
            self._signal_group(proc, signal.SIGKILL)

    def __enter__(self) -> "LocalFlowerFederation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run_local(
    datasets: Mapping[str, str | Path],
    work: str | Path,
    *,
    rounds: int,
    local_epochs: int = 1,
    iterations: int = 250,
    configuration: str = "3d_fullres",
    width: str = "default",
    device: str = "cpu",
    num_processes: int = 1,
    seed: int | None = None,
    timeout_s: float = 24 * 3600.0,
    federation: LocalFlowerFederation | None = None,
    options: Any = None,
    threads: int | None = None,
    plan_spacing: str = "finest",
    server_momentum: float = 0.0,
) -> dict[str, Any]:
    """A whole federation through Flower on this machine: SuperLink, one SuperNode per dataset, one run.

    Returns the server's summary (``WORK/server/summary.json``) with the model
    folders: ``"model"`` (the server's) and ``"site_models"`` (by site).
    ``seed``: the run's seed (:func:`coordinate`; default ``options.seed``).
    With ``federation`` given (already started), only the SuperNodes and the
    run are added to it.
    """
    require_flower()
    work = Path(work).resolve()
    own = federation is None
    fed = federation or LocalFlowerFederation(work / "flower")
    servers: dict[str, Any] = {}
    try:
        if own:
            fed.start_superlink()
        keys = work / "node-keys"
        keys.mkdir(parents=True, exist_ok=True)
        pubs: dict[str, Path] = {}
        for site, ds in datasets.items():
            priv, pub = (keys / site, keys / f"{site}.pub")
            if not priv.is_file():
                priv, pub = make_node_key(keys, site)
            pubs[site] = pub
        roster = fed.roster(pubs, work / "roster.json")
        for site, ds in datasets.items():
            # one process on this machine trains the site's every round (its imports paid once)
            servers[site] = _site_step_server(work / "sites" / site, threads)
            fed.start_supernode(site, keys / site, site=site, dataset=ds, work=work / "sites" / site, device=device,
                                configuration=configuration, processes=num_processes, threads=threads,
                                step_server=servers[site].socket)
        # the coordinator's own path: write the Flower App, sign it, submit it to the SuperLink, wait
        summary = coordinate(fed.control_address, fed.tls.ca, work, sites=list(datasets), rounds=rounds,
                             local_epochs=local_epochs, iterations=iterations, configuration=configuration,
                             width=width, seed=seed, timeout_s=timeout_s, signing_key=fed.signing_key,
                             roster=roster, options=options, plan_spacing=plan_spacing,
                             server_momentum=server_momentum)
        summary["site_models"] = {s: str(work / "sites" / s / "model") for s in summary["site_models_written"]}
        return summary
    finally:
        if own:
            fed.stop()
        for server in servers.values():
            server.close()


def _site_step_server(site_work: Path, threads: int | None) -> Any:
    """A :class:`oarbench.train.nnunet.StepServer` for the nnU-Net folders the site's ClientApp uses."""
    from oarbench.train import nnunet as nn

    (site_work / "rounds").mkdir(parents=True, exist_ok=True)
    return nn.StepServer(nn.NnunetPaths.under(site_work.resolve() / "nnunet").make(), threads=threads,
                         log_file=site_work / "rounds" / "train.log")


# --------------------------------------------------------------------------- deployment across machines


def register_supernode(flwr_home: str | Path, connection: str, public_key: str | Path, name: str) -> int:
    """``flwr supernode register PUBLIC_KEY CONNECTION --name NAME`` through the coordinator's Control API; the
    node id the SuperLink gave the key."""
    res = subprocess.run([_flower_bin("flwr"), "supernode", "register", str(public_key), connection, "--name", name,
                          "--format", "json"], env=flower_env(flwr_home), capture_output=True, text=True, timeout=120)
    text = res.stdout + res.stderr
    try:
        node = int(json.loads(res.stdout[res.stdout.index("{"):])["node-id"])
    except (ValueError, KeyError, TypeError):
        node = 0
    if res.returncode != 0 or node <= 0:
        raise RuntimeError(f"flwr supernode register {public_key} failed: {text.strip()[-800:]}")
    return node


def write_roster(path: str | Path, sites: Mapping[str, tuple[str | Path, int]], signing_key: str | Path,
                 federation: str = "oarbench") -> Path:
    """Write the coordinator-signed roster: site -> (SuperNode public key file or text, node id)."""
    from oarbench.train import nnunet as nn
    from oarbench.train.flower_trust import load_signing_key, make_roster, read_node_public_key

    entries: dict[str, tuple[str, int]] = {}
    for site, (pub, node) in sites.items():
        text = read_node_public_key(pub) if isinstance(pub, Path) else str(pub)
        entries[site] = (text, int(node))
    doc = make_roster(entries, load_signing_key(signing_key), federation=federation)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nn._atomic_text(path, json.dumps(doc, indent=1, sort_keys=True))
    return path


def add_to_roster(path: str | Path, site: str, public_key: str | Path, node_id: int,
                  signing_key: str | Path) -> Path:
    """Add or replace one site in the signed roster at ``path`` (created if missing) and sign it again.

    An existing roster must carry the coordinator's valid signature (it is
    checked before anything is added).
    """
    from oarbench.train.flower_trust import load_roster, load_signing_key

    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    entries: dict[str, tuple[str | Path, int]] = {}
    federation = "oarbench"
    if path.exists():
        public = load_signing_key(signing_key).public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        doc, _ = load_roster(path, public)
        federation = str(doc["roster"].get("federation", federation))
        entries = {s: (str(e["public_key"]), int(e["node_id"])) for s, e in doc["roster"]["sites"].items()}
    entries[str(site)] = (Path(public_key), int(node_id))
    return write_roster(path, entries, signing_key, federation=federation)


def coordinate(superlink: str, root_certificates: str | Path, work: str | Path, *, sites: Sequence[str],
               rounds: int, local_epochs: int = 1, iterations: int = 250, configuration: str = "3d_fullres",
               width: str = "default", seed: int | None = None, timeout_s: float = 24 * 3600.0,
               signing_key: str | Path, roster: str | Path, options: Any = None,
               plan_spacing: str = "finest", server_momentum: float = 0.0) -> dict[str, Any]:
    """Coordinator side: sign the Flower App with ``signing_key``, submit it to the SuperLink's Control API
    (``superlink``, on the coordinator's machine) with the signed ``roster`` file, and wait for it.

    ``options`` (:class:`oarbench.train.nnunet.TrainerOptions`, default nnU-Net's) reach
    every site's trainer in the ``train`` messages, as the storage engine passes them.
    ``seed`` (default ``options.seed``) seeds the initial global weights and, as the
    options' seed, every site's data order. ``server_momentum``: the server's momentum
    (:func:`oarbench.train.aggregate.server_momentum_step`; 0: plain FedAvg).

    The ServerApp runs at the SuperLink, so ``work`` must be a folder on the
    SuperLink's machine (the coordinator runs both). Returns the server's summary.
    Raises ``ValueError`` for an unusable key or roster (naming the file) and
    ``RuntimeError`` when the run fails.
    """
    require_flower()
    from oarbench.train import nnunet as nn
    from oarbench.train._plans import check_plan_spacing
    from oarbench.train.flower_trust import load_roster, load_signing_key

    from cryptography.hazmat.primitives import serialization

    check_plan_spacing(plan_spacing)
    server_momentum = check_server_momentum(server_momentum)
    options = options or nn.TrainerOptions()
    if seed is not None:
        options = replace(options, seed=seed)

    work = Path(work).resolve()
    key = load_signing_key(signing_key)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    doc, bound = load_roster(roster, public)
    unlisted = sorted(set(sites) - set(bound))
    if unlisted:
        raise ValueError(f"{roster}: no roster entry for site(s) {unlisted}")
    flwr_home = work / "flwr-home"
    write_connection(flwr_home, "coordinator", superlink, root_certificates)
    app = write_app(work / "app", coordinator_key=public)
    out = work / "server"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    cfg = {"sites": ",".join(sites), "rounds": rounds, "local-epochs": local_epochs, "iterations": iterations,
           "configuration": configuration, "width": width, "timeout": float(timeout_s), "out": str(out),
           "roster": json.dumps(doc, sort_keys=True), "plan-spacing": plan_spacing, "server-momentum": server_momentum,
           **options_to_run_config(options)}
    cfg_file = work / "run-config.json"
    nn._atomic_text(cfg_file, json.dumps(cfg))
    res = subprocess.run([sys.executable, "-m", "oarbench.train.flower_link", "submit", str(app), "coordinator",
                          "--signing-key", str(Path(signing_key).resolve()), "--run-config-json", str(cfg_file)],
                         env=flower_env(flwr_home), capture_output=True, text=True, cwd=work)
    (work / "flwr-run.log").write_text(res.stdout + res.stderr)
    summary = None
    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
    if summary is not None and summary.get("status") == "failed":
        raise RuntimeError(f"the federated run failed: {summary.get('error')} (see {out / 'summary.json'})")
    if res.returncode != 0 or summary is None:
        raise RuntimeError(f"the signed run failed (exit {res.returncode}); see {work / 'flwr-run.log'}: "
                           f"{(res.stdout + res.stderr)[-800:]}")
    return summary


def supernode_command(superlink: str, root_certificates: str | Path, auth_key: str | Path, *, site: str,
                      dataset: str | Path, work: str | Path, device: str = "cpu", configuration: str = "3d_fullres",
                      processes: int = 1, port: int = 9094, trusted_entities: str | Path,
                      threads: int | None = None, step_server: str | None = None) -> list[str]:
    """The ``flower-supernode`` command line of one hospital (outbound connection to the SuperLink only).

    ``trusted_entities``: the file naming the coordinator's app-signing key
    (:func:`oarbench.train.flower_trust.write_trusted_entities`); the SuperNode
    runs only Flower Apps signed with it. ``threads``: CPU threads of the site's
    training processes (default: torch's, one per core). ``step_server``: the socket
    of a :class:`oarbench.train.nnunet.StepServer` on the SuperNode's machine that
    trains the rounds (without one, each round trains in a fresh process).
    """
    node_config = {"site": site, "dataset": str(Path(dataset).resolve()), "work": str(Path(work).resolve()),
                   "device": device, "configuration": configuration, "processes": processes}
    if threads:
        node_config["threads"] = int(threads)
    if step_server:
        node_config["step-server"] = str(step_server)
    return [_flower_bin("flower-supernode"), "--superlink", superlink, "--root-certificates",
            str(Path(root_certificates).resolve()), "--auth-supernode-private-key", str(Path(auth_key).resolve()),
            "--trusted-entities", str(Path(trusted_entities).resolve()),
            "--node-config", _run_config(node_config), "--port", str(port)]
