"""``oarbench train local`` and ``oarbench fl keys|roster|audit|coordinator|site|simulate`` (docs/training.md)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from oarbench.cli._common import user_errors
from oarbench.train._plans import PLAN_SPACINGS

_WIDTHS = click.Choice(["default", "small", "tiny"])
_plan_spacing_option = click.option(
    "--plan-spacing", type=click.Choice(list(PLAN_SPACINGS)), default="finest", show_default=True,
    help="Target spacing of the shared plans: the finest site's, axis by axis, or nnU-Net's median over all sites' "
         "cases (docs/training.md).")
_DEVICES = click.Choice(["cpu", "cuda"])
_ENGINES = click.Choice(["storage", "flower"])
COORDINATOR_LABEL = "coordinator"


def _need(engine: str, **given: Any) -> None:
    missing = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"--engine {engine} needs {', '.join(missing)}")


def _fold(value: str) -> int | str:
    if value == "all":
        return "all"
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"fold must be an integer or 'all', got {value!r}") from None


def _sites(value: str) -> tuple[str, ...]:
    sites = tuple(s.strip() for s in value.split(",") if s.strip())
    if not sites:
        raise ValueError("give at least one site name, comma-separated (e.g. A,B)")
    return sites


def _storage_options(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    is_file = Path(value).is_file()
    text = Path(value).read_text() if is_file else value
    where = f"{value}: " if is_file else ""
    try:
        opts = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{where}--storage-options must be JSON or a JSON file: {exc}") from None
    if not isinstance(opts, dict):
        raise ValueError(f"{where}--storage-options must be a JSON object")
    return opts


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(threadName)s %(levelname)s %(message)s")


@click.group("train")
def train() -> None:
    """Train nnU-Net v2 models (needs the nnunet extra)."""


@train.command("local")
@click.option("--dataset", "dataset_dir", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="nnU-Net v2 raw dataset folder (DatasetXXX_Name with dataset.json, imagesTr, labelsTr).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Work folder; gets nnUNet_raw (a link), nnUNet_preprocessed and nnUNet_results.")
@click.option("--configuration", default="3d_fullres", show_default=True)
@click.option("--fold", default="all", show_default=True, help="0-4 (5-fold split) or 'all'.")
@click.option("--epochs", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--iterations", type=click.IntRange(min=1), default=250, show_default=True,
              help="Training iterations per epoch.")
@click.option("--width", type=_WIDTHS, default="default", show_default=True,
              help="Network width: as planned, or reduced for smoke tests (features per stage 16..128 / 8..64).")
@click.option("--device", type=_DEVICES, default="cpu", show_default=True)
@click.option("--processes", type=click.IntRange(min=1), default=2, show_default=True,
              help="Processes for fingerprint extraction and preprocessing (-np/-npfp).")
@click.option("--harmonise/--no-harmonise", default=True, show_default=True,
              help="Bring every case to LPS (identity direction) before nnU-Net reads it (docs/training.md).")
@user_errors
def local(dataset_dir: Path, out_dir: Path, configuration: str, fold: str, epochs: int, iterations: int,
          width: str, device: str, processes: int, harmonise: bool) -> None:
    """Plan, preprocess and train one local nnU-Net model."""
    from oarbench.train.nnunet import TrainerOptions, train_local

    summary = train_local(dataset_dir, out_dir, configuration=configuration, fold=_fold(fold), epochs=epochs,
                          iterations=iterations, width=width, device=device, num_processes=processes,
                          options=TrainerOptions(harmonise=harmonise))
    h = summary["harmonisation"]
    if h["orientation"] == "as stored":
        click.echo("harmonisation: off (cases used as stored)")
    else:
        click.echo(f"harmonisation: {h['images_reoriented']} of {sum(h['images_by_stored_orientation'].values())} "
                   f"images reoriented to {h['orientation']} (stored as {h['images_by_stored_orientation']})")
    click.echo(f"model folder: {summary['model_folder']} (fold {summary['fold']})")
    click.echo(f"plan+preprocess {summary['plan_preprocess_s']:.1f} s, training {summary['train_s']:.1f} s "
               f"({summary['s_per_iteration']:.2f} s/iteration), {summary['num_cases']} cases")


class _OneLineErrors(click.Command):
    """A command whose option errors are one line (``Error: Invalid value for '--keys': ...``), no usage text."""

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[no-untyped-def]
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise click.ClickException(exc.format_message()) from None


class _FlGroup(click.Group):
    command_class = _OneLineErrors


@click.group("fl", cls=_FlGroup)
def fl() -> None:
    """Federated nnU-Net training through shared storage (needs the fl and nnunet extras)."""


@fl.command("keys")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="This party's key folder (with --sites: a folder that gets one key folder per party).")
@click.option("--name", default=None, help="This party's name: 'coordinator' or the site name.")
@click.option("--rotate", is_flag=True, help="Replace this party's existing key pairs (old ones go to retired/).")
@click.option("--sites", default=None,
              help="For a federation on one machine only: make every party's keys, one folder each, and the roster.")
@user_errors
def keys(out_dir: Path, name: str | None, rotate: bool, sites: str | None) -> None:
    """Create this party's own key pairs (Ed25519 signing, X25519 encryption); share only public/NAME.pub."""
    from oarbench.train.keys import generate_keys, generate_party_key, rotate_party_key

    if (name is None) == (sites is None):
        raise ValueError("give either --name (this party's keys) or --sites (every party, one machine)")
    if sites is not None:
        folders = generate_keys(out_dir, list(_sites(sites)))
        for party, folder in folders.items():
            click.echo(f"{party}: {folder} (its private keys only, the public roster)")
        return
    paths = (rotate_party_key if rotate else generate_party_key)(out_dir, str(name))
    click.echo(f"private keys {paths[str(name)]} and {paths[str(name) + '.x25519']} (mode 0600, never leave this "
               f"party); give {paths[str(name) + '.pub']} to the coordinator")


