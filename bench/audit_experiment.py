"""Does the membership audit see what differential privacy prevents?

One phantom site (unique patients), half its units held out. Two models train on the other half
with the same steps, seed and initial weights: a NON-private one (noise ~0, clipping norm so large
it never clips, enough epochs to overfit) and a PRIVATE one (noise planned for epsilon ~10 over
the same steps). The three attacks of `emixer audit` then score members against held-out
non-members. The non-private model must be attackable (AUC CI above 0.5) for the audit to mean
anything; the private model should sit near 0.5.

    python -m bench.audit_experiment [--studies 128] [--epochs 40] [--resolution 32]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from bench.common import console, machine, planned_trainer, print_table, write_phantoms
from emixer_model.config import FINDINGS, EmixerConfig, from_dict
from emixer_model.data.site import SiteData, load_site
from emixer_model.membership_audit import (
    TARGET_FPRS,
    format_tpr,
    membership_attacks,
    split_site,
    unresolved_note,
)
from emixer_model.networks import EmixerNets, build_networks
from emixer_model.privacy.accounting import (
    SiteAccountant,
    default_delta,
    plan_noise_multiplier,
    steps_per_epoch,
)
from emixer_model.text.vocabulary import VOCAB_SIZE

HOLDOUT = 0.5
TARGET_EPSILON = 10.0
NO_NOISE = 1e-12  # PrivateTrainer needs sigma > 0; sigma x clip = 1e-6 is no noise at all
NO_CLIP = 1e6


def experiment_config(
    resolution: int, batch_size: int, seed: int, clip: float = 1.0
) -> EmixerConfig:
    """A small model that can overfit ~64 studies in a few minutes on two cores."""
    return from_dict(
        EmixerConfig,
        {
            "model": {
                "resolution": resolution,
                "latent_dim": 32,
                "width": 16,
                "embed_dim": 64,
                "heads": 2,
                "groups": 4,
            },
            "train": {
                "batch_size": batch_size,
                "holdout_fraction": HOLDOUT,
                "seed": seed,
                "device": "cpu",
            },
            "privacy": {"max_grad_norm": clip},
        },
    )


def keep_one_study_per_patient(site: Path, studies: int) -> None:
    """Rewrite studies.csv with the first study of each of the first `studies` patients.

    Phantom patients have 1-3 look-alike studies; with one each, every member and non-member is
    a different person, so a held-out study is never a near-copy of a trained one.
    """
    path = site / "studies.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    first: dict[str, dict[str, str]] = {}
    for row in rows:
        first.setdefault(row["patient"], row)
    kept = list(first.values())[:studies]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)


def train(
    cfg: EmixerConfig, train_data: SiteData, noise: float, epochs: int, seed: int
) -> tuple[EmixerNets, SiteAccountant, int, float]:
    """Train one model on the members; returns (nets, accountant, steps, seconds)."""
    torch.manual_seed(seed)  # the same initial weights for both models
    nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
    # reproducible sampling and noise: an experiment, not a deployment
    trainer = planned_trainer(nets, cfg, train_data, noise, secret_seed=seed)
    start = time.perf_counter()
    steps = epochs * steps_per_epoch(trainer.plan.sample_rate)
    summary = trainer.train_steps(train_data, steps, sampler_seed=seed)
    return nets, trainer.accountant, summary["steps"], time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=128, help="labeled phantom studies (128)")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (40)")
    parser.add_argument("--resolution", type=int, default=32, help="model resolution (32)")
    parser.add_argument("--batch-size", type=int, default=16, help="expected batch size (16)")
    parser.add_argument("--per-label", type=int, default=64, help="generated per label set (64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, split, training (0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared 2-core machine more threads ran ~10x slower)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Opacus' hooks warn on every generator step that G's inputs need no gradient: expected here.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    start = time.perf_counter()
    cfg = experiment_config(args.resolution, args.batch_size, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        # phantom patients average two studies: write enough to keep `studies` patients
        (site,) = write_phantoms(
            Path(tmp) / "phantoms", 1, 3 * args.studies, 0, size=64, seed=args.seed
        )
        keep_one_study_per_patient(site, args.studies)
        data = load_site(site, Path(tmp) / "state", cfg.model)
    split = split_site(data, HOLDOUT, cfg.train.seed)
    n_units = len(split.train.units)
    q = min(1.0, cfg.train.batch_size / n_units)
    steps = args.epochs * steps_per_epoch(q)
    delta = default_delta(n_units)
    sigma = plan_noise_multiplier(SiteAccountant("rdp"), TARGET_EPSILON, delta, q, steps)
    unit = "patients" if data.per_patient else "images"
    console.print(
        f"{len(data.images)} studies, {len(data.units)} units ({unit}); "
        f"{split.members.size} members, {split.nonmembers.size} non-members; "
        f"{steps} steps at q={q:.3f}; private sigma={sigma:.3f}"
    )

    rows: list[list[Any]] = []
    notes: list[str] = []
    for name, noise, clip in (("non-private", NO_NOISE, NO_CLIP), ("private", sigma, 1.0)):
        nets, accountant, taken, seconds = train(
            experiment_config(args.resolution, args.batch_size, args.seed, clip),
            split.train,
            noise,
            args.epochs,
            args.seed,
        )
        epsilon = accountant.epsilon(delta) if name == "private" else float("inf")
        metrics, _, _ = membership_attacks(
            nets, data, split, cfg.model.latent_dim, per_label=args.per_label, seed=args.seed
        )
        for attack, m in metrics.items():
            lo, hi = m["auc_ci95"]
            rows.append(
                [
                    attack,
                    name,
                    f"{m['auc']:.3f} [{lo:.3f}, {hi:.3f}]",
                    format_tpr(m["tpr_at_fpr"][f"{TARGET_FPRS[0]:g}"]),
                    "above 0.5" if lo > 0.5 else "no",
                ]
            )
        notes.append(
            f"{name}: {taken} steps in {seconds:.0f} s, sigma={noise:.3g}, clip={clip:g}, "
            f"epsilon={epsilon:.2f} at delta={delta:.1e}"
        )
        note = unresolved_note(metrics)
    if note:
        notes.append(note)
    notes += [
        f"members/non-members: {split.members.size}/{split.nonmembers.size}; bootstrap 200 "
        "resamples; higher score = member",
        machine(),
        f"total {time.perf_counter() - start:.0f} s",
    ]
    print_table(
        "Membership inference: non-private vs private (epsilon ~10) training",
        ["attack", "model", "AUC [95% CI]", "TPR @ 1% FPR", "CI above 0.5"],
        rows,
        notes,
    )


if __name__ == "__main__":
    main()
