"""Federated nnU-Net on Flower (flwr 1.42): a ServerApp and a ClientApp around oarbench's site code.

The same federation as the shared-storage engine (:mod:`oarbench.train.federated`),
on Flower's deployment runtime: ``flower-superlink`` at the coordinator, one
``flower-supernode`` per hospital (outbound connections only), TLS and
SuperNode authentication.

Protocol (one Flower run):

1. **Fingerprints** (``query`` messages): every SuperNode sends its site
   name and its nnU-Net fingerprint message (:meth:`NnunetSite.fingerprint_message`).
   The server validates each (:func:`oarbench.train.aggregate.check_fingerprint_body`),
   binds the site to the SuperNode's authenticated node id, and pins its case
   count. It merges the fingerprints and plans once
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from oarbench.train.aggregate import AggregationRules, aggregate, check_fingerprint_body

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


def weights_to_record(weights: Mapping[str, np.ndarray]) -> Any:
    """Named numpy arrays as a Flower ``ArrayRecord`` (sorted names)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(weights[k])) for k in sorted(weights)})


def record_to_weights(record: Any) -> dict[str, np.ndarray]:
    """Inverse of :func:`weights_to_record`."""
    return {k: np.asarray(record[k].numpy()) for k in record.keys()}


def _describe(content: Any) -> dict[str, Any]:
    """What a reply carried: record names, types, and per entry its type and shape or size."""
    out: dict[str, Any] = {}
    for name, rec in content.items():
        kind = type(rec).__name__
        entries: dict[str, Any] = {}
        for k in rec.keys():
            v = rec[k]
            if kind == "ArrayRecord":
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
    out: the server's output folder (plans, global weights, model folder, logs).
    seed: seed of the initial weights.
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

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> "ServerSettings":
        sites = tuple(s.strip() for s in str(cfg["sites"]).split(",") if s.strip())
        if not sites or len(set(sites)) != len(sites):
            raise ValueError(f"run config 'sites' must name distinct sites, got {cfg['sites']!r}")
        if not str(cfg.get("out", "")):
            raise ValueError("run config 'out' (the server's output folder) is empty")
        return cls(sites=sites, rounds=int(cfg["rounds"]), out=Path(str(cfg["out"])),
                   local_epochs=int(cfg.get("local-epochs", 1)), iterations=int(cfg.get("iterations", 250)),
                   configuration=str(cfg.get("configuration", "3d_fullres")), width=str(cfg.get("width", "default")),
                   seed=int(cfg.get("seed", 0)), timeout_s=float(cfg.get("timeout", 24 * 3600.0)),
                   options=options_from_run_config(cfg))

    def options_json(self) -> str:
        """The trainer options as the messages carry them (JSON)."""
        from oarbench.train.nnunet import TrainerOptions

        return (self.options or TrainerOptions()).to_json()


