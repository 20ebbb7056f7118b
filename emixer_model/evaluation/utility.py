"""Utility of a synthetic set, each figure with a bootstrap 95% interval and a verdict in words.

One code path for `emixer evaluate` and bench/utility.py. A `Judge` is a classifier trained once
on real judge-train patients and tested on real held-out patients that no generator saw (with a
second judge of another family, a linear model on pooled pixels, beside it); it then scores any
number of synthetic sets (`judge.score(...)`), so model variants are compared against the same
yardstick. Intervals come from resampling cached predictions (whole held-out privacy
units, patients where known, and synthetic pairs), never from retraining: they show how much a
figure could move with another held-out sample or another draw of synthetic pairs, not with
another training seed.

Every classifier (judge, train-on-synthetic, real + synthetic) takes the same number of optimiser
steps. With a fixed number of epochs instead, adding synthetic images adds steps, and an
under-trained real-only baseline makes even noise look like a gain: 386 real phantom studies at
32 px, 30 epochs, mean AUROC 0.797; + 400 noise images at 30 epochs (750 steps instead of 390)
0.848. At equal steps the same noise gives 0.742. While the classifier is still improving with
steps, equal steps bias the gain the other way (synthetic images displace real ones), so a gain
is conservative, and a small loss can be dilution rather than harm.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from emixer_model.config import FINDINGS, JUDGE_EPOCHS
from emixer_model.data.splits import LabeledSet
from emixer_model.evaluation.bootstrap import (
    DEFAULT_RESAMPLES,
    Resampler,
    bootstrap,
    percentile_interval,
)
from emixer_model.evaluation.classifier import Classifier, score_images, train_classifier
from emixer_model.evaluation.image_metrics import auroc, f1_score, frechet_distance
from emixer_model.text.labeler import label_report
from emixer_model.text.vocabulary import tokenize

BATCH_SIZE = 32
IMAGE_THRESHOLD = 0.5  # the judge says a finding is in an image above this probability
BOOTSTRAP_NOTE = (
    "percentile intervals from resampling cached predictions: held-out real studies by whole "
    "privacy unit (patient where known), synthetic pairs one by one; they cover another "
    "held-out sample and another draw of synthetic pairs, not another training seed"
)


@dataclass(frozen=True)
class Figure:
    """A point value with its percentile bootstrap interval, sample size and a verdict in words.

    chance is the value the figure takes when the data carry no signal (0.5 for AUROC, 0 for a
    gain or kappa); None where no such level exists (Frechet distance, counts).
    """

    value: float | None
    low: float | None
    high: float | None
    n: int
    n_means: str
    chance: float | None = None
    verdict: str = ""
    # the bootstrap draws [B] behind the interval (None for exact counts): what pools seeds
    draws: np.ndarray | None = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict:
        rounded = {k: _round(getattr(self, k)) for k in ("value", "low", "high", "chance")}
        return {**rounded, "n": self.n, "n_means": self.n_means, "verdict": self.verdict}


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def verdict(
    value: float | None, low: float | None, high: float | None, chance: float, null: str
) -> str:
    """Whether the 95% interval excludes the no-signal level; null names it ("chance", "zero gain").

    "not distinguishable from chance" is the phrase a reader (and a test) can look for.
    """
    if value is None:
        return "undefined"
    if low is None or high is None:
        return f"no interval (too few resamples define it); cannot be told from {null}"
    if low <= chance <= high:
        return f"not distinguishable from {null} ({chance:.3g})"
    return f"{'above' if low > chance else 'below'} {null} ({chance:.3g})"


def figure(
    point: float,
    draws: np.ndarray,
    n: int,
    n_means: str,
    chance: float | None = None,
    null: str = "chance",
    verdict_text: str | None = None,
) -> Figure:
    """A Figure from a point value (nan = undefined) and its bootstrap draws [B]."""
    value = None if np.isnan(point) else float(point)
    interval = None if value is None else percentile_interval(draws)
    low, high = interval if interval is not None else (None, None)
    if verdict_text is None:
        verdict_text = "undefined" if value is None else ""
        if chance is not None:
            verdict_text = verdict(value, low, high, chance, null)
    return Figure(value, low, high, n, n_means, chance, verdict_text, np.asarray(draws, float))


def paired_difference(a: Figure, b: Figure) -> Figure:
    """a - b draw by draw: both figures resampled the same held-out patients and synthetic
    pairs at every draw (the same resamplers and seed), so the interval is a paired one."""
    if a.draws is None or b.draws is None:
        raise ValueError("a paired difference needs the bootstrap draws of both figures")
    point = np.nan if a.value is None or b.value is None else a.value - b.value
    return figure(point, a.draws - b.draws, a.n, f"{a.n_means}, paired", 0.0, "no difference")


def over_seeds(runs: Sequence[Figure], seed: int = 0, null: str = "chance") -> Figure:
    """One figure measured on models trained with different seeds, as one: the mean of their
    values, with an interval that covers the seed variation and the sampling. A two-level
    bootstrap: each resample draws as many seeds as there are, with replacement, and takes each
    drawn seed's own bootstrap draw at that resample (every run resampled the same patients and
    pairs at resample b), so the interval is that of the mean over seeds. Exact counts (no
    draws) get the mean and no interval."""
    first = runs[0]
    n_means = f"{first.n_means}; mean of {len(runs)} seeds"
    values = np.array([np.nan if r.value is None else r.value for r in runs])
    if any(r.draws is None for r in runs):
        mean = None if np.isnan(values).all() else float(np.nanmean(values))
        return Figure(mean, None, None, first.n, n_means, first.chance, first.verdict)
    draws = np.stack([r.draws for r in runs])  # [seeds, B]
    seeds, resamples = draws.shape
    picks = np.random.default_rng([seed, seeds]).integers(0, seeds, (resamples, seeds))
    pooled = nanmean(draws[picks, np.arange(resamples)[:, None]])
    return figure(float(nanmean(values)), pooled, first.n, n_means, first.chance, null)


def auroc_per_label(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """AUROC per finding [L]; nan where the rows hold only one class of that finding."""
    result = [auroc(probabilities[:, j], targets[:, j] > 0.5) for j in range(targets.shape[1])]
    return np.array([np.nan if a is None else a for a in result])


def f1_per_label(predicted: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """F1 per finding [L]; nan where neither side has a positive (nothing to find)."""
    result = [f1_score(predicted[:, j], targets[:, j]) for j in range(targets.shape[1])]
    return np.array([np.nan if f is None else f for f in result])


def kappa_per_label(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cohen's kappa per finding [L] of two boolean [N,L] raters; nan where both are constant.

    Agreement beyond what each side's positive rate gives by chance: two sides that both say
    "nothing" have nothing to agree on (undefined), and a side that always says "nothing" gets 0
    however often the other side is negative too.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    observed = (a == b).mean(axis=0)
    pa, pb = a.mean(axis=0), b.mean(axis=0)
    expected = pa * pb + (1 - pa) * (1 - pb)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(expected < 1, (observed - expected) / (1 - expected), np.nan)


def nanmean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over defined entries; nan where none is defined (numpy's nanmean warns there)."""
    values = np.asarray(values, float)
    defined = ~np.isnan(values)
    total = np.where(defined, values, 0.0).sum(axis=axis)
    count = defined.sum(axis=axis)
    return np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)


