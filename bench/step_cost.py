"""A training step costs what its networks cost: the full step vs the same step without reports.

Full step: one private D/E/R step (D on real and generated image-report pairs, rotation,
teacher-forced report loss, generated reports sampled by R) plus one generator step. Image-only
step: the same trainer with E and R frozen, every report all-PAD and no report loss, i.e. what
the step would cost if EMIXER generated images alone. Both run interleaved in one process on the
same data, so the ratio is measured in one run. Also shown: the full step with G learning
through differentiable (Gumbel) reports, `train.text_gradient_to_g`, the old default.

    python -m bench.step_cost [--repeats 6] [--resolution 32]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

import emixer_model.training as training
from bench.common import Timing, machine, planned_trainer, print_table, ratio, time_calls, verdict
from emixer_model.config import FINDINGS, EmixerConfig, ModelConfig, TrainConfig
from emixer_model.data.site import SiteData
from emixer_model.networks import build_networks
from emixer_model.text.vocabulary import EOS, PAD, VOCAB_SIZE

TARGET = 2.0  # full step <= 2x the image-only step (issue 11)


def site_data(cfg: ModelConfig, labeled: int = 160, unlabeled: int = 40) -> SiteData:
    """Random images and full-length reports: the step's cost does not depend on their content."""
    g = torch.Generator().manual_seed(0)
    r, s, w = cfg.resolution, cfg.max_sentences, cfg.max_words
    tokens = torch.randint(3, VOCAB_SIZE, (labeled, s, w), generator=g)
    tokens[..., -1] = EOS
    return SiteData(
        images=torch.rand(labeled, 1, r, r, generator=g) * 2 - 1,
        labels=(torch.rand(labeled, len(FINDINGS), generator=g) < 0.3).float(),
        tokens=tokens,
        unlabeled=torch.rand(unlabeled, 1, r, r, generator=g) * 2 - 1,
        units=[([i], []) for i in range(labeled)] + [([], [j]) for j in range(unlabeled)],
        per_patient=False,
        skipped=[],
    )


@contextmanager
def without_reports() -> Iterator[None]:
    """Every report all-PAD and no report loss: the image-only step."""
    fake_reports, real_row_losses = training.fake_reports, training.real_row_losses

    def pad_reports(nets, cfg, fake, y, generator):  # noqa: ANN001, ANN202
        m = cfg.model
        return torch.full((len(fake), m.max_sentences, m.max_words), PAD, dtype=torch.long)

    def image_losses(nets, cfg, x, y, tokens, labeled, generator):  # noqa: ANN001, ANN202
        losses = real_row_losses(nets, cfg, x, y, torch.full_like(tokens, PAD), labeled, generator)
        losses["report"] = torch.zeros_like(losses["rotation"])
        return losses

    training.fake_reports, training.real_row_losses = pad_reports, image_losses
    try:
        yield
    finally:
        training.fake_reports, training.real_row_losses = fake_reports, real_row_losses


def make_step(cfg: EmixerConfig, data: SiteData, image_only: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
    if image_only:
        nets.e.requires_grad_(False)
        nets.r.requires_grad_(False)
    trainer = planned_trainer(nets, cfg, data, 1.0)
    private, g_stream = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)

    def step() -> None:
        with without_reports() if image_only else nullcontext():
            trainer.private_step(data, trainer.sample_rows(data), private)
            trainer.generator_step(g_stream)

    return step


def interleaved(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, Timing]:
    """Median seconds per call, the variants taking turns, so load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        time_calls(step, repeats=1, warmup=1)
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(time_calls(step, repeats=1, warmup=0).median)
    return {name: Timing(statistics.median(t), min(t), max(t), len(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per variant (6)")
    parser.add_argument("--resolution", type=int, default=32, help="image side (32)")
    parser.add_argument("--width", type=int, default=16, help="model.width (16)")
    parser.add_argument("--embed", type=int, default=64, help="model.embed_dim (64)")
    args = parser.parse_args()
    model = ModelConfig(resolution=args.resolution, width=args.width, embed_dim=args.embed)
    data = site_data(model)
    variants = {
        "image-only step": (EmixerConfig(model=model), True),
        "full step (sampled reports, default)": (EmixerConfig(model=model), False),
        "full step, G through Gumbel reports": (
            EmixerConfig(model=model, train=TrainConfig(text_gradient_to_g=True)),
            False,
        ),
    }
    steps = {name: make_step(cfg, data, image_only) for name, (cfg, image_only) in variants.items()}
    timings = interleaved(steps, args.repeats)
    base = timings["image-only step"].median
    rows = [
        (name, t.median, f"{t.low:.3f}-{t.high:.3f}", t.repeats, ratio(t.median, base))
        for name, t in timings.items()
    ]
    full = timings["full step (sampled reports, default)"].median
    print_table(
        f"training step cost, {args.resolution} px, width {args.width}, embed {args.embed}, "
        "batch 32 expected",
        ("variant", "median s/step", "range", "n", "vs image-only"),
        rows,
        notes=(
            f"target: full step <= {TARGET:.0f}x the image-only step: "
            + verdict(full / base, TARGET, higher_is_better=False),
            machine(),
        ),
    )


if __name__ == "__main__":
    main()
