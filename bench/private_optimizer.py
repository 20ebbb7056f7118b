"""Which private optimizer lets the report decoder learn a site-only finding under DP? (issue 16)

A fast, narrow probe behind bench.site_knowledge's recipe choice: only R trains, at site 1 of
the phantom world (it shows the site-only finding), from the public model, on its real reports,
with the clip (R's share of max_grad_norm under `clip_per_network`), sample rate and
noise multiplier of a site's epsilon-10 plan, for a fixed number of steps. It then samples R's
reports for site 1's own images with the site-only label off and on and counts the share the
labeler reads as stating it. No G, no D, no federation: about 30 s per setting, so optimizers,
learning rates and trainable layers can be swept where the full bench takes half an hour a row.
Settings are OPTIMIZER:LR:SIGMA:LAYERS:SEED (LAYERS: a training.PRIVATE_LAYERS mode, e.g.
`labels` or `label-words`, or `all`). With `--r-sites 1,2,3` the same R alone is federated
(FedAvg, `--rounds` rounds, weighted by units) over those sites and still scored at site 1.

`--federate SITES` instead runs a bench.site_knowledge recipe (the whole PrivateTrainer: D, E,
R and G) federated over those sites only (1-based), and scores R the same way at site 1: which
part of the federation loses what R alone learns.

    python -m bench.private_optimizer adam:2e-3:3.8:labels:0 sgd:0.1:3.8:labels:0
    python -m bench.private_optimizer sgd:1:3.8:label-words:0 --r-sites 1,2,3
    python -m bench.private_optimizer --federate 1,2 --recipe learn-labels-sgd
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import astuple, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from bench.common import console, machine
from bench.site_knowledge import (
    BASE_STUDIES,
    RECIPES,
    base_config,
    with_a_finding,
    with_finding,
    with_recipe,
)
from bench.utility import Setup, federate, prepare, unit_weighted_mean
from emixer_cli.commands.demo import DEMO_MODEL
from emixer_model.config import FINDINGS, ModelConfig
from emixer_model.networks import EmixerNets, build_networks, get_weights, set_weights
from emixer_model.public_pretrain import PRETRAINING_VERSION
from emixer_model.text.grammar import SITE_ONLY_FINDING
from emixer_model.text.labeler import label_report
from emixer_model.text.vocabulary import VOCAB_SIZE, decode_report
from emixer_model.training import PRIOR_CLIP_SHARE, PRIVATE_LAYERS, poisson_units

CLIP = ((1 - PRIOR_CLIP_SHARE**2) / 2) ** 0.5  # R's share of a row's norm 1, clip_per_network


@dataclass(frozen=True)
class Setting:
    """One probe setting, OPTIMIZER:LR:SIGMA:LAYERS:SEED on the command line."""

    optimizer: str
    lr: float
    sigma: float
    layers: str
    seed: int

    @classmethod
    def parse(cls, text: str) -> Setting:
        optimizer, lr, sigma, layers, seed = text.split(":")
        return cls(optimizer, float(lr), float(sigma), layers, int(seed))


def train_r(
    start: dict, data, model: ModelConfig, setting: Setting, steps: int, q: float, momentum: float
) -> EmixerNets:
    """R alone under DP-SGD/Adam from `start` on the site's labeled rows; one row per unit."""
    optimizer, lr, sigma, layers, seed = astuple(setting)
    nets = build_networks(model, VOCAB_SIZE, len(FINDINGS))
    set_weights(nets, start)
    with torch.no_grad():
        embedding = nets.e(data.images)
    r = nets.r.requires_grad_(layers == "all")
    for name in PRIVATE_LAYERS[layers]["r"] if layers != "all" else ():
        getattr(r, name).requires_grad_(True)
    GradSampleModule(r, loss_reduction="sum")
    moving = [p for p in r.parameters() if p.requires_grad]
    inner = (
        torch.optim.Adam(moving, lr=lr, betas=(0.5, 0.999))
        if optimizer == "adam"
        else torch.optim.SGD(moving, lr=lr, momentum=momentum)
    )
    batch = round(q * len(data.units))
    dp = DPOptimizer(
        inner,
        # the noise is sigma x the row's whole norm 1, as in the trainer; Opacus multiplies
        # its noise_multiplier by max_grad_norm
        noise_multiplier=sigma / CLIP,
        max_grad_norm=CLIP,
        expected_batch_size=batch,
        loss_reduction="mean",
    )
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = [
            labeled[int(torch.randint(len(labeled), (1,), generator=g))]
            for unit in poisson_units(len(data.units), q, g).tolist()
            if (labeled := data.units[unit][0])
        ]
        idx = torch.tensor(rows, dtype=torch.long)
        dp.zero_grad(set_to_none=True)
        loss = r.teacher_forced_loss(embedding[idx], data.labels[idx], data.tokens[idx], 0.0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.sum().backward()
        dp.step()
    return nets


def federate_r(
    start: dict,
    sites: list,
    model: ModelConfig,
    setting: Setting,
    steps: int,
    rounds: int,
    q: float,
    momentum: float,
) -> EmixerNets:
    """R alone, FedAvg over `sites` (each training steps / rounds per round from the global R,
    its momentum restarting, as a site's does), weighted by units like the server."""
    weights = start
    for round_number in range(rounds):
        updates = []
        for k, data in enumerate(sites):
            local = replace(setting, seed=setting.seed * 1000 + round_number * 10 + k)
            nets = train_r(weights, data, model, local, steps // rounds, q, momentum)
            updates.append((len(data.units), get_weights(nets)))
        weights = unit_weighted_mean(updates)
    nets = build_networks(model, VOCAB_SIZE, len(FINDINGS))
    set_weights(nets, weights)
    return nets


def stating(nets: EmixerNets, data, model: ModelConfig, n: int = 200) -> tuple[float, float]:
    """Share of R's reports for n of the site's images (all, if it has fewer) that state the
    finding: label off, on."""
    n = min(n, len(data.images))
    off = with_a_finding(n)
    shares = []
    with torch.no_grad():
        embedding = nets.e(data.images[:n])
        for labels in (off, with_finding(off, SITE_ONLY_FINDING)):
            ids = nets.r.sample_ids(
                embedding, labels, model.report_temperature, torch.Generator().manual_seed(5)
            )
            said = [label_report(decode_report(t)).get(SITE_ONLY_FINDING) == 1 for t in ids]
            shares.append(float(np.mean(said)))
    return shares[0], shares[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="*", help="OPTIMIZER:LR:SIGMA:LAYERS:SEED")
    parser.add_argument("--federate", metavar="SITES", help="e.g. 1,2: a recipe over these sites")
    parser.add_argument("--recipe", default="learn-labels-sgd", choices=RECIPES)
    parser.add_argument("--epsilon", type=float, default=10.0, help="per site, with --federate")
    parser.add_argument("--per-site", type=int, default=500)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--q", type=float, default=0.58, help="sample rate (a 500-study plan)")
    parser.add_argument(
        "--r-sites", default="1", metavar="SITES", help="R-only settings: FedAvg over these"
    )
    parser.add_argument("--rounds", type=int, default=5, help="R-only FedAvg rounds")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    parser.add_argument("--cache", default="bench-cache/site_knowledge")
    parser.add_argument(
        "--pretrained", default=f"pretrained-v{PRETRAINING_VERSION}-s0.0-600-seed0.pt"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    console.print(machine())
    model = ModelConfig(**DEMO_MODEL)
    cache = Path(args.cache)
    setup = replace(Setup(per_site=BASE_STUDIES, size=64), per_site=args.per_site)
    sites = prepare(setup, cache, model)[0]
    data = sites[0].train
    start = torch.load(cache / args.pretrained, weights_only=False)
    new = FINDINGS.index(SITE_ONLY_FINDING)
    console.print(
        f"site 1: {len(data.images)} training studies, {len(data.units)} units, "
        f"{int(data.labels[:, new].sum())} show {SITE_ONLY_FINDING}"
    )
    if args.federate:
        began = time.perf_counter()
        chosen = [sites[int(k) - 1].train for k in args.federate.split(",")]
        cfg = with_recipe(base_config(model, setup.epochs, args.per_site), args.recipe)
        weights, eps, _ = federate(cfg, chosen, start, setup.rounds, args.epsilon, seed=0)
        nets = build_networks(model, VOCAB_SIZE, len(FINDINGS))
        set_weights(nets, weights)
        nets.eval()
        off, on = stating(nets, data, model)
        took = time.perf_counter() - began
        console.print(
            f"{args.recipe} over sites {args.federate}, epsilon {eps:.2f}: "
            f"off {off:.3f}, on {on:.3f}, gap {on - off:+.3f}; {took:.0f} s"
        )
    for text in args.settings:
        setting = Setting.parse(text)
        began = time.perf_counter()
        if args.r_sites == "1":
            nets = train_r(start, data, model, setting, args.steps, args.q, args.momentum)
        else:
            chosen = [sites[int(k) - 1].train for k in args.r_sites.split(",")]
            nets = federate_r(
                start, chosen, model, setting, args.steps, args.rounds, args.q, args.momentum
            )
        off, on = stating(nets, data, model)
        took = time.perf_counter() - began
        console.print(
            f"{text} over sites {args.r_sites}: off {off:.3f}, on {on:.3f}, "
            f"gap {on - off:+.3f}; {took:.0f} s"
        )
    console.print(machine())


if __name__ == "__main__":
    main()
