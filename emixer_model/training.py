"""The private training step: the ONE seam where real data touches parameters.

docs/DESIGN.md section 2 describes the networks; docs/PRIVACY.md the invariants this step keeps.

The discriminator D, the encoder E and the report decoder R see real data, so they sit behind one
Opacus GradSampleModule and one DPOptimizer (clipped per-sample gradients plus Gaussian noise).
The generator G only ever sees D's opinion of generated samples: it is private by
post-processing and steps on a plain Adam.

One step:
1. Poisson-sample privacy units (patients where known); take ONE row per sampled unit: a random
   labeled study of the unit if it has one, else a random unlabeled scan. B rows, B may be 0.
2. Generated row i is paired with real row i (same batch index, so Opacus sums both into one
   per-sample gradient that is clipped once). The number of generated rows follows the batch
   index, never a separate count: concatenating them would double the sensitivity.
3. Per-row loss = [labeled] BCE(D(x, t, y), real) + [labeled] report loss of R(E(x))
   + rotation_weight * CE(D.rotation_logits(rot_k(x)), k) + BCE(D(fake, fake report, y'), fake).
   Every forward runs on all B rows and masks by row, so row i's gradient stays at index i.
4. One backward, one DPOptimizer step (an empty batch still steps: noise only), one accountant
   step. After every `train.d_steps` private steps G steps `train.g_steps` times with the
   private module's hooks disabled, and the EMA copy of G follows it. With
   `train.clip_per_network` the clip is per network (D | E and R), same total norm. D's label
   prior (the label mix G is asked for) always has a share of the clip of its own.

Randomness that touches real data (which units are sampled, which of a unit's rows, the DP noise)
comes from a secret generator seeded from the OS: the sampler seed travels in the run config, and
whoever knows the noise can subtract it. The rest is seeded from `sampler_seed` for
reproducibility, in two separate streams: the private step's (fake rows' latents, rotations,
report draws: their count is the secret batch size) and G's own, whose draws have a fixed size
per step, so nothing G consumes depends on the Poisson batch (G stays post-processing).
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn

from emixer_model.config import FINDINGS, UNSHOWN, EmixerConfig, public_prior
from emixer_model.data.site import SiteData
from emixer_model.networks import EmixerNets
from emixer_model.privacy.accounting import SiteAccountant
from emixer_model.shared import ProgressFn
from emixer_model.text.vocabulary import PAD

if TYPE_CHECKING:  # the plan only as a type: the server imports this module's objective
    from emixer_model.privacy.plan import PrivacyPlan

LOSS_NAMES = ("d_real", "d_fake", "findings", "prior", "rotation", "report", "g")

# The share of a row's clip norm kept for D's label prior (the networks share the rest): its
# gradient, a label vector's worth, is tiny beside theirs and would be clipped to nothing in a
# shared clip, so the prior would never learn a site's mix under noise.
PRIOR_CLIP_SHARE = 0.3

Row = tuple[bool, int]  # (labeled, index into data.images if labeled else into data.unlabeled)


def sample_prior(
    n: int,
    generator: torch.Generator,
    never: Collection[str] = (),
    marginals: torch.Tensor | None = None,
) -> torch.Tensor:
    """n multi-hot label vectors [n, L] drawn from `marginals` [L] (each label's share: D's
    learned prior, `Discriminator.label_prior`) or, without them, from the fixed public prior;
    the findings in `never` always off ("No Finding" where nothing is left). The same draws
    whatever `never` holds, and the fixed prior's marginals draw what the fixed prior does.

    "No Finding" is drawn with its share, the findings in the other studies with their share
    among those (their marginal / (1 - the "No Finding" share), at most 1).
    """
    if marginals is None:
        marginals = torch.tensor(public_prior())
    marginals = marginals.detach().float().cpu()
    nf = FINDINGS.index("No Finding")
    p_nf = float(marginals[nf])
    probs = (marginals / max(1.0 - p_nf, 1e-6)).clamp(max=1.0)
    probs[nf] = 0.0
    probs[[FINDINGS.index(name) for name in never]] = 0.0
    y = (torch.rand(n, len(FINDINGS), generator=generator) < probs).float()
    no_finding = torch.rand(n, generator=generator) < p_nf
    no_finding |= y.sum(dim=1) == 0
    y[no_finding] = 0.0
    y[no_finding, nf] = 1.0
    return y


def poisson_units(n_units: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the units in one Poisson batch: each included independently with probability q.

    The batch may be empty; the step must still be taken (and noised) then.
    """
    keep = torch.rand(n_units, generator=generator, device=generator.device) < sample_rate
    return keep.nonzero().flatten().cpu()


