"""The `emixer` command line as users run it: phantoms -> data check -> train-local, and clear
one-line errors with exit 2 for input a user can fix."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import yaml

from emixer_cli.main import main
from tests.conftest import TINY


def emixer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emixer_cli", *args], capture_output=True, text=True
    )


def test_phantoms_then_data_check_counts_every_file(tmp_path):
    done = emixer("phantoms", "--out", str(tmp_path), "--sites", "2", "--per-site", "12",
                  "--unlabeled", "3", "--size", "32")  # fmt: skip
    assert done.returncode == 0, done.stderr
    site = tmp_path / "site_2"
    done = emixer("data", "check", str(site), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = list(csv.DictReader((site / "studies.csv").open()))
    assert report["studies"] == len(rows) == 12
    assert report["accepted_labeled"] == 12
    assert report["accepted"] == 15  # 12 labeled + 3 unlabeled
    assert report["skipped"] == {}
    assert report["patients"] == len({r["patient"] for r in rows})
    positives = sum(r["Cardiomegaly"] == "1" for r in rows)
    assert report["label_counts"]["Cardiomegaly"]["positive"] == positives


def test_phantoms_pseudo_sites_write_the_public_style_control(tmp_path):
    done = emixer("phantoms", "--pseudo-sites", "--out", str(tmp_path), "--sites", "1",
                  "--per-site", "6", "--unlabeled", "1", "--size", "32")  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "site_1" / "studies.csv").open()))
    assert len(rows) == 6 and {r["Pneumoperitoneum"] for r in rows} == {"0"}
    both = emixer("phantoms", "--pseudo-sites", "--public", "--out", str(tmp_path / "x"))
    assert both.returncode == 2 and "not allowed with" in both.stderr
    none = emixer("phantoms", "--out", str(tmp_path / "y"), "--sites", "0")
    assert none.returncode == 2 and "sites >= 1" in none.stdout and "Traceback" not in none.stderr


def test_data_check_of_a_folder_with_nothing_usable_exits_2(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    done = emixer("data", "check", str(tmp_path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


def test_train_local_prints_losses_and_epsilon(tmp_path, tiny_sites, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    code = main(["train-local", str(tiny_sites[0]), "--config", str(config), "--epochs", "1",
                 "--epsilon-budget", "8", "--state-dir", str(tmp_path / "state")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "epsilon" in out and "report" in out
    ledger = (tmp_path / "state" / "privacy" / "ledger.jsonl").read_text().splitlines()
    assert 0 < json.loads(ledger[-1])["epsilon"] <= 8


def test_user_errors_are_one_line_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 8\n")
    assert main(["train-local", str(tmp_path), "--config", str(bad)]) == 2
    assert "unknown key 'train.batch_sise'" in capsys.readouterr().out
    assert main(["train-local", str(tmp_path / "missing"), "--state-dir", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().out
    bad.write_text("train: [1, 2\n")
    assert main(["demo", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().out


def test_pretrain_writes_a_public_checkpoint_that_a_run_can_start_from(tmp_path):
    """`emixer pretrain` on a public collection: a round-0 checkpoint with no ledger that records
    the collection's name and content hash; refused again over an existing file, and a folder
    that is not a collection is one clear line with exit 2."""
    from server.app import initial_model
    from server.checkpoint import load_checkpoint
    from tests.conftest import tiny_config

    public = tmp_path / "public"
    assert emixer("phantoms", "--public", "--out", str(public), "--per-site", "12",
                  "--size", "32").returncode == 0  # fmt: skip
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": TINY["model"], "train": {"batch_size": 4}}))
    out = tmp_path / "pretrained.pt"
    args = ["pretrain", "--public", str(public), "--out", str(out), "--config", str(config)]
    done = emixer(*args, "--steps", "2", "--warm-start", "2")
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())  # rich wraps at 80 columns
    left = said.partition("left for the sites to teach:")[2].partition("(")[0]
    assert "Pneumoperitoneum" in left  # the public collection never shows it
    ckpt = load_checkpoint(out)
    assert ckpt.server_round == 0 and not ckpt.ledger["sites"]
    assert ckpt.public_source["studies"] == 12 and len(ckpt.public_source["content_hash"]) == 64
    cfg = tiny_config(federation={"initial_model": str(out)})
    arrays, source = initial_model(cfg)
    assert source == ckpt.public_source and set(arrays) == set(ckpt.arrays)
    again = emixer(*args)
    assert again.returncode == 2 and "never overwritten" in " ".join(again.stdout.split())
    nowhere = emixer("pretrain", "--public", str(tmp_path / "none"), "--out", str(tmp_path / "x"))
    said = " ".join((nowhere.stdout + nowhere.stderr).split())  # rich wraps at 80 columns
    assert nowhere.returncode == 2 and "not a public collection" in said
    assert "Traceback" not in said


def test_help_lists_every_command_without_loading_torch_or_flower():
    """Each command imports its library code when it runs, so --help stays instant."""
    probe = (
        "import sys\n"
        "from emixer_cli.main import build_parser\n"
        "parser = build_parser()\n"
        "print(parser.format_help())\n"
        "print('LOADED', sorted({'torch', 'flwr', 'opacus'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    commands = "demo phantoms public data train-local release pretrain verify-release keygen "
    for command in (commands + "app-hash evaluate audit server site").split():
        assert f"    {command} " in done.stdout or f"    {command}\n" in done.stdout, command
    assert "LOADED []" in done.stdout


def test_pretrain_on_a_folder_that_is_no_collection_is_one_line(tmp_path):
    done = emixer("pretrain", "--public", str(tmp_path), "--out", str(tmp_path / "m.pt"))
    assert done.returncode == 2
    assert "error:" in done.stdout and "studies.csv" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "m.pt").exists()


def test_demo_caches_are_named_by_the_phantom_version(tmp_path, monkeypatch):
    """A new phantom world never reuses the sites, public collection or pretrained model an
    older one cached (the public folder's name is part of the pretrained model's key)."""
    from emixer_cli.commands.demo import phantom_folder, public_folder
    from emixer_cli.main import build_parser
    from emixer_model.data import phantoms

    args = build_parser().parse_args(["demo"])
    before = {phantom_folder(tmp_path, args), public_folder(tmp_path, args)}
    assert all(f"-v{phantoms.PHANTOM_VERSION}-" in folder.name for folder in before)
    monkeypatch.setattr(phantoms, "PHANTOM_VERSION", phantoms.PHANTOM_VERSION + 1)
    after = {phantom_folder(tmp_path, args), public_folder(tmp_path, args)}
    assert len(before | after) == 4
    args.unlabeled += 1  # every setting the sites depend on names their folder
    assert phantom_folder(tmp_path, args) not in after


def test_the_demo_fine_tunes_its_public_model_with_the_site_knowledge_recipe_only():
    """From the public model the demo runs SITE_KNOWLEDGE_TRAIN; with --pretrain-steps 0 there is
    no public model, whose record "unshown" needs (the server would refuse the run), so every
    weight trains from random weights. A fifth of the patients is held out either way."""
    from emixer_cli.commands.demo import demo_config
    from emixer_cli.main import build_parser
    from emixer_model.config import SITE_KNOWLEDGE_TRAIN
    from emixer_model.public_pretrain import with_site_findings

    pretrained = demo_config(build_parser().parse_args(["demo"])).train
    assert {key: getattr(pretrained, key) for key in SITE_KNOWLEDGE_TRAIN} == SITE_KNOWLEDGE_TRAIN
    scratch = demo_config(build_parser().parse_args(["demo", "--pretrain-steps", "0"]))
    assert (scratch.train.dp_trainable, scratch.train.site_findings) == ("all", "")
    assert with_site_findings(scratch, unshown=()) == scratch  # what the server does, no record
    assert pretrained.holdout_fraction == scratch.train.holdout_fraction == 0.2
