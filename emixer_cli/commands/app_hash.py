"""`emixer app-hash`: the hash of this app's code, which a site pins as approved-app-hash."""

from __future__ import annotations

import argparse

from emixer_model.shared import app_hash


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "app-hash",
        help="print the hash of this app's code, to pin in a site's approved-app-hash",
        description="Print the sha256 of the installed app's code. A site puts it in site.yaml as "
        "approved-app-hash; the site daemon then refuses any other version.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(app_hash())
    return 0
