"""The yardstick of issue 11: is the synthetic release useful, and what does each stage add?

One command trains EMIXER on a 3-site federated phantom setup in several ways and prints one
table that scores every trained model against the same judge:

    python -m bench.utility            # the full comparison (about 40 minutes on 2 idle cores)
    python -m bench.utility --quick    # fewer rounds and smaller pretraining (under 10 minutes)

Rows: public-only (pretrained at the coordinator, no site training); non-private, epsilon 10
and epsilon 3 per site, each from scratch and from the public model; epsilon 10 from the public
model without the unlabeled scans' self-supervision. A second table compares the DP-GAN levers
(which parameters move under DP, learning rates, optimizer, D steps per G step, EMA) at
epsilon 10 from the public model, where the defaults come from.

The judge is a finding classifier trained on real labeled patients that no generator saw: each
site holds out a share of its labeled patients before any training; half of them train the
judge, the other half test it (its real held-out AUROC) and every train-on-synthetic model.
Every figure carries a bootstrap 95% interval (emixer_model.evaluation.utility) and its n.

The rows from the public model use the demo's fine-tuning choice
(emixer_cli.commands.demo.DEMO_TRAIN: the top layers and norms of D, E and R under DP), the rows
from scratch train every parameter.
Federated rounds are run in this process: each round every site trains with the project's own
PrivateTrainer (its noise multiplier planned for the whole horizon by the same function the
site uses, delta = 1/(10 N)) from the global weights, and the global weights are the
unit-weighted average (FedAvg). "Non-private" is the same clipped step with no noise.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench.common import console, machine, print_table
from emixer_cli.commands.demo import DEMO_MODEL, DEMO_TRAIN
from emixer_model.config import FINDINGS, EmixerConfig, ModelConfig, PrivacyConfig, TrainConfig
from emixer_model.data.phantoms import write_phantom_sites, write_public_collection
from emixer_model.data.public import load_public
from emixer_model.data.site import SiteData, load_site
from emixer_model.data.splits import (
    LabeledSet,
    create_or_load_split,
    split_labeled,
    training_data,
)
from emixer_model.evaluation.utility import Judge, SyntheticSet
from emixer_model.networks import build_networks, get_weights, set_weights
from emixer_model.privacy import SiteAccountant, default_delta, plan_noise_multiplier
from emixer_model.public_pretrain import pretrained_networks
from emixer_model.synthesis import synthesize
from emixer_model.text.vocabulary import VOCAB_SIZE, decode_report
from emixer_model.training import PrivateTrainer, steps_per_epoch
from server.tools.release import label_vector, parse_conditions

NO_NOISE = 1e-9  # PrivateTrainer needs sigma > 0; sigma x clip = 1e-9 is no noise at all
HOLDOUT = 0.4  # share of each site's patients no generator sees (the judge's), recorded


@dataclass(frozen=True)
class Setup:
    sites: int = 3
    per_site: int = 240
    unlabeled: int = 40
    public: int = 600
    size: int = 64
    rounds: int = 5
    epochs: int = 4
    pretrain_steps: int = 600
    warm_start: int = 300
    per_condition: int = 20  # synthetic pairs per release condition (as `emixer release`)


QUICK = Setup(rounds=2, epochs=2, pretrain_steps=200, warm_start=150)


@dataclass
class Site:
    name: str
    train: SiteData  # held-out patients removed
    heldout: LabeledSet  # the judge's patients of this site


def prepare(setup: Setup, cache: Path, model: ModelConfig) -> tuple[list[Site], Path]:
    """Phantom sites (cached) split into training data and the judge's patients; public folder."""
    data_dir = cache / f"sites-{setup.sites}x{setup.per_site}-{setup.size}px"
    if not (data_dir / "COMPLETE").is_file():
        write_phantom_sites(
            data_dir, setup.sites, setup.per_site, setup.unlabeled, seed=0, size=setup.size
        )
        (data_dir / "COMPLETE").write_text("complete\n")
    public = cache / f"public-{setup.public}-{setup.size}px"
    if not (public / "studies.csv").is_file():
        write_public_collection(public, n=setup.public, seed=0, size=setup.size)
    sites = []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        state = cache / "state" / folder.name
        data = load_site(folder, state, model)
        split = create_or_load_split(data, state, HOLDOUT)
        _, heldout = split_labeled(data, split, folder.name)
        sites.append(Site(folder.name, training_data(data, split), heldout))
    return sites, public


