"""`emixer site`: a hospital's side of a real deployment, in one command.

It reads site.yaml, checks every path before anything connects, and runs Flower's SuperNode with
TLS (the federation's CA), the site's enrolled private key, its settings as node config, and
runtime dependency installation off (hospitals are offline; the site runs only what it installed).
Start and stop are written to the site's append-only audit log next to every served round.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.audit import app_hash, log_event
from emixer_model.config import ConfigError, read_yaml
from emixer_model.site_privacy import SitePolicy

DEFAULT_RUNTIME_PORT = 9094
EXIT_USAGE = 2
STOP_TIMEOUT = 15.0

SITE_KEYS = {
    "superlink": "coordinator address host:port, e.g. emixer.example.org:9092",
    "root_certificate": "the federation's CA certificate (ca.crt from deploy/make-certs.sh)",
    "private_key": "this site's own private key (`emixer keygen`); only its .pub is enrolled",
    "data_path": "the site folder (studies.csv, DICOMs, unlabeled/)",
    "state_dir": "where caches, the privacy accountant and the audit log live",
    "site_name": "the name the coordinator knows this site by",
    "epsilon_budget": "this site's epsilon budget (a run may ask for less, never more)",
    "max_delta": "the largest delta this site accepts (default 1/(10 N); never >= 1/N)",
    "min_noise_multiplier": "a floor on the noise multiplier (a run asking less is refused)",
    "share_losses": "send mean training losses to the coordinator (default false: not DP)",
    "approved_app_hash": "`emixer app-hash` of the reviewed app version; others are refused",
    "runtime_port": "local port of the SuperNode's app runtime API (default 9094)",
}
POLICY_KEYS = ("epsilon_budget", "max_delta", "min_noise_multiplier", "share_losses")
REQUIRED = (
    "superlink",
    "root_certificate",
    "private_key",
    "data_path",
    "state_dir",
    "site_name",
    "epsilon_budget",  # the site's own, never the coordinator's
)


@dataclass
class SiteSettings:
    """site.yaml, resolved: relative paths are taken from the file's folder."""

    superlink: str
    root_certificate: Path
    private_key: Path
    data_path: Path
    state_dir: Path
    site_name: str
    policy: SitePolicy = field(default_factory=SitePolicy)
    approved_app_hash: str | None = None
    runtime_port: int = DEFAULT_RUNTIME_PORT

    def node_config(self) -> dict[str, str | float | bool]:
        """The node config keys client/app.py and client/audit.py read: paths, the key that
        signs the ledger (the node-auth key) and the site's privacy policy."""
        config: dict[str, str | float | bool] = {
            "data-path": str(self.data_path),
            "state-dir": str(self.state_dir),
            "site-name": self.site_name,
            "signing-key": str(self.private_key),
            **self.policy.node_config(),
        }
        if self.approved_app_hash is not None:
            config["approved-app-hash"] = self.approved_app_hash
        return config


def load_site_settings(path: str | Path) -> SiteSettings:
    """Read site.yaml strictly and check that every file and folder it names exists."""
    path = Path(path)
    data = read_yaml(path)
    unknown = sorted(set(data) - set(SITE_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} in {path.name}; known keys: {', '.join(SITE_KEYS)}"
        )
    for key in REQUIRED:
        if data.get(key) in (None, ""):
            raise ConfigError(f"{path.name} needs {key!r}: {SITE_KEYS[key]}")
    base = path.resolve().parent

    def existing(key: str, kind: str) -> Path:
        found = (base / Path(str(data[key])).expanduser()).resolve()
        ok = found.is_dir() if kind == "folder" else found.is_file()
        if not ok:
            raise ConfigError(f"{key}: {found} is not an existing {kind} ({SITE_KEYS[key]})")
        return found

    superlink = str(data["superlink"])
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"superlink must look like host:port, not {superlink!r}")
    policy = site_policy(data)
    approved = data.get("approved_app_hash")
    if approved is not None and not (
        isinstance(approved, str)
        and len(approved) == 64
        and set(approved) <= set("0123456789abcdef")
    ):
        raise ConfigError("approved_app_hash must be the 64-character hex from `emixer app-hash`")
    runtime_port = data.get("runtime_port", DEFAULT_RUNTIME_PORT)
    if not isinstance(runtime_port, int) or not 0 < runtime_port < 65536:
        raise ConfigError(f"runtime_port must be a TCP port number, not {runtime_port!r}")
    data_path = existing("data_path", "folder")
    state_dir = (base / Path(str(data["state_dir"])).expanduser()).resolve()
    if state_dir == data_path or data_path in state_dir.parents:
        raise ConfigError(f"state_dir {state_dir} must be outside the data folder {data_path}")
    return SiteSettings(
        superlink=superlink,
        root_certificate=existing("root_certificate", "file"),
        private_key=existing("private_key", "file"),
        data_path=data_path,
        state_dir=state_dir,
        site_name=str(data["site_name"]),
        policy=policy,
        approved_app_hash=approved,
        runtime_port=runtime_port,
    )


