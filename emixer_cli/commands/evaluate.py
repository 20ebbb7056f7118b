"""`emixer evaluate`: the utility of a synthetic release against a site's real data, at the site."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emixer_cli.common import console, default_state_dir
from emixer_model.config import JUDGE_EPOCHS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="utility of a synthetic release against a site's real data (run at the site)",
        description="Score a synthetic release (from `emixer release`) against real labeled "
        "studies of this site, on the patients the site held out before round 1 (recorded in its "
        "state dir; the judge trains on the others): do synthetic images show their labels (a "
        "small CNN, the judge), do synthetic reports state them (the rule-based labeler), do image "
        "and report agree, does training on synthetic data help (train-on-synthetic/test-on-real "
        "and real + synthetic vs real alone on the same held-out real images), a Frechet distance "
        "on the classifier's features, and BLEU-4/ROUGE-L, vocabulary, duplicate and copy rates "
        "of the reports. Every figure comes with a bootstrap 95%% interval (held-out studies "
        "resampled by patient, synthetic pairs one by one), its sample size, and a verdict that "
        "says when it is not distinguishable from chance. Writes evaluation.json, PNG figures and "
        "evaluation.html in OUT, a folder of the site's own: never in the release (these are "
        "statistics of real data).",
    )
    parser.add_argument("--release", required=True, help="release folder from `emixer release`")
    parser.add_argument(
        "--out",
        required=True,
        help="folder at the site for evaluation.json, figures/ and evaluation.html "
        "(never inside the release)",
    )
    parser.add_argument(
        "--real",
        required=True,
        nargs="+",
        metavar="SITE_DIR",
        help="one or more site folders (studies.csv + DICOM files) to compare against; "
        "several folders are pooled",
    )
    parser.add_argument(
        "--state-dir",
        nargs="+",
        metavar="DIR",
        help="each site's state dir, one per --real folder: its decoded-image cache and the "
        "evaluation split it recorded before round 1 (default ~/.emixer/state/<site>-<hash>; "
        "never inside the data or release folder)",
    )
    parser.add_argument(
        "--allow-training-patients",
        action="store_true",
        help="score a site whose state dir records no evaluation split (trained without "
        "holdout_fraction) on an ad hoc 20%% of its patients, which the generator trained on; "
        "every figure is then labelled as scored on training patients",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of every classifier (and of an ad hoc split) (0)"
    )
    parser.add_argument(
        "--public",
        metavar="DIR",
        help="a public collection (the folder `emixer pretrain` reads): a classifier trained on "
        "it alone is the train-on-public baseline, the floor a release must beat",
    )
    parser.add_argument(
        "--focus-findings",
        metavar="A,B",
        help="findings to show one row each for in the per-finding table (default: every "
        "finding; evaluation.json always holds all)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=JUDGE_EPOCHS,
        help=f"training epochs over the real judge-train studies ({JUDGE_EPOCHS}); the "
        "train-on-synthetic and real + synthetic classifiers take the same number of steps. "
        "More is slower but makes the real-data classifier a sharper judge",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    real_dirs = [Path(p) for p in args.real]
    state_dirs = (
        [Path(p) for p in args.state_dir]
        if args.state_dir
        else [default_state_dir(p) for p in real_dirs]
    )
    findings = [f.strip() for f in args.focus_findings.split(",")] if args.focus_findings else None
    evaluate_and_print(
        Path(args.release),
        real_dirs,
        state_dirs,
        Path(args.out),
        seed=args.seed,
        epochs=args.epochs,
        allow_training_patients=args.allow_training_patients,
        public_dir=Path(args.public) if args.public else None,
        **({"findings": findings} if findings else {}),
    )
    return 0


def evaluate_and_print(
    release_dir: Path,
    real_dirs: Sequence[Path],
    state_dirs: Sequence[Path],
    out_dir: Path,
    **options: Any,
) -> dict:
    """Evaluate with progress lines (options: evaluate_release's keywords), print the tables and
    where the evaluation went: `emixer evaluate` and the demo's last stage."""
    from emixer_model.config import FINDINGS
    from emixer_model.evaluation.evaluate import evaluate_release
    from emixer_model.evaluation.page import PAGE_NAME
    from emixer_model.evaluation.tables import rich_tables

    result = evaluate_release(
        release_dir,
        real_dirs,
        state_dirs,
        out_dir,
        log=lambda message: console.print(f"[dim]{message}...[/dim]"),
        **options,
    )
    for table in rich_tables(result, options.get("findings", FINDINGS)):
        console.print(table)
    console.print(
        f"wrote evaluation.json, {PAGE_NAME} and {len(result['figures'])} figures to {out_dir} "
        "(statistics of real data: they stay at the site)"
    )
    return result