def pretrained_weights(public: Path, cfg: EmixerConfig, setup: Setup) -> dict:
    """The public-only model: report warm start, then all four networks on the public set."""
    data = load_public(public, cfg.model)
    nets, _ = pretrained_networks(
        data.images,
        data.labels,
        data.tokens,
        data.has_report,
        cfg,
        setup.pretrain_steps,
        setup.warm_start,
        cfg.train.seed,
    )
    return get_weights(nets)


def without_unlabeled(data: SiteData) -> SiteData:
    """The same site with its unlabeled scans (and the units made only of them) taken out."""
    units = [(rows, []) for rows, _ in data.units if rows]
    return replace(data, unlabeled=data.unlabeled[:0], units=units)


def federate(
    cfg: EmixerConfig,
    sites: list[SiteData],
    start: dict,
    rounds: int,
    epsilon: float | None,
) -> tuple[dict, float, int]:
    """FedAvg over `sites` for `rounds`; returns (global weights, max epsilon, steps per site)."""
    plans = []
    for data in sites:
        n = len(data.units)
        q = min(1.0, cfg.train.batch_size / n)
        steps = cfg.train.epochs * steps_per_epoch(q)
        sigma = (
            NO_NOISE
            if epsilon is None
            else plan_noise_multiplier(
                SiteAccountant(), epsilon, default_delta(n), q, rounds * steps
            )
        )
        plans.append((n, q, steps, sigma, SiteAccountant()))
    weights = start
    for round_number in range(1, rounds + 1):
        updates = []
        for data, (n, q, steps, sigma, accountant) in zip(sites, plans, strict=True):
            nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
            set_weights(nets, weights)
            trainer = PrivateTrainer(nets, cfg, n, sigma, q, accountant, torch.device("cpu"))
            trainer.train_steps(data, steps, sampler_seed=round_number)
            updates.append((n, get_weights(nets)))
        total = sum(n for n, _ in updates)
        weights = {k: sum(n * w[k] for n, w in updates) / total for k in weights}
    spent = 0.0
    if epsilon is not None:
        spent = max(a.epsilon(default_delta(n)) for n, _, _, _, a in plans)
    return weights, spent, plans[0][2] * rounds


def synthetic_for(cfg: EmixerConfig, weights: dict, per: int) -> SyntheticSet:
    """The release as a researcher receives it: `per` pairs for each condition `emixer release`
    makes by default (every single finding and the common combinations), conditioned on those
    labels, never on the test patients' label vectors."""
    nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
    set_weights(nets, weights)
    nets.eval()
    conditions = [c for c in parse_conditions(None) for _ in range(per)]
    labels = torch.from_numpy(np.stack([label_vector(c) for c in conditions]))
    images, ids = synthesize(nets, cfg.model, labels, torch.Generator().manual_seed(7))
    return SyntheticSet(images, labels, [decode_report(t) for t in ids])


COLUMNS = (
    "model",
    "fidelity (share of judge's lift)",
    "TSTR / train-on-real",
    "report-label F1",
    "duplicates",
    "distinct",
    "Frechet",
    "epsilon",
    "steps/site",
    "wall s",
)


def cell(figure) -> str:  # noqa: ANN001
    if figure.value is None:
        return "-"
    if figure.low is None:
        return f"{figure.value:.3g}"
    return f"{figure.value:.2f} [{figure.low:.2f}, {figure.high:.2f}]"


