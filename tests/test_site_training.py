"""One site's round, as `emixer train-local` and the ClientApp run it: cumulative epsilon kept on
the site's disk, a rolled-back accountant refused, audit holdout units kept out of training."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from emixer_model.data.site import load_site
from emixer_model.data.splits import SplitError, load_split
from emixer_model.privacy.accounting import (
    SiteAccountant,
    epsilon_from_history,
    steps_per_epoch,
)
from emixer_model.privacy.policy import PolicyViolation, SitePolicy
from emixer_model.privacy.state import SiteState
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
    # losses are not DP-protected: they leave only when the site's policy says so
    assert not [k for k in second.metrics() if k.startswith("loss-")]
    assert "loss-report" in replace(second, share_losses=True).metrics()

    # a crash that lost the newest accountant file: the .prev copy counts one round too few
    (state / "privacy" / "accountant.json").unlink()
    with pytest.raises(ValueError, match="rolled back"):
        train_site_round(site, state, cfg, second.weights, server_round=3, planned_rounds=2)


def test_evaluation_units_are_recorded_before_round_1_and_never_trained_on(tmp_path, tiny_sites):
    site, state = tiny_sites[1], tmp_path / "state"
    data = load_site(site, tmp_path / "probe", tiny_config().model)
    cfg = tiny_config(train={"holdout_fraction": 0.5})
    result = train_site_round(site, state, cfg, None, 1, 2)
    split = load_split(state)
    held = split.sides(data)[1]
    assert len(held) == round(0.5 * len(data.units))
    assert result.num_examples == len(data.units) - len(held)
    # the second round reuses the record; a run that asks for another fraction is refused
    again = train_site_round(site, state, cfg, result.weights, 2, 2)
    assert load_split(state) == split and again.num_examples == result.num_examples
    with pytest.raises(SplitError, match="holds out 0.5"):
        train_site_round(site, state, tiny_config(train={"holdout_fraction": 0.2}), None, 3, 3)


def test_a_state_dir_that_trained_without_a_split_cannot_hold_patients_out_later(
    tmp_path, tiny_sites
):
    site, state = tiny_sites[1], tmp_path / "state"
    first = train_site_round(site, state, tiny_config(), None, 1, 2)
    with pytest.raises(SplitError, match="has trained rounds"):
        cfg = tiny_config(train={"holdout_fraction": 0.5})
        train_site_round(site, state, cfg, first.weights, 2, 2)


def _ledger(state):
    return [json.loads(line) for line in (state / "privacy" / "ledger.jsonl").open()]


def test_a_later_round_with_more_epochs_and_a_bigger_batch_cannot_pass_the_budget(
    tmp_path, tiny_sites
):
    """The review's reproduction: budget 3, round 2 asks for epochs 12 and batch 16."""
    site, state = tiny_sites[0], tmp_path / "state"
    first = train_site_round(site, state, tiny_config(privacy={"epsilon_budget": 3.0}), None, 1, 2)
    bigger = tiny_config(privacy={"epsilon_budget": 3.0}, train={"epochs": 12, "batch_size": 16})
    second = train_site_round(site, state, bigger, first.weights, 2, 2)
    assert first.status == "trained"
    accountant = SiteAccountant.load(state / "privacy" / "accountant.json", "rdp")
    assert accountant.epsilon(second.delta) <= 3.0
    if second.status == "trained":  # re-planned from what was spent: more noise, same budget
        assert second.plan.noise_multiplier > first.plan.noise_multiplier
        assert second.plan.sample_rate == min(1.0, 16 / second.num_examples)
        assert second.steps == 12 * steps_per_epoch(second.plan.sample_rate)
    else:
        assert second.status == "budget-exhausted" and second.weights is None
    events = [json.loads(line)["event"] for line in (state / "audit.log").open()]
    assert "re-planned" in events
    # the ledger records the q and steps actually used: its own history gives the true epsilon
    trained = [e for e in _ledger(state) if e["status"] == "trained"]
    assert epsilon_from_history(trained, second.delta) == accountant.epsilon(second.delta)


def test_train_local_twice_on_one_state_dir_refuses_the_second_run(tmp_path, tiny_sites):
    site, state = tiny_sites[0], tmp_path / "state"
    cfg = tiny_config(privacy={"epsilon_budget": 2.0})
    first = train_site_round(site, state, cfg, None, 1, 1)
    again = train_site_round(site, state, cfg, first.weights, 1, 1)
    assert first.status == "trained" and first.epsilon <= 2.0
    assert again.status == "budget-exhausted" and again.weights is None
    assert "past the budget" in again.message


