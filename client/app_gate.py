"""The site's app pin, checked outside the code it pins, before any of that code runs.

A check inside the ClientApp protects nothing: a coordinator that ships a changed app can drop it
(and DP, the policy and signing with it). So the check lives here, in the site's own installed
package, and runs in front of Flower's ClientApp process:

- `emixer site` starts flower-supernode with a PATH whose first folder holds only the site's own
  `flwr-clientapp` (client/daemon.py `write_app_gate`). Flower starts every ClientApp process by
  that name from PATH: flower-supernode runs `flower-superexec`
  (flwr/supernode/start_client_internal.py, `command = ["flower-superexec"]`), which runs
  `TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP]` = "flwr-clientapp"
  (flwr/supercore/constant.py; flwr/supercore/superexec/executor/subprocess_executor.py
  `SubprocessExecutor.launch`, `subprocess.Popen(args)`).
- That script runs `main` below, which wraps Flower's own `flwr-clientapp`. Flower's
  `run_clientapp` pulls the task and the app bundle (FAB), then calls `install_from_fab` before it
  imports anything from the bundle (flwr/supernode/runtime/run_clientapp.py). `main` puts
  `checked_install` in its place: the bundle is refused unless it holds nothing but the app
  packages' .py/.json files (plus pyproject.toml, README.md, LICENSE and Flower's .info/), names
  `client.app:app` as its ClientApp, and its code hash (`emixer_model.shared.files_hash`, the
  same hash `emixer app-hash` prints) is the site's `approved_app_hash`.
- A refused bundle is never unpacked or imported. Flower replies to the coordinator with the
  error; the site's audit log records `refused-app` with the reason.
- The gate has imported the site's installed `client` and `emixer_model` packages, so Python
  resolves the ClientApp's imports of them from that install (sys.modules and the packages'
  `__path__`), not from the bundle. The gate therefore also requires the installed app to be the
  approved version (`installed_app_problem`): whichever copy Python reads, the code that trains
  is the approved code.

Flower's own mechanism, `flower-supernode --trusted-entities`, does not serve here: it accepts
only bundles that carry ed25519 signatures and a `valid_license` mark, which the SuperLink adds
only to bundles fetched from Flower Hub (flwr/superlink/servicer/control/control_handlers.py
`_format_verification`, `_get_remote_fab`); a bundle the coordinator builds itself, as offline
hospitals need, has neither, so every run would be refused
(flwr/supernode/start_client_internal.py `_pull_and_store_message`).
"""

from __future__ import annotations

import argparse
import importlib
import io
import sys
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from emixer_model.shared import app_hash, files_hash, is_app_file

CLIENTAPP = "client.app:app"  # the ClientApp an approved bundle names (pyproject.toml)
BUNDLE_EXTRAS = ("pyproject.toml", "README.md", "LICENSE")  # top-level files that hold no code
GATE_COMMAND = "flwr-clientapp"  # the name Flower starts a ClientApp process by


class AppNotApproved(RuntimeError):
    """The app bundle the coordinator sent is not the version this site approved."""


def bundle_hash(fab: bytes) -> str:
    """The code hash of an app bundle, after checking it holds nothing the hash does not cover
    and names the approved ClientApp; AppNotApproved (saying what) otherwise."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
            files = {
                info.filename: bundle.read(info) for info in bundle.infolist() if not info.is_dir()
            }
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise AppNotApproved(f"the app bundle is not a readable FAB ({err})") from None
    extra = sorted(
        name
        for name in files
        if not (
            is_app_file(name) or name in BUNDLE_EXTRAS or PurePosixPath(name).parts[0] == ".info"
        )
    )
    if extra:
        shown = ", ".join(extra[:5]) + (" …" if len(extra) > 5 else "")
        raise AppNotApproved(f"the app bundle holds files outside the approved app: {shown}")
    try:
        config = tomllib.loads(files["pyproject.toml"].decode())
        clientapp = config["tool"]["flwr"]["app"]["components"]["clientapp"]
    except (KeyError, TypeError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise AppNotApproved(f"the app bundle has no readable ClientApp entry ({err})") from None
    if clientapp != CLIENTAPP:
        raise AppNotApproved(f"the app bundle runs {clientapp!r}, not {CLIENTAPP!r}")
    return files_hash({name: data for name, data in files.items() if is_app_file(name)})


def check_bundle(fab: bytes, approved: str) -> str:
    """The bundle's code hash when it is the approved app; AppNotApproved otherwise."""
    shipped = bundle_hash(fab)
    if shipped != approved:
        raise AppNotApproved(
            f"this site approved app {approved[:12]}… but the run ships {shipped[:12]}…; review "
            "the new version, then put its `emixer app-hash` in site.yaml's approved_app_hash"
        )
    return shipped


def installed_app_problem(approved: str) -> str | None:
    """Why this install is not the approved app, or None when it is."""
    installed = app_hash()
    if installed == approved:
        return None
    return (
        f"this site's installed app is {installed[:12]}…, not the approved {approved[:12]}…: "
        "install the version you reviewed, or review this one and put its `emixer app-hash` in "
        "site.yaml's approved_app_hash"
    )


def checked_install(
    install: Callable[..., Path], approved: str, state_dir: Path
) -> Callable[..., Path]:
    """Flower's `install_from_fab`, refusing any bundle but the approved one before it unpacks
    it; each check is written to the site's audit log."""
    from flwr.supercore.task_identity import TaskIdentity

    from emixer_model.privacy.state import log_site_event

    def install_checked(fab: bytes, *args: object, **kwargs: object) -> Path:
        try:
            run: int | None = TaskIdentity.run_id
        except RuntimeError:
            run = None  # not inside a Flower task: the refusal is logged without a run
        try:
            shipped = check_bundle(fab, approved)
            problem = installed_app_problem(approved)
            if problem is not None:
                raise AppNotApproved(problem)
        except AppNotApproved as err:
            event = {"event": "refused-app", "run": run, "message": str(err)}
            log_site_event(state_dir, event)
            raise
        log_site_event(state_dir, {"event": "app-approved", "run": run, "app": shipped})
        return install(fab, *args, **kwargs)

    return install_checked


def main(argv: list[str] | None = None) -> None:
    """`flwr-clientapp` behind the site's pin: the gate's own arguments, then Flower's."""
    parser = argparse.ArgumentParser(
        prog=GATE_COMMAND,
        description="Flower's ClientApp process, refusing any app bundle but the approved one "
        "(written into the SuperNode's PATH by `emixer site`; not run by hand).",
    )
    parser.add_argument("--approved-app-hash", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    ours, flower_args = parser.parse_known_args(argv)

    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    # the module, not its function of the same name: run_clientapp looks install_from_fab up here
    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    runtime.install_from_fab = checked_install(
        runtime.install_from_fab, ours.approved_app_hash, ours.state_dir
    )
    sys.argv = [GATE_COMMAND, *flower_args]
    flwr_clientapp()


if __name__ == "__main__":
    main()
