"""One site's round, as `emixer train-local` and the ClientApp run it: cumulative epsilon kept on
the site's disk, a rolled-back accountant refused, audit holdout units kept out of training."""

from __future__ import annotations

import json

import pytest

from emixer_model.data.site import load_site
from emixer_model.site_training import train_site_round
from tests.conftest import tiny_config


def test_rounds_accumulate_epsilon_and_a_lost_accountant_is_refused(tmp_path, tiny_sites):
    site, state = tiny_sites[0], tmp_path / "state"
    cfg = tiny_config(privacy={"target_epsilon": 3.0})
    first = train_site_round(site, state, cfg, None, server_round=1, planned_rounds=2)
    second = train_site_round(site, state, cfg, first.weights, server_round=2, planned_rounds=2)
    assert first.status == second.status == "trained"
    assert 0 < first.epsilon < second.epsilon == pytest.approx(3.0, rel=0.03)
    assert second.plan.noise_multiplier == first.plan.noise_multiplier  # planned once
    ledger = [json.loads(line) for line in (state / "privacy" / "ledger.jsonl").open()]
    assert [e["round"] for e in ledger] == [1, 2]
    assert set(second.metrics()) >= {"num-examples", "epsilon", "delta", "noise-multiplier"}

    # a crash that lost the newest accountant file: the .prev copy counts one round too few
    (state / "privacy" / "accountant.json").unlink()
    with pytest.raises(ValueError, match="rolled back"):
        train_site_round(site, state, cfg, second.weights, server_round=3, planned_rounds=2)


def test_holdout_units_are_not_trained_on(tmp_path, tiny_sites):
    site = tiny_sites[1]
    units = len(load_site(site, tmp_path / "probe", tiny_config().model).units)
    cfg = tiny_config(train={"holdout_fraction": 0.5})
    result = train_site_round(site, tmp_path / "state", cfg, None, 1, 1)
    assert result.num_examples == units - round(0.5 * units)
