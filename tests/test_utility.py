"""The scoring library: bootstrap intervals, chance verdicts, chance-corrected agreement, and a
judge trained once that scores several synthetic sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emixer_model.config import FINDINGS, ModelConfig
from emixer_model.data.splits import EvaluationSplit, LabeledSet, split_labeled
from emixer_model.evaluation.bootstrap import Resampler, bootstrap
from emixer_model.evaluation.utility import (
    Figure,
    Judge,
    SyntheticSet,
    auroc_per_label,
    chance_f1,
    figure,
    kappa_per_label,
    nanmean,
    over_seeds,
    paired_difference,
    phrasing_share,
)

# ---------------------------------------------------------------------------------------------
# bootstrap and verdicts on plain numbers


def noisy_scores(n: int, signal: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores [n,1] that rank a balanced binary target [n,1] with the given signal strength."""
    rng = np.random.default_rng(seed)
    targets = (np.arange(n) % 2).astype(bool)[:, None]
    return targets * signal + rng.normal(size=(n, 1)), targets


def auroc_figure(n: int, signal: float, seed: int = 0):
    scores, targets = noisy_scores(n, signal, seed)
    point, draws = bootstrap(
        lambda rows: auroc_per_label(scores[rows], targets[rows]),
        [Resampler(np.arange(n), "pairs")],
        300,
        seed,
    )
    return figure(point[0], draws[:, 0], n, "pairs", chance=0.5)


def test_interval_contains_the_value_and_narrows_with_n():
    small, large = auroc_figure(80, 1.0), auroc_figure(1280, 1.0)
    for result in (small, large):
        assert result.low < result.value < result.high
    assert (large.high - large.low) < 0.5 * (small.high - small.low)  # ~ 1/sqrt(16) = 0.25
    assert large.n == 1280


def test_verdict_says_when_a_figure_is_chance():
    assert auroc_figure(200, 0.0).verdict == "not distinguishable from chance (0.5)"
    assert auroc_figure(200, 2.0).verdict == "above chance (0.5)"
    assert auroc_figure(200, -2.0).verdict == "below chance (0.5)"
    gain = figure(0.02, np.linspace(-0.01, 0.05, 100), 18, "held-out", 0.0, "zero gain")
    assert gain.verdict == "not distinguishable from zero gain (0)"


def test_seeds_widen_the_interval_to_their_spread():
    rng = np.random.default_rng(0)

    def run(centre: float):
        draws = centre + 0.01 * rng.normal(size=400)
        return figure(centre, draws, 50, "held-out", chance=0.5)

    alike = [run(0.7) for _ in range(3)]
    assert over_seeds(alike).value == pytest.approx(0.7)
    assert over_seeds(alike).high - over_seeds(alike).low < 0.05
    spread = over_seeds([run(0.6), run(0.7), run(0.8)])
    assert spread.value == pytest.approx(0.7) and spread.n_means.endswith("mean of 3 seeds")
    # the mean of 3 seeds spread by 0.1 moves by about 0.1 / sqrt(3) between seed draws
    assert spread.low < 0.65 and spread.high > 0.75
    exact = over_seeds([Figure(0.0, None, None, 9, "pairs"), Figure(0.5, None, None, 9, "pairs")])
    assert exact.value == 0.25 and exact.low is None


def test_paired_difference_cancels_what_both_sides_share():
    shared = np.random.default_rng(1).normal(0.7, 0.05, 400)  # both resampled the same patients
    a = figure(0.75, shared + 0.05, 80, "held-out", chance=0.5)
    b = figure(0.70, shared, 80, "held-out", chance=0.5)
    assert a.low < b.high  # the two intervals overlap ...
    difference = paired_difference(a, b)
    assert difference.value == pytest.approx(0.05)
    assert difference.verdict == "above no difference (0)"  # ... their paired difference does not
    assert over_seeds([difference, difference], null="no difference").low > 0


def test_undefined_figure_has_no_interval():
    undefined = figure(np.nan, np.full(50, np.nan), 10, "pairs", chance=0.5)
    assert undefined.value is None and undefined.low is None and undefined.verdict == "undefined"
    assert undefined.as_dict()["n"] == 10


def test_resampler_keeps_units_whole():
    units = np.array(["a", "a", "a", "b", "c", "c"])
    resampler = Resampler(units, "heldout")
    assert resampler.units == 3
    rng = resampler.generator(0)
    for _ in range(20):
        drawn = resampler.draw(rng)
        counts = {u: int((units[drawn] == u).sum()) for u in "abc"}
        assert counts["a"] % 3 == 0 and counts["c"] % 2 == 0
        assert len(drawn) == sum(counts.values())