def row(name: str, judge: Judge, cfg: EmixerConfig, weights: dict, per: int, eps, steps, wall):
    scores = judge.score(synthetic_for(cfg, weights, per)).figures
    return (
        name,
        cell(scores["fidelity_lift_fraction"]),
        cell(scores["tstr_ratio"]),
        cell(scores["report_label_f1"]),
        cell(scores["duplicate_rate"]),
        cell(scores["distinct_reports"]),
        cell(scores["frechet"]),
        f"{eps:.2f}" if eps else "none",
        steps,
        f"{wall:.0f}",
    )


LEVERS: dict[str, dict] = {
    "all parameters, Adam": {"dp_trainable": "all"},
    "top layers + norms, Adam (the demo's)": {},
    "top, Adam, G lr / 4": {"lr_g": 5e-5},
    "all parameters, G lr / 4": {"dp_trainable": "all", "lr_g": 5e-5},
    "top, no auxiliary finding classifier": {"label_weight": 0.0},
    "top, SGD momentum (lr 0.05)": {"private_optimizer": "sgd", "lr_d": 0.05, "lr_text": 0.05},
    "top, 2 D steps per G step": {"d_steps": 2},
    "top, no EMA of G": {"ema_decay": 0.0},
    "top, expected batch 64 (half the steps)": {"batch_size": 64},
    "top, expected batch 64, twice the epochs": {"batch_size": 64, "epochs": 8},
}


def label_weight_table(
    judge: Judge, cfg: EmixerConfig, public: Path, setup: Setup, weights: str, started: float
) -> None:
    """Public-only models, one per train.label_weight, scored by the same judge."""
    rows = []
    for text in weights.split(","):
        weight = float(text)
        weighted = replace(cfg, train=replace(cfg.train, label_weight=weight))
        t = time.perf_counter()
        trained = pretrained_weights(public, weighted, setup)
        wall = time.perf_counter() - t
        synthetic = synthetic_for(weighted, trained, setup.per_condition)
        figures = judge.score(synthetic).figures
        keys = ("fidelity_lift_fraction", "tstr_ratio", "augmentation_gain", "frechet")
        rows.append((f"{weight:g}", *(cell(figures[k]) for k in keys), f"{wall:.0f}"))
        console.print(f"  done: label_weight {weight:g} ({wall:.0f} s)")
    print_table(
        "public pretraining: weight of D's finding classifier (public-only models)",
        ("label_weight", "fidelity", "TSTR / real", "augmentation gain", "Frechet", "wall s"),
        rows,
        (
            f"{setup.pretrain_steps} public steps each ({setup.public} studies), same judge as "
            "the utility table; [95% bootstrap intervals]",
            f"total {time.perf_counter() - started:.0f} s; {machine()}",
        ),
    )