@fl.command("roster")
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="The coordinator's key folder; public/ holds every site's NAME.pub.")
@click.option("--revoke", multiple=True, help="Drop this site from the roster (repeatable).")
@user_errors
def roster_cmd(keys_dir: Path, revoke: tuple[str, ...]) -> None:
    """Coordinator: sign roster.json from the public keys in KEYS/public (again after a rotation or revocation)."""
    from oarbench.train.keys import sign_roster

    roster = sign_roster(keys_dir, revoke=list(revoke))
    click.echo(f"{keys_dir / 'roster.json'}: serial {roster.serial}, sites {', '.join(roster.sites) or '(none)'}; "
               f"give it and public/coordinator.pub to every site")


@fl.command("audit")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@user_errors
def audit_cmd(path: Path) -> None:
    """Verify the hash chain of audit logs (a file, or every *.jsonl under a folder) and summarise them."""
    from oarbench.train.audit import verify

    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise click.ClickException(f"{path}: no audit logs (*.jsonl) found")
    broken = []
    for f in files:
        summary = verify(f)
        actions = ", ".join(f"{k} {v}" for k, v in sorted(summary.actions.items())) or "empty"
        state = "chain intact" if summary.ok else f"BROKEN at {summary.problem}"
        click.echo(f"{f}: {state}; {summary.lines} lines ({actions}); parties {sorted(summary.parties)}; "
                   f"last hash {summary.head}")
        for reason in summary.refused[:20]:
            click.echo(f"  refused {reason}")
        if not summary.ok:
            broken.append(str(f))
    if broken:
        raise click.ClickException(f"audit chain broken in {', '.join(broken)}")