def test_phrasing_share_counts_reports_of_each_finding():
    """The share of reports conditioned on a finding that satisfy the predicate, for any finding
    name and predicate; undefined where no pair is conditioned on the finding."""
    cardio, effusion = FINDINGS.index("Cardiomegaly"), FINDINGS.index("Pleural Effusion")
    labels = torch.zeros(8, len(FINDINGS))
    labels[:4, cardio] = 1  # 4 pairs conditioned on cardiomegaly, 1 of them in "site" words
    labels[4:, effusion] = 1  # 4 on effusion, 3 in "site" words
    reports = ["big heart", "cardiomegaly", "cardiomegaly", "cardiomegaly"]
    reports += ["fluid noted", "fluid noted", "fluid noted", "pleural effusion"]
    synthetic = SyntheticSet(torch.zeros(8, 1, 4, 4), labels, reports)
    site_words = {"Cardiomegaly": "big heart", "Pleural Effusion": "fluid"}

    def uses_site_words(report: str, finding: str) -> bool:
        return finding in site_words and site_words[finding] in report

    shares = phrasing_share(synthetic, uses_site_words, resamples=200, seed=0)
    assert set(shares) == set(FINDINGS)
    assert shares["Cardiomegaly"].value == 0.25 and shares["Cardiomegaly"].n == 4
    assert shares["Pleural Effusion"].value == 0.75
    assert shares["Pleural Effusion"].low < 0.75 < shares["Pleural Effusion"].high
    assert shares["Edema"].value is None and shares["Edema"].verdict.startswith("undefined")


def test_kappa_does_not_reward_two_sides_saying_nothing():
    rng = np.random.default_rng(0)
    images = rng.random((200, 3)) < 0.3
    nothing = np.zeros_like(images)
    # 70% of pairs "agree" (both negative), yet a report that states nothing agrees by chance only
    assert kappa_per_label(images, nothing) == pytest.approx([0.0, 0.0, 0.0])
    assert np.isnan(kappa_per_label(nothing, nothing)).all()
    assert kappa_per_label(images, images) == pytest.approx([1.0, 1.0, 1.0])
    assert nanmean(np.array([np.nan, np.nan])) != nanmean(np.array([np.nan, np.nan]))  # nan


def test_chance_f1_hand_computed():
    predicted = np.array([[1], [1], [0], [0]], bool)  # rate 1/2
    targets = np.array([[1], [0], [0], [0]], bool)  # rate 1/4
    assert chance_f1(predicted, targets) == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert chance_f1(np.zeros((4, 1), bool), np.zeros((4, 1), bool)) is None


# ---------------------------------------------------------------------------------------------
# the judge on phantoms

SIZE = 32


@pytest.fixture(scope="module")
def phantom_sets(tmp_path_factory) -> tuple[LabeledSet, LabeledSet]:
    """Judge-train and held-out patients of one 160-study phantom site at 32 px."""
    from emixer_model.data.phantoms import write_phantom_sites
    from emixer_model.data.site import load_site

    root = tmp_path_factory.mktemp("utility")
    (site_dir,) = write_phantom_sites(root / "real", sites=1, per_site=160, unlabeled=0, size=SIZE)
    site = load_site(site_dir, root / "state", ModelConfig(resolution=SIZE))
    return split_labeled(site, EvaluationSplit.choose(site, 0.25, seed=0), "site_1")


@pytest.fixture(scope="module")
def judge(phantom_sets) -> Judge:
    train, heldout = phantom_sets
    return Judge.fit(train, heldout, epochs=80, seed=0, resamples=200)


def test_split_holds_out_whole_units(phantom_sets):
    train, heldout = phantom_sets
    assert not set(train.units) & set(heldout.units)
    assert len(train.images) + len(heldout.images) == 160
    both = LabeledSet.concat([train, heldout])
    assert len(both.images) == 160 and set(both.units) == set(train.units) | set(heldout.units)


def test_judge_sees_real_findings(judge):
    real, _ = judge.heldout_auroc()
    assert real.value > 0.65 and real.verdict == "above chance (0.5)"
    assert real.n == len(judge.heldout.images)
    # the second judge is another family, and a weaker but real reader of the findings
    linear, _ = judge.heldout_auroc(judge.linear)
    assert linear.verdict == "above chance (0.5)" and linear.value != real.value
    assert type(judge.linear.model) is not type(judge.model)