def chance_f1(predicted: np.ndarray, targets: np.ndarray) -> float | None:
    """Macro F1 expected if predictions were independent of targets at their own positive rates.

    Per finding with rates p, q: E[TP] = N p q, so F1 = 2pq / (p + q); the level a report F1 must
    beat to show that reports depend on their labels at all.
    """
    p, q = np.asarray(predicted, bool).mean(axis=0), np.asarray(targets, bool).mean(axis=0)
    occurs = (p + q) > 0
    if not occurs.any():
        return None
    return float(np.mean(2 * p[occurs] * q[occurs] / (p[occurs] + q[occurs])))


def labeler_positives(reports: Sequence[str]) -> np.ndarray:
    """[N,L] bool: the shipped labeler finds the finding stated as positive or uncertain."""
    found = [label_report(text) for text in reports]
    return np.array([[row.get(f) in (1, -1) for f in FINDINGS] for row in found], dtype=bool)


def report_key(text: str) -> tuple[tuple[str, ...], ...]:
    """A report as the vocabulary reads it (lowercased words per sentence): what a duplicate is."""
    return tuple(tuple(words) for words in tokenize(text))


@dataclass(frozen=True)
class SyntheticSet:
    """Synthetic pairs: images [N,1,R,R] in [-1,1], conditioning labels [N,L], report strings."""

    images: torch.Tensor
    labels: torch.Tensor
    reports: Sequence[str]

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.labels) == len(self.reports) > 0:
            raise ValueError(
                "SyntheticSet needs at least one pair and as many label rows and reports as "
                f"images; got {len(self.images)} images, {len(self.labels)} label rows, "
                f"{len(self.reports)} reports"
            )


