"""`emixer release`: valid synthetic DICOMs with fresh UIDs and no source identifiers, files that
agree with reports.jsonl and the manifest, a sample sheet that references only existing files, a
privacy gate that refuses bad ledgers with exit 2 and writes nothing, and writer threads whose
files keep generation's order, whose errors stop the release, and which leave no half release
behind when it fails or is interrupted."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec

from emixer_cli.main import main
from emixer_model import synthesis
from emixer_model.config import FINDINGS
from emixer_model.data.dicom import SOP_CLASSES
from emixer_model.data.phantoms import CANARY
from emixer_model.networks import build_networks
from emixer_model.privacy.ledger import SiteKey
from emixer_model.privacy.state import simulation_public_key
from emixer_model.text.vocabulary import VOCAB_SIZE
from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server.tools import release_files
from server.tools.release import parse_conditions, release
from tests.conftest import signed_checkpoint, tiny_config


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, tiny_sites) -> Path:
    """A checkpoint after two private rounds at one phantom site, with its real signed ledger."""
    return signed_checkpoint(
        tiny_sites[0], tmp_path_factory.mktemp("release-model"), tiny_config(), 2
    )


@pytest.fixture(scope="module")
def site_keys(trained_checkpoint) -> list[str]:
    """`--site-keys DIR`: the folder of enrolled keys, here the one site's own public key."""
    keys = trained_checkpoint.parent.parent / "enrolled"
    keys.mkdir(exist_ok=True)
    state = trained_checkpoint.parent.parent / "state"
    (keys / "site_1.pub").write_text(simulation_public_key(state))
    return ["--site-keys", str(keys)]


def test_release_writes_valid_synthetic_dicoms_matching_reports_and_manifest(
    tmp_path, trained_checkpoint, tiny_sites, site_keys
):
    out = tmp_path / "release"
    code = main(["release", "--model", str(trained_checkpoint), "--out", str(out),
                 "--per-label", "2", *site_keys])  # fmt: skip
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
    assert manifest["model"]["round"] == 2 and len(manifest["model"]["sha256"]) == 64
    assert site["public_key"].startswith("ecdsa-sha2-nistp256 ") and len(site["signed"]) == 3
    assert json.loads(site["signed"][-1]["entry"])["status"] == "commit"  # the final model
    assert '"losses"' not in json.dumps(manifest)  # losses never reach a release


def test_index_html_references_only_files_that_exist(tmp_path, trained_checkpoint, site_keys):
    out = tmp_path / "release"
    labels = "Cardiomegaly,Edema+Pleural Effusion"
    args = ["--model", str(trained_checkpoint), "--out", str(out), "--per-label", "1", *site_keys]
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


def _rewrite_epsilon(ledger):
    """The review's forgery, step 2: an entry's epsilon rewritten (its signature then fails)."""
    signed = ledger["sites"]["site_1"]["signed"][-1]
    entry = json.loads(signed["entry"])
    entry["epsilon"] /= 2
    signed["entry"] = json.dumps(entry, sort_keys=True, separators=(",", ":"))


def _delete_round(ledger):
    """Step 1: the last round's signed entries (its round and the commit of the final model)
    deleted, so their steps vanish from the history."""
    del ledger["sites"]["site_1"]["signed"][-2:]


def _delete_round_and_its_record(ledger):
    _delete_round(ledger)
    del ledger["rounds"]["2"]


def _coordinator_key(ledger):
    """The coordinator re-signs a forged history with a key of its own: round 2 left out, and a
    commit of the final model that counts round 1 only."""
    key = SiteKey(ec.generate_private_key(ec.SECP256R1()))
    site = ledger["sites"]["site_1"]
    first, _, commit = (json.loads(s["entry"]) for s in site["signed"])
    commit |= {"history": first["history"], "epsilon": first["epsilon"]}
    site["signed"] = [key.sign(first), key.sign(commit)]
    site["public_key"] = key.public_key()
    ledger["rounds"] = {"1": ledger["rounds"]["1"], "2": {**ledger["rounds"]["2"], "sites": []}}


