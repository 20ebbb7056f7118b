"""`emixer demo`: phantom hospitals -> public pretraining -> federated DP -> release -> evaluation.

The first thing a new user runs: every stage is the same code a real deployment runs (the
simulation starts the same ClientApp and ServerApp), on phantom data it writes itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

from rich.table import Table

from emixer_cli.commands.evaluate import evaluate_and_print
from emixer_cli.commands.pretrain import pretrain_with_progress
from emixer_cli.common import CONFIG_HELP, command_config, console, progress_bar
from emixer_cli.logs import LOG_FILE, log_to_file
from emixer_model.config import SITE_KNOWLEDGE_TRAIN, EmixerConfig
from emixer_model.evaluation.page import PAGE_NAME

# The demo's own settings (a --config file replaces all of them): sized so the whole demo, public
# pretraining included, finishes in about 8 minutes on 2 CPU cores; the model's size comes from
# bench/utility.py, the training recipe from bench/site_knowledge.py (see bench/README.md).
DEMO_ROUNDS = 5
DEMO_MODEL = {"resolution": 32, "latent_dim": 32, "width": 16, "embed_dim": 64}
# a fifth of each site's patients held out before round 1 (recorded in its state dir) so the
# evaluation scores patients no model saw; from the public model, the site-knowledge recipe (its
# local epochs included); with --pretrain-steps 0 it has nothing to fine-tune, so every weight
# trains, 4 local epochs a round
DEMO_HOLDOUT = {"holdout_fraction": 0.2}
DEMO_TRAIN = SITE_KNOWLEDGE_TRAIN | DEMO_HOLDOUT
DEMO_SCRATCH_TRAIN = {"epochs": 4} | DEMO_HOLDOUT
DEMO_PUBLIC_STUDIES, DEMO_PRETRAIN_STEPS = 600, 600


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the end-to-end demo: phantom hospitals -> federated DP training -> release -> "
        "evaluation",
        description="Generate phantom data for several simulated hospital sites, train EMIXER "
        "across them with Flower's simulation engine and per-site differential privacy (Opacus), "
        "print each site's privacy ledger, release synthetic image-report pairs behind the "
        "privacy gate and evaluate them against the phantom sites' real data. Re-running reuses "
        "the phantom data and writes a new run folder; nothing earlier is overwritten. Finishes "
        "in about 8 minutes on 2 CPU cores the first time, 6 to 7 once the phantoms and the public "
        "model are cached.",
    )
    p.add_argument("--sites", type=int, default=3, help="simulated hospital sites (3)")
    p.add_argument("--rounds", type=int, default=None, help=f"federated rounds ({DEMO_ROUNDS})")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"local epochs per round ({DEMO_TRAIN['epochs']} from the public model, "
        f"{DEMO_SCRATCH_TRAIN['epochs']} with --pretrain-steps 0, or the --config file's)",
    )
    p.add_argument("--per-site", type=int, default=160, help="labeled studies per site (160)")
    p.add_argument("--unlabeled", type=int, default=40, help="unlabeled scans per site (40)")
    p.add_argument("--size", type=int, default=128, help="phantom DICOM side in pixels (128)")
    p.add_argument("--seed", type=int, default=0, help="phantom data seed (0)")
    p.add_argument("--out", default="emixer-demo", help="output folder (emixer-demo)")
    p.add_argument(
        "--per-label-release", type=int, default=20, help="released pairs per condition (20)"
    )
    p.add_argument(
        "--public-studies",
        type=int,
        default=DEMO_PUBLIC_STUDIES,
        help=f"studies in the phantom public collection ({DEMO_PUBLIC_STUDIES})",
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=DEMO_PRETRAIN_STEPS,
        help=f"public pretraining steps, plus half as many report warm-start steps "
        f"({DEMO_PRETRAIN_STEPS}; 0: no pretraining, sites train every weight from random weights)",
    )
    p.add_argument("--config", help=CONFIG_HELP)
    p.set_defaults(func=run)


def demo_config(args: argparse.Namespace) -> EmixerConfig:
    """The demo's config: the user's file (if any, else the demo's model, training choices and
    rounds) with --rounds and --epochs applied on top."""
    cfg = command_config(args)
    if not args.config:
        train = DEMO_TRAIN if args.pretrain_steps > 0 else DEMO_SCRATCH_TRAIN
        cfg = replace(
            cfg,
            model=replace(cfg.model, **DEMO_MODEL),
            train=replace(cfg.train, **train),
        )
    rounds = args.rounds or (cfg.federation.rounds if args.config else DEMO_ROUNDS)
    epochs = args.epochs or cfg.train.epochs
    return replace(
        cfg,
        federation=replace(cfg.federation, rounds=rounds),
        train=replace(cfg.train, epochs=epochs),
    )


def phantom_folder(out: Path, args: argparse.Namespace) -> Path:
    """Where the demo keeps its phantom sites, named by everything they depend on."""
    from emixer_model.data.phantoms import PHANTOM_VERSION

    return out / (
        f"phantoms-v{PHANTOM_VERSION}-{args.sites}sites-{args.per_site}x{args.size}px-"
        f"{args.unlabeled}unlabeled-seed{args.seed}"
    )


def public_folder(out: Path, args: argparse.Namespace) -> Path:
    """Where the demo keeps its phantom public collection, named by everything it depends on
    (its name is part of the pretrained model's cache key too)."""
    from emixer_model.data.phantoms import PHANTOM_VERSION

    return out / f"public-v{PHANTOM_VERSION}-{args.public_studies}x{args.size}px-seed{args.seed}"


def public_collection(out: Path, args: argparse.Namespace) -> Path:
    """The demo's phantom public collection, written once and reused."""
    from emixer_model.data.phantoms import write_public_collection

    public = public_folder(out, args)
    if not (public / "studies.csv").is_file():
        write_public_collection(public, n=args.public_studies, seed=args.seed, size=args.size)
    return public


def cached_pretrained_model(
    out: Path, public: Path, cfg: EmixerConfig, args: argparse.Namespace
) -> Path:
    """The demo's pretrained model, made once and reused: the key is everything the model
    depends on (collection seed and size, model and train config, steps). The report-grammar
    warm start takes half as many steps as the pretraining."""
    steps, warm = args.pretrain_steps, args.pretrain_steps // 2
    from emixer_model.public_pretrain import PRETRAINING_VERSION

    # "model_sha256": models cached before their record named their own hash cannot start a run
    parts = [public.name, cfg.model.__dict__, cfg.train.__dict__, steps, PRETRAINING_VERSION]
    key = json.dumps([*parts, "model_sha256"], sort_keys=True)
    path = out / f"pretrained-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    if not path.is_file():
        pretrain_with_progress(public, cfg, steps, warm, cfg.train.seed, path)
    return path


def site_phrasing(report: str, finding: str) -> bool:
    """The phantom sites' own wording of `finding` (docs/PHANTOM_WORLD.md); False for a finding
    no site words its own way: the evaluation's phrasing-share figure."""
    from emixer_model.text.grammar import SITE_PHRASING, uses_site_phrasing

    return finding in SITE_PHRASING and uses_site_phrasing(report, finding)


LOSS_COLUMNS = ("report", "d_real", "d_fake", "g")  # the losses a person watches


def site_knowledge_findings() -> tuple[str, ...]:
    """What the phantom sites know that the public collection does not (docs/PHANTOM_WORLD.md):
    the site-only finding, the findings a site words its own way, the one a site draws its own."""
    from emixer_model.data.phantoms import SITE_APPEARANCE_FINDING
    from emixer_model.text.grammar import SITE_ONLY_FINDING, SITE_PHRASING

    return (SITE_ONLY_FINDING, *SITE_PHRASING, SITE_APPEARANCE_FINDING)


def ledger_table(ledger: dict) -> Table:
    """Each site's cumulative privacy spend, and its last round's mean losses where the site's
    policy let them leave (by default none do, and the loss columns are left out)."""
    sites = sorted(ledger["sites"].items())
    last = {
        name: site["history"][-1].get("losses", {}) if site["history"] else {}
        for name, site in sites
    }
    shown = [k for k in LOSS_COLUMNS if any(k in losses for losses in last.values())]
    title = "privacy ledger (per site, cumulative)" + (" and last round's losses" if shown else "")
    table = Table(title=title)
    for column in ("site", "rounds", "epsilon", "delta", "budget", "unit", "status", *shown):
        table.add_column(
            column, justify="left" if column in ("site", "unit", "status") else "right"
        )
    for name, site in sites:
        table.add_row(
            name,
            str(len(site["history"])),
            f"{site['epsilon']:.3f}",
            f"{site['delta']:.1e}",
            f"{site['budget']:.1f}",
            site["privacy_unit"],
            site["status"],
            *(f"{last[name][k]:.3f}" if k in last[name] else "-" for k in shown),
        )
    return table


def run(args: argparse.Namespace) -> int:
    from emixer_model.data.phantoms import write_phantom_sites
    from emixer_model.evaluation.tables import compared_table
    from emixer_model.evaluation.utility import SyntheticSet
    from emixer_model.privacy.state import simulation_public_key
    from server.tools.release import draw_as_released, parse_conditions, release
    from server.tools.simulation import simulate

    cfg = demo_config(args)
    out = Path(args.out)
    run_dir = out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    log_path = log_to_file(run_dir / LOG_FILE)
    data_dir = phantom_folder(out, args)
    if not (data_dir / "COMPLETE").is_file():
        console.rule("1/5 phantom hospitals")
        write_phantom_sites(
            data_dir,
            sites=args.sites,
            per_site=args.per_site,
            unlabeled=args.unlabeled,
            seed=args.seed,
            size=args.size,
        )
        (data_dir / "COMPLETE").write_text("phantom data written completely\n")
    sites = sorted(p for p in data_dir.iterdir() if p.is_dir())
    console.rule("2/5 public pretraining at the coordinator (no site data, no privacy cost)")
    public = None
    if args.pretrain_steps > 0:
        public = public_collection(out, args)
        pretrained = cached_pretrained_model(out, public, cfg, args)
        console.print(f"initial model {pretrained}")
        initial = str(pretrained.resolve())
        cfg = replace(cfg, federation=replace(cfg.federation, initial_model=initial))
    else:
        console.print("skipped (--pretrain-steps 0): the sites start from random weights")
    console.rule(f"3/5 federated DP training: {len(sites)} sites, {cfg.federation.rounds} rounds")
    console.print(f"run folder {run_dir}; Flower's, Ray's and Opacus' logs in {log_path}")
    ckpt = simulate(cfg, sites, run_dir / "state", run_dir / "checkpoints", verbose=args.verbose)
    console.print(ledger_table(ckpt.ledger))

    console.rule("4/5 synthetic release")
    release_dir = run_dir / "release"
    with progress_bar("synthesizing") as update:
        summary = release(
            ckpt.path,
            release_dir,
            per_label=args.per_label_release,
            conditions=parse_conditions(None),
            seed=args.seed,
            progress=update,
            # the demo runs its sites, so it holds the public half of each site's own key
            enrolled={
                site.name: simulation_public_key(run_dir / "state" / site.name) for site in sites
            },
        )
    console.print(
        f"released {summary.count} pairs, release epsilon {summary.release_epsilon:.3f} "
        "(the maximum over sites)"
    )
    console.rule("5/5 evaluation against the phantom sites' real data")
    evaluation_dir = run_dir / "evaluation"
    held_out = cfg.train.holdout_fraction > 0
    if not held_out:
        console.print(
            "[yellow]the --config file holds no patients out (train.holdout_fraction 0): every "
            "figure below is scored on patients the generator trained on[/yellow]"
        )
    compare = {}
    if public is not None:  # the public model's pairs for the same conditions and latents
        images, labels, reports = draw_as_released(
            pretrained, parse_conditions(None), args.per_label_release, seed=args.seed
        )
        compare["public-only model"] = SyntheticSet(images, labels, reports)
    result = evaluate_and_print(
        release_dir,
        sites,
        [run_dir / "state" / site.name for site in sites],
        evaluation_dir,
        seed=args.seed,
        public_dir=public,
        phrasing=site_phrasing,
        allow_training_patients=not held_out,
        compare=compare,
    )
    findings = site_knowledge_findings()
    site_knowledge = compared_table(result, findings)
    if site_knowledge is not None:
        console.print(site_knowledge)
        console.print(
            f"what only the sites know ({', '.join(findings)}; "
            "docs/PHANTOM_WORLD.md: the finding, the wording, the drawing): no public image or "
            "report shows it, so a gain of the release over the public-only model in these rows "
            "came through the federation; overlapping intervals mean no gain"
        )
    console.print(
        f"open {(release_dir / 'index.html').resolve()} in a browser (the release); its "
        f"evaluation, which stays at the sites, is {evaluation_dir / PAGE_NAME}"
    )
    return 0
