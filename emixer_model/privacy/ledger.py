"""The signed ledger: hashing models, signing a site's round, verifying what sites signed.

Each trained round becomes an entry the site signs with its ECDSA key (its node-auth key in
deployment, one made in its state dir in simulation), carrying the site's whole accountant
history, so anyone can recompute its epsilon from signed data alone. The server, the release gate
and `emixer verify-release` import this module to verify; it reads no site state.
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

if TYPE_CHECKING:  # the plan only as a type: the coordinator's code never imports the plan
    from emixer_model.privacy.plan import PrivacyPlan


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
