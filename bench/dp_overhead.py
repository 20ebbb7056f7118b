"""Cost of privacy: one private training step (D+E+R through Opacus, then G's step) vs the same
step with plain torch optimizers and no per-sample gradients, for each Opacus grad-sample mode.

Every mode runs emixer_model.training.PrivateTrainer itself; only the two names it builds its
private part from (GradSampleModule, DPOptimizer) are swapped, so the losses, the batch and the
model are identical. Correctness: with a negligible noise multiplier, the clipped-and-averaged
gradient each mode hands to Adam on the first step (same weights, same rows, same seeds) is
compared with the one of "hooks" (the trainer's mode).

    python -m bench.dp_overhead [--batch 32] [--repeats 8] [--modes plain,hooks,functorch,...]
Target: private step <= 1.5x the plain step.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleExpandedWeights, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

import emixer_model.training as training
from bench.common import machine, peak_rss_mb, planned_trainer, print_table, ratio, verdict
from emixer_model.config import FINDINGS, EmixerConfig
from emixer_model.data.site import SiteData
from emixer_model.networks import build_networks
from emixer_model.text.vocabulary import EOS, PAD, VOCAB_SIZE

TARGET_RATIO = 1.5
MODES = ("plain", "hooks", "functorch", "ew", "ghost", "fgc")
MODE_NOTES = {
    "plain": "torch Adam, no GradSampleModule, no clipping or noise",
    "hooks": "GradSampleModule (the trainer's mode)",
    "functorch": "GradSampleModule(force_functorch=True)",
    "ew": "GradSampleModuleExpandedWeights",
    "ghost": "GradSampleModuleFastGradientClipping, ghost norms, 2 backward passes",
    "fgc": "GradSampleModuleFastGradientClipping(use_ghost_clipping=False)",
}
TINY_NOISE = 1e-9  # "positive" for the trainer, negligible next to the gradients


class _NoPrivacy:
    """Stands in for GradSampleModule in the plain mode: no hooks to disable or enable."""

    def __init__(self, module: nn.Module, **_: Any) -> None:
        self.module = module

    def disable_hooks(self) -> None:
        pass

    def enable_hooks(self) -> None:
        pass


class _GhostLoss(DPTensorFastGradientClipping):
    """Per-row losses whose .sum().backward() runs Opacus' two-pass fast-gradient clipping."""

    def sum(self) -> _GhostLoss:
        return self

    def __add__(self, other: Any) -> _GhostLoss:
        total = super().__add__(other)
        return _GhostLoss(self.module, self.optimizer, total.loss_per_sample, self.loss_reduction)


