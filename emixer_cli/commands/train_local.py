"""`emixer train-local SITE`: one site, no federation, the same private step."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from rich.table import Table

from emixer_cli.common import (
    CONFIG_HELP,
    CommandError,
    command_config,
    console,
    progress_bars,
    state_dir,
)
from emixer_cli.logs import LOG_FILE, log_to_file


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
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
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument(
        "--state-dir",
        help="where the site's cache, accountant and ledger live "
        "(default ~/.emixer/state/<site>-<hash>; never inside the data folder)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emixer_model.privacy.policy import SitePolicy
    from emixer_model.site_training import train_site_round

    cfg = command_config(args)
    train = replace(cfg.train, epochs=args.epochs or cfg.train.epochs)
    privacy = cfg.privacy
    if args.epsilon_budget is not None:
        privacy = replace(privacy, epsilon_budget=args.epsilon_budget)
    cfg = replace(cfg, train=train, privacy=privacy)
    site = Path(args.site_dir)
    state = state_dir(args, site)
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
