"""One daemon per state dir, and nothing a daemon started outlives it.

`emixer server` and `emixer site` start Flower processes that start their own children, some in
new sessions (flower-superlink runs flower-superexec detached, which runs the ServerApp), so
killing a daemon's process group leaves them running. An orphan SuperLink then answers the next
daemon's port, takes its runs, and sites train twice (issue 18). Three guards:

- a lock (`flock`) on `<state_dir>/daemon.lock`, held while the daemon runs and released by the
  kernel however it dies: a second daemon on the same state dir is refused, naming the first;
- every process a daemon starts carries `EMIXER_STATE_DIR=<state_dir>` in its environment, which
  Flower's children inherit: the next daemon (and the daemon's own stop) finds them all in /proc,
  whatever session they moved to, and stops them;
- the daemon's direct child gets SIGTERM from the kernel when the daemon dies (even by SIGKILL),
  and Flower's own children follow their parent (`--parent-pid`).

Finding marked processes reads /proc, so it works on Linux (where sites and coordinators run);
elsewhere the lock still holds and the scan finds nothing.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from emixer_model.shared import UserError

LOCK_NAME = "daemon.lock"
MARKER = "EMIXER_STATE_DIR"  # environment key every process a daemon starts carries
STOP_GRACE = 10.0  # seconds leftover processes get between SIGTERM and SIGKILL
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StateDirBusy(UserError):
    """Another daemon holds this state dir, or processes it started cannot be stopped."""


def process_marker(state_dir: Path) -> dict[str, str]:
    """The environment entry that marks a process as started for `state_dir`."""
    return {MARKER: str(Path(state_dir).resolve())}


def marked_processes(state_dir: Path) -> dict[int, str]:
    """pid -> command line of every live process carrying `state_dir`'s marker (not this one)."""
    needle = "=".join(process_marker(state_dir).popitem()).encode()
    found: dict[int, str] = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if is_alive(int(entry.name)):
            found[int(entry.name)] = command.strip()
    return found


def is_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop_pids(pids: list[int], grace: float = STOP_GRACE) -> list[int]:
    """SIGTERM `pids`, SIGKILL those still running after `grace` seconds; the ones that survive."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while (pids := [p for p in pids if is_alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not pids:
            return []
    return pids


def describe(processes: dict[int, str]) -> str:
    return "; ".join(f"pid {pid}: {command[:120]}" for pid, command in processes.items())


def stop_marked(state_dir: Path) -> dict[int, str]:
    """Stop every process marked for `state_dir`; pid -> command line of those that survive."""
    found = marked_processes(state_dir)
    survivors = stop_pids(list(found))
    return {pid: found[pid] for pid in survivors}


@contextmanager
def hold_state_dir(state_dir: Path, role: str, echo: Callable[[str], None]) -> Iterator[None]:
    """Run as the one `emixer ROLE` daemon of `state_dir`: refuse if another holds it, stop
    what a dead predecessor left running, and on exit stop everything this daemon started."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    lock_path = state_dir / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = lock_path.read_text().strip() or "another daemon"
        raise StateDirBusy(
            f"state dir {state_dir} is in use by {holder}. Two daemons on one state dir would "
            "both serve rounds (and spend privacy) for it: stop that one first (kill its pid, "
            "or `systemctl stop` its unit), or give this one a state_dir of its own"
        ) from None
    try:
        leftovers = marked_processes(state_dir)
        if leftovers:
            echo(
                f"stopping {len(leftovers)} process(es) that a previous daemon on {state_dir} "
                f"left running: {describe(leftovers)}"
            )
            survivors = {pid: leftovers[pid] for pid in stop_pids(list(leftovers))}
            if survivors:
                raise StateDirBusy(
                    f"processes a previous daemon on {state_dir} started are still running and "
                    f"could not be stopped: {describe(survivors)}; stop them (as their user or "
                    "root), then start again"
                )
        since = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"`emixer {role}` pid {os.getpid()} (since {since})\n".encode(), 0)
        yield
    finally:
        try:
            survivors = stop_marked(state_dir)
            if survivors:
                echo(f"could not stop: {describe(survivors)}")
        finally:
            os.close(fd)  # releases the lock


def port_holders(port: int) -> dict[int, str]:
    """pid -> command line of every process listening on TCP `port` (Linux /proc; {} elsewhere)."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir() if inodes else ():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found[int(entry.name)] = command.strip()
        except OSError:
            continue
    return found


def port_problem(host: str, port: int, what: str) -> str | None:
    """Why `what` cannot listen on host:port (naming who holds it), or None when it is free."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no holder
        try:
            probe.bind((host, port))
            return None
        except OSError as err:
            reason = err.strerror or str(err)
    holders = port_holders(port)
    who = f"it is held by {describe(holders)}" if holders else f"the system says: {reason}"
    return (
        f"{what} cannot listen on port {port}: {who}. If that is an earlier SuperLink or "
        "SuperNode of this deployment, stop it; otherwise choose another port"
    )


def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


PRCTL = _prctl()  # looked up in the daemon, so the forked child only makes the call


def die_with_parent() -> None:
    """`preexec_fn` for a daemon's child: the kernel sends it SIGTERM when the daemon dies, even
    by SIGKILL (Linux prctl; a no-op elsewhere)."""
    if PRCTL is not None:
        PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