def test_two_runs_training_at_once_on_one_state_dir_count_every_step(tmp_path, tiny_sites):
    """Two coordinators' runs served at once through one SuperNode: the second round waits for
    the first (the state dir's round lock), so the accountant counts both rounds' steps and the
    ledger numbers them 1, 2. Without the lock both load an empty accountant and one save wins."""
    site, state = tiny_sites[0], tmp_path / "state"
    cfg = tiny_config(privacy={"epsilon_budget": 100.0})
    with ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(train_site_round, site, state, cfg, None, 1, 1, run_id=run)
            for run in ("a", "b")
        ]
        results = [run.result() for run in runs]
    assert [r.status for r in results] == ["trained", "trained"]
    accountant = SiteAccountant.load(state / "privacy" / "accountant.json", "rdp")
    assert sum(steps for _, _, steps in accountant.history) == sum(r.steps for r in results)
    ledger = [json.loads(line) for line in (state / "privacy" / "ledger.jsonl").open()]
    assert sorted(e["seq"] for e in ledger) == [1, 2]
    assert max(r.epsilon for r in results) == pytest.approx(accountant.epsilon(results[0].delta))


def test_the_site_policy_refuses_a_run_that_asks_for_a_larger_delta_or_less_noise(
    tmp_path, tiny_sites, caplog
):
    site, state = tiny_sites[0], tmp_path / "state"
    result = train_site_round(site, state, tiny_config(privacy={"delta": 0.2}), None, 1, 1)
    assert result.status == "refused" and result.weights is None
    signed = json.loads(
        result.signed["entry"]
    )  # the refusal is signed: the site shows it took part
    assert (signed["status"], signed["epsilon"], signed["history"]) == ("refused", 0.0, [])
    assert "delta 2.00e-01" in result.message and "allows at most" in result.message
    audit = [json.loads(line) for line in (state / "audit.log").open()]
    assert audit[-1]["event"] == "round-refused" and "delta" in audit[-1]["message"]
    floor = SitePolicy(min_noise_multiplier=2.0)
    asked = tiny_config(privacy={"noise_multiplier": 1.0})
    refused = train_site_round(site, state, asked, None, 1, 1, policy=floor)
    assert refused.status == "refused" and "floor is 2.000" in refused.message


def test_policy_defaults_cap_delta_and_raise_the_planned_noise_to_the_floor(tmp_path):
    state = SiteState(tmp_path)
    cfg = tiny_config(privacy={"epsilon_budget": 50.0})
    policy = SitePolicy(epsilon_budget=50.0)
    plain = state.plan_round(cfg, policy, 20, True, SiteAccountant(), 1, population=20)
    assert plain.delta == pytest.approx(1 / 200)  # default 1/(10 N)
    floored = SitePolicy(epsilon_budget=50.0, min_noise_multiplier=plain.noise_multiplier * 2)
    raised = state.plan_round(cfg, floored, 21, True, SiteAccountant(), 1, population=21)
    assert raised.noise_multiplier == floored.min_noise_multiplier
    with pytest.raises(PolicyViolation, match="not below 1/N"):
        SitePolicy(max_delta=0.1).delta_for(10, None)
    node = {"epsilon-budget": 3.0, "max-delta": 1e-4, "share-losses": "false"}
    assert SitePolicy.from_node_config(node) == SitePolicy(3.0, 1e-4, None, False)
    secure = SitePolicy.from_node_config({"require-secure-mode": "true"})
    assert secure.require_secure_mode and secure.secure_mode_for(False)
    held = SitePolicy.from_node_config({"holdout-fraction": "0.2"})
    assert held.holdout_fraction == 0.2 and held.node_config()["holdout-fraction"] == 0.2
    assert SitePolicy.from_node_config({}) == SitePolicy()  # simulation: the defaults


