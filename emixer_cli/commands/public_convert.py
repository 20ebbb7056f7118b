"""`emixer public convert-nih`: NIH ChestX-ray14 as a public pretraining collection."""

from __future__ import annotations

import argparse
from pathlib import Path

from emixer_cli.common import console


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    public = subparsers.add_parser("public", help="build public pretraining collections")
    sub = public.add_subparsers(dest="public_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser(
        "convert-nih",
        help="NIH ChestX-ray14 (Data_Entry_2017.csv + PNGs) -> a public collection folder",
        description="Write a public collection (studies.csv with our finding columns, images/, "
        "source.json) from NIH ChestX-ray14. Labels only: reports are left empty. Effusion -> "
        "Pleural Effusion, Nodule/Mass -> Lung Lesion; Cardiomegaly, Consolidation, Pneumothorax, "
        "Edema, No Finding as named; other NIH findings are ignored; Support Devices and "
        "Pneumoperitoneum (no NIH labels) stay blank. Images are hard-linked when "
        "possible, else copied. See docs/PUBLIC_DATA.md.",
    )
    p.add_argument("--csv", required=True, help="Data_Entry_2017.csv")
    p.add_argument("--images", required=True, help="folder holding the PNGs (searched below)")
    p.add_argument("--out", required=True, help="new folder to write the collection into")
    p.add_argument("--limit", type=int, default=None, help="convert at most N rows (all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emixer_model.data.public_convert import convert_nih

    result = convert_nih(Path(args.csv), Path(args.images), Path(args.out), limit=args.limit)
    for line, reason, detail in result.skipped[:10]:
        console.print(f"skipped line {line}: {reason}: {detail}")
    if len(result.skipped) > 10:
        console.print(f"... and {len(result.skipped) - 10} more skipped rows")
    console.print(
        f"wrote {result.written} studies to {result.out} ({result.linked} images hard-linked, "
        f"{result.written - result.linked} copied; {len(result.skipped)} rows skipped)"
    )
    return 0
