"""One site's private training for one round: the function `emixer train-local` and the Flower
ClientApp both call, so the federated run and the local run share every privacy decision.

It loads the site's data, restores the site's accountant from its state directory, plans the noise
multiplier once for the whole horizon, refuses a round that would pass the budget (docs/PRIVACY.md
invariant 3), trains through the private step, and persists the accountant and an append-only
ledger before returning. What it returns is what may leave the site: arrays and aggregates.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from emixer_model.config import FINDINGS, EmixerConfig
from emixer_model.data.site import SiteData, holdout_units, load_site
from emixer_model.networks import build_networks, get_weights, pick_device, set_weights
from emixer_model.privacy import SiteAccountant, default_delta, plan_noise_multiplier
from emixer_model.text.vocabulary import VOCAB_SIZE
from emixer_model.training import PrivateTrainer, steps_per_epoch

ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclass
class PrivacyPlan:
    """The noise plan fixed at a site's first round for the whole horizon (never re-derived)."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    target_epsilon: float
    delta: float
    accountant: str
    max_grad_norm: float
    privacy_unit: str  # "patient" or "image" (docs/PRIVACY.md invariant 6)


@dataclass
class SiteRoundResult:
    """What a site reports for a round: aggregates only, never per-sample values."""

    status: str  # "trained" or "budget-exhausted"
    epsilon: float  # cumulative over every round this site trained
    delta: float
    budget: float
    plan: PrivacyPlan
    num_examples: int = 0  # sampling units (patients or images): FedAvg's weight
    steps: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    weights: dict[str, np.ndarray] | None = None
    message: str = ""

    def metrics(self) -> dict[str, float]:
        """The numbers that may leave the site (docs/PRIVACY.md invariant 4)."""
        out = {
            "num-examples": float(self.num_examples),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "epsilon-budget": self.budget,
            "noise-multiplier": self.plan.noise_multiplier,
            "sample-rate": self.plan.sample_rate,
            "max-grad-norm": self.plan.max_grad_norm,
            "steps": float(self.steps),
            "trained": 1.0 if self.status == "trained" else 0.0,
            "per-patient": 1.0 if self.plan.privacy_unit == "patient" else 0.0,
        }
        out.update({f"loss-{name}": value for name, value in self.losses.items()})
        return out


