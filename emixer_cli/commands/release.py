"""`emixer release`: synthetic image-report sets from a trained model, behind the privacy gate."""

from __future__ import annotations

import argparse
from pathlib import Path

from emixer_cli.common import (
    EXIT_UNVERIFIED,
    UNVERIFIED,
    add_site_key_arguments,
    console,
    progress_bar,
    site_keys,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "release",
        help="synthetic image-report sets from a trained model, behind the privacy gate",
        description="Sample image-report pairs conditioned on each finding (and common "
        "combinations) and write DICOM Secondary Capture images, optional PNGs, reports.jsonl, "
        "manifest.json (model hash, config, every site's privacy history) and index.html. "
        "Refuses (exit 2, nothing written) a model whose signed privacy ledger is missing, does "
        "not verify, leaves an aggregated round uncovered, or is over budget once recomputed. "
        "Without --site-keys (or --trust-manifest-keys) it says UNVERIFIED, writes nothing and "
        "exits 3.",
    )
    p.add_argument("--model", required=True, help="checkpoint file (checkpoints/round-NNNN.pt)")
    p.add_argument("--out", required=True, help="new folder for the release")
    p.add_argument("--per-label", type=int, default=50, help="pairs per label condition (50)")
    p.add_argument(
        "--labels",
        help='conditions, comma-separated, + joins findings: "Cardiomegaly,Edema+Pleural '
        'Effusion" (default: every single finding and common combinations)',
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--format", default="dicom,png", help="dicom or dicom,png (dicom,png)")
    p.add_argument(
        "--epsilon-budget",
        type=float,
        default=None,
        help="refuse when any site's epsilon is above this (default: each site's own budget)",
    )
    add_site_key_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from server.tools.release import parse_conditions, release

    if not (args.site_keys or args.trust_manifest_keys):
        console.print(f"{UNVERIFIED}; nothing was released")
        return EXIT_UNVERIFIED
    enrolled = site_keys(args)
    with progress_bar("synthesizing") as update:
        summary = release(
            Path(args.model),
            Path(args.out),
            per_label=args.per_label,
            conditions=parse_conditions(args.labels),
            seed=args.seed,
            formats=tuple(f.strip() for f in args.format.split(",") if f.strip()),
            budget=args.epsilon_budget,
            progress=update,
            enrolled=enrolled,
        )
    keys = (
        "the enrolled keys" if enrolled else "the keys the ledger carries (--trust-manifest-keys)"
    )
    console.print(
        f"released {summary.count} synthetic image-report pairs to {summary.out} "
        f"(release epsilon {summary.release_epsilon:.3f}, signatures checked against {keys}); "
        f"open {summary.out / 'index.html'}"
    )
    return 0
