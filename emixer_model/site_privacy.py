"""A site's privacy, in one place: its own policy, its plan, its state on disk, the budget check
and the signed ledger entry. The trainer and the round read q, sigma and steps from here only.

- `SitePolicy`: what the site allows, whatever the run config asks (site.yaml; defaults in
  simulation). A run config that asks for more (a larger delta, less noise) refuses the round.
- `PrivacyPlan`: the noise multiplier, sample rate and steps per round, fixed for the horizon. If
  a privacy-relevant input changes (batch size, epochs, unit count, delta, clip norm, sigma), the
  site RE-PLANS from what its accountant has already spent; the re-plan goes to the audit log.
- `refuse_over_budget`: the check before any step, on exactly the q, sigma and steps the round runs.
- `ledger_entry` / `SiteKey`: each trained round becomes an entry the site signs with its ECDSA key
  (its node-auth key in deployment, one made in its state dir in simulation), carrying the site's
  whole accountant history, so anyone can recompute its epsilon from signed data alone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from importlib.metadata import version
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from emixer_model.config import EmixerConfig
from emixer_model.privacy import (
    SiteAccountant,
    default_delta,
    epsilon_from_history,
    normalise_history,
    plan_noise_multiplier,
)
from emixer_model.shared import write_json_atomic
from emixer_model.training import steps_per_epoch

log = logging.getLogger("emixer.site")

AUDIT_LOG = "audit.log"
SIMULATION_KEY = "signing.key"  # in <state_dir>/privacy/ when the site has no node-auth key


class PolicyViolation(Exception):
    """The run config asks for something the site's own policy forbids; the round is refused."""


# ---------------------------------------------------------------------------------------------
# the site's policy


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


# ---------------------------------------------------------------------------------------------
# the plan


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


# ---------------------------------------------------------------------------------------------
# the state on the site's disk


def log_site_event(state_dir: Path, entry: dict) -> None:
    """Append one JSON line to the site's audit log (never rewritten, never sent anywhere)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / AUDIT_LOG).open("a") as f:
        f.write(json.dumps({"time": time.time(), **entry}) + "\n")


LEDGER_FILE = Path("privacy") / "ledger.jsonl"  # in a site's state dir


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
        return read_site_ledger(self.root) or []

    def trained_rounds(self) -> int:
        return sum(e["status"] == "trained" for e in self.ledger())

    def plan_round(
        self,
        cfg: EmixerConfig,
        policy: SitePolicy,
        n_units: int,
        per_patient: bool,
        accountant: SiteAccountant,
        rounds_left: int,
    ) -> PrivacyPlan:
        """The saved plan if its inputs still hold, else a new one from what was spent.

        Raises PolicyViolation (the run asks what the policy forbids) or BudgetExhausted.
        """
        inputs = plan_inputs(cfg, policy, n_units, per_patient)
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
            changed = sorted(k for k, v in inputs.items() if old.inputs().get(k) != v)
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


# ---------------------------------------------------------------------------------------------
# the signed ledger entry


def arrays_sha256(weights: Mapping[str, np.ndarray] | None) -> str:
    """A stable hash of model arrays (names, dtypes, shapes, bytes); '' for no model."""
    if weights is None:
        return ""
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def ledger_entry(
    *,
    site: str,
    run: str,
    server_round: int,
    seq: int,
    plan: PrivacyPlan,
    steps: int,
    accountant: SiteAccountant,
    model_sha256: str,
    budget: float,
) -> dict:
    """What a site signs for one trained round; `history` is its whole accountant history."""
    return {
        "site": site,
        "run": run,
        "round": server_round,
        "seq": seq,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "steps": steps,
        "delta": plan.delta,
        "max_grad_norm": plan.max_grad_norm,
        "privacy_unit": plan.privacy_unit,
        "n_units": plan.n_units,
        "accountant": accountant.kind,
        "opacus": version("opacus"),
        "model_sha256": model_sha256,
        "history": [list(entry) for entry in accountant.history],
        "epsilon": accountant.epsilon(plan.delta),
        "budget": budget,
    }


def canonical(entry: Mapping) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, so any reader re-derives them."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


class SiteKey:
    """A site's ECDSA P-256 key: its node-auth key in deployment, a key in its state dir else."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self.key = key

    @classmethod
    def load(cls, path: Path) -> SiteKey:
        """Read an OpenSSH or PEM private key (what flower-supernode authenticates with)."""
        data = Path(path).read_bytes()
        try:
            key = (
                serialization.load_ssh_private_key(data, None)
                if b"OPENSSH" in data
                else serialization.load_pem_private_key(data, None)
            )
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path} is not a readable private key: {err}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an ECDSA key; make one with `emixer keygen`")
        return cls(key)

    @classmethod
    def generate(cls, path: Path) -> SiteKey:
        """Make a new key pair: `path` (private, mode 0600) and `path`.pub (OpenSSH public)."""
        path = Path(path)
        key = ec.generate_private_key(ec.SECP256R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        site = cls(key)
        path.with_name(path.name.removesuffix(".key") + ".pub").write_text(site.public_key() + "\n")
        return site

    @classmethod
    def for_state(cls, state_dir: Path) -> SiteKey:
        """Simulation: the key in the site's state dir, made on first use."""
        path = Path(state_dir) / "privacy" / SIMULATION_KEY
        return cls.load(path) if path.is_file() else cls.generate(path)

    def public_key(self) -> str:
        """The OpenSSH public key line, the format the coordinator enrols."""
        return (
            self.key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )

    def sign(self, entry: Mapping) -> dict[str, str]:
        """{"entry": canonical JSON, "signature": base64 DER ECDSA-SHA256}."""
        body = canonical(entry)
        signature = self.key.sign(body, ec.ECDSA(hashes.SHA256()))
        return {"entry": body.decode(), "signature": base64.b64encode(signature).decode()}


def verify_signed(signed: Mapping[str, str], public_key: str) -> dict:
    """The entry of a signed record if `public_key` signed it; ValueError otherwise."""
    try:
        key = serialization.load_ssh_public_key(public_key.strip().encode())
        body = str(signed["entry"]).encode()
        key.verify(base64.b64decode(signed["signature"]), body, ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr,call-arg]
        entry = json.loads(body)
    except InvalidSignature:
        raise ValueError("signature does not verify") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"malformed signed entry or key ({err})") from None
    if canonical(entry) != body:
        raise ValueError("the signed entry is not in canonical form")
    return entry


