"""`emixer release`: valid synthetic DICOMs with fresh UIDs and no source identifiers, files that
agree with reports.jsonl and the manifest, a sample sheet that references only existing files, and
a privacy gate that refuses bad ledgers with exit 2 and writes nothing."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pydicom
import pytest

from emixer_model.cli import main
from emixer_model.data.dicom import SOP_CLASSES
from emixer_model.data.phantoms import CANARY
from emixer_model.site_training import train_site_round
from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server.ledger import PrivacyLedger
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, tiny_sites) -> Path:
    """A checkpoint after one private round at one phantom site, with its real ledger."""
    root = tmp_path_factory.mktemp("release-model")
    cfg = tiny_config()
    result = train_site_round(tiny_sites[0], root / "state", cfg, None, 1, 1)
    ledger = PrivacyLedger()
    ledger.record("site_1", 1, result.status, result.metrics(), cfg.privacy.accountant)
    ckpt = Checkpoint(1, result.weights, ledger.to_dict(), cfg.to_dict())
    return save_checkpoint(root / "checkpoints", ckpt)


def test_release_writes_valid_synthetic_dicoms_matching_reports_and_manifest(
    tmp_path, trained_checkpoint, tiny_sites
):
    out = tmp_path / "release"
    code = main(["release", "--model", str(trained_checkpoint), "--out", str(out),
                 "--per-label", "2"])  # fmt: skip
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    rows = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert manifest["synthetic"] is True
    assert manifest["counts"]["total"] == len(rows) == 2 * len(manifest["counts"]["per_condition"])
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        Path(r["dicom"]).name for r in rows
    )
    uids = set()
    for row in rows:
        ds = pydicom.dcmread(out / row["dicom"])
        assert ds.SOPClassUID == SOP_CLASSES["sc"]
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.BurnedInAnnotation == "NO"
        assert "synthetic" in ds.ImageComments.lower()
        assert str(ds.PatientID).startswith("SYNTHETIC")
        assert ds.pixel_array.shape == (16, 16)
        uids.add(ds.SOPInstanceUID)
        assert (out / row["png"]).is_file()
        assert row["labels"] and isinstance(row["report"], str)
    assert len(uids) == len(rows)  # fresh UIDs, one per image
    # nothing of any site's data: no canary tag values, no site folder paths
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert CANARY.encode() not in data, path
            assert str(tiny_sites[0]).encode() not in data, path
    # the privacy section lets anyone recompute each site's epsilon
    site = manifest["privacy"]["sites"]["site_1"]
    assert manifest["privacy"]["release_epsilon"] == site["epsilon"] > 0
    assert {"noise_multiplier", "sample_rate", "steps"} <= set(site["history"][0])
    assert manifest["model"]["round"] == 1 and len(manifest["model"]["sha256"]) == 64


def test_index_html_references_only_files_that_exist(tmp_path, trained_checkpoint):
    out = tmp_path / "release"
    labels = "Cardiomegaly,Edema+Pleural Effusion"
    args = ["--model", str(trained_checkpoint), "--out", str(out), "--per-label", "1"]
    assert main(["release", *args, "--labels", labels]) == 0
    html = (out / "index.html").read_text()
    assert "<img" in html and "epsilon" in html.lower()
    for target in re.findall(r'(?:src|href)="([^"]+)"', html):
        if target.startswith(("data:", "http", "#")):
            continue
        assert (out / target).is_file(), target


def _tampered(path: Path, tmp_path: Path, change) -> Path:
    ckpt = load_checkpoint(path)
    ledger = copy.deepcopy(ckpt.ledger)
    change(ledger)
    return save_checkpoint(
        tmp_path / "bad", Checkpoint(ckpt.server_round, ckpt.arrays, ledger, ckpt.config)
    )


def _empty(ledger):
    ledger["sites"] = {}


def _inconsistent(ledger):
    ledger["sites"]["site_1"]["epsilon"] /= 2


@pytest.mark.parametrize(
    ("change", "extra", "message"),
    [
        (_empty, [], "no privacy ledger"),
        (_inconsistent, [], "ledger is inconsistent"),
        (None, ["--epsilon-budget", "0.01"], "over the budget"),
    ],
    ids=["missing-ledger", "inconsistent-ledger", "over-budget"],
)
def test_privacy_gate_refuses_with_exit_2_and_writes_nothing(
    tmp_path, trained_checkpoint, capsys, change, extra, message
):
    model = _tampered(trained_checkpoint, tmp_path, change) if change else trained_checkpoint
    out = tmp_path / "release"
    code = main(["release", "--model", str(model), "--out", str(out), "--per-label", "1", *extra])
    assert code == 2
    assert message in capsys.readouterr().out
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".release")]
