"""Shared test fixtures: a tiny model config and tiny phantom sites, so federated runs fit in CI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from emixer_model.config import EmixerConfig, ModelConfig, from_dict

# The smallest model that still has every part: unit tests of the networks and the private step,
# and the model of the tiny federated runs.
TINY_MODEL = ModelConfig(
    resolution=16,
    latent_dim=8,
    width=8,
    embed_dim=32,
    max_sentences=3,
    max_words=8,
    sentence_layers=1,
    word_layers=1,
    heads=2,
    groups=4,
)

TINY = {
    "model": dataclasses.asdict(TINY_MODEL),
    "train": {"batch_size": 8, "epochs": 1},
    "federation": {"rounds": 2, "min_sites": 2},
}


def site_knowledge_in(report: str) -> list[str]:
    """What only phantom sites know that a report names: words only the site-only finding's
    sentences use, the site-only finding as the labeler reads it, a site's own phrasing. Any
    public text must give []."""
    from emixer_model.text.grammar import (
        PUBLIC_GRAMMAR,
        SITE_ONLY_FINDING,
        SITE_ONLY_PARTS,
        SITE_PHRASING,
        grammar_words,
        uses_site_phrasing,
    )
    from emixer_model.text.labeler import label_report
    from emixer_model.text.vocabulary import tokenize

    site_only_words = grammar_words(SITE_ONLY_PARTS) - grammar_words(PUBLIC_GRAMMAR)
    found = sorted({word for words in tokenize(report) for word in words} & site_only_words)
    found += [SITE_ONLY_FINDING] if SITE_ONLY_FINDING in label_report(report) else []
    return found + [f"{f} phrasing" for f in SITE_PHRASING if uses_site_phrasing(report, f)]


def tiny_config(**sections: dict) -> EmixerConfig:
    """The tiny config with per-section overrides, e.g. tiny_config(privacy={"delta": 1e-3})."""
    merged = {name: dict(values) for name, values in TINY.items()}
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return from_dict(EmixerConfig, merged)


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory) -> list[Path]:
    """Two small phantom sites (written once per test session; treat them as read-only)."""
    from emixer_model.data.phantoms import write_phantom_sites

    root = tmp_path_factory.mktemp("phantoms")
    return write_phantom_sites(root, sites=2, per_site=24, unlabeled=6, seed=3, size=32)


def signed_checkpoint(
    site: Path,
    root: Path,
    cfg: EmixerConfig,
    rounds: int,
    *,
    run_id: str = "1",
    start: Path | None = None,
    state: Path | None = None,
    name: str = "site_1",
) -> Path:
    """The last checkpoint after `rounds` private rounds at one phantom site (from `start`'s
    model, ledger and round, as a resumed run goes on), with its real signed ledger and the
    commit round that has the site sign the final model, as the server's strategy records them.
    Every round's checkpoint is written to root/checkpoints; the site's state dir is `state`
    (root/state)."""
    from emixer_model.privacy.ledger import arrays_sha256
    from emixer_model.site_training import commit_model, train_site_round
    from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from server.ledger import PrivacyLedger

    state = state or root / "state"
    before = load_checkpoint(start) if start else None
    ledger = PrivacyLedger.from_dict(before.ledger) if before else PrivacyLedger()
    weights = before.arrays if before else None
    first = before.server_round + 1 if before else 1
    last = first + rounds - 1
    for server_round in range(first, last + 1):
        result = train_site_round(
            site, state, cfg, weights, server_round, last, site_name=name, run_id=run_id
        )
        signed = {**result.signed, "public-key": result.public_key}
        sha = arrays_sha256(weights)
        ledger.record(name, server_round, result.status, result.metrics(), signed, sha)
        ledger.record_round(server_round, sha, [name])
        weights = result.weights
        ckpt = Checkpoint(server_round, weights, ledger.to_dict(), cfg.to_dict())
        save_checkpoint(root / "checkpoints", ckpt)
    signed, key = commit_model(state, cfg, weights, last, site_name=name, run_id=run_id)
    commit = {**signed, "public-key": key.public_key()}
    ledger.record_commit(name, last, commit, arrays_sha256(weights))
    ckpt = Checkpoint(last, weights, ledger.to_dict(), cfg.to_dict())
    return save_checkpoint(root / "checkpoints", ckpt)


@pytest.fixture(scope="session")
def small_release(tmp_path_factory, tiny_sites) -> Path:
    """A small release (one pair per condition) of a model after one private round at one phantom
    site, with its index.html: what the release page and DICOM conformance tests look at. The
    site's state dir is the release folder's sibling `state`."""
    from server.tools.release import parse_conditions, release

    root = tmp_path_factory.mktemp("small-release")
    ckpt = signed_checkpoint(tiny_sites[0], root, tiny_config(), rounds=1)
    out = root / "release"
    release(ckpt, out, per_label=1, conditions=parse_conditions(None))
    return out


@pytest.fixture(scope="session")
def small_evaluation(small_release, tiny_sites) -> Path:
    """small_release evaluated against its site, in a folder of its own: the site trained
    without an evaluation split, so this is scored (and labelled) on training patients."""
    from emixer_model.evaluation.evaluate import evaluate_release

    out = small_release.parent / "evaluation"
    state = small_release.parent / "state"
    evaluate_release(
        small_release, tiny_sites[:1], [state], out, epochs=2, allow_training_patients=True
    )
    return out


def signed_round(key, site: str, server_round: int, model, accountant, seq: int, **plan) -> dict:
    """A ledger entry `site` signed with `key` after `plan["steps"]` more steps on `accountant`,
    as a reply's "ledger" record carries it (tests of the server side need no training)."""
    from emixer_model.privacy.ledger import arrays_sha256, ledger_entry
    from emixer_model.privacy.plan import PrivacyPlan

    values = {"noise_multiplier": 1.0, "sample_rate": 0.2, "steps": 5, "delta": 1e-3} | plan
    for _ in range(values["steps"]):
        accountant.step(values["noise_multiplier"], values["sample_rate"])
    privacy_plan = PrivacyPlan(
        noise_multiplier=values["noise_multiplier"],
        sample_rate=values["sample_rate"],
        steps_per_round=values["steps"],
        planned_rounds=1,
        target_epsilon=5.0,
        delta=values["delta"],
        accountant=accountant.kind,
        max_grad_norm=1.0,
        privacy_unit="patient",
        batch_size=2,
        epochs=1,
        n_units=10,
        population=10,
        requested_noise=None,
    )
    entry = ledger_entry(
        site=site,
        run="1",
        server_round=server_round,
        seq=seq,
        plan=privacy_plan,
        steps=values["steps"],
        accountant=accountant,
        model_sha256=arrays_sha256(model),
        budget=5.0,
    )
    return {**key.sign(entry), "public-key": key.public_key()}
