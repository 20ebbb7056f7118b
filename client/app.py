"""The site's Flower ClientApp: thin on purpose. It finds the site's folders, then calls
`train_site_round`, the same function `emixer train-local` runs, and replies with model arrays and
aggregate metrics only (docs/PRIVACY.md invariant 4).

Where a site's settings come from:
- deployment (`flower-supernode --node-config`, written by `emixer site` from site.yaml):
  `data-path`, `state-dir`, `site-name`, `signing-key` (the node-auth key that signs the ledger)
  and the site's privacy policy (`epsilon-budget`, `max-delta`, `min-noise-multiplier`,
  `share-losses`, `holdout-fraction`, `require-secure-mode`; see
  emixer_model.privacy.policy.SitePolicy);
- simulation: Flower gives only `partition-id`; the run's `federation.site_dirs` and
  `federation.state_root` map it to a phantom site folder and a state directory; the policy takes
  its defaults (no budget or hold-out of its own: the run's apply; delta at most 1/(10 N); no
  noise floor; no losses sent) and the signing key is made in the state directory.
The run config itself arrives inside every train message, so both paths read it the same way; it
never overrides the site's policy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.served_runs import log_served_round
from emixer_model.config import ConfigError, EmixerConfig
from emixer_model.data.site import SiteDataError
from emixer_model.privacy.ledger import SiteKey
from emixer_model.privacy.policy import SitePolicy
from emixer_model.records import from_array_record, to_wire_record
from emixer_model.site_training import commit_model, train_site_round

log = logging.getLogger("emixer.site")

app = ClientApp()


def site_paths(context: Context, cfg: EmixerConfig) -> tuple[str, Path, Path]:
    """(site name, data folder, state folder) from node config or simulation partition."""
    node = context.node_config
    if "data-path" in node:
        data = Path(str(node["data-path"]))
        state = Path(str(node.get("state-dir", data.parent / f".emixer-state-{data.name}")))
        return str(node.get("site-name", data.name)), data, state
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
    return name, Path(dirs[pid]), root / name


# Failures a site reports as a status instead of crashing: the server logs the category and goes on
# without the site. The detail (it may name local files) stays in the site's own log.
SITE_FAILURES = (ConfigError, SiteDataError, ValueError, OSError)


@dataclass(frozen=True)
class SiteRequest:
    """What a train or commit message asks of this site, read with the site's own settings."""

    cfg: EmixerConfig
    name: str
    data_dir: Path
    state_dir: Path
    policy: SitePolicy
    key: SiteKey | None
    weights: dict
    run_id: str


def round_and_node_name(msg: Message, context: Context) -> tuple[dict, int, str]:
    """(the run config, the server round, the node's site name): what a failure is logged with
    before the config is read."""
    flat = dict(msg.content["config"])
    server_round = int(flat.pop("server-round"))
    return flat, server_round, str(context.node_config.get("site-name", f"node-{context.node_id}"))


def site_request(flat: dict, msg: Message, context: Context) -> SiteRequest:
    """Read the run config, the site's paths, policy and signing key, and the model sent."""
    cfg = EmixerConfig.from_run_config(flat)
    name, data_dir, state_dir = site_paths(context, cfg)
    key_path = context.node_config.get("signing-key")
    return SiteRequest(
        cfg=cfg,
        name=name,
        data_dir=data_dir,
        state_dir=state_dir,
        policy=SitePolicy.from_node_config(context.node_config),
        key=SiteKey.load(Path(str(key_path))) if key_path else None,
        weights=from_array_record(msg.content["arrays"]),
        run_id=str(context.run_id),
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One federated round at this site."""
    flat, server_round, name = round_and_node_name(msg, context)
    try:
        request = site_request(flat, msg, context)
        name = request.name
        result = train_site_round(
            request.data_dir,
            request.state_dir,
            request.cfg,
            request.weights,
            server_round,
            request.cfg.federation.rounds,
            policy=request.policy,
            key=request.key,
            site_name=name,
            run_id=request.run_id,
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
    log_served_round(request.state_dir, context, server_round, result.status, result.epsilon)
    if result.status == "trained":
        log.info("site %s round %d: trained, epsilon %.3f", name, server_round, result.epsilon)
    else:
        log.warning("site %s round %d: %s: %s", name, server_round, result.status, result.message)
    content = RecordDict(
        {
            "metrics": MetricRecord(result.metrics()),
            "site": ConfigRecord(
                {"name": name, "status": result.status, "message": result.message}
            ),
        }
    )
    if result.weights is not None:
        content["arrays"] = to_wire_record(result.weights, request.cfg.federation.update_dtype)
    if result.signed is not None:
        content["ledger"] = ConfigRecord({**result.signed, "public-key": result.public_key})
    return Message(content=content, reply_to=msg)


@app.query("commit")
def commit(msg: Message, context: Context) -> Message:
    """The run's commit round: sign the model it ended with (`commit_model`), so a release of it
    is one this site signed for, with what it had spent (docs/PRIVACY.md invariant 7)."""
    flat, server_round, name = round_and_node_name(msg, context)
    try:
        request = site_request(flat, msg, context)
        name = request.name
        signed, signer = commit_model(
            request.state_dir,
            request.cfg,
            request.weights,
            server_round,
            policy=request.policy,
            key=request.key,
            site_name=name,
            run_id=request.run_id,
        )
    except SITE_FAILURES as err:
        log.error("site %s: the final model of round %d not signed: %s", name, server_round, err)
        return Message(content=RecordDict({"site": ConfigRecord({"name": name})}), reply_to=msg)
    content = {
        "site": ConfigRecord({"name": name}),
        "ledger": ConfigRecord({**signed, "public-key": signer.public_key()}),
    }
    return Message(content=RecordDict(content), reply_to=msg)
