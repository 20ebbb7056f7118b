"""A site's privacy accounting: the accountant it keeps on disk and the noise it plans.

One function, `epsilon_from_history`, turns a history of (noise multiplier, sample rate, steps)
into epsilon; the site's accountant and the release gate both call it, so the epsilon a site
reports and the one the gate recomputes from the ledger agree exactly (docs/PRIVACY.md invariant 7).
The server imports this module (to recompute epsilon), so it holds no site policy or site state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

from emixer_model.shared import write_json_atomic

log = logging.getLogger("emixer.privacy")

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}
# The plan searches sigma in [0.3, 100]: below 0.3 DP-SGD's epsilon is meaningless (hundreds)
# and the PRV accountant's discretisation needs gigabytes.
MAX_NOISE_MULTIPLIER = 100.0
MIN_NOISE_MULTIPLIER = 0.3

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), as opacus


def default_delta(n_units: int) -> float:
    """delta = 1 / (10 N): well below the 1/N at which releasing one unit's data is 'private'."""
    if n_units < 1:
        raise ValueError(f"need at least one sampling unit to set delta, got {n_units}")
    return 1.0 / (10 * n_units)


def _check_kind(kind: str) -> None:
    if kind not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, not {kind!r}")


def normalise_history(history: Iterable[Sequence | Mapping]) -> list[HistoryEntry]:
    """Entries as (sigma, q, steps) tuples, consecutive equal (sigma, q) merged as opacus does.

    Merging makes a per-round ledger and the accountant's own history the same input, so the
    two compute bit-identical epsilons.
    """
    merged: list[HistoryEntry] = []
    for entry in history:
        if isinstance(entry, Mapping):
            sigma, q, steps = entry["noise_multiplier"], entry["sample_rate"], entry["steps"]
        else:
            sigma, q, steps = entry
        sigma, q, steps = float(sigma), float(q), int(steps)
        if sigma <= 0 or not 0 < q <= 1 or steps < 0:
            raise ValueError(
                f"bad privacy history entry (noise_multiplier={sigma}, sample_rate={q}, "
                f"steps={steps}): need noise_multiplier > 0, 0 < sample_rate <= 1, steps >= 0"
            )
        if steps == 0:
            continue
        if merged and merged[-1][:2] == (sigma, q):
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    return merged


def epsilon_from_history(
    history: Iterable[Sequence | Mapping], delta: float, kind: str = "rdp"
) -> float:
    """Epsilon at `delta` of a history of (noise_multiplier, sample_rate, steps) tuples or dicts."""
    _check_kind(kind)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be between 0 and 1, not {delta}")
    merged = normalise_history(history)
    if not merged:
        return 0.0
    accountant = ACCOUNTANTS[kind]()
    accountant.history = merged
    try:
        with warnings.catch_warnings():
            # at large noise RDP's best order is the largest one tried: a valid, looser bound
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(accountant.get_epsilon(delta))
    except (MemoryError, ValueError, OverflowError) as err:
        raise ValueError(
            f"the {kind} accountant cannot compute epsilon for this history {merged} at delta "
            f"{delta} ({type(err).__name__}: {err}); a noise multiplier this small gives no "
            "useful guarantee: raise it, or use the 'rdp' accountant"
        ) from None


class SiteAccountant:
    """One site's accountant (opacus RDP or PRV), saved on the site's disk after every round."""

    def __init__(self, kind: str = "rdp") -> None:
        _check_kind(kind)
        self.kind = kind
        self._accountant = ACCOUNTANTS[kind]()

    @property
    def accountant(self) -> IAccountant:
        """The opacus accountant object (its .history is this site's history)."""
        return self._accountant

    @property
    def history(self) -> list[HistoryEntry]:
        return self._accountant.history

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Record one noisy optimizer step (empty Poisson batches included)."""
        self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta` (0.0 before the first step)."""
        return epsilon_from_history(self.history, delta, self.kind)

    def epsilon_after(
        self, steps: int, noise_multiplier: float, sample_rate: float, delta: float
    ) -> float:
        """Epsilon if `steps` more steps were taken; the accountant is not changed."""
        extra = (noise_multiplier, sample_rate, steps)
        return epsilon_from_history([*self.history, extra], delta, self.kind)

    def save(self, path: Path) -> None:
        """Write atomically; the file it replaces is kept as path.with_suffix('.prev').

        At every moment `path` holds either the old or the new state, never a partial file.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            prev_tmp = path.with_suffix(".prev.tmp")
            shutil.copy2(path, prev_tmp)
            os.replace(prev_tmp, path.with_suffix(".prev"))
        data = {"kind": self.kind, "history": [list(entry) for entry in self.history]}
        write_json_atomic(path, data, indent=None, fsync=True)

    @classmethod
    def load(cls, path: Path, kind: str) -> SiteAccountant:
        """Read a saved accountant; falls back to the .prev copy when `path` is missing/corrupt."""
        path = Path(path)
        prev = path.with_suffix(".prev")
        try:
            data = _read(path)
        except ValueError as err:
            try:
                data = _read(prev)
            except ValueError as prev_err:
                raise ValueError(
                    f"cannot restore the privacy accountant: {err}; and {prev_err}. Training "
                    "without it would forget the epsilon already spent: restore the file from a "
                    "backup"
                ) from None
            log.warning(
                "%s; restored the accountant from %s, which may not count the last round",
                err,
                prev.name,
            )
        if data["kind"] != kind:
            raise ValueError(
                f"{path} holds a {data['kind']!r} accountant but the config asks for {kind!r}; "
                "a site keeps one accountant for its whole history: set privacy.accountant "
                f"to {data['kind']!r}"
            )
        site = cls(kind)
        site._accountant.history = normalise_history(data["history"])
        return site


def _read(path: Path) -> dict:
    """A saved accountant's JSON, or ValueError saying what is wrong with the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is unreadable or corrupt ({err})") from None
    if not isinstance(data, dict) or data.get("kind") not in ACCOUNTANTS:
        raise ValueError(f"{path} is corrupt (no valid 'kind')")
    if not isinstance(data.get("history"), list):
        raise ValueError(f"{path} is corrupt (no 'history' list)")
    try:
        normalise_history(data["history"])
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{path} is corrupt (bad history: {err})") from None
    return data


def plan_noise_multiplier(
    accountant: SiteAccountant,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
) -> float:
    """Smallest noise multiplier (to 1%) so `steps` more steps end at most at `target_epsilon`.

    Unlike opacus' get_noise_multiplier this counts what the accountant has already spent.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be positive, not {target_epsilon}")
    if not 0 < sample_rate <= 1 or steps < 1:
        raise ValueError(f"need 0 < sample_rate <= 1 and steps >= 1, got {sample_rate}, {steps}")

    def eps(sigma: float) -> float:
        with warnings.catch_warnings():
            # the bisection probes tiny sigmas whose best RDP order is the smallest alpha tried
            warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
            return accountant.epsilon_after(steps, sigma, sample_rate, delta)

    hi, lo = MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER
    if eps(hi) > target_epsilon:
        raise ValueError(
            f"epsilon {target_epsilon} cannot be met for {steps} more steps even with noise "
            f"multiplier {hi}: this site has already spent epsilon {accountant.epsilon(delta):.3f}"
            " at this delta. Raise the budget, or train fewer rounds or steps"
        )
    if eps(lo) <= target_epsilon:
        return lo
    while hi / lo > 1.01:
        mid = (hi * lo) ** 0.5
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def steps_per_epoch(sample_rate: float) -> int:
    """Private steps in one expected pass over the units: round(1 / q)."""
    return max(1, round(1 / sample_rate))
