"""`emixer phantoms`: deterministic phantom hospital folders (or one public collection)."""

from __future__ import annotations

import argparse
from pathlib import Path

from emixer_cli.common import CommandError, console


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "phantoms",
        help="write phantom hospital site folders (fake chest X-ray DICOMs + reports)",
        description="Write deterministic phantom hospital folders: studies.csv, DICOM images with "
        "visible label-specific findings, reports, and unlabeled scans. No real patient data.",
    )
    p.add_argument("--out", required=True, help="folder to write site_1 ... site_N into")
    p.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    p.add_argument("--per-site", type=int, default=100, help="labeled studies per site (100)")
    p.add_argument("--unlabeled", type=int, default=20, help="unlabeled scans per site (20)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same files (0)")
    p.add_argument("--size", type=int, default=256, help="nominal image side in pixels (256)")
    p.add_argument(
        "--public",
        action="store_true",
        help="write one public phantom collection into --out instead (another look and label "
        "mix, PNG and DICOM, some reports missing; --per-site studies; for `emixer pretrain`)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emixer_model.data.phantoms import write_phantom_sites, write_public_collection

    if args.public:
        try:
            out = write_public_collection(
                Path(args.out), n=args.per_site, seed=args.seed, size=args.size
            )
        except ValueError as err:
            raise CommandError(str(err)) from None
        console.print(f"wrote {out}")
        return 0
    sites = write_phantom_sites(
        Path(args.out),
        sites=args.sites,
        per_site=args.per_site,
        unlabeled=args.unlabeled,
        seed=args.seed,
        size=args.size,
    )
    for site in sites:
        console.print(f"wrote {site}")
    return 0
