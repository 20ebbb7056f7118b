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
from pathlib import Path, PurePosixPath
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


def is_app_file(path: str) -> bool:
    """A file the app hash covers: a Python source or data file of an app package."""
    parts = PurePosixPath(path).parts
    return (
        len(parts) > 1
        and parts[0] in APP_PACKAGES
        and "__pycache__" not in parts
        and PurePosixPath(path).suffix in (".py", ".json")
    )


def files_hash(files: Mapping[str, bytes]) -> str:
    """sha256 over the app files (relative POSIX path -> bytes) in a stable order: the one
    definition of the app hash, of an installed app (`app_hash`) or of an app bundle the
    coordinator sends (client/app_gate.py)."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: PurePosixPath(p).parts):
        digest.update(path.encode())
        digest.update(files[path])
    return digest.hexdigest()


def app_hash(root: Path | None = None) -> str:
    """The hash of the app packages' Python sources and data files under `root` (this
    install by default): what `emixer app-hash` prints and a site pins."""
    root = root or app_root()
    files = {
        path.relative_to(root).as_posix(): path.read_bytes()
        for package in APP_PACKAGES
        for path in (root / package).rglob("*")
        if path.is_file() and is_app_file(path.relative_to(root).as_posix())
    }
    return files_hash(files)


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
