"""`emixer site`: a hospital's side of a real deployment, in one command.

It reads site.yaml, checks every path before anything connects, and runs Flower's SuperNode with
TLS (the federation's CA), the site's enrolled private key, its settings as node config, and
runtime dependency installation off (hospitals are offline; the site runs only what it installed).
Every ClientApp the SuperNode starts passes the site's app gate first (client/app_gate.py): a
bundle that is not `approved_app_hash` is refused before any of its code runs. Start and stop are
written to the site's append-only audit log next to every served round.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import tomli_w
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
from flwr.supercore.exit import ExitCode

from client.app_gate import GATE_COMMAND, installed_app_problem
from emixer_model.config import ConfigError, config_key, load_yaml_as
from emixer_model.daemon_guard import (
    die_with_parent,
    hold_state_dir,
    port_problem,
    process_marker,
)
from emixer_model.privacy.policy import SitePolicy
from emixer_model.privacy.state import log_site_event
from emixer_model.shared import app_hash, sigterm_as_interrupt, stop_process_group

log = logging.getLogger("emixer.site")

DEFAULT_RUNTIME_PORT = 9094
# The public message of Flower's FLEET_NODE_ACTIVATION_FAILED (flwr/supercore/error/catalog.py):
# the SuperLink sends it, and nothing more, both for a key it has not enrolled and for a node it
# still counts as online (flwr/superlink/servicer/fleet/fleet_handlers.py `activate_node`).
REFUSED_ACTIVATION = "Failed to activate SuperNode"
# A node that never signed off stays online for HEARTBEAT_PATIENCE x its heartbeat interval.
ACTIVATION_GRACE = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
ACTIVATION_WAIT = ACTIVATION_GRACE + 30.0  # seconds a refused activation is retried
RETRY_EVERY = 10.0
RELAY_DRAIN = 5.0  # seconds the SuperNode's last output may take to arrive after it exits
FLOWER_EXIT_CODE = re.compile(r"Exit Code: (\d+)")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class SiteFile:
    """site.yaml as written (deploy/site.yaml): every key, its type and its meaning. Keys
    without a default must be given: among them `epsilon_budget` (the site states its own) and
    `approved_app_hash` (the site runs only the app version it reviewed)."""

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
    approved_app_hash: str = config_key(
        "the app version this site reviewed: run `emixer app-hash` on that install and put its "
        "output here; a run shipping any other code is refused before it runs"
    )
    max_delta: float | None = config_key(
        "the largest delta this site accepts (default 1/(10 N))", None
    )
    min_noise_multiplier: float | None = config_key("a floor on the noise multiplier", None)
    share_losses: bool = config_key("send mean training losses to the coordinator (not DP)", False)
    require_secure_mode: bool = config_key(
        "run every round with Opacus' secure_mode (noise resistant to floating-point attacks, "
        "4x the noise draws), whatever the run config says",
        False,
    )
    holdout_fraction: float = config_key(
        "share of this site's patients held out for its own evaluation, chosen before round 1 "
        "(e.g. 0.2); the run config's train.holdout_fraction is ignored",
        0.0,
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
    approved_app_hash: str
    policy: SitePolicy = field(default_factory=SitePolicy)
    runtime_port: int = DEFAULT_RUNTIME_PORT

    def node_config(self) -> dict[str, str | float | bool]:
        """The node config keys client/app.py reads: paths, the key that signs the ledger (the
        node-auth key) and the site's privacy policy. The app pin is not among them: the gate
        in front of the app reads it from its own command line (`write_app_gate`)."""
        return {
            "data-path": str(self.data_path),
            "state-dir": str(self.state_dir),
            "site-name": self.site_name,
            "signing-key": str(self.private_key),
            **self.policy.node_config(),
        }


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
    if not (len(approved) == 64 and set(approved) <= set("0123456789abcdef")):
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
            require_secure_mode=raw.require_secure_mode,
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


def write_app_gate(settings: SiteSettings) -> Path:
    """The folder that goes first on the SuperNode's PATH: it holds only the site's own
    `flwr-clientapp`, which runs client/app_gate.py from this install with the site's pin, so
    Flower starts every ClientApp behind the check (`-P`: nothing from the working directory)."""
    folder = settings.state_dir / "app-gate"
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-P",
        "-m",
        "client.app_gate",
        "--approved-app-hash",
        settings.approved_app_hash,
        "--state-dir",
        str(settings.state_dir),
    ]
    script = folder / GATE_COMMAND
    script.write_text(
        "#!/bin/sh\n# written by `emixer site`: every ClientApp passes this site's app pin first\n"
        f'exec {shlex.join(command)} "$@"\n'
    )
    script.chmod(0o755)
    return folder


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


def prepare_supernode(settings: SiteSettings) -> tuple[list[str], dict[str, str]]:
    """The SuperNode's command and environment, after writing its node config and the app gate:
    Flower keeps installed app bundles in FLWR_HOME (kept in the state dir), and finds the
    ClientApp process on PATH, whose first folder is the gate. Every process it starts carries
    the state dir's marker, so none can outlive the daemon unnoticed (daemon_guard)."""
    command = supernode_command(settings, write_node_config(settings))
    gate = write_app_gate(settings)
    env = {
        **os.environ,
        "FLWR_HOME": str(settings.state_dir / "flwr-home"),
        "PATH": os.pathsep.join([str(gate), os.environ.get("PATH", os.defpath)]),
        **process_marker(settings.state_dir),
    }
    return command, env


