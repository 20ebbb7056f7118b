"""The four EMIXER networks: shapes, report decoding rules, Opacus compatibility, weight I/O."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from emixer_model.config import FINDINGS, ModelConfig
from emixer_model.networks import (
    CausalSelfAttention,
    _draw,
    build_networks,
    get_weights,
    pick_device,
    set_weights,
    whiten_finding_head,
)
from emixer_model.text.vocabulary import EOS, PAD
from tests.conftest import TINY_MODEL

V, L, B = 30, len(FINDINGS), 5
S, W = TINY_MODEL.max_sentences, TINY_MODEL.max_words


@pytest.fixture()
def nets():
    torch.manual_seed(0)
    return build_networks(TINY_MODEL, V, L)


def test_shapes_and_ranges(nets) -> None:
    z, y = torch.randn(B, TINY_MODEL.latent_dim), torch.zeros(B, L)
    x = nets.g(z, y)
    assert x.shape == (B, 1, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    e = nets.e(x)
    assert e.shape == (B, TINY_MODEL.embed_dim)
    ids = nets.r.sample_ids(e, y)
    assert ids.shape == (B, S, W) and ids.dtype == torch.long
    assert nets.d(x, ids, y).shape == (B,)
    assert nets.d.rotation_logits(x).shape == (B, 4)


def test_bigger_resolution_builds() -> None:
    cfg = ModelConfig(resolution=32, width=8, embed_dim=32, heads=2, max_sentences=2, max_words=4)
    n = build_networks(cfg, V, L)
    assert n.g(torch.randn(2, cfg.latent_dim), torch.zeros(2, L)).shape == (2, 1, 32, 32)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"resolution": 48}, "power of two"), ({"heads": 3}, "divisible")],
)
def test_bad_config_is_refused(change: dict, message: str) -> None:
    cfg = ModelConfig(**{**TINY_MODEL.__dict__, **change})
    with pytest.raises(ValueError, match=message):
        build_networks(cfg, V, L)


def test_sample_ids_pads_after_eos_and_after_stop(nets) -> None:
    with torch.no_grad():  # make EOS likely early; with no stop bias some sentences stop
        nets.r.head.bias[EOS] += 3.0
        nets.r.stop.bias.fill_(0.0)
    ids = nets.r.sample_ids(torch.randn(64, TINY_MODEL.embed_dim) * 3, torch.zeros(64, L))
    saw_eos = saw_stop = False
    for report in ids:
        stopped = False
        for sentence in report:
            if stopped:
                assert (sentence == PAD).all()
                continue
            if (sentence == PAD).all():
                stopped = saw_stop = True
                continue
            assert sentence[0] != PAD
            eos = (sentence == EOS).nonzero()
            if len(eos):
                saw_eos = True
                assert (sentence[int(eos[0]) + 1 :] == PAD).all()
            else:
                assert (sentence != PAD).all()
    assert saw_eos and saw_stop


def _greedy_reference(r: nn.Module, e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The slow greedy decoder sample_ids replaced: whole prefix re-run through `words` per step."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return F.one_hot(logits.argmax(dim=-1), r.V).to(logits.dtype)

    with torch.no_grad():
        return r._decode(e, y, pick).argmax(dim=-1)


@pytest.mark.parametrize("seed", [0, 1, 2, 4])
def test_sample_ids_fast_path_matches_full_prefix_decoding(seed: int) -> None:
    cfg = ModelConfig(**{**TINY_MODEL.__dict__, "word_layers": 2})  # a cache in each layer
    torch.manual_seed(seed)
    r = build_networks(cfg, V, L).r.eval()
    with torch.no_grad():  # early EOS and some stops, so both masking rules are exercised
        r.head.bias[EOS] += 0.8
        r.stop.bias += 0.3
    e = torch.randn(48, cfg.embed_dim) * 3
    y = (torch.rand(48, L) < 0.3).float()
    ids = r.sample_ids(e, y)
    torch.testing.assert_close(ids, _greedy_reference(r, e, y), rtol=0, atol=0)
    stopped = (ids == PAD).all(dim=2)
    assert (ids == EOS).any() and stopped.any() and not stopped.all()
    assert (ids[..., -1] != PAD).any()  # some sentence reached the last word


def test_kv_cache_attention_equals_full_causal_attention() -> None:
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2)
    x = torch.randn(3, 2, 5, 16)
    with torch.no_grad():
        full = attn(x)
        cache: dict[str, torch.Tensor] = {}
        steps = [attn(x[:, :, :2], cache)] + [attn(x[:, :, t : t + 1], cache) for t in range(2, 5)]
        torch.testing.assert_close(torch.cat(steps, dim=2), full)
        with pytest.raises(ValueError, match="one new position"):
            attn(x[:, :, :2], cache)


def test_generate_soft_is_one_hot_and_differentiable(nets) -> None:
    e = nets.e(torch.randn(B, 1, 16, 16))
    y = torch.zeros(B, L)
    soft = nets.r.generate_soft(e, y, tau=1.0, generator=torch.Generator().manual_seed(1))
    assert soft.shape == (B, S, W, V)
    torch.testing.assert_close(soft.sum(-1), torch.ones(B, S, W))
    hard = soft.detach().round()
    torch.testing.assert_close(soft.detach(), hard)  # straight-through: one-hot forward values
    score = nets.d(torch.randn(B, 1, 16, 16), soft, torch.zeros(B, L)).sum()
    score.backward()
    assert nets.e.fc.weight.grad.abs().sum() > 0  # the report path reaches the encoder


def test_whitening_the_finding_head_changes_no_output_only_what_it_reads(nets) -> None:
    """Refolded twice (a public model refolded again reads the same), D's finding logits stay
    those of the raw head; the head's input is whitened on the images it was given: mean 0,
    covariance the identity (up to the ridge)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 1, 16, 16, generator=g) * 0.5 + 0.2
    ids, y = torch.randint(3, V, (400, S, W), generator=g), torch.rand(400, L, generator=g)
    with torch.no_grad():
        nets.d.classify.bias.uniform_(-3, 3)
        raw = nets.d.score_and_labels(x, ids, y)[1]
        whiten_finding_head(nets, x[:300])
        torch.testing.assert_close(nets.d.score_and_labels(x, ids, y)[1], raw, atol=1e-4, rtol=1e-4)
        whiten_finding_head(nets, x[100:])
        torch.testing.assert_close(nets.d.score_and_labels(x, ids, y)[1], raw, atol=1e-4, rtol=1e-4)
        features = nets.d.image_features(x[100:])
    white = (features - nets.d.feature_mean) @ nets.d.feature_whitening
    d = features.shape[1]
    torch.testing.assert_close(white.mean(dim=0), torch.zeros(d), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cov(white.T), torch.eye(d), atol=0.02, rtol=0)


