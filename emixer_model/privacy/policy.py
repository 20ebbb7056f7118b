"""A site's own privacy policy (site.yaml), enforced against whatever the run config asks.

A run config that asks for more than the policy allows (a larger delta, less noise than the floor)
refuses the round with `PolicyViolation`; a larger budget is capped at the site's; the site's
evaluation hold-out replaces the run config's (the coordinator could otherwise shrink N, and with
it the delta limit, by asking for a large hold-out).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from emixer_model.privacy.accounting import default_delta


class PolicyViolation(Exception):
    """The run config asks for something the site's own policy forbids; the round is refused."""


@dataclass(frozen=True)
class SitePolicy:
    """What a site allows (docs/PRIVACY.md invariants 3, 4, 6), enforced against any run config.

    epsilon_budget: the site never trains past it (a run may ask for less, never more); None
        (simulation, `train-local`: no site.yaml) leaves the run config's budget in force;
    max_delta: the largest delta it accepts (None: 1/(10 N)); never at or above 1/N;
    min_noise_multiplier: a floor on sigma (None: no floor);
    share_losses: whether mean training losses may leave the site (not DP-protected);
    holdout_fraction: the share of its privacy units the site keeps out of training for its
        evaluation, chosen before round 1 (data/splits.py); None (simulation, `train-local`:
        no site.yaml) leaves the run config's `train.holdout_fraction` in force;
    require_secure_mode: every round runs with Opacus' secure_mode (noise resistant to
        floating-point attacks), whatever the run config says.
    """

    epsilon_budget: float | None = None
    max_delta: float | None = None
    min_noise_multiplier: float | None = None
    share_losses: bool = False
    holdout_fraction: float | None = None
    require_secure_mode: bool = False

    def __post_init__(self) -> None:
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            raise ValueError(f"epsilon_budget must be positive, not {self.epsilon_budget}")
        if self.max_delta is not None and not 0 < self.max_delta < 1:
            raise ValueError(f"max_delta must be between 0 and 1, not {self.max_delta}")
        if self.min_noise_multiplier is not None and not self.min_noise_multiplier > 0:
            raise ValueError(
                f"min_noise_multiplier must be positive, not {self.min_noise_multiplier}"
            )
        if self.holdout_fraction is not None and not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), not {self.holdout_fraction}")

    # node config keys (flower-supernode --node-config) of each field
    NODE_KEYS = {
        "epsilon_budget": "epsilon-budget",
        "max_delta": "max-delta",
        "min_noise_multiplier": "min-noise-multiplier",
        "share_losses": "share-losses",
        "holdout_fraction": "holdout-fraction",
        "require_secure_mode": "require-secure-mode",
    }

    @classmethod
    def from_node_config(cls, node: Mapping[str, object]) -> SitePolicy:
        """The policy in a node config (written from site.yaml); absent keys take the defaults."""
        given = {f: node[k] for f, k in cls.NODE_KEYS.items() if k in node}
        for key in ("share_losses", "require_secure_mode"):
            if key in given:
                given[key] = str(given[key]).lower() in ("1", "true", "yes")
        for key in ("epsilon_budget", "max_delta", "min_noise_multiplier", "holdout_fraction"):
            if key in given:
                given[key] = float(given[key])  # type: ignore[arg-type]
        return cls(**given)  # type: ignore[arg-type]

    def node_config(self) -> dict[str, float | bool]:
        """The policy as node config entries (None fields left out)."""
        return {
            self.NODE_KEYS[f.name]: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) is not None
        }

    def budget_for(self, requested: float) -> float:
        """The budget this round answers to: the run's, capped at the site's own."""
        return requested if self.epsilon_budget is None else min(requested, self.epsilon_budget)

    def secure_mode_for(self, requested: bool) -> bool:
        """Whether the round uses Opacus' secure_mode: on if the run or the site asks for it."""
        return requested or self.require_secure_mode

    def holdout_for(self, requested: float) -> float:
        """The hold-out this site uses: its own when site.yaml sets one, whatever the run asks."""
        return requested if self.holdout_fraction is None else self.holdout_fraction

    def delta_for(self, population: int, requested: float | None) -> float:
        """The delta this round uses: the run's, if the policy allows it, else PolicyViolation.

        `population` is every privacy unit of the site, held-out ones included: the limit
        (default 1/(10 N)) must not grow when a run holds more units out of training.
        """
        limit = self.max_delta if self.max_delta is not None else default_delta(population)
        if limit >= 1 / population:
            raise PolicyViolation(
                f"site policy max_delta {limit:.2e} is not below 1/N = {1 / population:.2e} "
                f"({population} privacy units): lower max_delta in site.yaml"
            )
        if requested is None:
            return limit
        if requested > limit:
            raise PolicyViolation(
                f"the run asks for delta {requested:.2e} but this site allows at most "
                f"{limit:.2e} ({population} privacy units); refused"
            )
        return requested

    def check_noise(self, sigma: float, *, requested: bool) -> float:
        """A run-given sigma below the floor refuses; a planned one is raised to the floor."""
        floor = self.min_noise_multiplier
        if floor is None or sigma >= floor:
            return sigma
        if requested:
            raise PolicyViolation(
                f"the run asks for noise multiplier {sigma:.3f} but this site's floor is "
                f"{floor:.3f}; refused"
            )
        return floor
