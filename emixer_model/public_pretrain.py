"""Public pretraining at the coordinator, before round 1: no site data, so no noise is needed.

Two parts: `pretrain_public` trains all four networks on a public labeled chest X-ray collection
(the largest single gain for DP synthetic data when the public images resemble the private
ones); `warm_start_report_decoder` trains the report decoder R on the shipped report grammar.

Why the warm start:

Under DP-SGD (noise ~1.5, clip 1, ~100 steps per site) R barely moves from its random start: the
report language itself (which words follow which, where a sentence ends, when a report stops) is
most of what it has to learn, and the noise drowns it. That language needs no private data: the
report grammar shipped with the package (emixer_model.text.grammar) is public and fixed in code
(docs/PRIVACY.md invariant 5), so R can learn it beforehand without noise and without spending any
site's privacy budget, the standard DP practice of pretraining on public data.

R is trained as a conditional language model of grammar reports: labels from the fixed public
prior of emixer_model.config (never a site statistic), reports `write_report` writes for them
in the public grammar, and a constant zero image embedding, so R learns how labels become report
sentences and the private rounds only have to teach it how the image changes the report. Only
R's parameters move in the warm start; G, E and D are not touched (not even run).

Public text never names what only sites know (docs/PHANTOM_WORLD.md): the warm start and the
reports written for public studies without one use the public grammar, which has no sentences
for the site-only finding and none of a site's own phrasing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from emixer_model.config import (
    FINDINGS,
    UNSHOWN,
    ConfigError,
    EmixerConfig,
    ModelConfig,
    TrainConfig,
)
from emixer_model.networks import (
    EmixerNets,
    build_networks,
    silence_labels,
    whiten_finding_head,
)
from emixer_model.shared import ProgressFn
from emixer_model.text.grammar import PUBLIC_GRAMMAR, write_report
from emixer_model.text.vocabulary import VOCAB_SIZE, encode_report
from emixer_model.training import (
    generator_loss,
    real_row_losses,
    row_objective,
    sample_prior,
    update_ema,
)

# The public prior has no uncertain labels; hedged sentences ("possible ...", "cannot exclude
# ...") are part of the report language too, so a fixed share of positives is written hedged.
UNCERTAIN_PROBABILITY = 0.15
# Bumped whenever public pretraining learns differently, so a cached public model is never
# reused across such a change (2: findings the collection never shows are silenced; 3: R has a
# per-label word bias; 4: D learns the label prior G is asked for, set from the collection, and
# D's finding head is neither trained nor kept for a finding the collection never shows; 5: D's
# finding head reads features standardized by the collection's statistics; 6: whitened).
PRETRAINING_VERSION = 6
# Public pretraining's Adam rates, betas and finding-head weight: TrainConfig's defaults, whatever
# the run's train section says. train.lr_* and train.label_weight are the sites' private recipe
# (config.SITE_KNOWLEDGE_TRAIN: SGD at lr 0.1 for D, 1 for R's word bias, the head weighted 16 for
# its share of a clipped row), at which plain Adam on every weight diverges; the public model
# v6 the recipe was measured from was pretrained at the defaults.
PUBLIC_RATES = TrainConfig()
LAST_LOSS_WINDOW = 20  # last_loss averages this many final steps: one batch is noisy
# Findings the public grammar never names (the site-only finding): no public text states them.
PUBLIC_UNNAMED: tuple[str, ...] = tuple(
    f for f in FINDINGS if f != "No Finding" and f not in PUBLIC_GRAMMAR.findings
)


def public_reports(
    n: int, model_cfg: ModelConfig, rng: np.random.Generator, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """n public grammar reports written for labels from the public prior: (labels [n, L], the
    reports' token ids [n, S, W]). Hedged findings are trained as positive, as at the sites.
    PUBLIC_UNNAMED findings are off in every label row ("No Finding" where nothing is left), so
    R never learns that a label on means saying nothing about it."""
    labels = sample_prior(n, generator, PUBLIC_UNNAMED)
    hedged = torch.rand(labels.shape, generator=generator) < UNCERTAIN_PROBABILITY
    hedged[:, FINDINGS.index("No Finding")] = False  # "No Finding" is never hedged
    values = torch.where(hedged & (labels > 0), -1, labels.long())
    ids = [
        encode_report(
            write_report(dict(zip(FINDINGS, map(int, row), strict=True)), rng),
            model_cfg.max_sentences,
            model_cfg.max_words,
        )
        for row in values.tolist()
    ]
    return labels, torch.from_numpy(np.stack(ids))


def public_report_loss(
    nets: EmixerNets,
    model_cfg: ModelConfig,
    labels: torch.Tensor,
    tokens: torch.Tensor,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """R's mean teacher-forced loss on `tokens` [B,S,W] given `labels`, zero image embedding."""
    device = next(nets.r.parameters()).device
    zero = torch.zeros(len(tokens), model_cfg.embed_dim, device=device)
    loss = nets.r.teacher_forced_loss(zero, labels.to(device), tokens.to(device), smoothing)
    return loss.mean()


def _check(
    nets: EmixerNets, model_cfg: ModelConfig, steps: int, batch_size: int, lr: float
) -> None:
    if steps < 0:
        raise ValueError(f"warm start steps must be >= 0, not {steps}")
    if batch_size < 1:
        raise ValueError(f"warm start batch_size must be >= 1, not {batch_size}")
    if not lr > 0:
        raise ValueError(f"warm start lr must be positive, not {lr}")
    r = nets.r
    shape = (model_cfg.max_sentences, model_cfg.max_words, model_cfg.embed_dim)
    if (r.S, r.W, r.embed_in.in_features) != shape:
        raise ValueError(
            f"the report decoder was built for {r.S} sentences x {r.W} words, embedding "
            f"{r.embed_in.in_features}, but model_cfg says {shape[0]} x {shape[1]}, embedding "
            f"{shape[2]}; pass the ModelConfig the networks were built from"
        )


def warm_start_report_decoder(
    nets: EmixerNets,
    model_cfg: ModelConfig,
    steps: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    progress: ProgressFn | None = None,
    smoothing: float = 0.0,
) -> dict:
    """Train R alone for `steps` Adam steps on fresh public grammar reports (no noise needed).

    `smoothing` is train.report_label_smoothing: the label smoothing of R's word loss.

    Returns {"first_loss": loss of the first batch, "last_loss": mean loss of the last
    LAST_LOSS_WINDOW steps, "steps", "seconds"}. Deterministic for a seed (same initial weights,
    same thread count). `progress(step, steps, {"report": loss})` is called after every step.
    """
    _check(nets, model_cfg, steps, batch_size, lr)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(nets.r.parameters(), lr=lr)
    started = time.perf_counter()
    losses: list[float] = []
    for step in range(1, steps + 1):
        labels, tokens = public_reports(batch_size, model_cfg, rng, generator)
        loss = public_report_loss(nets, model_cfg, labels, tokens, smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, steps, {"report": losses[-1]})
    # Adam's state and R's .grad must not follow R into the private optimizer.
    optimizer.zero_grad(set_to_none=True)
    tail = losses[-LAST_LOSS_WINDOW:]
    return {
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": sum(tail) / len(tail) if tail else float("nan"),
        "steps": steps,
        "seconds": time.perf_counter() - started,
    }


def fill_missing_reports(
    labels: torch.Tensor,
    tokens: torch.Tensor,
    has_report: torch.Tensor,
    model_cfg: ModelConfig,
    seed: int,
) -> torch.Tensor:
    """Token ids with every missing report replaced by a public grammar report for its labels.

    Public collections often have labels but no reports (NIH ChestX-ray14); D judges image and
    report together, so a real row without text would teach it that empty text means real. The
    grammar is public, so writing the text from the labels costs nothing. A PUBLIC_UNNAMED
    finding a collection labels is left unsaid: no public text names it.
    """
    rng = np.random.default_rng([seed, 31])
    filled = tokens.clone()
    for i in (~has_report.bool()).nonzero().flatten().tolist():
        row = {
            finding: int(value)
            for finding, value in zip(FINDINGS, labels[i].tolist(), strict=True)
            if finding not in PUBLIC_UNNAMED
        }
        report = write_report(row, rng)
        filled[i] = torch.from_numpy(
            encode_report(report, model_cfg.max_sentences, model_cfg.max_words)
        )
    return filled


def unshown_findings(labels: torch.Tensor) -> tuple[str, ...]:
    """The findings no row of a labeled collection [N, L] has positive ("No Finding" aside)."""
    shown = (labels > 0).any(dim=0).tolist()
    return tuple(f for f, s in zip(FINDINGS, shown, strict=True) if f != "No Finding" and not s)


def with_site_findings(cfg: EmixerConfig, unshown: Sequence[str]) -> EmixerConfig:
    """`cfg` with train.site_findings "unshown" replaced by the findings the starting model's
    public collection never showed (`unshown`, from its pretraining record: public, so the
    choice costs no privacy). Refuses when there is no such record to read them from."""
    t = cfg.train
    if t.site_findings != UNSHOWN:
        return cfg
    if not unshown:
        raise ConfigError(
            f"train.site_findings: {UNSHOWN!r} needs a starting model whose public pretraining "
            "left findings unshown (federation.initial_model from `emixer pretrain`); name the "
            "findings instead, or leave it empty to train every finding"
        )
    return replace(cfg, train=replace(t, site_findings=",".join(unshown)))


def pretrain_public(
    nets: EmixerNets,
    cfg: EmixerConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    tokens: torch.Tensor,
    steps: int,
    seed: int,
    progress: ProgressFn | None = None,
) -> dict:
    """Train all four networks WITHOUT privacy on a public labeled collection (no site data).

    The same objective as a site's private step (`real_row_losses`, `generator_loss`), on plain
    Adam at `PUBLIC_RATES` (never the sites' train.lr_* or label_weight), batches of
    train.batch_size drawn uniformly: public data needs no clipping, no noise and no accountant.
    A finding the collection never shows (`unshown_findings`) is never asked of G, its label
    columns are zeroed and D's finding head says "absent" for it (`silence_labels`) and is not
    trained on it: the public model draws the same pair with it on or off and has no opinion of
    what it looks like, so whatever it means in a release, the sites taught it. At the end D's
    finding head is refolded to read features whitened by the collection's statistics
    (`whiten_finding_head`), the geometry a site's clipped steps need to learn a finding's look.
    Returns {"steps", "seconds", "unshown": those findings, "losses": means of the last steps}.
    """
    if steps < 0:
        raise ValueError(f"pretraining steps must be >= 0, not {steps}")
    if len(images) == 0:
        raise ValueError("the public collection has no usable labeled image")
    unshown = unshown_findings(labels)
    silenced = [FINDINGS.index(f) for f in unshown]
    silence_labels(nets, silenced)
    taught = torch.ones(len(FINDINGS))
    taught[silenced] = 0.0
    nets.d.set_prior(labels.float().clamp(0, 1).mean(dim=0))  # public shares: no privacy cost
    rates = PUBLIC_RATES
    cfg = replace(cfg, train=replace(cfg.train, label_weight=rates.label_weight))
    t = cfg.train
    generator = torch.Generator().manual_seed(seed)
    betas = (rates.beta1, rates.beta2)
    d_optimizer = torch.optim.Adam(
        [
            {"params": list(nets.d.parameters()), "lr": rates.lr_d},
            {"params": [*nets.e.parameters(), *nets.r.parameters()], "lr": rates.lr_text},
        ],
        betas=betas,
    )
    g_optimizer = torch.optim.Adam(nets.g.parameters(), lr=rates.lr_g, betas=betas)
    nets.train()
    started = time.perf_counter()
    recent: list[dict[str, float]] = []
    for step in range(1, steps + 1):
        rows = torch.randint(len(images), (t.batch_size,), generator=generator)
        labeled = torch.ones(len(rows), dtype=torch.bool)
        losses = real_row_losses(
            nets, cfg, images[rows], labels[rows], tokens[rows], labeled, generator, taught
        )
        d_optimizer.zero_grad(set_to_none=True)
        row_objective(losses, cfg).mean().backward()
        d_optimizer.step()
        g_loss = generator_loss(nets, cfg, t.batch_size, generator, unshown)
        g_optimizer.zero_grad(set_to_none=True)
        g_loss.backward()
        g_optimizer.step()
        update_ema(nets, t.ema_decay)
        means = {name: value.mean().item() for name, value in losses.items()} | {"g": g_loss.item()}
        recent = [*recent[-(LAST_LOSS_WINDOW - 1) :], means]
        if progress is not None:
            progress(step, steps, means)
    # nothing of the public optimizers may follow the networks into a site's DP optimizer
    d_optimizer.zero_grad(set_to_none=True)
    g_optimizer.zero_grad(set_to_none=True)
    whiten_finding_head(nets, images)
    window = {k: sum(r[k] for r in recent) / len(recent) for k in recent[0]} if recent else {}
    seconds = time.perf_counter() - started
    return {"steps": steps, "seconds": seconds, "unshown": unshown, "losses": window}


def pretrained_networks(
    images: torch.Tensor,
    labels: torch.Tensor,
    tokens: torch.Tensor,
    has_report: torch.Tensor,
    cfg: EmixerConfig,
    steps: int,
    warm_start: int,
    seed: int,
    warm_progress: ProgressFn | None = None,
    progress: ProgressFn | None = None,
) -> tuple[EmixerNets, dict]:
    """Fresh networks after the report warm start and `steps` of public pretraining on a public
    collection (missing reports written from the labels): what `emixer pretrain`, the demo and
    the utility bench start the sites from. Returns (nets, pretrain_public's summary)."""
    torch.manual_seed(seed)
    nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
    smoothing = cfg.train.report_label_smoothing
    warm_start_report_decoder(
        nets, cfg.model, warm_start, seed, progress=warm_progress, smoothing=smoothing
    )
    filled = fill_missing_reports(labels, tokens, has_report, cfg.model, seed)
    result = pretrain_public(nets, cfg, images, labels, filled, steps, seed, progress=progress)
    return nets, result
