"""The repository is a valid Flower app: `flwr build` packs it with everything the apps import."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_flwr_build_packs_the_app_with_its_data_files(tmp_path):
    done = subprocess.run(
        ["flwr", "build", "--app", str(ROOT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (fab,) = tmp_path.glob("*.fab")
    names = set(zipfile.ZipFile(fab).namelist())
    assert {"client/app.py", "server/app.py", "pyproject.toml"} <= names
    # every package data file the app reads at run time must be inside the bundle
    for data_file in (ROOT / "emixer_model").rglob("*.json"):
        assert data_file.relative_to(ROOT).as_posix() in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
