"""The private step: every real-data update clipped and noised, one row per unit, G untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from emixer_model.config import (
    FINDINGS,
    ConfigError,
    EmixerConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
    public_prior,
)
from emixer_model.data.site import SiteData
from emixer_model.networks import build_networks
from emixer_model.privacy.accounting import SiteAccountant
from emixer_model.privacy.plan import PrivacyPlan, make_plan, plan_inputs
from emixer_model.privacy.policy import SitePolicy
from emixer_model.text.vocabulary import EOS, PAD
from emixer_model.training import PRIOR_CLIP_SHARE, PrivateTrainer, poisson_units, sample_prior
from tests.conftest import TINY_MODEL

V, L = 24, len(FINDINGS)


def make_data(n: int = 12, unlabeled: int = 4, patient_studies: int = 0) -> SiteData:
    """n labeled studies (one unit each, or the first `patient_studies` as ONE patient)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.full((n, TINY_MODEL.max_sentences, TINY_MODEL.max_words), PAD)
    tokens[:, 0, :3] = torch.tensor([5, 6, EOS])  # a learnable report: "w5 w6."
    tokens[:, 1, :2] = torch.tensor([7, EOS])
    units: list[tuple[list[int], list[int]]] = []
    if patient_studies:
        units.append((list(range(patient_studies)), []))
    units += [([i], []) for i in range(patient_studies, n)]
    units += [([], [j]) for j in range(unlabeled)]
    return SiteData(
        images=torch.rand(n, 1, 16, 16, generator=g) * 2 - 1,
        labels=(torch.rand(n, L, generator=g) < 0.3).float(),
        tokens=tokens,
        unlabeled=torch.rand(unlabeled, 1, 16, 16, generator=g) * 2 - 1,
        units=units,
        per_patient=bool(patient_studies),
        skipped=[],
    )


def make_trainer(
    data: SiteData,
    sigma: float = 1.0,
    batch_size: int = 4,
    clip: float = 1.0,
    lr: float = 2e-4,
    model: ModelConfig = TINY_MODEL,
    **train: object,
) -> tuple[PrivateTrainer, SiteAccountant]:
    torch.manual_seed(0)
    cfg = EmixerConfig(
        model=model,
        privacy=PrivacyConfig(max_grad_norm=clip, noise_multiplier=sigma),
        train=TrainConfig(batch_size=batch_size, lr_text=lr, **train),
    )
    accountant = SiteAccountant("rdp")
    nets = build_networks(model, V, L)
    plan = site_plan(cfg, data, accountant)
    trainer = PrivateTrainer(nets, cfg, accountant, torch.device("cpu"), plan=plan, secret_seed=1)
    return trainer, accountant


def site_plan(cfg: EmixerConfig, data: SiteData, accountant: SiteAccountant) -> PrivacyPlan:
    """The plan a site with the default policy makes for `cfg` (q = batch size / units)."""
    policy = SitePolicy()
    inputs = plan_inputs(cfg, policy, len(data.units), data.per_patient)
    return make_plan(inputs, policy, accountant, rounds_left=1)


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_every_private_parameter_gets_one_clipped_row_per_real_row() -> None:
    data = make_data()
    trainer, accountant = make_trainer(data, sigma=0.0001, clip=0.01)
    nets = trainer.nets
    seen = {}

    def inspect(optimizer) -> None:
        seen["rows"] = {p.grad_sample.shape[0] for p in optimizer.params}
        seen["clipped"] = torch.cat([p.summed_grad.flatten() for p in optimizer.params]).norm()
        per_sample = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in optimizer.params])
        seen["raw"] = per_sample.norm(dim=0)

    trainer.optimizer.attach_step_hook(inspect)
    private_params = {id(p) for m in (nets.d, nets.e, nets.r) for p in m.parameters()}
    assert {id(p) for p in trainer.optimizer.params} == private_params
    g_before = snapshot(nets.g)
    rows = [(True, 0), (True, 3), (False, 1)]  # labeled and unlabeled, plus 3 generated rows
    trainer.private_step(data, rows, torch.Generator().manual_seed(0))
    assert seen["rows"] == {3}  # one per-sample gradient per real row, not 2B
    assert (seen["raw"] > 0.01).all()  # clipping binds ...
    assert seen["clipped"] <= 3 * 0.01 * 1.001  # ... and each row contributes at most C
    trainer.private_step(data, rows[:1], torch.Generator().manual_seed(0))
    assert seen["rows"] == {1} and seen["clipped"] <= 0.01 * 1.001
    assert all(p.grad is None for p in nets.g.parameters())
    assert all(torch.equal(a, b) for a, b in zip(g_before, snapshot(nets.g), strict=True))
    assert accountant.history == [(0.0001, 4 / len(data.units), 2)]


