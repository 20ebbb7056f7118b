"""`emixer pretrain`: the coordinator pretrains all four networks on a PUBLIC collection."""

from __future__ import annotations

import argparse
from pathlib import Path

from emixer_cli.common import CommandError, command_config, console, progress_bar, progress_bars
from emixer_model.config import EmixerConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="coordinator: pretrain all four networks on a PUBLIC collection, no privacy",
        description="Train G, E, R and D without privacy on a public labeled chest X-ray "
        "collection in the site folder format (studies.csv; DICOM or PNG images; reports "
        "optional: missing ones are written from the labels by the public report grammar), "
        "after a warm start of the report decoder on the grammar. Writes a checkpoint that "
        "records the collection's name and content hash; start a federated run from it with "
        "federation.initial_model. Never point it at site data: nothing here is private.",
    )
    p.add_argument("--public", required=True, help="public collection folder (studies.csv)")
    p.add_argument("--out", required=True, help="checkpoint file to write (must not exist)")
    p.add_argument("--steps", type=int, default=600, help="pretraining steps (600)")
    p.add_argument(
        "--warm-start", type=int, default=150, help="report-grammar warm-start steps (150)"
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed (0)")
    p.add_argument("--config", help="YAML config (its model and train sections apply)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        raise CommandError(f"{out} exists; a pretrained model is never overwritten")
    pretrain_with_progress(
        Path(args.public), command_config(args), args.steps, args.warm_start, args.seed, out
    )
    console.print(f"wrote {out}; start a federation from it with federation.initial_model")
    return 0


def pretrain_with_progress(
    public_dir: Path, cfg: EmixerConfig, steps: int, warm_start: int, seed: int, out: Path
) -> Path:
    """server.tools.pretrain with a progress bar per stage and a one-line summary (also the
    demo's stage 2). The collection is read first, so a folder that is not one fails before
    the training bars appear."""
    from emixer_model.data.public import load_public
    from server.tools.pretrain import pretrain_checkpoint

    with progress_bar("decoding") as load_bar:
        public = load_public(public_dir, cfg.model, progress=load_bar)
    with progress_bars("report warm start", "pretraining") as (warm_bar, train_bar):
        model = pretrain_checkpoint(public, cfg, steps, warm_start, seed, out, warm_bar, train_bar)
    console.print(
        f"pretrained on {model.collection} ({model.studies} studies, {model.steps} steps, "
        f"{model.seconds:.0f} s); skipped {model.skipped} files"
    )
    if model.unshown:
        console.print(
            f"never shown in the collection, left for the sites to teach: "
            f"{', '.join(model.unshown)} (train.site_findings: unshown trains only these under "
            "train.dp_trainable: label-words)"
        )
    return model.path
