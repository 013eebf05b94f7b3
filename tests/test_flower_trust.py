"""Who may run code on the hospitals and who is which site, on the Flower engine (docs/training.md, "Flower engine").

With real processes on 127.0.0.1 (one locked SuperLink and three SuperNodes for
the whole module): an outsider holding only the public CA certificate cannot
register a node, list runs or start an app on the public port; an unsigned app
or one signed by another key is refused at the Control API; a SuperNode runs
only apps signed by the coordinator's key (Flower's trusted entities), also
when a SuperLink hands it an unsigned one; the coordinator's signed app runs on
every SuperNode that trusts its key. Each probe app's ClientApp writes a marker
file when it runs, so "never executed" is checked on disk.

In-process: the coordinator's signature is the one Flower's SuperNode verifies
(flwr's own ``_verify_fab`` as the oracle), the roster's signature and checks,
and the server's identity rules (a site is accepted only from its roster node;
two nodes claiming one site stop the run naming both; summary.json says so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from oarbench.train import flower_trust as ft  # noqa: E402

# --------------------------------------------------------------------------- signatures and roster, in-process


def _fab_like(tmp_path: Path) -> bytes:
    return os.urandom(3000)


def test_fab_signature_is_what_flowers_supernode_verifies(tmp_path: Path) -> None:
    from flwr.supercore.fab import Fab
    from flwr.supernode.start_client_internal import _verify_fab  # the SuperNode's own check (oracle)

    priv, pub = ft.make_coordinator_key(tmp_path / "k")
    assert oct(priv.stat().st_mode & 0o777) == "0o600"
    key, public = ft.load_signing_key(priv), ft.load_public_key_text(pub)
    trusted = {ft.key_id(public): public}
    fab = _fab_like(tmp_path)
    ver = ft.sign_fab(fab, key)
    assert _verify_fab(Fab("h", fab, {**ver, "valid_license": "Valid"}), trusted)
    assert ft.verify_fab(fab, ver, public)
    flipped = bytearray(fab)
    flipped[1234] ^= 1
    assert not _verify_fab(Fab("h", bytes(flipped), {**ver, "valid_license": "Valid"}), trusted)
    assert not ft.verify_fab(bytes(flipped), ver, public)
    # signed by another key: neither Flower nor oarbench accepts it
    other = ft.load_signing_key(ft.make_coordinator_key(tmp_path / "o")[0])
    forged = {ft.key_id(public): next(iter(ft.sign_fab(fab, other).values()))}
    assert not _verify_fab(Fab("h", fab, {**forged, "valid_license": "Valid"}), trusted)
    assert not ft.verify_fab(fab, forged, public)
    # the trusted-entities file is what flower-supernode reads (YAML: key id -> OpenSSH public key)
    import yaml

    te = ft.write_trusted_entities(tmp_path / "te.yaml", public)
    assert yaml.safe_load(te.read_text()) == trusted


def test_signing_key_problems_are_one_line(tmp_path: Path) -> None:
    from oarbench.train.flower import make_node_key

    bad = tmp_path / "bad"
    bad.write_text("not a key")
    with pytest.raises(ValueError, match=f"^{bad}: not an unencrypted OpenSSH private key"):
        ft.load_signing_key(bad)
    ec_priv, ec_pub = make_node_key(tmp_path, "ec")  # an EC P-384 node key is not a signing key
    with pytest.raises(ValueError, match="must be Ed25519"):
        ft.load_signing_key(ec_priv)
    with pytest.raises(ValueError, match=f"^{ec_pub}: the coordinator's key must be Ed25519"):
        ft.load_public_key_text(ec_pub)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        ft.load_signing_key(fifo)  # never opened: it would block


def test_roster_signed_checked_and_refused_when_edited(tmp_path: Path) -> None:
    from oarbench.train.flower import make_node_key, write_roster

    priv, pub = ft.make_coordinator_key(tmp_path / "k")
    public = ft.load_public_key_text(pub)
    _, a = make_node_key(tmp_path, "A")
    _, b = make_node_key(tmp_path, "B")
    path = write_roster(tmp_path / "roster.json", {"A": (a, 11), "B": (b, 22)}, priv)
    doc, bound = ft.load_roster(path, public)
    assert bound == {"A": 11, "B": 22}
    assert doc["roster"]["sites"]["A"]["public_key"] == " ".join(a.read_text().split()[:2])
    # an edit (site A moved to node 33) breaks the signature
    edited = json.loads(path.read_text())
    edited["roster"]["sites"]["A"]["node_id"] = 33
    with pytest.raises(ValueError, match="signature does not match"):
        ft.verify_roster(edited, public)
    # signed by someone else
    other_priv, _ = ft.make_coordinator_key(tmp_path / "o")
    other = write_roster(tmp_path / "other.json", {"A": (a, 11)}, other_priv)
    with pytest.raises(ValueError, match="not by the coordinator's key"):
        ft.load_roster(other, public)
    # one key or one node for two sites is refused when writing
    with pytest.raises(ValueError, match="'A' and 'B' have the same public key"):
        write_roster(tmp_path / "x.json", {"A": (a, 11), "B": (a, 22)}, priv)
    with pytest.raises(ValueError, match="'A' and 'B' have the same node id"):
        write_roster(tmp_path / "x.json", {"A": (a, 11), "B": (b, 11)}, priv)
    notjson = tmp_path / "n.json"
    notjson.write_text("{")
    with pytest.raises(ValueError, match=f"^{notjson}: the roster is not JSON"):
        ft.load_roster(notjson, public)


# --------------------------------------------------------------------------- the server's identity rules


from tests._flower_fakes import _Grid, _Msg, _site, _steps  # noqa: E402


@pytest.fixture()
def fake_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pytest.importorskip("flwr.app"), "Message", _Msg)


def test_impostor_claiming_a_site_first_fails_the_run_naming_both(tmp_path: Path, fake_messages) -> None:
    """Node 5 (registered, not in the roster) answers first claiming A; the real A is node 11."""
    from oarbench.train.flower import ServerSettings, serve

    grid = _Grid({5: _site("A", 50, 9.0), 11: _site("A", 2, 1.0), 22: _site("B", 3, 2.0)})
    st = ServerSettings(sites=("A", "B"), rounds=1, out=tmp_path / "srv")
    with pytest.raises(RuntimeError, match=r"site 'A' is claimed by nodes 5 and 11 \(the roster binds it to node 11\)"):
        serve(grid, st, _steps(), roster={"A": 11, "B": 22})
    assert not [s for s in grid.sent if s[1] == "train"]  # nobody trained
    summary = json.loads((tmp_path / "srv/summary.json").read_text())
    assert summary["status"] == "failed" and "nodes 5 and 11" in summary["error"]
    claims = {c["node"]: c for c in summary["identity"]["claims"]}
    assert claims[5]["accepted"] is False and claims[5]["reason"] == "the roster binds site 'A' to node 11"
    assert claims[11]["accepted"] is True and claims[22]["accepted"] is True


def test_a_rostered_node_claiming_another_site_fails_the_run(tmp_path: Path, fake_messages) -> None:
    from oarbench.train.flower import ServerSettings, serve

    grid = _Grid({11: _site("A", 2, 1.0), 22: _site("A", 3, 2.0)})  # B's node says it is A
    with pytest.raises(RuntimeError, match="site 'A' is claimed by nodes 11 and 22"):
        serve(grid, ServerSettings(sites=("A", "B"), rounds=1, out=tmp_path / "srv"), _steps(),
              roster={"A": 11, "B": 22})


def test_other_claims_refused_and_recorded_run_completes(tmp_path: Path, fake_messages) -> None:
    """Node 7 claims an unknown site: refused, recorded, never trains; A and B average 2:3 (+0.25, +0.5) -> 1 + 0.4."""
    from safetensors.numpy import load_file

    from oarbench.train.flower import ServerSettings, serve

    grid = _Grid({7: _site("Z", 40, 9.0), 11: _site("A", 2, 0.25), 22: _site("B", 3, 0.5)})
    summary = serve(grid, ServerSettings(sites=("A", "B"), rounds=1, out=tmp_path / "srv"), _steps(),
                    roster={"A": 11, "B": 22})
    assert summary["status"] == "completed" and summary["sites"] == {"11": "A", "22": "B"}
    assert (7, "train") not in grid.sent
    refused = [c for c in summary["identity"]["claims"] if not c["accepted"]]
    assert refused == [{"node": 7, "site": "Z", "accepted": False,
                        "reason": "site 'Z' is not in this federation ('A', 'B')"}]
    assert json.loads((tmp_path / "srv/summary.json").read_text())["identity"] == summary["identity"]
    np.testing.assert_allclose(load_file(str(tmp_path / "srv/final.safetensors"))["w"], np.full(4, 1.4, np.float32))


def test_server_needs_a_roster_entry_for_every_site(tmp_path: Path, fake_messages) -> None:
    from oarbench.train.flower import ServerSettings, serve

    grid = _Grid({11: _site("A", 2, 1.0), 22: _site("B", 3, 2.0)})
    st = ServerSettings(sites=("A", "B"), rounds=1, out=tmp_path / "srv")
    with pytest.raises(RuntimeError, match="no federation roster"):
        serve(grid, st, _steps())
    with pytest.raises(RuntimeError, match=r"site\(s\) \['B'\] have no entry in the federation roster"):
        serve(grid, st, _steps(), roster={"A": 11})
    # the roster's node for B is not connected: the wait is bounded and names the site
    slow = ServerSettings(sites=("A", "B"), rounds=1, out=tmp_path / "srv2", timeout_s=0.2)
    with pytest.raises(RuntimeError, match=r"SuperNode\(s\) of site\(s\) \['B'\] did not connect"):
        serve(grid, slow, _steps(), roster={"A": 11, "B": 99})


# --------------------------------------------------------------------------- real processes on 127.0.0.1

_PROBE_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "probe"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "tester"

[tool.flwr.app.components]
serverapp = "{name}_app.server:app"
clientapp = "{name}_app.client:app"

[tool.flwr.app.config]
nodes = 1
wait = 60.0
"""