def test_the_trainer_takes_sigma_q_and_the_clip_norm_only_from_the_plan() -> None:
    """What the optimizer uses is what the site signs: a config that says otherwise is ignored."""
    data = make_data()
    plan = make_trainer(data, sigma=0.5, clip=0.01)[0].plan
    other = EmixerConfig(
        model=TINY_MODEL,
        privacy=PrivacyConfig(max_grad_norm=5.0, noise_multiplier=3.0),
        train=TrainConfig(batch_size=16),
    )
    nets = build_networks(TINY_MODEL, V, L)
    trainer = PrivateTrainer(nets, other, SiteAccountant("rdp"), torch.device("cpu"), plan=plan)
    optimizer = trainer.optimizer
    assert (optimizer.noise_multiplier, optimizer.max_grad_norm) == (0.5, 0.01)
    assert optimizer.expected_batch_size == round(plan.sample_rate * plan.n_units) == 4
    trainer.train_steps(data, 1, sampler_seed=0)
    assert trainer.accountant.history == [(0.5, 4 / len(data.units), 1)]


def test_poisson_units() -> None:
    generator = torch.Generator().manual_seed(0)
    assert poisson_units(50, 1.0, generator).tolist() == list(range(50))
    sizes = [len(poisson_units(1000, 0.1, generator)) for _ in range(20)]
    assert 80 < sum(sizes) / len(sizes) < 120 and len(set(sizes)) > 1
    empties = sum(len(poisson_units(5, 0.05, generator)) == 0 for _ in range(100))
    assert empties > 50  # empty batches happen and are returned, not skipped
    assert poisson_units(5, 0.05, generator).dtype == torch.long


def test_one_row_per_patient() -> None:
    data = make_data(n=12, unlabeled=2, patient_studies=5)  # 1 patient + 7 studies + 2 scans
    trainer, _ = make_trainer(data, batch_size=100)  # q = 1: every unit every step
    for _ in range(20):
        rows = trainer.sample_rows(data)
        assert len(rows) == len(data.units) == 10
        patient_rows = [i for labeled, i in rows if labeled and i < 5]
        assert len(patient_rows) == 1
        assert sum(not labeled for labeled, _ in rows) == 2


def test_empty_batch_still_takes_a_noisy_step() -> None:
    data = make_data()
    trainer, accountant = make_trainer(data)
    nets = trainer.nets
    before_d, before_g = snapshot(nets.d), snapshot(nets.g)
    losses = trainer.private_step(data, [], torch.Generator().manual_seed(0))
    assert losses == {}
    assert accountant.history == [(1.0, 4 / len(data.units), 1)]
    assert all(not torch.equal(a, b) for a, b in zip(before_d, snapshot(nets.d), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before_g, snapshot(nets.g), strict=True))


def test_generator_step_moves_only_g_and_leaves_no_gradient_behind() -> None:
    data = make_data()
    trainer, accountant = make_trainer(data)
    nets = trainer.nets
    before_g, before_d = snapshot(nets.g), snapshot(nets.d)
    trainer.generator_step(torch.Generator().manual_seed(0))
    assert any(not torch.equal(a, b) for a, b in zip(before_g, snapshot(nets.g), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before_d, snapshot(nets.d), strict=True))
    for p in trainer.optimizer.params:
        assert p.grad is None and getattr(p, "grad_sample", None) is None
    assert accountant.history == []
    seen = {}
    trainer.optimizer.attach_step_hook(lambda opt: seen.update(n=opt.grad_samples[0].shape[0]))
    trainer.private_step(data, [(True, 2)], torch.Generator().manual_seed(0))
    assert seen["n"] == 1  # the hooks are back on