def _rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate image i by k[i] * 90 degrees."""
    rotations = torch.stack([torch.rot90(x, j, dims=(2, 3)) for j in range(4)])
    return rotations[k, torch.arange(len(x))]


def _backward(loss: torch.Tensor) -> None:
    with warnings.catch_warnings():
        # Opacus' hooks on the first conv fire although the images need no gradient: harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()


# The private parameters that move under train.dp_trainable = "top" (these layers and every norm
# affine) or "labels" (these layers alone); the rest stays as pretrained. Fewer noised
# coordinates: the same clipped gradient falls on fewer of them, so the same noise multiplier
# hurts far less.
# "top": label projections and output layers. "labels": only what ties a label to an image or a
# report (D's projection term, finding head, score and label prior; R's label input, topics,
# stop, word output and per-label word bias), the least a finding the public model never saw
# needs. "label-words": D's as "labels", R's per-label word bias alone, which only rows showing a
# label move: a site that never shows a finding adds noise to its column but cannot unlearn its
# words through the shared head (bench/README.md, issue 16).
LABEL_LAYERS_D = ("score", "label", "classify", "prior")
PRIVATE_LAYERS = {
    "top": {
        "d": ("image_fc", "joint", "score", "label", "rotation", "classify", "prior", "text_fc"),
        "e": ("fc",),
        "r": ("embed_in", "label_in", "topic", "stop", "head", "label_words"),
    },
    "labels": {
        "d": LABEL_LAYERS_D,
        "e": (),
        "r": ("label_in", "topic", "stop", "head", "label_words"),
    },
    "label-words": {"d": LABEL_LAYERS_D, "e": (), "r": ("label_words",)},
}


def _freeze_outside(private: nn.ModuleDict, mode: str) -> None:
    """Freeze (before Opacus wraps them) every private parameter outside PRIVATE_LAYERS[mode]
    (and, under "top", outside the norms)."""
    layers, norms = PRIVATE_LAYERS[mode], mode == "top"
    for net_name, net in private.items():
        net.requires_grad_(False)
        for name, module in net.named_modules():
            is_norm = isinstance(module, nn.GroupNorm | nn.LayerNorm)
            if name in layers[net_name] or (norms and is_norm):
                module.requires_grad_(True)


def site_finding_masks(nets: EmixerNets, cfg: EmixerConfig) -> dict[nn.Parameter, torch.Tensor]:
    """Under dp_trainable "label-words" with train.site_findings named: masks that let only
    those findings' parts of the per-label parameters move (R's word-bias columns, D's projection
    columns, D's finding-head rows); the other findings keep the starting model's, which noise
    on their coordinates would otherwise wear away (empty: nothing frozen)."""
    taught = cfg.train.site_finding_list()  # the config refuses it outside "label-words"
    if not taught:
        return {}
    if taught == [UNSHOWN]:
        raise ValueError(
            f"train.site_findings {UNSHOWN!r} reached the site unresolved: the server fills in "
            "the findings from its starting model's public pretraining record"
        )
    keep = torch.zeros(len(FINDINGS))
    keep[[FINDINGS.index(f) for f in taught]] = 1.0
    return {
        nets.r.label_words.weight: keep.expand_as(nets.r.label_words.weight).clone(),  # [V, L]
        nets.d.label.weight: keep.expand_as(nets.d.label.weight).clone(),  # [d, L]
        nets.d.classify.weight: keep[:, None].expand_as(nets.d.classify.weight).clone(),  # [L, d]
        nets.d.classify.bias: keep.clone(),
    }


def _streams(seed: int) -> Iterator[torch.Generator]:
    """Independent generators from one seed: one per consumer, so no stream's use shifts another."""
    for child in np.random.SeedSequence(seed).spawn(2):
        yield torch.Generator().manual_seed(int(child.generate_state(1, np.uint64)[0] >> 1))


