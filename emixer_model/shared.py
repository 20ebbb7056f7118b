"""Small pieces both sides of a deployment use, kept in one place so they cannot drift apart.

The site daemon, the ClientApp, the coordinator's tools and the command line all import these:
the base of every error a user can fix, the progress callback every long loop takes, atomic JSON
writes (a file is the old one or the new
one, never half of either), the hash of the app's code a site pins, and stopping a child process
group on Ctrl-C or a systemd stop.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

# The packages a site runs (and `emixer server` ships in the app bundle); their source is what a
# site approves by hash. The command line is not among them: it never runs inside a round.
APP_PACKAGES = ("client", "emixer_model", "server")
STOP_TIMEOUT = 15.0  # seconds a child process group gets between SIGTERM and SIGKILL


class UserError(Exception):
    """A problem the person running a command can fix (a bad config, folder, checkpoint or
    release); the command line prints its message as one line and exits 2, never a traceback."""


class ProgressFn(Protocol):
    """Called as work advances: `done` of `total` units, with the latest mean losses where the
    work is training (loaders and the release call it without them)."""

    def __call__(
        self, done: int, total: int, losses: Mapping[str, float] | None = None
    ) -> None: ...


def write_json_atomic(
    path: Path, data: Any, *, indent: int | None = 2, fsync: bool = False
) -> Path:
    """Write `data` as JSON through a temporary file and a rename; with `fsync` the bytes are on
    disk before the rename (state a crash must not lose: the accountant, the privacy plan)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def app_root() -> Path:
    """The folder holding the app's packages: the repository (editable install) or
    site-packages."""
    return Path(__file__).resolve().parent.parent


def app_hash(root: Path | None = None) -> str:
    """sha256 over the app packages' Python sources and shipped data files, in a stable order."""
    root = root or app_root()
    digest = hashlib.sha256()
    for package in APP_PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                digest.update(path.relative_to(root).as_posix().encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (systemd stop) like Ctrl-C so child processes are stopped and logged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_process_group(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