_PROBE_SERVER = """import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()

@app.main()
def main(grid, context):
    cfg = context.run_config
    deadline = time.monotonic() + float(cfg["wait"])
    while len(list(grid.get_node_ids())) < int(cfg["nodes"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    nodes = sorted(grid.get_node_ids())
    msgs = [Message(content=RecordDict({{"probe": ConfigRecord({{"x": 1}})}}), dst_node_id=n, message_type="query")
            for n in nodes]
    out = {{}}
    for r in grid.send_and_receive(msgs, timeout=float(cfg["wait"])):
        out[str(r.metadata.src_node_id)] = str(r.error.reason) if r.has_error() else "ran"
    Path({result!r}).write_text(json.dumps({{"nodes": [str(n) for n in nodes], "replies": out}}))
"""

_PROBE_CLIENT = """import json
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.query()
def query(msg, context):
    # what a hostile app would do on a hospital's machine: read its node config, leave a trace
    marker = Path({markers!r}) / (str(context.node_config.get("site", context.node_id)) + ".ran")
    marker.write_text(json.dumps(dict(context.node_config)))
    return Message(content=RecordDict({{"probe": ConfigRecord({{"ok": 1}})}}), reply_to=msg)
"""


def _probe_app(folder: Path, name: str, markers: Path) -> tuple[Path, Path]:
    """A small Flower App whose ClientApp writes MARKERS/<site>.ran when it runs; the ServerApp writes result.json."""
    markers.mkdir(parents=True, exist_ok=True)
    result = folder / "result.json"
    pkg = folder / f"{name}_app"
    pkg.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(_PROBE_TOML.format(name=name))
    (pkg / "__init__.py").write_text("")
    (pkg / "server.py").write_text(_PROBE_SERVER.format(result=str(result)))
    (pkg / "client.py").write_text(_PROBE_CLIENT.format(markers=str(markers)))
    return folder, result


