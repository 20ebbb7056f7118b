"""The CLI's output reads like one tool's, also when piped: no library tracebacks, no duplicated
Flower lines, no deprecation banners, warnings or DEBUG lines; those go to the run's log file;
and tables as wide as they need, not wrapped mid-number at rich's 80-column guess.

The tests run the real `emixer` entry point (or its console) in a subprocess with stdout and
stderr piped, as `| tee log`, systemd and CI do (a TTY is what hid the duplicated lines before).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from emixer_cli.common import PIPED_WIDTH
from emixer_model.data.dicom import write_dicom
from emixer_model.evaluation.tables import FIGURE_TABLES
from emixer_model.text.grammar import SITE_ONLY_FINDING
from tests.test_codecs import _phantom

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_NOISE = ("Traceback", "DEBUG", "DEPRECATED", "Warning", "WARNING", "pid=")


def python(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `python ARGS` on this tree's code with stdout and stderr piped."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=600,
    )


def emixer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return python("-m", "emixer_cli", *args, cwd=cwd)


def _broken_files(folder: Path) -> None:
    """Compressed files whose streams every decoder plugin rejects (each makes pydicom log a
    traceback at ERROR), a truncated file and a text file."""
    folder.mkdir()
    write_dicom(folder / "plain.dcm", _phantom(12), bits_stored=12)
    for syntax in (JPEGLSLossless, JPEG2000Lossless, RLELossless):
        ds = pydicom.dcmread(folder / "plain.dcm")
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([b"\xff\xd8\xff\x4f garbage, not a codestream \xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(folder / f"broken-{syntax.keyword}.dcm")
    data = (folder / "plain.dcm").read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) - 300])
    (folder / "plain.dcm").unlink()
    (folder / "readme.txt").write_text("not an image\n")


def test_data_check_of_broken_files_prints_reasons_not_tracebacks(tmp_path: Path) -> None:
    _broken_files(tmp_path / "broken")
    done = emixer("data", "check", "broken", cwd=tmp_path)
    assert done.returncode == 2, done.stderr  # nothing usable
    out = done.stdout + done.stderr
    assert "Traceback" not in out and "ERROR" not in out
    assert "unreadable" in out and "not-dicom" in out

    done = emixer("data", "check", "broken", "--json", cwd=tmp_path)
    assert "Traceback" not in done.stdout + done.stderr and not done.stderr
    report = json.loads(done.stdout)
    assert {k: v["count"] for k, v in report["skipped"].items()} == {
        "unreadable": 4,
        "not-dicom": 1,
    }
    # the syntaxes were read before the decoders failed, so the check counts them
    assert report["transfer_syntaxes"] == {
        "ExplicitVRLittleEndian": 1,  # the truncated file
        "JPEGLSLossless": 1,
        "JPEG2000Lossless": 1,
        "RLELossless": 1,
    }
    details = " ".join(report["skipped"]["unreadable"]["examples"])
    assert "broken-JPEGLSLossless.dcm (RuntimeError: Unable to decode" in details


def _content_lines(text: str) -> list[str]:
    """Lines with words in them. Table borders and rules repeat legitimately, and so do the
    continuation lines of a wrapped table cell (their first cell is empty)."""
    return [
        line.strip()
        for line in text.splitlines()
        if re.search(r"[A-Za-z0-9]", line) and not re.match(r"\s*│\s+│", line)
    ]


def test_demo_piped_shows_stages_once_logs_libraries_and_trains_what_the_public_model_never_saw(
    tmp_path: Path,
) -> None:
    """The smallest demo that runs every stage, with the demo's own model and recipe (no
    --config): tiny data, a tiny public pretraining, one round of one epoch."""
    args = ["demo", "--sites", "2", "--rounds", "1", "--epochs", "1"]
    args += ["--per-site", "24", "--unlabeled", "4", "--size", "32", "--per-label-release", "1"]
    args += ["--public-studies", "16", "--pretrain-steps", "2"]
    done = emixer(*args, "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    screen = done.stdout + done.stderr
    for noise in LIBRARY_NOISE:
        assert noise not in screen, f"{noise!r} on screen:\n{screen}"
    lines = _content_lines(screen)
    repeated = sorted({line for line in lines if lines.count(line) > 1})
    assert not repeated, f"printed more than once: {repeated}"
    for stage in ("1/5", "2/5", "3/5", "4/5", "5/5", "privacy ledger", "index.html"):
        assert stage in screen
    # what the sites know, the public-only model beside the release on the same held-out patients
    assert "public-only model" in screen and "what only the sites know (Pneumoperitoneum" in screen
    (evaluation,) = (tmp_path / "out" / "runs").glob("*/evaluation/evaluation.json")
    compared = json.loads(evaluation.read_text())["compared"]["models"]
    assert list(compared) == ["public-only model", "release"]
    assert (
        compared["public-only model"]["label_fidelity"].keys()
        == compared["release"]["label_fidelity"].keys()
    )

    (log,) = (tmp_path / "out" / "runs").glob("*/emixer.log")
    logged = log.read_text()
    assert "DEPRECATED FEATURE" in logged and "run_simulation" in logged  # Flower's banner
    assert "Starting EmixerFedAvg strategy" in logged  # Flower's own INFO lines, once each
    assert logged.count("[ROUND 1/1]") == 1
    # SITE_KNOWLEDGE_TRAIN: only the label layers of the findings the demo's public model never
    # saw train, which the server read from that model's pretraining record
    (trained,) = re.findall(r"the sites train the label layers of: (.*)", logged)
    assert SITE_ONLY_FINDING in trained.split(",")
    assert "Pleural Effusion" not in trained.split(",")  # 6 of the 16 public studies show it


def test_app_processes_print_each_flower_line_once(tmp_path: Path) -> None:
    """The ServerApp/ClientApp processes of `emixer server` and `emixer site` import opacus
    (whose basicConfig adds a root handler) and Flower (which has its own console handler)."""
    script = (
        "import logging, emixer_model, opacus.utils.module_utils\n"
        "from flwr.common.logger import log\n"
        "assert logging.getLogger().handlers, 'opacus no longer adds a root handler'\n"
        "log(logging.INFO, 'hello from the app')\n"
    )
    done = python("-c", script, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (done.stdout + done.stderr).count("hello from the app") == 1


def _wide_evaluation(path: Path) -> list[str]:
    """An evaluation result with long numbers and the longest verdicts the code writes, saved
    to `path`; returns every value and interval as the table prints them."""
    verdicts = [
        "not distinguishable from chance (0.5)",
        "no chance level; lower is closer to the real images (judge-train vs held-out real "
        "images: 123.4)",
        "above chance (0); the judge itself is not distinguishable from chance, so this means "
        "nothing",
    ]
    inputs = {"synthetic_pairs": 26000, "real_train": 3840, "real_test": 960}
    result: dict = {"inputs": {**inputs, "real_test_units": 912, "scored_on": "held-out patients"}}
    cells = []
    rows = {keys: None for _, table in FIGURE_TABLES for _, keys in table}
    for i, keys in enumerate(rows):
        value, low, high = -0.0001234567 * (i + 1), -0.01234567, 12345.678 + i
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        verdict = verdicts[i % len(verdicts)]
        node[keys[-1]] = {
            "value": value,
            "low": low,
            "high": high,
            "n": 26000 + i,
            "verdict": verdict,
        }
        cells += [f"{value:.4g}", f"[{low:.4g}, {high:.4g}]"]
    path.write_text(json.dumps(result))
    return cells


def test_a_piped_evaluation_table_keeps_every_number_whole(tmp_path: Path, monkeypatch) -> None:
    """The demo's evaluation table, piped, once wrapped at 80 columns and broke cells mid-number."""
    cells = _wide_evaluation(tmp_path / "evaluation.json")
    script = (
        "import json\n"
        "from emixer_cli.common import console\n"
        "from emixer_model.evaluation.tables import rich_tables\n"
        "for table in rich_tables(json.loads(open('evaluation.json').read()), []):\n"
        "    console.print(table)\n"
    )
    monkeypatch.delenv("COLUMNS", raising=False)
    done = python("-c", script, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= PIPED_WIDTH
    broken = [cell for cell in cells if not any(cell in line for line in lines)]
    assert not broken, f"cells split over lines: {broken}\n{done.stdout}"