def run_site(settings: SiteSettings) -> int:
    """Run the SuperNode until it exits or we are stopped; returns its exit code. Only one daemon
    runs per state dir, and nothing it started outlives it (daemon_guard)."""
    problem = installed_app_problem(settings.approved_app_hash)
    if problem is not None:
        raise ConfigError(problem)
    with hold_state_dir(settings.state_dir, "site", log.warning):
        problem = port_problem("127.0.0.1", settings.runtime_port, "the SuperNode's runtime API")
        if problem is not None:
            raise ConfigError(f"{problem} (site.yaml runtime_port)")
        return serve_site(settings)


def run_supernode(command: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """One flower-supernode process: its output goes on to ours (the journal), its last lines are
    kept to read Flower's exit code from; (130, ...) when we are stopped. Whatever it leaves in
    its process group (its flower-superexec) is stopped with it."""
    proc = subprocess.Popen(
        command,
        env=env,
        start_new_session=True,
        preexec_fn=die_with_parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    tail: deque[str] = deque(maxlen=60)
    # a thread relays the output: the main thread must reap the SuperNode at once, because its
    # flower-superexec (which shares the pipe) waits for its parent's pid to disappear
    relay = threading.Thread(target=relay_lines, args=(proc.stdout, tail), daemon=True)
    relay.start()
    try:
        with sigterm_as_interrupt():
            code = proc.wait()
    except KeyboardInterrupt:
        stop_process_group(proc)
        code = 130
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    relay.join(timeout=RELAY_DRAIN)
    return code, list(tail)


def relay_lines(stream: IO[str] | None, tail: deque[str]) -> None:
    """Copy the SuperNode's output to ours and keep its last lines (escape codes removed)."""
    for line in stream or ():
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(ANSI_ESCAPE.sub("", line))


def flower_exit(lines: list[str]) -> tuple[int, str] | None:
    """Flower's exit code and its message, read from the SuperNode's log: `flwr_exit` logs
    "Exit Code: N" but ends the process with status 1 for every error code
    (flwr/supercore/exit/exit.py), so the status alone cannot tell a refusal from a crash."""
    text = "".join(lines)
    found = list(FLOWER_EXIT_CODE.finditer(text))
    if not found:
        return None
    message = text[found[-1].end() :].split("For more information")[0]
    return int(found[-1].group(1)), " ".join(message.split())


def is_refused_activation(flower: tuple[int, str] | None) -> bool:
    """The SuperLink answered, but would not activate this node (see `REFUSED_ACTIVATION`)."""
    return (
        flower is not None
        and flower[0] == ExitCode.SUPERNODE_CONNECTION_ERROR
        and REFUSED_ACTIVATION in flower[1]
    )


def explain_exit(settings: SiteSettings, code: int, flower: tuple[int, str] | None) -> str:
    """What the site engineer should know about a SuperNode that stopped with status `code`."""
    if is_refused_activation(flower):
        return (
            "the SuperLink refused to activate this site's SuperNode (Flower exit code 305; "
            f"retried for {ACTIVATION_WAIT:.0f} s). Flower gives the same answer for two causes: "
            "the coordinator has not enrolled this site's public key (send them the .pub of "
            f"{settings.private_key} for server.yaml `sites`), or the SuperLink still counts this "
            "site's previous SuperNode as online because it stopped without signing off (crash, "
            "SIGKILL, lost network) and has not freed it yet"
        )
    if flower is not None:
        return f"flower-supernode stopped with Flower exit code {flower[0]}: {flower[1]}"
    return f"flower-supernode exited with status {code}; its last lines are above"


def serve_site(settings: SiteSettings) -> int:
    """Run the SuperNode, logged at start and stop in the site's audit log. A refused activation
    is retried for `ACTIVATION_WAIT` seconds: after a crash the SuperLink holds the dead node
    "online" until its heartbeat lapses, and a daemon restarted by systemd lands in that window."""
    command, env = prepare_supernode(settings)
    entry = {
        "site": settings.site_name,
        "superlink": settings.superlink,
        "app": app_hash(),
        "approved": settings.approved_app_hash,
    }
    log_site_event(settings.state_dir, {"event": "daemon-start", **entry})
    code, flower, deadline = 130, None, None
    try:
        while True:
            code, output = run_supernode(command, env)
            flower = flower_exit(output)
            if code == 130 or not is_refused_activation(flower):
                break
            deadline = deadline or time.monotonic() + ACTIVATION_WAIT
            if time.monotonic() > deadline:
                break
            log.warning(
                "the SuperLink refused to activate this site's SuperNode; if its previous "
                "SuperNode stopped without signing off, the SuperLink frees it within %.0f s "
                "of its last heartbeat. Retrying in %.0f s",
                ACTIVATION_GRACE,
                RETRY_EVERY,
            )
            with sigterm_as_interrupt():
                time.sleep(RETRY_EVERY)
    except KeyboardInterrupt:
        code = 130
    finally:
        log_site_event(settings.state_dir, {"event": "daemon-stop", "exit": code, **entry})
    if code not in (0, 130):
        log.error(explain_exit(settings, code, flower))
    return code
