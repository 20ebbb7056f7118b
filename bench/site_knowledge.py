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
- site phrasing: the share of cardiomegaly reports written in site 2's words;
- TSTR: a classifier trained on SYNTHETIC_PAIRS pairs drawn for labels of the fixed public
  prior (as a release is drawn, never the test patients' label vectors), its AUROC for the
  site-only finding on the held-out real patients;
- augmentation: a site that has labeled only SCARCE_POSITIVES patients with the site-only
  finding trains a classifier on its real studies alone, and on them plus the synthetic pairs;
  the AUROC gain on the held-out patients;
- shared findings (all but the site-only one, which the public model already draws): the
  judge's AUROC and the reports' on - off for each, label off vs on with the same latents,
  averaged over them; what fine-tuning costs what the public model knew;
- D's finding head, where the image side is won or lost: its AUROC for the site-only finding on
  the held-out real patients (does D know the finding?) and on the paired draws (does G satisfy
  D?). High on both with a low image AUROC: G pleases D's head with something the judge does
  not read as the finding.

Rows are `public`, RECIPE:EPSILON (EPSILON `none` for no noise), or RECIPE:EPSILON:control,
the same run on the public-style pseudo-sites (docs/PHANTOM_WORLD.md): what more training steps
alone give, scored on the same real held-out patients.

    python -m bench.site_knowledge --rows public,demo:none,demo:10,demo:10:control --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench.common import console, machine, print_table
from bench.utility import QUICK, SMOKE, Setup, federate, prepare, pretrained_weights, scored_split
from emixer_cli.commands.demo import DEMO_MODEL, DEMO_TRAIN
from emixer_model.config import FINDINGS, EmixerConfig, ModelConfig, TrainConfig
from emixer_model.data.public import load_public
from emixer_model.data.splits import LabeledSet
from emixer_model.evaluation.bootstrap import DEFAULT_RESAMPLES, Resampler, bootstrap
from emixer_model.evaluation.classifier import Classifier, score_images, train_classifier
from emixer_model.evaluation.image_metrics import auroc
from emixer_model.evaluation.utility import Figure, figure, over_seeds, paired_difference
from emixer_model.networks import EmixerNets, build_networks, set_weights
from emixer_model.public_pretrain import PRETRAINING_VERSION, unshown_findings, with_site_findings
from emixer_model.synthesis import synthesize
from emixer_model.text.grammar import SITE_ONLY_FINDING, uses_site_phrasing
from emixer_model.text.labeler import label_report
from emixer_model.text.vocabulary import VOCAB_SIZE, decode_report
from emixer_model.training import sample_prior

NEW = FINDINGS.index(SITE_ONLY_FINDING)
PHRASED = "Cardiomegaly"
JUDGE_STEPS = 800
SYNTHETIC_PAIRS = 600  # the TSTR and augmentation set (the prior asks for the finding in 10%)
SCARCE_POSITIVES = 6  # labeled positives of the site-only finding at the scarce-data site
BASE_STUDIES = 160  # labeled studies per site at the default expected batch (32 rows)


@dataclass(frozen=True)
class Real:
    """The real data the figures are scored with: the judge, what it and the scarce-data site
    learn from (training-side patients), and the held-out patients that score everything."""

    judge: Classifier
    scarce: LabeledSet
    scarce_probs: np.ndarray  # a classifier on the scarce-data site's real studies alone
    scored: LabeledSet


def scarce_positives(data: LabeledSet, keep: int, seed: int) -> LabeledSet:
    """`data` with only `keep` of its site-only-positive rows left (every negative kept)."""
    positive = np.flatnonzero(data.labels[:, NEW].numpy() > 0)
    dropped = np.random.default_rng(seed).permutation(positive)[keep:]
    return data.subset(np.setdiff1d(np.arange(len(data.images)), dropped))


def new_label_probs(model: Classifier, scored: LabeledSet) -> np.ndarray:
    """A classifier's probabilities for the site-only finding on the scored real studies."""
    return score_images(model, scored.images)[0][:, NEW]


def new_label_auroc(model: Classifier, scored: LabeledSet) -> float | None:
    """A classifier's AUROC for the site-only finding on the scored real patients."""
    return auroc(new_label_probs(model, scored), scored.labels[:, NEW].numpy())


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
    # the same with 5x the local epochs: 200 private steps per site over the 5 rounds, the
    # least that taught the site-only finding without noise (diagnosis in bench/README.md)
    "learn": {
        "dp_trainable": "all",
        "clip_per_network": True,
        "g_steps": 4,
        "lr_text": 2e-3,
        "lr_g": 5e-4,
        "epochs": 20,
    },
}
# the same with only the top layers and norms private (training.PRIVATE_LAYERS): far fewer noised
# coordinates for the same clip norm, each row's clipped gradient spread over fewer of them
RECIPES["learn-top"] = RECIPES["learn"] | {"dp_trainable": "top"}
# only the layers tying labels to images and reports private (training.PRIVATE_LAYERS["labels"],
# about a tenth of all coordinates at the demo's size): the clipped gradient of a new label falls
# on the few coordinates that can carry it, and the noise no longer random-walks the bodies
RECIPES["learn-labels"] = RECIPES["learn"] | {"dp_trainable": "labels"}
# the same with heavy-ball SGD (momentum 0.9) instead of Adam for the private networks: Adam
# scales every coordinate's step to about lr, so under DP the noise coordinates walk as fast as
# the signal ones; SGD moves each by its noisy mean gradient, and the noise averages out. lr 0.1
# chosen by an R-only sweep at site 1 (0.03 / 0.1 / 0.2 / 0.5 / 1; bench/README.md)
RECIPES["learn-labels-sgd"] = RECIPES["learn-labels"] | {
    "private_optimizer": "sgd",
    "lr_text": 0.1,
    "lr_d": 0.1,
}
# D as learn-labels-sgd; in R only the per-label word bias (dp_trainable "label-words"), at lr 1:
# a site that never shows the finding no longer erases its words (the R-only probe federated
# over the three sites, label on: 0.00 with learn-labels-sgd's R layers, 0.18-0.34 in 4 seeds
# with the bias alone; lr 0.3 0.06, lr 3 0.12; bench/README.md)
RECIPES["learn-label-words"] = RECIPES["learn-labels-sgd"] | {
    "dp_trainable": "label-words",
    "lr_text": 1.0,
}
# the same, with only the findings the public model never saw training (train.site_findings
# "unshown", filled in as `emixer server` does): the shared findings keep the public model's
# words and finding head (bench/README.md, "Only the findings the public model never saw train")
RECIPES["learn-unshown"] = RECIPES["learn-label-words"] | {"site_findings": "unshown"}
# the same with D's finding head and G's reward for it weighted twice as much (train.label_weight
# 16): a larger share of D's clipped row for the head carried the new finding's look back to
# where learn-label-words had it, shared findings kept (validation, 3 seeds; bench/README.md)
RECIPES["learn-unshown-lw16"] = RECIPES["learn-unshown"] | {"label_weight": 16.0}
# the same with 4x the private learning rates: under DP noise Adam's second moment is the noise's
# variance, so a coordinate moves by lr x signal / noise per step instead of lr (DP-AdamBC,
# Tang et al. 2024); this tests whether the lost learning is that slow-down
RECIPES["learn-lr4"] = RECIPES["learn"] | {"lr_text": 8e-3, "lr_d": 8e-4}


