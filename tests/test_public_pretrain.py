"""The public warm start teaches R the grammar's report language and touches nothing else."""

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from emixer_model.config import (
    FINDINGS,
    SITE_KNOWLEDGE_TRAIN,
    ConfigError,
    EmixerConfig,
    ModelConfig,
    TrainConfig,
)
from emixer_model.networks import UNSEEN_LOGIT, build_networks, get_weights, set_weights
from emixer_model.public_pretrain import (
    fill_missing_reports,
    pretrain_public,
    public_report_loss,
    public_reports,
    warm_start_report_decoder,
)
from emixer_model.text.grammar import SITE_ONLY_FINDING
from emixer_model.text.labeler import label_report
from emixer_model.text.vocabulary import EOS, PAD, VOCAB_SIZE, decode_report
from emixer_model.training import sample_prior
from tests.conftest import site_knowledge_in

CFG = ModelConfig(
    resolution=16, width=8, embed_dim=32, max_sentences=3, max_words=8, heads=2, groups=4
)
STEPS = 60


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: on a shared 2-core machine a second torch thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh(seed: int = 0):
    torch.manual_seed(seed)
    return build_networks(CFG, VOCAB_SIZE, len(FINDINGS))


def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    return public_reports(128, CFG, np.random.default_rng(999), torch.Generator().manual_seed(999))


@pytest.fixture(scope="module")
def warmed():
    nets = fresh()
    before = {k: v.copy() for k, v in get_weights(nets).items()}
    with torch.no_grad():
        loss_before = public_report_loss(nets, CFG, *held_out()).item()
    result = warm_start_report_decoder(nets, CFG, STEPS, seed=0, batch_size=32, lr=3e-3)
    return nets, before, loss_before, result


def test_public_reports_are_encoded_grammar_reports():
    labels, tokens = public_reports(
        16, CFG, np.random.default_rng(0), torch.Generator().manual_seed(0)
    )
    assert labels.shape == (16, len(FINDINGS))
    assert tokens.shape == (16, CFG.max_sentences, CFG.max_words)
    assert (tokens[:, 0, 0] != PAD).all()  # every report has a first sentence
    assert ((tokens == EOS).sum(dim=2) <= 1).all()  # at most one EOS per sentence


def test_warm_start_clearly_lowers_held_out_loss(warmed):
    nets, _, loss_before, result = warmed
    with torch.no_grad():
        loss_after = public_report_loss(nets, CFG, *held_out()).item()
    assert loss_after < loss_before - 2.0
    assert loss_after < math.log(VOCAB_SIZE)  # better than uniform over the vocabulary
    assert result["steps"] == STEPS and result["last_loss"] < result["first_loss"] - 2.0


def test_warm_start_changes_only_the_report_decoder(warmed):
    nets, before, _, _ = warmed
    after = get_weights(nets)
    for key, value in before.items():
        same = np.array_equal(value, after[key])
        if key.startswith("r."):
            continue
        assert same, f"{key} changed although only R may train"
    changed = [k for k in before if k.startswith("r.") and not np.array_equal(before[k], after[k])]
    assert len(changed) > 10
    assert all(p.grad is None for p in nets.parameters())  # nothing left for the DP optimizer


def test_warm_start_is_deterministic_for_a_seed():
    runs = []
    for seed in (0, 0, 1):
        nets = fresh()
        warm_start_report_decoder(nets, CFG, 8, seed=seed, batch_size=32, lr=3e-3)
        runs.append({k: v for k, v in get_weights(nets).items() if k.startswith("r.")})
    a, b, c = runs
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_warm_started_model_still_trains_privately(warmed):
    """Nothing structural changed: Opacus still validates R and gives it per-sample grads."""
    nets, *_ = warmed
    copy = fresh(seed=5)
    set_weights(copy, get_weights(nets))  # the weights travel to sites like any global model
    private = nn.ModuleDict({"d": copy.d, "e": copy.e, "r": copy.r})
    assert ModuleValidator.validate(private, strict=False) == []
    GradSampleModule(copy.r, loss_reduction="sum")
    labels, tokens = (a[:4] for a in held_out())
    embedding = torch.randn(4, CFG.embed_dim)
    copy.r.teacher_forced_loss(embedding, labels, tokens).sum().backward()  # hooks sit on R
    for name, p in copy.r.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 4, name


