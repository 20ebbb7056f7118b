"""One site's private training for one round: the function `emixer train-local` and the Flower
ClientApp both call, so the federated run and the local run share every privacy decision.

It loads the site's data, restores the site's accountant from its state directory, takes q, sigma
and steps from the site's plan (emixer_model.privacy.plan: re-planned whenever a privacy-relevant
input changed), refuses a round the site's policy forbids or that would pass the budget on
exactly those numbers (docs/PRIVACY.md invariants 3 and 6), trains through the private step, and
persists the accountant and an append-only ledger before returning. What it returns is what may
leave the site: arrays, privacy accounting and an entry the site signed; losses only if its policy
allows. The steps, by name: load_round_data, plan_within_budget (RoundRefused -> record_refusal),
train_planned_round, record_trained_round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from emixer_model.config import FINDINGS, EmixerConfig
from emixer_model.data.site import SiteData, load_site
from emixer_model.data.splits import create_or_load_split, training_data
from emixer_model.networks import (
    EmixerNets,
    build_networks,
    get_weights,
    pick_device,
    set_weights,
)
from emixer_model.privacy.accounting import SiteAccountant
from emixer_model.privacy.ledger import SiteKey, arrays_sha256, ledger_entry, status_entry
from emixer_model.privacy.plan import BudgetExhausted, PrivacyPlan, refuse_over_budget
from emixer_model.privacy.policy import PolicyViolation, SitePolicy
from emixer_model.privacy.state import SiteState, log_site_event
from emixer_model.shared import ProgressFn
from emixer_model.text.vocabulary import VOCAB_SIZE
from emixer_model.training import PrivateTrainer

log = logging.getLogger("emixer.site")


@dataclass
class SiteRoundResult:
    """What a site reports for a round: aggregates only, never per-sample values."""

    status: str  # "trained", "budget-exhausted" or "refused" (the run breaks the site's policy)
    epsilon: float  # cumulative over every round this site trained
    delta: float
    budget: float
    plan: PrivacyPlan | None
    num_examples: int = 0  # sampling units (patients or images): FedAvg's weight
    steps: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    weights: dict[str, np.ndarray] | None = None
    message: str = ""
    signed: dict[str, str] | None = None  # the ledger entry this site signed for the round
    public_key: str = ""
    share_losses: bool = False

    def metrics(self) -> dict[str, float]:
        """The numbers that may leave the site (docs/PRIVACY.md invariant 4): privacy accounting,
        the unit count FedAvg weighs by, and the mean losses only if the site's policy allows."""
        out = {
            "num-examples": float(self.num_examples),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "epsilon-budget": self.budget,
            "steps": float(self.steps),
            "trained": 1.0 if self.status == "trained" else 0.0,
        }
        if self.plan is not None:
            out |= {
                "noise-multiplier": self.plan.noise_multiplier,
                "sample-rate": self.plan.sample_rate,
                "max-grad-norm": self.plan.max_grad_norm,
                "per-patient": 1.0 if self.plan.privacy_unit == "patient" else 0.0,
            }
        if self.share_losses:
            out.update({f"loss-{name}": value for name, value in self.losses.items()})
        return out


class RoundRefused(Exception):
    """The site will not train this round: `status` is "refused" (the run breaks the site's
    policy) or "budget-exhausted"; `plan` is the round's plan when one was made."""

    def __init__(self, status: str, message: str, plan: PrivacyPlan | None) -> None:
        super().__init__(message)
        self.status, self.message, self.plan = status, message, plan