def base_config(
    model: ModelConfig, epochs: int, per_site: int, smoothing: float = 0.0
) -> EmixerConfig:
    """The bench's config at `per_site` labeled studies per site: the expected batch grows with
    the site (32 x per_site / 160), so q, sigma and the steps stay those of the base size."""
    batch = round(TrainConfig().batch_size * per_site / BASE_STUDIES)
    train = TrainConfig(report_label_smoothing=smoothing, epochs=epochs, batch_size=batch)
    return EmixerConfig(model=model, train=train)


def with_recipe(base: EmixerConfig, name: str) -> EmixerConfig:
    """`base` with the training choices of RECIPES[name]."""
    return replace(base, train=replace(base.train, **RECIPES[name]))


def with_finding(labels: torch.Tensor, finding: str) -> torch.Tensor:
    """The same label vectors with `finding` on (and "No Finding" off)."""
    out = labels.clone()
    out[:, FINDINGS.index(finding)] = 1.0
    out[:, FINDINGS.index("No Finding")] = 0.0
    return out


def without_finding(labels: torch.Tensor, finding: str) -> torch.Tensor:
    """The same label vectors with `finding` off."""
    out = labels.clone()
    out[:, FINDINGS.index(finding)] = 0.0
    return out


def with_a_finding(n: int) -> torch.Tensor:
    """n label vectors of the fixed prior that state some finding but not the site-only one:
    switching it on then changes that one label only ("No Finding" is never on to flip)."""
    labels = sample_prior(4 * n, torch.Generator().manual_seed(11), (SITE_ONLY_FINDING,))
    return labels[labels[:, FINDINGS.index("No Finding")] == 0][:n]


