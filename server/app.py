"""The Flower ServerApp: thin on purpose. `serve` starts (or resumes) the configured strategy."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from emixer_model.config import FINDINGS, EmixerConfig
from emixer_model.networks import build_networks, get_weights, set_weights
from emixer_model.privacy.ledger import arrays_sha256
from emixer_model.public_pretrain import warm_start_report_decoder, with_site_findings
from emixer_model.records import to_array_record
from emixer_model.text.vocabulary import VOCAB_SIZE
from server.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from server.ledger import PrivacyLedger
from server.strategy import make_strategy

log = logging.getLogger("emixer.server")

DEFAULT_CHECKPOINT_DIR = "emixer-checkpoints"


def serve(grid: Grid, cfg: EmixerConfig) -> None:
    """Run the federation to `federation.rounds`, resuming from the newest checkpoint if asked."""
    checkpoint_dir = Path(cfg.federation.checkpoint_dir or DEFAULT_CHECKPOINT_DIR)
    done, ledger, state, public_source = 0, PrivacyLedger(), {}, {}
    ckpt = latest_checkpoint(checkpoint_dir) if cfg.federation.resume else None
    if ckpt is not None:
        done, arrays = ckpt.server_round, ckpt.arrays
        ledger, state = PrivacyLedger.from_dict(ckpt.ledger), ckpt.strategy_state
        public_source = ckpt.public_source
        log.info("resuming after round %d from %s", done, checkpoint_dir)
    elif cfg.federation.initial_model:
        arrays, public_source = initial_model(cfg)
    else:
        torch.manual_seed(cfg.train.seed)
        nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
        steps = cfg.train.public_warm_start_steps
        if steps > 0:  # public data only: costs no site any privacy
            warm = warm_start_report_decoder(
                nets,
                cfg.model,
                steps,
                cfg.train.seed,
                smoothing=cfg.train.report_label_smoothing,
            )
            log.info(
                "public warm start of the report decoder: %d steps in %.1f s, "
                "report loss %.3f -> %.3f",
                steps,
                warm["seconds"],
                warm["first_loss"],
                warm["last_loss"],
            )
        arrays = get_weights(nets)
    cfg = with_site_findings(cfg, public_source.get("unshown_findings", ()))
    if cfg.train.dp_trainable == "label-words":
        log.info("the sites train the label layers of: %s", cfg.train.site_findings or "all")
    strategy = make_strategy(cfg, checkpoint_dir, ledger, done, public_source)
    strategy.restore_state(state)
    if done:  # resumed: the checkpoint's model is the run's until a new round replaces it
        strategy.final_arrays = arrays
    remaining = cfg.federation.rounds - done
    if remaining > 0:
        strategy.start(
            grid=grid,
            initial_arrays=to_array_record(arrays),
            num_rounds=remaining,
            timeout=cfg.federation.round_timeout,
            train_config=ConfigRecord(cfg.to_run_config()),
        )
    else:
        log.info("all %d rounds are already done; the sites sign its model", cfg.federation.rounds)
    strategy.commit(grid)


def initial_model(cfg: EmixerConfig) -> tuple[dict, dict]:
    """The arrays and public source of `federation.initial_model` (a pretrained checkpoint).

    Refused with a ValueError naming the file when it cannot be read, has already been trained
    on site data (a ledger: its privacy cost would go unrecorded in this run), is not the model
    its public pretraining record names (trained since, ledger stripped), or does not fit the
    run's model config.
    """
    path = Path(cfg.federation.initial_model)
    try:
        start = load_checkpoint(path)
    except CheckpointError as err:
        raise ValueError(f"federation.initial_model: {err}") from None
    if start.ledger.get("sites"):
        raise ValueError(
            f"federation.initial_model {path} was trained on site data (it has a privacy "
            "ledger); start from a public checkpoint (`emixer pretrain`) or resume its own run"
        )
    if start.public_source.get("model_sha256") != arrays_sha256(start.arrays):
        raise ValueError(
            f"federation.initial_model {path} is not the model its public pretraining record "
            "names (trained since, or made without one): a checkpoint trained on sites cannot "
            "pass as pretrained. Make the starting model with `emixer pretrain`"
        )
    try:
        set_weights(build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS)), start.arrays)
    except ValueError as err:
        raise ValueError(f"federation.initial_model {path} does not fit model: {err}") from None
    log.info("starting from %s (public source %s)", path, start.public_source or "none")
    return start.arrays, start.public_source


def make_server_app(cfg: EmixerConfig) -> ServerApp:
    """A ServerApp bound to `cfg` (simulation: Flower's Python API passes no run config)."""
    bound = ServerApp()

    @bound.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, cfg)

    return bound


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run` / deployment: the run config comes from pyproject.toml and --run-config."""
    serve(grid, EmixerConfig.from_run_config(dict(context.run_config)))