def test_budget_shows_the_spend_per_run_and_catches_an_edited_ledger(tmp_path, tiny_sites, capsys):
    """`emixer budget STATE_DIR`: the total, each run, the plan's rounds left and the refusals,
    read from the state dir alone (nothing written); an edited, cut or rolled-back ledger or
    accountant exits 2 and says why; a folder that is no state dir is one line, exit 2."""
    from emixer_cli.main import main

    site, state = tiny_sites[0], tmp_path / "state"
    cfg = tiny_config(privacy={"epsilon_budget": 6.0})
    first = train_site_round(site, state, cfg, None, 1, 3, run_id="7")
    train_site_round(site, state, cfg, first.weights, 2, 3, run_id="7")
    train_site_round(site, state, tiny_config(privacy={"delta": 0.5}), None, 1, 1, run_id="8")
    last = train_site_round(site, state, cfg, first.weights, 1, 1, run_id="9")
    files = {p: p.stat().st_mtime_ns for p in state.rglob("*")}
    capsys.readouterr()  # training's log lines (on stdout once an earlier test ran main())

    assert main(["budget", str(state), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    accountant = SiteAccountant.load(state / "privacy" / "accountant.json", "rdp")
    assert report["epsilon"] == pytest.approx(accountant.epsilon(last.delta)) == last.epsilon
    assert report["budget"] == 6.0 and report["ledger_verifies"] and not report["problems"]
    assert [(r["run"], r["rounds"]) for r in report["runs"]] == [("7", [1, 2]), ("9", [1])]
    assert report["runs"][0]["models"][0] == ""  # round 1 trained from a fresh model
    assert [r["event"] for r in report["refusals"]] == ["round-refused"]
    plan = report["plan"]
    assert plan["epsilon_after_next_round"] > report["epsilon"]
    sigma, q, steps = plan["noise_multiplier"], plan["sample_rate"], plan["steps_per_round"]
    fits = [*accountant.history, (sigma, q, steps * plan["rounds_left"])]
    over = [*accountant.history, (sigma, q, steps * (plan["rounds_left"] + 1))]
    assert epsilon_from_history(fits, last.delta) <= 6.0 < epsilon_from_history(over, last.delta)
    assert main(["budget", str(state)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "VERIFIES" in said and "round-refused" in said and "more rounds fit" in said
    assert {p: p.stat().st_mtime_ns for p in state.rglob("*")} == files  # read only

    ledger_path = state / "privacy" / "ledger.jsonl"
    lines = ledger_path.read_text().splitlines()
    edited = json.loads(lines[0]) | {"epsilon": 0.01}
    ledger_path.write_text("\n".join([json.dumps(edited), *lines[1:]]) + "\n")
    assert main(["budget", str(state), "--json"]) == 2
    assert "plain fields differ" in " ".join(json.loads(capsys.readouterr().out)["problems"])
    ledger_path.write_text("\n".join(lines[1:]) + "\n")  # the first entry removed
    assert main(["budget", str(state)]) == 2
    assert "[2, 3, 4] are not 1..3" in " ".join(capsys.readouterr().out.split())
    ledger_path.write_text("\n".join(lines) + "\n")
    (state / "privacy" / "accountant.json").unlink()  # the .prev copy counts a round too few
    assert main(["budget", str(state), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert "rolled back" in " ".join(report["problems"]) and report["epsilon"] == last.epsilon

    for folder, said in ((tmp_path / "nowhere", "not an existing folder"), (site, "not a site's")):
        assert main(["budget", str(folder)]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert said in out and "state_dir" in out and "Traceback" not in out


def test_the_holdout_is_the_sites_and_the_coordinator_cannot_steer_delta_with_it(
    tmp_path, tiny_sites, caplog
):
    """The review's reproduction (#17 hole 4): budget 3 exhausted, then a run asking for
    holdout 0.9 to shrink N and re-plan at a larger delta. The site's hold-out wins, the delta
    limit counts every unit of the site (held-out ones included), so nothing re-plans or trains."""
    site = tiny_sites[0]
    units = len(load_site(site, tmp_path / "probe", tiny_config().model).units)
    policy = SitePolicy(epsilon_budget=3.0, holdout_fraction=0.0)
    state = tmp_path / "state"
    cfg = tiny_config(privacy={"epsilon_budget": 3.0})
    first = train_site_round(site, state, cfg, None, 1, 1, policy=policy)
    assert first.status == "trained" and first.delta == pytest.approx(1 / (10 * units))
    attack = tiny_config(privacy={"epsilon_budget": 3.0}, train={"holdout_fraction": 0.9})
    again = train_site_round(site, state, attack, first.weights, 1, 1, policy=policy)
    assert again.status == "budget-exhausted" and again.weights is None
    assert again.delta == first.delta and again.plan.n_units == units
    assert [e["status"] for e in _ledger(state)] == ["trained", "budget-exhausted"]
    assert "the site's value is used" in caplog.text
    assert load_split(state) is None  # the site holds none out; the run's 0.9 never recorded

    # a site that holds half its patients out: q over the rest, delta over all of them
    held = train_site_round(
        site, tmp_path / "held", cfg, None, 1, 1, policy=replace(policy, holdout_fraction=0.5)
    )
    assert load_split(tmp_path / "held").fraction == 0.5
    assert held.plan.n_units == units - round(0.5 * units) and held.plan.population == units
    assert held.delta == pytest.approx(1 / (10 * units))


def test_a_site_that_requires_secure_mode_trains_with_it_whatever_the_run_says(
    tmp_path, tiny_sites, monkeypatch
):
    """#17 hole 8: `secure_mode` came from the run config only; the site's policy can require it."""
    import emixer_model.site_training as site_training

    used: list[bool] = []
    real = site_training.PrivateTrainer

    def recording_trainer(nets, cfg, *args, **kwargs):
        used.append(cfg.privacy.secure_mode)
        return real(nets, cfg, *args, **kwargs)

    monkeypatch.setattr(site_training, "PrivateTrainer", recording_trainer)
    cfg = tiny_config(privacy={"secure_mode": False})
    policy = SitePolicy(require_secure_mode=True)
    result = train_site_round(tiny_sites[0], tmp_path / "state", cfg, None, 1, 1, policy=policy)
    assert result.status == "trained" and used == [True]