class SiteState:
    """A site's privacy state on its own disk: plan, accountant and append-only ledger."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "privacy"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plan_path = self.dir / "plan.json"
        self.accountant_path = self.dir / "accountant.json"
        self.ledger_path = self.dir / "ledger.jsonl"

    def load_plan(self) -> PrivacyPlan | None:
        if not self.plan_path.is_file():
            return None
        return PrivacyPlan(**json.loads(self.plan_path.read_text()))

    def save_plan(self, plan: PrivacyPlan) -> None:
        tmp = self.plan_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(plan), indent=2))
        tmp.replace(self.plan_path)

    def load_accountant(self, kind: str) -> SiteAccountant:
        if self.accountant_path.is_file() or self.accountant_path.with_suffix(".prev").is_file():
            return SiteAccountant.load(self.accountant_path, kind)
        return SiteAccountant(kind)

    def check_accountant(self, accountant: SiteAccountant) -> None:
        """Refuse an accountant that counts fewer steps than the site's own ledger (e.g. restored
        from the .prev copy after a crash): training on it would under-report epsilon."""
        counted = sum(int(steps) for _, _, steps in accountant.history)
        trained = sum(int(e.get("steps", 0)) for e in self.ledger() if e["status"] == "trained")
        if counted < trained:
            raise ValueError(
                f"the site's accountant counts {counted} private steps but its ledger "
                f"{self.ledger_path} records {trained}; the accountant file was lost or rolled "
                "back. Restore accountant.json from a backup before training again"
            )

    def append_ledger(self, entry: dict) -> None:
        with self.ledger_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def ledger(self) -> list[dict]:
        if not self.ledger_path.is_file():
            return []
        return [json.loads(line) for line in self.ledger_path.read_text().splitlines() if line]


def _make_plan(
    cfg: EmixerConfig, data: SiteData, accountant: SiteAccountant, planned_rounds: int
) -> PrivacyPlan:
    """Fix the noise multiplier once for rounds x local steps, counting epsilon already spent."""
    n_units = len(data.units)
    sample_rate = min(1.0, cfg.train.batch_size / n_units)
    steps_per_round = cfg.train.epochs * steps_per_epoch(sample_rate)
    delta = cfg.privacy.delta or default_delta(n_units)
    target = cfg.privacy.target_epsilon or cfg.privacy.epsilon_budget
    target = min(target, cfg.privacy.epsilon_budget)
    if cfg.privacy.noise_multiplier is not None:
        sigma = cfg.privacy.noise_multiplier
    else:
        sigma = plan_noise_multiplier(
            accountant, target, delta, sample_rate, steps_per_round * planned_rounds
        )
    return PrivacyPlan(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        planned_rounds=planned_rounds,
        target_epsilon=target,
        delta=delta,
        accountant=cfg.privacy.accountant,
        max_grad_norm=cfg.privacy.max_grad_norm,
        privacy_unit="patient" if data.per_patient else "image",
    )


def train_site_round(
    site_dir: Path,
    state_dir: Path,
    cfg: EmixerConfig,
    global_weights: dict[str, np.ndarray] | None,
    server_round: int,
    planned_rounds: int,
    progress: ProgressFn | None = None,
    load_progress: Callable[[int, int], None] | None = None,
) -> SiteRoundResult:
    """Train one round at one site under its privacy budget; persist the accountant and ledger."""
    data = load_site(
        Path(site_dir),
        Path(state_dir),
        cfg.model,
        uncertain_as=cfg.train.uncertain_as,
        progress=load_progress,
    )
    if cfg.train.holdout_fraction > 0:
        held_out = holdout_units(len(data.units), cfg.train.holdout_fraction, cfg.train.seed)
        data = data.without_units(held_out)
    state = SiteState(Path(state_dir))
    accountant = state.load_accountant(cfg.privacy.accountant)
    state.check_accountant(accountant)
    plan = state.load_plan()
    if plan is None:
        plan = _make_plan(cfg, data, accountant, planned_rounds)
        state.save_plan(plan)
    budget = cfg.privacy.epsilon_budget
    spent = accountant.epsilon(plan.delta)
    would_reach = accountant.epsilon_after(
        plan.steps_per_round, plan.noise_multiplier, plan.sample_rate, plan.delta
    )
    if would_reach > budget:
        message = (
            f"budget exhausted: this round would take epsilon from {spent:.3f} to "
            f"{would_reach:.3f}, past the budget {budget:.3f} (delta {plan.delta:.2e})"
        )
        state.append_ledger(
            {
                "round": server_round,
                "time": time.time(),
                "status": "budget-exhausted",
                "epsilon": spent,
                "delta": plan.delta,
                "message": message,
            }
        )
        return SiteRoundResult("budget-exhausted", spent, plan.delta, budget, plan, message=message)

    device = pick_device(cfg.train.device)
    nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
    if global_weights is not None:
        set_weights(nets, global_weights)
    trainer = PrivateTrainer(
        nets,
        cfg,
        n_units=len(data.units),
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        accountant=accountant,
        device=device,
    )
    summary = trainer.train_steps(
        data,
        plan.steps_per_round,
        sampler_seed=cfg.train.seed * 100_003 + server_round,
        progress=progress,
    )
    epsilon = accountant.epsilon(plan.delta)
    accountant.save(state.accountant_path)
    state.append_ledger(
        {
            "round": server_round,
            "time": time.time(),
            "status": "trained",
            "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate,
            "steps": summary["steps"],
            "epsilon": epsilon,
            "delta": plan.delta,
            "accountant": plan.accountant,
            "privacy_unit": plan.privacy_unit,
        }
    )
    return SiteRoundResult(
        status="trained",
        epsilon=epsilon,
        delta=plan.delta,
        budget=budget,
        plan=plan,
        num_examples=len(data.units),
        steps=int(summary["steps"]),
        losses=summary["losses"],
        weights=get_weights(nets),
    )