def train_site_round(
    site_dir: Path,
    state_dir: Path,
    cfg: EmixerConfig,
    global_weights: dict[str, np.ndarray] | None,
    server_round: int,
    planned_rounds: int,
    progress: ProgressFn | None = None,
    load_progress: ProgressFn | None = None,
    *,
    policy: SitePolicy | None = None,
    key: SiteKey | None = None,
    site_name: str = "",
    run_id: str = "",
) -> SiteRoundResult:
    """Train one round at one site under its policy and budget; persist accountant and ledger.

    `policy` is the site's own (site.yaml; None: the defaults); `key` signs the ledger entry
    (None: the key in the state dir, made on first use).
    """
    policy = policy or SitePolicy()
    cfg = with_site_secure_mode(cfg, policy)
    state_dir = Path(state_dir)
    data, population = load_round_data(site_dir, state_dir, cfg, policy, load_progress)
    state = SiteState(state_dir)
    with state.one_round_at_a_time():
        accountant = state.load_accountant(cfg.privacy.accountant)
        state.check_accountant(accountant)
        budget = policy.budget_for(cfg.privacy.epsilon_budget)
        rounds_left = max(1, planned_rounds - server_round + 1)
        try:
            plan = plan_within_budget(
                state, cfg, policy, data, population, accountant, budget, rounds_left
            )
        except RoundRefused as refusal:
            signer = key or state.signing_key()
            site = site_name or Path(site_dir).name
            return record_refusal(
                state,
                accountant,
                budget,
                refusal,
                signer,
                site,
                run_id,
                server_round,
                global_weights,
            )
        nets, summary = train_planned_round(
            data, cfg, global_weights, plan, accountant, server_round, progress
        )
        signed, signer = record_trained_round(
            state,
            key,
            accountant,
            plan,
            int(summary["steps"]),
            global_weights,
            budget,
            site=site_name or Path(site_dir).name,
            run_id=run_id,
            server_round=server_round,
        )
        return SiteRoundResult(
            status="trained",
            epsilon=accountant.epsilon(plan.delta),
            delta=plan.delta,
            budget=budget,
            plan=plan,
            num_examples=plan.n_units,
            steps=int(summary["steps"]),
            losses=summary["losses"],
            weights=get_weights(nets),
            signed=signed,
            public_key=signer.public_key(),
            share_losses=policy.share_losses,
        )


def with_site_secure_mode(cfg: EmixerConfig, policy: SitePolicy) -> EmixerConfig:
    """The run config with Opacus' secure_mode on when the site's policy requires it."""
    secure = policy.secure_mode_for(cfg.privacy.secure_mode)
    if secure == cfg.privacy.secure_mode:
        return cfg
    log.warning(
        "the run config has privacy.secure_mode off; this site requires it "
        "(require_secure_mode in site.yaml), so the round runs with it on"
    )
    return replace(cfg, privacy=replace(cfg.privacy, secure_mode=True))


def load_round_data(
    site_dir: Path,
    state_dir: Path,
    cfg: EmixerConfig,
    policy: SitePolicy,
    load_progress: ProgressFn | None,
) -> tuple[SiteData, int]:
    """(the site's data without its evaluation units, the number of all its privacy units).

    The hold-out is the site's (`holdout_fraction` in site.yaml; the run config's only when the
    site sets none), chosen before round 1 and recorded in the state dir (data/splits.py):
    `emixer evaluate` scores and `emixer audit` attacks exactly those patients, so they must
    never be trained on. The count of all units, held-out ones included, is what the delta limit
    is taken from, so no run config can move it.
    """
    data = load_site(
        Path(site_dir),
        state_dir,
        cfg.model,
        uncertain_as=cfg.train.uncertain_as,
        progress=load_progress,
    )
    fraction = policy.holdout_for(cfg.train.holdout_fraction)
    if fraction != cfg.train.holdout_fraction:
        log.warning(
            "the run config asks for train.holdout_fraction %g; this site holds out %g "
            "(holdout_fraction in site.yaml), and the site's value is used",
            cfg.train.holdout_fraction,
            fraction,
        )
    trained = SiteState(state_dir).trained_rounds() > 0
    split = create_or_load_split(data, state_dir, fraction, cfg.train.seed, already_trained=trained)
    return training_data(data, split), len(data.units)


def plan_within_budget(
    state: SiteState,
    cfg: EmixerConfig,
    policy: SitePolicy,
    data: SiteData,
    population: int,
    accountant: SiteAccountant,
    budget: float,
    rounds_left: int,
) -> PrivacyPlan:
    """The round's plan (q, sigma, steps), or RoundRefused before any step: when the run asks
    what the site's policy forbids, or when exactly those numbers would pass the budget.
    `population` counts every unit of the site, held-out ones included (the delta limit's N)."""
    try:
        plan = state.plan_round(
            cfg,
            policy,
            len(data.units),
            data.per_patient,
            accountant,
            rounds_left,
            population=population,
        )
    except PolicyViolation as err:
        raise RoundRefused("refused", f"site policy: {err}", None) from None
    except BudgetExhausted as err:
        raise RoundRefused("budget-exhausted", str(err), None) from None
    over = refuse_over_budget(accountant, plan, budget)
    if over:
        raise RoundRefused("budget-exhausted", over, plan)
    return plan