def fake_reports(
    nets: EmixerNets,
    cfg: EmixerConfig,
    fake: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Reports R writes for generated images: sampled ids (no gradient), or differentiable
    Gumbel tokens [B,S,W,V] when G should learn through the text as well."""
    m = cfg.model
    if cfg.train.text_gradient_to_g and torch.is_grad_enabled():
        return nets.r.generate_soft(nets.e(fake), y, m.gumbel_tau, generator)
    with torch.no_grad():
        return nets.r.sample_ids(nets.e(fake), y, m.report_temperature, generator)


def real_row_losses(
    nets: EmixerNets,
    cfg: EmixerConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    tokens: torch.Tensor,
    labeled: torch.Tensor,
    generator: torch.Generator,
    taught: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row losses [B] of D, E, R on real rows x (labels y, reports `tokens` where `labeled`),
    each row paired with one generated row at the same index. The private step and public
    pretraining both call it, so both train the same objective.

    `taught` [L] (1/0): the findings D's finding head learns (None: all). Public pretraining
    leaves out those its collection never shows: trained on "always absent" their columns
    would point away from the typical image, and G, rewarded for making the head say
    "present", would learn to draw the finding as whatever looks least typical."""
    m, b = cfg.model, len(x)
    dev = next(nets.parameters()).device
    drawn = sample_prior(b, generator, marginals=nets.d.label_prior())
    y_fake = torch.where(labeled[:, None], y, drawn)
    z = torch.randn(b, m.latent_dim, generator=generator)
    k = torch.randint(4, (b,), generator=generator)
    x, y, tokens, y_fake, z, k, mask = (
        a.to(dev) for a in (x, y, tokens, y_fake, z, k, labeled.float())
    )
    with torch.no_grad():  # generated rows: no gradient reaches G here
        fake = nets.g(z, y_fake)
        fake_text = fake_reports(nets, cfg, fake, y_fake, generator)
    real_score, real_findings = nets.d.score_and_labels(x, tokens, y)
    fake_score = nets.d(fake, fake_text, y_fake)
    rotation = F.cross_entropy(nets.d.rotation_logits(_rotate(x, k)), k, reduction="none")
    report = nets.r.teacher_forced_loss(nets.e(x), y, tokens, cfg.train.report_label_smoothing)
    bce = F.binary_cross_entropy_with_logits
    findings = bce(real_findings, y, reduction="none")
    findings = (findings if taught is None else findings * taught.to(dev)).mean(dim=1)
    prior = bce(nets.d.prior_logits(b), y, reduction="none").sum(dim=1)
    return {
        "d_real": mask * bce(real_score, torch.ones_like(real_score), reduction="none"),
        "findings": mask * cfg.train.label_weight * findings,
        "prior": mask * prior,
        "report": mask * report,
        "rotation": rotation,
        "d_fake": bce(fake_score, torch.zeros_like(fake_score), reduction="none"),
    }


def row_objective(losses: dict[str, torch.Tensor], cfg: EmixerConfig) -> torch.Tensor:
    """Per-row objective [B] of D, E and R: the terms of `real_row_losses` with their weights."""
    rotation = cfg.train.rotation_weight * losses["rotation"]
    labels = losses["findings"] + losses["prior"]
    return losses["d_real"] + labels + losses["report"] + rotation + losses["d_fake"]


def generator_loss(
    nets: EmixerNets,
    cfg: EmixerConfig,
    n: int,
    generator: torch.Generator,
    never: Collection[str] = (),
) -> torch.Tensor:
    """G's non-saturating loss on n generated pairs (fixed-size draws) of labels from D's
    learned prior, never asking for the findings in `never`. At a site the prior is what its
    private steps made of the site's label mix, so G is asked for what the site's D has seen."""
    dev = next(nets.parameters()).device
    y = sample_prior(n, generator, never, nets.d.label_prior()).to(dev)
    z = torch.randn(n, cfg.model.latent_dim, generator=generator).to(dev)
    fake = nets.g(z, y)
    score, findings = nets.d.score_and_labels(fake, fake_reports(nets, cfg, fake, y, generator), y)
    bce = F.binary_cross_entropy_with_logits
    return bce(score, torch.ones_like(score)) + cfg.train.label_weight * bce(findings, y)


@torch.no_grad()
def update_ema(nets: EmixerNets, decay: float) -> None:
    """g_ema <- decay * g_ema + (1 - decay) * g (decay 0: a copy of G)."""
    for ema, live in zip(
        nets.g_ema.state_dict().values(), nets.g.state_dict().values(), strict=True
    ):
        ema.lerp_(live, 1.0 - decay) if ema.is_floating_point() else ema.copy_(live)


class NetworkClippedDPOptimizer(DPOptimizer):
    """DP-SGD that clips each group of parameters' per-sample gradient to its own share.

    Group k's per-sample gradient is clipped to shares[k] x max_grad_norm, with the squared
    shares summing to at most 1, so a row's whole clipped gradient still has norm <=
    max_grad_norm: the sensitivity, the noise (std noise_multiplier x max_grad_norm on every
    coordinate) and the accounting are those of plain DP-SGD. With one clip over D, E and R
    together, D's gradient takes almost all of a row's norm and the report decoder's share is
    scaled to nearly nothing before the noise is added (`train.clip_per_network`); D's label
    prior, whose gradient is tiny beside the networks', gets a share of its own.

    `masks` (parameter -> 0/1 tensor of its shape) freeze coordinates of a parameter: their
    per-sample gradients are zeroed before the clip (the row's norm goes to the coordinates that
    move) and their noise after it, so they keep their value. Which coordinates move is fixed
    before the step from public facts, never from the data, so the guarantee is unchanged.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        groups: list[list[nn.Parameter]],
        shares: list[float],
        masks: dict[nn.Parameter, torch.Tensor] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(optimizer, **kwargs)
        self._masks = [(masks or {}).get(p) for p in self.params]
        if len(shares) != len(groups) or sum(s * s for s in shares) > 1 + 1e-9:
            raise ValueError(f"need one share per group, squares summing to <= 1, not {shares}")
        index = {id(p): k for k, group in enumerate(groups) for p in group}
        missing = [p for p in self.params if id(p) not in index]
        if missing:
            raise ValueError(f"{len(missing)} private parameters belong to no clipping group")
        self._group_of = [index[id(p)] for p in self.params]
        self._shares = torch.tensor(shares)

    def clip_and_accumulate(self) -> None:
        """Per-sample clip factors per group, then the clipped sum, as Opacus' own method."""
        rows = len(self.grad_samples[0])
        device = self.grad_samples[0].device
        samples = [
            g if mask is None else g * mask.to(g.device)
            for g, mask in zip(self.grad_samples, self._masks, strict=True)
        ]
        squares = torch.zeros(len(self._shares), rows, device=device)
        for k, g in zip(self._group_of, samples, strict=True):
            squares[k] += g.flatten(1).pow(2).sum(dim=1).to(device)
        bound = self.max_grad_norm * self._shares.to(device)[:, None]
        factors = (bound / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for k, p, g in zip(self._group_of, self.params, samples, strict=True):
            _check_processed_flag(p.grad_sample)
            grad_sample = g.to(p.dtype)
            grad = torch.einsum("i,i...", factors[k].to(grad_sample.device, p.dtype), grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """Opacus' noise, then the frozen coordinates' noise taken off again."""
        super().add_noise()
        for p, mask in zip(self.params, self._masks, strict=True):
            if mask is not None:
                p.grad.mul_(mask.to(p.grad.device))


class PrivateTrainer:
    """DP-SGD training of D, E, R (Opacus) and post-processing training of G at one site.

    Parameters: nets (built by build_networks; moved to `device`), cfg (lr, betas, batch size,
    rotation weight, report temperature, d_steps, EMA, dp_trainable, secure_mode), accountant
    (stepped once per private step, empty batches included), plan (the site's privacy plan: the
    ONLY source of the noise multiplier, sample rate, clipping norm and unit count, the figures
    the site signs; the trainer never derives them itself), secret_seed (tests only: makes
    sampling and noise reproducible, which voids the guarantee).
    """

    def __init__(
        self,
        nets: EmixerNets,
        cfg: EmixerConfig,
        accountant: SiteAccountant,
        device: torch.device,
        *,
        plan: PrivacyPlan,
        secret_seed: int | None = None,
    ) -> None:
        if plan.n_units < 1:
            raise ValueError(f"a site needs at least one privacy unit to train, got {plan.n_units}")
        if plan.noise_multiplier <= 0:
            raise ValueError(f"noise multiplier must be positive, not {plan.noise_multiplier}")
        if not 0 < plan.sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], not {plan.sample_rate}")
        self.nets = nets.to(device)
        self.cfg = cfg
        self.device = device
        self.plan = plan
        self.accountant = accountant
        seed = secrets.randbits(63) if secret_seed is None else secret_seed
        self.secret = torch.Generator().manual_seed(seed)
        noise_generator = torch.Generator(device=device).manual_seed(seed + 1)

        private = nn.ModuleDict({"d": nets.d, "e": nets.e, "r": nets.r})
        if cfg.train.dp_trainable != "all":
            _freeze_outside(private, cfg.train.dp_trainable)
        errors = ModuleValidator.validate(private, strict=False)
        if errors:
            raise ValueError(f"the private networks are not Opacus-compatible: {errors}")
        # Per-sample losses are summed (exact per-sample gradients); the optimizer divides the
        # noisy sum by the expected batch size, as DP-SGD's estimator of the mean gradient.
        self.private = GradSampleModule(private, loss_reduction="sum")
        t = cfg.train

        def moving(module: nn.Module) -> list[nn.Parameter]:
            return [p for p in module.parameters() if p.requires_grad]

        prior = moving(nets.d.prior)
        d_body = [p for p in moving(nets.d) if all(p is not q for q in prior)]
        text = [*moving(nets.e), *moving(nets.r)]
        groups = [
            {"params": d_body, "lr": t.lr_d},
            {"params": text, "lr": t.lr_text},
            {"params": prior, "lr": t.lr_prior},
        ]
        if t.private_optimizer == "adam":
            inner: torch.optim.Optimizer = torch.optim.Adam(groups, betas=(t.beta1, t.beta2))
        else:
            inner = torch.optim.SGD(groups, momentum=t.sgd_momentum)
        dp_settings = {
            "noise_multiplier": plan.noise_multiplier,
            "max_grad_norm": plan.max_grad_norm,
            "expected_batch_size": max(1, round(plan.sample_rate * plan.n_units)),
            "loss_reduction": "mean",
            "generator": noise_generator,
            "secure_mode": cfg.privacy.secure_mode,
        }
        networks = [d_body, text] if t.clip_per_network else [d_body + text]
        share = ((1 - PRIOR_CLIP_SHARE**2) / len(networks)) ** 0.5
        self.optimizer = NetworkClippedDPOptimizer(
            inner,
            groups=[*networks, prior],
            shares=[share] * len(networks) + [PRIOR_CLIP_SHARE],
            masks=site_finding_masks(nets, cfg),
            **dp_settings,
        )
        self.g_optimizer = torch.optim.Adam(
            nets.g.parameters(), lr=t.lr_g, betas=(t.beta1, t.beta2)
        )

    def sample_rows(self, data: SiteData) -> list[Row]:
        """One Poisson batch: at most ONE row per sampled unit (invariant 6), drawn uniformly
        from all of the unit's scans, so a patient's unlabeled follow-ups serve the
        self-supervision too, not only patients who have nothing but unlabeled scans."""
        rows: list[Row] = []
        for unit in poisson_units(len(data.units), self.plan.sample_rate, self.secret).tolist():
            labeled, unlabeled = data.units[unit]
            pool = [(True, i) for i in labeled] + [(False, j) for j in unlabeled]
            if pool:
                rows.append(pool[int(torch.randint(len(pool), (1,), generator=self.secret))])
        return rows

    def private_step(
        self, data: SiteData, rows: list[Row], generator: torch.Generator
    ) -> dict[str, float]:
        """One clipped-and-noised step of D, E, R on `rows`; returns the batch's mean losses."""
        self.optimizer.zero_grad(set_to_none=True)
        if not rows:
            # Nothing to forward; Opacus clips an empty batch to zero and adds the noise.
            for p in self.optimizer.params:
                p.grad_sample = torch.zeros(0, *p.shape, device=p.device, dtype=p.dtype)
            self._dp_step()
            return {}
        losses = self._row_losses(data, rows, generator)
        _backward(row_objective(losses, self.cfg).sum())
        self._dp_step()
        means = {
            "rotation": losses["rotation"].mean().item(),
            "d_fake": losses["d_fake"].mean().item(),
        }
        n_labeled = sum(is_labeled for is_labeled, _ in rows)
        if n_labeled:  # a batch of unlabeled scans says nothing about the labeled losses
            for name in ("d_real", "findings", "prior", "report"):
                means[name] = losses[name].sum().item() / n_labeled
        return means

    def _dp_step(self) -> None:
        self.optimizer.step()
        self.accountant.step(self.plan.noise_multiplier, self.plan.sample_rate)
        self.optimizer.zero_grad(set_to_none=True)

    def _row_losses(
        self, data: SiteData, rows: list[Row], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Per-row losses [B] of the private step; row i's terms all sit at batch index i."""
        m, b = self.cfg.model, len(rows)
        labeled = torch.tensor([is_labeled for is_labeled, _ in rows])
        idx = torch.tensor([i for _, i in rows])
        x = torch.zeros(b, 1, m.resolution, m.resolution)
        y = torch.zeros(b, len(FINDINGS))
        tokens = torch.full((b, m.max_sentences, m.max_words), PAD, dtype=torch.long)
        if labeled.any():
            x[labeled] = data.images[idx[labeled]]
            y[labeled] = data.labels[idx[labeled]]
            tokens[labeled] = data.tokens[idx[labeled]]
        if (~labeled).any():
            x[~labeled] = data.unlabeled[idx[~labeled]]
        return real_row_losses(self.nets, self.cfg, x, y, tokens, labeled, generator)

    def generator_step(self, generator: torch.Generator) -> float:
        """G learns from D's score of generated image-report pairs; no real data involved.

        Every draw from `generator` has a fixed size (batch_size rows), so G's stream never
        depends on a Poisson batch size.
        """
        self.private.disable_hooks()
        try:
            loss = generator_loss(self.nets, self.cfg, self.cfg.train.batch_size, generator)
            self.g_optimizer.zero_grad(set_to_none=True)
            _backward(loss)
            self.g_optimizer.step()
        finally:
            # G's backward left ordinary grads on D, E, R: clear them (and any grad_sample)
            # so nothing of this step reaches the next private step.
            self.optimizer.zero_grad(set_to_none=True)
            self.private.enable_hooks()
        update_ema(self.nets, self.cfg.train.ema_decay)
        return loss.item()

    def train_steps(
        self,
        data: SiteData,
        steps: int,
        sampler_seed: int,
        progress: ProgressFn | None = None,
    ) -> dict:
        """`steps` private steps (the number the site's plan accounted for); G steps after every
        `train.d_steps` of them (`train.g_steps` times). Returns {"steps", "losses": batch-mean
        losses}."""
        if len(data.units) != self.plan.n_units:
            raise ValueError(
                f"the data has {len(data.units)} privacy units but the trainer was planned for "
                f"{self.plan.n_units}; build the trainer from the same SiteData"
            )
        if steps < 0:
            raise ValueError(f"steps must be >= 0, not {steps}")
        private_stream, g_stream = _streams(sampler_seed)
        self.nets.train()
        sums = dict.fromkeys(LOSS_NAMES, 0.0)
        counts = dict.fromkeys(LOSS_NAMES, 0)
        for step in range(1, steps + 1):
            losses = self.private_step(data, self.sample_rows(data), private_stream)
            if step % self.cfg.train.d_steps == 0 or step == steps:
                for _ in range(self.cfg.train.g_steps):
                    losses["g"] = self.generator_step(g_stream)
            for name, value in losses.items():
                sums[name] += value
                counts[name] += 1
            if progress is not None:
                progress(step, steps, losses)
        means = {name: sums[name] / counts[name] if counts[name] else 0.0 for name in LOSS_NAMES}
        return {"steps": steps, "losses": means}
