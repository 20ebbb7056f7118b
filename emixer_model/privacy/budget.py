"""A site's budget at a glance, from its own state dir only: what was spent, in which runs, what
is left, and whether the site's own signed ledger still proves it.

A privacy officer asks this every week (`emixer budget STATE_DIR`). Everything here reads; nothing
writes to the state dir, connects anywhere or needs the coordinator. The figures come from the
accountant and the ledger the site keeps (emixer_model.privacy.state), checked against each other
and against the signatures the site made (emixer_model.privacy.ledger.verify_site_history).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from emixer_model.privacy.accounting import (
    SiteAccountant,
    epsilon_from_history,
    normalise_history,
)
from emixer_model.privacy.ledger import verify_site_history
from emixer_model.privacy.state import AUDIT_LOG, LEDGER_FILE, SIMULATION_KEY, read_site_ledger
from emixer_model.shared import UserError

NODE_CONFIG = "node-config.toml"  # written into the state dir by `emixer site` (client/daemon.py)
REFUSAL_EVENTS = ("round-refused", "round-budget-exhausted", "refused-app")
# "rounds left" is searched up to this many rounds; more is reported as "at least" this
MAX_ROUNDS_SEARCHED = 10_000
# what a state dir holds once any site command used it (any one is enough to recognise it)
STATE_MARKERS = ("privacy", AUDIT_LOG, NODE_CONFIG, "evaluation_split.json")


class NotAStateDir(UserError):
    """The folder given is not a site's state dir; the message says which folder to give."""


@dataclass(frozen=True)
class RunSpend:
    """One run's trained rounds at this site, as the site signed them."""

    run: str
    rounds: list[int]
    steps: int
    noise_multipliers: list[float]
    sample_rates: list[float]
    epsilon_after: float  # cumulative over everything the site trained, after this run's last
    delta: float
    models: list[str]  # the global models (sha256) the site signed it trained from
    last_time: float


@dataclass(frozen=True)
class PlanOutlook:
    """What the site's current plan would spend: its next round and how many rounds still fit."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    epsilon_after_next_round: float
    rounds_left: int  # whole rounds of this plan that stay within the budget
    rounds_left_capped: bool  # True: at least `rounds_left` (the search stopped there)


@dataclass
class BudgetReport:
    """`emixer budget`: the site's spend, its runs, its plan, its refusals and the ledger check."""

    state_dir: str
    site: str | None
    epsilon: float  # cumulative, at `delta`, from the accountant (the larger count if they differ)
    delta: float | None
    budget: float | None
    budget_source: str
    accountant: str
    runs: list[RunSpend] = field(default_factory=list)
    plan: PlanOutlook | None = None
    refusals: list[dict] = field(default_factory=list)
    last_entry_time: float | None = None
    ledger_verifies: bool = True
    checks: list[str] = field(default_factory=list)  # what was verified, one line each
    problems: list[str] = field(default_factory=list)  # why it does not verify, one line each

    def as_dict(self) -> dict:
        return asdict(self)


def read_budget(state_dir: Path, public_key: str | None = None) -> BudgetReport:
    """The budget report of the site whose state dir this is; `public_key` (OpenSSH line) checks
    its signatures, else the key the state dir names (its simulation key, or the node config's
    signing key's `.pub`). NotAStateDir for a folder that is not one."""
    root = Path(state_dir)
    _check_state_dir(root)
    problems: list[str] = []
    try:
        ledger = read_site_ledger(root) or []
    except ValueError as err:
        ledger, problems = [], [f"{root / LEDGER_FILE} has an unreadable line ({err})"]
    trained = [e for e in ledger if e.get("status") == "trained"]
    node = _node_config(root)
    plan = _load_plan(root)
    kind = str((plan or {}).get("accountant") or (trained[-1]["accountant"] if trained else "rdp"))
    accountant, accountant_problem = _load_accountant(root, kind)
    problems += [accountant_problem] if accountant_problem else []
    delta = (plan or {}).get("delta") or (trained[-1]["delta"] if trained else None)
    budget, source = _budget(node, trained, plan)
    # the larger of the two counts: a lost accountant never hides what the site signed
    signed = normalise_history(trained[-1]["history"]) if trained else []
    counted = normalise_history(accountant.history) if accountant is not None else []
    history = max(counted, signed, key=lambda h: sum(steps for *_, steps in h))
    report = BudgetReport(
        state_dir=str(root),
        site=trained[-1]["site"] if trained else node.get("site-name"),
        epsilon=epsilon_from_history(history, delta, kind) if delta else 0.0,
        delta=delta,
        budget=budget,
        budget_source=source,
        accountant=kind,
        runs=_runs(trained),
        refusals=_refusals(root),
        last_entry_time=max((e.get("time", 0.0) for e in ledger), default=None),
    )
    if plan is not None and budget is not None:
        report.plan = _outlook(plan, history, kind, budget)
    key = public_key or _site_public_key(root, node)
    report.checks, more = _verify(ledger, accountant, key)
    report.problems = problems + more
    report.ledger_verifies = not report.problems
    return report