#: Trainer options in the Flower run config (kebab-case) -> (TrainerOptions field, the value that stands
#: for nnU-Net's own choice, None; a run config holds no null).
_RUN_CONFIG_OPTIONS: dict[str, tuple[str, Any]] = {
    "augmentation": ("augmentation", None), "initial-lr": ("initial_lr", 0.0), "batch-size": ("batch_size", 0),
    "optimizer": ("optimizer", None), "foreground-oversampling": ("foreground_oversampling", -1.0),
    "harmonise": ("harmonise", None), "optimizer-state": ("optimizer_state", None),
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
        if name == "harmonise":
            if not isinstance(value, bool):
                text = str(value).strip().lower()
                if text not in ("true", "false"):
                    raise ValueError(f"run config 'harmonise' must be true or false, got {str(value)[:20]!r}")
                value = text == "true"
        elif none is not None and value == none:
            value = None
        elif name == "batch_size":
            value = int(value)
        elif name in ("initial_lr", "foreground_oversampling"):
            value = float(value)
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
        return nnunet_plans(merged, header, configuration=st.configuration, width=st.width)

    def initial(plans: dict[str, Any], header: dict[str, Any], st: ServerSettings) -> dict[str, np.ndarray]:
        f = nn.initial_weights(plans, header, st.out / "initial.safetensors", configuration=st.configuration,
                               seed=st.seed)
        return tensors_from_bytes(f.read_bytes())

    def write_model(plans: dict[str, Any], header: dict[str, Any], final: Path, st: ServerSettings) -> Path:
        return nn.write_model_folder(st.out / "model", plans, header, final, configuration=st.configuration,
                                     fold="all")

    return ServerSteps(plan, initial, write_model)


def serve(grid: Any, settings: ServerSettings, steps: ServerSteps | None = None) -> dict[str, Any]:
    """The ServerApp's work: fingerprint round, shared plans, training rounds, final model.

    Returns the summary also written to ``OUT/summary.json``.

    Raises
    ------
    RuntimeError
        Too few SuperNodes connected in time, or a site's fingerprint or update
        was refused or missing (every listed site must take part).
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

    # 1. SuperNodes (authenticated by the SuperLink)
    while len(list(grid.get_node_ids())) < len(settings.sites):
        if time.monotonic() - started > settings.timeout_s:
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} SuperNode(s) connected after "
                               f"{settings.timeout_s:.0f} s; the federation needs {len(settings.sites)}")
        time.sleep(0.5)
    nodes = sorted(int(n) for n in grid.get_node_ids())

    # 2. fingerprint round: bind each site to its node id, pin its case count
    options = settings.options_json()  # the same trainer options (and harmonisation) at every site
    replies = ask(nodes, "query", RecordDict({"oarbench": ConfigRecord({"step": "fingerprint",
                                                                        "trainer-options": options})}))
    node_site: dict[int, str] = {}
    bodies: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for node, content in sorted(replies.items()):
        if isinstance(content, Exception):
            problems.append(str(content))
            continue
        try:
            rec = content["fingerprint"]
            site, body = str(rec["site"]), json.loads(str(rec["message"]))
            check_fingerprint_body(body, rules=settings.rules)
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            problems.append(f"node {node}: invalid fingerprint reply: {exc}")
            continue
        if site not in settings.sites:
            problems.append(f"node {node}: site {site!r} is not in this federation {settings.sites}")
        elif site in bodies:
            problems.append(f"node {node}: site {site!r} is claimed by two SuperNodes")
        else:
            node_site[node], bodies[site] = site, body
    missing = sorted(set(settings.sites) - set(bodies))
    if missing:
        raise RuntimeError(f"no valid fingerprint from site(s) {missing}: {problems}")
    pinned = {s: int(b["num_cases"]) for s, b in bodies.items()}
    nn._atomic_text(out / "fingerprints.json", json.dumps(bodies, indent=1, sort_keys=True))
    merged, header = merge_site_messages(bodies)
    plans = steps.plan(merged, header, settings)
    nn._atomic_text(out / "plans.json", json.dumps(plans, indent=1, sort_keys=True))
    plans_text = json.dumps(plans, sort_keys=True)

    # 3. rounds
    global_w = steps.initial(plans, header, settings)
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
            agg = aggregate(updates, global_w, pinned, settings.rules, min_updates=len(settings.sites))
        except ValueError as exc:
            raise RuntimeError(f"round {r}: {exc}; failed sites: {failed}") from None
        global_w = agg.weights
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
        "sites": {str(n): s for n, s in node_site.items()},
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


def make_server_app() -> Any:
    """The Flower ``ServerApp`` (its run config: see :class:`ServerSettings`)."""
    require_flower()
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        serve(grid, ServerSettings.from_run_config(context.run_config))

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
                                options=options, threads=int(cfg["threads"]) if cfg.get("threads") else None)


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
augmentation = "default"
initial-lr = 0.0
batch-size = 0
optimizer = "sgd"
foreground-oversampling = -1.0
harmonise = true
optimizer-state = "kept"
"""


def write_app(folder: str | Path) -> Path:
    """Write the Flower App (``pyproject.toml`` and two one-line modules) that ``flwr run`` submits."""
    folder = Path(folder)
    pkg = folder / "oarbench_fl_app"
    pkg.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(_PYPROJECT)
    (pkg / "__init__.py").write_text('"""oarbench on Flower."""\n')
    (pkg / "server.py").write_text("from oarbench.train.flower import make_server_app\n\napp = make_server_app()\n")
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


def flower_env(flwr_home: str | Path) -> dict[str, str]:
    """Environment for Flower's processes: ``FLWR_HOME``, and this Python's scripts first on ``PATH``."""
    return dict(os.environ, FLWR_HOME=str(Path(flwr_home).resolve()),
                PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))


def _run_config(values: Mapping[str, Any]) -> str:
    parts = []
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            v = json.dumps(str(v))
        parts.append(f"{k}={v}")
    return " ".join(parts)


