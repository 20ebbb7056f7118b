"""One daemon per state dir, and nothing a daemon started outlives it (issue 18, point 2): a
second `emixer site` on a held state dir is refused naming the first; what a dead daemon left
running (in any session) is stopped by the next one; a daemon killed with SIGKILL takes its
child with it; a daemon's stop stops everything it started; a SuperLink whose port another
process answers is an error naming that process.

Every process here is started by pid and killed in a finally block."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emixer_cli.main import main
from emixer_model.daemon_guard import (
    StateDirBusy,
    hold_state_dir,
    is_alive,
    marked_processes,
    process_marker,
)
from emixer_model.shared import app_hash
from server.tools.launch import LaunchError, wait_until_listening

ROOT = Path(__file__).resolve().parent.parent


def python(code: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A Python child in its own session (as Flower starts its own), reading this checkout."""
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not is_alive(pid)


def kill(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def write_site_yaml(tmp_path: Path, extra: str = "") -> Path:
    """A site.yaml whose files exist; nothing here reaches a SuperLink."""
    from emixer_model.data.phantoms import write_phantom_sites

    [data] = write_phantom_sites(tmp_path / "data", sites=1, size=32, per_site=4, unlabeled=1)
    (tmp_path / "ca.crt").write_text("ca\n")
    (tmp_path / "site.key").write_text("key\n")
    config = tmp_path / "site.yaml"
    config.write_text(
        f"superlink: 127.0.0.1:9\nroot_certificate: ca.crt\nprivate_key: site.key\n"
        f"data_path: {data}\nstate_dir: state\nsite_name: a\nepsilon_budget: 4\n"
        f"approved_app_hash: {app_hash()}\n{extra}"
    )
    return config


HOLDER = """
import sys, time
from pathlib import Path
from emixer_model.daemon_guard import hold_state_dir
with hold_state_dir(Path(sys.argv[1]), "site", print):
    print("held", flush=True)
    time.sleep(300)
"""


def test_a_second_site_daemon_on_one_state_dir_is_refused_naming_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_site_yaml(tmp_path)
    state = tmp_path / "state"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLDER.replace("sys.argv[1]", repr(str(state)))],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "held"
        assert main(["site", "--config", str(config)]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert f"is in use by `emixer site` pid {first.pid}" in out
        assert "stop that one first" in out
    finally:
        kill(first)
    with hold_state_dir(state, "site", print):  # the kernel released the dead holder's lock
        assert f"pid {os.getpid()}" in (state / "daemon.lock").read_text()


def test_what_a_dead_daemon_left_running_is_stopped_by_the_next(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # an orphan as Flower leaves one: its own session, the marker inherited from the daemon
    orphan = python("import time; time.sleep(300)", process_marker(state))
    said: list[str] = []
    try:
        wait_marked(state, orphan.pid)
        with hold_state_dir(state, "server", said.append):
            assert orphan.poll() is not None
        assert f"pid {orphan.pid}" in said[0] and "left running" in said[0]
    finally:
        kill(orphan)


def wait_marked(state: Path, pid: int) -> None:
    """Wait until the child's exec is done and /proc shows its environment."""
    deadline = time.monotonic() + 10
    while pid not in marked_processes(state) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid in marked_processes(state)


DAEMON = """
import subprocess, sys, time
from emixer_model.daemon_guard import die_with_parent
child = subprocess.Popen(["sleep", "300"], start_new_session=True, preexec_fn=die_with_parent)
print(child.pid, flush=True)
time.sleep(300)
"""


def test_a_daemon_killed_by_sigkill_takes_its_child_with_it() -> None:
    daemon = python(DAEMON)
    try:
        assert daemon.stdout is not None
        child = int(daemon.stdout.readline())
        assert is_alive(child)
        os.killpg(daemon.pid, signal.SIGKILL)  # the daemon's group only: the child has its own
        daemon.wait()
        assert gone(child), "the child outlived its daemon"
    finally:
        kill(daemon)


def test_a_daemon_stop_stops_every_process_it_started(tmp_path: Path) -> None:
    state = tmp_path / "state"
    started: list[subprocess.Popen] = []
    try:
        with hold_state_dir(state, "site", print):
            started.append(python("import time; time.sleep(300)", process_marker(state)))
            wait_marked(state, started[0].pid)
        assert started[0].wait(timeout=5) is not None
        assert marked_processes(state) == {}
        with pytest.raises(StateDirBusy, match="in use by `emixer site`"):
            with hold_state_dir(state, "site", print), hold_state_dir(state, "site", print):
                pass
    finally:
        kill(*started)


def test_a_server_whose_port_is_held_refuses_to_start_and_names_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The orphan SuperLink of issue 18: the port answered, so a new run went to the orphan."""
    for name in ("ca.crt", "server.crt", "server.key", "a.pub"):
        (tmp_path / name).write_text("x\n")
    with socket.socket() as orphan:
        orphan.bind(("127.0.0.1", 0))
        orphan.listen()
        port = orphan.getsockname()[1]
        config = tmp_path / "server.yaml"
        config.write_text(
            f"listen: {{host: 127.0.0.1, port: {port}}}\n"
            "certificates: {ca: ca.crt, cert: server.crt, key: server.key}\n"
            "sites: [{name: a, public_key: a.pub}]\nstate_dir: state\n"
        )
        assert main(["server", "--config", str(config)]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert (
            f"flower-superlink cannot listen on port {port}: it is held by pid {os.getpid()}" in out
        )
        # and a SuperLink that started but is not the one answering is no start either
        impostor = subprocess.Popen(["sleep", "30"], start_new_session=True)
        try:
            with pytest.raises(
                LaunchError, match=f"answers, but not the flower-superlink .*{impostor.pid}"
            ):
                wait_until_listening(impostor, f"127.0.0.1:{port}", tmp_path / "none.log")
        finally:
            kill(impostor)
    assert not (tmp_path / "state" / "superlink.db").exists()


def test_a_site_whose_runtime_port_is_held_refuses_to_start_and_names_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An orphan SuperNode held the runtime port: 12 restarts failed without saying why."""
    with socket.socket() as orphan:
        orphan.bind(("127.0.0.1", 0))
        orphan.listen()
        port = orphan.getsockname()[1]
        config = write_site_yaml(tmp_path, f"runtime_port: {port}\n")
        assert main(["site", "--config", str(config)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert f"runtime API cannot listen on port {port}: it is held by pid {os.getpid()}" in out
    assert "runtime_port" in out
