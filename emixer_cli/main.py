"""The `emixer` entry point: one parser over every command, one way errors end a command.

Every command explains itself with --help. Errors a user can fix (bad config, bad folder, a site
over its budget: any `UserError`) print one clear line and exit 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import sys

from emixer_cli.commands import COMMANDS
from emixer_cli.common import EXIT_INTERRUPTED, EXIT_USAGE, console
from emixer_cli.logs import LOG_FILE, configure_logging
from emixer_model.shared import UserError


def build_parser() -> argparse.ArgumentParser:
    """The `emixer` parser: global flags, then each command module's own subparser."""
    parser = argparse.ArgumentParser(
        prog="emixer",
        description=(
            "EMIXER-FL: federated, differentially private chest X-ray image-report generation. "
            "Start with `emixer demo`; a hospital checks its folder with `emixer data check`."
        ),
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show other libraries' logs (Flower, Ray, Opacus, pydicom), DEBUG included; "
        f"without it they go to the command's {LOG_FILE}",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except UserError as err:
        console.print(f"[red]error:[/red] {err}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
