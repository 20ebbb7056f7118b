"""Our strategy: a Flower strategy (FedAvg, FedAdam, FedMedian or FedTrimmedAvg) whose hooks add
update validation, the privacy ledger, budget handling and a checkpoint every round. Flower's own
`Strategy.start` runs the rounds; we never write a round loop of our own (docs/DESIGN.md section 7).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedTrimmedAvg, Strategy

from emixer_model.config import EmixerConfig
from emixer_model.privacy.ledger import arrays_sha256
from emixer_model.records import from_array_record, to_array_record, to_wire_record
from server.checkpoint import Checkpoint, save_checkpoint
from server.ledger import PrivacyLedger
from server.validation import update_problem

log = logging.getLogger("emixer.server")

BASES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
}
# Strategy attributes that must survive a restart (FedAdam's moment estimates).
STATE_ATTRIBUTES = ("m_t", "v_t")
# Machine-local paths of the coordinator: never stored in checkpoints (they reach releases).
LOCAL_PATH_KEYS = ("site_dirs", "state_root", "checkpoint_dir", "initial_model")
# the commit round only signs (no training): a site that has not answered by then is logged
# and asked again by `emixer server --resume`, instead of holding the run for a round_timeout
COMMIT_TIMEOUT = 300.0


class EmixerStrategy:
    """Mixin placed before a Flower strategy class; see `make_strategy`.

    Parameters
    ----------
    cfg : EmixerConfig
        The run's config; sent to every site with each round and stored in checkpoints.
    checkpoint_dir : Path
        Where a checkpoint is written after every round.
    ledger : PrivacyLedger
        Every site's privacy history (restored from a checkpoint on resume).
    round_offset : int (default: 0)
        Rounds already done before this start (resume), so round numbers continue.
    public_source : dict (default: {})
        The public pretraining the initial model came from; carried into every checkpoint.
    """

    def __init__(
        self,
        cfg: EmixerConfig,
        checkpoint_dir: Path,
        ledger: PrivacyLedger,
        round_offset: int = 0,
        public_source: dict | None = None,
        **base_kwargs: object,
    ) -> None:
        super().__init__(**base_kwargs)
        self.public_source = public_source or {}
        self.cfg = cfg
        self.checkpoint_dir = checkpoint_dir
        self.ledger = ledger
        self.round_offset = round_offset
        self.stopped = False
        self.exhausted_nodes: set[int] = set()
        self.global_arrays: dict = {}
        self.global_sha256 = ""
        # the model the run has reached and its round: what the commit round asks sites to sign
        self.final_round = round_offset
        self.final_arrays: dict = {}
        # nodes whose ClientApp answered this process (no Flower error): the commit round asks
        # them, also a site that could not train (it signs that it trained nothing)
        self.answering_nodes: set[int] = set()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.stopped:
            return []
        self.global_arrays = from_array_record(arrays)
        self.global_sha256 = arrays_sha256(self.global_arrays)
        messages = super().configure_train(server_round + self.round_offset, arrays, config, grid)
        packed = to_wire_record(self.global_arrays)
        sent = [m for m in messages if m.metadata.dst_node_id not in self.exhausted_nodes]
        for message in sent:
            message.content["arrays"] = packed
        return sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        names = {id(msg): self._accept(server_round, msg) for msg in replies}
        accepted = [msg for msg in replies if names[id(msg)]]
        arrays, metrics = None, None
        if len(accepted) >= self.cfg.federation.min_sites:
            arrays, metrics = super().aggregate_train(server_round, accepted)
        elif replies or not self.stopped:
            log.warning(
                "round %d: %d usable update(s), fewer than min_sites=%d; the global model stays "
                "as it was (the sites' privacy spend is recorded) and the next round tries again",
                server_round,
                len(accepted),
                self.cfg.federation.min_sites,
            )
        # every round up to a checkpoint has its record (the release gate checks coverage), also
        # one whose replies all missed the round timeout; only a stopped run's rounds leave none
        if replies or not self.stopped:
            aggregated = [str(names[id(msg)]) for msg in accepted] if arrays is not None else []
            self.ledger.record_round(server_round, self.global_sha256, aggregated)
            self.final_round = server_round
            self.final_arrays = (
                from_array_record(arrays) if arrays is not None else self.global_arrays
            )
            log.info(
                "round %d: checkpoint %s (release epsilon so far %.3f)",
                server_round,
                self._checkpoint(),
                self.ledger.release_epsilon(),
            )
        return arrays, metrics

    def commit(self, grid: Grid) -> None:
        """The commit round: every connected site signs the model the run ended with and what it
        had spent by then, and the last checkpoint is rewritten with those entries, so the
        release gate finds the model signed (docs/PRIVACY.md invariant 7). A site that does not
        answer is logged; the gate then refuses that model if the site trained on it."""
        if not self.final_arrays:
            return
        sha = arrays_sha256(self.final_arrays)
        content = {
            "arrays": to_wire_record(self.final_arrays),
            "config": ConfigRecord({**self.cfg.to_run_config(), "server-round": self.final_round}),
        }
        # Only sites whose app answered in this run: a site whose own gate refused the app never
        # runs it and would never answer. A run resumed with no rounds left asks every site.
        asked = self.answering_nodes
        nodes = [n for n in grid.get_node_ids() if not asked or n in asked]
        messages = [
            Message(content=RecordDict(content), dst_node_id=node, message_type="query.commit")
            for node in nodes
        ]
        timeout = min(self.cfg.federation.round_timeout, COMMIT_TIMEOUT)
        replies = grid.send_and_receive(messages, timeout=timeout)
        signed_by = 0
        for msg in replies:
            site, signed = msg.content.get("site"), msg.content.get("ledger")
            name = str(site["name"]) if site is not None else str(msg.metadata.src_node_id)
            try:
                if msg.has_error() or signed is None:
                    raise ValueError(msg.error.reason if msg.has_error() else "no signed entry")
                self.ledger.record_commit(name, self.final_round, dict(signed), sha)
                signed_by += 1
            except (KeyError, TypeError, ValueError) as err:
                log.warning("commit: site %s did not sign the final model (%s)", name, err)
        log.info(
            "commit: %d of %d sites signed the model of round %d; checkpoint %s rewritten",
            signed_by,
            len(messages),
            self.final_round,
            self._checkpoint(),
        )

    def _accept(self, server_round: int, msg: Message) -> str | None:
        """Record the site's signed ledger entry; its name if its update may be aggregated."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            log.warning("round %d: site node %d failed: %s", server_round, node, msg.error.reason)
            return None
        self.answering_nodes.add(node)
        site = msg.content.get("site")
        metrics = msg.content.get("metrics")
        if site is None or metrics is None:
            log.warning("round %d: node %d sent a reply without site status", server_round, node)
            return None
        name, status = str(site.get("name", node)), str(site.get("status", "unknown"))
        if status == "error":
            log.warning("round %d: site %s did not train: %s", server_round, name, site["message"])
            return None
        signed = msg.content.get("ledger")
        try:
            weight = float(metrics["num-examples"])
            self.ledger.record(
                name,
                server_round,
                status,
                dict(metrics),
                dict(signed) if signed is not None else None,
                self.global_sha256,
            )
        except (KeyError, TypeError, ValueError) as err:
            log.warning(
                "round %d: site %s sent a malformed or unverifiable ledger entry (%s); "
                "update dropped",
                server_round,
                name,
                err,
            )
            return None
        if status in ("budget-exhausted", "refused"):
            self.exhausted_nodes.add(node)
            if self.cfg.federation.on_budget_exhausted == "stop":
                self.stopped = True
                log.warning(
                    "round %d: site %s %s; stopping training", server_round, name, site["message"]
                )
            else:
                log.warning(
                    "round %d: site %s %s; continuing without it",
                    server_round,
                    name,
                    site["message"],
                )
            return None
        if "arrays" not in msg.content:
            log.warning(
                "round %d: site %s sent no model arrays; update dropped", server_round, name
            )
            return None
        try:
            update = from_array_record(msg.content["arrays"])
        except ValueError as err:
            log.warning("round %d: update from site %s dropped: %s", server_round, name, err)
            return None
        problem = update_problem(self.global_arrays, update, self.cfg.federation.max_update_norm)
        if problem:
            log.warning("round %d: update from site %s dropped: %s", server_round, name, problem)
            return None
        msg.content["arrays"] = to_array_record(update)  # aggregate in float32
        # FedAvg weighs by num-examples; the rest is in the ledger (sites may send different keys)
        msg.content["metrics"] = MetricRecord({"num-examples": weight})
        return name

    def _checkpoint(self) -> Path:
        """Write the checkpoint of `final_round` (again, after the commit round); its path."""
        state = {
            attr: dict(getattr(self, attr))
            for attr in STATE_ATTRIBUTES
            if getattr(self, attr, None)
        }
        return save_checkpoint(
            self.checkpoint_dir,
            Checkpoint(
                server_round=self.final_round,
                arrays=self.final_arrays,
                ledger=self.ledger.to_dict(),
                config=self._shareable_config(),
                strategy_state=state,
                public_source=self.public_source,
            ),
        )

    def _shareable_config(self) -> dict:
        config = self.cfg.to_dict()
        config["federation"].update(dict.fromkeys(LOCAL_PATH_KEYS, ""))
        return config

    def restore_state(self, state: dict) -> None:
        for attr, value in state.items():
            setattr(self, attr, value)


def make_strategy(
    cfg: EmixerConfig,
    checkpoint_dir: Path,
    ledger: PrivacyLedger,
    round_offset: int = 0,
    public_source: dict | None = None,
) -> Strategy:
    """The configured Flower strategy with our hooks mixed in."""
    fed = cfg.federation
    base = BASES[fed.strategy]
    kwargs: dict[str, object] = {
        "fraction_evaluate": 0.0,  # sites evaluate on their own data with `emixer evaluate`
        "min_train_nodes": fed.min_sites,
        "min_available_nodes": fed.min_sites,
    }
    if base is FedAdam:
        kwargs["eta"] = fed.server_lr
    if base is FedTrimmedAvg:
        kwargs["beta"] = fed.trim_beta
    cls = type(f"Emixer{base.__name__}", (EmixerStrategy, base), {})
    return cls(cfg, checkpoint_dir, ledger, round_offset, public_source, **kwargs)
