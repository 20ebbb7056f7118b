"""A site's own privacy policy (site.yaml), enforced against whatever the run config asks.

A run config that asks for more than the policy allows (a larger delta, less noise than the floor)
refuses the round with `PolicyViolation`; a larger budget is capped at the site's.
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
    share_losses: whether mean training losses may leave the site (not DP-protected).
    """

    epsilon_budget: float | None = None
    max_delta: float | None = None
    min_noise_multiplier: float | None = None
    share_losses: bool = False

    def __post_init__(self) -> None:
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            raise ValueError(f"epsilon_budget must be positive, not {self.epsilon_budget}")
        if self.max_delta is not None and not 0 < self.max_delta < 1:
            raise ValueError(f"max_delta must be between 0 and 1, not {self.max_delta}")
        if self.min_noise_multiplier is not None and not self.min_noise_multiplier > 0:
            raise ValueError(
                f"min_noise_multiplier must be positive, not {self.min_noise_multiplier}"
            )

    # node config keys (flower-supernode --node-config) of each field
    NODE_KEYS = {
        "epsilon_budget": "epsilon-budget",
        "max_delta": "max-delta",
        "min_noise_multiplier": "min-noise-multiplier",
        "share_losses": "share-losses",
    }

    @classmethod
    def from_node_config(cls, node: Mapping[str, object]) -> SitePolicy:
        """The policy in a node config (written from site.yaml); absent keys take the defaults."""
        given = {f: node[k] for f, k in cls.NODE_KEYS.items() if k in node}
        if "share_losses" in given:
            given["share_losses"] = str(given["share_losses"]).lower() in ("1", "true", "yes")
        for key in ("epsilon_budget", "max_delta", "min_noise_multiplier"):
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

    def delta_for(self, n_units: int, requested: float | None) -> float:
        """The delta this round uses: the run's, if the policy allows it, else PolicyViolation."""
        limit = self.max_delta if self.max_delta is not None else default_delta(n_units)
        if limit >= 1 / n_units:
            raise PolicyViolation(
                f"site policy max_delta {limit:.2e} is not below 1/N = {1 / n_units:.2e} "
                f"({n_units} privacy units): lower max_delta in site.yaml"
            )
        if requested is None:
            return limit
        if requested > limit:
            raise PolicyViolation(
                f"the run asks for delta {requested:.2e} but this site allows at most "
                f"{limit:.2e} ({n_units} privacy units); refused"
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
