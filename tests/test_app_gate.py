"""The site's app pin, checked outside the code it pins (#17 hole 1): the gate in front of
Flower's ClientApp process refuses a changed app bundle before any of its code is unpacked or run,
and the daemon puts that gate where Flower starts the ClientApp."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from client.app_gate import AppNotApproved, bundle_hash, checked_install
from client.daemon import SiteSettings, prepare_supernode
from emixer_cli.main import main
from emixer_model.config import EmixerConfig
from emixer_model.shared import app_hash
from server.tools.launch import stage_app


def staged_bundle(tmp_path: Path, name: str, change=None) -> bytes:
    """The app bundle `emixer server` ships (stage_app + Flower's own FAB builder), with
    `change(app_dir)` applied first: the coordinator's edit."""
    app = stage_app(tmp_path / name, EmixerConfig())
    if change is not None:
        change(app)
    return build_fab_from_disk(app)


def drop_the_privacy(app: Path) -> None:
    """The review's changed app: it trains without the site's policy (here: a marker line)."""
    path = app / "client" / "app.py"
    path.write_text(path.read_text() + "\nSKIPS_DP_AND_SIGNING = True\n")


def test_a_changed_app_bundle_is_refused_outside_the_app_before_it_runs(tmp_path: Path) -> None:
    approved, state = app_hash(), tmp_path / "state"
    installed: list[bytes] = []

    def flower_install(fab: bytes, *args: object, **kwargs: object) -> Path:
        installed.append(fab)  # stands in for Flower's install_from_fab: unpack, then import
        return tmp_path / "installed"

    install = checked_install(flower_install, approved, state)
    real = staged_bundle(tmp_path, "real")
    assert bundle_hash(real) == approved  # `emixer app-hash` of the install pins the bundle
    install(real)
    assert installed == [real]

    def with_extra_module(app: Path) -> None:  # shadows a library from the bundle's folder
        (app / "opacus").mkdir()
        (app / "opacus" / "__init__.py").write_text("")

    def naming_another_app(app: Path) -> None:
        pyproject = app / "pyproject.toml"
        pyproject.write_text(pyproject.read_text().replace("client.app:app", "server.app:app"))

    refusals = {
        "changed": (drop_the_privacy, "but the run ships"),
        "extra": (with_extra_module, "outside the approved app: opacus/__init__.py"),
        "entry": (naming_another_app, "runs 'server.app:app'"),
    }
    for name, (change, reason) in refusals.items():
        with pytest.raises(AppNotApproved, match=reason):
            install(staged_bundle(tmp_path, name, change))
    assert installed == [real]  # nothing refused was unpacked, so none of its code ran
    # a compiled module in an app package would shadow its .py: refused, though unhashed
    buffer = BytesIO()
    with zipfile.ZipFile(BytesIO(real)) as src, zipfile.ZipFile(buffer, "w") as out:
        for info in src.infolist():
            out.writestr(info, src.read(info))
        out.writestr("client/app.cpython-311-x86_64-linux-gnu.so", b"\x7fELF")
    with pytest.raises(AppNotApproved, match=r"client/app\.cpython"):
        install(buffer.getvalue())

    events = [json.loads(line) for line in (state / "audit.log").read_text().splitlines()]
    assert [e["event"] for e in events] == ["app-approved"] + ["refused-app"] * 4
    assert events[0]["app"] == approved


def test_the_daemon_starts_every_clientapp_behind_the_gate_and_requires_a_pin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("ca.crt", "site.key"):
        (tmp_path / name).write_text("placeholder\n")
    settings = SiteSettings(
        superlink="127.0.0.1:9092",
        root_certificate=tmp_path / "ca.crt",
        private_key=tmp_path / "site.key",
        data_path=data,
        state_dir=tmp_path / "state",
        site_name="a",
        approved_app_hash=app_hash(),
    )
    command, env = prepare_supernode(settings)
    assert command[0] == "flower-supernode"
    # Flower starts the ClientApp process by this name from PATH: the gate answers it
    gate = shutil.which("flwr-clientapp", path=env["PATH"])
    assert gate == str(settings.state_dir / "app-gate" / "flwr-clientapp")
    assert os.listdir(settings.state_dir / "app-gate") == ["flwr-clientapp"]
    script = Path(gate).read_text()
    assert "-m client.app_gate --approved-app-hash " + app_hash() in script

    config = tmp_path / "site.yaml"
    config.write_text(
        "superlink: 127.0.0.1:9092\nroot_certificate: ca.crt\nprivate_key: site.key\n"
        "data_path: data\nstate_dir: state\nsite_name: a\nepsilon_budget: 4\n"
    )
    assert main(["site", "--config", str(config), "--check"]) == 2
    said = " ".join(capsys.readouterr().out.split())
    assert "needs 'approved_app_hash'" in said and "emixer app-hash" in said