def record_refusal(
    state: SiteState,
    accountant: SiteAccountant,
    budget: float,
    refusal: RoundRefused,
    key: SiteKey,
    site: str,
    run_id: str,
    server_round: int,
    global_weights: dict[str, np.ndarray] | None,
) -> SiteRoundResult:
    """Sign the refusal and write it to the ledger and the audit log: the site shows why it did
    not train, and a site that never trained still appears in the release's ledger under its own
    key (docs/PRIVACY.md invariant 7). The result carries the epsilon spent so far, no weights."""
    entry, signed = record_status(
        state,
        key,
        refusal.status,
        accountant,
        budget,
        site=site,
        run_id=run_id,
        server_round=server_round,
        weights=global_weights,
        message=refusal.message,
    )
    return SiteRoundResult(
        refusal.status,
        entry["epsilon"],
        entry["delta"] or 0.0,
        budget,
        refusal.plan,
        message=refusal.message,
        signed=signed,
        public_key=key.public_key(),
    )


def commit_model(
    state_dir: Path,
    cfg: EmixerConfig,
    weights: dict[str, np.ndarray],
    server_round: int,
    *,
    policy: SitePolicy | None = None,
    key: SiteKey | None = None,
    site_name: str,
    run_id: str = "",
) -> tuple[dict[str, str], SiteKey]:
    """Sign the model a run ended with, and what this site had spent by then: a release must
    name a model every site it trained from signed for (docs/PRIVACY.md invariant 7), and the
    site's own ledger can then find that model by its hash in any later check. Returns the
    signed entry and the key that signed it."""
    state = SiteState(state_dir)
    with state.one_round_at_a_time():
        accountant = state.load_accountant(cfg.privacy.accountant)
        state.check_accountant(accountant)
        signer = key or state.signing_key()
        _, signed = record_status(
            state,
            signer,
            "commit",
            accountant,
            (policy or SitePolicy()).budget_for(cfg.privacy.epsilon_budget),
            site=site_name,
            run_id=run_id,
            server_round=server_round,
            weights=weights,
        )
    return signed, signer


def record_status(
    state: SiteState,
    key: SiteKey,
    status: str,
    accountant: SiteAccountant,
    budget: float,
    *,
    site: str,
    run_id: str,
    server_round: int,
    weights: dict[str, np.ndarray] | None,
    message: str = "",
) -> tuple[dict, dict[str, str]]:
    """Sign an entry for a round this site did not train, or for the run's final model, and
    write it to the site's ledger and audit log. Returns the entry and its signed record."""
    entry = status_entry(
        site=site,
        run=run_id,
        server_round=server_round,
        seq=state.next_seq(),
        status=status,
        accountant=accountant,
        delta=state.last_delta(),
        model_sha256=arrays_sha256(weights),
        budget=budget,
    )
    signed = state.sign_and_append(key, entry, message=message)
    event = "model-committed" if status == "commit" else f"round-{status}"
    log_site_event(
        state.root,
        {
            "event": event,
            "run": run_id,
            "round": server_round,
            "status": status,
            "model_sha256": entry["model_sha256"],
            "epsilon": entry["epsilon"],
            "message": message,
        },
    )
    return entry, signed


def train_planned_round(
    data: SiteData,
    cfg: EmixerConfig,
    global_weights: dict[str, np.ndarray] | None,
    plan: PrivacyPlan,
    accountant: SiteAccountant,
    server_round: int,
    progress: ProgressFn | None,
) -> tuple[EmixerNets, dict]:
    """The plan's private steps from the global weights; the accountant counts every step.
    Returns the trained networks and the trainer's summary {"steps", "losses"}."""
    device = pick_device(cfg.train.device)
    nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
    if global_weights is not None:
        set_weights(nets, global_weights)
    trainer = PrivateTrainer(nets, cfg, accountant, device, plan=plan)
    summary = trainer.train_steps(
        data,
        plan.steps_per_round,
        sampler_seed=cfg.train.seed * 100_003 + server_round,
        progress=progress,
    )
    return nets, summary


def record_trained_round(
    state: SiteState,
    key: SiteKey | None,
    accountant: SiteAccountant,
    plan: PrivacyPlan,
    steps: int,
    global_weights: dict[str, np.ndarray] | None,
    budget: float,
    *,
    site: str,
    run_id: str,
    server_round: int,
) -> tuple[dict[str, str], SiteKey]:
    """Persist the accountant, then sign the round's ledger entry and append it, before anything
    leaves the site. Returns the signed entry and the key that signed it (`key`, or the state
    dir's own, made on first use)."""
    accountant.save(state.accountant_path)
    entry = ledger_entry(
        site=site,
        run=run_id,
        server_round=server_round,
        seq=state.next_seq(),
        plan=plan,
        steps=steps,
        accountant=accountant,
        model_sha256=arrays_sha256(global_weights),
        budget=budget,
    )
    signer = key or state.signing_key()
    return state.sign_and_append(signer, entry), signer
