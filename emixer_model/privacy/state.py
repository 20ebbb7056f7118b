"""A site's privacy state on its own disk: plan, accountant, append-only ledger, audit log, key.

Everything here lives in the site's state directory and never leaves it; the coordinator's code
never imports this module (an import-linter contract in pyproject.toml keeps it so).
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from emixer_model.config import EmixerConfig
from emixer_model.privacy.accounting import SiteAccountant
from emixer_model.privacy.ledger import SiteKey, public_key_path
from emixer_model.privacy.plan import PrivacyPlan, make_plan, plan_inputs
from emixer_model.privacy.policy import PolicyViolation, SitePolicy
from emixer_model.shared import write_json_atomic

log = logging.getLogger("emixer.site")

AUDIT_LOG = "audit.log"
SIMULATION_KEY = "signing.key"  # in <state_dir>/privacy/ when the site has no node-auth key
LEDGER_FILE = Path("privacy") / "ledger.jsonl"  # in a site's state dir
ROUND_LOCK = "round.lock"  # in the state dir's privacy/: held by the round that is training


def log_site_event(state_dir: Path, entry: dict) -> None:
    """Append one JSON line to the site's audit log (never rewritten, never sent anywhere)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / AUDIT_LOG).open("a") as f:
        f.write(json.dumps({"time": time.time(), **entry}) + "\n")


def simulation_public_key(state_dir: Path) -> str:
    """The public half of the key a simulated site signs with, as `emixer keygen` writes one: the
    demo, which runs its sites itself, enrols it (`emixer release --site-keys`)."""
    return public_key_path(Path(state_dir) / "privacy" / SIMULATION_KEY).read_text().strip()


def read_site_ledger(state_dir: Path) -> list[dict] | None:
    """Every entry of a site's append-only ledger (trained and refused rounds, with the signed
    body of each trained one); None when `state_dir` holds no ledger. Reads, never creates."""
    path = Path(state_dir) / LEDGER_FILE
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class SiteState:
    """A site's privacy state on its own disk: plan, accountant, append-only ledger, key."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir)
        self.dir = self.root / "privacy"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plan_path = self.dir / "plan.json"
        self.accountant_path = self.dir / "accountant.json"
        self.ledger_path = self.root / LEDGER_FILE

    def load_plan(self) -> PrivacyPlan | None:
        """The saved plan; None when there is none or it predates the current plan format."""
        if not self.plan_path.is_file():
            return None
        try:
            return PrivacyPlan(**json.loads(self.plan_path.read_text()))
        except (TypeError, ValueError):
            return None  # an older format: re-planned from the accountant, like any change

    def save_plan(self, plan: PrivacyPlan) -> None:
        write_json_atomic(self.plan_path, asdict(plan), fsync=True)

    @contextmanager
    def one_round_at_a_time(self) -> Iterator[None]:
        """Hold the site's round lock while a round loads, spends, saves and signs. Two runs
        served at once (one SuperNode, two coordinators' runs; or two processes on one state
        dir) would otherwise both load the accountant, train and save: one round's steps lost
        from epsilon, two entries with one number. A second round waits for the first."""
        with (self.dir / ROUND_LOCK).open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another round is training on %s; this one waits for it", self.root)
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

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

    def sign_and_append(self, key: SiteKey, entry: dict, **unsigned: str) -> dict[str, str]:
        """Sign `entry` and append it to the ledger with the time and any `unsigned` notes (a
        refusal's message), before anything leaves the site. Returns the signed record."""
        signed = key.sign(entry)
        with self.ledger_path.open("a") as f:
            f.write(json.dumps({"time": time.time(), **entry, **signed, **unsigned}) + "\n")
        return signed

    def ledger(self) -> list[dict]:
        return read_site_ledger(self.root) or []

    def trained_rounds(self) -> int:
        return sum(e["status"] == "trained" for e in self.ledger())

    def next_seq(self) -> int:
        """The number of the next entry this site signs: one more than any it signed before."""
        return max((int(e["seq"]) for e in self.ledger() if "seq" in e), default=0) + 1

    def last_delta(self) -> float | None:
        """The delta of the last round this site trained (its epsilon is stated at it); None if
        it never trained."""
        trained = [e for e in self.ledger() if e["status"] == "trained"]
        return float(trained[-1]["delta"]) if trained else None

    def signing_key(self) -> SiteKey:
        """Simulation and `train-local`: the key in the state dir, made on first use."""
        path = self.dir / SIMULATION_KEY
        return SiteKey.load(path) if path.is_file() else SiteKey.generate(path)

    def plan_round(
        self,
        cfg: EmixerConfig,
        policy: SitePolicy,
        n_units: int,
        per_patient: bool,
        accountant: SiteAccountant,
        rounds_left: int,
        *,
        population: int,
    ) -> PrivacyPlan:
        """The saved plan if its inputs still hold, else a new one from what was spent.

        `n_units` are the units training samples from; `population` every unit of the site,
        held-out ones included (the delta limit's N). Raises PolicyViolation (the run asks what
        the policy forbids) or BudgetExhausted.
        """
        inputs = plan_inputs(cfg, policy, n_units, per_patient, population=population)
        old = self.load_plan()
        if old is not None and old.inputs() == inputs:
            floor = policy.min_noise_multiplier
            if floor is not None and old.noise_multiplier < floor:
                raise PolicyViolation(
                    f"the plan's noise multiplier {old.noise_multiplier:.3f} is below this "
                    f"site's floor {floor:.3f}; refused"
                )
            return old
        fresh = make_plan(inputs, policy, accountant, rounds_left)
        if old is not None:
            changed = inputs.changed(old.inputs())
            log.warning(
                "privacy inputs changed (%s): re-planned from the epsilon already spent; "
                "noise multiplier %.3f -> %.3f",
                ", ".join(changed),
                old.noise_multiplier,
                fresh.noise_multiplier,
            )
            log_site_event(
                self.root,
                {
                    "event": "re-planned",
                    "changed": changed,
                    "noise_multiplier": fresh.noise_multiplier,
                    "sample_rate": fresh.sample_rate,
                    "steps_per_round": fresh.steps_per_round,
                },
            )
        self.save_plan(fresh)
        return fresh
