"""The private step: every real-data update clipped and noised, one row per unit, G untouched."""

from __future__ import annotations

import pytest
import torch

from emixer_model.config import FINDINGS, EmixerConfig, PrivacyConfig, TrainConfig
from emixer_model.data.site import SiteData
from emixer_model.networks import build_networks
from emixer_model.privacy import SiteAccountant
from emixer_model.text.vocabulary import EOS, PAD
from emixer_model.training import PrivateTrainer, sample_prior
from tests.conftest import SMALL_MODEL

V, L = 24, len(FINDINGS)


def make_data(n: int = 12, unlabeled: int = 4, patient_studies: int = 0) -> SiteData:
    """n labeled studies (one unit each, or the first `patient_studies` as ONE patient)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.full((n, 3, 6), PAD)
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
    data: SiteData, sigma: float = 1.0, batch_size: int = 4, clip: float = 1.0, lr: float = 2e-4
) -> tuple[PrivateTrainer, SiteAccountant]:
    torch.manual_seed(0)
    cfg = EmixerConfig(
        model=SMALL_MODEL,
        privacy=PrivacyConfig(max_grad_norm=clip),
        train=TrainConfig(batch_size=batch_size, lr_text=lr),
    )
    accountant = SiteAccountant("rdp")
    nets = build_networks(SMALL_MODEL, V, L)
    trainer = PrivateTrainer(
        nets, cfg, len(data.units), sigma, accountant, torch.device("cpu"), secret_seed=1
    )
    return trainer, accountant


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


def test_public_prior_labels() -> None:
    y = sample_prior(500, torch.Generator().manual_seed(0))
    assert y.shape == (500, L)
    assert (y.sum(dim=1) >= 1).all()
    no_finding = y[:, FINDINGS.index("No Finding")] == 1
    assert (y[no_finding].sum(dim=1) == 1).all()


def test_train_epochs_counts_steps_and_lowers_the_report_loss() -> None:
    data = make_data(n=8, unlabeled=0)
    trainer, accountant = make_trainer(data, sigma=0.3, batch_size=8, lr=5e-3)
    e, r = trainer.nets.e, trainer.nets.r
    with torch.no_grad():
        before = r.teacher_forced_loss(e(data.images), data.tokens).mean()
    calls = []
    summary = trainer.train_epochs(data, 15, 7, progress=lambda s, t, _: calls.append((s, t)))
    with torch.no_grad():
        after = r.teacher_forced_loss(e(data.images), data.tokens).mean()
    assert summary["steps"] == 15 == accountant.history[0][2]
    assert calls[-1] == (15, 15) and len(calls) == 15
    assert set(summary["losses"]) == {"d_real", "d_fake", "rotation", "report", "g"}
    assert after < 0.5 * before


def test_train_epochs_refuses_other_data() -> None:
    trainer, _ = make_trainer(make_data())
    with pytest.raises(ValueError, match="privacy units"):
        trainer.train_epochs(make_data(n=5), 1, 0)
