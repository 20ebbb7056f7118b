"""`emixer app-hash`: the hash of this app's code, which a site pins as approved_app_hash."""

from __future__ import annotations

import argparse

from emixer_model.shared import app_hash


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "app-hash",
        help="print the hash of this app's code, to pin in site.yaml's approved_app_hash",
        description="Print the sha256 of the installed app's code. A site puts it in site.yaml as "
        "approved_app_hash (required); the site then runs only app bundles from the coordinator "
        "whose code has this hash, checked before any of their code runs.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(app_hash())
    return 0