class _FastClippingTrainer(training.PrivateTrainer):
    """The trainer with its per-row loss routed through the fast-clipping backward."""

    def _row_losses(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        losses = super()._row_losses(*args, **kwargs)
        losses["d_real"] = _GhostLoss(self.private, self.optimizer, losses["d_real"], "sum")
        return losses


def _one_clip_fast_optimizer(
    optimizer: torch.optim.Optimizer, groups: Any, shares: Any, masks: Any, **settings: Any
) -> DPOptimizerFastGradientClipping:
    """Opacus' fast-clipping optimizer in the trainer's place: one clip over the whole row (it
    has no per-network shares or masks), so the gradient check shows the split clip's difference."""
    return DPOptimizerFastGradientClipping(optimizer, **settings)


def _swaps(mode: str, cfg: EmixerConfig) -> tuple[type, dict[str, Any]]:
    """(trainer class, names in emixer_model.training to replace) for one grad-sample mode."""
    clip = cfg.privacy.max_grad_norm
    if mode == "plain":
        return training.PrivateTrainer, {
            "GradSampleModule": _NoPrivacy,
            "NetworkClippedDPOptimizer": lambda optimizer, **_: optimizer,
        }
    if mode == "hooks":
        return training.PrivateTrainer, {}
    if mode == "functorch":
        return training.PrivateTrainer, {
            "GradSampleModule": functools.partial(GradSampleModule, force_functorch=True)
        }
    if mode == "ew":
        return training.PrivateTrainer, {"GradSampleModule": GradSampleModuleExpandedWeights}
    if mode in ("ghost", "fgc"):
        gsm = functools.partial(
            GradSampleModuleFastGradientClipping,
            max_grad_norm=clip,
            use_ghost_clipping=mode == "ghost",
        )
        return _FastClippingTrainer, {
            "GradSampleModule": gsm,
            "NetworkClippedDPOptimizer": _one_clip_fast_optimizer,
        }
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


@contextmanager
def _patched(names: dict[str, Any]) -> Iterator[None]:
    saved = {name: getattr(training, name) for name in names}
    for name, value in names.items():
        setattr(training, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(training, name, value)


def synthetic_site(cfg: EmixerConfig, n_labeled: int, n_unlabeled: int) -> SiteData:
    """Random images and report-shaped token ids: cost depends on shapes, not on content."""
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    tokens = torch.full((n_labeled, m.max_sentences, m.max_words), PAD, dtype=torch.long)
    words = m.max_words * 2 // 3
    sentences = max(1, m.max_sentences * 2 // 3)
    shape = (n_labeled, sentences, words)
    tokens[:, :sentences, :words] = torch.randint(4, VOCAB_SIZE, shape, generator=g)
    tokens[:, :sentences, words] = EOS
    labeled = [([i], []) for i in range(n_labeled)]
    unlabeled = [([], [j]) for j in range(n_unlabeled)]
    return SiteData(
        images=torch.rand(n_labeled, 1, m.resolution, m.resolution, generator=g) * 2 - 1,
        labels=(torch.rand(n_labeled, len(FINDINGS), generator=g) < 0.2).float(),
        tokens=tokens,
        unlabeled=torch.rand(n_unlabeled, 1, m.resolution, m.resolution, generator=g) * 2 - 1,
        units=labeled + unlabeled,
        per_patient=False,
        skipped=[],
    )


def _capture_adam_grads(trainer: training.PrivateTrainer) -> list[list[torch.Tensor]]:
    """Record the gradients Adam receives at each step (after clipping, averaging and noise)."""
    adam = getattr(trainer.optimizer, "original_optimizer", trainer.optimizer)
    params = [p for group in adam.param_groups for p in group["params"]]
    seen: list[list[torch.Tensor]] = []
    step = adam.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        seen.append([p.grad.detach().clone() for p in params])
        return step(*args, **kwargs)

    adam.step = recording_step
    return seen


def _relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    flat_a = torch.cat([t.flatten() for t in a])
    flat_b = torch.cat([t.flatten() for t in b])
    return float((flat_a - flat_b).abs().max() / flat_b.abs().max().clamp_min(1e-12))


class ModeRun:
    """One mode's trainer on its own copy of the same initial weights, stepped on demand."""

    def __init__(
        self, mode: str, cfg: EmixerConfig, state: dict[str, torch.Tensor], data: SiteData
    ) -> None:
        cls, names = _swaps(mode, cfg)
        nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
        nets.load_state_dict(state)
        with _patched(names):
            self.trainer = planned_trainer(nets, cfg, data, TINY_NOISE, trainer_class=cls)
        self.data = data
        self.grads = _capture_adam_grads(self.trainer)
        self.generator = torch.Generator().manual_seed(1)
        self.private_times: list[float] = []
        self.g_times: list[float] = []

    def step(self, rows: list[training.Row]) -> None:
        start = time.perf_counter()
        self.trainer.private_step(self.data, rows, self.generator)
        middle = time.perf_counter()
        self.trainer.generator_step(self.generator)
        self.private_times.append(middle - start)
        self.g_times.append(time.perf_counter() - middle)

    def summary(self, skip: int) -> dict[str, float]:
        private, g = self.private_times[skip:], self.g_times[skip:]
        return {
            "step": statistics.median(p + q for p, q in zip(private, g, strict=True)),
            "private": statistics.median(private),
            "g": statistics.median(g),
        }


def setup(
    batch: int, dp_trainable: str = "all"
) -> tuple[EmixerConfig, SiteData, list[training.Row], dict]:
    """Config, data, the fixed batch of rows and the shared initial weights."""
    cfg = EmixerConfig()
    cfg.train.batch_size = batch
    cfg.train.dp_trainable = dp_trainable
    n_unlabeled = max(1, batch // 5)
    data = synthetic_site(cfg, 10 * batch - n_unlabeled, n_unlabeled)  # q = 0.1
    rows = [(True, i) for i in range(batch - n_unlabeled)]
    rows += [(False, j) for j in range(n_unlabeled)]
    torch.manual_seed(0)
    state = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS)).state_dict()
    return cfg, data, rows, state


def peak_memory_in_child(mode: str, batch: int, threads: int, dp_trainable: str) -> float | None:
    """Peak RSS of a fresh process taking two steps in `mode` (freed memory is never returned to
    the OS, so modes measured one after another in one process would hide each other's peaks)."""
    command = [sys.executable, "-m", "bench.dp_overhead", "--memory-of", mode]
    command += ["--batch", str(batch), "--threads", str(threads), "--dp-trainable", dp_trainable]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return float(lines[-1]) if done.returncode == 0 and lines else None


def _child_memory(mode: str, batch: int, dp_trainable: str) -> None:
    cfg, data, rows, state = setup(batch, dp_trainable)
    run = ModeRun(mode, cfg, state, data)
    run.step(rows)
    run.step(rows)
    print(peak_rss_mb())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dp_overhead", description=__doc__)
    parser.add_argument("--batch", type=int, default=32, help="rows per step (fixed)")
    parser.add_argument("--repeats", type=int, default=4, help="measured steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per mode")
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads"
    )
    parser.add_argument(
        "--dp-trainable",
        choices=("all", *training.PRIVATE_LAYERS),
        default="all",
        help="train.dp_trainable: every private parameter (all), the top layers (top), the label "
        "layers (labels), or D's label layers and R's per-label word bias (label-words, the "
        "site-knowledge recipe's)",
    )
    parser.add_argument("--memory-of", choices=MODES, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        _child_memory(args.memory_of, args.batch, args.dp_trainable)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"unknown mode {unknown[0] if unknown else ''!r}; choose from {MODES}")
    modes = ["plain", "hooks"] + [m for m in modes if m not in ("plain", "hooks")]

    cfg, data, rows, state = setup(args.batch, args.dp_trainable)
    runs: dict[str, ModeRun] = {}
    errors: dict[str, str] = {}
    for mode in modes:
        try:
            runs[mode] = ModeRun(mode, cfg, state, data)
            torch.manual_seed(2)  # the Gumbel noise of generated reports uses the global RNG
            runs[mode].step(rows)  # the gradient-check step; also the first warm-up
        except Exception as err:  # a mode Opacus cannot apply here is a finding, not a crash
            runs.pop(mode, None)
            errors[mode] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
    for needed in ("plain", "hooks"):
        if needed in errors:
            raise SystemExit(f"the {needed} mode failed, nothing to compare: {errors[needed]}")
    # Round-robin over modes, so load from other processes hits every mode alike.
    for _ in range(args.warmup - 1 + args.repeats):
        for run in runs.values():
            run.step(rows)
    memory = {
        mode: peak_memory_in_child(mode, args.batch, args.threads, args.dp_trainable)
        for mode in runs
    }

    stats = {mode: run.summary(skip=args.warmup) for mode, run in runs.items()}
    plain = stats["plain"]["step"]
    reference = runs["hooks"].grads[0]
    table, correct = [], []
    for mode in modes:
        if mode in errors:
            table.append([mode, "n/a", "-", "-", "-", "-", errors[mode]])
            continue
        r = stats[mode]
        if mode == "plain":
            check = "reference (unclipped)"
        else:
            diff = _relative_difference(runs[mode].grads[0], reference)
            ok = diff < 1e-3
            correct += [mode] if ok else []
            check = f"max rel diff {diff:.1e} ({'ok' if ok else 'DIFFERS'})"
        peak = memory[mode] if memory[mode] is not None else "failed"
        table.append([mode, r["step"], ratio(r["step"], plain), r["private"], r["g"], peak, check])
    notes = [f"{m}: {MODE_NOTES[m]}" for m in modes]
    if correct:
        best = min(correct, key=lambda m: stats[m]["step"])
        ratio_best = stats[best]["step"] / plain
        notes.insert(
            0,
            f"fastest correct mode: {best} at {ratio_best:.2f}x plain; target <= {TARGET_RATIO}x: "
            f"{verdict(ratio_best, TARGET_RATIO, higher_is_better=False)}",
        )
    n_unlabeled = max(1, args.batch // 5)
    notes.append(
        f"default ModelConfig, dp_trainable {args.dp_trainable}, batch {args.batch} "
        f"({args.batch - n_unlabeled} labeled + "
        f"{n_unlabeled} unlabeled rows); median of {args.repeats} steps after {args.warmup}, modes "
        f"interleaved; peak RSS of a separate process per mode; {machine()}"
    )
    print_table(
        "dp_overhead: seconds per training step (private D+E+R step + G step)",
        ["mode", "step s", "vs plain", "private s", "G s", "peak RSS MB", "gradient check"],
        table,
        notes,
    )


if __name__ == "__main__":
    main()
