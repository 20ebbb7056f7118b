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
        "dependency installation stays off. approved_app_hash (what `emixer app-hash` prints "
        "on the install you reviewed) is required: every app bundle the coordinator sends is "
        "checked against it before any of its code runs, and a different one is refused. "
        "Start, stop and refusals go to the site's audit log. One daemon per state dir: a "
        "second one exits 2 naming the first, and processes a crashed predecessor left running "
        "are stopped (and named) before the SuperNode starts. When the SuperLink refuses to "
        "activate the node (Flower's exit code 305: key not enrolled, or a crashed "
        "predecessor's session not yet freed) it is retried for 90 s. Exit 0 when the "
        "SuperNode ends normally, 1 when it fails (the reason is logged), 2 for a config "
        "problem or a state dir or runtime_port in use, 130 when stopped. See deploy/site.yaml.",
    )
    p.add_argument("--config", required=True, help="site.yaml (see deploy/site.yaml)")
    p.add_argument(
        "--check",
        action="store_true",
        help="only validate the config, report on the data folder and check that this install "
        "is the approved app version (exit 2 if not)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from client.daemon import load_site_settings, run_site

    settings = load_site_settings(args.config)
    return check_site(settings) if args.check else run_site(settings)


def check_site(settings: SiteSettings, resolution: int = 64) -> int:
    """`--check`: the data folder report and the app pin, without connecting anywhere."""
    from client.app_gate import installed_app_problem
    from emixer_model.data.check import check_folder

    report = check_folder(settings.data_path, resolution=resolution)
    report.render(console)
    problem = installed_app_problem(settings.approved_app_hash)
    if problem is not None:
        console.print(f"[red]{problem}[/red]")
        return EXIT_USAGE
    console.print(
        f"app hash {settings.approved_app_hash}: this install is the approved version; the "
        "SuperNode runs only app bundles with this hash"
    )
    return 0 if report.usable else EXIT_USAGE