def test_discriminator_reads_ids_and_soft_tokens_through_one_path(nets) -> None:
    x, y = torch.randn(B, 1, 16, 16), torch.rand(B, L)
    ids = torch.randint(3, V, (B, S, W))
    ids[:, 2] = PAD  # an absent sentence
    ids[:, 0, 4:] = PAD  # a short sentence
    one_hot = F.one_hot(ids, V).float()
    torch.testing.assert_close(nets.d(x, ids, y), nets.d(x, one_hot, y))


def test_teacher_forced_loss_is_per_sample(nets) -> None:
    tokens = torch.randint(3, V, (B, S, W))
    tokens[:, :, -1] = EOS
    tokens[1] = PAD  # a row without a report (unlabeled) still gives a finite loss
    e = torch.randn(B, TINY_MODEL.embed_dim)
    y = torch.zeros(B, L)
    loss = nets.r.teacher_forced_loss(e, y, tokens)
    assert loss.shape == (B,) and torch.isfinite(loss).all()
    other = tokens.clone()
    other[0] = torch.randint(3, V, (S, W))
    changed = nets.r.teacher_forced_loss(e, y, other)
    torch.testing.assert_close(loss[1:], changed[1:])  # row 0's tokens touch only row 0
    assert loss[0] != changed[0]
    relabeled = y.clone()
    relabeled[2, 1] = 1.0
    by_label = nets.r.teacher_forced_loss(e, relabeled, tokens)
    assert by_label[2] != loss[2]  # the report decoder reads the labels ...
    torch.testing.assert_close(by_label[3:], loss[3:])  # ... of its own row only


def test_draw_follows_the_probabilities_and_never_draws_a_zero() -> None:
    """sample_ids' inverse-CDF draw: zero entries first, inside and last are never drawn."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(60_000, 1)
    drawn = _draw(probs, torch.Generator().manual_seed(0))
    frequency = torch.bincount(drawn, minlength=6) / len(drawn)
    assert frequency[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(frequency, probs[0], atol=0.01, rtol=0)  # 5 standard errors


def test_sampled_reports_differ_and_greedy_ones_repeat(nets) -> None:
    e, y = torch.zeros(64, TINY_MODEL.embed_dim), torch.zeros(64, L)
    with torch.no_grad():
        nets.r.stop.bias.fill_(-5.0)  # every sentence present, so there are words to differ
    greedy = nets.r.sample_ids(e, y)
    assert (greedy == greedy[0]).all()
    drawn = nets.r.sample_ids(e, y, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert len({tuple(row.flatten().tolist()) for row in drawn}) > 32
    again = nets.r.sample_ids(e, y, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)


def test_private_networks_are_opacus_compatible(nets) -> None:
    for name in ("d", "e", "r"):
        ModuleValidator.validate(getattr(nets, name), strict=True)
    forbidden = (nn.modules.batchnorm._BatchNorm, nn.Embedding, nn.RNNBase, nn.MultiheadAttention)
    assert not [m for m in nets.modules() if isinstance(m, forbidden)]


def test_weights_round_trip_and_stable_keys(nets) -> None:
    weights = get_weights(nets)
    assert all(a.dtype == np.float32 for a in weights.values())
    other = build_networks(TINY_MODEL, V, L)
    set_weights(other, weights)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(other.e(x), nets.e(x))
    wrapped = GradSampleModule(other.d)
    assert set(get_weights(wrapped)) == {k[2:] for k in weights if k.startswith("d.")}


def test_set_weights_names_the_bad_key(nets) -> None:
    weights = get_weights(nets)
    missing = dict(weights)
    del missing["e.fc.bias"]
    with pytest.raises(ValueError, match="e.fc.bias"):
        set_weights(nets, missing)
    older = dict(weights)  # a checkpoint from before R had its per-label word bias
    del older["r.label_words.weight"]
    with pytest.raises(ValueError, match="label_words.*made again.*emixer pretrain"):
        set_weights(nets, older)
    wrong = dict(weights)
    wrong["g.out.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="g.out.weight.*shape"):
        set_weights(nets, wrong)


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")