def _check_state_dir(root: Path) -> None:
    hint = "give the site's state dir: site.yaml's state_dir, or train-local's --state-dir"
    if not root.is_dir():
        raise NotAStateDir(f"{root} is not an existing folder; {hint}")
    if not any((root / marker).exists() for marker in STATE_MARKERS):
        raise NotAStateDir(
            f"{root} is not a site's state dir (it holds none of {', '.join(STATE_MARKERS)}); "
            + hint
        )


def _node_config(root: Path) -> dict:
    path = root / NODE_CONFIG
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}  # the daemon rewrites it at every start; the ledger is the record


def _load_plan(root: Path) -> dict | None:
    path = root / "privacy" / "plan.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None  # the site re-plans from its accountant, as it does for an older format


def _load_accountant(root: Path, kind: str) -> tuple[SiteAccountant | None, str | None]:
    """The saved accountant (or its .prev copy), or None and why it cannot be read."""
    path = root / "privacy" / "accountant.json"
    if not path.is_file() and not path.with_suffix(".prev").is_file():
        return None, None
    try:
        return SiteAccountant.load(path, kind), None
    except ValueError as err:
        return None, f"the accountant cannot be read: {err}"


def _budget(node: dict, trained: list[dict], plan: dict | None) -> tuple[float | None, str]:
    """The site's budget and where it was read: its policy (node config written from site.yaml),
    else the budget its last signed entry answered to, else its plan's target."""
    if "epsilon-budget" in node:
        return float(node["epsilon-budget"]), f"site.yaml (as {NODE_CONFIG} holds it)"
    if trained:
        return float(trained[-1]["budget"]), "the last signed entry"
    if plan is not None:
        return float(plan["target_epsilon"]), "the plan's target (no round signed yet)"
    return None, "unknown: no site.yaml settings, signed entry or plan in the state dir"


def _runs(trained: list[dict]) -> list[RunSpend]:
    by_run: dict[str, list[dict]] = {}
    for entry in trained:
        by_run.setdefault(str(entry.get("run", "")), []).append(entry)
    return [
        RunSpend(
            run=run,
            rounds=[int(e["round"]) for e in entries],
            steps=sum(int(e["steps"]) for e in entries),
            noise_multipliers=sorted({float(e["noise_multiplier"]) for e in entries}),
            sample_rates=sorted({float(e["sample_rate"]) for e in entries}),
            epsilon_after=float(entries[-1]["epsilon"]),
            delta=float(entries[-1]["delta"]),
            models=[str(e["model_sha256"]) for e in entries],
            last_time=float(entries[-1].get("time", 0.0)),
        )
        for run, entries in by_run.items()
    ]


def _refusals(root: Path) -> list[dict]:
    """Refused rounds and app versions, from the audit log (which records every refusal)."""
    path = root / AUDIT_LOG
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash; the ledger holds the privacy record
        if event.get("event") in REFUSAL_EVENTS:
            events.append(event)
    return events


