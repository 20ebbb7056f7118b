"""`emixer server`: the coordinator's side of a real deployment, in one command.

It starts Flower's SuperLink with TLS, SuperNode authentication and runtime dependency installation
turned off, enrols the public key of every site listed in server.yaml (only those sites can join),
submits the EMIXER run with `flwr run`, streams the run's logs and stops the SuperLink on exit.

The run is submitted from a staged copy of the app whose pyproject.toml carries the server's whole
run config, because `flwr run --run-config` only overrides keys the app already declares and an
installed package has no pyproject.toml at all. The flwr CLI keeps its connection settings in a
private FLWR_HOME below the state dir, so nothing touches the operator's ~/.flwr.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import tomli_w

from emixer_model.config import ConfigError, EmixerConfig, config_key, load_yaml_as
from emixer_model.daemon_guard import (
    describe,
    die_with_parent,
    hold_state_dir,
    port_holders,
    port_problem,
    process_marker,
)
from emixer_model.public_pretrain import with_site_findings
from emixer_model.shared import (
    APP_PACKAGES,
    UserError,
    app_root,
    sigterm_as_interrupt,
    stop_process_group,
)

CONNECTION = "emixer"  # the flwr CLI's name for our SuperLink in FLWR_HOME/config.toml
DEFAULT_PORT = 9092
READY_TIMEOUT = 60.0


class LaunchError(UserError, RuntimeError):
    """The SuperLink or the flwr CLI failed; the message says which step and what to check."""


@dataclass
class ListenFile:
    """server.yaml `listen`: where the SuperLink's one HTTPS port listens."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT


@dataclass
class CertificatesFile:
    """server.yaml `certificates`: the files deploy/make-certs.sh writes."""

    ca: str = config_key("the federation CA certificate (deploy/make-certs.sh writes it)")
    cert: str = config_key("the SuperLink's certificate (deploy/make-certs.sh writes it)")
    key: str = config_key("the SuperLink's private key (deploy/make-certs.sh writes it)")


@dataclass
class SiteEntryFile:
    """One entry of server.yaml `sites`."""

    name: str = config_key("the site's name, for logs and its ledger")
    public_key: str = config_key(
        "the site's OpenSSH ECDSA public key file (its `emixer keygen` .pub)"
    )


@dataclass
class ServerFile:
    """server.yaml as written (deploy/server.yaml): every key, its type and its meaning."""

    certificates: CertificatesFile = config_key(
        "a section with ca, cert and key (deploy/make-certs.sh)"
    )
    sites: list[SiteEntryFile] = config_key("a list of {name, public_key}: the sites that may join")
    state_dir: str = config_key("the SuperLink database, logs, staged app and checkpoints")
    listen: ListenFile = field(default_factory=ListenFile)
    resume: bool = False
    run: EmixerConfig = field(default_factory=EmixerConfig)


@dataclass
class SiteEntry:
    """A site allowed to join: its name (for logs) and its OpenSSH ECDSA public key file."""

    name: str
    public_key: Path


