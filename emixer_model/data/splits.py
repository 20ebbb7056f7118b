"""Which of a site's privacy units are held out for evaluation: chosen once, recorded, reused.

A figure a skeptic accepts is measured on patients no generator trained on. So a site chooses
its evaluation units before round 1, records them in its state dir (`evaluation_split.json`,
never sent anywhere: it names the site's files) and reuses that record every later round, in
`emixer evaluate` and in the bench. The one splitter, `choose_held_out`, ranks units by a keyed
hash of their identity (the sorted paths of every file of the unit, labeled and unlabeled,
relative to the site folder), so the choice does not depend on list positions, which shift when
a file is added. Once recorded, the record decides: a unit with a recorded evaluation file stays
held out whatever was added to it; a unit never seen before trains (the evaluation set stays the
one fixed before round 1); a unit that joins a held-out and a trained unit (a new file linking
two patients) is neither trained on nor scored.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from emixer_model.config import FINDINGS
from emixer_model.shared import UserError, write_json_atomic

if TYPE_CHECKING:
    from emixer_model.data.site import SiteData

SPLIT_FILE = "evaluation_split.json"
SPLIT_FORMAT = "emixer-evaluation-split/1"
STAYS_AT_SITE = "names this site's files: it never leaves the site"


class SplitError(UserError, ValueError):
    """A recorded split that cannot be used as asked; the message says why and what to do."""


def keyed_hash(text: str, seed: int) -> str:
    """A keyed hash of a unit's identity: the splitter's rank and the unit's opaque id."""
    key = f"emixer-evaluation-split/{seed}".encode()
    return hashlib.blake2b(text.encode(), key=key, digest_size=8).hexdigest()


def choose_held_out(keys: Sequence[str], fraction: float, seed: int) -> set[int]:
    """The one splitter: indices of the round(fraction * n) keys with the smallest keyed hash.

    At least one unit is always left to train. A key's rank depends on that key alone, so adding
    a unit moves at most the boundary, never the units far from it.
    """
    if fraction <= 0 or not keys:
        return set()
    count = min(len(keys) - 1, round(fraction * len(keys)))
    ranked = sorted(range(len(keys)), key=lambda i: keyed_hash(keys[i], seed))
    return set(ranked[:count])


def unit_files(site: SiteData) -> list[tuple[str, ...]]:
    """Every file of each privacy unit (labeled and unlabeled), sorted: the unit's identity."""
    if len(site.files) != len(site.images) or len(site.unlabeled_files) != len(site.unlabeled):
        raise ValueError("this SiteData does not say which file each image came from")
    return [
        tuple(sorted([site.files[i] for i in rows] + [site.unlabeled_files[j] for j in scans]))
        for rows, scans in site.units
    ]


def unit_of_row(site: SiteData) -> np.ndarray:
    """The index into site.units of each labeled row; -1 for a row no unit holds any more."""
    unit = np.full(len(site.images), -1, dtype=np.int64)
    for number, (rows, _) in enumerate(site.units):
        unit[rows] = number
    return unit


@dataclass(frozen=True)
class LabeledSet:
    """Real labeled studies: images [N,1,R,R] in [-1,1], multi-hot labels [N,L] over FINDINGS,
    one privacy-unit id per row (patient where known; any hashable, e.g. "site_1/17")."""

    images: torch.Tensor
    labels: torch.Tensor
    units: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.labels) == len(self.units):
            raise ValueError(
                f"LabeledSet needs one label row and one unit per image; got {len(self.images)} "
                f"images, {len(self.labels)} label rows, {len(self.units)} units"
            )
        if self.labels.shape[1:] != (len(FINDINGS),):
            raise ValueError(f"labels must be [N, {len(FINDINGS)}] over FINDINGS")

    @staticmethod
    def concat(sets: Sequence[LabeledSet]) -> LabeledSet:
        """Several sites' sets as one (unit ids must already differ, as labeled_from_site's do)."""
        return LabeledSet(
            torch.cat([s.images for s in sets]),
            torch.cat([s.labels for s in sets]),
            np.concatenate([np.asarray(s.units, dtype=object) for s in sets]),
        )

    def subset(self, rows: np.ndarray) -> LabeledSet:
        return LabeledSet(self.images[rows], self.labels[rows], np.asarray(self.units)[rows])

    def split(self, heldout_units: Collection) -> tuple[LabeledSet, LabeledSet]:
        """(the rest, held out): rows of the given units go to the held-out side, whole."""
        held = np.array([u in heldout_units for u in np.asarray(self.units).tolist()], bool)
        return self.subset(np.flatnonzero(~held)), self.subset(np.flatnonzero(held))


def labeled_from_site(site: SiteData, name: str) -> LabeledSet:
    """A site's labeled studies with unit ids "name/k", k indexing site.units."""
    units = np.array([f"{name}/{k}" for k in unit_of_row(site)], dtype=object)
    return LabeledSet(site.images, site.labels, units)