def test_a_patients_unlabeled_scans_are_drawn_too_but_one_row_per_unit() -> None:
    data = make_data(n=4, unlabeled=3)
    data.units = [([0, 1], [0, 1, 2]), ([2], []), ([3], [])]  # patient 0 has 5 scans
    trainer, _ = make_trainer(data, batch_size=100)  # q = 1
    drawn = [trainer.sample_rows(data) for _ in range(60)]

    def of_patient_0(rows: list) -> list:
        return [(labeled, i) for labeled, i in rows if not labeled or i < 2]

    assert all(len(rows) == 3 and len(of_patient_0(rows)) == 1 for rows in drawn)
    assert any(not labeled for rows in drawn for labeled, _ in rows)  # follow-ups are drawn
    assert any(labeled for rows in drawn for labeled, _ in of_patient_0(rows))


def test_public_prior_labels() -> None:
    y = sample_prior(500, torch.Generator().manual_seed(0))
    assert y.shape == (500, L)
    assert (y.sum(dim=1) >= 1).all()
    no_finding = y[:, FINDINGS.index("No Finding")] == 1
    assert (y[no_finding].sum(dim=1) == 1).all()


def test_train_steps_counts_steps_and_lowers_the_report_loss() -> None:
    data = make_data(n=8, unlabeled=0)
    trainer, accountant = make_trainer(data, sigma=0.3, batch_size=8, lr=5e-3)
    e, r = trainer.nets.e, trainer.nets.r
    with torch.no_grad():
        before = r.teacher_forced_loss(e(data.images), data.labels, data.tokens).mean()
    calls = []
    summary = trainer.train_steps(data, 30, 7, progress=lambda s, t, _: calls.append((s, t)))
    with torch.no_grad():
        after = r.teacher_forced_loss(e(data.images), data.labels, data.tokens).mean()
    assert summary["steps"] == 30 == accountant.history[0][2]
    assert calls[-1] == (30, 30) and len(calls) == 30
    assert set(summary["losses"]) == {
        "d_real",
        "d_fake",
        "findings",
        "prior",
        "rotation",
        "report",
        "g",
    }
    assert after < 0.5 * before


def test_train_steps_refuses_other_data() -> None:
    trainer, _ = make_trainer(make_data())
    with pytest.raises(ValueError, match="privacy units"):
        trainer.train_steps(make_data(n=5), 1, 0)


@pytest.mark.parametrize("batch", [2, 5])
def test_nothing_g_consumes_depends_on_the_poisson_batch(batch: int, monkeypatch) -> None:
    """G's next update is the same whatever the secret batch size was, for the same D: the
    private step draws from its own stream (as many draws as rows), G from another."""
    data = make_data()
    trainer, _ = make_trainer(data)
    monkeypatch.setattr(trainer, "sample_rows", lambda d: [(True, i) for i in range(batch)])

    def consume_like_a_private_step(d, rows, generator):  # D unchanged, stream advanced by B
        torch.randn(len(rows), TINY_MODEL.latent_dim, generator=generator)
        return {}

    monkeypatch.setattr(trainer, "private_step", consume_like_a_private_step)
    trainer.train_steps(data, 2, sampler_seed=11)
    g_after = torch.cat([p.detach().flatten() for p in trainer.nets.g.parameters()])
    reference = REFERENCE_G.setdefault("g", g_after)
    assert torch.equal(g_after, reference)


REFERENCE_G: dict[str, torch.Tensor] = {}


def test_dp_trainable_top_moves_only_the_top_layers_and_norms() -> None:
    data = make_data()
    two_word_blocks = dataclasses.replace(TINY_MODEL, word_layers=2)  # bodies as in the default
    trainer, _ = make_trainer(data, model=two_word_blocks, dp_trainable="top")
    nets = trainer.nets
    frozen = [p for p in nets.d.convs[0].parameters()]  # the first conv: a body layer
    assert frozen and not any(p.requires_grad for p in frozen)
    moving = {id(p) for p in trainer.optimizer.params}
    assert id(nets.d.score.weight) in moving and id(nets.r.label_in.weight) in moving
    assert id(nets.r.word_blocks[0].attn.c_attn.weight) not in moving
    before = [p.detach().clone() for p in frozen]
    trainer.private_step(data, [(True, 0), (False, 1)], torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, frozen, strict=True))
    all_params = sum(p.numel() for m in (nets.d, nets.e, nets.r) for p in m.parameters())
    assert sum(p.numel() for p in trainer.optimizer.params) < all_params / 2