# the findings the public collection also shows: what fine-tuning must not cost them
SHARED = [f for f in FINDINGS if f not in ("No Finding", SITE_ONLY_FINDING)]
PAIR_FIGURES = ("image AUROC", "report: on - off", "report: on", "site phrasing", "D: draws")
PAIR_FIGURES += ("shared: images", "shared: reports")
HELDOUT_FIGURES = ("TSTR", "augment", "D: real")
FIGURES = PAIR_FIGURES + HELDOUT_FIGURES
CHANCE = {"image AUROC": 0.5, "TSTR": 0.5, "report: on - off": 0.0, "augment": 0.0}
CHANCE |= {"D: real": 0.5, "D: draws": 0.5, "shared: images": 0.5, "shared: reports": 0.0}


def measure(
    cfg: EmixerConfig, weights: dict, real: Real, n: int = 200, seed: int = 0
) -> dict[str, Figure]:
    """The transfer figures of one model (see the module docstring), each with its bootstrap:
    the n paired draws resampled pair by pair, the held-out patients unit by unit; every row
    and seed resamples the same indices, so differences between rows are paired."""
    nets = build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS))
    set_weights(nets, weights)
    nets.eval()
    conditions = {"off": (off := with_a_finding(n)), "on": with_finding(off, SITE_ONLY_FINDING)}
    conditions["phrased"] = with_finding(off, PHRASED)
    for f in SHARED:  # each shared finding off and on, the rest of the vector kept
        conditions[f"{f} off"] = without_finding(off, f)
        conditions[f"{f} on"] = with_finding(off, f)
    drawn = {}  # one seed for every condition: the same latents, so the draws are paired
    for name, labels in conditions.items():
        images, ids = synthesize(nets, cfg.model, labels, torch.Generator().manual_seed(5))
        drawn[name] = images, [decode_report(t) for t in ids]
    pairs_of = {SITE_ONLY_FINDING: ("off", "on")} | {f: (f"{f} off", f"{f} on") for f in SHARED}
    probs = {
        f: [score_images(real.judge, drawn[k][0])[0][:, FINDINGS.index(f)] for k in keys]
        for f, keys in pairs_of.items()
    }
    stated = {
        f: [np.array([label_report(r).get(f) == 1 for r in drawn[k][1]], float) for k in keys]
        for f, keys in pairs_of.items()
    }
    heads = [finding_head(nets, drawn[k][0]) for k in ("off", "on")]
    phrased = np.array([uses_site_phrasing(r, PHRASED) for r in drawn["phrased"][1]], float)

    def pair_auroc(p: list[np.ndarray], i: np.ndarray) -> float:
        value = auroc(np.r_[p[0][i], p[1][i]], np.r_[np.zeros(len(i)), np.ones(len(i))])
        return np.nan if value is None else value

    def pair_figures(i: np.ndarray) -> np.ndarray:
        image, head = pair_auroc(probs[SITE_ONLY_FINDING], i), pair_auroc(heads, i)
        off_said, on_said = (said[i].mean() for said in stated[SITE_ONLY_FINDING])
        shared_images = np.mean([pair_auroc(probs[f], i) for f in SHARED])
        shared_reports = np.mean([stated[f][1][i].mean() - stated[f][0][i].mean() for f in SHARED])
        return np.array(
            [
                image,
                on_said - off_said,
                on_said,
                phrased[i].mean(),
                head,
                shared_images,
                shared_reports,
            ]
        )

    labels = sample_prior(SYNTHETIC_PAIRS, torch.Generator().manual_seed(13))
    images, _ = synthesize(nets, cfg.model, labels, torch.Generator().manual_seed(17))
    tstr = new_label_probs(train_classifier(images, labels, JUDGE_STEPS, seed=0), real.scored)
    both = train_classifier(
        torch.cat([real.scarce.images, images]),
        torch.cat([real.scarce.labels, labels]),
        JUDGE_STEPS,
        seed=0,
    )
    both = new_label_probs(both, real.scored)
    truth = real.scored.labels[:, NEW].numpy()
    head = finding_head(nets, real.scored.images)

    def heldout_figures(i: np.ndarray) -> np.ndarray:
        values = [auroc(p[i], truth[i]) for p in (tstr, both, real.scarce_probs, head)]
        tstr_auc, both_auc, alone, head_auc = (np.nan if v is None else v for v in values)
        return np.array([tstr_auc, both_auc - alone, head_auc])

    pairs = Resampler(np.arange(n), "pairs")
    heldout = Resampler(np.asarray(real.scored.units), "heldout")
    out = {}
    for names, statistic, sampler, what in (
        (PAIR_FIGURES, pair_figures, pairs, f"{n} paired synthetic draws"),
        (HELDOUT_FIGURES, heldout_figures, heldout, f"{heldout.units} held-out patients"),
    ):
        point, draws = bootstrap(statistic, [sampler], DEFAULT_RESAMPLES, seed)
        for k, name in enumerate(names):
            out[name] = figure(point[k], draws[:, k], sampler.units, what, CHANCE.get(name))
    return out