def _extends(history: list, earlier: list) -> bool:
    """`history` (normalised) holds at least every step of `earlier`, in the same order."""
    if not earlier:
        return True
    if len(earlier) > len(history):
        return False
    last = history[len(earlier) - 1]
    same_tail = last[:2] == earlier[-1][:2] and last[2] >= earlier[-1][2]
    return same_tail and history[: len(earlier) - 1] == earlier[:-1]


def verify_site_history(site: str, signed: list[Mapping[str, str]], public_key: str) -> list[dict]:
    """Verify a site's signed entries as one history; returns them, or ValueError naming the flaw.

    Every signature verifies against `public_key`; entries are signed for this site and numbered
    in increasing order; each entry's accountant history (cumulative over everything the site
    ever trained) contains the previous entry's and ends with the entry's own (sigma, q, steps);
    its stated epsilon is what Opacus computes from that history. A round whose reply was lost
    leaves a gap in the numbers but never in the history: the last entry counts every step.
    """
    entries = [verify_signed(s, public_key) for s in signed]
    previous: list = []
    last_seq = 0
    for number, entry in enumerate(entries, start=1):
        where = f"site {site} entry {number} (round {entry.get('round')})"
        if entry.get("site") != site:
            raise ValueError(f"{where} was signed for site {entry.get('site')!r}")
        if not isinstance(entry.get("seq"), int) or entry["seq"] <= last_seq:
            raise ValueError(f"{where} is numbered {entry.get('seq')} after {last_seq}")
        own = [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])]
        history = normalise_history(entry["history"])
        if not (_extends(history, previous) and _extends(history[-1:], normalise_history(own))):
            raise ValueError(f"{where}: its history does not extend the previous one by this round")
        stated = epsilon_from_history(history, entry["delta"], entry["accountant"])
        if not math.isclose(stated, entry["epsilon"], rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(
                f"{where} states epsilon {entry['epsilon']:.4f} but its history gives {stated:.4f}"
            )
        previous, last_seq = history, entry["seq"]
    return entries
