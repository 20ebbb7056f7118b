"""`emixer evaluate`: the utility of a synthetic release against a site's real data, at the site."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

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
        "says when it is not distinguishable from chance. Writes RELEASE/evaluation.json and "
        "PNG figures in RELEASE/figures/. "
        "Only aggregates are written; real images and reports stay where they are.",
    )
    parser.add_argument("--release", required=True, help="release folder from `emixer release`")
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
        help="where each site's decoded-image cache lives, one per --real folder "
        "(default ~/.emixer/state/<site>-<hash>; never inside the data or release folder)",
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
        "--epochs",
        type=int,
        default=JUDGE_EPOCHS,
        help=f"training epochs over the real judge-train studies ({JUDGE_EPOCHS}); the "
        "train-on-synthetic and real + synthetic classifiers take the same number of steps. "
        "More is slower but makes the real-data classifier a sharper judge",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    release_dir = Path(args.release)
    real_dirs = [Path(p) for p in args.real]
    state_dirs = (
        [Path(p) for p in args.state_dir]
        if args.state_dir
        else [default_state_dir(p) for p in real_dirs]
    )
    result = evaluate_with_page(
        release_dir, real_dirs, state_dirs, args.seed, args.epochs, args.allow_training_patients
    )
    console.print(
        f"wrote {release_dir / 'evaluation.json'} and {len(result['figures'])} figures in "
        f"{release_dir / 'figures'}"
    )
    return 0


def evaluate_with_page(
    release_dir: Path,
    real_dirs: Sequence[Path],
    state_dirs: Sequence[Path],
    seed: int,
    epochs: int = JUDGE_EPOCHS,
    allow_training_patients: bool = False,
) -> dict:
    """Evaluate with progress lines, put the figures on the release page (when the folder has
    one) and print the summary table: `emixer evaluate` and the demo's last stage."""
    from emixer_model.evaluation.evaluate import evaluate_release, summary_table
    from server.tools.release_page import write_index_html

    result = evaluate_release(
        release_dir,
        real_dirs,
        state_dirs,
        seed=seed,
        epochs=epochs,
        log=lambda message: console.print(f"[dim]{message}...[/dim]"),
        allow_training_patients=allow_training_patients,
    )
    if (release_dir / "index.html").is_file():
        write_index_html(release_dir)
    console.print(summary_table(result))
    return result