def _common(f):  # type: ignore[no-untyped-def]
    options = [
        click.option("--engine", type=_ENGINES, default="storage", show_default=True,
                     help="storage: encrypted objects in shared storage; flower: a Flower SuperLink/SuperNodes."),
        click.option("--storage", default=None, help="storage: fsspec URL of the shared storage (a folder, s3://...)."),
        click.option("--storage-options", default=None, help="storage: fsspec options as JSON (or a JSON file)."),
        click.option("--keys", "keys_dir", default=None, type=click.Path(file_okay=False, exists=True,
                                                                          path_type=Path),
                     help="storage: this party's key folder."),
        click.option("--superlink", default=None,
                     help="flower: HOST:PORT of the SuperLink: its public Fleet API port (site), its Control API "
                          "127.0.0.1:9093 (coordinator)."),
        click.option("--root-certificates", default=None, type=click.Path(dir_okay=False, exists=True, path_type=Path),
                     help="flower: PEM CA certificate that signed the SuperLink's TLS certificate."),
        click.option("--sites", default=None, help="Comma-separated names of all sites."),
        click.option("--rounds", type=click.IntRange(min=1), default=None),
        click.option("--federation", default="oarbench", show_default=True, help="Federation name."),
        click.option("--work", required=True, type=click.Path(file_okay=False, path_type=Path)),
        click.option("--configuration", default="3d_fullres", show_default=True),
        click.option("--poll", type=click.FloatRange(min=0.01), default=5.0, show_default=True,
                     help="Seconds between storage polls."),
        click.option("-v", "--verbose", is_flag=True, help="Log each step."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _exchange(storage: str, storage_options: str | None, keys_dir: Path, identity: str, federation: str,  # type: ignore[no-untyped-def]
              work: Path):
    from oarbench.train.audit import AuditLog
    from oarbench.train.exchange import Exchange, load_keyring

    return Exchange(storage, load_keyring(keys_dir, identity), federation=federation,
                    storage_options=_storage_options(storage_options),
                    audit=AuditLog(work / "audit.jsonl", identity))


@fl.command("coordinator")
@_common
@click.option("--quorum", type=click.IntRange(min=1), default=None,
              help="storage: aggregate this many sites after --timeout (default: wait for all).")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Seconds to wait per round.")
@click.option("--width", type=_WIDTHS, default="default", show_default=True)
@click.option("--local-epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="flower: local epochs per round (the server sends the schedule).")
@click.option("--iterations", type=click.IntRange(min=1), default=250, show_default=True,
              help="flower: iterations per local epoch.")
@click.option("--signing-key", default=None, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="flower: the coordinator's Ed25519 app-signing key (oarbench fl flower-setup); the run is signed "
                   "with it.")
@click.option("--roster", default=None, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="flower: the signed roster (site -> registered SuperNode key; oarbench fl register).")
@click.option("--weighting", default="cases", show_default=True,
              help="storage: FedAvg weight of a site: cases (its case count), equal, or capped:N (at most N).")
@click.option("--aggregator", default="fedavg", show_default=True,
              help="storage: fedavg, median (coordinate-wise) or trimmed:F (trimmed mean, 0 <= F < 0.5).")
@click.option("--max-step", type=float, default=1.3, show_default=True,
              help="storage: refuse an update farther from the global model than this times its norm.")
@_plan_spacing_option
@user_errors
def coordinator(engine: str, storage: str | None, storage_options: str | None, keys_dir: Path | None,
                superlink: str | None, root_certificates: Path | None, sites: str | None, rounds: int | None,
                federation: str, work: Path, configuration: str, poll: float, verbose: bool,
                quorum: int | None, timeout: float | None, width: str, local_epochs: int, iterations: int,
                signing_key: Path | None, roster: Path | None,
                weighting: str, aggregator: str, max_step: float, plan_spacing: str) -> None:
    """Merge fingerprints, publish plans, aggregate rounds; restartable (storage) or one signed Flower run."""
    _logging(verbose)
    if engine == "flower":
        from oarbench.train.flower import coordinate

        _need(engine, superlink=superlink, root_certificates=root_certificates, sites=sites, rounds=rounds,
              signing_key=signing_key, roster=roster)
        try:
            summary = coordinate(str(superlink), Path(str(root_certificates)), work, sites=_sites(str(sites)),
                                 rounds=int(str(rounds)),
                                 local_epochs=local_epochs, iterations=iterations, configuration=configuration,
                                 width=width, timeout_s=timeout if timeout is not None else 24 * 3600.0,
                                 signing_key=Path(str(signing_key)), roster=Path(str(roster)),
                                 plan_spacing=plan_spacing)
        except RuntimeError as exc:
            raise click.ClickException(" ".join(str(exc).split())) from None
        click.echo(f"final federated model: {summary['model']}")
        return
    from oarbench.train.aggregate import AggregationRules, parse_weighting
    from oarbench.train.exchange import COORDINATOR
    from oarbench.train.federated import FederationConfig, nnunet_coordinator

    _need(engine, storage=storage, keys=keys_dir, sites=sites, rounds=rounds)
    parse_weighting(weighting)
    rules = AggregationRules(aggregator=aggregator, max_delta_ratio=max_step)
    cfg = FederationConfig(_sites(str(sites)), int(str(rounds)), quorum=quorum, timeout_s=timeout, poll_s=poll)
    model = nnunet_coordinator(_exchange(str(storage), storage_options, Path(str(keys_dir)), COORDINATOR,
                                         federation, work), cfg, work, configuration=configuration, width=width,
                               plans_timeout_s=timeout, weighting=weighting, rules=rules, plan_spacing=plan_spacing)
    click.echo(f"final federated model: {model}")


@fl.command("site")
@_common
@click.option("--site", required=True, help="This site's name.")
@click.option("--dataset", "dataset_dir", required=True,
              type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--local-epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--iterations", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--device", type=_DEVICES, default="cpu", show_default=True)
@click.option("--auth-key", default=None, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="flower: this SuperNode's private key (EC P-384, OpenSSH format) registered at the SuperLink.")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=9094, show_default=True,
              help="flower: local port of the SuperNode's ClientApp API (loopback).")
@click.option("--trusted-entities", default=None, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="flower: the file naming the coordinator's app-signing key (from the coordinator); the SuperNode "
                   "runs only apps signed with it.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="storage: seconds to wait for the plans or a global model before giving up (default: forever).")
@user_errors
def site(engine: str, storage: str | None, storage_options: str | None, keys_dir: Path | None,
         superlink: str | None, root_certificates: Path | None, sites: str | None, rounds: int | None,
         federation: str, work: Path, configuration: str, poll: float, verbose: bool, site: str, dataset_dir: Path,
         local_epochs: int, iterations: int, device: str, auth_key: Path | None, port: int,
         trusted_entities: Path | None, timeout: float | None) -> None:
    """Upload the fingerprint, train the rounds locally, keep the final model; restartable (storage),
    or run this hospital's Flower SuperNode until stopped (flower)."""
    _logging(verbose)
    if engine == "flower":
        import subprocess

        from oarbench.train.flower import TELEMETRY_ENV, flower_env, require_flower, supernode_command

        require_flower()
        _need(engine, superlink=superlink, root_certificates=root_certificates, auth_key=auth_key,
              trusted_entities=trusted_entities)
        from oarbench.train.flower_trust import check_trusted_entities

        check_trusted_entities(Path(str(trusted_entities)))
        cmd = supernode_command(str(superlink), Path(str(root_certificates)), Path(str(auth_key)), site=site,
                                dataset=dataset_dir, work=work, device=device, configuration=configuration,
                                port=port, trusted_entities=Path(str(trusted_entities)))
        env = flower_env(work / "flwr-home")
        click.echo(f"SuperNode of site {site}: {TELEMETRY_ENV}={env[TELEMETRY_ENV]} {' '.join(cmd)}")
        code = subprocess.call(cmd, env=env)
        if code != 0:
            raise click.ClickException(f"flower-supernode exited with code {code}")
        return
    from oarbench.train.federated import FederationConfig, nnunet_site

    _need(engine, storage=storage, keys=keys_dir, sites=sites, rounds=rounds)
    cfg = FederationConfig(_sites(str(sites)), int(str(rounds)), poll_s=poll)
    model = nnunet_site(_exchange(str(storage), storage_options, Path(str(keys_dir)), site, federation, work), cfg,
                        dataset_dir, work, local_epochs=local_epochs, iterations=iterations,
                        configuration=configuration, device=device, timeout_s=timeout)
    click.echo(f"final federated model: {model}")


@fl.command("flower-setup")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The coordinator's Flower folder (new, or without these files).")
@click.option("--host", "hosts", multiple=True,
              help="Host name or IP address the hospitals use for the SuperLink (its TLS certificate); repeat. "
                   "localhost and 127.0.0.1 (the Control API) are always included.")
@user_errors
def flower_setup(out_dir: Path, hosts: tuple[str, ...]) -> None:
    """Coordinator, Flower engine: a TLS CA and SuperLink certificate, the app-signing key, the trusted-entities file."""
    from oarbench.train.flower import make_tls, require_flower
    from oarbench.train.flower_trust import load_public_key_text, make_coordinator_key, write_trusted_entities

    require_flower()
    taken = [p for p in (out_dir / "tls", out_dir / "coordinator", out_dir / "trusted-entities.yaml") if p.exists()]
    if taken:
        raise ValueError(f"{taken[0]}: already exists; oarbench fl flower-setup never overwrites keys")
    tls = make_tls(out_dir / "tls", hosts=tuple(dict.fromkeys((*hosts, "localhost", "127.0.0.1"))))
    priv, pub = make_coordinator_key(out_dir / "coordinator")
    te = write_trusted_entities(out_dir / "trusted-entities.yaml", load_public_key_text(pub))
    click.echo(f"app-signing key {priv} (mode 0600, never leaves the coordinator); SuperLink TLS key {tls.key}")
    click.echo(f"give every hospital {tls.ca} and {te}")


def _setup_files(setup_dir: Path) -> dict[str, Path]:
    files = {"ca": setup_dir / "tls/ca.pem", "cert": setup_dir / "tls/superlink.pem",
             "key": setup_dir / "tls/superlink.key", "signing": setup_dir / "coordinator/coordinator-signing",
             "public": setup_dir / "coordinator/coordinator-signing.pub"}
    for path in files.values():
        if not path.is_file():
            raise ValueError(f"{path}: missing; make the folder with oarbench fl flower-setup --out {setup_dir}")
    return files


@fl.command("superlink")
@click.option("--setup", "setup_dir", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="The folder of oarbench fl flower-setup.")
@click.option("--public", "public", default="0.0.0.0:9092", show_default=True,
              help="HOST:PORT of the public listener: the Fleet API only, for the hospitals' SuperNodes.")
@click.option("--control-port", type=click.IntRange(min=1, max=65535), default=9093, show_default=True,
              help="Port of the Control and Runtime APIs, on 127.0.0.1 only (flwr CLI, registration, runs).")
@click.option("--database", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The SuperLink's state database (default: SETUP/superlink.db).")
@user_errors
def superlink_cmd(setup_dir: Path, public: str, control_port: int, database: Path | None) -> None:
    """Coordinator, Flower engine: run the locked SuperLink until stopped (Fleet API public, the rest loopback,
    coordinator-signed runs only)."""
    import subprocess

    from oarbench.train.flower import TlsFiles, flower_env, require_flower, superlink_command

    require_flower()
    host, sep, port = public.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"--public must be HOST:PORT, got {public!r}")
    if int(port) == control_port:
        raise click.BadParameter("--public's port must differ from --control-port")
    f = _setup_files(setup_dir)
    cmd = superlink_command(host.strip("[]"), int(port), control_port, TlsFiles(f["ca"], f["cert"], f["key"]),
                            f["public"], database or setup_dir / "superlink.db")
    click.echo(f"SuperLink: Fleet API on {public}, Control API on 127.0.0.1:{control_port}")
    code = subprocess.call(cmd, env=flower_env(setup_dir / "flwr-home"))
    if code != 0:
        raise click.ClickException(f"the SuperLink exited with code {code}")


@fl.command("register")
@click.option("--setup", "setup_dir", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="The folder of oarbench fl flower-setup.")
@click.option("--site", required=True, help="The hospital's site name.")
@click.option("--public-key", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The hospital's SuperNode public key (EC P-384, OpenSSH format).")
@click.option("--control-port", type=click.IntRange(min=1, max=65535), default=9093, show_default=True)
@click.option("--roster", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The signed roster to add the site to (default: SETUP/roster.json).")
@user_errors
def register_cmd(setup_dir: Path, site: str, public_key: Path, control_port: int, roster: Path | None) -> None:
    """Coordinator, Flower engine: register a hospital's SuperNode key and sign it into the roster under its site."""
    from cryptography.hazmat.primitives import serialization

    from oarbench.train.flower import add_to_roster, register_supernode, require_flower, write_connection
    from oarbench.train.flower_trust import load_roster, load_signing_key, read_node_public_key

    require_flower()
    f = _setup_files(setup_dir)
    read_node_public_key(public_key)
    key = load_signing_key(f["signing"])
    roster = roster or setup_dir / "roster.json"
    if roster.exists():  # checked before anything is registered
        load_roster(roster, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH).decode())
    home = setup_dir / "flwr-home"
    write_connection(home, "coordinator", f"127.0.0.1:{control_port}", f["ca"])
    try:
        node = register_supernode(home, "coordinator", public_key, site)
    except RuntimeError as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None
    add_to_roster(roster, site, public_key, node, f["signing"])
    click.echo(f"site {site}: node {node}; roster {roster}")


@fl.command("simulate")
@click.option("--engine", type=_ENGINES, default="storage", show_default=True,
              help="storage: a local-folder exchange; flower: a SuperLink and SuperNodes on loopback (TLS, node auth).")
@click.option("--storage", default=None, help="fsspec URL (default: WORK/storage).")
@click.option("--storage-options", default=None, help="fsspec options as JSON (or a JSON file).")
@click.option("--keys", "keys_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Key folder (default: WORK/keys, created if missing).")
@click.option("--dataset", "datasets", multiple=True, required=True,
              help="SITE=DIR, once per site (nnU-Net raw dataset folders).")
@click.option("--work", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--rounds", type=click.IntRange(min=1), required=True)
@click.option("--local-epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--iterations", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--width", type=_WIDTHS, default="default", show_default=True)
@click.option("--configuration", default="3d_fullres", show_default=True)
@click.option("--device", type=_DEVICES, default="cpu", show_default=True)
@click.option("--poll", type=click.FloatRange(min=0.01), default=0.5, show_default=True)
@_plan_spacing_option
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def simulate(engine: str, storage: str | None, storage_options: str | None, keys_dir: Path | None, datasets: tuple[str, ...],
             work: Path, rounds: int, local_epochs: int, iterations: int, width: str, configuration: str,
             device: str, poll: float, plan_spacing: str, verbose: bool) -> None:
    """Run the coordinator and every site on this machine."""
    from oarbench.train.exchange import generate_keys
    from oarbench.train.federated import FederationConfig, nnunet_simulate

    _logging(verbose)
    pairs: dict[str, Path] = {}
    for item in datasets:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--dataset must be SITE=DIR, got {item!r}")
        pairs[name] = Path(path)
    if engine == "flower":
        from oarbench.train.flower import run_local

        try:
            summary = run_local(pairs, work, rounds=rounds, local_epochs=local_epochs, iterations=iterations,
                                configuration=configuration, width=width, device=device, plan_spacing=plan_spacing)
        except RuntimeError as exc:
            raise click.ClickException(" ".join(str(exc).split())) from None
        click.echo(f"{COORDINATOR_LABEL}: {summary['model']}")
        for party, folder in sorted(summary["site_models"].items()):
            click.echo(f"{party}: {folder}")
        return
    keys = keys_dir or work / "keys"
    if not (keys / "roster.json").exists():
        generate_keys(keys, list(pairs))
    url = storage or str(work / "storage")
    cfg = FederationConfig(tuple(pairs), rounds, poll_s=poll)
    models = nnunet_simulate(url, keys, pairs, work, cfg, storage_options=_storage_options(storage_options),
                             local_epochs=local_epochs, iterations=iterations, configuration=configuration,
                             width=width, device=device, plan_spacing=plan_spacing)
    for party, folder in sorted(models.items()):
        click.echo(f"{party}: {folder}")
