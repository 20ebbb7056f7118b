"""The server's privacy ledger: every site's privacy history as the sites reported it.

Each entry keeps what is needed to recompute the site's epsilon independently (noise multiplier,
sample rate, steps); the release's epsilon is the maximum over sites (docs/PRIVACY.md invariant 7).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SiteLedger:
    delta: float = 0.0
    accountant: str = "rdp"
    epsilon: float = 0.0  # cumulative, as reported by the site
    budget: float = 0.0
    max_grad_norm: float = 0.0
    privacy_unit: str = "patient"
    status: str = "trained"
    history: list[dict] = field(default_factory=list)  # one entry per trained round


@dataclass
class PrivacyLedger:
    sites: dict[str, SiteLedger] = field(default_factory=dict)

    def record(
        self, site: str, server_round: int, status: str, metrics: dict[str, float], accountant: str
    ) -> None:
        """Record a site round; malformed metrics raise KeyError/ValueError and change nothing."""
        values = {
            "epsilon": float(metrics["epsilon"]),
            "delta": float(metrics["delta"]),
            "budget": float(metrics["epsilon-budget"]),
            "max_grad_norm": float(metrics["max-grad-norm"]),
            "privacy_unit": "patient" if metrics.get("per-patient", 1.0) else "image",
        }
        history = None
        if status == "trained":
            history = {
                "round": server_round,
                "noise_multiplier": float(metrics["noise-multiplier"]),
                "sample_rate": float(metrics["sample-rate"]),
                "steps": int(metrics["steps"]),
                "epsilon": values["epsilon"],
                "losses": {k[5:]: v for k, v in metrics.items() if k.startswith("loss-")},
            }
        entry = self.sites.setdefault(site, SiteLedger(accountant=accountant))
        entry.status = status
        for key, value in values.items():
            setattr(entry, key, value)
        if history is not None:
            entry.history.append(history)

    def release_epsilon(self) -> float:
        return max((s.epsilon for s in self.sites.values()), default=0.0)

    def to_dict(self) -> dict:
        return {"sites": {name: asdict(s) for name, s in self.sites.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> PrivacyLedger:
        return cls({name: SiteLedger(**s) for name, s in data.get("sites", {}).items()})