def _outlook(plan: dict, history: list, kind: str, budget: float) -> PlanOutlook:
    """The next round's epsilon and how many whole rounds of the plan fit in the budget."""
    sigma, q, steps = plan["noise_multiplier"], plan["sample_rate"], plan["steps_per_round"]

    def epsilon_after(rounds: int) -> float:
        return epsilon_from_history([*history, (sigma, q, steps * rounds)], plan["delta"], kind)

    fit, over = 0, 1
    while over <= MAX_ROUNDS_SEARCHED and epsilon_after(over) <= budget:
        fit, over = over, over * 2
    capped = over > MAX_ROUNDS_SEARCHED
    over = min(over, MAX_ROUNDS_SEARCHED + 1)
    while over - fit > 1:
        mid = (fit + over) // 2
        fit, over = (mid, over) if epsilon_after(mid) <= budget else (fit, mid)
    return PlanOutlook(
        noise_multiplier=sigma,
        sample_rate=q,
        steps_per_round=steps,
        planned_rounds=plan["planned_rounds"],
        epsilon_after_next_round=epsilon_after(1),
        rounds_left=fit,
        rounds_left_capped=capped and fit == MAX_ROUNDS_SEARCHED,
    )


def _site_public_key(root: Path, node: dict) -> str | None:
    """The public half of the key that signs this site's entries: the node config's signing key
    (deployment) or the simulation key in the state dir, read from its `.pub` file."""
    candidates = [root / "privacy" / SIMULATION_KEY]
    if node.get("signing-key"):
        candidates.insert(0, Path(str(node["signing-key"])))
    for private in candidates:
        public = private.with_name(private.name.removesuffix(".key") + ".pub")
        if public.is_file():
            return public.read_text().strip()
    return None


def _verify(
    ledger: list[dict], accountant: SiteAccountant | None, public_key: str | None
) -> tuple[list[str], list[str]]:
    """(what verified, what did not) of the site's own ledger: signatures and history chain,
    numbering without gaps, the plain copy equal to what was signed, the accountant's count.
    Every signed entry counts (trained rounds, refusals and commits are numbered together)."""
    trained = [e for e in ledger if e.get("status") == "trained"]
    if not trained:
        return ["no trained round in the ledger: nothing spent, nothing to verify"], []
    checks: list[str] = []
    problems: list[str] = []
    site = str(trained[-1]["site"])
    if public_key is None:
        problems.append(
            "no public key found to check the signatures: pass --site-key with this site's .pub"
        )
    else:
        try:
            verify_site_history(site, [_signed(e) for e in ledger], public_key)
            checks.append(
                f"{len(ledger)} signatures verify, each history extends the previous one and "
                "each stated epsilon is what Opacus computes from it"
            )
        except (ValueError, KeyError, TypeError) as err:
            problems.append(f"the signed entries do not verify: {err}")
    numbers = [e.get("seq") for e in ledger]
    if numbers == list(range(1, len(ledger) + 1)):
        checks.append(f"entries numbered 1..{len(ledger)} without a gap")
    else:
        problems.append(
            f"entry numbers {numbers} are not 1..{len(ledger)}: entries were removed from or "
            "added to ledger.jsonl"
        )
    edited = [e.get("seq") for e in ledger if not _plain_matches_signed(e)]
    if edited:
        problems.append(f"entries {edited}: the plain fields differ from what was signed")
    if accountant is None:
        problems.append("no accountant.json: the site cannot train on until it is restored")
        return checks, problems
    signed = normalise_history(trained[-1]["history"])
    counted = sum(steps for *_, steps in accountant.history)
    ledger_steps = sum(steps for *_, steps in signed)
    if normalise_history(accountant.history) == signed:
        checks.append(f"the accountant counts exactly the {counted} signed steps")
    elif counted > ledger_steps:
        checks.append(
            f"the accountant counts {counted - ledger_steps} steps more than the last signed "
            "entry (a round trained but never signed, e.g. a crash before signing); the "
            "epsilon shown counts them"
        )
    else:
        problems.append(
            f"the accountant counts {counted} steps but the signed ledger {ledger_steps}: it was "
            "lost or rolled back; restore accountant.json from a backup before training again"
        )
    return checks, problems


def _signed(entry: dict) -> dict[str, str]:
    return {"entry": entry["entry"], "signature": entry["signature"]}


def _plain_matches_signed(entry: dict) -> bool:
    """The readable copy of a ledger line says what its signed body says."""
    try:
        body = json.loads(entry["entry"])
    except (KeyError, TypeError, ValueError):
        return False
    return all(entry.get(key) == value for key, value in body.items())
