"""`emixer data check DIR`: what in a folder is usable, what is skipped and why."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from emixer_cli.common import EXIT_USAGE, CommandError, console


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="inspect site data")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser(
        "check",
        help="what in a folder is usable, what is skipped and why",
        description="Scan a site folder (studies.csv + unlabeled/) or any folder of DICOM files. "
        "Prints files accepted and skipped by reason and label counts. Exit 0 when at least one "
        "file is usable, 2 otherwise. Nothing is written.",
    )
    p.add_argument("dir", help="site folder or folder of DICOM files")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--resolution", type=int, default=64, help="decode size to test (64)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emixer_model.data.check import check_folder

    folder = Path(args.dir)
    if not folder.exists():
        raise CommandError(f"{folder} does not exist")
    report = check_folder(folder, resolution=args.resolution)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        report.render(console)
    return 0 if report.usable else EXIT_USAGE