def _flwr(args: list[str], flwr_home: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    from oarbench.train.flower import _flower_bin, flower_env

    return subprocess.run([_flower_bin("flwr"), *args], env=flower_env(flwr_home), capture_output=True, text=True,
                          timeout=timeout)


def _words(res: subprocess.CompletedProcess[str]) -> str:
    """The CLI's output as single-spaced words (Flower draws errors in boxes)."""
    import re

    return " ".join(re.sub("[\u2500-\u257f]", " ", res.stdout + res.stderr).split())


def _wait_file(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    """One locked SuperLink; SuperNodes A and B trust the coordinator's key, C trusts another key only."""
    from oarbench.train.flower import LocalFlowerFederation, make_node_key

    root = tmp_path_factory.mktemp("flower-trust")
    fed = LocalFlowerFederation(root / "fed")
    try:
        fed.start_superlink()
        keys = root / "node-keys"
        pubs = {s: make_node_key(keys, s)[1] for s in ("A", "B", "C")}
        roster = fed.roster(pubs, root / "roster.json")
        _, other_pub = ft.make_coordinator_key(root / "other-coordinator")
        other_te = ft.write_trusted_entities(root / "other-te.yaml", ft.load_public_key_text(other_pub))
        for s in ("A", "B", "C"):
            fed.start_supernode(s, keys / s, site=s, dataset=root, work=root / "sites" / s,
                                trusted_entities=other_te if s == "C" else None)
        yield {"fed": fed, "root": root, "roster": roster}
    finally:
        fed.stop()


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.xdist_group("flower_trust")  # one deployment for the three
def test_outsider_with_the_ca_certificate_cannot_register_list_or_run(deployment) -> None:
    from oarbench.train.flower import make_node_key, write_connection

    fed, root = deployment["fed"], deployment["root"]
    home = root / "outsider-home"  # the public (Fleet API) address and the public CA certificate, nothing else
    write_connection(home, "outsider", fed.address, fed.tls.ca)
    _, rogue_pub = make_node_key(root / "outsider-keys", "rogue")
    app, _ = _probe_app(root / "outsider-app", "outsider", root / "outsider-markers")
    reg = _flwr(["supernode", "register", str(rogue_pub), "outsider", "--name", "rogue"], home)
    ls = _flwr(["ls", "outsider"], home)
    run = _flwr(["run", str(app), "outsider"], home)
    nodes_ls = _flwr(["supernode", "ls", "outsider"], home)
    for res in (reg, ls, run, nodes_ls):
        assert res.returncode != 0, res.stdout + res.stderr
    # the coordinator sees only its three nodes and no run from anyone
    nodes = _flwr(["supernode", "ls", "local", "--format", "json"], fed.flwr_home)
    assert nodes.returncode == 0, nodes.stderr
    assert " ".join(rogue_pub.read_text().split()[:2]).split()[1] not in nodes.stdout
    assert len(json.loads(nodes.stdout[nodes.stdout.index("{"):])["nodes"]) == 3
    runs = _flwr(["ls", "local", "--format", "json"], fed.flwr_home)
    assert runs.returncode == 0 and json.loads(runs.stdout[runs.stdout.index("{"):])["runs"] == []
    # the public port serves the Fleet API and nothing else
    import ssl

    import httpx

    with httpx.Client(verify=ssl.create_default_context(cafile=str(fed.tls.ca))) as client:
        assert client.post(f"https://{fed.address}/v1/control/list-runs", content=b"").status_code == 404
        assert client.get(f"https://{fed.address}/v1/runtime/get-run").status_code == 404
        assert client.get(f"https://{fed.address}/docs").status_code == 404
    assert not any((root / "outsider-markers").iterdir())


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.xdist_group("flower_trust")  # one deployment for the three
def test_unsigned_or_foreign_signed_app_refused_at_the_control_api(deployment) -> None:
    fed, root = deployment["fed"], deployment["root"]
    markers = root / "rogue-markers"
    app, result = _probe_app(root / "rogue-app", "rogue", markers)
    plain = _flwr(["run", str(app), "local"], fed.flwr_home)  # plain flwr run from the coordinator's machine
    assert plain.returncode != 0 and "not signed by the coordinator's key" in _words(plain), plain.stderr
    hub = _flwr(["run", "@tester/rogue", "local"], fed.flwr_home)  # an app from Flower Hub (never fetched)
    assert hub.returncode != 0 and "only Flower Apps submitted with the coordinator's signature" in _words(hub)
    other_priv, _ = ft.make_coordinator_key(root / "rogue-key")
    cfg = root / "rogue-cfg.json"
    cfg.write_text(json.dumps({"nodes": 3, "wait": 20.0}))
    from oarbench.train.flower import flower_env

    res = subprocess.run([sys.executable, "-m", "oarbench.train.flower_link", "submit", str(app), "local",
                          "--signing-key", str(other_priv), "--run-config-json", str(cfg)],
                         env=flower_env(fed.flwr_home), capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "not signed by the coordinator's key" in _words(res), res.stderr
    runs = _flwr(["ls", "local", "--format", "json"], fed.flwr_home)
    assert json.loads(runs.stdout[runs.stdout.index("{"):])["runs"] == []
    assert not result.exists() and not any(markers.iterdir())


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.xdist_group("flower_trust")  # one deployment for the three
def test_signed_app_runs_only_on_supernodes_trusting_the_coordinator(deployment) -> None:
    """A and B trust the coordinator's key and run its signed probe; C trusts another key and refuses it."""
    fed, root = deployment["fed"], deployment["root"]
    markers = root / "signed-markers"
    app, result = _probe_app(root / "signed-app", "signed", markers)
    cfg = root / "signed-cfg.json"
    cfg.write_text(json.dumps({"nodes": 3, "wait": 60.0}))
    from oarbench.train.flower import flower_env

    res = subprocess.run([sys.executable, "-m", "oarbench.train.flower_link", "submit", str(app), "local",
                          "--signing-key", str(fed.signing_key), "--run-config-json", str(cfg)],
                         env=flower_env(fed.flwr_home), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert _wait_file(result, 120), (res.stdout + res.stderr)[-2000:]
    assert sorted(p.name for p in markers.iterdir()) == ["A.ran", "B.ran"]
    replies = json.loads(result.read_text())["replies"]
    _, bound = ft.load_roster(deployment["roster"], fed.coordinator_key)
    assert replies[str(bound["A"])] == replies[str(bound["B"])] == "ran"
    assert replies[str(bound["C"])] != "ran"  # C's SuperNode refused the app: an error reply, no marker
    assert "FAB verification failed" in (fed.logs / "supernode-C.log").read_text()


@pytest.mark.flower
@pytest.mark.slow
def test_supernode_refuses_an_unsigned_app_a_plain_superlink_hands_it(tmp_path: Path) -> None:
    """The SuperNode's own check: a stock flower-superlink (no signature check) delivers a rogue app; it never runs."""
    from oarbench.train.flower import (
        _flower_bin,
        _free_port,
        flower_env,
        make_node_key,
        make_tls,
        register_supernode,
        supernode_command,
        write_connection,
    )

    tls = make_tls(tmp_path / "tls")
    port = _free_port()
    home = tmp_path / "home"
    write_connection(home, "plain", f"127.0.0.1:{port}", tls.ca)
    _, coord_pub = ft.make_coordinator_key(tmp_path / "coord")
    te = ft.write_trusted_entities(tmp_path / "te.yaml", ft.load_public_key_text(coord_pub))
    priv, pub = make_node_key(tmp_path / "keys", "A")
    markers = tmp_path / "markers"
    app, result = _probe_app(tmp_path / "rogue", "rogue", markers)
    procs = []
    try:
        with open(tmp_path / "superlink.log", "wb") as log:
            procs.append(subprocess.Popen([
                _flower_bin("flower-superlink"), "--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert),
                "--ssl-keyfile", str(tls.key), "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp_path / "db.sqlite")],
                env=flower_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path))
        for _ in range(600):
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        register_supernode(home, "plain", pub, "A")
        with open(tmp_path / "supernode.log", "wb") as log:
            procs.append(subprocess.Popen(
                supernode_command(f"127.0.0.1:{port}", tls.ca, priv, site="A", dataset=tmp_path,
                                  work=tmp_path / "w", port=_free_port(), trusted_entities=te),
                env=flower_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path))
        run = _flwr(["run", str(app), "plain", "--run-config", "nodes=1 wait=60.0"], home)
        assert run.returncode == 0, run.stdout + run.stderr  # the stock SuperLink accepts it ...
        assert _wait_file(result, 180), (tmp_path / "superlink.log").read_text()[-3000:]
        replies = json.loads(result.read_text())["replies"]
        assert len(replies) == 1 and list(replies.values())[0] != "ran"  # ... the SuperNode does not run it
        assert not any(markers.iterdir())
        assert "The FAB could not be verified" in (tmp_path / "supernode.log").read_text()
    finally:
        import signal

        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


# --------------------------------------------------------------------------- the command line


def _cli(args: list[str]):
    from click.testing import CliRunner

    from oarbench.cli import main

    res = CliRunner().invoke(main, args)
    assert "Traceback" not in res.output, res.output
    return res


def _one_line_error(res, *parts: str) -> None:
    assert res.exit_code != 0, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), res.output
    for p in parts:
        assert p in last, res.output


def test_cli_flower_bad_input_is_one_line(tmp_path: Path) -> None:
    setup = tmp_path / "setup"
    assert _cli(["fl", "flower-setup", "--out", str(setup)]).exit_code == 0
    assert (setup / "trusted-entities.yaml").is_file() and (setup / "coordinator/coordinator-signing").is_file()
    _one_line_error(_cli(["fl", "flower-setup", "--out", str(setup)]), str(setup / "tls"), "never overwrites")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(_cli(["fl", "superlink", "--setup", str(empty)]), str(empty / "tls/ca.pem"), "missing")
    bad_pub = tmp_path / "A.pub"
    bad_pub.write_text("ssh-rsa notbase64!")
    _one_line_error(_cli(["fl", "register", "--setup", str(setup), "--site", "A", "--public-key", str(bad_pub)]),
                    str(bad_pub), "not an OpenSSH public key")
    # a roster edited by hand is refused before anything is registered
    from oarbench.train.flower import make_node_key, write_roster

    _, a = make_node_key(tmp_path, "A")
    roster = write_roster(tmp_path / "roster.json", {"A": (a, 11)}, setup / "coordinator/coordinator-signing")
    doc = json.loads(roster.read_text())
    doc["roster"]["sites"]["A"]["node_id"] = 12
    roster.write_text(json.dumps(doc))
    _one_line_error(_cli(["fl", "register", "--setup", str(setup), "--site", "B", "--public-key", str(a),
                          "--roster", str(roster)]), str(roster), "signature does not match")
    # no SuperLink listening: one line
    _one_line_error(_cli(["fl", "register", "--setup", str(setup), "--site", "A", "--public-key", str(a),
                          "--control-port", "9"]), "flwr supernode register")
    # the hospital's SuperNode needs the trusted-entities file, and a valid one
    common = ["fl", "site", "--engine", "flower", "--site", "A", "--dataset", str(tmp_path), "--work",
              str(tmp_path / "w"), "--superlink", "127.0.0.1:9", "--root-certificates", str(setup / "tls/ca.pem"),
              "--auth-key", str(tmp_path / "A")]
    _one_line_error(_cli(common), "--trusted-entities")
    bad_te = tmp_path / "te.yaml"
    bad_te.write_text("k: ssh-ed25519 AAAA\n")
    _one_line_error(_cli(common + ["--trusted-entities", str(bad_te)]), str(bad_te), "not an OpenSSH public key")
    # the coordinator: a signing key that is not Ed25519, a roster signed by someone else
    coord = ["fl", "coordinator", "--engine", "flower", "--superlink", "127.0.0.1:9", "--root-certificates",
             str(setup / "tls/ca.pem"), "--sites", "A", "--rounds", "1", "--work", str(tmp_path / "cw")]
    _one_line_error(_cli(coord + ["--signing-key", str(tmp_path / "A"), "--roster", str(roster)]),
                    str(tmp_path / "A"), "must be Ed25519")
    other, _ = ft.make_coordinator_key(tmp_path / "other")
    foreign = write_roster(tmp_path / "foreign.json", {"A": (a, 11)}, other)
    _one_line_error(_cli(coord + ["--signing-key", str(setup / "coordinator/coordinator-signing"), "--roster",
                                  str(foreign)]), str(foreign), "not by the coordinator's key")


@pytest.mark.flower
@pytest.mark.slow
def test_cli_setup_superlink_register_roster(tmp_path: Path) -> None:
    """The coordinator's documented commands: flower-setup, superlink, register (twice) -> a signed roster whose node
    ids are the SuperLink's own (flwr supernode ls)."""
    import signal
    import socket

    from oarbench.train.flower import _free_port, make_node_key

    setup = tmp_path / "setup"
    # the hospitals' host name only: the certificate still covers 127.0.0.1, where the Control API is
    assert _cli(["fl", "flower-setup", "--out", str(setup), "--host", "coordinator.example.org"]).exit_code == 0
    public, control = _free_port(), _free_port()
    with open(tmp_path / "superlink.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "oarbench", "fl", "superlink", "--setup", str(setup),
                                 "--public", f"127.0.0.1:{public}", "--control-port", str(control)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for port in (control, public):
            for _ in range(600):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
                    break
                except OSError:
                    assert proc.poll() is None, (tmp_path / "superlink.log").read_text()
                    time.sleep(0.2)
        pubs = {s: make_node_key(tmp_path / "keys", s)[1] for s in ("A", "B")}
        for s, pub in pubs.items():
            res = _cli(["fl", "register", "--setup", str(setup), "--site", s, "--public-key", str(pub),
                        "--control-port", str(control)])
            assert res.exit_code == 0, res.output
        public_key = ft.load_public_key_text(setup / "coordinator/coordinator-signing.pub")
        doc, bound = ft.load_roster(setup / "roster.json", public_key)
        listed = _flwr(["supernode", "ls", "coordinator", "--format", "json"], setup / "flwr-home")
        nodes = json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"]
        assert sorted(int(n["node-id"]) for n in nodes) == sorted(bound.values())
        for s, pub in pubs.items():
            assert doc["roster"]["sites"][s]["public_key"] == " ".join(pub.read_text().split()[:2])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_locked_superlink_refuses_a_public_control_api_no_tls_no_node_auth(tmp_path: Path) -> None:
    from oarbench.train.flower import _free_port, make_tls, superlink_command

    tls = make_tls(tmp_path / "tls")
    _, pub = ft.make_coordinator_key(tmp_path / "k")
    base = superlink_command("127.0.0.1", _free_port(), _free_port(), tls, pub, tmp_path / "db")
    i = base.index("--host")

    def run(cmd: list[str]) -> str:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert res.returncode != 0
        return res.stdout + res.stderr

    assert "must be on loopback" in run(base[:i + 1] + ["0.0.0.0"] + base[i + 2:])
    legacy = subprocess.run(base, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, FLWR_INTERNAL_GRPC_CONTROL_API="1"))
    assert legacy.returncode != 0 and "unset FLWR_INTERNAL_GRPC_CONTROL_API" in legacy.stdout + legacy.stderr
    assert "needs --enable-supernode-auth" in run([a for a in base if a != "--enable-supernode-auth"])
    j = base.index("--ssl-ca-certfile")
    plain = [a for a in base[:j] + ["--insecure"] + base[j + 6:] if a != "--enable-supernode-auth"]
    assert "needs TLS" in run(plain)


def test_server_app_verifies_the_roster_in_the_run_config(tmp_path: Path, fake_messages) -> None:
    """The ServerApp takes the roster from the run config and accepts it only with the coordinator's signature
    (the key comes from the signed app); an edited roster stops it before any message is sent."""
    from types import SimpleNamespace

    from oarbench.train.flower import make_node_key, make_server_app, write_roster

    priv, pub = ft.make_coordinator_key(tmp_path / "k")
    public = ft.load_public_key_text(pub)
    _, a = make_node_key(tmp_path, "A")
    _, b = make_node_key(tmp_path, "B")
    doc = json.loads(write_roster(tmp_path / "r.json", {"A": (a, 11), "B": (b, 22)}, priv).read_text())
    doc["roster"]["sites"]["A"]["node_id"] = 5  # the impostor's node
    grid = _Grid({5: _site("A", 50, 9.0), 11: _site("A", 2, 1.0), 22: _site("B", 3, 2.0)})
    cfg = {"sites": "A,B", "rounds": 1, "out": str(tmp_path / "srv"), "roster": json.dumps(doc)}
    app = make_server_app(public)
    with pytest.raises(ValueError, match="signature does not match"):
        app._main(grid, SimpleNamespace(run_config=cfg))
    assert grid.sent == []
    with pytest.raises(RuntimeError, match="carries no coordinator key"):
        make_server_app("")._main(grid, SimpleNamespace(run_config=cfg))


# --------------------------------------------------------------------------- Flower's telemetry

_TELEMETRY_PROBE = """
import json, sys, urllib.request
calls = []
urllib.request.urlopen = lambda request, timeout=None: calls.append(request.full_url) or (_ for _ in ()).throw(
    OSError("no network in this probe"))
from flwr.supercore.telemetry import EventType, event
try:
    result = event(EventType.RUN_SUPERNODE_ENTER).result(timeout=30)
except OSError as exc:
    result = "error: " + str(exc)
print(json.dumps({"calls": calls, "result": result}))
"""


def _telemetry_probe(env: dict[str, str]) -> dict:
    """Flower's own telemetry code in a child process with ``env``, ``urlopen`` recorded instead of sent."""
    out = subprocess.run([sys.executable, "-c", _TELEMETRY_PROBE], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_flower_processes_oarbench_starts_send_no_telemetry(tmp_path: Path, monkeypatch) -> None:
    """Every Flower process oarbench starts (SuperLink, SuperNodes, the signed submission, ``flwr supernode
    register``) gets its environment from ``flower_env``: there Flower's telemetry code makes no request. With
    the environment as flwr defaults it (the control) the same code posts to Flower's server; a user who sets
    the variable himself keeps his choice."""
    from oarbench.train.flower import TELEMETRY_ENV, flower_env

    monkeypatch.delenv(TELEMETRY_ENV, raising=False)
    env = flower_env(tmp_path / "flwr-home")
    assert env[TELEMETRY_ENV] == "0"
    assert _telemetry_probe(env) == {"calls": [], "result": "disabled"}
    plain = {k: v for k, v in env.items() if k != TELEMETRY_ENV}
    sent = _telemetry_probe(plain)
    assert sent["calls"] and all(url.startswith("https://telemetry.flower.ai/") for url in sent["calls"]), sent
    monkeypatch.setenv(TELEMETRY_ENV, "1")
    assert flower_env(tmp_path / "flwr-home")[TELEMETRY_ENV] == "1"