@torch.no_grad()
def finding_head(nets: EmixerNets, images: torch.Tensor) -> np.ndarray:
    """D's finding head's logit for the site-only finding on `images`: what G is rewarded by."""
    return nets.d.finding_logits(nets.d.image_features(images))[:, NEW].numpy()


def cell(f: Figure | None) -> str:
    """A figure as 'value [low, high]'."""
    if f is None:
        return "-"
    if f.value is None:
        return "undefined"
    if f.low is None or f.high is None:
        return f"{f.value:.2f}"
    return f"{f.value:.2f} [{f.low:.2f}, {f.high:.2f}]"


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
    parser.add_argument(
        "--pretrain-seed",
        type=int,
        help="one public model for every seed (default: each seed pretrains its own)",
    )
    parser.add_argument("--control", help="a row every row is also compared with, paired")
    parser.add_argument(
        "--save",
        help="also write the figures to this file, after every row (to merge rows that ran in "
        "separate processes)",
    )
    parser.add_argument(
        "--summarise",
        nargs="+",
        metavar="FILE",
        help="only merge the figures --save wrote (the same --split) and print the tables",
    )
    parser.add_argument(
        "--per-site",
        type=int,
        default=BASE_STUDIES,
        help=f"labeled studies per site ({BASE_STUDIES}); the expected batch grows with it, so "
        "q, sigma and the steps stay those of the base size (the site-size table)",
    )
    parser.add_argument("--cache", default="bench-cache/site_knowledge")
    parser.add_argument(
        "--keep-weights",
        metavar="DIR",
        help="also write each row's final weights there (ROW-seedN.pt), to diagnose them later",
    )
    parser.add_argument("--smoothing", type=float, default=0.0)
    args = parser.parse_args()
    if args.summarise:
        merged: dict[str, dict[int, dict[str, Figure]]] = {}
        for path in args.summarise:
            for spec, by_seed in torch.load(path, weights_only=False).items():
                merged.setdefault(spec, {}).update(by_seed)
        summarise(merged, args.control)
        return
    setup: Setup = SMOKE if args.smoke else QUICK if args.quick else Setup(per_site=160, size=64)
    setup = replace(setup, per_site=args.per_site) if args.per_site != BASE_STUDIES else setup
    model = ModelConfig(**DEMO_MODEL)
    base = base_config(model, setup.epochs, args.per_site, args.smoothing)
    cache = Path(args.cache)
    console.print(machine())
    sites, public = prepare(setup, cache, model)
    unshown = unshown_findings(load_public(public, model).labels)  # what `emixer pretrain` records
    judge_train = LabeledSet.concat([s.judge_train for s in sites])
    scored = LabeledSet.concat([scored_split(s.heldout, args.split) for s in sites])
    steps = 20 if args.smoke else JUDGE_STEPS
    judge = train_classifier(judge_train.images, judge_train.labels, steps, seed=0)
    scarce = scarce_positives(judge_train, SCARCE_POSITIVES, seed=0)
    scarce_probs = new_label_probs(
        train_classifier(scarce.images, scarce.labels, steps, seed=0), scored
    )
    real = Real(judge, scarce, scarce_probs, scored)
    scarce_auroc = auroc(scarce_probs, scored.labels[:, NEW].numpy())
    console.print(
        f"judge on {len(scored.images)} {args.split} patients' studies, {SITE_ONLY_FINDING}: "
        f"AUROC {new_label_auroc(judge, scored):.3f} (the ceiling of image transfer); "
        f"scarce-data site ({SCARCE_POSITIVES} positives of {len(scarce.images)} studies) "
        f"alone: {scarce_auroc:.3f}"
    )
    results: dict[str, dict[int, dict[str, Figure]]] = {}
    pseudo: list = []
    for seed in (int(x) for x in args.seeds.split(",")):
        version = f"v{PRETRAINING_VERSION}-s{args.smoothing}-{setup.pretrain_steps}"
        pretrain_seed = seed if args.pretrain_seed is None else args.pretrain_seed
        key = f"pretrained-{version}-seed{pretrain_seed}.pt"
        if (cache / key).is_file():
            start = torch.load(cache / key, weights_only=False)
        else:
            start = pretrained_weights(public, base, setup, pretrain_seed)
            torch.save(start, cache / key)
        for spec in args.rows.split(","):
            began = time.perf_counter()
            weights, eps = start, 0.0
            if spec != "public":
                name, epsilon, *control = spec.split(":")
                cfg = with_site_findings(with_recipe(base, name), unshown)
                budget = None if epsilon == "none" else float(epsilon)
                if control and control != ["control"]:
                    parser.error(f"row {spec!r}: the third part can only be 'control'")
                if control and not pseudo:
                    pseudo = prepare(setup, cache, model, pseudo=True)[0]
                train = [s.train for s in (pseudo if control else sites)]
                weights, eps, _ = federate(cfg, train, start, setup.rounds, budget, seed)
            if args.keep_weights:
                Path(args.keep_weights).mkdir(parents=True, exist_ok=True)
                torch.save(weights, Path(args.keep_weights) / f"{spec}-seed{seed}.pt")
            figures = measure(base, weights, real, seed=0)
            results.setdefault(spec, {})[seed] = figures
            if args.save:  # after every row: a stopped run keeps the rows it finished
                torch.save(results, args.save)
            took = time.perf_counter() - began
            console.print(
                f"{spec} seed {seed}: "
                + "; ".join(f"{k} {cell(v)}" for k, v in figures.items())
                + f"; eps {eps:.2f}; {took:.0f} s"
            )
    summarise(results, args.control)
    console.print(machine())