def site_policy(data: dict[str, Any]) -> SitePolicy:
    """The privacy policy part of site.yaml, checked (ConfigError names the bad key)."""
    given = {key: data[key] for key in POLICY_KEYS if data.get(key) is not None}
    for key, value in given.items():
        wanted = bool if key == "share_losses" else (int, float)
        if not isinstance(value, wanted) or (wanted is not bool and isinstance(value, bool)):
            raise ConfigError(f"{key} must be {'true or false' if wanted is bool else 'a number'}")
    try:
        return SitePolicy(**given)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def write_node_config(settings: SiteSettings) -> Path:
    """The node config as a TOML file (flower-supernode accepts one); paths need no quoting."""
    import tomli_w

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    path = settings.state_dir / "node-config.toml"
    path.write_text(tomli_w.dumps(settings.node_config()))
    return path


def supernode_command(settings: SiteSettings, node_config: Path) -> list[str]:
    """flower-supernode with TLS, the site's key and its node config; no runtime installs."""
    return [
        "flower-supernode",
        "--superlink",
        settings.superlink,
        "--root-certificates",
        str(settings.root_certificate),
        "--auth-supernode-private-key",
        str(settings.private_key),
        "--node-config",
        str(node_config),
        "--port",
        str(settings.runtime_port),
    ]


def supernode_env(settings: SiteSettings) -> dict[str, str]:
    """Flower keeps installed app bundles in FLWR_HOME: keep them in the site's state dir."""
    return {**os.environ, "FLWR_HOME": str(settings.state_dir / "flwr-home")}


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (systemd stop) like Ctrl-C so child processes are stopped and logged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_site(settings: SiteSettings) -> int:
    """Run the SuperNode until it exits or we are stopped; returns its exit code."""
    node_config = write_node_config(settings)
    entry = {"site": settings.site_name, "superlink": settings.superlink, "app": app_hash()}
    log_event(settings.state_dir, {"event": "daemon-start", **entry})
    proc = subprocess.Popen(
        supernode_command(settings, node_config),
        env=supernode_env(settings),
        start_new_session=True,
    )
    code = 130
    try:
        with sigterm_as_interrupt():
            code = proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    finally:
        log_event(settings.state_dir, {"event": "daemon-stop", "exit": code, **entry})
    if code == 305:
        print(
            "error: the SuperLink refused this site's key; ask the coordinator to enrol "
            f"the public key that belongs to {settings.private_key}",
            file=sys.stderr,
        )
    return code


def check_site(settings: SiteSettings, resolution: int = 64) -> int:
    """`--check`: the data folder report and the app pin, without connecting anywhere."""
    from rich.console import Console

    from emixer_model.data.check import check_folder

    console = Console()
    report = check_folder(settings.data_path, resolution=resolution)
    report.render(console)
    running = app_hash()
    if settings.approved_app_hash is None:
        console.print(f"app hash {running}: no approved_app_hash pinned, any version will run")
    elif settings.approved_app_hash == running:
        console.print(f"app hash {running}: matches approved_app_hash")
    else:
        console.print(
            f"[red]app hash {running} differs from approved_app_hash "
            f"{settings.approved_app_hash}[/red]: review this version, then update site.yaml"
        )
        return EXIT_USAGE
    return 0 if report.usable else EXIT_USAGE


def cmd_site(args: argparse.Namespace) -> int:
    """`emixer site`: the handler add_site_parser registers (config errors reach the CLI's main)."""
    settings = load_site_settings(args.config)
    return check_site(settings) if args.check else run_site(settings)


def add_site_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `emixer site --config site.yaml [--check]`."""
    p = subparsers.add_parser(
        "site",
        help="hospital: run this site's authenticated SuperNode (or --check its setup)",
        description="Connect this site to the coordinator's SuperLink over TLS with the site's "
        "enrolled key and serve federated rounds on the data folder in site.yaml. Runtime "
        "dependency installation stays off and the site refuses app versions other than "
        "approved_app_hash. Start and stop go to the site's audit log. See deploy/site.yaml.",
    )
    p.add_argument("--config", required=True, help="site.yaml (see deploy/site.yaml)")
    p.add_argument(
        "--check",
        action="store_true",
        help="only validate the config, report on the data folder and compare the app hash",
    )
    p.set_defaults(func=cmd_site)
    return p
