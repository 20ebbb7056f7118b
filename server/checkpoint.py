"""Server checkpoints: global arrays, round, strategy state and privacy ledger, every round.

One file per round, written atomically (temp file + rename), so a crash mid-write never replaces a
good checkpoint; `latest` returns the newest one that loads, skipping a damaged newest file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from emixer_model.shared import UserError

log = logging.getLogger("emixer.server")

FORMAT = 1


@dataclass
class Checkpoint:
    server_round: int
    arrays: dict[str, np.ndarray]
    ledger: dict
    config: dict
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # what the model learned without privacy before round 1 (`emixer pretrain`): the public
    # collection's name, content hash and steps; {} when training started from scratch
    public_source: dict = field(default_factory=dict)
    path: Path | None = None  # the file it was loaded from (not stored in the file)


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def _arrays(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in tensors.items()}


def save_checkpoint(directory: Path, ckpt: Checkpoint) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"round-{ckpt.server_round:04d}.pt"
    payload = {
        "format": FORMAT,
        "round": ckpt.server_round,
        "arrays": _tensors(ckpt.arrays),
        "strategy_state": {k: _tensors(v) for k, v in ckpt.strategy_state.items()},
        "ledger": json.dumps(ckpt.ledger),
        "config": json.dumps(ckpt.config),
        "public_source": json.dumps(ckpt.public_source),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, damaged or not one of ours."""


def load_checkpoint(path: Path) -> Checkpoint:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an EMIXER-FL checkpoint (format {FORMAT})")
        return Checkpoint(
            server_round=int(payload["round"]),
            arrays=_arrays(payload["arrays"]),
            ledger=json.loads(payload["ledger"]),
            config=json.loads(payload["config"]),
            strategy_state={k: _arrays(v) for k, v in payload["strategy_state"].items()},
            public_source=json.loads(payload.get("public_source", "{}")),
            path=path,
        )
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # torch/pickle raise many kinds for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from None


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest checkpoint in `directory` that loads; damaged ones are skipped with a warning."""
    for path in sorted(directory.glob("round-*.pt"), reverse=True):
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint: %s", err)
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
