"""`emixer keygen`: a site's ECDSA key pair, made at the site (the private half never leaves)."""

from __future__ import annotations

import argparse
from pathlib import Path

from emixer_cli.common import CommandError, console


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "keygen",
        help="site: make this site's ECDSA key pair (the private key never leaves the site)",
        description="Write a new ECDSA P-256 key pair: OUT (private, OpenSSH format, mode 0600: "
        "site.yaml's private_key, used for node authentication and to sign the privacy ledger) "
        "and OUT with .pub (send only this one to the coordinator). Never overwrites.",
    )
    p.add_argument("--out", required=True, help="private key file, e.g. keys/hospital-a.key")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emixer_model.privacy.ledger import SiteKey

    path = Path(args.out)
    if path.exists():
        raise CommandError(f"{path} already exists; a site key is never overwritten")
    SiteKey.generate(path)
    pub = path.with_name(path.name.removesuffix(".key") + ".pub")
    console.print(f"wrote {path} (keep it at this site) and {pub} (send it to the coordinator)")
    return 0
