"""`emixer phantoms`: deterministic phantom hospital folders, their public-style control, or one
public collection."""

from __future__ import annotations

import argparse
from pathlib import Path

from emixer_cli.common import CommandError, console


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "phantoms",
        help="write phantom hospital site folders (fake chest X-ray DICOMs + reports)",
        description="Write deterministic phantom hospital folders: studies.csv, DICOM images with "
        "visible label-specific findings, reports, and unlabeled scans. No real patient data. "
        "The sites know things the public collection does not: sites 1 and 2 see "
        "Pneumoperitoneum, site 2 words cardiomegaly its own way, site 3 draws pleural effusions "
        "its own way (docs/PHANTOM_WORLD.md).",
    )
    p.add_argument("--out", required=True, help="folder to write site_1 ... site_N into")
    p.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    p.add_argument("--per-site", type=int, default=100, help="labeled studies per site (100)")
    p.add_argument("--unlabeled", type=int, default=20, help="unlabeled scans per site (20)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same files (0)")
    p.add_argument("--size", type=int, default=256, help="nominal image side in pixels (256)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--public",
        action="store_true",
        help="write one public phantom collection into --out instead (another look and label "
        "mix, PNG and DICOM, some reports missing; --per-site studies; for `emixer pretrain`)",
    )
    kind.add_argument(
        "--pseudo-sites",
        action="store_true",
        help="write the control instead: the same sites, patients and label mixes drawn and "
        "written in the public style, with nothing only the sites know (train on them to see "
        "what more steps alone give)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emixer_model.data.phantoms import (
        write_phantom_sites,
        write_pseudo_sites,
        write_public_collection,
    )

    try:
        if args.public:
            written = [
                write_public_collection(
                    Path(args.out), n=args.per_site, seed=args.seed, size=args.size
                )
            ]
        else:
            write = write_pseudo_sites if args.pseudo_sites else write_phantom_sites
            written = write(
                Path(args.out),
                sites=args.sites,
                per_site=args.per_site,
                unlabeled=args.unlabeled,
                seed=args.seed,
                size=args.size,
            )
    except ValueError as err:
        raise CommandError(str(err)) from None
    for folder in written:
        console.print(f"wrote {folder}")
    return 0