def test_dp_trainable_labels_moves_only_the_label_layers() -> None:
    data = make_data()
    trainer, accountant = make_trainer(data, dp_trainable="labels")
    nets = trainer.nets
    moving = {id(p) for p in trainer.optimizer.params}
    for layer in (nets.d.label, nets.d.classify, nets.r.label_in, nets.r.head):
        assert id(layer.weight) in moving
    frozen = [*nets.e.parameters(), *nets.d.convs.parameters(), *nets.r.word_ln.parameters()]
    assert not any(id(p) in moving for p in frozen)
    before = [p.detach().clone() for p in frozen]
    head = nets.r.head.weight.detach().clone()
    trainer.private_step(data, [(True, 0), (False, 1)], torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, frozen, strict=True))
    assert not torch.equal(head, nets.r.head.weight)
    assert sum(steps for _, _, steps in accountant.history) == 1
    top, _ = make_trainer(data, dp_trainable="top")
    assert sum(p.numel() for p in trainer.optimizer.params) < sum(
        p.numel() for p in top.optimizer.params
    )


def test_label_words_moves_only_the_columns_of_labels_a_site_shows() -> None:
    """dp_trainable "label-words": in R only the per-label word bias moves, and a label no row
    shows keeps its column (only the DP noise reaches it): a site that never sees a finding
    cannot unlearn that finding's words, as it could through the shared head (issue 16). SGD,
    as the recipe: Adam would step every noise coordinate by about lr."""
    data = make_data()
    never = 2
    data.labels[:, never] = 0.0
    trainer, _ = make_trainer(
        data, sigma=1e-6, lr=0.5, dp_trainable="label-words", private_optimizer="sgd"
    )
    nets = trainer.nets
    moving = {id(p) for p in trainer.optimizer.params}
    assert [p for p in nets.r.parameters() if id(p) in moving] == [nets.r.label_words.weight]
    assert id(nets.d.classify.weight) in moving
    head = nets.r.head.weight.detach().clone()
    before = nets.r.label_words.weight.detach().clone()
    trainer.train_steps(data, 10, sampler_seed=0)
    moved = (nets.r.label_words.weight - before).abs().amax(dim=0)
    assert torch.equal(head, nets.r.head.weight)
    assert moved[never] < 1e-4
    shown = data.labels.sum(dim=0) > 0
    assert (moved[shown] > 1e-3).all()


def test_site_findings_freeze_every_other_findings_label_parameters_noise_included() -> None:
    """train.site_findings: only the named findings' parts of R's word bias, D's projection and
    D's finding head move, even under large noise (the frozen ones get none of it), while a
    row's clipped gradient still has norm <= C (privacy invariant: sensitivity) and goes to the
    coordinates that move."""
    data = make_data()
    data.labels[:, :] = 1.0  # every row shows every label: each column has a gradient
    taught = FINDINGS[3]
    clip = 1e-3
    trainer, _ = make_trainer(
        data,
        sigma=5.0,
        clip=clip,
        lr=0.5,
        dp_trainable="label-words",
        private_optimizer="sgd",
        clip_per_network=True,
        site_findings=taught,
        lr_d=0.5,
    )
    nets = trainer.nets
    k = FINDINGS.index(taught)
    others = torch.arange(L) != k
    # each parameter seen with its finding axis first
    per_finding = {
        "R word bias": lambda: nets.r.label_words.weight.T,
        "D projection": lambda: nets.d.label.weight.T,
        "D finding head": lambda: nets.d.classify.weight,
        "D finding bias": lambda: nets.d.classify.bias[:, None],
    }
    before = {name: get().detach().clone() for name, get in per_finding.items()}
    seen = {}
    trainer.optimizer.attach_step_hook(
        lambda opt: seen.update(bias=nets.r.label_words.weight.summed_grad.detach().clone())
    )
    trainer.private_step(data, [(True, 0)], torch.Generator().manual_seed(0))
    for name, get in per_finding.items():
        moved = (get() - before[name]).abs().amax(dim=1)
        assert moved[k] > 1e-4, name  # the noise alone moves it by ~6e-4 per coordinate
        assert torch.equal(moved[others], torch.zeros(L - 1)), name
    clipped = seen["bias"]
    assert clipped.norm() <= clip * 1.001
    assert clipped[:, k].norm() == pytest.approx(clipped.norm())


