"""The signed ledger: hashing models, signing a site's round, verifying what sites signed.

Each trained round becomes an entry the site signs with its ECDSA key (its node-auth key in
deployment, one made in its state dir in simulation), carrying the site's whole accountant
history, so anyone can recompute its epsilon from signed data alone. The server, the release gate
(`verify_ledger`) and `emixer verify-release` import this module to verify; it reads no site
state: a site's own ledger file reaches `check_against_own_ledger` as entries.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from emixer_model.privacy.accounting import SiteAccountant, epsilon_from_history, normalise_history
from emixer_model.shared import UserError

if TYPE_CHECKING:  # the plan only as a type: the coordinator's code never imports the plan
    from emixer_model.privacy.plan import PrivacyPlan

# A signed entry's per-round figures, as the server's ledger and a release's manifest list them.
HISTORY_KEYS = ("round", "noise_multiplier", "sample_rate", "steps", "epsilon")
# What a site signs besides a trained round: a round its policy or its budget refused, and the
# model a run ended with (`commit`), each with its whole history and the epsilon spent so far.
NOT_TRAINED = ("refused", "budget-exhausted", "commit")


class LedgerRefused(UserError):
    """The signed ledger does not prove the privacy claimed for a model; nothing is released."""


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
        "status": "trained",
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


def status_entry(
    *,
    site: str,
    run: str,
    server_round: int,
    seq: int,
    status: str,
    accountant: SiteAccountant,
    delta: float | None,
    model_sha256: str,
    budget: float,
) -> dict:
    """What a site signs for a round it did not train, or for the model a run ended with
    (`commit`): the status, that model's hash, and its whole accountant history with the epsilon
    spent at `delta` (its last trained round's; None if it never trained). So a site that never
    trained still appears under its own key, and a released model is one every site it trained
    from signed for, with what it had spent by then."""
    history = [list(entry) for entry in accountant.history]
    if history and delta is None:
        raise ValueError("the accountant counts steps but no trained round says at which delta")
    return {
        "site": site,
        "run": run,
        "round": server_round,
        "seq": seq,
        "status": status,
        "accountant": accountant.kind,
        "opacus": version("opacus"),
        "model_sha256": model_sha256,
        "history": history,
        "delta": delta,
        "epsilon": accountant.epsilon(delta) if history and delta is not None else 0.0,
        "budget": budget,
    }


def entry_epsilon(entry: Mapping) -> float:
    """Epsilon of an entry's signed history at its delta, recomputed; 0.0 if it holds no step."""
    history = normalise_history(entry["history"])
    if not history:
        return 0.0
    return epsilon_from_history(history, entry["delta"], entry["accountant"])


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
        public_key_path(path).write_text(site.public_key() + "\n")
        return site

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


def public_key_path(private: Path) -> Path:
    """Where `SiteKey.generate` (and `emixer keygen`) writes the public half: NAME.pub."""
    return private.with_name(private.name.removesuffix(".key") + ".pub")


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
    ever trained) contains the previous entry's, and a trained round's ends with its own (sigma,
    q, steps); its stated epsilon is what Opacus computes from that history. A round whose reply
    was lost leaves a gap in the numbers but never in the history: the last entry counts every
    step. Entries of rounds the site did not train and commits (`NOT_TRAINED`) carry it too.
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
        history = normalise_history(entry["history"])
        if entry.get("status") == "trained":
            own = normalise_history(
                [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])]
            )
            by_this_round = _extends(history[-1:], own)
        elif entry.get("status") in NOT_TRAINED:
            by_this_round = True
        else:
            raise ValueError(f"{where} has an unknown status {entry.get('status')!r}")
        if not (_extends(history, previous) and by_this_round):
            raise ValueError(f"{where}: its history does not extend the previous one by this round")
        stated = entry_epsilon(entry)
        if not math.isclose(stated, entry["epsilon"], rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(
                f"{where} states epsilon {entry['epsilon']:.4f} but its history gives {stated:.4f}"
            )
        previous, last_seq = history, entry["seq"]
    return entries


def verify_ledger(
    ledger: Mapping,
    last_round: int,
    budget: float | None,
    enrolled: Mapping[str, str] | None,
    model_sha256: str,
) -> dict[str, dict]:
    """Each site's privacy as its signed entries prove it, or LedgerRefused naming site and rule.

    `ledger` is the server's (`server.ledger.PrivacyLedger.to_dict`, or a manifest's sites and
    rounds) after `last_round` rounds. Nothing the coordinator stored is trusted: every entry's
    signature is verified against the site's key (the enrolled one when `enrolled` is given, and
    then every enrolled site must have signed at least one entry), each site's epsilon is
    recomputed with Opacus from the signed history of its last entry, every round up to
    `last_round` must be recorded and each site it aggregated must have signed a trained entry for
    that round and that global model, every site that trained signed for the released model
    (`model_sha256`, the arrays after `last_round`), and no site's recomputed epsilon may exceed
    its signed budget or `budget`.
    """
    sites = ledger.get("sites")
    if not sites:
        raise LedgerRefused(
            "the checkpoint has no privacy ledger: a model whose privacy cost is unknown "
            "is never released"
        )
    verified: dict[str, dict] = {}
    entries: dict[str, list[dict]] = {}
    for name, site in sorted(sites.items()):
        key = site.get("public_key", "")
        if enrolled is not None:
            if name not in enrolled:
                raise LedgerRefused(f"site {name} is not among the enrolled sites")
            if key and key.split()[:2] != enrolled[name].split()[:2]:
                raise LedgerRefused(f"site {name} signed with a key that is not its enrolled key")
        if not site.get("signed"):
            continue
        try:
            entries[name] = verify_site_history(name, site["signed"], key)
        except (ValueError, KeyError, TypeError) as err:
            raise LedgerRefused(f"site {name}: the signed ledger does not verify: {err}") from None
        verified[name] = _site_privacy(name, entries[name], budget)
        verified[name] |= {"public_key": key, "signed": site["signed"]}
    missing = sorted(set(enrolled or {}) - set(verified))
    if missing:
        raise LedgerRefused(
            f"enrolled site {', '.join(missing)} signed no entry in this ledger: its entries were "
            "removed, or it never took part (a site that refused signs its refusal). Refused; "
            "if it truly never connected, leave its key out of --site-keys and say why"
        )
    if not any(e["status"] == "trained" for site in entries.values() for e in site):
        raise LedgerRefused("the privacy ledger shows no trained round at any site")
    _check_coverage(last_round, ledger.get("rounds") or {}, entries)
    _check_model_signed(last_round, model_sha256, entries)
    return verified


def _check_model_signed(last_round: int, model_sha256: str, entries: Mapping[str, list]) -> None:
    """Every site that trained signed for the released model as the model after `last_round`:
    its commit at the end of the run, or any entry of the next round (the model it was sent).
    Its epsilon (its last entry's) is then at least what it had spent when it signed."""
    for name, site in sorted(entries.items()):
        if not any(e["status"] == "trained" for e in site):
            continue
        if not any(
            e["model_sha256"] == model_sha256
            and e["round"] - (e["status"] != "commit") == last_round
            for e in site
        ):
            raise LedgerRefused(
                f"site {name} trained on this run but signed nothing for the released model "
                f"({model_sha256[:12]}…) as the model after round {last_round}: the model, its "
                "round or its ledger is not the one the sites signed. Release the checkpoint the "
                "run ended with, which every site signed in its commit round"
            )


def _site_privacy(name: str, entries: list[dict], budget: float | None) -> dict:
    """A site's privacy figures, each read from its verified entries: epsilon, delta, accountant
    and budget from the last one; unit and clip norm from the last trained one."""
    last = entries[-1]
    trained = [e for e in entries if e["status"] == "trained"]
    epsilon = entry_epsilon(last)
    limit = min(last["budget"], budget) if budget is not None else last["budget"]
    if epsilon > limit:
        raise LedgerRefused(
            f"site {name}: epsilon {epsilon:.4f} is over the budget {limit:.4f} "
            "(recomputed from its signed history)"
        )
    return {
        "epsilon": epsilon,
        "delta": last["delta"],
        "accountant": last["accountant"],
        "opacus": last["opacus"],
        "privacy_unit": trained[-1]["privacy_unit"] if trained else None,
        "max_grad_norm": trained[-1]["max_grad_norm"] if trained else None,
        "budget": last["budget"],
        "status": last["status"],
        "history": [{k: e[k] for k in HISTORY_KEYS} for e in trained],
    }


def _check_coverage(last_round: int, rounds: Mapping, entries: Mapping[str, list[dict]]) -> None:
    """Every round up to `last_round` is recorded, and each site it aggregated signed for it."""
    for number in range(1, last_round + 1):
        record = rounds.get(str(number))
        if record is None:
            raise LedgerRefused(f"round {number} of the checkpoint has no record of its sites")
        for name in record["sites"]:
            if not any(
                e["status"] == "trained"
                and e["round"] == number
                and e["model_sha256"] == record["model_sha256"]
                for e in entries.get(name, [])
            ):
                raise LedgerRefused(
                    f"round {number} aggregated site {name}, but no entry signed by {name} "
                    "covers that round and model: rounds are missing from its ledger"
                )


def epsilon_spent_for_model(entry: Mapping) -> float:
    """What a site had spent when it received the model an entry names: for a trained round, its
    history without that round's own steps; for any other entry, all of it."""
    if entry["status"] != "trained":
        return entry_epsilon(entry)
    history = normalise_history(entry["history"])
    sigma, q, steps = history[-1]
    before = history[:-1] + ([(sigma, q, steps - entry["steps"])] if steps > entry["steps"] else [])
    return entry_epsilon({**entry, "history": before})


def check_against_own_ledger(own: list[dict], model_sha256: str, privacy: Mapping) -> dict:
    """A site's own check of a release against the ledger it keeps in its state dir, across runs.

    The release's lineage is the released model (`model_sha256`) and every model its rounds
    started from (round records and signed entries). Every model of it this site committed (the
    final model of a run it served), in any run, and the released model itself if the site was
    sent it, holds what the site had spent by then (`epsilon_spent_for_model`); the release must
    count at least the most of it for this site. This catches what the manifest alone cannot: a
    release that starts from a model trained on this site (ledger stripped) and leaves the site
    out. Models the site was only sent to train on are not counted: a fresh model made from a
    shared seed is the same in every run and holds nobody's data. `privacy` is the release's
    verified privacy section (`verify_ledger`'s sites and the round records). Returns what was
    compared; LedgerRefused when the release counts less.
    """
    released = [
        json.loads(s["entry"]) for site in privacy["sites"].values() for s in site["signed"]
    ]
    lineage = {model_sha256} | {e["model_sha256"] for e in released}
    lineage |= {record["model_sha256"] for record in privacy["rounds"].values()}
    mine = [
        e
        for e in own
        if "entry" in e
        and (e["model_sha256"] == model_sha256 or e["status"] == "commit")
        and e["model_sha256"] in lineage
    ]
    if not mine:
        return {"site": None, "models": 0}
    name = mine[-1]["site"]
    top = max(mine, key=epsilon_spent_for_model)
    epsilon_own = epsilon_spent_for_model(top)
    counted = privacy["sites"].get(name, {"signed": [], "epsilon": 0.0})
    bodies = {signed["entry"] for signed in counted["signed"]}
    uncounted = [f"{e['round']} ({e['status']})" for e in mine if e["entry"] not in bodies]
    if epsilon_own > counted["epsilon"] * (1 + 1e-9) + 1e-12:
        raise LedgerRefused(
            f"site {name}: the release counts epsilon {counted['epsilon']:.4f} for this site, but "
            f"this site's own ledger says it had spent {epsilon_own:.4f} for model "
            f"{top['model_sha256'][:12]}… (run {top['run']}, round {top['round']}, "
            f"{top['status']}), a model in this release's lineage; the entries it signed for "
            f"that lineage and the release leaves out: rounds {', '.join(uncounted)}. Either "
            "their replies never reached the coordinator, or the coordinator left them out or "
            "started from a model this site trained: ask it, and until it explains, take "
            f"{epsilon_own:.4f} as this release's epsilon for this site"
        )
    return {
        "site": name,
        "models": len({e["model_sha256"] for e in mine}),
        "uncounted": uncounted,
        "epsilon_own": epsilon_own,
        "epsilon_release": counted["epsilon"],
    }
