"""The `emixer` command line: one entry point for site engineers, the coordinator and researchers.

Every command explains itself with --help. Errors a user can fix (bad config, bad folder, a site
over its budget) print one clear line and exit 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from emixer_model.config import ConfigError, EmixerConfig, load_config

console = Console()
EXIT_USAGE = 2


class CommandError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# helpers shared by commands


@contextmanager
def progress_bars(*labels: str) -> Iterator[list[Callable[..., None]]]:
    """One rich live display with a bar per label; yields update(done, total, losses=None) per
    bar (rich shows one live display at a time, so stages share it)."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:

        def updater(label: str) -> Callable[..., None]:
            task = progress.add_task(label, total=None, info="", start=False)

            def update(done: int, total: int, losses: dict[str, float] | None = None) -> None:
                info = "  ".join(f"{k} {v:.3f}" for k, v in (losses or {}).items())
                progress.start_task(task)
                progress.update(task, completed=done, total=total, info=info)

            return update

        yield [updater(label) for label in labels]


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[..., None]]:
    """A single rich progress bar; yields update(done, total, losses=None)."""
    with progress_bars(label) as (update,):
        yield update


def default_state_dir(site_dir: Path) -> Path:
    """A site's state lives outside its data folder (docs/DESIGN.md section 6)."""
    resolved = site_dir.resolve()
    tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    return Path.home() / ".emixer" / "state" / f"{resolved.name}-{tag}"


def site_config(args: argparse.Namespace) -> EmixerConfig:
    return load_config(getattr(args, "config", None))


# ---------------------------------------------------------------------------------------------
# commands


def cmd_phantoms(args: argparse.Namespace) -> int:
    from emixer_model.data.phantoms import write_phantom_sites, write_public_collection

    if args.public:
        try:
            out = write_public_collection(
                Path(args.out), n=args.per_site, seed=args.seed, size=args.size
            )
        except ValueError as err:
            raise CommandError(str(err)) from None
        console.print(f"wrote {out}")
        return 0
    sites = write_phantom_sites(
        Path(args.out),
        sites=args.sites,
        per_site=args.per_site,
        unlabeled=args.unlabeled,
        seed=args.seed,
        size=args.size,
    )
    for site in sites:
        console.print(f"wrote {site}")
    return 0


def cmd_public_convert_nih(args: argparse.Namespace) -> int:
    from emixer_model.data.public_convert import convert_nih

    result = convert_nih(Path(args.csv), Path(args.images), Path(args.out), limit=args.limit)
    for line, reason, detail in result.skipped[:10]:
        console.print(f"skipped line {line}: {reason}: {detail}")
    if len(result.skipped) > 10:
        console.print(f"... and {len(result.skipped) - 10} more skipped rows")
    console.print(
        f"wrote {result.written} studies to {result.out} ({result.linked} images hard-linked, "
        f"{result.written - result.linked} copied; {len(result.skipped)} rows skipped)"
    )
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from emixer_model.data.check import check_folder

    folder = Path(args.dir)
    if not folder.exists():
        raise CommandError(f"{folder} does not exist")
    report = check_folder(folder, resolution=args.resolution)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        report.render(console)
    return 0 if report.usable else EXIT_USAGE


def cmd_train_local(args: argparse.Namespace) -> int:
    from emixer_model.site_privacy import SitePolicy
    from emixer_model.site_training import train_site_round

    cfg = site_config(args)
    train = replace(cfg.train, epochs=args.epochs or cfg.train.epochs)
    privacy = cfg.privacy
    if args.epsilon_budget is not None:
        privacy = replace(privacy, epsilon_budget=args.epsilon_budget)
    cfg = replace(cfg, train=train, privacy=privacy)
    site = Path(args.site_dir)
    state = Path(args.state_dir) if args.state_dir else default_state_dir(site)
    log_path = log_to_file(state / LOG_FILE)
    console.print(f"site {site}  state {state}  budget epsilon {cfg.privacy.epsilon_budget}")
    console.print(f"Opacus' and pydicom's logs in {log_path}")
    with progress_bars("decoding", "training") as (load_progress, progress):
        result = train_site_round(
            site,
            state,
            cfg,
            None,
            server_round=1,
            planned_rounds=1,
            progress=progress,
            load_progress=load_progress,
            policy=SitePolicy(share_losses=True),  # the operator is the site; nothing leaves
        )
    if result.status != "trained":
        raise CommandError(result.message)
    table = Table(title="train-local", show_header=False)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("private steps", str(result.steps))
    table.add_row("epsilon (cumulative)", f"{result.epsilon:.3f} of budget {result.budget:.1f}")
    table.add_row("delta", f"{result.delta:.2e}")
    table.add_row("noise multiplier", f"{result.plan.noise_multiplier:.3f}")
    table.add_row("privacy unit", result.plan.privacy_unit)
    for name, value in result.losses.items():
        table.add_row(f"loss {name}", f"{value:.4f}")
    console.print(table)
    return 0