def test_lift_fraction_is_one_for_real_heldout_images(judge):
    heldout = judge.heldout
    scores = judge.score(
        SyntheticSet(heldout.images, heldout.labels, [""] * len(heldout.images)),
        train_on_synthetic=False,
    )
    lift = scores.figures["fidelity_lift_fraction"]
    assert lift.value == pytest.approx(1.0)
    assert lift.low < 1.0 < lift.high
    noise = torch.rand(heldout.images.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert scores.figures["frechet"].value < judge.frechet(noise).low


def noise_pairs(n: int, seed: int) -> SyntheticSet:
    """Uniform noise images with random labels and empty reports: pairs that carry nothing."""
    generator = torch.Generator().manual_seed(seed)
    return SyntheticSet(
        torch.rand(n, 1, SIZE, SIZE, generator=generator) * 2 - 1,
        (torch.rand(n, len(FINDINGS), generator=generator) < 0.3).float(),
        [""] * n,
    )


def test_random_images_and_empty_reports_are_called_chance(judge):
    noise = noise_pairs(80, seed=1)
    scores = judge.score(noise)
    fig = scores.figures
    for judged in ("label_fidelity", "linear_label_fidelity"):
        assert fig[judged].verdict == "not distinguishable from chance (0.5)"
    assert "not distinguishable from chance" in fig["fidelity_lift_fraction"].verdict
    assert fig["report_label_f1"].value == 0.0
    # reports that state nothing: agreement with the images is chance (0, up to float rounding)
    # or undefined, not ~1
    kappa = fig["image_report_kappa"].value
    assert kappa is None or kappa == pytest.approx(0.0, abs=1e-12)
    assert fig["duplicate_rate"].value == 1.0 and fig["distinct_reports"].value == 1
    assert fig["tstr_auroc"].n == len(judge.heldout.images)
    gain = fig["augmentation_gain"]
    real_plus = fig["real_plus_synthetic_auroc"].value
    assert gain.value == pytest.approx(real_plus - fig["real_heldout_auroc"].value)
    assert gain.low <= gain.value <= gain.high
    # the same judge scores again without retraining itself, and its figures are repeatable
    model = judge.model
    again = judge.score(noise, train_on_synthetic=False)
    assert judge.model is model
    assert again.figures["label_fidelity"] == fig["label_fidelity"]
    assert again.per_label["report_label_f1"] == scores.per_label["report_label_f1"]


def test_train_on_public_is_a_baseline_paired_with_tstr(phantom_sets):
    """With the judge-train patients standing in for the public collection, train-on-public is
    the same classifier as train-on-real (same images, seed and steps): its figures must equal
    the judge's, and TSTR minus public must equal TSTR minus real, draw by draw."""
    train, heldout = phantom_sets
    judge = Judge.fit(train, heldout, epochs=10, seed=0, resamples=100, public=train)
    synthetic = noise_pairs(40, seed=5)
    scores = judge.score(synthetic)
    fig = scores.figures
    assert fig["public_auroc"] == fig["real_heldout_auroc"]
    assert scores.per_label["public_auroc"] == scores.per_label["real_heldout_auroc"]
    difference = fig["tstr_minus_public"]
    assert difference.value == pytest.approx(fig["tstr_auroc"].value - fig["public_auroc"].value)
    assert difference.verdict.endswith("no difference (0)")
    assert (
        "tstr_minus_public"
        not in Judge.fit(train, heldout, 1, resamples=10).score(synthetic).figures
    )


def test_faithful_reports_agree_with_their_labels(judge):
    from emixer_model.data.phantoms import render_phantom
    from emixer_model.text.grammar import SITE_GRAMMAR, write_report

    rng = np.random.default_rng(2)
    conditions = [[f] for f in FINDINGS] * 8
    images, reports = [], []
    for condition in conditions:
        labels = {f: int(f in condition) for f in FINDINGS}
        images.append(render_phantom(labels, rng, SIZE))
        reports.append(write_report(labels, rng, SITE_GRAMMAR))
    faithful = SyntheticSet(
        torch.from_numpy(np.stack(images)).float()[:, None] * 2 - 1,
        torch.tensor([[float(f in c) for f in FINDINGS] for c in conditions]),
        reports,
    )
    fig = judge.score(faithful, train_on_synthetic=False).figures
    assert fig["report_label_f1"].value > 0.9
    assert fig["report_label_f1"].verdict.startswith("above chance")
    assert fig["label_fidelity"].verdict == "above chance (0.5)"
    assert fig["linear_label_fidelity"].verdict == "above chance (0.5)"
    assert fig["image_report_kappa"].low > 0.0
    assert "tstr_auroc" not in fig


# ---------------------------------------------------------------------------------------------
# the bench's synthetic sets


def test_bench_scores_the_release_a_researcher_receives():
    """TSTR conditions on the release's own conditions (`emixer release`'s defaults), never on the
    test patients' label vectors."""
    from bench.utility import synthetic_for
    from emixer_model.networks import build_networks, get_weights
    from emixer_model.text.vocabulary import VOCAB_SIZE
    from server.tools.release import label_vector, parse_conditions
    from tests.conftest import tiny_config

    cfg = tiny_config()
    weights = get_weights(build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS)))
    synthetic = synthetic_for(cfg, weights, per=2)
    expected = [label_vector(c) for c in parse_conditions(None) for _ in range(2)]
    assert synthetic.labels.numpy().tolist() == np.stack(expected).tolist()
    assert len(synthetic.reports) == len(expected)


def test_bench_validation_and_test_splits_are_disjoint_halves(phantom_sets):
    from bench.utility import scored_split

    _, heldout = phantom_sets
    validation, test = scored_split(heldout, "validation"), scored_split(heldout, "test")
    assert set(validation.units).isdisjoint(test.units)
    assert len(validation.images) + len(test.images) == len(heldout.images)
    assert len(validation.images) > 0 and len(test.images) > 0
    assert scored_split(heldout, "test").units.tolist() == test.units.tolist()
