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

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from client.daemon import sigterm_as_interrupt
from emixer_model.config import ConfigError, EmixerConfig, from_dict, read_yaml

APP_PACKAGES = ("client", "emixer_model", "server")
CONNECTION = "emixer"  # the flwr CLI's name for our SuperLink in FLWR_HOME/config.toml
DEFAULT_PORT = 9092
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
EXIT_FAILED = 1
EXIT_USAGE = 2


class LaunchError(RuntimeError):
    """The SuperLink or the flwr CLI failed; the message says which step and what to check."""


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


SECTIONS = {
    "listen": {"host", "port"},
    "certificates": {"ca", "cert", "key"},
    "sites": None,
    "state_dir": None,
    "resume": None,
    "run": None,
}


def check_keys(data: Any, allowed: set[str], where: str) -> dict[str, Any]:
    """A mapping with only `allowed` keys, else ConfigError naming the first unknown key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key {where}.{unknown[0]!r}; known keys here: {', '.join(sorted(allowed))}"
        )
    return data


def resolve_path(base: Path, value: Any, where: str, must_exist: bool = True) -> Path:
    """A path from the config, relative to the config's folder; checked when it must exist."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a file path")
    path = (base / Path(value).expanduser()).resolve()
    if must_exist and not path.exists():
        raise ConfigError(f"{where}: {path} does not exist")
    return path


def load_server_settings(path: str | Path) -> ServerSettings:
    """Read server.yaml strictly: unknown keys and missing files are refused by name."""
    path = Path(path)
    data = check_keys(read_yaml(path), set(SECTIONS), path.name)
    base = path.resolve().parent
    for required in ("certificates", "sites", "state_dir"):
        if required not in data:
            raise ConfigError(f"{path.name} needs a {required!r} section (see deploy/server.yaml)")
    listen = check_keys(data.get("listen", {}), SECTIONS["listen"], "listen")
    port = listen.get("port", DEFAULT_PORT)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"listen.port must be a TCP port number, not {port!r}")
    certs = check_keys(data["certificates"], SECTIONS["certificates"], "certificates")
    for key in ("ca", "cert", "key"):
        if key not in certs:
            raise ConfigError(f"certificates.{key} is missing (deploy/make-certs.sh writes it)")
    sites_data = data["sites"]
    if not isinstance(sites_data, list) or not sites_data:
        raise ConfigError("sites must be a list of {name, public_key} entries, at least one")
    sites = []
    for i, entry in enumerate(sites_data):
        entry = check_keys(entry, {"name", "public_key"}, f"sites[{i}]")
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ConfigError(f"sites[{i}].name must be a non-empty string")
        key = resolve_path(base, entry.get("public_key"), f"sites[{i}].public_key")
        sites.append(SiteEntry(entry["name"], key))
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"site names must be unique: {', '.join(names)}")
    resume = data.get("resume", False)
    if not isinstance(resume, bool):
        raise ConfigError(f"resume must be true or false, not {resume!r}")
    return ServerSettings(
        host=str(listen.get("host", "0.0.0.0")),
        port=port,
        ca_cert=resolve_path(base, certs["ca"], "certificates.ca"),
        cert=resolve_path(base, certs["cert"], "certificates.cert"),
        key=resolve_path(base, certs["key"], "certificates.key"),
        sites=sites,
        state_dir=resolve_path(base, data["state_dir"], "state_dir", must_exist=False),
        resume=resume,
        run=from_dict(EmixerConfig, data.get("run"), "run."),
    )


def run_config(settings: ServerSettings) -> EmixerConfig:
    """The run's config: checkpoints below the state dir unless given, resume from settings."""
    fed = settings.run.federation
    checkpoint_dir = Path(fed.checkpoint_dir or "checkpoints")
    if not checkpoint_dir.is_absolute():
        checkpoint_dir = settings.state_dir / checkpoint_dir
    fed = replace(fed, checkpoint_dir=str(checkpoint_dir), resume=settings.resume or fed.resume)
    return replace(settings.run, federation=fed)


def app_source_root() -> Path:
    """The folder holding the app's packages: the repo (editable) or site-packages."""
    return Path(__file__).resolve().parent.parent


def stage_app(dest: Path, cfg: EmixerConfig) -> Path:
    """Write a Flower app folder: the app packages and a pyproject.toml declaring the run config."""
    import tomli_w

    if dest.exists():
        shutil.rmtree(dest)
    root = app_source_root()
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
    import tomli_w

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
    """Poll the SuperLink's port; fail early (with its log) if it exits first."""
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
                return
        except OSError:
            time.sleep(0.3)
    raise LaunchError(f"flower-superlink did not listen on {address} within {READY_TIMEOUT:.0f} s")


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


class FlwrCli:
    """The flwr CLI bound to our private FLWR_HOME."""

    def __init__(self, flwr_home: Path) -> None:
        self.env = {**os.environ, "FLWR_HOME": str(flwr_home)}

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
    """Start flower-superlink in its own process group and wait until it listens."""
    state = settings.state_dir
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / "superlink.log"
    with log_path.open("a") as log_file:
        proc = subprocess.Popen(
            superlink_command(settings),
            cwd=state,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "FLWR_HOME": str(state / "flwr-home")},
        )
    try:
        wait_until_listening(proc, settings.control_address, log_path)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc


def run_server(settings: ServerSettings, echo: Callable[[str], None] = print) -> int:
    """Start the SuperLink, enrol the sites, run EMIXER to the end, stop. Returns an exit code."""
    cfg = run_config(settings)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
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
            return 0 if status == "finished:completed" else EXIT_FAILED
        finally:
            stop_process_group(proc)
            echo("SuperLink stopped")


def cmd_server(args: argparse.Namespace) -> int:
    """`emixer server`: the handler add_server_parser registers. Config and launch errors reach
    the CLI's main, which prints them as one line with exit code 2 like every other command."""
    settings = load_server_settings(args.config)
    if args.resume:
        settings = replace(settings, resume=True)
    return run_server(settings)


def add_server_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `emixer server --config server.yaml [--resume]`."""
    p = subparsers.add_parser(
        "server",
        help="coordinator: run the TLS SuperLink, enrol the sites' keys and run the federation",
        description="Start Flower's SuperLink with TLS and SuperNode authentication (runtime "
        "dependency installation off), enrol the public key of every site in server.yaml, "
        "submit the EMIXER run with the config's `run` section, stream its logs, and stop the "
        "SuperLink when the run ends or on Ctrl-C. See deploy/server.yaml.",
    )
    p.add_argument("--config", required=True, help="server.yaml (see deploy/server.yaml)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in the state dir instead of starting afresh",
    )
    p.set_defaults(func=cmd_server)
    return p