@dataclass
class ServerSettings:
    """server.yaml, resolved: relative paths are taken from the file's folder."""

    host: str
    port: int
    ca_cert: Path
    cert: Path
    key: Path
    sites: list[SiteEntry]
    state_dir: Path
    resume: bool = False
    run: EmixerConfig = field(default_factory=EmixerConfig)

    @property
    def control_address(self) -> str:
        """Where the local flwr CLI reaches the SuperLink (the certificate covers 127.0.0.1)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"


def load_server_settings(path: str | Path) -> ServerSettings:
    """Read server.yaml strictly (the config loader): unknown keys, wrong types and missing files
    are refused by name."""
    path = Path(path)
    raw = load_yaml_as(ServerFile, path)
    base = path.resolve().parent

    def resolved(value: str) -> Path:
        return (base / Path(value).expanduser()).resolve()

    def existing(value: str, where: str) -> Path:
        found = resolved(value)
        if not found.exists():
            raise ConfigError(f"{where}: {found} does not exist")
        return found

    if not 0 < raw.listen.port < 65536:
        raise ConfigError(f"listen.port must be a TCP port number, not {raw.listen.port!r}")
    sites = [
        SiteEntry(entry.name, existing(entry.public_key, f"sites[{i}].public_key"))
        for i, entry in enumerate(raw.sites)
    ]
    if not sites:
        raise ConfigError(f"{path.name}: sites must list at least one {{name, public_key}} entry")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"site names must be unique: {', '.join(names)}")
    run = raw.run
    if run.federation.initial_model:
        start = str(resolved(run.federation.initial_model))
        run = replace(run, federation=replace(run.federation, initial_model=start))
    if not (raw.resume or run.federation.resume):  # what the ServerApp reads at round 1, checked
        check_starting_model(run)  # here, before the SuperLink starts or a site joins
    return ServerSettings(
        host=raw.listen.host,
        port=raw.listen.port,
        ca_cert=existing(raw.certificates.ca, "certificates.ca"),
        cert=existing(raw.certificates.cert, "certificates.cert"),
        key=existing(raw.certificates.key, "certificates.key"),
        sites=sites,
        state_dir=resolved(raw.state_dir),
        resume=raw.resume,
        run=run,
    )


def check_starting_model(run: EmixerConfig) -> None:
    """Refuse a fresh run whose public starting model is missing, or that asks the sites to train
    what the public model never saw (train.site_findings: unshown) without one."""
    start = run.federation.initial_model
    if start and not Path(start).is_file():
        raise ConfigError(
            f"run.federation.initial_model: {start} does not exist; make the public starting "
            f"model with `emixer pretrain --public DIR --out {start}`"
        )
    if not start:
        with_site_findings(run, unshown=())


def run_config(settings: ServerSettings) -> EmixerConfig:
    """The run's config: checkpoints below the state dir unless given, resume from settings."""
    fed = settings.run.federation
    checkpoint_dir = Path(fed.checkpoint_dir or "checkpoints")
    if not checkpoint_dir.is_absolute():
        checkpoint_dir = settings.state_dir / checkpoint_dir
    fed = replace(fed, checkpoint_dir=str(checkpoint_dir), resume=settings.resume or fed.resume)
    return replace(settings.run, federation=fed)


def stage_app(dest: Path, cfg: EmixerConfig) -> Path:
    """Write a Flower app folder: the app packages and a pyproject.toml declaring the run config."""
    if dest.exists():
        shutil.rmtree(dest)
    root = app_root()
    for package in APP_PACKAGES:
        shutil.copytree(
            root / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    try:
        version = metadata.version("emixer-fl")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    pyproject = {
        "project": {
            "name": "emixer-fl",
            "version": version,
            "description": "EMIXER-FL federated run (staged by `emixer server`)",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "emixer",
                    "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
                    "config": cfg.to_run_config(),
                }
            }
        },
    }
    (dest / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return dest


def write_flwr_home(flwr_home: Path, settings: ServerSettings) -> None:
    """A private flwr CLI config pointing at our SuperLink over TLS."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    conf = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {
                "address": settings.control_address,
                "root-certificates": str(settings.ca_cert),
            },
        }
    }
    (flwr_home / "config.toml").write_text(tomli_w.dumps(conf))


def superlink_command(settings: ServerSettings) -> list[str]:
    return [
        "flower-superlink",
        "--ssl-ca-certfile",
        str(settings.ca_cert),
        "--ssl-certfile",
        str(settings.cert),
        "--ssl-keyfile",
        str(settings.key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--database",
        str(settings.state_dir / "superlink.db"),
    ]


def log_tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_until_listening(proc: subprocess.Popen, address: str, log_path: Path) -> None:
    """Poll the SuperLink's port until the SuperLink we started listens on it; fail early (with
    its log) if it exits first. Someone else answering on the port is an error, never a start:
    an orphan SuperLink would take the run (issue 18)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(
                f"flower-superlink exited with code {proc.returncode} before it was ready:\n"
                f"{log_tail(log_path)}"
            )
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                pass
        except OSError:
            time.sleep(0.3)
            continue
        holders = port_holders(int(port))
        if proc.poll() is None and (not holders or proc.pid in holders):
            return  # without /proc (not Linux) the port check before the start has to do
        raise LaunchError(
            f"port {port} answers, but not the flower-superlink this server started (pid "
            f"{proc.pid}): {describe(holders) or 'it exited'}. Stop that process and start again."
            f"\n{log_tail(log_path)}"
        )
    raise LaunchError(f"flower-superlink did not listen on {address} within {READY_TIMEOUT:.0f} s")


