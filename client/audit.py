"""What a hospital keeps to trust the daemon: the app pin and the append-only audit log.

A site approves one version of the app by its code hash (`emixer app-hash` prints it) and puts it in
its node config as `approved-app-hash`; every round first checks the running code against it, so a
coordinator cannot push a changed ClientApp to a site that did not approve it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flwr.app import Context

from emixer_model.site_privacy import audit_event

# The packages a site runs; their source is what the site approves.
APP_PACKAGES = ("client", "emixer_model", "server")


class AppNotApproved(RuntimeError):
    """The running app's code hash is not the one the site approved."""


def app_hash(root: Path | None = None) -> str:
    """sha256 over the app's Python sources and shipped data files, in a stable order."""
    root = root or Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in APP_PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                digest.update(path.relative_to(root).as_posix().encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def check_app_approved(context: Context, state_dir: Path) -> None:
    """Refuse to train when the node config pins an app hash that is not the running one."""
    approved = context.node_config.get("approved-app-hash")
    if approved is None:
        return
    running = app_hash()
    if running != str(approved):
        log_event(state_dir, {"event": "refused-app", "run": context.run_id, "app": running})
        raise AppNotApproved(
            f"this site approved app {str(approved)[:12]}… but the run ships {running[:12]}…; "
            "review the new version and update approved-app-hash in site.yaml to accept it"
        )


log_event = audit_event  # the one writer of the site's audit log lives with its privacy state


def log_served_round(
    state_dir: Path, context: Context, server_round: int, status: str, epsilon: float
) -> None:
    log_event(
        state_dir,
        {
            "event": "round",
            "run": context.run_id,
            "round": server_round,
            "status": status,
            "epsilon": epsilon,
            "app": app_hash(),
        },
    )
