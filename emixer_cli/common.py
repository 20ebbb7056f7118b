"""What every command shares: the console, progress bars, the error type and exit codes, the run
config a `--config` names, and where a site's state lives when `--state-dir` is not given."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from emixer_model.config import EmixerConfig, load_config
from emixer_model.shared import ProgressFn, UserError

# Piped (a log file, CI, systemd, `| tee`) rich assumes 80 columns, and a wide table such as the
# evaluation's then wraps its cells, numbers mid-way. A log has no screen to fit: its lines may be
# as long as the tables need. An explicit COLUMNS still wins.
PIPED_WIDTH = 160


def new_console() -> Console:
    """A rich console at the terminal's width, or PIPED_WIDTH when stdout is no terminal."""
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=PIPED_WIDTH if piped else None)


console = new_console()
EXIT_FAILED = 1  # the work ran and failed (a federated run that did not complete)
EXIT_USAGE = 2  # a problem the user can fix: bad input, a refusal, an unusable folder
EXIT_UNVERIFIED = 3  # a release checked only against keys its own ledger carries
EXIT_INTERRUPTED = 130  # Ctrl-C or a systemd stop, as a shell reports SIGINT

# Without the sites' own keys a ledger proves only that whoever wrote it holds some keys: the
# coordinator could have re-signed every entry (docs/PRIVACY.md threat (d)).
UNVERIFIED = (
    "[red]UNVERIFIED[/red]: no --site-keys, so the signatures could be checked only against "
    "the keys the ledger itself carries, which whoever wrote it chose. Pass --site-keys KEYS "
    "(the .pub files the sites sent at enrolment), or --trust-manifest-keys to accept the "
    "ledger's own keys"
)


class CommandError(UserError):
    """A problem with a command's arguments the user can fix; printed as one line, exit 2."""


def add_site_key_arguments(parser: argparse.ArgumentParser) -> None:
    """`--site-keys` or `--trust-manifest-keys`, one of which `release` and `verify-release`
    need to give a verdict."""
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument(
        "--site-keys",
        nargs="+",
        metavar="PUB",
        help="the enrolled sites' public keys (SITE.pub files or a folder of them): every "
        "signed ledger entry must verify against its site's key, and every site must appear",
    )
    keys.add_argument(
        "--trust-manifest-keys",
        action="store_true",
        help="check the signatures against the keys the ledger itself carries (a rehearsal, or "
        "a reader without the sites' keys); the verdict then says so",
    )


def site_keys(args: argparse.Namespace) -> dict[str, str] | None:
    """The enrolled keys `--site-keys` names; None means the ledger's own keys are taken."""
    from server.tools.release import read_public_keys

    return read_public_keys([Path(p) for p in args.site_keys]) if args.site_keys else None


@contextmanager
def messages_to_stderr() -> Iterator[None]:
    """While a command prints JSON on stdout, its log lines and messages go to stderr, so
    `emixer ... --json | jq` always reads valid JSON."""
    console.stderr = True
    try:
        yield
    finally:
        console.stderr = False


@contextmanager
def progress_bars(*labels: str) -> Iterator[list[ProgressFn]]:
    """One rich live display with a bar per label; yields an update(done, total, losses=None)
    per bar (rich shows one live display at a time, so stages share it). The display appears
    at the first update, so work that fails before it starts prints its error alone."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    )
    progress = Progress(*columns, console=console, transient=False)

    def updater(label: str) -> ProgressFn:
        task = progress.add_task(label, total=None, info="", start=False)

        def update(done: int, total: int, losses: Mapping[str, float] | None = None) -> None:
            if not progress.live.is_started:
                progress.start()
            info = "  ".join(f"{k} {v:.3f}" for k, v in (losses or {}).items())
            progress.start_task(task)
            progress.update(task, completed=done, total=total, info=info)

        return update

    try:
        yield [updater(label) for label in labels]
    finally:
        if progress.live.is_started:
            progress.stop()


@contextmanager
def progress_bar(label: str) -> Iterator[ProgressFn]:
    """A single rich progress bar; yields update(done, total, losses=None)."""
    with progress_bars(label) as (update,):
        yield update


def default_state_dir(site_dir: Path) -> Path:
    """A site's state lives outside its data folder (docs/DESIGN.md section 6)."""
    resolved = site_dir.resolve()
    tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    return Path.home() / ".emixer" / "state" / f"{resolved.name}-{tag}"


def state_dir(args: argparse.Namespace, site_dir: Path) -> Path:
    """`--state-dir` when given, else the site's default state dir."""
    return Path(args.state_dir) if args.state_dir else default_state_dir(site_dir)


def command_config(args: argparse.Namespace) -> EmixerConfig:
    """The config file a command's `--config` names, or the defaults."""
    return load_config(getattr(args, "config", None))


CONFIG_HELP = "YAML config (model/privacy/train/federation sections)"
