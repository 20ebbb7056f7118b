"""`emixer site`: a hospital's side of a real deployment, in one command.

It reads site.yaml, checks every path before anything connects, and runs Flower's SuperNode with
TLS (the federation's CA), the site's enrolled private key, its settings as node config, and
runtime dependency installation off (hospitals are offline; the site runs only what it installed).
Start and stop are written to the site's append-only audit log next to every served round.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from emixer_model.config import ConfigError, config_key, load_yaml_as
from emixer_model.privacy.policy import SitePolicy
from emixer_model.privacy.state import log_site_event
from emixer_model.shared import app_hash, sigterm_as_interrupt, stop_process_group

log = logging.getLogger("emixer.site")

DEFAULT_RUNTIME_PORT = 9094
NOT_ENROLLED = 305  # flower-supernode's exit code when the SuperLink refuses the node's key


@dataclass
class SiteFile:
    """site.yaml as written (deploy/site.yaml): every key, its type and its meaning. Keys
    without a default must be given; `epsilon_budget` is one: the site states its own."""

    superlink: str = config_key("coordinator address host:port, e.g. emixer.example.org:9092")
    root_certificate: str = config_key(
        "the federation's CA certificate (ca.crt from make-certs.sh)"
    )
    private_key: str = config_key(
        "this site's own private key (`emixer keygen`); only its .pub travels"
    )
    data_path: str = config_key("the site folder (studies.csv, DICOMs, unlabeled/)")
    state_dir: str = config_key("where caches, the privacy accountant and the audit log live")
    site_name: str = config_key("the name the coordinator knows this site by")
    epsilon_budget: float = config_key(
        "this site's epsilon budget (a run may ask for less, never more)"
    )
    max_delta: float | None = config_key(
        "the largest delta this site accepts (default 1/(10 N))", None
    )
    min_noise_multiplier: float | None = config_key("a floor on the noise multiplier", None)
    share_losses: bool = config_key("send mean training losses to the coordinator (not DP)", False)
    holdout_fraction: float = config_key(
        "share of this site's patients held out for its own evaluation, chosen before round 1 "
        "(e.g. 0.2); the run config's train.holdout_fraction is ignored",
        0.0,
    )
    approved_app_hash: str | None = config_key(
        "`emixer app-hash` of the reviewed app version", None
    )
    runtime_port: int = config_key(
        "local port of the SuperNode's app runtime API", DEFAULT_RUNTIME_PORT
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
        """The node config keys client/app.py and client/served_runs.py read: paths, the key
        that signs the ledger (the node-auth key) and the site's privacy policy."""
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
    """Read site.yaml strictly (the config loader) and check every file and folder it names."""
    path = Path(path)
    raw = load_yaml_as(SiteFile, path)
    base = path.resolve().parent

    def resolved(key: str, kind: str | None = None) -> Path:
        found = (base / Path(getattr(raw, key)).expanduser()).resolve()
        exists = found.is_dir() if kind == "folder" else found.is_file()
        if kind is not None and not exists:
            meaning = SiteFile.__dataclass_fields__[key].metadata["help"]
            raise ConfigError(f"{key}: {found} is not an existing {kind} ({meaning})")
        return found

    host, _, port = raw.superlink.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"superlink must look like host:port, not {raw.superlink!r}")
    approved = raw.approved_app_hash
    if approved is not None and not (
        len(approved) == 64 and set(approved) <= set("0123456789abcdef")
    ):
        raise ConfigError("approved_app_hash must be the 64-character hex from `emixer app-hash`")
    if not 0 < raw.runtime_port < 65536:
        raise ConfigError(f"runtime_port must be a TCP port number, not {raw.runtime_port!r}")
    data_path = resolved("data_path", "folder")
    state_dir = resolved("state_dir")
    if state_dir == data_path or data_path in state_dir.parents:
        raise ConfigError(f"state_dir {state_dir} must be outside the data folder {data_path}")
    try:
        policy = SitePolicy(
            epsilon_budget=raw.epsilon_budget,
            max_delta=raw.max_delta,
            min_noise_multiplier=raw.min_noise_multiplier,
            share_losses=raw.share_losses,
            holdout_fraction=raw.holdout_fraction,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return SiteSettings(
        superlink=raw.superlink,
        root_certificate=resolved("root_certificate", "file"),
        private_key=resolved("private_key", "file"),
        data_path=data_path,
        state_dir=state_dir,
        site_name=raw.site_name,
        policy=policy,
        approved_app_hash=approved,
        runtime_port=raw.runtime_port,
    )


def write_node_config(settings: SiteSettings) -> Path:
    """The node config as a TOML file (flower-supernode accepts one); paths need no quoting."""
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


def run_site(settings: SiteSettings) -> int:
    """Run the SuperNode until it exits or we are stopped; returns its exit code."""
    node_config = write_node_config(settings)
    entry = {"site": settings.site_name, "superlink": settings.superlink, "app": app_hash()}
    log_site_event(settings.state_dir, {"event": "daemon-start", **entry})
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
        stop_process_group(proc)
    finally:
        log_site_event(settings.state_dir, {"event": "daemon-stop", "exit": code, **entry})
    if code == NOT_ENROLLED:
        log.error(
            "the SuperLink refused this site's key; ask the coordinator to enrol the public key "
            "that belongs to %s",
            settings.private_key,
        )
    return code