def _hide_last_round(ledger):
    """Threat (e) of docs/PRIVACY.md: the site's last round and its commit left out, and the
    round recorded as one that did not aggregate the site."""
    _delete_round(ledger)
    ledger["rounds"]["2"]["sites"] = []


@pytest.mark.parametrize(
    ("change", "extra", "message"),
    [
        (_empty, [], "no privacy ledger"),
        (_rewrite_epsilon, [], "signature does not verify"),
        (_delete_round, [], "rounds are missing"),
        (_delete_round_and_its_record, [], "round 2 of the checkpoint has no record"),
        (_coordinator_key, [], "not its enrolled key"),
        (_hide_last_round, [], "signed nothing for the released model"),
        (None, ["--epsilon-budget", "0.01"], "over the budget"),
    ],
    ids=[
        "missing-ledger",
        "epsilon-rewritten",
        "round-deleted",
        "round-and-record-deleted",
        "coordinator-key",
        "last-round-hidden",
        "over-budget",
    ],
)
def test_privacy_gate_refuses_with_exit_2_and_writes_nothing(
    tmp_path, trained_checkpoint, site_keys, capsys, change, extra, message
):
    model = _tampered(trained_checkpoint, tmp_path, change) if change else trained_checkpoint
    out = tmp_path / "release"
    args = ["--model", str(model), "--out", str(out), "--per-label", "1", *site_keys, *extra]
    code = main(["release", *args])
    assert code == 2
    assert message in capsys.readouterr().out
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".release")]


def test_verify_release_recomputes_each_site_epsilon_offline_and_catches_edits(
    tmp_path, trained_checkpoint, site_keys, capsys
):
    out = tmp_path / "release"
    args = ["--model", str(trained_checkpoint), "--out", str(out), "--per-label", "1"]
    assert main(["release", *args, *site_keys, "--labels", "Edema"]) == 0
    capsys.readouterr()
    assert main(["verify-release", str(out), *site_keys]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    epsilon = manifest["privacy"]["sites"]["site_1"]["epsilon"]
    assert f"{epsilon:.4f}" in capsys.readouterr().out
    manifest["privacy"]["sites"]["site_1"]["epsilon"] = epsilon / 2
    manifest["privacy"]["release_epsilon"] = epsilon / 2
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify-release", str(out), *site_keys]) == 2
    assert "privacy.release_epsilon says" in capsys.readouterr().out


@pytest.fixture(scope="module")
def one_release(tmp_path_factory, trained_checkpoint, site_keys) -> Path:
    """A one-pair release of the trained checkpoint, gated against the site's enrolled key."""
    out = tmp_path_factory.mktemp("one-release") / "release"
    args = ["--model", str(trained_checkpoint), "--out", str(out), "--per-label", "1"]
    assert main(["release", *args, "--labels", "Edema", *site_keys]) == 0
    return out


def _set(manifest: dict, path: str, value: object) -> None:
    """Set a manifest field named as verify-release names it: privacy.sites.site_1.history[0].x"""
    *parents, last = re.findall(r"[^.\[\]]+", path)
    node = manifest
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[last] = value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("privacy.delta", 1e-9),
        ("privacy.sites.site_1.delta", 1e-9),
        ("privacy.sites.site_1.budget", 1.0),
        ("privacy.sites.site_1.accountant", "prv"),
        ("privacy.sites.site_1.max_grad_norm", 0.1),
        ("privacy.sites.site_1.history[0].noise_multiplier", 25.0),
        ("privacy.sites.site_1.history[1].epsilon", 0.01),
        ("privacy.sites.site_1.privacy_unit", "the wrong unit"),
        ("privacy.sites.site_1.status", "budget-exhausted"),
        ("public_pretraining", {"name": "NIH", "model_sha256": "0" * 64}),
    ],
)
def test_verify_release_refuses_any_edited_privacy_field_naming_it(
    tmp_path, one_release, site_keys, capsys, field, value
):
    """#17 hole 3: every privacy figure of the manifest is rebuilt from the signed entries (or,
    for public_pretraining, checked against the model the sites signed for in round 1)."""
    out = tmp_path / "release"
    shutil.copytree(one_release, out)
    manifest = json.loads((out / "manifest.json").read_text())
    _set(manifest, field, value)
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify-release", str(out), *site_keys]) == 2
    assert f"manifest field {field}" in " ".join(capsys.readouterr().out.split())


