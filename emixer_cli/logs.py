"""Every command reads like one tool: each log record takes exactly one path (screen or file)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from emixer_cli.common import console

LOG_FILE = "emixer.log"  # in a command's own folder: the demo's run folder, a site's state dir
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SCREEN = "emixer-libraries-on-screen"  # handler names, so a second main() call replaces them
_FILE = "emixer-log-file"


class _NotOurs(logging.Filter):
    """Records from other libraries (ours reach the screen through rich already)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("emixer")


def configure_logging(verbose: bool) -> None:
    """Make every command read like one tool: each log record takes exactly one path.

    Our own records ("emixer.*") go to the screen through rich. Every library's records (Flower,
    Ray, Opacus, pydicom, and Python warnings such as Ray's FutureWarnings) go to the command's
    log file once it opens one (`log_to_file`); until then only their warnings and errors show,
    and with --verbose everything shows, DEBUG included. Flower's own console handler and the
    root handler opacus installs when imported (`logging.basicConfig`) are removed, and Flower's
    records reach the root logger's handlers only: with both, every Flower line was printed
    twice, once coloured and once timestamped.
    """
    from flwr.common.logger import console_handler as flower_console
    from rich.logging import RichHandler

    logging.captureWarnings(True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        # opacus' basicConfig handler and ours from an earlier main(); test harness handlers stay
        if type(handler) is logging.StreamHandler or handler.get_name() in (_SCREEN, _FILE):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for chatty in ("PIL", "matplotlib"):  # per-chunk and font-cache DEBUG records nobody reads
        logging.getLogger(chatty).setLevel(logging.INFO)
    libraries = logging.StreamHandler(sys.stderr)
    libraries.set_name(_SCREEN)
    libraries.addFilter(_NotOurs())
    libraries.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    libraries.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.addHandler(libraries)
    flower = logging.getLogger("flwr")
    flower.removeHandler(flower_console)
    flower.propagate = True  # emixer_model/__init__.py turns it off for the app processes

    ours = logging.getLogger("emixer")
    if not ours.handlers:
        ours.addHandler(RichHandler(console=console, show_path=False, show_time=False))
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)


def log_to_file(path: Path) -> Path:
    """From now on every record (ours and the libraries') goes to `path`; without --verbose the
    libraries' records leave the screen entirely. Returns the path, for the command to print."""
    root = logging.getLogger()
    screen = next(h for h in root.handlers if h.get_name() == _SCREEN)
    verbose = screen.level <= logging.DEBUG
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.set_name(_FILE)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    for old in [h for h in root.handlers if h.get_name() == _FILE]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    if not verbose:
        screen.setLevel(logging.CRITICAL + 1)
    return path