class LocalFlowerFederation:
    """A SuperLink and SuperNodes on this machine (loopback), with TLS and SuperNode authentication.

    Used by ``oarbench fl simulate --engine flower``, the demo and the tests;
    each process is a real Flower process (``flower-superlink``,
    ``flower-supernode``), exactly as at a coordinator and in hospitals.
    """

    def __init__(self, work: str | Path) -> None:
        require_flower()
        self.work = Path(work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.tls = make_tls(self.work / "tls")
        self.flwr_home = self.work / "flwr-home"
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        write_connection(self.flwr_home, "local", self.address, self.tls.ca)
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
        self._start("superlink", [
            _flower_bin("flower-superlink"), "--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile",
            str(self.tls.cert), "--ssl-keyfile", str(self.tls.key), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.work / "superlink.db"),
        ])
        deadline = time.monotonic() + timeout_s
        while True:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"flower-superlink exited; see {self.logs / 'superlink.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"flower-superlink did not listen on {self.address} within {timeout_s:.0f} s")
                time.sleep(0.2)

    def register(self, public_key: Path, name: str) -> None:
        """Register a SuperNode's public key with the SuperLink (``flwr supernode register``)."""
        res = subprocess.run([_flower_bin("flwr"), "supernode", "register", str(public_key), "local", "--name", name],
                             env=self.env, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"flwr supernode register {public_key} failed: {(res.stdout + res.stderr)[-800:]}")

    def start_supernode(self, name: str, private_key: Path, *, site: str, dataset: str | Path, work: str | Path,
                        device: str = "cpu", configuration: str = "3d_fullres", processes: int = 1,
                        max_retries: int | None = None, threads: int | None = None) -> subprocess.Popen[bytes]:
        """Start one hospital's SuperNode (the command of :func:`supernode_command`)."""
        args = supernode_command(self.address, self.tls.ca, private_key, site=site, dataset=dataset, work=work,
                                 device=device, configuration=configuration, processes=processes,
                                 port=_free_port(), threads=threads)
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
    seed: int = 0,
    timeout_s: float = 24 * 3600.0,
    federation: LocalFlowerFederation | None = None,
    options: Any = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """A whole federation through Flower on this machine: SuperLink, one SuperNode per dataset, one run.

    Returns the server's summary (``WORK/server/summary.json``) with the model
    folders: ``"model"`` (the server's) and ``"site_models"`` (by site).
    With ``federation`` given (already started), only the SuperNodes and the
    run are added to it.
    """
    require_flower()
    work = Path(work).resolve()
    own = federation is None
    fed = federation or LocalFlowerFederation(work / "flower")
    try:
        if own:
            fed.start_superlink()
        keys = work / "node-keys"
        keys.mkdir(parents=True, exist_ok=True)
        for site, ds in datasets.items():
            priv, pub = (keys / site, keys / f"{site}.pub")
            if not priv.is_file():
                priv, pub = make_node_key(keys, site)
            fed.register(pub, site)
            fed.start_supernode(site, priv, site=site, dataset=ds, work=work / "sites" / site, device=device,
                                configuration=configuration, processes=num_processes, threads=threads)
        # the coordinator's own path: write the Flower App, flwr run against the SuperLink, wait
        summary = coordinate(fed.address, fed.tls.ca, work, sites=list(datasets), rounds=rounds,
                             local_epochs=local_epochs, iterations=iterations, configuration=configuration,
                             width=width, seed=seed, timeout_s=timeout_s, options=options)
        summary["site_models"] = {s: str(work / "sites" / s / "model") for s in summary["site_models_written"]}
        return summary
    finally:
        if own:
            fed.stop()


# --------------------------------------------------------------------------- deployment across machines


def coordinate(superlink: str, root_certificates: str | Path, work: str | Path, *, sites: Sequence[str],
               rounds: int, local_epochs: int = 1, iterations: int = 250, configuration: str = "3d_fullres",
               width: str = "default", seed: int = 0, timeout_s: float = 24 * 3600.0,
               options: Any = None) -> dict[str, Any]:
    """Coordinator side: submit the federated run to a running SuperLink (``flwr run``) and wait for it.

    ``options`` (:class:`oarbench.train.nnunet.TrainerOptions`, default nnU-Net's) reach
    every site's trainer in the ``train`` messages, as the storage engine passes them.

    The ServerApp runs at the SuperLink, so ``work`` must be a folder on the
    SuperLink's machine (the coordinator runs both). Returns the server's summary.
    """
    require_flower()
    work = Path(work).resolve()
    flwr_home = work / "flwr-home"
    write_connection(flwr_home, "coordinator", superlink, root_certificates)
    app = write_app(work / "app")
    out = work / "server"
    (out / "summary.json").unlink(missing_ok=True)
    cfg = {"sites": ",".join(sites), "rounds": rounds, "local-epochs": local_epochs, "iterations": iterations,
           "configuration": configuration, "width": width, "seed": seed, "timeout": float(timeout_s), "out": str(out),
           **options_to_run_config(options)}
    res = subprocess.run([_flower_bin("flwr"), "run", str(app), "coordinator", "--run-config", _run_config(cfg),
                          "--stream"], env=flower_env(flwr_home), capture_output=True, text=True, cwd=work)
    (work / "flwr-run.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0 or not (out / "summary.json").is_file():
        raise RuntimeError(f"flwr run failed (exit {res.returncode}); see {work / 'flwr-run.log'}: "
                           f"{(res.stdout + res.stderr)[-800:]}")
    return json.loads((out / "summary.json").read_text())


def supernode_command(superlink: str, root_certificates: str | Path, auth_key: str | Path, *, site: str,
                      dataset: str | Path, work: str | Path, device: str = "cpu", configuration: str = "3d_fullres",
                      processes: int = 1, port: int = 9094, threads: int | None = None) -> list[str]:
    """The ``flower-supernode`` command line of one hospital (outbound connection to the SuperLink only).

    ``threads``: CPU threads of the site's training processes (default: torch's, one per core).
    """
    node_config = {"site": site, "dataset": str(Path(dataset).resolve()), "work": str(Path(work).resolve()),
                   "device": device, "configuration": configuration, "processes": processes}
    if threads:
        node_config["threads"] = int(threads)
    return [_flower_bin("flower-supernode"), "--superlink", superlink, "--root-certificates",
            str(Path(root_certificates).resolve()), "--auth-supernode-private-key", str(Path(auth_key).resolve()),
            "--node-config", _run_config(node_config), "--port", str(port)]