def test_verify_release_refuses_a_page_that_shows_other_figures(
    tmp_path, one_release, site_keys, capsys
):
    """#17 hole 3: the page's privacy figures are the verified manifest's, so an edit shows."""
    out = tmp_path / "release"
    shutil.copytree(one_release, out)
    assert main(["verify-release", str(out), *site_keys]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    page = (out / "index.html").read_text()
    shown = f"{manifest['privacy']['release_epsilon']:.3f}"
    assert shown in page
    capsys.readouterr()
    for edited in (page.replace(shown, "0.001"), page.replace("after round 2", "after round 1")):
        assert edited != page
        (out / "index.html").write_text(edited)
        assert main(["verify-release", str(out), *site_keys]) == 2
        assert "index.html does not show" in capsys.readouterr().out
    assert "Unsigned (the coordinator's statement" in page


def test_without_site_keys_the_verdict_is_unverified_and_the_exit_code_3(
    tmp_path, trained_checkpoint, site_keys, capsys
):
    """#17 hole 5: entries the coordinator re-signed with a key of its own verify against the
    manifest's keys; without the sites' keys that is no verdict, and the exit code says so."""
    resigned = _tampered(trained_checkpoint, tmp_path, _coordinator_key)
    out = tmp_path / "release"
    args = ["--model", str(resigned), "--out", str(out), "--per-label", "1", "--labels", "Edema"]
    assert main(["release", *args]) == 3
    assert "UNVERIFIED" in capsys.readouterr().out and not out.exists()
    assert main(["release", *args, "--trust-manifest-keys"]) == 0
    assert "the keys the ledger carries" in " ".join(capsys.readouterr().out.split())

    assert main(["verify-release", str(out)]) == 3
    verdict = capsys.readouterr().out.strip().splitlines()[-3:]
    assert "UNVERIFIED" in " ".join(verdict)
    assert main(["verify-release", str(out), "--trust-manifest-keys"]) == 0
    assert "taken from the manifest" in " ".join(capsys.readouterr().out.split())
    assert main(["verify-release", str(out), *site_keys]) == 2
    assert "not its enrolled key" in capsys.readouterr().out


def test_an_enrolled_site_missing_from_the_ledger_is_named_and_refused(
    tmp_path, trained_checkpoint, site_keys, capsys
):
    """#17 hole 6: with the keys of every enrolled site, a ledger without one of them (here
    site_2, whose entries the coordinator dropped) is refused by the gate and by verify-release."""
    enrolled = tmp_path / "enrolled"
    shutil.copytree(site_keys[1], enrolled)
    site_2 = SiteKey.generate(tmp_path / "site_2" / "site_2.key")
    (enrolled / "site_2.pub").write_text(site_2.public_key())
    out = tmp_path / "release"
    args = ["--model", str(trained_checkpoint), "--out", str(out), "--per-label", "1"]
    assert main(["release", *args, "--site-keys", str(enrolled)]) == 2
    assert "enrolled site site_2 signed no entry" in capsys.readouterr().out
    assert not out.exists()
    assert main(["release", *args, "--labels", "Edema", *site_keys]) == 0
    assert main(["verify-release", str(out), "--site-keys", str(enrolled)]) == 2
    assert "enrolled site site_2 signed no entry" in capsys.readouterr().out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_sites) -> dict[str, Path]:
    """#17's two runs at one site and one state dir: A (3 rounds), then B (2 more, resumed from
    A's end). A's round-1 and final checkpoints, B's final one, the state dir, enrolled keys."""
    root = tmp_path_factory.mktemp("two-runs")
    cfg, state = tiny_config(privacy={"target_epsilon": 2.0, "epsilon_budget": 20.0}), root / "s"
    a = signed_checkpoint(tiny_sites[0], root / "a", cfg, 3, run_id="A", state=state)
    b = signed_checkpoint(tiny_sites[0], root / "b", cfg, 2, run_id="B", start=a, state=state)
    keys = root / "enrolled"
    keys.mkdir()
    (keys / "site_1.pub").write_text(simulation_public_key(state))
    a1 = a.parent / "round-0001.pt"
    return {"a": a, "a1": a1, "b": b, "state": state, "keys": keys}