def public_pretrained_model(
    public_dir: Path, cfg: EmixerConfig, steps: int, warm_start: int, seed: int, out: Path
) -> Path:
    """Pretrain all four networks on a public collection WITHOUT privacy and save a round-0
    checkpoint that records the public source (name, content hash, steps). No site data."""
    from emixer_model.data.public import load_public
    from emixer_model.networks import get_weights
    from emixer_model.public_pretrain import pretrained_networks
    from server.checkpoint import Checkpoint, save_checkpoint

    bars = ("decoding", "report warm start", "pretraining")
    with progress_bars(*bars) as (load_bar, warm_bar, train_bar):
        public = load_public(public_dir, cfg.model, progress=load_bar)
        nets, result = pretrained_networks(
            public.images,
            public.labels,
            public.tokens,
            public.has_report,
            cfg,
            steps,
            warm_start,
            seed,
            warm_progress=warm_bar,
            progress=train_bar,
        )
    source = {
        **public.source(),
        "steps": steps,
        "report_warm_start_steps": warm_start,
        "privacy": "none: public data, no site data involved",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".pretrain-") as work:
        checkpoint = Checkpoint(
            server_round=0,
            arrays=get_weights(nets),
            ledger={"sites": {}},
            config=cfg.to_dict(),
            public_source=source,
        )
        save_checkpoint(Path(work), checkpoint).replace(out)
    console.print(
        f"pretrained on {public.name} ({len(public.images)} studies, {steps} steps, "
        f"{result['seconds']:.0f} s); skipped {len(public.skipped)} files"
    )
    return out


def cmd_pretrain(args: argparse.Namespace) -> int:
    from emixer_model.data.site import SiteDataError

    out = Path(args.out)
    if out.exists():
        raise CommandError(f"{out} exists; a pretrained model is never overwritten")
    try:
        public_pretrained_model(
            Path(args.public), site_config(args), args.steps, args.warm_start, args.seed, out
        )
    except SiteDataError as err:
        raise CommandError(str(err)) from None
    console.print(f"wrote {out}; start a federation from it with federation.initial_model")
    return 0


# The demo's own settings (a --config file replaces all of them): sized so the whole demo, public
# pretraining included, finishes in about 10 minutes on 2 CPU cores; the values come from
# bench/utility.py (see bench/README.md).
DEMO_ROUNDS, DEMO_EPOCHS = 5, 4
DEMO_MODEL = {"resolution": 32, "latent_dim": 32, "width": 16, "embed_dim": 64}
DEMO_TRAIN = {"dp_trainable": "top"}  # from the public model: top layers + norms under DP
DEMO_PUBLIC_STUDIES, DEMO_PRETRAIN_STEPS = 600, 600


def demo_config(args: argparse.Namespace) -> EmixerConfig:
    """The demo's config: the user's file (if any, else the demo's model, training choices and
    rounds) with --rounds and --epochs applied on top."""
    cfg = site_config(args)
    if not args.config:
        cfg = replace(
            cfg,
            model=replace(cfg.model, **DEMO_MODEL),
            train=replace(cfg.train, **DEMO_TRAIN),
        )
    rounds = args.rounds or (cfg.federation.rounds if args.config else DEMO_ROUNDS)
    epochs = args.epochs or (cfg.train.epochs if args.config else DEMO_EPOCHS)
    return replace(
        cfg,
        federation=replace(cfg.federation, rounds=rounds),
        train=replace(cfg.train, epochs=epochs),
    )


