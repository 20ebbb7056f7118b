"""Bytes on the wire per site-round, and what sending fp16 instead of fp32 arrays would cost.

Sizes are those of the real Flower messages (the RecordDicts client/app.py and server/strategy.py
build, the model packed as one array by `to_wire_record`) serialized two ways:
flwr.common.serde.message_to_proto (one protobuf) and the sum of the deflated inflatable objects
flwr 1.42's transport actually pushes, one request each (message + records + array
chunks). The fp16 effect is measured by training one phantom site for a few rounds twice from the
same seed, once with the round's weights passed on as they are and once round-tripped through
float16 (what the site and the server would see if both sent fp16).

    python -m bench.wire_bytes [--rounds 2] [--studies 64] [--size 128]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.common.serde import message_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

import emixer_model.site_training as site_training
from bench.common import machine, print_table, ratio, write_phantoms
from emixer_model.config import FINDINGS, EmixerConfig
from emixer_model.networks import build_networks, get_weights
from emixer_model.records import to_array_record, to_wire_record
from emixer_model.text.vocabulary import VOCAB_SIZE


def _metadata(message_type: str, src: int, dst: int) -> Metadata:
    return Metadata(
        run_id=1,
        message_id="",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )


def message_bytes(message: Message) -> tuple[int, int, int]:
    """(protobuf bytes via flwr serde, bytes of all deflated objects the transport pushes, and
    how many objects: one request each)."""
    proto = len(message_to_proto(message).SerializeToString())
    nested = get_all_nested_objects(message).values()
    return proto, sum(len(obj.deflate()) for obj in nested), len(nested)


def round_messages(
    cfg: EmixerConfig, weights: dict[str, np.ndarray], metrics: dict[str, float]
) -> tuple[Message, Message]:
    """The server's train message and the site's reply, as server/strategy.py and client/app.py
    build them."""
    config = ConfigRecord({**cfg.to_run_config(), "server-round": 1})
    down = make_message(
        _metadata("train", 1, 2),
        RecordDict({"arrays": to_wire_record(weights), "config": config}),
    )
    up = make_message(
        _metadata("train", 2, 1),
        RecordDict(
            {
                "arrays": to_wire_record(weights),
                "metrics": MetricRecord(metrics),
                "site": ConfigRecord({"name": "site_1", "status": "trained", "message": ""}),
            }
        ),
    )
    return down, up


def fp16_roundtrip(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the receiver gets if the sender casts to float16 (and the receiver back to float32)."""
    return {k: v.astype(np.float16).astype(np.float32) for k, v in weights.items()}


def train_chain(
    site: Path, state: Path, cfg: EmixerConfig, rounds: int, fp16: bool
) -> tuple[list[float], dict[str, np.ndarray], dict[str, float]]:
    """Report loss per round for one site whose weights pass through fp16 (or not) every round.

    Both chains start from the same weights and use the same sampling and noise (the trainer's
    secret seed is fixed here, which voids the guarantee: acceptable for a benchmark only), so
    round 1 agrees exactly and later rounds differ only by the fp16 round trip.
    """
    torch.manual_seed(0)
    weights = get_weights(build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS)))
    losses, metrics = [], {}
    trainer = site_training.PrivateTrainer
    site_training.PrivateTrainer = functools.partial(trainer, secret_seed=0)
    try:
        for server_round in range(1, rounds + 1):
            torch.manual_seed(server_round)  # Gumbel noise of generated reports: global RNG
            result = site_training.train_site_round(site, state, cfg, weights, server_round, rounds)
            if result.weights is None:
                raise RuntimeError(f"the site did not train: {result.message}")
            losses.append(result.losses["report"])
            metrics = result.metrics()
            weights = fp16_roundtrip(result.weights) if fp16 else result.weights
    finally:
        site_training.PrivateTrainer = trainer
    return losses, result.weights, metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wire_bytes", description=__doc__)
    parser.add_argument("--rounds", type=int, default=2, help="local rounds per chain")
    parser.add_argument("--studies", type=int, default=64, help="labeled studies in the site")
    parser.add_argument("--size", type=int, default=128, help="phantom DICOM side in pixels")
    parser.add_argument("--noise", type=float, default=1.0, help="noise multiplier (fixed)")
    args = parser.parse_args(argv)

    cfg = EmixerConfig()
    cfg = replace(
        cfg,
        privacy=replace(cfg.privacy, noise_multiplier=args.noise, epsilon_budget=1e6),
        train=replace(cfg.train, device="cpu"),
    )
    with tempfile.TemporaryDirectory(prefix="bench-wire-") as tmp:
        root = Path(tmp)
        (site,) = write_phantoms(
            root / "sites",
            sites=1,
            per_site=args.studies,
            unlabeled=args.studies // 4,
            size=args.size,
        )
        loss32, weights, metrics = train_chain(site, root / "s32", cfg, args.rounds, fp16=False)
        loss16, _, _ = train_chain(site, root / "s16", cfg, args.rounds, fp16=True)

    raw32 = sum(v.nbytes for v in weights.values())
    half = {k: v.astype(np.float16) for k, v in weights.items()}
    rows = []
    for name, arrays in (("fp32", weights), ("fp16", half)):
        down, up = round_messages(cfg, arrays, metrics)
        for direction, message in (("server->site", down), ("site->server", up)):
            proto, objects, count = message_bytes(message)
            rows.append(
                [
                    f"{name} {direction}",
                    proto,
                    ratio(proto, raw32),
                    objects,
                    ratio(objects, raw32),
                    count,
                ]
            )
    per_name = make_message(
        _metadata("train", 2, 1), RecordDict({"arrays": to_array_record(weights)})
    )
    error = max(float(np.abs(v - fp16_roundtrip({k: v})[k]).max()) for k, v in weights.items())
    finite = all(np.isfinite(v).all() for v in half.values())
    print_table(
        f"wire_bytes: one site-round, default ModelConfig ({raw32 / 1e6:.2f} MB of fp32 arrays, "
        f"{len(weights)} arrays)",
        ["message", "serde bytes", "/ fp32 model", "transport bytes", "/ fp32 model", "objects"],
        rows,
        [
            f"report loss per round, fp32 weights: {', '.join(f'{v:.4f}' for v in loss32)}",
            f"report loss per round, fp16 round-trip: {', '.join(f'{v:.4f}' for v in loss16)} "
            f"(last-round difference {loss16[-1] - loss32[-1]:+.4f})",
            f"largest fp16 round-trip error of a weight: {error:.2e}; all finite in fp16: {finite}",
            "transport bytes = message + records + array chunks as flwr 1.42 pushes them "
            "(HTTP framing and TLS not included); objects = requests, one per object",
            f"the same model one array per weight (before packing): "
            f"{message_bytes(per_name)[2]} objects",
            f"{args.rounds} rounds, {args.studies} studies, noise {args.noise}; {machine()}",
        ],
    )


if __name__ == "__main__":
    main()
