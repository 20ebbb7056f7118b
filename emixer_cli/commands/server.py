"""`emixer server --config server.yaml`: the coordinator's TLS SuperLink and the federated run."""

from __future__ import annotations

import argparse
from dataclasses import replace

from emixer_cli.common import EXIT_FAILED


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "server",
        help="coordinator: run the TLS SuperLink, enrol the sites' keys and run the federation",
        description="Start Flower's SuperLink with TLS and SuperNode authentication (runtime "
        "dependency installation off), enrol the public key of every site in server.yaml, "
        "submit the EMIXER run with the config's `run` section, stream its logs, and stop the "
        "SuperLink when the run ends or on Ctrl-C. One server per state dir: a second one exits "
        "2 naming the first; processes a crashed predecessor left running (SuperLink, "
        "ServerApp) are stopped and named first; a listen.port held by any other process is "
        "refused, naming it. A round with fewer usable updates than run.federation.min_sites "
        "leaves the model as it was. Exit 0 when the run completed, 1 when it failed, 2 for a "
        "config or launch problem. See deploy/server.yaml.",
    )
    p.add_argument("--config", required=True, help="server.yaml (see deploy/server.yaml)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in the state dir instead of starting afresh",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from server.tools.launch import load_server_settings, run_server

    settings = load_server_settings(args.config)
    if args.resume:
        settings = replace(settings, resume=True)
    return 0 if run_server(settings) else EXIT_FAILED