class FlwrCli:
    """The flwr CLI bound to our private FLWR_HOME (below the state dir, whose marker its
    processes carry: a log stream cannot outlive the server)."""

    def __init__(self, flwr_home: Path) -> None:
        self.env = {
            **os.environ,
            "FLWR_HOME": str(flwr_home),
            **process_marker(flwr_home.parent),
        }

    def json(self, *args: str) -> dict[str, Any]:
        """Run `flwr ARGS --format json` and return its JSON answer."""
        done = subprocess.run(
            ["flwr", *args, "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        match = re.search(r"^\{.*\}\s*\Z", done.stdout, re.S | re.M)
        if match is None:
            raise LaunchError(
                f"`flwr {' '.join(args)}` gave no answer (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-500:]}"
            )
        return json.loads(match.group(0))

    def enrol(self, site: SiteEntry) -> str:
        """Register a site's public key; a key enrolled earlier (same database) is fine."""
        answer = self.json(
            "supernode", "register", str(site.public_key), CONNECTION, "--name", site.name
        )
        if answer.get("success"):
            return f"enrolled site {site.name} as node {answer.get('node-id')}"
        error = str(answer.get("error-message", ""))
        if "already in use" in error:
            return f"site {site.name} was enrolled earlier"
        raise LaunchError(f"could not enrol site {site.name} ({site.public_key}): {error.strip()}")

    def submit(self, app_dir: Path) -> int:
        """Start the run; returns its run id."""
        answer = self.json("run", str(app_dir), CONNECTION)
        if not answer.get("success"):
            raise LaunchError(f"the SuperLink refused the run: {answer.get('error-message')}")
        return int(answer["run-id"])

    def stream_logs(self, run_id: int) -> int:
        """Print the run's logs until it ends (`flwr log --stream`)."""
        return subprocess.run(
            ["flwr", "log", str(run_id), CONNECTION, "--stream"], env=self.env
        ).returncode

    def run_status(self, run_id: int) -> tuple[str, str]:
        """(status, details) of a run, e.g. ('finished:failed', 'ServerApp failed with ...')."""
        answer = self.json("ls", CONNECTION, "--run-id", str(run_id))
        runs = answer.get("runs") or [{}]
        return str(runs[0].get("status", "unknown")), str(runs[0].get("status-details", ""))


def start_superlink(settings: ServerSettings) -> subprocess.Popen:
    """Start flower-superlink in its own process group and wait until it listens; refused when
    another process holds its port (named in the error)."""
    state = settings.state_dir
    state.mkdir(parents=True, exist_ok=True)
    problem = port_problem(settings.host, settings.port, "flower-superlink")
    if problem is not None:
        raise LaunchError(problem)
    log_path = state / "superlink.log"
    with log_path.open("a") as log_file:
        proc = subprocess.Popen(
            superlink_command(settings),
            cwd=state,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
            env={**os.environ, "FLWR_HOME": str(state / "flwr-home"), **process_marker(state)},
        )
    try:
        wait_until_listening(proc, settings.control_address, log_path)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc


def run_server(settings: ServerSettings, echo: Callable[[str], None] = print) -> bool:
    """Start the SuperLink, enrol the sites, run EMIXER to the end, stop. True when the run
    completed. Only one server runs per state dir, and nothing it started outlives it."""
    with hold_state_dir(settings.state_dir, "server", echo):
        return serve_run(settings, echo)


def serve_run(settings: ServerSettings, echo: Callable[[str], None]) -> bool:
    """The run itself, with the state dir held."""
    cfg = run_config(settings)
    app_dir = stage_app(settings.state_dir / "app", cfg)
    write_flwr_home(settings.state_dir / "flwr-home", settings)
    cli = FlwrCli(settings.state_dir / "flwr-home")
    echo(f"starting SuperLink on {settings.host}:{settings.port} (log in {settings.state_dir})")
    with sigterm_as_interrupt():
        proc = start_superlink(settings)
        try:
            for site in settings.sites:
                echo(cli.enrol(site))
            run_id = cli.submit(app_dir)
            echo(
                f"run {run_id}: {cfg.federation.rounds} rounds, checkpoints in "
                f"{cfg.federation.checkpoint_dir}; waiting for {cfg.federation.min_sites} sites"
            )
            cli.stream_logs(run_id)
            status, details = cli.run_status(run_id)
            echo(
                f"run {run_id} ended: {status}"
                + (f" ({details})" if details not in ("", "N/A") else "")
            )
            return status == "finished:completed"
        finally:
            stop_process_group(proc)
            echo("SuperLink stopped")
