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
    """A site's state lives outside its data folder (DESIGN.md section 6)."""
    resolved = site_dir.resolve()
    tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    return Path.home() / ".emixer" / "state" / f"{resolved.name}-{tag}"


def site_config(args: argparse.Namespace) -> EmixerConfig:
    return load_config(getattr(args, "config", None))


# ---------------------------------------------------------------------------------------------
# commands


def cmd_phantoms(args: argparse.Namespace) -> int:
    from emixer_model.data.phantoms import write_phantom_sites

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
    console.print(f"site {site}  state {state}  budget epsilon {cfg.privacy.epsilon_budget}")
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


DEMO_ROUNDS, DEMO_EPOCHS = 5, 4  # sized to finish in under 10 minutes on 2 CPU cores
DEMO_WARM_START = 150  # public report-decoder steps: loss ~7.4 -> ~1.1 in under a minute on CPU


def demo_config(args: argparse.Namespace) -> EmixerConfig:
    """The demo's config: the user's file (if any, else the demo's rounds, local epochs and
    public warm start) with --rounds and --epochs applied on top."""
    cfg = site_config(args)
    rounds = args.rounds or (cfg.federation.rounds if args.config else DEMO_ROUNDS)
    epochs = args.epochs or (cfg.train.epochs if args.config else DEMO_EPOCHS)
    warm = cfg.train.public_warm_start_steps if args.config else DEMO_WARM_START
    return replace(
        cfg,
        federation=replace(cfg.federation, rounds=rounds),
        train=replace(cfg.train, epochs=epochs, public_warm_start_steps=warm),
    )


LOSS_COLUMNS = ("report", "d_real", "d_fake", "g")  # the losses a person watches


def ledger_table(ledger: dict) -> Table:
    """Each site's cumulative privacy spend and its last round's mean losses."""
    table = Table(title="privacy ledger (per site, cumulative) and last round's losses")
    columns = ("site", "rounds", "epsilon", "delta", "budget", "unit", "status")
    for column in (*columns, *LOSS_COLUMNS):
        table.add_column(
            column, justify="left" if column in ("site", "unit", "status") else "right"
        )
    for name, site in sorted(ledger["sites"].items()):
        last = site["history"][-1].get("losses", {}) if site["history"] else {}
        table.add_row(
            name,
            str(len(site["history"])),
            f"{site['epsilon']:.3f}",
            f"{site['delta']:.1e}",
            f"{site['budget']:.1f}",
            site["privacy_unit"],
            site["status"],
            *(f"{last[k]:.3f}" if k in last else "-" for k in LOSS_COLUMNS),
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
    data_dir = out / f"phantoms-{args.sites}sites-{args.per_site}x{args.size}px-seed{args.seed}"
    if not (data_dir / "COMPLETE").is_file():
        console.rule("1/4 phantom hospitals")
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
    run_dir = out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    console.rule(f"2/4 federated DP training: {len(sites)} sites, {cfg.federation.rounds} rounds")
    console.print(f"run folder {run_dir}")
    ckpt = simulate(cfg, sites, run_dir / "state", run_dir / "checkpoints", verbose=args.verbose)
    console.print(ledger_table(ckpt.ledger))

    console.rule("3/4 synthetic release")
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
    console.rule("4/4 evaluation against the phantom sites' real data")
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
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs")
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
    p.set_defaults(func=cmd_phantoms)

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


def configure_logging(verbose: bool) -> None:
    """Our own log lines through rich; other libraries keep their handlers (Flower has its own),
    so nothing is printed twice and third-party chatter stays at warnings."""
    from rich.logging import RichHandler

    ours = logging.getLogger("emixer")
    if not ours.handlers:
        ours.addHandler(RichHandler(console=console, show_path=False, show_time=False))
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)


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
