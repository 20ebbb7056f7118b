"""`emixer verify-release DIR`: a release's privacy, re-checked offline by anyone who holds it."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from emixer_cli.common import (
    EXIT_UNVERIFIED,
    UNVERIFIED,
    CommandError,
    add_site_key_arguments,
    console,
    site_keys,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify-release",
        help="check a release's privacy offline: signatures, recomputed epsilon, round coverage",
        description="Verify every ledger entry in DIR/manifest.json against the sites' public "
        "keys, recompute each site's epsilon with Opacus from its signed history, check that "
        "every aggregated round is covered and that the stated figures match. Prints each "
        "site's recomputed epsilon; exit 2 on any mismatch. Without --site-keys the verdict is "
        "UNVERIFIED and the exit code 3, unless --trust-manifest-keys accepts the manifest's "
        "own keys. A site adds --site-state to compare the release with the ledger it keeps "
        "itself: the one check that catches a coordinator leaving out the site's last rounds.",
    )
    p.add_argument("dir", help="release folder (holds manifest.json)")
    add_site_key_arguments(p)
    p.add_argument(
        "--site-state",
        metavar="STATE_DIR",
        help="a site's own state dir (site.yaml's state_dir): refuse when the release counts "
        "less epsilon for this site than it had spent, in any run, for the released model or a "
        "model the release's rounds started from",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emixer_model.privacy.state import read_site_ledger
    from server.tools.release import check_site_ledger, verify_release

    keys = site_keys(args)
    result = verify_release(Path(args.dir), keys)
    table = Table(title=f"verified release {args.dir}")
    for column in ("site", "signed entries", "epsilon (recomputed)", "delta", "accountant", "key"):
        table.add_column(column)
    for name, site in sorted(result["sites"].items()):
        table.add_row(
            name,
            str(len(site["signed"])),
            f"{site['epsilon']:.4f}",
            "never trained" if site["delta"] is None else f"{site['delta']:.2e}",
            f"{site['accountant']} (opacus {site['opacus']})",
            "enrolled" if keys else "as in the manifest",
        )
    console.print(table)
    checked = (
        f"every signature verifies, every aggregated round is covered; release epsilon "
        f"{result['release_epsilon']:.4f}"
    )
    if args.site_state:
        ledger = read_site_ledger(Path(args.site_state))
        if ledger is None:
            raise CommandError(
                f"{args.site_state} holds no ledger.jsonl: give this site's state dir (site.yaml's "
                "state_dir, or the --state-dir of train-local)"
            )
        own = check_site_ledger(Path(args.dir), ledger, result)
        if own["site"] is None:
            console.print(
                "this site never signed for the released model or any model its rounds started "
                "from: the release spends none of its budget"
            )
        else:
            late = f"; left out but counted by later entries: {', '.join(own['uncounted'])}"
            console.print(
                f"site {own['site']}: the release counts epsilon {own['epsilon_release']:.4f}; "
                f"this site's own ledger, across every run, had spent at most "
                f"{own['epsilon_own']:.4f} for the {own['models']} models of this release's "
                f"lineage it signed for{late if own['uncounted'] else ''}: nothing it signed is "
                "left out"
            )
    if keys:
        console.print(f"VERIFIED against the sites' enrolled keys: {checked}")
        return 0
    if args.trust_manifest_keys:
        console.print(
            f"verified against the keys taken from the manifest, not the sites' own: {checked}"
        )
        return 0
    console.print(f"{UNVERIFIED}. Against those keys: {checked}")
    return EXIT_UNVERIFIED