def levers_table(
    judge: Judge, cfg: EmixerConfig, data: list[SiteData], public_weights: dict, setup: Setup
) -> None:
    """Each DP-GAN lever at epsilon 10 per site, fine-tuning the public model."""
    per = setup.per_condition
    lever_rows = []
    for name, change in LEVERS.items():
        lever_cfg = replace(cfg, train=replace(cfg.train, **change))
        t = time.perf_counter()
        weights, spent, steps = federate(lever_cfg, data, public_weights, setup.rounds, 10.0)
        wall = time.perf_counter() - t
        lever_rows.append(row(name, judge, lever_cfg, weights, per, spent, steps, wall))
    print_table(
        "DP-GAN levers at epsilon 10 per site, from the public model",
        COLUMNS,
        lever_rows,
        (f"same judge and sites as above; {machine()}",),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds x 2 epochs, 200 steps")
    parser.add_argument("--no-levers", action="store_true", help="skip the levers table")
    parser.add_argument(
        "--only-levers",
        action="store_true",
        help="only the levers table (skips the main comparison)",
    )
    parser.add_argument("--cache", default="bench-cache/utility", help="phantom data folder")
    parser.add_argument(
        "--label-weights",
        help="instead of the tables above: public-only models pretrained with each of these "
        "comma-separated train.label_weight values (the weight of D's finding classifier), "
        "to see what fidelity costs in realism (Frechet) and in augmentation gain",
    )
    args = parser.parse_args()
    setup = QUICK if args.quick else Setup()
    started = time.perf_counter()
    cfg = EmixerConfig(
        model=ModelConfig(**DEMO_MODEL),
        train=TrainConfig(epochs=setup.epochs, **DEMO_TRAIN),
        privacy=PrivacyConfig(),
    )
    sites, public = prepare(setup, Path(args.cache), cfg.model)
    heldout = LabeledSet.concat([s.heldout for s in sites])
    rng = np.random.default_rng(0)
    units = sorted(set(np.asarray(heldout.units).tolist()))
    test_units = set(rng.permutation(units)[: len(units) // 2].tolist())
    judge_train, judge_test = heldout.split(test_units)
    judge = Judge.fit(judge_train, judge_test, epochs=60 if args.quick else 100)
    console.print(
        f"judge: {len(judge_train.images)} real studies to train, {len(judge_test.images)} "
        f"held-out to test, none seen by any generator; {machine()}"
    )
    if args.label_weights:
        label_weight_table(judge, cfg, public, setup, args.label_weights, started)
        return
    t = time.perf_counter()
    public_weights = pretrained_weights(public, cfg, setup)
    pretrain_wall = time.perf_counter() - t
    if args.only_levers:
        levers_table(judge, cfg, [s.train for s in sites], public_weights, setup)
        return
    scratch = get_weights(build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS)))
    data = [s.train for s in sites]
    per = setup.per_condition
    rows = [row("public only (no site data)", judge, cfg, public_weights, per, 0, 0, pretrain_wall)]
    # from scratch every private parameter must move; from the public model the demo's
    # fine-tuning choice applies (top layers and norms under DP)
    scratch_cfg = replace(cfg, train=replace(cfg.train, dp_trainable="all"))
    starts = (("scratch", scratch, scratch_cfg), ("public-pretrained", public_weights, cfg))
    for label, epsilon in (("non-private", None), ("epsilon 10", 10.0), ("epsilon 3", 3.0)):
        for start_name, start, start_cfg in starts:
            t = time.perf_counter()
            weights, spent, steps = federate(start_cfg, data, start, setup.rounds, epsilon)
            wall = time.perf_counter() - t
            rows.append(row(f"{label}, {start_name}", judge, cfg, weights, per, spent, steps, wall))
            console.print(f"  done: {rows[-1][0]} ({wall:.0f} s)")
    t = time.perf_counter()
    weights, spent, steps = federate(
        cfg, [without_unlabeled(d) for d in data], public_weights, setup.rounds, 10.0
    )
    rows.append(
        row(
            "epsilon 10, public-pretrained, no unlabeled scans",
            judge,
            cfg,
            weights,
            per,
            spent,
            steps,
            time.perf_counter() - t,
        )
    )
    notes = (
        f"{setup.sites} phantom sites x {setup.per_site} labeled + {setup.unlabeled} unlabeled; "
        f"{HOLDOUT:.0%} of each site's labeled patients held out for the judge",
        f"{setup.rounds} rounds x {setup.epochs} local epochs; public collection "
        f"{setup.public} studies, {setup.pretrain_steps} pretraining steps",
        "fidelity: (AUROC of the judge on synthetic images vs their labels - 0.5) / (its "
        "AUROC on real held-out patients - 0.5); TSTR: a classifier trained on synthetic "
        "pairs, tested on the same held-out patients, over the real-trained one",
        f"judge real held-out AUROC {cell(judge.heldout_auroc()[0])}, "
        f"n = {len(judge_test.images)}; [95% bootstrap intervals]",
        f"total {time.perf_counter() - started:.0f} s; {machine()}",
    )
    print_table("synthetic data utility, 3 federated phantom sites", COLUMNS, rows, notes)
    if not args.no_levers:
        levers_table(judge, cfg, data, public_weights, setup)


if __name__ == "__main__":
    main()
