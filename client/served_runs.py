"""What a hospital keeps to trust the daemon: every served round in its audit log.

Every served or refused round is appended to the site's audit log (`log_site_event`, beside its
privacy state), with the hash of the code that served it. The app pin itself is checked outside
the app, before it runs (client/app_gate.py).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context

from emixer_model.privacy.state import log_site_event
from emixer_model.shared import app_hash


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