def _release(model: Path, out: Path, keys: Path) -> int:
    args = ["--model", str(model), "--out", str(out), "--per-label", "1", "--labels", "Edema"]
    return main(["release", *args, "--site-keys", str(keys)])


def test_a_release_names_a_model_its_sites_signed_for_so_truncation_and_cross_run_fail(
    tmp_path, two_runs, capsys
):
    """#17 hole 2: run A's round-3 weights passed off as round 1 with round 1's ledger
    (truncation), and run B's final weights with run A's whole ledger (cross-run), are refused:
    the site signed neither model as the model after that round."""
    a, a1, b = (load_checkpoint(two_runs[k]) for k in ("a", "a1", "b"))
    forged = {
        "truncation": Checkpoint(1, a.arrays, a1.ledger, a.config),
        "cross-run": Checkpoint(a.server_round, b.arrays, a.ledger, a.config),
    }
    for name, ckpt in forged.items():
        model = save_checkpoint(tmp_path / name, ckpt)
        assert _release(model, tmp_path / f"release-{name}", two_runs["keys"]) == 2, name
        assert "signed nothing for the released model" in capsys.readouterr().out, name
    for name in ("a", "b"):
        assert _release(two_runs[name], tmp_path / name, two_runs["keys"]) == 0
    release_a, release_b = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in "ab")
    own = [json.loads(line) for line in (two_runs["state"] / "privacy/ledger.jsonl").open()]
    commits = [e for e in own if e["status"] == "commit"]
    assert [e["run"] for e in commits] == ["A", "B"]  # each run ended with the site's commit
    epsilon = [r["privacy"]["sites"]["site_1"]["epsilon"] for r in (release_a, release_b)]
    assert epsilon == [commits[0]["epsilon"], commits[1]["epsilon"]] and epsilon[0] < epsilon[1]

    edited = tmp_path / "b-edited"  # a manifest naming another model or round than was signed
    for field, value in (("arrays_sha256", release_a["model"]["arrays_sha256"]), ("round", 3)):
        shutil.rmtree(edited, ignore_errors=True)
        shutil.copytree(tmp_path / "b", edited)
        manifest = json.loads((edited / "manifest.json").read_text())
        manifest["model"][field] = value
        (edited / "manifest.json").write_text(json.dumps(manifest))
        capsys.readouterr()
        assert main(["verify-release", str(edited), "--site-keys", str(two_runs["keys"])]) == 2
        assert "signed nothing for the released model" in capsys.readouterr().out


