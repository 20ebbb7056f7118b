"""A site's privacy plan: q, sigma and steps per round, fixed for the horizon, and the budget check.

The trainer and the signed ledger entry both read q, sigma and the clip norm from the plan, so what
the optimizer uses and what the site signs have one source. If a privacy-relevant input changes
(batch size, epochs, unit count, population, delta, clip norm, sigma), the site re-plans from
what its accountant has already spent (`emixer_model.privacy.state.SiteState.plan_round`).
`refuse_over_budget` is the check before any step, on exactly the q, sigma and steps the round runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from emixer_model.config import EmixerConfig
from emixer_model.privacy.accounting import SiteAccountant, plan_noise_multiplier, steps_per_epoch
from emixer_model.privacy.policy import SitePolicy


@dataclass(frozen=True)
class PlanInputs:
    """The privacy-relevant inputs of a plan (config, data, policy); a change in any re-plans."""

    batch_size: int
    epochs: int
    n_units: int  # the units training samples from: q = batch_size / n_units
    population: int  # every unit of the site, held-out ones included: delta's limit
    privacy_unit: str  # "patient" or "image" (docs/PRIVACY.md invariant 6)
    delta: float
    max_grad_norm: float
    requested_noise: float | None  # the run config's sigma, if it gave one
    accountant: str
    target_epsilon: float

    def changed(self, other: PlanInputs) -> list[str]:
        """The names of the inputs that differ from `other`'s, for the audit log's re-plan line."""
        return sorted(
            f.name for f in fields(PlanInputs) if getattr(self, f.name) != getattr(other, f.name)
        )


@dataclass(frozen=True)
class PrivacyPlan(PlanInputs):
    """The noise plan of a site: its inputs, and the q, sigma and steps per round made from them.

    When any input differs at a later round the site re-plans (`SiteState.plan_round`).
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int

    def inputs(self) -> PlanInputs:
        """The inputs this plan was made from, to compare with today's (`plan_inputs`)."""
        return PlanInputs(**{f.name: getattr(self, f.name) for f in fields(PlanInputs)})


class BudgetExhausted(Exception):
    """No noise multiplier lets the planned rounds fit in what is left of the budget."""


def plan_inputs(
    cfg: EmixerConfig,
    policy: SitePolicy,
    n_units: int,
    per_patient: bool,
    *,
    population: int | None = None,
) -> PlanInputs:
    """The privacy-relevant inputs of a plan from today's config, data and policy.

    `population`: every privacy unit of the site before any evaluation hold-out (None: nothing
    is held out, so it is `n_units`); the delta limit is taken from it, never from `n_units`.
    """
    population = n_units if population is None else population
    budget = policy.budget_for(cfg.privacy.epsilon_budget)
    requested = cfg.privacy.noise_multiplier
    if requested is not None:
        policy.check_noise(requested, requested=True)
    return PlanInputs(
        batch_size=cfg.train.batch_size,
        epochs=cfg.train.epochs,
        n_units=n_units,
        population=population,
        # what q is computed over, as the ledger names it
        privacy_unit="patient" if per_patient else "image",
        delta=policy.delta_for(population, cfg.privacy.delta),
        max_grad_norm=cfg.privacy.max_grad_norm,
        requested_noise=requested,
        accountant=cfg.privacy.accountant,
        target_epsilon=min(cfg.privacy.target_epsilon or budget, budget),
    )


def make_plan(
    inputs: PlanInputs, policy: SitePolicy, accountant: SiteAccountant, rounds_left: int
) -> PrivacyPlan:
    """Fix sigma for `rounds_left` rounds of these inputs, counting epsilon already spent."""
    sample_rate = min(1.0, inputs.batch_size / inputs.n_units)
    steps_per_round = inputs.epochs * steps_per_epoch(sample_rate)
    if inputs.requested_noise is not None:
        sigma = float(inputs.requested_noise)
    else:
        try:
            sigma = plan_noise_multiplier(
                accountant,
                inputs.target_epsilon,
                inputs.delta,
                sample_rate,
                steps_per_round * rounds_left,
            )
        except ValueError as err:
            raise BudgetExhausted(f"budget exhausted: {err}") from None
        sigma = policy.check_noise(sigma, requested=False)
    return PrivacyPlan(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        planned_rounds=rounds_left,
        **asdict(inputs),
    )


def refuse_over_budget(accountant: SiteAccountant, plan: PrivacyPlan, budget: float) -> str | None:
    """None if the round's exact (steps, q, sigma) stays within `budget`, else why not."""
    spent = accountant.epsilon(plan.delta)
    would_reach = accountant.epsilon_after(
        plan.steps_per_round, plan.noise_multiplier, plan.sample_rate, plan.delta
    )
    if would_reach <= budget:
        return None
    return (
        f"budget exhausted: this round ({plan.steps_per_round} steps at q {plan.sample_rate:.4f}, "
        f"sigma {plan.noise_multiplier:.3f}) would take epsilon from {spent:.3f} to "
        f"{would_reach:.3f}, past the budget {budget:.3f} (delta {plan.delta:.2e})"
    )
