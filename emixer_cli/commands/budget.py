"""`emixer budget STATE_DIR`: a site's privacy budget at a glance, read from its own state dir."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from emixer_cli.common import EXIT_USAGE, CommandError, console, messages_to_stderr

if TYPE_CHECKING:  # imported when the command runs, so --help stays fast
    from emixer_model.privacy.budget import BudgetReport


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "budget",
        help="privacy officer: epsilon spent per run and in total, what is left, ledger check",
        description="Read a site's state dir (site.yaml's state_dir, or train-local's "
        "--state-dir) and print: the cumulative epsilon at the site's delta against its "
        "budget; per run, its rounds, steps, sigma, q, the epsilon after it and the models it "
        "signed for; what the current plan spends next round and how many rounds of it still "
        "fit; every refused round or app version; and whether the site's own signed ledger "
        "verifies (signatures, numbering, history chain, the accountant agreeing). Offline, "
        "reads only, writes nothing. Exit 0 when the ledger verifies, 2 when it does not.",
        epilog="example: emixer budget /var/lib/emixer/site --json | jq .epsilon",
    )
    p.add_argument("state_dir", metavar="STATE_DIR", help="the site's state dir")
    p.add_argument("--json", action="store_true", help="print the same report as JSON")
    p.add_argument(
        "--site-key",
        metavar="SITE.pub",
        help="the site's public key to check the signatures with (default: the .pub beside "
        "the signing key the state dir's node-config.toml names, or its simulation key)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emixer_model.privacy.budget import read_budget

    key = None
    if args.site_key:
        path = Path(args.site_key)
        if not path.is_file():
            raise CommandError(f"--site-key {path} is not a file; give the site's .pub key")
        key = path.read_text().strip()
    if args.json:
        with messages_to_stderr():
            report = read_budget(Path(args.state_dir), key)
        print(json.dumps(report.as_dict(), indent=2))
    else:
        report = read_budget(Path(args.state_dir), key)
        render(report)
    return 0 if report.ledger_verifies else EXIT_USAGE


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"


def _numbers(values: list[float], fmt: str) -> str:
    return ", ".join(format(v, fmt) for v in values)


def render(report: BudgetReport) -> None:
    """The report as a privacy officer reads it: the total first, then runs, plan, refusals."""
    budget = f"{report.budget:.3f}" if report.budget is not None else "unknown"
    delta = f"{report.delta:.2e}" if report.delta is not None else "-"
    console.print(
        f"[bold]site {report.site or '?'}[/bold]  epsilon {report.epsilon:.3f} of budget "
        f"{budget} at delta {delta} ({report.accountant}); budget from {report.budget_source}; "
        f"last entry {_when(report.last_entry_time)}"
    )
    if report.runs:
        table = Table(title="trained runs")
        for column in ("run", "rounds", "steps", "sigma", "q", "epsilon after", "models signed"):
            table.add_column(column)
        for run in report.runs:
            table.add_row(
                run.run or "(local)",
                _numbers(run.rounds, "d"),
                str(run.steps),
                _numbers(run.noise_multipliers, ".3f"),
                _numbers(run.sample_rates, ".4f"),
                f"{run.epsilon_after:.3f}",
                ", ".join(sha[:12] or "(fresh)" for sha in run.models),
            )
        console.print(table)
    plan = report.plan
    if plan is not None:
        more = "at least " if plan.rounds_left_capped else ""
        console.print(
            f"plan: sigma {plan.noise_multiplier:.3f}, q {plan.sample_rate:.4f}, "
            f"{plan.steps_per_round} steps a round (planned for {plan.planned_rounds}); next "
            f"round takes epsilon to {plan.epsilon_after_next_round:.3f}; {more}"
            f"{plan.rounds_left} more rounds fit in the budget"
        )
    for refusal in report.refusals:
        what = refusal.get("message") or f"app {str(refusal.get('app', ''))[:12]}"
        console.print(
            f"refused {_when(refusal.get('time'))} run {refusal.get('run', '-')} round "
            f"{refusal.get('round', '-')}: {refusal['event']}: {what}"
        )
    for line in report.checks:
        console.print(f"[green]ok[/green] {line}")
    for line in report.problems:
        console.print(f"[red]does not verify:[/red] {line}")
    verdict = "VERIFIES" if report.ledger_verifies else "DOES NOT VERIFY"
    console.print(f"the site's own signed ledger {verdict}")