def cached_pretrained_model(out: Path, cfg: EmixerConfig, args: argparse.Namespace) -> Path:
    """The demo's public collection and its pretrained model, made once and reused: the key is
    everything the model depends on (collection seed and size, model and train config, steps).
    The report-grammar warm start takes half as many steps as the pretraining."""
    from emixer_model.data.phantoms import write_public_collection

    public = out / f"public-{args.public_studies}x{args.size}px-seed{args.seed}"
    if not (public / "studies.csv").is_file():
        write_public_collection(public, n=args.public_studies, seed=args.seed, size=args.size)
    steps, warm = args.pretrain_steps, args.pretrain_steps // 2
    key = json.dumps([public.name, cfg.model.__dict__, cfg.train.__dict__, steps], sort_keys=True)
    path = out / f"pretrained-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    if not path.is_file():
        public_pretrained_model(public, cfg, steps, warm, cfg.train.seed, path)
    return path


LOSS_COLUMNS = ("report", "d_real", "d_fake", "g")  # the losses a person watches


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


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from emixer_model.data.phantoms import write_phantom_sites
    from emixer_model.evaluation.evaluate import evaluate_release, summary_table
    from server.release import parse_conditions, release
    from server.release_sheet import write_index_html
    from server.simulation import simulate

    cfg = demo_config(args)
    out = Path(args.out)
    run_dir = out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    log_path = log_to_file(run_dir / LOG_FILE)
    data_dir = out / f"phantoms-{args.sites}sites-{args.per_site}x{args.size}px-seed{args.seed}"
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
    if args.pretrain_steps > 0:
        pretrained = cached_pretrained_model(out, cfg, args)
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
            progress=lambda done, total: update(done, total),
        )
    console.print(
        f"released {summary.count} pairs, release epsilon {summary.release_epsilon:.3f} "
        "(the maximum over sites)"
    )
    console.rule("5/5 evaluation against the phantom sites' real data")
    result = evaluate_release(
        release_dir,
        sites,
        [run_dir / "state" / site.name for site in sites],
        seed=args.seed,
        log=lambda message: console.print(f"[dim]{message}...[/dim]"),
    )
    write_index_html(release_dir)
    console.print(summary_table(result))
    console.print(f"open {(release_dir / 'index.html').resolve()} in a browser")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from server.release import parse_conditions, read_public_keys, release

    out = Path(args.out)
    with progress_bar("synthesizing") as update:
        summary = release(
            Path(args.model),
            out,
            per_label=args.per_label,
            conditions=parse_conditions(args.labels),
            seed=args.seed,
            formats=tuple(f.strip() for f in args.format.split(",") if f.strip()),
            budget=args.epsilon_budget,
            progress=lambda done, total: update(done, total),
            enrolled=read_public_keys([Path(p) for p in args.site_keys])
            if args.site_keys
            else None,
        )
    console.print(
        f"released {summary.count} synthetic image-report pairs to {summary.out} "
        f"(release epsilon {summary.release_epsilon:.3f}); open {summary.out / 'index.html'}"
    )
    return 0


def cmd_verify_release(args: argparse.Namespace) -> int:
    from server.release import read_public_keys, verify_release

    keys = read_public_keys([Path(p) for p in args.site_keys]) if args.site_keys else None
    result = verify_release(Path(args.dir), keys)
    table = Table(title=f"verified release {args.dir}")
    for column in ("site", "signed rounds", "epsilon (recomputed)", "delta", "accountant", "key"):
        table.add_column(column)
    for name, site in sorted(result["sites"].items()):
        table.add_row(
            name,
            str(len(site["signed"])),
            f"{site['epsilon']:.4f}",
            f"{site['delta']:.2e}",
            f"{site['accountant']} (opacus {site['opacus']})",
            "enrolled" if keys else "as in the manifest",
        )
    console.print(table)
    console.print(
        f"every signature verifies, every aggregated round is covered; release epsilon "
        f"{result['release_epsilon']:.4f}"
        + ("" if keys else " (pass --site-keys to check the keys against the sites' own)")
    )
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from emixer_model.site_privacy import SiteKey

    path = Path(args.out)
    if path.exists():
        raise CommandError(f"{path} already exists; a site key is never overwritten")
    SiteKey.generate(path)
    pub = path.with_name(path.name.removesuffix(".key") + ".pub")
    console.print(f"wrote {path} (keep it at this site) and {pub} (send it to the coordinator)")
    return 0


