"""Public pretraining at the coordinator, to a round-0 checkpoint a federation starts from.

No site data is involved and nothing here is private: all four networks train on a public
collection (emixer_model.public_pretrain), and the checkpoint records the collection's name,
content hash and steps, which travel into every later checkpoint and the release manifest.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from emixer_model.config import EmixerConfig
from emixer_model.data.public import PublicData
from emixer_model.networks import get_weights
from emixer_model.privacy.ledger import arrays_sha256
from emixer_model.public_pretrain import pretrained_networks
from emixer_model.shared import ProgressFn
from server.checkpoint import Checkpoint, save_checkpoint


@dataclass
class PretrainedModel:
    """What `pretrain_checkpoint` wrote and from what."""

    path: Path
    collection: str
    studies: int
    skipped: int
    steps: int
    seconds: float
    unshown: tuple[str, ...]  # findings the collection never shows: the sites' to teach


def pretrain_checkpoint(
    public: PublicData,
    cfg: EmixerConfig,
    steps: int,
    warm_start: int,
    seed: int,
    out: Path,
    warm_progress: ProgressFn | None = None,
    progress: ProgressFn | None = None,
) -> PretrainedModel:
    """Pretrain G, E, R and D on a loaded public collection (`load_public`) WITHOUT privacy
    (after `warm_start` report-grammar steps) and write a round-0 checkpoint to `out`,
    atomically."""
    nets, result = pretrained_networks(
        public.images,
        public.labels,
        public.tokens,
        public.has_report,
        cfg,
        steps,
        warm_start,
        seed,
        warm_progress=warm_progress,
        progress=progress,
    )
    weights = get_weights(nets)
    source = {
        **public.source(),
        # the model itself: the sites sign the hash of the model they start from, so a release
        # that claims this start is checked against what they signed (docs/PRIVACY.md)
        "model_sha256": arrays_sha256(weights),
        "steps": steps,
        "report_warm_start_steps": warm_start,
        "unshown_findings": list(result["unshown"]),  # left for the sites to teach
        "privacy": "none: public data, no site data involved",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".pretrain-") as work:
        checkpoint = Checkpoint(
            server_round=0,
            arrays=weights,
            ledger={"sites": {}},
            config=cfg.to_dict(),
            public_source=source,
        )
        save_checkpoint(Path(work), checkpoint).replace(out)
    return PretrainedModel(
        out,
        public.name,
        len(public.images),
        len(public.skipped),
        steps,
        result["seconds"],
        tuple(result["unshown"]),
    )
