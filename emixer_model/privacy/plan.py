"""A site's privacy plan: q, sigma and steps per round, fixed for the horizon, and the budget check.

The trainer and the signed ledger entry both read q, sigma and the clip norm from the plan, so what
the optimizer uses and what the site signs have one source. If a privacy-relevant input changes
(batch size, epochs, unit count, delta, clip norm, sigma), the site re-plans from what its
accountant has already spent (`emixer_model.privacy.state.SiteState.plan_round`).
`refuse_over_budget` is the check before any step, on exactly the q, sigma and steps the round runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from emixer_model.config import EmixerConfig
from emixer_model.privacy.accounting import SiteAccountant, plan_noise_multiplier, steps_per_epoch
from emixer_model.privacy.policy import SitePolicy


@dataclass
class PrivacyPlan:
    """The noise plan of a site: q, sigma and steps per round, and the inputs it was made from.

    When any input differs at a later round the site re-plans (see `plan_round`).
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    target_epsilon: float
    delta: float
    accountant: str
    max_grad_norm: float
    privacy_unit: str  # "patient" or "image" (docs/PRIVACY.md invariant 6)
    batch_size: int
    epochs: int
    n_units: int
    requested_noise: float | None  # the run config's sigma, if it gave one

    def inputs(self) -> dict[str, object]:
        """The privacy-relevant inputs (`plan_inputs`); a change in any of them re-plans."""
        return {key: getattr(self, key) for key in INPUT_KEYS}


INPUT_KEYS = (
    "batch_size",
    "epochs",
    "n_units",
    "privacy_unit",
    "delta",
    "max_grad_norm",
    "requested_noise",
    "accountant",
    "target_epsilon",
)


class BudgetExhausted(Exception):
    """No noise multiplier lets the planned rounds fit in what is left of the budget."""


def plan_inputs(
    cfg: EmixerConfig, policy: SitePolicy, n_units: int, per_patient: bool
) -> dict[str, object]:
    """The privacy-relevant inputs of a plan from today's config, data and policy."""
    unit = "patient" if per_patient else "image"  # what q is computed over, as the ledger names it
    budget = policy.budget_for(cfg.privacy.epsilon_budget)
    requested = cfg.privacy.noise_multiplier
    if requested is not None:
        policy.check_noise(requested, requested=True)
    return {
        "batch_size": cfg.train.batch_size,
        "epochs": cfg.train.epochs,
        "n_units": n_units,
        "privacy_unit": unit,
        "delta": policy.delta_for(n_units, cfg.privacy.delta),
        "max_grad_norm": cfg.privacy.max_grad_norm,
        "requested_noise": requested,
        "accountant": cfg.privacy.accountant,
        "target_epsilon": min(cfg.privacy.target_epsilon or budget, budget),
    }


def make_plan(
    inputs: dict[str, object], policy: SitePolicy, accountant: SiteAccountant, rounds_left: int
) -> PrivacyPlan:
    """Fix sigma for `rounds_left` rounds of these inputs, counting epsilon already spent."""
    n_units, batch_size = int(inputs["n_units"]), int(inputs["batch_size"])  # type: ignore[call-overload]
    sample_rate = min(1.0, batch_size / n_units)
    steps_per_round = int(inputs["epochs"]) * steps_per_epoch(sample_rate)  # type: ignore[call-overload]
    delta, target = float(inputs["delta"]), float(inputs["target_epsilon"])  # type: ignore[arg-type]
    requested = inputs["requested_noise"]
    if requested is not None:
        sigma = float(requested)  # type: ignore[arg-type]
    else:
        try:
            sigma = plan_noise_multiplier(
                accountant, target, delta, sample_rate, steps_per_round * rounds_left
            )
        except ValueError as err:
            raise BudgetExhausted(f"budget exhausted: {err}") from None
        sigma = policy.check_noise(sigma, requested=False)
    return PrivacyPlan(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        planned_rounds=rounds_left,
        **inputs,  # type: ignore[arg-type]
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