Phrasing = Callable[[str, str], bool]  # (report, finding) -> the report uses the phrasing


def phrasing_share(
    synthetic: SyntheticSet, phrasing: Phrasing, resamples: int, seed: int
) -> dict[str, Figure]:
    """Per finding: the share of synthetic reports conditioned on it for which
    phrasing(report, finding) holds (e.g. a site's own wording of that finding), resampled by
    pair. No chance level: compare with another model's share (public-only, non-private)."""
    conditioned = synthetic.labels.numpy() > 0.5
    uses = np.array(
        [
            [
                bool(on) and phrasing(report, finding)
                for finding, on in zip(FINDINGS, row, strict=True)
            ]
            for report, row in zip(synthetic.reports, conditioned, strict=True)
        ]
    ).reshape(conditioned.shape)

    def share(rows: np.ndarray) -> np.ndarray:
        count = conditioned[rows].sum(axis=0)
        used = uses[rows].sum(axis=0)
        return np.divide(used, count, out=np.full(len(FINDINGS), np.nan), where=count > 0)

    point, draws = bootstrap(share, [Resampler(np.arange(len(uses)), "pairs")], resamples, seed)
    counts = conditioned.sum(axis=0)
    return {
        finding: figure(
            point[j],
            draws[:, j],
            int(counts[j]),
            "synthetic pairs conditioned on this finding",
            verdict_text="no chance level: compare the share with another model's"
            if counts[j]
            else "undefined: no pair is conditioned on this finding",
        )
        for j, finding in enumerate(FINDINGS)
    }


@dataclass
class Scores:
    """The figures of one synthetic set, and per-finding detail for figures and the json."""

    figures: dict[str, Figure]
    per_label: dict[str, dict[str, Figure]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "figures": {name: f.as_dict() for name, f in self.figures.items()},
            "per_label": {
                name: {finding: f.as_dict() for finding, f in entries.items()}
                for name, entries in self.per_label.items()
            },
        }


def _per_finding(
    point: np.ndarray, draws: np.ndarray, n: int, n_means: str, chance: float | None = None
) -> dict[str, Figure]:
    """One Figure per finding from per-finding points [L] and draws [B, L]."""
    return {
        finding: figure(point[j], draws[:, j], n, n_means, chance)
        for j, finding in enumerate(FINDINGS)
    }


@dataclass(frozen=True)
class Reader:
    """A classifier trained on the judge-train patients and what it says about the held-out
    patients: probabilities [N,L], per-finding AUROC [L] and its bootstrap draws [B,L]."""

    model: Classifier
    probabilities: np.ndarray
    point: np.ndarray
    draws: np.ndarray


