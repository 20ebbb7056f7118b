"""`emixer site --config site.yaml`: a hospital's authenticated SuperNode (or `--check` it)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from emixer_cli.common import EXIT_USAGE, console

if TYPE_CHECKING:
    from client.daemon import SiteSettings


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "site",
        help="hospital: run this site's authenticated SuperNode (or --check its setup)",
        description="Connect this site to the coordinator's SuperLink over TLS with the site's "
        "enrolled key and serve federated rounds on the data folder in site.yaml. Runtime "
        "dependency installation stays off and the site refuses app versions other than "
        "approved_app_hash. Start and stop go to the site's audit log. See deploy/site.yaml.",
    )
    p.add_argument("--config", required=True, help="site.yaml (see deploy/site.yaml)")
    p.add_argument(
        "--check",
        action="store_true",
        help="only validate the config, report on the data folder and compare the app hash",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from client.daemon import load_site_settings, run_site

    settings = load_site_settings(args.config)
    return check_site(settings) if args.check else run_site(settings)


def check_site(settings: SiteSettings, resolution: int = 64) -> int:
    """`--check`: the data folder report and the app pin, without connecting anywhere."""
    from emixer_model.data.check import check_folder
    from emixer_model.shared import app_hash

    report = check_folder(settings.data_path, resolution=resolution)
    report.render(console)
    running = app_hash()
    if settings.approved_app_hash is None:
        console.print(f"app hash {running}: no approved_app_hash pinned, any version will run")
    elif settings.approved_app_hash == running:
        console.print(f"app hash {running}: matches approved_app_hash")
    else:
        console.print(
            f"[red]app hash {running} differs from approved_app_hash "
            f"{settings.approved_app_hash}[/red]: review this version, then update site.yaml"
        )
        return EXIT_USAGE
    return 0 if report.usable else EXIT_USAGE