def cmd_app_hash(args: argparse.Namespace) -> int:
    from client.audit import app_hash

    print(app_hash())
    return 0


# ---------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emixer",
        description=(
            "EMIXER-FL: federated, differentially private chest X-ray image-report generation. "
            "Start with `emixer demo`; a hospital checks its folder with `emixer data check`."
        ),
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show other libraries' logs (Flower, Ray, Opacus, pydicom), DEBUG included; "
        f"without it they go to the command's {LOG_FILE}",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="the end-to-end demo: phantom hospitals -> federated DP training -> release -> "
        "evaluation",
        description="Generate phantom data for several simulated hospital sites, train EMIXER "
        "across them with Flower's simulation engine and per-site differential privacy (Opacus), "
        "print each site's privacy ledger, release synthetic image-report pairs behind the "
        "privacy gate and evaluate them against the phantom sites' real data. Re-running reuses "
        "the phantom data and writes a new run folder; nothing earlier is overwritten. Finishes "
        "in about 10 minutes on 2 CPU cores.",
    )
    p.add_argument("--sites", type=int, default=3, help="simulated hospital sites (3)")
    p.add_argument("--rounds", type=int, default=None, help=f"federated rounds ({DEMO_ROUNDS})")
    p.add_argument(
        "--epochs", type=int, default=None, help=f"local epochs per round ({DEMO_EPOCHS})"
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
        f"({DEMO_PRETRAIN_STEPS}; 0: no pretraining, sites start from random weights)",
    )
    p.add_argument("--config", help="YAML config (model/privacy/train/federation sections)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "phantoms",
        help="write phantom hospital site folders (fake chest X-ray DICOMs + reports)",
        description="Write deterministic phantom hospital folders: studies.csv, DICOM images with "
        "visible label-specific findings, reports, and unlabeled scans. No real patient data.",
    )
    p.add_argument("--out", required=True, help="folder to write site_1 ... site_N into")
    p.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    p.add_argument("--per-site", type=int, default=100, help="labeled studies per site (100)")
    p.add_argument("--unlabeled", type=int, default=20, help="unlabeled scans per site (20)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same files (0)")
    p.add_argument("--size", type=int, default=256, help="nominal image side in pixels (256)")
    p.add_argument(
        "--public",
        action="store_true",
        help="write one public phantom collection into --out instead (another look and label "
        "mix, PNG and DICOM, some reports missing; --per-site studies; for `emixer pretrain`)",
    )
    p.set_defaults(func=cmd_phantoms)

    public = sub.add_parser("public", help="build public pretraining collections").add_subparsers(
        dest="public_command", required=True, metavar="SUBCOMMAND"
    )
    p = public.add_parser(
        "convert-nih",
        help="NIH ChestX-ray14 (Data_Entry_2017.csv + PNGs) -> a public collection folder",
        description="Write a public collection (studies.csv with our finding columns, images/, "
        "source.json) from NIH ChestX-ray14. Labels only: reports are left empty. Effusion -> "
        "Pleural Effusion, Nodule/Mass -> Lung Lesion; Cardiomegaly, Consolidation, Pneumothorax, "
        "Edema, No Finding as named; other NIH findings are ignored. Images are hard-linked when "
        "possible, else copied. See docs/PUBLIC_DATA.md.",
    )
    p.add_argument("--csv", required=True, help="Data_Entry_2017.csv")
    p.add_argument("--images", required=True, help="folder holding the PNGs (searched below)")
    p.add_argument("--out", required=True, help="new folder to write the collection into")
    p.add_argument("--limit", type=int, default=None, help="convert at most N rows (all)")
    p.set_defaults(func=cmd_public_convert_nih)

    data = sub.add_parser("data", help="inspect site data").add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND"
    )
    p = data.add_parser(
        "check",
        help="what in a folder is usable, what is skipped and why",
        description="Scan a site folder (studies.csv + unlabeled/) or any folder of DICOM files. "
        "Prints files accepted and skipped by reason and label counts. Exit 0 when at least one "
        "file is usable, 2 otherwise. Nothing is written.",
    )
    p.add_argument("dir", help="site folder or folder of DICOM files")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--resolution", type=int, default=64, help="decode size to test (64)")
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser(
        "train-local",
        help="train on one site folder, no federation, same private step",
        description="Differentially private EMIXER training on one site folder: the same private "
        "step the federated run uses. Refuses to start when the run would pass the budget.",
    )
    p.add_argument("site_dir", help="site folder with studies.csv and/or unlabeled/")
    p.add_argument("--epochs", type=int, default=None, help="epochs (config train.epochs)")
    p.add_argument(
        "--epsilon-budget",
        type=float,
        default=None,
        help="the site's total epsilon budget (config privacy.epsilon_budget, default 10)",
    )
    p.add_argument("--config", help="YAML config (model/privacy/train/federation sections)")
    p.add_argument(
        "--state-dir",
        help="where the site's cache, accountant and ledger live "
        "(default ~/.emixer/state/<site>-<hash>; never inside the data folder)",
    )
    p.set_defaults(func=cmd_train_local)

    p = sub.add_parser(
        "release",
        help="synthetic image-report sets from a trained model, behind the privacy gate",
        description="Sample image-report pairs conditioned on each finding (and common "
        "combinations) and write DICOM Secondary Capture images, optional PNGs, reports.jsonl, "
        "manifest.json (model hash, config, every site's privacy history) and index.html. "
        "Refuses (exit 2, nothing written) a model whose signed privacy ledger is missing, does "
        "not verify, leaves an aggregated round uncovered, or is over budget once recomputed.",
    )
    p.add_argument("--model", required=True, help="checkpoint file (checkpoints/round-NNNN.pt)")
    p.add_argument("--out", required=True, help="new folder for the release")
    p.add_argument("--per-label", type=int, default=50, help="pairs per label condition (50)")
    p.add_argument(
        "--labels",
        help='conditions, comma-separated, + joins findings: "Cardiomegaly,Edema+Pleural '
        'Effusion" (default: every single finding and common combinations)',
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--format", default="dicom,png", help="dicom or dicom,png (dicom,png)")
    p.add_argument(
        "--epsilon-budget",
        type=float,
        default=None,
        help="refuse when any site's epsilon is above this (default: each site's own budget)",
    )
    p.add_argument(
        "--site-keys",
        nargs="+",
        help="the enrolled sites' public keys (SITE.pub files or a folder of them): every "
        "signed ledger entry must verify against its site's enrolled key",
    )
    p.set_defaults(func=cmd_release)

    p = sub.add_parser(
        "pretrain",
        help="coordinator: pretrain all four networks on a PUBLIC collection, no privacy",
        description="Train G, E, R and D without privacy on a public labeled chest X-ray "
        "collection in the site folder format (studies.csv; DICOM or PNG images; reports "
        "optional: missing ones are written from the labels by the public report grammar), "
        "after a warm start of the report decoder on the grammar. Writes a checkpoint that "
        "records the collection's name and content hash; start a federated run from it with "
        "federation.initial_model. Never point it at site data: nothing here is private.",
    )
    p.add_argument("--public", required=True, help="public collection folder (studies.csv)")
    p.add_argument("--out", required=True, help="checkpoint file to write (must not exist)")
    p.add_argument("--steps", type=int, default=600, help="pretraining steps (600)")
    p.add_argument(
        "--warm-start", type=int, default=150, help="report-grammar warm-start steps (150)"
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed (0)")
    p.add_argument("--config", help="YAML config (its model and train sections apply)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "verify-release",
        help="check a release's privacy offline: signatures, recomputed epsilon, round coverage",
        description="Verify every ledger entry in DIR/manifest.json against the site public keys "
        "(the manifest's, or --site-keys), recompute each site's epsilon with Opacus from its "
        "signed history, check that every aggregated round is covered and that the stated "
        "figures match. Prints each site's recomputed epsilon; exit 2 on any mismatch.",
    )
    p.add_argument("dir", help="release folder (holds manifest.json)")
    p.add_argument("--site-keys", nargs="+", help="SITE.pub files or a folder of them")
    p.set_defaults(func=cmd_verify_release)

    p = sub.add_parser(
        "keygen",
        help="site: make this site's ECDSA key pair (the private key never leaves the site)",
        description="Write a new ECDSA P-256 key pair: OUT (private, OpenSSH format, mode 0600: "
        "site.yaml's private_key, used for node authentication and to sign the privacy ledger) "
        "and OUT with .pub (send only this one to the coordinator). Never overwrites.",
    )
    p.add_argument("--out", required=True, help="private key file, e.g. keys/hospital-a.key")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser(
        "app-hash",
        help="print the hash of this app's code, to pin in a site's approved-app-hash",
        description="Print the sha256 of the installed app's code. A site puts it in site.yaml as "
        "approved-app-hash; the site daemon then refuses any other version.",
    )
    p.set_defaults(func=cmd_app_hash)

    from client.daemon import add_site_parser
    from emixer_model.audit import add_parser as add_audit_parser
    from emixer_model.evaluation.evaluate import add_parser as add_evaluate_parser
    from server.launch import add_server_parser

    add_evaluate_parser(sub)
    add_audit_parser(sub)
    add_server_parser(sub)
    add_site_parser(sub)
    return parser


LOG_FILE = "emixer.log"  # in a command's own folder: the demo's run folder, a site's state dir
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SCREEN = "emixer-libraries-on-screen"  # handler names, so a second main() call replaces them
_FILE = "emixer-log-file"


class _NotOurs(logging.Filter):
    """Records from other libraries (ours reach the screen through rich already)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("emixer")


def configure_logging(verbose: bool) -> None:
    """Make every command read like one tool: each log record takes exactly one path.

    Our own records ("emixer.*") go to the screen through rich. Every library's records (Flower,
    Ray, Opacus, pydicom, and Python warnings such as Ray's FutureWarnings) go to the command's
    log file once it opens one (`log_to_file`); until then only their warnings and errors show,
    and with --verbose everything shows, DEBUG included. Flower's own console handler and the
    root handler opacus installs when imported (`logging.basicConfig`) are removed, and Flower's
    records reach the root logger's handlers only: with both, every Flower line was printed
    twice, once coloured and once timestamped.
    """
    from flwr.common.logger import console_handler as flower_console
    from rich.logging import RichHandler

    logging.captureWarnings(True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        # opacus' basicConfig handler and ours from an earlier main(); test harness handlers stay
        if type(handler) is logging.StreamHandler or handler.get_name() in (_SCREEN, _FILE):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for chatty in ("PIL", "matplotlib"):  # per-chunk and font-cache DEBUG records nobody reads
        logging.getLogger(chatty).setLevel(logging.INFO)
    libraries = logging.StreamHandler(sys.stderr)
    libraries.set_name(_SCREEN)
    libraries.addFilter(_NotOurs())
    libraries.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    libraries.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.addHandler(libraries)
    flower = logging.getLogger("flwr")
    flower.removeHandler(flower_console)
    flower.propagate = True  # emixer_model/__init__.py turns it off for the app processes

    ours = logging.getLogger("emixer")
    if not ours.handlers:
        ours.addHandler(RichHandler(console=console, show_path=False, show_time=False))
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)


def log_to_file(path: Path) -> Path:
    """From now on every record (ours and the libraries') goes to `path`; without --verbose the
    libraries' records leave the screen entirely. Returns the path, for the command to print."""
    root = logging.getLogger()
    screen = next(h for h in root.handlers if h.get_name() == _SCREEN)
    verbose = screen.level <= logging.DEBUG
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.set_name(_FILE)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    for old in [h for h in root.handlers if h.get_name() == _FILE]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    if not verbose:
        screen.setLevel(logging.CRITICAL + 1)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    from emixer_model.data.site import SiteDataError
    from server.checkpoint import CheckpointError
    from server.launch import LaunchError
    from server.release import ReleaseRefused

    try:
        return args.func(args)
    except (
        CommandError,
        ConfigError,
        SiteDataError,
        CheckpointError,
        ReleaseRefused,
        LaunchError,
    ) as err:
        console.print(f"[red]error:[/red] {err}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