class Judge:
    """Finding classifiers trained on real judge-train patients, checked on held-out patients:
    the CNN (the judge) and a linear model on pooled pixels (the second judge, of another
    family than D's finding head that G is rewarded through).

    Fit once (`Judge.fit`), then `score` as many synthetic sets as needed: the held-out
    predictions and the real features are cached, so only train-on-synthetic and real +
    synthetic need new classifiers per set.
    """

    def __init__(
        self,
        train: LabeledSet,
        heldout: LabeledSet,
        steps: int,
        seed: int,
        resamples: int,
        public: LabeledSet | None = None,
    ) -> None:
        if len(train.images) == 0:
            raise ValueError("the judge needs judge-train images")
        if len(heldout.images) == 0:
            raise ValueError("the judge needs held-out images to be checked on")
        self.train, self.heldout = train, heldout
        self.steps, self.seed, self.resamples = steps, seed, resamples
        self.heldout_targets = heldout.labels.numpy() > 0.5
        self.heldout_resampler = Resampler(heldout.units, "heldout")
        self.cnn = self.read(self.train_on(train.images, train.labels))
        self.linear = self.read(self.train_on(train.images, train.labels, "linear"))
        # train-on-public: what the free public collection alone gives, the floor a release
        # must beat (same architecture and steps, tested on the same held-out patients)
        self.public = (
            None if public is None else self.read(self.train_on(public.images, public.labels))
        )
        self.model = self.cnn.model
        self.heldout_features = score_images(self.model, heldout.images)[1]
        self.train_features = score_images(self.model, train.images)[1]

    @classmethod
    def fit(
        cls,
        train: LabeledSet,
        heldout: LabeledSet,
        epochs: int = JUDGE_EPOCHS,
        seed: int = 0,
        resamples: int = DEFAULT_RESAMPLES,
        public: LabeledSet | None = None,
    ) -> Judge:
        """Train on `train` for `epochs` passes; every later classifier (train-on-public too)
        gets the same steps."""
        if epochs < 1:
            raise ValueError("epochs must be at least 1")
        steps = epochs * -(-len(train.images) // BATCH_SIZE)
        return cls(train, heldout, steps, seed, resamples, public)

    def train_on(
        self, images: torch.Tensor, labels: torch.Tensor, family: str = "cnn"
    ) -> Classifier:
        return train_classifier(images, labels, seed=self.seed, steps=self.steps, family=family)

    def read(self, model: Classifier) -> Reader:
        """What `model` says about the held-out patients, with its per-finding AUROC there."""
        probabilities = score_images(model, self.heldout.images)[0]
        point, draws = bootstrap(
            lambda rows: auroc_per_label(probabilities[rows], self.heldout_targets[rows]),
            [self.heldout_resampler],
            self.resamples,
            self.seed,
        )
        return Reader(model, probabilities, point, draws)

    @property
    def heldout_n(self) -> str:
        units = self.heldout_resampler.units
        return f"held-out real studies ({units} privacy units resampled)"

    def heldout_auroc(self, reader: Reader | None = None) -> tuple[Figure, dict[str, Figure]]:
        """A reader's mean AUROC on the held-out patients, and per finding; by default the
        judge's own (train-on-real, the ceiling)."""
        reader = reader or self.cnn
        n = len(self.heldout.images)
        mean = figure(nanmean(reader.point), nanmean(reader.draws), n, self.heldout_n, 0.5)
        return mean, _per_finding(reader.point, reader.draws, n, self.heldout_n, 0.5)

    def frechet(self, images: torch.Tensor, real: LabeledSet | None = None) -> Figure:
        """Frechet distance in the judge's features between images and real ones (default: all
        of the judge's real images; pass one site's set for a per-site distance).

        Both sides are resampled. The distance is biased upward at small n, and a resample
        (with repeated images) is effectively smaller, so the interval can sit above the point
        value when the two sets are nearly alike: read it as spread, compare like with like.
        """
        if real is None:
            real_features = np.concatenate([self.train_features, self.heldout_features])
            real_units = np.concatenate(
                [np.asarray(self.train.units), np.asarray(self.heldout.units)]
            )
        else:
            real_features, real_units = score_images(self.model, real.images)[1], real.units
        features = score_images(self.model, images)[1]
        if min(len(features), len(real_features)) < 2:
            return Figure(
                None,
                None,
                None,
                len(features),
                "synthetic images",
                None,
                "undefined: needs 2 images a side",
            )
        baseline = frechet_distance(self.train_features, self.heldout_features)
        point, draws = bootstrap(
            lambda s, r: np.array([frechet_distance(features[s], real_features[r])]),
            [Resampler(np.arange(len(features)), "pairs"), Resampler(real_units, "real")],
            self.resamples,
            self.seed,
        )
        return figure(
            point[0],
            draws[:, 0],
            len(features),
            f"synthetic images against {len(real_features)} real ones, both resampled",
            verdict_text=f"no chance level; lower is closer to the real images (judge-train vs "
            f"held-out real images: {baseline:.4g})",
        )

    def score(
        self,
        synthetic: SyntheticSet,
        train_on_synthetic: bool = True,
        phrasing: Phrasing | None = None,
    ) -> Scores:
        """Every figure of one synthetic set; train_on_synthetic=False skips the two extra
        classifiers (TSTR and augmentation), the only part that trains anything. With
        `phrasing`, per finding the share of reports that use it (`phrasing_share`)."""
        n = len(synthetic.images)
        pairs = Resampler(np.arange(n), "pairs")
        pairs_n = "synthetic pairs"
        conditioned = synthetic.labels.numpy() > 0.5
        figures: dict[str, Figure] = {}
        per_label: dict[str, dict[str, Figure]] = {}
        probabilities = {}  # by reader: "" the judge (CNN), "linear_" the second judge
        for prefix, reader in (("", self.cnn), ("linear_", self.linear)):
            real_mean, per_label[f"{prefix}real_heldout_auroc"] = self.heldout_auroc(reader)
            figures[f"{prefix}real_heldout_auroc"] = real_mean
            probabilities[prefix] = score_images(reader.model, synthetic.images)[0]
            mean, lift, per_label[f"{prefix}label_fidelity"] = self._fidelity(
                reader, probabilities[prefix], conditioned, pairs
            )
            figures[f"{prefix}label_fidelity"] = mean
            figures[f"{prefix}fidelity_lift_fraction"] = lift
        reported = labeler_positives(synthetic.reports)
        f1_point, f1_draws = bootstrap(
            lambda s: f1_per_label(reported[s], conditioned[s]), [pairs], self.resamples, self.seed
        )
        chance = chance_f1(reported, conditioned)
        figures["report_label_f1"] = figure(
            nanmean(f1_point),
            nanmean(f1_draws),
            n,
            pairs_n,
            chance,
        )
        in_image = probabilities[""] > IMAGE_THRESHOLD
        kappa_point, kappa_draws = bootstrap(
            lambda s: kappa_per_label(in_image[s], reported[s]), [pairs], self.resamples, self.seed
        )
        figures["image_report_kappa"] = figure(
            nanmean(kappa_point), nanmean(kappa_draws), n, pairs_n, 0.0
        )
        keys = Counter(report_key(text) for text in synthetic.reports)
        duplicated = sum(c for c in keys.values() if c > 1) / n
        exact = "counted on the whole set, not an estimate: no interval"
        figures["duplicate_rate"] = Figure(duplicated, None, None, n, pairs_n, None, exact)
        figures["distinct_reports"] = Figure(len(keys), None, None, n, pairs_n, None, exact)
        figures["frechet"] = self.frechet(synthetic.images)
        if self.public is not None:
            figures["public_auroc"], per_label["public_auroc"] = self.heldout_auroc(self.public)
        if phrasing is not None:
            per_label["phrasing_share"] = phrasing_share(
                synthetic, phrasing, self.resamples, self.seed
            )
        per_label["report_label_f1"] = _per_finding(f1_point, f1_draws, n, pairs_n)
        per_label["image_report_kappa"] = _per_finding(kappa_point, kappa_draws, n, pairs_n, 0.0)
        if train_on_synthetic:
            figures |= self._train_on_synthetic(synthetic, per_label)
        return Scores(figures, per_label)

    def _fidelity(
        self, reader: Reader, probabilities: np.ndarray, conditioned: np.ndarray, pairs: Resampler
    ) -> tuple[Figure, Figure, dict[str, Figure]]:
        """Label fidelity by one reader from its probabilities on the synthetic images: its mean
        AUROC against their conditioning labels, that as a fraction of its own lift on held-out
        real images, and per finding."""
        n, pairs_n = len(probabilities), "synthetic pairs"
        point, draws = bootstrap(
            lambda s: auroc_per_label(probabilities[s], conditioned[s]),
            [pairs],
            self.resamples,
            self.seed,
        )
        mean = figure(nanmean(point), nanmean(draws), n, pairs_n, 0.5)
        # the lift fraction resamples pairs and held-out patients together, independently
        real_draws = nanmean(reader.draws)
        with np.errstate(divide="ignore", invalid="ignore"):
            lift_draws = (nanmean(draws) - 0.5) / (real_draws - 0.5)
        lift_draws[real_draws <= 0.5] = np.nan
        real_lift = nanmean(reader.point) - 0.5
        lift = figure(
            (nanmean(point) - 0.5) / real_lift if real_lift > 0 else np.nan,
            lift_draws,
            n,
            f"{pairs_n} and {self.heldout_n}",
            0.0,
            verdict_text=None
            if real_lift > 0
            else "undefined: the judge is no better than chance on real held-out images",
        )
        real_mean = self.heldout_auroc(reader)[0]
        if real_lift > 0 and real_mean.verdict.startswith("not distinguishable"):
            caveat = "; the judge itself is not distinguishable from chance, so this means nothing"
            lift = replace(lift, verdict=lift.verdict + caveat)
        return mean, lift, _per_finding(point, draws, n, pairs_n, 0.5)

    def _train_on_synthetic(self, synthetic: SyntheticSet, per_label: dict) -> dict[str, Figure]:
        """TSTR and real + synthetic, both tested on the held-out patients. Ratios and
        differences are paired: every reader's draws resample the same held-out patients."""
        readers = {
            "tstr_auroc": self.read(self.train_on(synthetic.images, synthetic.labels)),
            "real_plus_synthetic_auroc": self.read(
                self.train_on(
                    torch.cat([self.train.images, synthetic.images]),
                    torch.cat([self.train.labels, synthetic.labels]),
                )
            ),
        }
        figures = {}
        for name, reader in readers.items():
            figures[name], per_label[name] = self.heldout_auroc(reader)
        tstr, mixed = readers["tstr_auroc"], readers["real_plus_synthetic_auroc"]
        figures["tstr_ratio"] = self.compare(tstr, self.cnn, "ratio")
        figures["augmentation_gain"] = self.compare(mixed, self.cnn, "gain")
        if self.public is not None:
            figures["tstr_minus_public"] = self.compare(tstr, self.public, "difference")
        return figures

    def compare(self, a: Reader, b: Reader, how: str) -> Figure:
        """a's mean held-out AUROC over b's (how="ratio"), or minus it ("gain", "difference"),
        paired: both sides of every draw come from the same resampled held-out patients."""
        (a_point, a_draws), (b_point, b_draws) = (
            (nanmean(r.point), nanmean(r.draws)) for r in (a, b)
        )
        n, n_means = len(self.heldout.images), self.heldout_n
        if how == "ratio":
            return figure(a_point / b_point, a_draws / b_draws, n, n_means, 0.5 / b_point)
        null = "zero gain" if how == "gain" else "no difference"
        return figure(a_point - b_point, a_draws - b_draws, n, n_means, 0.0, null)