def test_site_findings_must_name_findings_and_unshown_must_be_resolved() -> None:
    with pytest.raises(ConfigError, match="'Pneumonitis' is not a finding"):
        TrainConfig(dp_trainable="label-words", site_findings="Cardiomegaly,Pneumonitis")
    with pytest.raises(ConfigError, match="applies only under train.dp_trainable: label-words"):
        TrainConfig(dp_trainable="top", site_findings="Cardiomegaly")
    # "unshown" is the server's to fill in; a site that gets it as such refuses to guess
    with pytest.raises(ValueError, match="reached the site unresolved"):
        make_trainer(make_data(), dp_trainable="label-words", site_findings="unshown")


def test_label_prior_learns_the_sites_mix_only_through_the_private_step() -> None:
    """D's label prior (what G is asked for) is a private parameter: the DP optimizer steps it,
    from each row's clipped and noised gradient, toward the site's label shares; G's step and
    its draws never move it (invariant: every update that depends on a real sample passes the
    one Opacus step). A finding the site never shows falls, one it shows rises from 0.001."""
    data = make_data(n=40)
    shown, never = FINDINGS.index("Pneumoperitoneum"), FINDINGS.index("Edema")
    data.labels[:, never] = 0.0
    data.labels[:, shown] = (torch.arange(40) % 2).float()  # half the studies show it
    trainer, _ = make_trainer(data, sigma=1e-6, batch_size=16)
    d = trainer.nets.d
    assert id(d.prior.weight) in {id(p) for p in trainer.optimizer.params}
    start = torch.full((L,), 0.2)
    start[shown] = 0.001
    d.set_prior(start)
    before = d.label_prior()
    trainer.generator_step(torch.Generator().manual_seed(0))
    assert torch.equal(d.label_prior(), before)
    trainer.train_steps(data, 30, sampler_seed=0)
    after = d.label_prior()
    assert after[shown] > 0.2 and after[never] < 0.05


def test_g_is_asked_for_labels_from_the_prior() -> None:
    """sample_prior: the fixed prior's marginals draw exactly what the fixed prior draws; a
    label with share 0 is never drawn, one with share 0.5 in half the studies."""
    fixed = sample_prior(500, torch.Generator().manual_seed(3))
    marginals = torch.tensor(public_prior())
    assert torch.equal(sample_prior(500, torch.Generator().manual_seed(3), (), marginals), fixed)
    k = FINDINGS.index("Pneumoperitoneum")
    marginals[k] = 0.0
    assert sample_prior(500, torch.Generator().manual_seed(3), (), marginals)[:, k].sum() == 0
    marginals[k] = 0.5
    share = sample_prior(2000, torch.Generator().manual_seed(3), (), marginals)[:, k].mean()
    assert 0.45 < share < 0.55


def test_private_sgd_steps_with_its_own_momentum_and_g_keeps_adam() -> None:
    """train.sgd_momentum, not G's Adam beta1, is the private SGD's momentum (bench/README.md:
    under DP noise Adam's per-coordinate scaling moves noise coordinates as fast as signal)."""
    data = make_data()
    trainer, _ = make_trainer(data, private_optimizer="sgd", sgd_momentum=0.7, beta1=0.5)
    inner = trainer.optimizer.original_optimizer
    assert isinstance(inner, torch.optim.SGD)
    assert [group["momentum"] for group in inner.param_groups] == [0.7] * 3
    assert isinstance(trainer.g_optimizer, torch.optim.Adam)
    trainer.private_step(data, [(True, 0), (False, 1)], torch.Generator().manual_seed(0))
    assert any("momentum_buffer" in inner.state[p] for p in trainer.optimizer.params)


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_ema_of_g_follows_g(decay: float) -> None:
    data = make_data()
    trainer, _ = make_trainer(data, ema_decay=decay)
    nets = trainer.nets
    start = [p.detach().clone() for p in nets.g_ema.parameters()]
    trainer.generator_step(torch.Generator().manual_seed(0))
    for ema, live, old in zip(nets.g_ema.parameters(), nets.g.parameters(), start, strict=True):
        assert torch.allclose(ema, decay * old + (1 - decay) * live, atol=1e-6)


