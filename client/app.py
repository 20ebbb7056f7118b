"""The site's Flower ClientApp: thin on purpose. It finds the site's folders, then calls
`train_site_round`, the same function `emixer train-local` runs, and replies with model arrays and
aggregate metrics only (docs/PRIVACY.md invariant 4).

Where a site's settings come from:
- deployment (`flower-supernode --node-config`): `data-path`, `state-dir`, optional `site-name` and
  `epsilon-budget` (the site's own cap: the tighter of it and the run's budget applies);
- simulation: Flower gives only `partition-id`; the run's `federation.site_dirs` and
  `federation.state_root` map it to a phantom site folder and a state directory.
The run config itself arrives inside every train message, so both paths read it the same way.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import AppNotApproved, check_app_approved, log_served_round
from emixer_model.config import ConfigError, EmixerConfig
from emixer_model.data.site import SiteDataError
from emixer_model.records import from_array_record, to_array_record
from emixer_model.site_training import train_site_round

log = logging.getLogger("emixer.site")

app = ClientApp()


def site_paths(context: Context, cfg: EmixerConfig) -> tuple[str, Path, Path, float | None]:
    """(site name, data folder, state folder, site's own budget) from node config or partition."""
    node = context.node_config
    if "data-path" in node:
        data = Path(str(node["data-path"]))
        state = Path(str(node.get("state-dir", data.parent / f".emixer-state-{data.name}")))
        budget = float(node["epsilon-budget"]) if "epsilon-budget" in node else None
        return str(node.get("site-name", data.name)), data, state, budget
    if "partition-id" not in node:
        raise ConfigError("node config has neither 'data-path' nor a simulation 'partition-id'")
    pid = int(node["partition-id"])
    dirs = [d for d in cfg.federation.site_dirs.split(",") if d]
    if pid >= len(dirs):
        raise ConfigError(
            f"simulation partition {pid} has no site folder: federation.site_dirs lists {len(dirs)}"
        )
    root = Path(cfg.federation.state_root or Path(dirs[pid]).parent / "state")
    name = Path(dirs[pid]).name
    return name, Path(dirs[pid]), root / name, None


# Failures a site reports as a status instead of crashing: the server logs the category and goes on
# without the site. The detail (it may name local files) stays in the site's own log.
SITE_FAILURES = (ConfigError, SiteDataError, AppNotApproved, ValueError, OSError)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One federated round at this site."""
    flat = dict(msg.content["config"])
    server_round = int(flat.pop("server-round"))
    name = str(context.node_config.get("site-name", f"node-{context.node_id}"))
    try:
        cfg = EmixerConfig.from_run_config(flat)
        name, data_dir, state_dir, site_budget = site_paths(context, cfg)
        check_app_approved(context, state_dir)
        if site_budget is not None and site_budget < cfg.privacy.epsilon_budget:
            cfg = replace(cfg, privacy=replace(cfg.privacy, epsilon_budget=site_budget))
        global_weights = from_array_record(msg.content["arrays"])
        result = train_site_round(
            data_dir, state_dir, cfg, global_weights, server_round, cfg.federation.rounds
        )
    except SITE_FAILURES as err:
        log.error("site %s round %d: not trained: %s", name, server_round, err)
        status = ConfigRecord(
            {
                "name": name,
                "status": "error",
                "message": f"{type(err).__name__} at the site; details are in the site's log",
            }
        )
        return Message(
            content=RecordDict({"metrics": MetricRecord({"num-examples": 0.0}), "site": status}),
            reply_to=msg,
        )
    log_served_round(state_dir, context, server_round, result.status, result.epsilon)
    log.info(
        "site %s round %d: %s, epsilon %.3f", name, server_round, result.status, result.epsilon
    )
    content = RecordDict(
        {
            "metrics": MetricRecord(result.metrics()),
            "site": ConfigRecord(
                {"name": name, "status": result.status, "message": result.message}
            ),
        }
    )
    if result.weights is not None:
        content["arrays"] = to_array_record(result.weights, cfg.federation.update_dtype)
    return Message(content=content, reply_to=msg)