def test_a_site_finds_in_its_own_ledger_any_model_of_a_release_it_signed_for(
    tmp_path, two_runs, tiny_sites, capsys
):
    """#17 hole 2, the side effect: run A's final model, trained on site_1, stripped of its ledger
    and trained on at site_2 alone, is released without site_1; the gate cannot see it (site_2
    signed everything), but site_1's --site-state finds A's model in the release's lineage."""
    state, keys = two_runs["state"], ["--site-keys", str(two_runs["keys"])]
    assert _release(two_runs["b"], tmp_path / "honest", two_runs["keys"]) == 0
    capsys.readouterr()
    assert (
        main(["verify-release", str(tmp_path / "honest"), *keys, "--site-state", str(state)]) == 0
    )
    assert "nothing it signed is left out" in " ".join(capsys.readouterr().out.split())

    a = load_checkpoint(two_runs["a"])
    stripped = save_checkpoint(tmp_path / "stripped", Checkpoint(0, a.arrays, {}, a.config))
    root = tmp_path / "c"
    other = signed_checkpoint(
        tiny_sites[1], root, tiny_config(), 1, run_id="C", start=stripped, name="site_2"
    )
    enrolled = tmp_path / "enrolled-c"
    enrolled.mkdir()
    (enrolled / "site_2.pub").write_text(simulation_public_key(root / "state"))
    assert _release(other, tmp_path / "c-release", enrolled) == 0
    check = ["verify-release", str(tmp_path / "c-release"), "--site-keys", str(enrolled)]
    assert main(check) == 0  # a recipient cannot see it
    capsys.readouterr()
    assert main([*check, "--site-state", str(state)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "a model in this release's lineage" in out and "counts epsilon 0.0000" in out

    nowhere = ["--site-state", str(tmp_path / "nowhere")]
    assert main(["verify-release", str(tmp_path / "honest"), *keys, *nowhere]) == 2
    assert "holds no ledger.jsonl" in capsys.readouterr().out
    assert not (tmp_path / "nowhere").exists()  # a check never creates a state dir


def test_files_keep_generation_order_across_batches_and_writer_threads(
    tmp_path, trained_checkpoint
):
    conditions = parse_conditions("Edema,Cardiomegaly+Pleural Effusion,No Finding")
    out = tmp_path / "release"
    release(trained_checkpoint, out, per_label=3, conditions=conditions, batch_size=2)
    rows = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [f"{n:06d}" for n in range(1, 10)]
    for row in rows:
        ds = pydicom.dcmread(out / row["dicom"])
        assert int(ds.InstanceNumber) == int(row["id"]) and ds.PatientID.endswith(row["id"])
        assert ds.DerivationDescription.endswith("+".join(row["labels"]))
        assert (out / row["png"]).is_file()
    assert not list(out.rglob("*.tmp"))


def _writer_threads() -> list[threading.Thread]:
    names = ("release-writer", "synthesis")
    return [t for t in threading.enumerate() if t.name.startswith(names)]


def _nothing_left(tmp_path: Path, intra_op_threads: int) -> None:
    assert not (tmp_path / "release").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".release")]
    assert not _writer_threads()  # joined: none can write after the work folder is gone
    assert torch.get_num_threads() == intra_op_threads  # restored after synthesis


def test_a_failing_writer_stops_the_release_with_its_error(
    tmp_path, trained_checkpoint, monkeypatch
):
    calls = []

    def failing_png(image01):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("No space left on device")
        return b"png"

    monkeypatch.setattr(release_files, "png_bytes", failing_png)
    threads = torch.get_num_threads()
    with pytest.raises(OSError, match="No space left on device"):
        release(trained_checkpoint, tmp_path / "release", 2, parse_conditions(None), batch_size=4)
    _nothing_left(tmp_path, threads)


def test_ctrl_c_while_writers_run_leaves_no_half_release(tmp_path, trained_checkpoint, monkeypatch):
    synthesize, batches = synthesis.synthesize, []

    def interrupted(*args, **kwargs):
        batches.append(1)
        if len(batches) == 4:  # the writers have had batches by now
            raise KeyboardInterrupt
        return synthesize(*args, **kwargs)

    monkeypatch.setattr(synthesis, "synthesize", interrupted)
    threads = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        release(trained_checkpoint, tmp_path / "release", 2, parse_conditions(None), batch_size=4)
    _nothing_left(tmp_path, threads)


def test_a_real_ctrl_c_exits_130_and_leaves_no_half_release(
    tmp_path, trained_checkpoint, site_keys
):
    """SIGINT to `emixer release` as soon as its writers have written a file."""
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    args = ["--model", str(trained_checkpoint), "--out", "release", "--per-label", "1000"]
    args += site_keys
    process = subprocess.Popen(
        [sys.executable, "-m", "emixer_cli", "release", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".release.partial-*/png/*.png")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no file written in 300 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out + err
    assert "interrupted" in out and "Traceback" not in out + err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".release", "release"))]


def test_pairs_do_not_depend_on_the_number_of_generation_threads() -> None:
    cfg = tiny_config()
    torch.manual_seed(0)
    nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS)).eval()
    labels = [torch.eye(len(FINDINGS))[i : i + 3] for i in range(0, 9, 3)]
    with torch.no_grad():
        one, two = (
            list(synthesis.synthesize_batches(nets, cfg.model, labels, seed=5, threads=n))
            for n in (1, 2)
        )
    assert len(one) == len(two) == 3
    for (images_1, ids_1), (images_2, ids_2) in zip(one, two, strict=True):
        assert torch.equal(images_1, images_2) and torch.equal(ids_1, ids_2)
    assert not torch.equal(one[0][0], one[1][0])  # each batch has its own draws