@dataclass(frozen=True)
class EvaluationSplit:
    """A site's units on each side: the files of every evaluation unit and every training unit
    as they were when the split was chosen (`recorded`: the file it lives in, None for a split
    chosen for one evaluation only, whose patients training did not avoid)."""

    fraction: float
    seed: int
    evaluation: tuple[tuple[str, ...], ...]
    training: tuple[tuple[str, ...], ...]
    recorded: Path | None = None

    @classmethod
    def choose(cls, site: SiteData, fraction: float, seed: int) -> EvaluationSplit:
        files = unit_files(site)
        held = choose_held_out(["\n".join(unit) for unit in files], fraction, seed)
        return cls(
            fraction,
            seed,
            tuple(files[i] for i in sorted(held)),
            tuple(unit for i, unit in enumerate(files) if i not in held),
        )

    def sides(self, site: SiteData) -> tuple[list[int], list[int]]:
        """(units of `site` to score, units never to train on), indices into site.units."""
        evaluation = {f for unit in self.evaluation for f in unit}
        training = {f for unit in self.training for f in unit}
        scored, held = [], []
        for number, files in enumerate(unit_files(site)):
            if not evaluation.isdisjoint(files):
                held.append(number)
                if training.isdisjoint(files):
                    scored.append(number)
        return scored, held

    def as_json(self) -> dict:
        def units(side: tuple[tuple[str, ...], ...]) -> list[dict]:
            return [{"id": keyed_hash("\n".join(u), self.seed), "files": list(u)} for u in side]

        return {
            "format": SPLIT_FORMAT,
            "fraction": self.fraction,
            "seed": self.seed,
            "note": f"the site's evaluation patients, held out before round 1; {STAYS_AT_SITE}",
            "evaluation": units(self.evaluation),
            "training": units(self.training),
        }


def load_split(state_dir: Path) -> EvaluationSplit | None:
    """The split recorded in state_dir, or None when none was recorded."""
    path = Path(state_dir) / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data["format"] != SPLIT_FORMAT:
            raise ValueError(f"format {data['format']!r}, expected {SPLIT_FORMAT!r}")
        return EvaluationSplit(
            float(data["fraction"]),
            int(data["seed"]),
            tuple(tuple(u["files"]) for u in data["evaluation"]),
            tuple(tuple(u["files"]) for u in data["training"]),
            path,
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SplitError(
            f"{path} is not a readable evaluation split ({err}); it was written before round 1 "
            "and cannot be chosen again without scoring on trained patients: restore it from a "
            "backup of the state dir"
        ) from None


def create_or_load_split(
    site: SiteData,
    state_dir: Path,
    fraction: float,
    seed: int = 0,
    *,
    already_trained: bool = False,
) -> EvaluationSplit | None:
    """The site's evaluation split: the one recorded in state_dir, or chosen now and recorded.

    None when fraction is 0 and nothing is recorded. A recorded split never changes: a run that
    asks for another fraction is refused (the seed of the record wins). `already_trained`: the
    state dir has trained rounds; choosing evaluation patients then would pick trained ones, so
    it is refused.
    """
    path = Path(state_dir) / SPLIT_FILE
    recorded = load_split(state_dir)
    if recorded is not None:
        if not math.isclose(recorded.fraction, fraction):
            raise SplitError(
                f"{path} holds out {recorded.fraction:g} of this site's units since before round "
                f"1; this run asks for holdout_fraction {fraction:g}. The evaluation patients are "
                f"fixed once chosen: set holdout_fraction back to {recorded.fraction:g}, or start "
                "a new state dir (a new privacy history) to choose again"
            )
        return recorded
    if fraction <= 0:
        return None
    if already_trained:
        raise SplitError(
            f"{state_dir} has trained rounds without an evaluation split, so every patient of "
            f"this site has been trained on; holding out {fraction:g} now would score on trained "
            "patients. Keep holdout_fraction 0 for this state dir, or start a new state dir"
        )
    split = EvaluationSplit.choose(site, fraction, seed)
    if not split.evaluation:
        raise SplitError(
            f"holdout_fraction {fraction:g} of {len(site.units)} privacy units holds none out; "
            "a site needs more units (or a larger fraction) for an evaluation split"
        )
    write_json_atomic(path, split.as_json(), fsync=True)
    return EvaluationSplit(split.fraction, split.seed, split.evaluation, split.training, path)


def training_data(site: SiteData, split: EvaluationSplit | None) -> SiteData:
    """The site without its evaluation units: what every round trains on."""
    return site if split is None else site.without_units(set(split.sides(site)[1]))


def split_labeled(
    site: SiteData, split: EvaluationSplit, name: str
) -> tuple[LabeledSet, LabeledSet]:
    """(training-side, evaluation) labeled studies of `site`, unit ids "name/k": the judge
    trains on the first and is tested on the second, exactly the recorded evaluation units."""
    scored, held = split.sides(site)
    everything = labeled_from_site(site, name)
    unit = unit_of_row(site)
    train = everything.subset(np.flatnonzero((unit >= 0) & ~np.isin(unit, held)))
    return train, everything.subset(np.flatnonzero(np.isin(unit, scored)))
