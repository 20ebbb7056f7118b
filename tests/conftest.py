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


def signed_round(key, site: str, server_round: int, model, accountant, seq: int, **plan) -> dict:
    """A ledger entry `site` signed with `key` after `plan["steps"]` more steps on `accountant`,
    as a reply's "ledger" record carries it (tests of the server side need no training)."""
    from emixer_model.site_privacy import PrivacyPlan, arrays_sha256, ledger_entry

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
