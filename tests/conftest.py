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
