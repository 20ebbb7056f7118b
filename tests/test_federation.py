"""Federated DP training end to end on Flower's simulation engine: cumulative epsilon that survives
restarts, budget enforcement, resume, and no site data in anything the server receives or writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emixer_model.data.phantoms import CANARY
from emixer_model.data.site import load_site
from emixer_model.privacy.accounting import SiteAccountant, epsilon_from_history
from server.checkpoint import load_checkpoint
from server.strategy import EmixerStrategy
from server.tools.release import check_privacy_gate
from server.tools.simulation import simulate
from tests.conftest import tiny_config


@pytest.fixture
def captured_replies(monkeypatch) -> list[str]:
    """Everything sites send to the server, as text (records' keys and values, array names)."""
    seen: list[str] = []
    original = EmixerStrategy._accept

    def spy(self, server_round, msg):
        if not msg.has_error():
            for name, record in msg.content.items():
                seen.append(f"{name}: {dict(record) if name != 'arrays' else list(record)}")
        return original(self, server_round, msg)

    monkeypatch.setattr(EmixerStrategy, "_accept", spy)
    return seen


def site_epsilon_on_disk(state: Path, delta: float) -> float:
    return SiteAccountant.load(state / "privacy" / "accountant.json", "rdp").epsilon(delta)


def test_federated_run_accounts_cumulatively_and_resumes(tmp_path, tiny_sites, captured_replies):
    run = tmp_path / "run"
    # the noise is planned to reach epsilon 4 over 2 rounds, so a third round fits the budget of 10
    privacy = {"target_epsilon": 4.0, "epsilon_budget": 10.0}
    cfg = tiny_config(privacy=privacy)
    ckpt = simulate(cfg, tiny_sites, run / "state", run / "checkpoints")
    assert ckpt.server_round == 2
    sites = ckpt.ledger["sites"]
    assert set(sites) == {"site_1", "site_2"}
    for name, site in sites.items():
        assert [h["round"] for h in site["history"]] == [1, 2]
        assert 0 < site["history"][0]["epsilon"] < site["history"][1]["epsilon"]
        recomputed = epsilon_from_history(site["history"], site["delta"], site["accountant"])
        assert recomputed == pytest.approx(site["epsilon"], rel=1e-6)
        on_disk = site_epsilon_on_disk(run / "state" / name, site["delta"])
        assert on_disk == pytest.approx(site["epsilon"], rel=1e-6)
        local = (run / "state" / name / "privacy" / "ledger.jsonl").read_text().splitlines()
        rounds = [(json.loads(line)["round"], json.loads(line)["status"]) for line in local]
        assert rounds == [(1, "trained"), (2, "trained"), (2, "commit")]  # the commit round
        assert json.loads(site["signed"][-1]["entry"])["status"] == "commit"
    first_epsilon = {name: s["epsilon"] for name, s in sites.items()}
    # every site signed its rounds for the very model the server sent: the gate verifies them
    assert check_privacy_gate(ckpt, None)["release_epsilon"] == max(first_epsilon.values())

    # a restarted server resumes at round 3; sites restore their accountants from disk
    more = tiny_config(privacy=privacy, federation={"rounds": 3, "resume": True})
    ckpt = simulate(more, tiny_sites, run / "state", run / "checkpoints")
    assert ckpt.server_round == 3
    for name, site in ckpt.ledger["sites"].items():
        assert [h["round"] for h in site["history"]] == [1, 2, 3]
        assert site["epsilon"] > first_epsilon[name]
        recomputed = epsilon_from_history(site["history"], site["delta"], site["accountant"])
        assert recomputed == pytest.approx(site["epsilon"], rel=1e-6)
    assert len(list((run / "checkpoints").glob("round-*.pt"))) == 3
    check_privacy_gate(ckpt, None)  # resumed rounds are covered too

    # nothing but arrays and aggregates reached the server (docs/PRIVACY.md invariant 4)
    text = "\n".join(captured_replies)
    assert "epsilon" in text and "signature" in text
    assert "loss-" not in text  # losses are not DP: by default they stay at the site
    for site in tiny_sites:
        assert str(site) not in text
    assert CANARY not in text
    for path in (run / "checkpoints").iterdir():
        assert CANARY.encode() not in path.read_bytes()
        assert str(tiny_sites[0]).encode() not in path.read_bytes()


def test_site_over_budget_refuses_and_the_server_stops(tmp_path, tiny_sites, caplog):
    run = tmp_path / "run"
    # a fixed noise and a budget that round 1 fits at every site and round 2 passes at every site
    sigma, delta = 1.0, 1e-3
    one_round, two_rounds = [], []
    for site in tiny_sites:
        units = len(load_site(site, tmp_path / "probe" / site.name, tiny_config().model).units)
        q = min(1.0, 8 / units)
        steps = max(1, round(1 / q))
        one_round.append(SiteAccountant("rdp").epsilon_after(steps, sigma, q, delta))
        two_rounds.append(SiteAccountant("rdp").epsilon_after(2 * steps, sigma, q, delta))
    assert max(one_round) < min(two_rounds), "the sites are too different for one budget"
    budget = (max(one_round) + min(two_rounds)) / 2
    cfg = tiny_config(
        privacy={"noise_multiplier": sigma, "epsilon_budget": budget, "delta": delta},
        federation={"rounds": 3, "on_budget_exhausted": "stop"},
    )
    ckpt = simulate(cfg, tiny_sites, run / "state", run / "checkpoints")
    for name, site in ckpt.ledger["sites"].items():
        assert site["status"] == "budget-exhausted"
        assert len(site["history"]) == 1
        assert site["epsilon"] <= budget
        local = (run / "state" / name / "privacy" / "ledger.jsonl").read_text().splitlines()
        assert [json.loads(line)["status"] for line in local[-2:]] == ["budget-exhausted", "commit"]
    assert ckpt.server_round == 2
    check_privacy_gate(ckpt, None)  # the sites signed the model training stopped at
    assert not (run / "checkpoints" / "round-0003.pt").exists()
    assert load_checkpoint(run / "checkpoints" / "round-0002.pt").arrays


def test_a_failing_site_is_left_out_and_the_round_finishes(tmp_path, tiny_sites, caplog):
    run = tmp_path / "run"
    broken = tmp_path / "site_broken"  # a site whose data folder vanished mid-run
    broken.mkdir()
    cfg = tiny_config(federation={"rounds": 1, "min_sites": 3})
    ckpt = simulate(cfg, [*tiny_sites, broken], run / "state", run / "checkpoints")
    assert ckpt.server_round == 1
    assert set(ckpt.ledger["sites"]) == {"site_1", "site_2", "site_broken"}
    # it trained nothing, and says so under its own key when it signs the final model
    broken_site = ckpt.ledger["sites"]["site_broken"]
    assert broken_site["history"] == [] and broken_site["epsilon"] == 0.0
    assert [json.loads(s["entry"])["status"] for s in broken_site["signed"]] == ["commit"]
    check_privacy_gate(ckpt, None)
    assert "site site_broken did not train: SiteDataError" in caplog.text
