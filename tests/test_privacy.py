"""A site's accountant: persistence, fallbacks, noise planning, recomputation from a ledger."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from emixer_model.privacy.accounting import (
    SiteAccountant,
    default_delta,
    epsilon_from_history,
    plan_noise_multiplier,
)

DELTA = 1e-4


def _stepped(kind: str, steps: int, sigma: float = 1.0, q: float = 0.1) -> SiteAccountant:
    accountant = SiteAccountant(kind)
    for _ in range(steps):
        accountant.step(sigma, q)
    return accountant


def test_default_delta() -> None:
    assert default_delta(200) == pytest.approx(1 / 2000)
    with pytest.raises(ValueError, match="at least one"):
        default_delta(0)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="rdp, prv"):
        SiteAccountant("moments")


def test_epsilon_grows_with_steps() -> None:
    accountant = SiteAccountant("rdp")
    assert accountant.epsilon(DELTA) == 0.0
    values = []
    for _ in range(3):
        for _ in range(10):
            accountant.step(1.0, 0.1)
        values.append(accountant.epsilon(DELTA))
    assert 0 < values[0] < values[1] < values[2]
    assert accountant.history == [(1.0, 0.1, 30)]


def test_epsilon_after_predicts_without_mutating() -> None:
    accountant = _stepped("rdp", 10)
    predicted = accountant.epsilon_after(5, 1.0, 0.1, DELTA)
    assert accountant.history == [(1.0, 0.1, 10)]
    assert predicted == _stepped("rdp", 15).epsilon(DELTA)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_save_load_round_trip(tmp_path, kind: str) -> None:
    accountant = _stepped(kind, 20)
    accountant.step(1.5, 0.2)
    path = tmp_path / "accountant.json"
    accountant.save(path)
    loaded = SiteAccountant.load(path, kind)
    assert loaded.history == accountant.history
    assert loaded.epsilon(DELTA) == accountant.epsilon(DELTA)
    loaded.step(1.5, 0.2)  # it keeps counting where it left off
    assert loaded.history[-1] == (1.5, 0.2, 2)


def test_prev_fallback_on_corrupt_file(tmp_path, caplog) -> None:
    path = tmp_path / "accountant.json"
    first = _stepped("rdp", 10)
    first.save(path)
    _stepped("rdp", 20).save(path)
    assert json.loads(path.with_suffix(".prev").read_text())["history"] == [[1.0, 0.1, 10]]
    path.write_text('{"kind": "rdp", "hist')  # torn write
    with caplog.at_level(logging.WARNING):
        loaded = SiteAccountant.load(path, "rdp")
    assert loaded.epsilon(DELTA) == first.epsilon(DELTA)
    assert "corrupt" in caplog.text
    path.unlink()
    assert SiteAccountant.load(path, "rdp").history == [(1.0, 0.1, 10)]


def test_load_refuses_when_nothing_usable_or_kind_differs(tmp_path) -> None:
    path = tmp_path / "accountant.json"
    with pytest.raises(ValueError, match="does not exist.*forget the epsilon"):
        SiteAccountant.load(path, "rdp")
    _stepped("rdp", 3).save(path)
    with pytest.raises(ValueError, match="'rdp' accountant but the config asks for 'prv'"):
        SiteAccountant.load(path, "prv")


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_from_history_matches_the_accountant_exactly(kind: str) -> None:
    accountant = _stepped(kind, 12, sigma=1.2, q=0.05)
    for _ in range(4):
        accountant.step(0.9, 0.05)
    ledger = [  # per-round entries as the server's ledger keeps them
        {"noise_multiplier": 1.2, "sample_rate": 0.05, "steps": 5},
        {"noise_multiplier": 1.2, "sample_rate": 0.05, "steps": 7},
        {"noise_multiplier": 0.9, "sample_rate": 0.05, "steps": 4},
    ]
    assert epsilon_from_history(ledger, DELTA, kind) == accountant.epsilon(DELTA)
    as_tuples = [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in ledger]
    assert epsilon_from_history(as_tuples, DELTA, kind) == accountant.epsilon(DELTA)
    assert epsilon_from_history([], DELTA, kind) == 0.0


def test_epsilon_from_history_refuses_bad_entries() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        epsilon_from_history([(1.0, 1.5, 3)], DELTA)
    with pytest.raises(ValueError, match="delta"):
        epsilon_from_history([(1.0, 0.1, 3)], 0.0)


@pytest.mark.parametrize("spent", [0, 50])
def test_plan_noise_multiplier_hits_target(spent: int) -> None:
    accountant = _stepped("rdp", spent, sigma=3.0)
    sigma = plan_noise_multiplier(accountant, 4.0, DELTA, 0.1, 100)
    reached = accountant.epsilon_after(100, sigma, 0.1, DELTA)
    assert 0.98 * 4.0 <= reached <= 4.0
    assert len(accountant.history) == (1 if spent else 0)


def test_plan_accounts_for_epsilon_already_spent() -> None:
    fresh = plan_noise_multiplier(SiteAccountant("rdp"), 4.0, DELTA, 0.1, 100)
    spent = plan_noise_multiplier(_stepped("rdp", 100, sigma=3.0), 4.0, DELTA, 0.1, 100)
    assert spent > fresh


def test_plan_refuses_a_spent_budget() -> None:
    accountant = _stepped("rdp", 200, sigma=0.6, q=0.5)
    with pytest.raises(ValueError, match="already spent"):
        plan_noise_multiplier(accountant, 1.0, DELTA, 0.5, 10)


def test_secure_mode_reaches_the_dp_optimizer_and_training_still_steps() -> None:
    from emixer_model.config import EmixerConfig, PrivacyConfig, TrainConfig
    from emixer_model.networks import build_networks
    from emixer_model.training import PrivateTrainer
    from tests.conftest import TINY_MODEL
    from tests.test_training import L, V, make_data, site_plan

    data = make_data()
    cfg = EmixerConfig(
        model=TINY_MODEL,
        privacy=PrivacyConfig(secure_mode=True, noise_multiplier=1.0),
        train=TrainConfig(batch_size=4),
    )
    accountant = SiteAccountant("rdp")
    n = len(data.units)
    nets = build_networks(TINY_MODEL, V, L)
    plan = site_plan(cfg, data, accountant)
    trainer = PrivateTrainer(nets, cfg, accountant, torch.device("cpu"), plan=plan)
    assert trainer.optimizer.secure_mode is True
    assert trainer.train_steps(data, 2, sampler_seed=0)["steps"] == 2
    assert accountant.history == [(1.0, 4 / n, 2)]