def test_d_steps_private_steps_per_generator_step(monkeypatch) -> None:
    data = make_data()
    trainer, accountant = make_trainer(data, d_steps=3)
    calls = []
    original = trainer.generator_step
    monkeypatch.setattr(trainer, "generator_step", lambda g: calls.append(1) or original(g))
    trainer.train_steps(data, 7, sampler_seed=0)
    assert sum(steps for _, _, steps in accountant.history) == 7
    assert len(calls) == 3  # after steps 3 and 6, and after the last one


def test_g_steps_generator_steps_per_group_cost_no_privacy(monkeypatch) -> None:
    data = make_data()
    trainer, accountant = make_trainer(data, d_steps=2, g_steps=3)
    calls = []
    original = trainer.generator_step
    monkeypatch.setattr(trainer, "generator_step", lambda g: calls.append(1) or original(g))
    trainer.train_steps(data, 4, sampler_seed=0)
    assert sum(steps for _, _, steps in accountant.history) == 4  # only private steps count
    assert len(calls) == 6  # 3 G steps after steps 2 and 4


def _clipped_norms(trainer: PrivateTrainer, data: SiteData) -> dict[str, torch.Tensor]:
    """Each network group's norm of one labeled row's clipped gradient, and the whole row's."""
    nets, seen = trainer.nets, {}

    def inspect(optimizer) -> None:
        seen.update({id(p): p.summed_grad.norm() for p in optimizer.params})

    trainer.optimizer.attach_step_hook(inspect)
    trainer.private_step(data, [(True, 0)], torch.Generator().manual_seed(0))

    def norm(*modules: torch.nn.Module) -> torch.Tensor:
        squares = [seen[id(p)] ** 2 for m in modules for p in m.parameters() if id(p) in seen]
        return torch.stack(squares).sum().sqrt()

    return {
        "d": norm(*(m for name, m in nets.d.named_children() if name != "prior")),
        "prior": norm(nets.d.prior),
        "text": norm(nets.e, nets.r),
        "row": norm(nets.d, nets.e, nets.r),
    }


def test_per_network_clipping_keeps_the_row_norm_and_gives_each_network_its_share() -> None:
    """Sensitivity stays C (the row's clipped norm, D's label prior included), each network
    gets at most its share of what the prior leaves, and the report side keeps a real share,
    where one joint clip leaves it only what D leaves."""
    data, clip = make_data(), 1e-4
    joint = _clipped_norms(make_trainer(data, sigma=1e-6, clip=clip)[0], data)
    split_trainer = make_trainer(data, sigma=1e-6, clip=clip, clip_per_network=True)[0]
    split = _clipped_norms(split_trainer, data)
    share = clip * ((1 - PRIOR_CLIP_SHARE**2) / 2) ** 0.5
    assert joint["row"] <= clip * 1.001 and split["row"] <= clip * 1.001
    assert joint["prior"] == pytest.approx(clip * PRIOR_CLIP_SHARE, rel=1e-2)  # its own share
    assert split["d"] <= share * 1.001 and split["text"] <= share * 1.001
    assert split["text"] == pytest.approx(share, rel=1e-2)  # the share binds
    assert split["text"] > joint["text"]


def test_report_label_smoothing_keeps_a_floor_under_unused_words() -> None:
    """Trained with smoothing, R keeps every word's probability far above what plain cross-
    entropy leaves, so a site's own words stay learnable from a pretrained model."""
    data = make_data()
    floors = {}
    for smoothing in (0.0, 0.2):
        trainer, _ = make_trainer(data, sigma=1e-6, lr=1e-2, report_label_smoothing=smoothing)
        trainer.train_steps(data, 60, sampler_seed=0)
        r, e = trainer.nets.r, trainer.nets.e
        with torch.no_grad():
            topics, _ = r.sentences(e(data.images[:1]), data.labels[:1])
            bos = torch.nn.functional.one_hot(torch.tensor([[[1]]]), V).float()
            logits = r.words(bos.expand(1, r.S, 1, V), topics, data.labels[:1])
            probs = torch.softmax(logits[0, 0, 0], dim=-1)
        floors[smoothing] = probs[10:].min().item()  # words 10+ never appear in the reports
    assert floors[0.2] > 10 * floors[0.0]