def test_zero_steps_changes_nothing():
    nets = fresh()
    before = get_weights(nets)
    result = warm_start_report_decoder(nets, CFG, 0, seed=0)
    assert math.isnan(result["first_loss"]) and result["steps"] == 0
    after = get_weights(nets)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_bad_arguments_say_what_is_wrong():
    nets = fresh()
    with pytest.raises(ValueError, match="steps must be >= 0"):
        warm_start_report_decoder(nets, CFG, -1, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        warm_start_report_decoder(nets, CFG, 1, seed=0, batch_size=0)
    with pytest.raises(ValueError, match="ModelConfig the networks were built from"):
        warm_start_report_decoder(nets, ModelConfig(), 1, seed=0)
    with pytest.raises(ConfigError, match="public_warm_start_steps"):
        TrainConfig(public_warm_start_steps=-1)


def tiny_public(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A public collection stand-in: images, labels from the prior, grammar reports."""
    g = torch.Generator().manual_seed(seed)
    labels, tokens = public_reports(n, CFG, np.random.default_rng(seed), g)
    images = torch.rand(n, 1, CFG.resolution, CFG.resolution, generator=g) * 2 - 1
    return images, labels, tokens


def test_pretrain_public_trains_all_four_networks_without_leftover_gradients():
    nets = fresh()
    before = get_weights(nets)
    images, labels, tokens = tiny_public()
    cfg = EmixerConfig(model=CFG, train=TrainConfig(batch_size=8))
    result = pretrain_public(nets, cfg, images, labels, tokens, steps=3, seed=0)
    after = get_weights(nets)
    for prefix in ("g.", "g_ema.", "e.", "r.", "d."):
        assert any(
            not np.array_equal(before[k], after[k]) for k in before if k.startswith(prefix)
        ), f"{prefix} did not move"
    assert result["steps"] == 3 and set(result["losses"]) >= {"d_real", "report", "g"}
    assert all(p.grad is None for p in nets.parameters())
    # a site's private steps learn D's finding head on features whitened by the public
    # collection (the public model carries its statistics, learned from nothing private)
    with torch.no_grad():
        features = nets.d.image_features(images)
    torch.testing.assert_close(nets.d.feature_mean, features.mean(dim=0))
    whitening = nets.d.feature_whitening
    torch.testing.assert_close(whitening, whitening.T)
    assert not torch.allclose(whitening, torch.eye(len(whitening)))


def test_public_pretraining_ignores_the_sites_private_recipe():
    """train.lr_* and label_weight are the sites' private recipe (SITE_KNOWLEDGE_TRAIN: SGD at lr
    0.1 for D, 1 for R's word bias, the finding head weighted 16); public pretraining on plain
    Adam at those rates diverged (d_real 0, g loss in the thousands), and the recipe was measured
    from a public model pretrained at the defaults, so pretraining makes the same public model
    under any recipe (the demo pretrains with the recipe's config)."""
    images, labels, tokens = tiny_public()
    models = []
    for train in (TrainConfig(batch_size=8), TrainConfig(batch_size=8, **SITE_KNOWLEDGE_TRAIN)):
        torch.manual_seed(0)
        nets = fresh()
        pretrain_public(nets, EmixerConfig(model=CFG, train=train), images, labels, tokens, 3, 0)
        models.append(get_weights(nets))
    for name, value in models[0].items():
        np.testing.assert_array_equal(value, models[1][name], err_msg=name)


def test_a_finding_the_public_collection_never_shows_changes_nothing_in_the_public_model():
    """G is never asked for it in pretraining and its label columns and D's finding head for it
    are zero: the public model draws the same image and report with it on or off and holds no
    opinion of how it looks, so whatever it means after the rounds, the sites taught it (the
    site-knowledge bench's public-only row rests on this)."""
    nets = fresh()
    images, labels, tokens = tiny_public(200)  # every public finding shows up at least once
    column = FINDINGS.index(SITE_ONLY_FINDING)
    assert labels[:, column].sum() == 0  # public_reports never labels it
    asked = []  # the site-only label of every row G is conditioned on
    nets.g.register_forward_pre_hook(lambda _, args: asked.append(args[1][:, column]))
    cfg = EmixerConfig(model=CFG, train=TrainConfig(batch_size=8))
    result = pretrain_public(nets, cfg, images, labels, tokens, steps=3, seed=0)
    assert result["unshown"] == (SITE_ONLY_FINDING,)
    assert len(asked) == 6 and torch.cat(asked).sum() == 0
    nets.eval()
    off = sample_prior(16, torch.Generator().manual_seed(1), (SITE_ONLY_FINDING,))
    on = off.clone()
    on[:, column] = 1.0
    z = torch.randn(16, CFG.latent_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for g in (nets.g, nets.g_ema):
            assert torch.equal(g(z, on), g(z, off))
        embedding = nets.e(nets.g_ema(z, off))
        assert torch.equal(nets.r.sample_ids(embedding, on), nets.r.sample_ids(embedding, off))
        tokens_off = nets.r.sample_ids(embedding, off)
        x = nets.g_ema(z, off)
        assert torch.equal(nets.d(x, tokens_off, on), nets.d(x, tokens_off, off))
        # D's finding head has no opinion of it (not trained on "always absent"), where it has
        # learned the findings the collection shows; D's label prior says it is (almost) never
        _, findings = nets.d.score_and_labels(x, tokens_off, off)
        assert torch.allclose(findings[:, column], torch.tensor(UNSEEN_LOGIT))  # "absent"
        assert findings[:, column - 1].abs().min() > 0
        assert nets.d.label_prior()[column] < 0.002


def test_pretrain_public_refuses_an_empty_collection():
    nets = fresh()
    empty = torch.zeros(0, 1, CFG.resolution, CFG.resolution)
    with pytest.raises(ValueError, match="no usable"):
        pretrain_public(nets, EmixerConfig(model=CFG), empty, empty, empty, 1, 0)


def test_fill_missing_reports_writes_grammar_text_only_where_missing():
    _, labels, tokens = tiny_public(6)
    has_report = torch.tensor([True, False, True, False, True, True])
    blank = tokens.clone()
    blank[~has_report] = PAD
    filled = fill_missing_reports(labels, blank, has_report, CFG, seed=0)
    assert torch.equal(filled[has_report], blank[has_report])
    assert (filled[~has_report][:, 0, 0] != PAD).all()  # a first sentence was written


def test_warm_start_and_filled_in_reports_never_name_what_only_sites_know():
    """The warm start's text and the reports written for public studies use the public grammar:
    no site-only finding (though the fixed prior asks for it) and no site phrasing."""
    caps = ModelConfig()  # the default text caps: nothing a sentence says is cut off
    column = FINDINGS.index(SITE_ONLY_FINDING)
    prior = sample_prior(400, torch.Generator().manual_seed(3))
    assert prior[:, column].sum() > 20  # the prior the warm start draws from does ask for it
    labels, tokens = public_reports(
        400, caps, np.random.default_rng(3), torch.Generator().manual_seed(3)
    )
    assert labels[:, column].sum() == 0 and (labels.sum(dim=1) >= 1).all()
    warm = [decode_report(ids) for ids in tokens]
    assert [r for r in warm if site_knowledge_in(r)] == []
    assert sum("cardiomegaly" in r.lower() for r in warm) > 40  # the shared finding is written

    # public labels that include the site-only finding (no phantom collection has it, a real one
    # might): the filled-in text leaves it unsaid
    n = 200
    public = sample_prior(n, torch.Generator().manual_seed(4))
    public[: n // 2, column] = 1.0
    empty = torch.full((n, caps.max_sentences, caps.max_words), PAD)
    filled = fill_missing_reports(public, empty, torch.zeros(n, dtype=torch.bool), caps, seed=0)
    reports = [decode_report(ids) for ids in filled]
    assert all(reports) and [r for r in reports if site_knowledge_in(r)] == []
    only_site_only = (public[:, 1:].sum(dim=1) == 1) & (public[:, column] == 1)
    assert only_site_only.any()  # rows whose one finding is unsaid get a normal report
    assert all(
        label_report(reports[i]).get("No Finding") == 1
        for i in only_site_only.nonzero().flatten().tolist()
    )
