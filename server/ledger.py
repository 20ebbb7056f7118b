"""The server's privacy ledger: the entries each site signed, and which sites each round aggregated.

The server stores what the sites signed (emixer_model.privacy.ledger.ledger_entry) and pins each
site's public key at its first entry; it never computes a site's epsilon itself. Epsilon, delta
and the per-round history shown in checkpoints and logs are read from the signed entries; the
release gate re-verifies all of it (docs/PRIVACY.md invariant 7). Losses are kept only when a site's
policy sent them, apart from the signed entries, and never go into a release.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from emixer_model.privacy.ledger import HISTORY_KEYS, verify_signed


@dataclass
class SiteLedger:
    public_key: str = ""  # pinned at the site's first signed entry
    status: str = "trained"  # the site's last reply
    budget: float = 0.0  # as the site last reported it
    signed: list[dict] = field(default_factory=list)  # {"entry": canonical JSON, "signature"}
    losses: list[dict] = field(default_factory=list)  # only what the site's policy let leave

    def entries(self) -> list[dict]:
        return [json.loads(s["entry"]) for s in self.signed]

    def summary(self) -> dict:
        """Display fields read from the newest signed entry (the gate recomputes, never these)."""
        entries = self.entries()
        last = entries[-1] if entries else {}
        trained = [e for e in entries if e["status"] == "trained"]
        last_trained = trained[-1] if trained else {}
        losses = {item["round"]: item["losses"] for item in self.losses}
        history = []
        for entry in trained:
            row = {key: entry[key] for key in HISTORY_KEYS}
            if entry["round"] in losses:
                row["losses"] = losses[entry["round"]]
            history.append(row)
        return {
            "epsilon": last.get("epsilon", 0.0),
            "delta": last_trained.get("delta", 0.0),
            "accountant": last.get("accountant", ""),
            "max_grad_norm": last_trained.get("max_grad_norm", 0.0),
            "privacy_unit": last_trained.get("privacy_unit", ""),
            "budget": self.budget,
            "status": self.status,
            "history": history,
        }


@dataclass
class PrivacyLedger:
    sites: dict[str, SiteLedger] = field(default_factory=dict)
    rounds: dict[str, dict] = field(default_factory=dict)  # round -> model hash, sites aggregated

    def record(
        self,
        site: str,
        server_round: int,
        status: str,
        metrics: dict[str, float],
        signed: dict | None = None,
        model_sha256: str = "",
    ) -> None:
        """Record a site's reply; a trained round needs an entry the site signed for this round,
        this global model and this status, and a refused one may bring one (docs/PRIVACY.md
        invariant 7). Anything malformed raises KeyError/ValueError and changes nothing."""
        budget = float(metrics["epsilon-budget"])
        if signed is None and status == "trained":
            raise ValueError("a trained round without a signed ledger entry")
        entry = self.sites.get(site) or SiteLedger()
        if signed is not None:
            self._append(entry, site, server_round, status, signed, model_sha256)
        self.sites[site] = entry
        entry.status, entry.budget = status, budget
        if status == "trained":
            losses = {k[5:]: v for k, v in metrics.items() if k.startswith("loss-")}
            if losses:
                entry.losses.append({"round": server_round, "losses": losses})

    def record_commit(self, site: str, server_round: int, signed: dict, model_sha256: str) -> None:
        """Record the entry a site signed for the model the run ended with (round
        `server_round`); its last round's status stays. Raises like `record`."""
        entry = self.sites.get(site) or SiteLedger()
        self._append(entry, site, server_round, "commit", signed, model_sha256)
        self.sites[site] = entry

    @staticmethod
    def _append(
        entry: SiteLedger,
        site: str,
        server_round: int,
        status: str,
        signed: dict,
        model_sha256: str,
    ) -> None:
        """Verify that `site` signed `signed` with its pinned key for this round, status and
        model, then keep it; ValueError/KeyError otherwise, and nothing changes."""
        key = str(signed["public-key"])
        if entry.public_key and key != entry.public_key:
            raise ValueError("the site signed with a different key than before")
        record = {"entry": str(signed["entry"]), "signature": str(signed["signature"])}
        content = verify_signed(record, key)
        if (content["site"], content["round"], content["status"]) != (site, server_round, status):
            raise ValueError(
                f"the entry was signed for site {content['site']} round {content['round']} "
                f"status {content['status']}"
            )
        if content["model_sha256"] != model_sha256:
            raise ValueError("the entry was signed for another global model")
        entry.public_key = key
        entry.signed.append(record)

    def record_round(self, server_round: int, model_sha256: str, sites: list[str]) -> None:
        """Which sites' updates round `server_round` aggregated, from which global model."""
        self.rounds[str(server_round)] = {"model_sha256": model_sha256, "sites": sorted(sites)}

    def release_epsilon(self) -> float:
        return max((s.summary()["epsilon"] for s in self.sites.values()), default=0.0)

    def to_dict(self) -> dict:
        return {
            "sites": {
                name: {
                    **s.summary(),
                    "public_key": s.public_key,
                    "signed": s.signed,
                    "losses": s.losses,
                }
                for name, s in self.sites.items()
            },
            "rounds": self.rounds,
        }

    @classmethod
    def from_dict(cls, data: dict) -> PrivacyLedger:
        sites = {
            name: SiteLedger(
                public_key=s.get("public_key", ""),
                status=s.get("status", "trained"),
                budget=float(s.get("budget", 0.0)),
                signed=list(s.get("signed", [])),
                losses=list(s.get("losses", [])),
            )
            for name, s in data.get("sites", {}).items()
        }
        return cls(sites, dict(data.get("rounds", {})))
