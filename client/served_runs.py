"""What a hospital keeps to trust the daemon: the app pin and the served rounds in its audit log.

A site approves one version of the app by its code hash (`emixer app-hash` prints it) and puts it in
its node config as `approved-app-hash`; every round first checks the running code against it, so a
coordinator cannot push a changed ClientApp to a site that did not approve it. Every served or
refused round is appended to the site's audit log (`log_site_event`, beside its privacy state).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context

from emixer_model.privacy.state import log_site_event
from emixer_model.shared import app_hash


class AppNotApproved(RuntimeError):
    """The running app's code hash is not the one the site approved."""


def check_app_approved(context: Context, state_dir: Path) -> None:
    """Refuse to train when the node config pins an app hash that is not the running one."""
    approved = context.node_config.get("approved-app-hash")
    if approved is None:
        return
    running = app_hash()
    if running != str(approved):
        log_site_event(state_dir, {"event": "refused-app", "run": context.run_id, "app": running})
        raise AppNotApproved(
            f"this site approved app {str(approved)[:12]}… but the run ships {running[:12]}…; "
            "review the new version and update approved-app-hash in site.yaml to accept it"
        )


def log_served_round(
    state_dir: Path, context: Context, server_round: int, status: str, epsilon: float
) -> None:
    log_site_event(
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
