"""The coordinator's locked SuperLink, and the coordinator's signed run submission (flwr 1.42).

flwr 1.42's ``flower-superlink`` serves its Fleet API (SuperNodes), Control
API (``flwr run``, ``flwr ls``, ``flwr supernode register``) and Runtime API
(the ServerApp) on one HTTPS port (``--host``/``--port``). Exposed to the
hospitals, that port lets anyone who can reach it and holds the public CA
certificate register nodes, list runs and start apps. This module runs the
same SuperLink (Flower's own application, handlers and state) with:

* two listeners: the **public** one (``--public-host``/``--public-port``)
  serves the Fleet API only (``/v1/fleet/...``; anything else gets 404); the
  **control** one (flower-superlink's ``--host``/``--port``, loopback by
  default) serves everything, so node registration, ``flwr ls`` and run
  submission work only from the coordinator's machine;
* **signed runs only**: ``StartRun`` is refused unless the submitted FAB
  carries a valid signature by the coordinator's key
  (:mod:`oarbench.train.flower_trust`); the signature is stored with the FAB,
  so each SuperNode (``--trusted-entities``) checks it again before running
  the app. Apps from Flower Hub and stored apps are refused.

``python -m oarbench.train.flower_link superlink --public-port P --coordinator-key KEY.pub [flower-superlink options]``
starts it; ``python -m oarbench.train.flower_link submit APP CONNECTION --signing-key KEY --run-config-json FILE``
is ``flwr run --stream`` with the coordinator's signature on the FAB.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Sequence

from oarbench._net import is_loopback

__all__ = ["FLWR_VERSION", "PublicFleetOnly", "signed_start_run", "run_superlink", "submit", "main"]

#: The flwr release whose SuperLink application and handlers this module wraps.
FLWR_VERSION = "1.42.0"
FLEET_PREFIX = "/v1/fleet/"


class PublicFleetOnly:
    """ASGI wrapper: requests that arrive on any port but ``control_port`` may reach ``/v1/fleet/...`` only."""

    def __init__(self, app: Any, control_port: int) -> None:
        self.app = app
        self.control_port = int(control_port)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            server = scope.get("server") or ("", -1)
            if int(server[1]) != self.control_port and not str(scope.get("path", "")).startswith(FLEET_PREFIX):
                if scope["type"] == "http":
                    await send({"type": "http.response.start", "status": 404,
                                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                    await send({"type": "http.response.body",
                                "body": b"only the Fleet API is served on this port\n"})
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


def signed_start_run(original: Any, public_key: str) -> Any:
    """Wrap flwr's ``control_handlers.start_run``: only FABs signed by ``public_key`` start, their signature kept."""
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.supercore.fab import Fab

    from oarbench.train.flower_trust import key_id, verify_fab

    kid = key_id(public_key)

    class _KeepSignature:
        """The LinkState, except that ``store_app`` stores the FAB with the coordinator's signature."""

        def __init__(self, state: Any, verifications: dict[str, str]) -> None:
            self._state, self._verifications = state, verifications

        def store_app(self, *args: Any, **kwargs: Any) -> Any:
            if "fab" in kwargs:
                fab = kwargs["fab"]
                kwargs["fab"] = Fab(fab.hash_str, fab.content, dict(self._verifications))
            else:
                fab = args[0]
                args = (Fab(fab.hash_str, fab.content, dict(self._verifications)),) + tuple(args[1:])
            return self._state.store_app(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._state, name)

    def start_run(request: Any, account: Any, state: Any, fleet_api_type: Any, **kwargs: Any) -> Any:
        content = bytes(request.fab.content)
        verifications = dict(request.fab.verifications)
        if request.app_spec or not content:
            msg = "this SuperLink starts only Flower Apps submitted with the coordinator's signature"
            raise FlowerError(ApiErrorCode.INVALID_RUN_CONFIG, msg, public_details=msg)
        if not verify_fab(content, verifications, public_key):
            msg = f"the Flower App is not signed by the coordinator's key {kid}; refused"
            raise FlowerError(ApiErrorCode.INVALID_RUN_CONFIG, msg, public_details=msg)
        # exactly what each SuperNode checks (flower-supernode --trusted-entities), nothing else
        kept = {kid: verifications[kid], "valid_license": "Valid"}
        return original(request, account, _KeepSignature(state, kept), fleet_api_type, **kwargs)

    return start_run


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_superlink(public_host: str, public_port: int, coordinator_key: Path, superlink_args: Sequence[str],
                  expose_control: bool = False) -> None:
    """Run flwr's SuperLink with a Fleet-only public listener and coordinator-signed runs (blocks)."""
    import flwr
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app
    from flwr.superlink.servicer.control import control_handlers

    from oarbench.train.flower_trust import load_public_key_text

    # the module (flwr.superlink.cli exports a function of the same name)
    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
    if flwr.__version__ != FLWR_VERSION:
        raise SystemExit(f"oarbench's locked SuperLink wraps flwr {FLWR_VERSION}; this is flwr {flwr.__version__}")
    public_key = load_public_key_text(coordinator_key)
    legacy = [v for v in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API") if os.environ.get(v)]
    if legacy:  # flwr's legacy gRPC listeners would bypass the two HTTP listeners below
        raise SystemExit(f"unset {', '.join(legacy)}: the locked SuperLink serves its APIs over HTTPS only")
    sys.argv = ["flower-superlink", *superlink_args]
    config = fs._parse_superlink_lifespan_config()
    if config.certificates is None:
        raise SystemExit("the locked SuperLink needs TLS: give --ssl-ca-certfile, --ssl-certfile, --ssl-keyfile")
    if not config.enable_supernode_auth:
        raise SystemExit("the locked SuperLink needs --enable-supernode-auth (registered SuperNode keys only)")
    if not is_loopback(config.host) and not expose_control:
        raise SystemExit(f"the Control API (--host {config.host}) must be on loopback; "
                         "see docs/training.md for reaching it from another machine")
    if int(public_port) == int(config.port):
        raise SystemExit("--public-port must differ from the control port (--port)")
    control_handlers.start_run = signed_start_run(control_handlers.start_run, public_key)
    app = PublicFleetOnly(create_app(config, fs.SuperLinkLifespan), control_port=config.port)
    sockets = [_listen(config.host, config.port), _listen(public_host, int(public_port))]
    uv = uvicorn.Config(app=app, reload=False, access_log=True, log_config=get_uvicorn_log_config(console_handler.level),
                        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile, workers=1,
                        lifespan="on")
    print(f"locked SuperLink: Fleet API on {public_host}:{public_port}, Control and Runtime APIs on "
          f"{config.host}:{config.port}; runs signed by {coordinator_key}", flush=True)
    uvicorn.Server(uv).run(sockets=sockets)


def submit(app: Path, connection: str | None, signing_key: Path, run_config: dict[str, Any],
           stream: bool = True) -> int:
    """``flwr run APP CONNECTION --stream`` with the coordinator's signature on the FAB; returns the run id.

    Reads the Flower CLI configuration from ``FLWR_HOME`` (as ``flwr`` does).
    """
    import hashlib

    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.log import start_stream
    from flwr.cli.utils import flwr_cli_exc_handler, init_http_client_from_connection
    from flwr.common.constant import FAB_CONFIG_FILE
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.fab import Fab

    from oarbench.train.flower_trust import load_signing_key, sign_fab

    key = load_signing_key(signing_key)
    app = Path(app).resolve()
    load_and_validate(app / FAB_CONFIG_FILE, check_module=False)
    fab = build_fab_from_disk(app)
    verifications = sign_fab(fab, key)
    conn = read_superlink_connection(connection)
    client = init_http_client_from_connection(conn)
    try:
        req = StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, verifications)),
                              override_config=user_config_to_proto(dict(run_config)),
                              federation=conn.federation or "")
        with flwr_cli_exc_handler():
            res = client.StartRun(req)
        if not res.HasField("run_id"):
            raise RuntimeError("the SuperLink did not start the run")
        print(f"Successfully started signed run {res.run_id}", flush=True)
        if stream:
            start_stream(res.run_id, client)
        return int(res.run_id)
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m oarbench.train.flower_link")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("superlink", help="flower-superlink with a Fleet-only public port and signed runs only")
    p.add_argument("--public-host", default="0.0.0.0", help="address of the public (Fleet API) listener")
    p.add_argument("--public-port", type=int, required=True)
    p.add_argument("--coordinator-key", type=Path, required=True, help="the coordinator's Ed25519 public key")
    p.add_argument("--expose-control", action="store_true",
                   help="allow a non-loopback --host for the Control API (behind your own access control)")
    s = sub.add_parser("submit", help="flwr run --stream of an app signed with the coordinator's key")
    s.add_argument("app", type=Path)
    s.add_argument("connection", nargs="?", default=None)
    s.add_argument("--signing-key", type=Path, required=True)
    s.add_argument("--run-config-json", type=Path, required=True)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "superlink":
        run_superlink(args.public_host, args.public_port, args.coordinator_key, rest, args.expose_control)
        return 0
    if rest:
        parser.error(f"unknown arguments: {' '.join(rest)}")
    cfg = json.loads(args.run_config_json.read_text())
    submit(args.app, args.connection, args.signing_key, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