def pooled_figure(runs: list[Figure | None]) -> Figure | None:
    """over_seeds of the runs that have the figure (files saved before it existed do not)."""
    present = [r for r in runs if r is not None]
    return over_seeds(present) if present else None


def summarise(results: dict[str, dict[int, dict[str, Figure]]], control: str | None) -> None:
    """One table over seeds (mean, interval covering seeds and sampling), then each row minus
    `public` and minus the control row, paired seed by seed."""
    table = []
    for spec, by_seed in results.items():
        runs = list(by_seed.values())
        pooled = {k: pooled_figure([r.get(k) for r in runs]) for k in FIGURES}
        table.append((spec, ",".join(map(str, by_seed)), *(cell(pooled[k]) for k in FIGURES)))
    print_table("site knowledge (mean over seeds, 95% interval)", ("row", "seeds", *FIGURES), table)
    for base in ("public", control):
        if base is None or base not in results:
            continue
        diffs = []
        for spec, by_seed in results.items():
            seeds = [s for s in by_seed if s in results[base]]
            if spec == base or not seeds:
                continue
            pooled = {
                k: pooled_figure(
                    [
                        paired_difference(by_seed[s][k], results[base][s][k])
                        if k in by_seed[s] and k in results[base][s]
                        else None
                        for s in seeds
                    ]
                )
                for k in FIGURES
            }
            diffs.append((spec, ",".join(map(str, seeds)), *(cell(pooled[k]) for k in FIGURES)))
        print_table(f"minus {base} (paired)", ("row", "seeds", *FIGURES), diffs)


if __name__ == "__main__":
    main()
