"""Shared test fixtures: a tiny model config and tiny phantom sites, so federated runs fit in CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from emixer_model.config import EmixerConfig, ModelConfig, from_dict

# The smallest model that still has every part: unit tests of the networks and the private step.
SMALL_MODEL = ModelConfig(
    resolution=16,
    latent_dim=8,
    width=8,
    embed_dim=32,
    max_sentences=3,
    max_words=6,
    heads=2,
    groups=4,
)

TINY = {
    "model": {
        "resolution": 16,
        "latent_dim": 8,
        "width": 8,
        "embed_dim": 32,
        "max_sentences": 3,
        "max_words": 8,
        "sentence_layers": 1,
        "word_layers": 1,
        "heads": 2,
        "groups": 4,
    },
    "train": {"batch_size": 8, "epochs": 1},
    "federation": {"rounds": 2, "min_sites": 2},
}


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


@pytest.fixture(scope="session")
def evaluated_release(tmp_path_factory, tiny_sites) -> Path:
    """A small release (one pair per condition) of a model after one private round at one phantom
    site, evaluated against that site, with its index.html: what the release page and DICOM
    conformance tests look at."""
    from emixer_model.evaluation.evaluate import evaluate_release
    from emixer_model.site_training import train_site_round
    from server.checkpoint import Checkpoint, save_checkpoint
    from server.ledger import PrivacyLedger
    from server.release import parse_conditions, release
    from server.release_sheet import write_index_html

    root = tmp_path_factory.mktemp("evaluated-release")
    cfg = tiny_config()
    result = train_site_round(tiny_sites[0], root / "state", cfg, None, 1, 1)
    ledger = PrivacyLedger()
    ledger.record("site_1", 1, result.status, result.metrics(), cfg.privacy.accountant)
    ckpt = save_checkpoint(
        root / "checkpoints", Checkpoint(1, result.weights, ledger.to_dict(), cfg.to_dict())
    )
    out = root / "release"
    release(ckpt, out, per_label=1, conditions=parse_conditions(None))
    evaluate_release(out, tiny_sites[:1], [root / "state"], epochs=2)
    write_index_html(out)
    return out
