"""Does the federation teach the release what only the hospitals know? (issue 16)

The phantom world (docs/PHANTOM_WORLD.md) gives sites 1 and 2 a finding the public collection
never shows (SITE_ONLY_FINDING) and site 2 its own cardiomegaly phrasing. From the public model,
each row fine-tunes with one recipe across the 3 sites (in-process FedAvg, bench.utility) and
measures, on synthetic pairs drawn with the same latent once without and once with the site-only
label:

- image transfer: the judge's AUROC for the site-only finding on those images (0.5: the label
  changes nothing the judge sees), the judge being a classifier trained on the sites' real
  training patients and checked on their held-out ones (its real AUROC is the ceiling);
- report transfer: the share of reports the labeler reads as stating the finding, label on
  minus label off;
- site phrasing: the share of cardiomegaly reports written in site 2's words.

Rows are `public` or RECIPE:EPSILON, EPSILON `none` for no noise:

    python -m bench.site_knowledge --rows public,demo:none,demo:10 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.common import console, machine, print_table
from bench.utility import QUICK, SMOKE, Setup, federate, prepare, pretrained_weights, scored_split
from emixer_cli.commands.demo import DEMO_MODEL, DEMO_TRAIN
from emixer_model.config import FINDINGS, EmixerConfig, ModelConfig, TrainConfig
from emixer_model.data.splits import LabeledSet
from emixer_model.evaluation.classifier import score_images, train_classifier
from emixer_model.evaluation.image_metrics import auroc
from emixer_model.networks import build_networks, set_weights
from emixer_model.synthesis import synthesize
from emixer_model.text.grammar import SITE_ONLY_FINDING, uses_site_phrasing
from emixer_model.text.labeler import label_report
from emixer_model.text.vocabulary import VOCAB_SIZE, decode_report
from emixer_model.training import sample_prior

NEW = FINDINGS.index(SITE_ONLY_FINDING)
PHRASED = "Cardiomegaly"
JUDGE_STEPS = 800

RECIPES: dict[str, dict] = {
    "demo": dict(DEMO_TRAIN),
    "all": {"dp_trainable": "all"},
    "all+clip": {"dp_trainable": "all", "clip_per_network": True},
    "all+clip+g4": {"dp_trainable": "all", "clip_per_network": True, "g_steps": 4},
    "all+clip+g4+lr": {
        "dp_trainable": "all",
        "clip_per_network": True,
        "g_steps": 4,
        "lr_text": 2e-3,
        "lr_g": 5e-4,
    },
}


def with_finding(labels: torch.Tensor, finding: str) -> torch.Tensor:
    """The same label vectors with `finding` on (and "No Finding" off)."""
    out = labels.clone()
    out[:, FINDINGS.index(finding)] = 1.0
    out[:, FINDINGS.index("No Finding")] = 0.0
    return out


def measure(cfg: EmixerConfig, weights: dict, judge, n: int = 200) -> dict[str, float]:
    """The three transfer figures of one model on n paired draws (see the module docstring)."""
    nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
    set_weights(nets, weights)
    nets.eval()
    off = sample_prior(n, torch.Generator().manual_seed(11))
    off[:, NEW] = 0.0
    conditions = {"off": off, "on": with_finding(off, SITE_ONLY_FINDING)}
    conditions["phrased"] = with_finding(off, PHRASED)
    drawn = {}  # one seed for every condition: the same latents, so the draws are paired
    for name, labels in conditions.items():
        images, ids = synthesize(nets, cfg.model, labels, torch.Generator().manual_seed(5))
        drawn[name] = images, [decode_report(t) for t in ids]
    probs = [score_images(judge, drawn[k][0])[0][:, NEW] for k in ("off", "on")]
    stated = {
        k: float(np.mean([label_report(r).get(SITE_ONLY_FINDING) == 1 for r in drawn[k][1]]))
        for k in ("off", "on")
    }
    phrased = [uses_site_phrasing(r, PHRASED) for r in drawn["phrased"][1]]
    return {
        "image_auroc": auroc(np.concatenate(probs), np.r_[np.zeros(n), np.ones(n)]),
        "report_on": stated["on"],
        "report_off": stated["off"],
        "phrasing": float(np.mean(phrased)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="public,demo:none,demo:10")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and pretraining steps")
    parser.add_argument("--smoke", action="store_true", help="tiny: proves the code paths only")
    parser.add_argument("--seeds", default="0", help="seeds of pretraining and training (0)")
    parser.add_argument(
        "--split",
        choices=("validation", "test"),
        default="validation",
        help="which half of the held-out patients scores the judge (validation)",
    )
    parser.add_argument("--cache", default="bench-cache/site_knowledge")
    parser.add_argument("--smoothing", type=float, default=0.0)
    args = parser.parse_args()
    setup: Setup = SMOKE if args.smoke else QUICK if args.quick else Setup(per_site=160, size=64)
    model = ModelConfig(**DEMO_MODEL)
    base = EmixerConfig(
        model=model,
        train=TrainConfig(report_label_smoothing=args.smoothing, epochs=setup.epochs),
    )
    cache = Path(args.cache)
    console.print(machine())
    sites, public = prepare(setup, cache, model)
    judge_train = LabeledSet.concat([s.judge_train for s in sites])
    scored = LabeledSet.concat([scored_split(s.heldout, args.split) for s in sites])
    steps = 20 if args.smoke else JUDGE_STEPS
    judge = train_classifier(judge_train.images, judge_train.labels, steps, seed=0)
    real = score_images(judge, scored.images)[0][:, NEW]
    console.print(
        f"judge on {len(scored.images)} {args.split} patients' studies, {SITE_ONLY_FINDING}: "
        f"AUROC {auroc(real, scored.labels[:, NEW].numpy())} (the ceiling of image transfer)"
    )
    rows = []
    for seed in (int(x) for x in args.seeds.split(",")):
        key = f"pretrained-s{args.smoothing}-{setup.pretrain_steps}-seed{seed}.pt"
        if (cache / key).is_file():
            start = torch.load(cache / key, weights_only=False)
        else:
            start = pretrained_weights(public, base, setup, seed)
            torch.save(start, cache / key)
        for spec in args.rows.split(","):
            began = time.perf_counter()
            weights, eps = start, 0.0
            if spec != "public":
                name, epsilon = spec.split(":")
                cfg = replace(base, train=replace(base.train, **RECIPES[name]))
                budget = None if epsilon == "none" else float(epsilon)
                train = [s.train for s in sites]
                weights, eps, _ = federate(cfg, train, start, setup.rounds, budget, seed)
            m = measure(base, weights, judge)
            rows.append(
                (
                    spec,
                    str(seed),
                    f"{m['image_auroc']:.2f}",
                    f"{m['report_on']:.2f} / {m['report_off']:.2f}",
                    f"{m['phrasing']:.2f}",
                    f"{eps:.2f}",
                    f"{time.perf_counter() - began:.0f}",
                )
            )
            console.print(rows[-1])
    columns = ("row", "seed", "image AUROC (new label)", "report states it: on / off")
    print_table("site knowledge", (*columns, "site phrasing", "eps", "s"), rows)
    console.print(machine())


if __name__ == "__main__":
    main()
