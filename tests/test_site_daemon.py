"""What `emixer site` tells the site engineer when flower-supernode stops (issue 18, point 2).

Flower 1.42 logs "Exit Code: 305" but ends the process with status 1 for every error
(flwr/supercore/exit/exit.py `flwr_exit`), and the SuperLink answers a key it never enrolled and a
node it still counts as online with the same "Failed to activate SuperNode". The daemon reads the
code from the SuperNode's log, retries a refused activation while the SuperLink may still hold a
crashed predecessor's session, and then says both possible causes. A stand-in flower-supernode
prints Flower's own exit text, so these tests need no SuperLink.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import pytest

import client.daemon as daemon
from client.daemon import flower_exit, load_site_settings, run_site
from tests.test_daemon_guard import write_site_yaml

# flwr_exit's text for ExitCode.SUPERNODE_CONNECTION_ERROR after a 412 FLEET_NODE_ACTIVATION_FAILED
REFUSED = (
    "\x1b[91mERROR \x1b[0m:     Exit Code: 305\nFailed to initialize the connection to the "
    "SuperLink.\n[code: 2004] Failed to activate SuperNode.\nThe SuperNode could not establish a "
    "connection to the SuperLink.\n\nFor more information, visit: "
    "<https://flower.ai/docs/framework/ref-exit-codes/305.html>\n"
)


def fake_supernode(folder: Path, script: str) -> None:
    """A flower-supernode stand-in that counts its starts in `runs` and runs `script` (sh)."""
    folder.mkdir()
    path = folder / "flower-supernode"
    path.write_text(f'#!/bin/sh\necho x >> "{folder}/runs"\n{script}\n')
    path.chmod(0o755)


def starts(folder: Path) -> int:
    return len((folder / "runs").read_text().splitlines())


def test_flowers_exit_code_is_read_from_its_log_not_the_status() -> None:
    assert flower_exit(["starting\n", *REFUSED.splitlines(keepends=True)]) == (
        305,
        "Failed to initialize the connection to the SuperLink. [code: 2004] Failed to activate "
        "SuperNode. The SuperNode could not establish a connection to the SuperLink.",
    )
    assert flower_exit(["a plain crash\n"]) is None


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(daemon, "RETRY_EVERY", 0.1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return bin_dir, load_site_settings(write_site_yaml(tmp_path, f"runtime_port: {port}\n"))


def test_a_refused_activation_is_retried_until_the_superlink_frees_the_dead_session(
    site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bin_dir, settings = site
    refused_twice = (
        f'[ $(wc -l < "{bin_dir}/runs") -le 2 ] && {{ printf "%s" "$REFUSED"; exit 1; }}'
    )
    monkeypatch.setenv("REFUSED", REFUSED)
    fake_supernode(bin_dir, refused_twice + "\necho connected\nexit 0")
    with caplog.at_level(logging.WARNING, "emixer.site"):
        assert run_site(settings) == 0
    assert starts(bin_dir) == 3
    assert "frees it within 60 s of its last heartbeat. Retrying" in caplog.text
    events = (settings.state_dir / "audit.log").read_text()
    assert '"event": "daemon-start"' in events and '"exit": 0' in events


def test_a_refusal_that_lasts_names_both_causes(
    site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bin_dir, settings = site
    monkeypatch.setattr(daemon, "ACTIVATION_WAIT", 0.3)
    monkeypatch.setenv("REFUSED", REFUSED)
    fake_supernode(bin_dir, 'printf "%s" "$REFUSED"; exit 1')
    with caplog.at_level(logging.WARNING, "emixer.site"):
        assert run_site(settings) == 1
    assert starts(bin_dir) >= 2
    error = caplog.records[-1].getMessage()
    assert "refused to activate this site's SuperNode (Flower exit code 305" in error
    assert "has not enrolled this site's public key" in error and "site.key" in error
    assert "still counts this site's previous SuperNode as online" in error


def test_any_other_flower_exit_is_reported_by_its_code_without_retrying(
    site, caplog: pytest.LogCaptureFixture
) -> None:
    bin_dir, settings = site
    # like flower-superexec: a child sharing the SuperNode's output that waits for its pid to go
    superexec = "( while kill -0 $$ 2>/dev/null; do sleep 0.2; done ) &"
    exit_606 = 'echo "Exit Code: 606"; echo "Runtime version incompatible."; exit 1'
    fake_supernode(bin_dir, f"{superexec}\n{exit_606}")
    begun = time.monotonic()
    with caplog.at_level(logging.WARNING, "emixer.site"):
        assert run_site(settings) == 1
    assert time.monotonic() - begun < 10, "the daemon waited for the SuperNode's child"
    assert starts(bin_dir) == 1
    assert caplog.records[-1].getMessage() == (
        "flower-supernode stopped with Flower exit code 606: Runtime version incompatible."
    )
