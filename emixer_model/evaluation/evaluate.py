"""`emixer evaluate`: score a synthetic release against a site's real data, at the site.

Questions answered (each a section of OUT/evaluation.json):
  label_fidelity          do synthetic images show their conditioning labels? (a classifier
                          trained on real images scores them)
  report_consistency      do synthetic reports state their labels? (the rule-based labeler)
  image_report_agreement  do a pair's image and report tell the same story?
  tstr                    is the release useful? train on synthetic, test on real; and the gain
                          of real + synthetic over real alone on the same held-out real images
  frechet                 how far are synthetic from real images in the classifier's features?
  text                    BLEU-4 / ROUGE-L against real reports, vocabulary, duplicates, copies
Every figure is {"value", "low", "high", "n", "n_means", "chance", "verdict"} from the scoring
library (evaluation/utility.py, also what bench/utility.py calls). Everything goes to the
evaluation's own folder at the site (evaluation.json, figures/, evaluation.html), never into the
release: these are statistics of real data (docs/PRIVACY.md invariant 4).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from emixer_model.config import FINDINGS, JUDGE_EPOCHS, ModelConfig, TrainConfig, from_dict
from emixer_model.data.dicom import SkipFile, decode_dicom
from emixer_model.data.public import load_public
from emixer_model.data.site import load_site
from emixer_model.data.splits import (
    SPLIT_FILE,
    EvaluationSplit,
    LabeledSet,
    load_split,
    split_labeled,
)
from emixer_model.evaluation import figures
from emixer_model.evaluation.bootstrap import CONFIDENCE, DEFAULT_RESAMPLES
from emixer_model.evaluation.page import write_evaluation_html
from emixer_model.evaluation.text_metrics import (
    ReferenceReports,
    copy_rate,
    distinct_tokens,
    duplicate_rate,
)
from emixer_model.evaluation.utility import (
    BOOTSTRAP_NOTE,
    Figure,
    Judge,
    Phrasing,
    Scores,
    SyntheticSet,
)
from emixer_model.shared import UserError, write_json_atomic
from emixer_model.text.vocabulary import BOS, EOS, PAD, UNK, encode_report

TEST_FRACTION = 0.2  # the ad hoc split's share when a site recorded none (and it is allowed)
MIN_REAL_IMAGES = 10  # fewer cannot give both a training set and a held-out test set
TRAINING_PATIENTS = "SCORED ON TRAINING PATIENTS"  # the label of every such figure
HELD_OUT_PATIENTS = "scored on the sites' recorded evaluation patients, held out before round 1"
GRID_IMAGES = 24
GRID_PER_LABEL_SET = 3
FRECHET_NOTE = (
    "FID-style, features of a locally trained classifier, not Inception (no pretrained weights "
    "can be downloaded here); comparable only between releases evaluated with the same site, "
    "seed and epochs"
)
PAPER_NOTE = (
    "EMIXER (Biswal et al. 2022) reports +5.94% classification performance from synthetic "
    "augmentation; augmentation_gain is the same comparison here (mean AUROC, real + synthetic "
    "minus real, on the same held-out real images)"
)


class EvaluationError(UserError, ValueError):
    """A release or real-data input the evaluation cannot use; the message says what and where."""


@dataclass
class SyntheticRelease:
    images: torch.Tensor  # [N,1,R,R] in [-1,1]
    labels: torch.Tensor  # [N,L] conditioning labels, multi-hot in FINDINGS order
    reports: list[str]
    manifest: dict
    model_cfg: ModelConfig


@dataclass
class RealData:
    """Labeled real studies of one or more site folders: each site's recorded evaluation
    patients (held out before round 1) and the rest, and every report for the text figures."""

    train: LabeledSet  # training-side patients: what the judge learns from
    heldout: LabeledSet  # evaluation patients: what every real-data figure is scored on
    tokens: torch.Tensor  # [N,S,W] every labeled report in the fixed vocabulary
    labels: torch.Tensor  # [N,L] their labels
    sites: int
    skipped: int
    on_training_patients: bool  # a site had no recorded split: its held-out side was trained on


def _labels_vector(names: Sequence[str], where: str) -> np.ndarray:
    unknown = [n for n in names if n not in FINDINGS]
    if unknown:
        raise EvaluationError(
            f"{where}: unknown finding {unknown[0]!r}; known: {', '.join(FINDINGS)}"
        )
    return np.array([f in names for f in FINDINGS], dtype=np.float32)


def _read_manifest(release_dir: Path) -> tuple[dict, ModelConfig]:
    path = release_dir / "manifest.json"
    if not path.is_file():
        raise EvaluationError(
            f"{release_dir} has no manifest.json: is it a folder written by `emixer release`?"
        )
    try:
        manifest = json.loads(path.read_text())
        model_section = manifest["config"]["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise EvaluationError(
            f"{path} is not a release manifest (needs config.model.resolution): {err}"
        ) from None
    return manifest, from_dict(ModelConfig, model_section, "manifest config.model.")


def load_release(release_dir: Path) -> SyntheticRelease:
    """Read manifest.json, reports.jsonl and every listed DICOM, or say exactly what is wrong."""
    if not release_dir.is_dir():
        raise EvaluationError(f"release folder {release_dir} does not exist")
    manifest, model_cfg = _read_manifest(release_dir)
    reports_path = release_dir / "reports.jsonl"
    if not reports_path.is_file():
        raise EvaluationError(f"{release_dir} has no reports.jsonl (the list of synthetic pairs)")
    root = release_dir.resolve()
    images, labels, reports = [], [], []
    for number, line in enumerate(reports_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{reports_path.name} line {number}"
        try:
            row = json.loads(line)
            dicom, names, report = row["dicom"], row["labels"], row["report"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EvaluationError(
                f"{where} is not a JSON object with dicom, labels and report"
            ) from None
        path = (release_dir / dicom).resolve()
        if not path.is_relative_to(root):
            raise EvaluationError(f"{where}: {dicom} points outside the release folder")
        if not path.is_file():
            raise EvaluationError(f"{where} lists {dicom} but that file is missing")
        try:
            images.append(decode_dicom(path, model_cfg.resolution).pixels)
        except SkipFile as err:
            raise EvaluationError(f"{where}: {dicom} cannot be read: {err.detail}") from None
        labels.append(_labels_vector(names, where))
        reports.append(str(report))
    if not images:
        raise EvaluationError(f"{reports_path} lists no synthetic pairs")
    return SyntheticRelease(
        images=torch.from_numpy(np.stack(images)).unsqueeze(1),
        labels=torch.from_numpy(np.stack(labels)),
        reports=reports,
        manifest=manifest,
        model_cfg=model_cfg,
    )


def no_split_message(site_dir: Path, state_dir: Path) -> str:
    return (
        f"{state_dir} records no evaluation split, so the release's generator may have trained "
        f"on every patient of {site_dir} and scoring on them would flatter it. Train with a "
        "held-out fraction (holdout_fraction in site.yaml or the run config, e.g. 0.2): the "
        "site then holds its evaluation patients out before round 1 and records them in "
        f"{state_dir / SPLIT_FILE}. Or pass --allow-training-patients to score anyway, every "
        "figure labelled as scored on training patients"
    )


def load_real(
    site_dirs: Sequence[Path],
    state_dirs: Sequence[Path],
    model_cfg: ModelConfig,
    uncertain_as: str,
    seed: int,
    allow_training_patients: bool = False,
) -> RealData:
    """Load every site folder at the release's resolution and split it as its state dir records:
    exactly the recorded evaluation units are held out. A site without a record is refused, or
    with allow_training_patients split ad hoc (TEST_FRACTION of its units, by the same splitter)."""
    trains, heldouts, tokens, labels = [], [], [], []
    skipped = 0
    adhoc = False
    for number, (site_dir, state_dir) in enumerate(zip(site_dirs, state_dirs, strict=True)):
        site = load_site(site_dir, state_dir, model_cfg, uncertain_as)
        split = load_split(state_dir)
        if split is None:
            if not allow_training_patients:
                raise EvaluationError(no_split_message(site_dir, state_dir))
            split, adhoc = EvaluationSplit.choose(site, TEST_FRACTION, seed), True
        train, heldout = split_labeled(site, split, f"{number}:{site_dir.name}")
        if len(heldout.images) == 0 and split.recorded is not None:
            raise EvaluationError(
                f"the evaluation split recorded in {split.recorded} names none of the labeled "
                f"studies of {site_dir}: is {state_dir} this site's state dir?"
            )
        trains.append(train)
        heldouts.append(heldout)
        tokens.append(site.tokens)
        labels.append(site.labels)
        skipped += len(site.skipped)
    real = RealData(
        LabeledSet.concat(trains),
        LabeledSet.concat(heldouts),
        torch.cat(tokens),
        torch.cat(labels),
        len(site_dirs),
        skipped,
        adhoc,
    )
    if len(real.labels) < MIN_REAL_IMAGES:
        raise EvaluationError(
            f"the real site folder(s) give {len(real.labels)} usable labeled studies; the "
            f"evaluation needs at least {MIN_REAL_IMAGES} (to train its classifier and to test "
            "it on held-out patients). Run `emixer data check SITE` to see what was skipped."
        )
    if len(real.train.images) == 0 or len(real.heldout.images) == 0:
        raise EvaluationError(
            f"{len(real.train.images)} labeled studies on the training side and "
            f"{len(real.heldout.images)} held out: the evaluation needs both"
        )
    return real


def label_training_patients(result: dict) -> None:
    """Prefix every figure's verdict (any dict with a verdict and an n) with TRAINING_PATIENTS."""
    for value in result.values():
        if isinstance(value, dict):
            if "verdict" in value and "n" in value:
                value["verdict"] = f"{TRAINING_PATIENTS}; {value['verdict']}"
            else:
                label_training_patients(value)


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return _round(np.mean(defined)) if defined else None


def report_word_ids(tokens: np.ndarray) -> tuple[int, ...]:
    """Word ids of a report [S,W], flattened, without PAD/BOS/EOS: what text metrics compare."""
    return tuple(int(t) for t in np.asarray(tokens).reshape(-1) if t not in (PAD, BOS, EOS))


def text_statistics(
    synthetic_reports: Sequence[str],
    synthetic_labels: np.ndarray,
    real_tokens: np.ndarray,
    real_labels: np.ndarray,
    model_cfg: ModelConfig,
) -> dict:
    """BLEU-4, ROUGE-L, vocabulary, duplicate and copy rates of synthetic vs real reports."""
    synthetic = [
        report_word_ids(encode_report(text, model_cfg.max_sentences, model_cfg.max_words))
        for text in synthetic_reports
    ]
    real = [report_word_ids(t) for t in real_tokens]
    real_groups: dict[frozenset, list[tuple[int, ...]]] = {}
    for report, row in zip(real, real_labels > 0.5, strict=True):
        real_groups.setdefault(frozenset(np.flatnonzero(row)), []).append(report)
    references = {key: ReferenceReports(group) for key, group in real_groups.items()}
    bleu, rouge = [], []
    unmatched = set()
    for report, row in zip(synthetic, synthetic_labels > 0.5, strict=True):
        key = frozenset(np.flatnonzero(row))
        if key not in references:
            unmatched.add(key)
            continue
        bleu.append(references[key].bleu4(report))
        rouge.append(references[key].rouge_l(report))
    method = (
        "each synthetic report is scored against all real reports with exactly the same positive "
        "label set; synthetic reports whose label set no real report has are left out"
    )
    return {
        "normalisation": "both sides as the model sees text: encoded with the fixed vocabulary "
        f"({model_cfg.max_sentences} sentences x {model_cfg.max_words} words), compared as word "
        "ids; unknown words count as one <unk> word",
        "bleu4": {
            "mean": _mean(bleu),
            "method": "sentence-level multi-reference BLEU-4 with BLEU+1 smoothing, averaged "
            "over synthetic reports; " + method,
        },
        "rouge_l": {
            "mean": _mean(rouge),
            "method": "ROUGE-L F1 against the best-matching reference, averaged; " + method,
        },
        "scored_reports": len(bleu),
        "label_sets_without_real_reports": len(unmatched),
        "distinct_words": {
            "synthetic": distinct_tokens([[t for t in r if t != UNK] for r in synthetic]),
            "real": distinct_tokens([[t for t in r if t != UNK] for r in real]),
        },
        "copy_rate": _round(copy_rate(synthetic, real)),
        "copy_rate_means": "share of synthetic reports identical to a real report of this site: "
        "a memorisation signal, expected near the rate at which real reports repeat each other",
        "real_duplicate_rate": _round(duplicate_rate(real)),
    }


def _sample_grid(path: Path, release: SyntheticRelease) -> Path:
    """Up to GRID_IMAGES synthetic images, a few per label set, titled with their labels."""
    shown: dict[tuple[str, ...], int] = {}
    chosen = []
    for index, row in enumerate(release.labels.numpy() > 0.5):
        key = tuple(f for f, on in zip(FINDINGS, row, strict=True) if on)
        if shown.get(key, 0) < GRID_PER_LABEL_SET and len(chosen) < GRID_IMAGES:
            shown[key] = shown.get(key, 0) + 1
            chosen.append((index, " + ".join(key) or "(no label)"))
    indices = [i for i, _ in chosen]
    return figures.image_grid(
        path, release.images[indices, 0].numpy(), [caption for _, caption in chosen]
    )


def _figures(entries: dict[str, Figure]) -> dict[str, dict]:
    return {name: figure.as_dict() for name, figure in entries.items()}


def _judge_figures(scores: Scores, prefix: str) -> dict:
    """One judge's figures ("" the CNN, "linear_" the second judge): its own AUROC on held-out
    real images, its label fidelity, the fidelity's share of its lift, and per finding."""
    fig, per_label = scores.figures, scores.per_label
    return {
        "real_heldout_auroc": fig[f"{prefix}real_heldout_auroc"].as_dict(),
        "mean_auroc": fig[f"{prefix}label_fidelity"].as_dict(),
        "lift_fraction": fig[f"{prefix}fidelity_lift_fraction"].as_dict(),
        "per_label": _figures(per_label[f"{prefix}label_fidelity"]),
        "real_per_label": _figures(per_label[f"{prefix}real_heldout_auroc"]),
    }


COMPARED = ("label_fidelity", "linear_label_fidelity", "report_label_f1", "phrasing_share")


def compared_figures(scores: Scores) -> dict[str, dict]:
    """The per-finding figures two models are compared by (those the scores have)."""
    return {key: _figures(scores.per_label[key]) for key in COMPARED if key in scores.per_label}


def score_sections(scores: Scores) -> dict:
    """The evaluation.json sections of the library's figures, each with its method in words."""
    fig, per_label = scores.figures, scores.per_label
    return {
        "label_fidelity": {
            "method": "a CNN trained on the training-side real patients (the judge) scores each "
            "synthetic image; AUROC against the labels the image was generated for, mean over "
            "findings where both classes occur; lift_fraction = (fidelity - 0.5) / (judge's real "
            "held-out AUROC - 0.5), 1 meaning the images carry their labels as well as real ones",
            **_judge_figures(scores, ""),
            "second_judge": {
                "method": "the same figures from a judge of another family: logistic regression "
                "on 16x16 average-pooled pixels, trained on the same patients and steps. G is "
                "rewarded through D's convolutional finding head, so a fidelity only the CNN saw "
                "could be an artefact of that reward; one this linear reader sees too is not",
                **_judge_figures(scores, "linear_"),
            },
        },
        "report_consistency": {
            "method": "rule-based labeler on each synthetic report vs its conditioning labels; "
            "positive = stated positive or uncertain; macro F1 over findings either side has; "
            "chance = the F1 of reports independent of their labels at the same positive rates",
            "macro_f1": fig["report_label_f1"].as_dict(),
            "per_label": _figures(per_label["report_label_f1"]),
        },
        "image_report_agreement": {
            "method": "per pair: the judge on the image (probability > 0.5) vs the labeler on the "
            "report (positive or uncertain); Cohen's kappa per finding, mean over findings "
            "where either side varies. Chance-corrected: pairs where both sides say nothing add "
            "no agreement, and reports that never state a finding score 0",
            "kappa": fig["image_report_kappa"].as_dict(),
            "per_label": _figures(per_label["image_report_kappa"]),
        },
        "tstr": tstr_section(scores),
        "frechet": {"distance": fig["frechet"].as_dict(), "note": FRECHET_NOTE},
    }


# the train-on-... rows: (key in the json, key of the library's figure and per-label figures)
TRAINED_ON = (
    ("real", "real_heldout_auroc"),
    ("public", "public_auroc"),
    ("synthetic", "tstr_auroc"),
    ("real_plus_synthetic", "real_plus_synthetic_auroc"),
)


def tstr_section(scores: Scores) -> dict:
    """Classifiers trained on real (the ceiling), public (the floor, when a public collection
    was given), synthetic and real + synthetic, tested on the same held-out patients."""
    fig, per_label = scores.figures, scores.per_label
    rows = [(key, name) for key, name in TRAINED_ON if name in fig]
    section = {
        "method": "classifiers with the same architecture, seed and number of optimiser steps, "
        "trained on the training-side real patients (train-on-real, the ceiling), on the public "
        "collection alone (train-on-public, when given: what free data gives), on the release's "
        "synthetic pairs (TSTR) and on real + synthetic, all tested on the same held-out "
        "patients; mean AUROC over findings defined there. Ratio and differences are paired: "
        "each resample draws one set of held-out patients for both sides",
        "mean_auroc": {key: fig[name].as_dict() for key, name in rows},
        "ratio": fig["tstr_ratio"].as_dict(),
        "augmentation_gain": fig["augmentation_gain"].as_dict(),
        "per_label": {key: _figures(per_label[name]) for key, name in rows},
        "paper_reference": PAPER_NOTE,
    }
    if "tstr_minus_public" in fig:
        section["synthetic_minus_public"] = fig["tstr_minus_public"].as_dict()
    return section


def write_figures(out_dir: Path, release: SyntheticRelease, result: dict) -> list[Path]:
    figure_dir = out_dir / "figures"
    tstr = result["tstr"]
    per_real = tstr["per_label"]["real"]
    per_fidelity = result["label_fidelity"]["per_label"]
    per_linear = result["label_fidelity"]["second_judge"]["per_label"]
    return [
        figures.grouped_bars(
            figure_dir / "label_auroc.png",
            "Does the real-trained classifier see each label? (95% intervals)",
            FINDINGS,
            {
                "held-out real images": [per_real[f] for f in FINDINGS],
                "synthetic images vs their conditioning": [per_fidelity[f] for f in FINDINGS],
                "synthetic, second (linear) judge": [per_linear[f] for f in FINDINGS],
            },
            "AUROC",
            reference_line=0.5,
        ),
        figures.grouped_bars(
            figure_dir / "tstr.png",
            "Held-out real images: mean AUROC\nby training data (95% intervals)",
            [key.replace("_", " ").replace("plus", "+") for key in tstr["mean_auroc"]],
            {"mean AUROC": list(tstr["mean_auroc"].values())},
            "mean AUROC",
            reference_line=0.5,
        ),
        figures.training_curves(
            figure_dir / "training_curves.png",
            (release.manifest.get("privacy") or {}).get("sites") or {},
        ),
        _sample_grid(figure_dir / "synthetic_samples.png", release),
    ]


def evaluate_release(
    release_dir: Path,
    real_dirs: Sequence[Path],
    state_dirs: Sequence[Path],
    out_dir: Path,
    seed: int = 0,
    epochs: int = JUDGE_EPOCHS,
    log: Callable[[str], None] = lambda message: None,
    resamples: int = DEFAULT_RESAMPLES,
    allow_training_patients: bool = False,
    findings: Sequence[str] = FINDINGS,
    public_dir: Path | None = None,
    phrasing: Phrasing | None = None,
    compare: Mapping[str, SyntheticSet] | None = None,
) -> dict:
    """Run every evaluation and write out_dir/evaluation.json, figures/ and evaluation.html (the
    per-finding rows for `findings`); return the result. Nothing is written to the release.
    With `public_dir` (a public collection, the format `emixer pretrain` reads), a classifier
    trained on it alone is the train-on-public baseline beside train-on-real and TSTR. With
    `phrasing` (report, finding) -> bool, per finding the share of synthetic reports that use it.
    `compare` names other models' pairs drawn for the release's conditions (the public model's,
    say): the same judge scores them, and "compared" holds their per-finding figures beside the
    release's, so what the sites added is read on the same held-out patients.

    The judge trains on the sites' training-side patients and is tested on their recorded
    evaluation patients, which no generator trained on: the synthetic images are scored by a
    judge that never saw the test patients, and train-on-synthetic competes with train-on-real
    on patients neither saw. Training the judge on the generator's training patients is fine:
    the judge is not the generator, and the test patients stay unseen by both.
    """
    if epochs < 1:
        raise EvaluationError("--epochs must be at least 1")
    if Path(out_dir).resolve().is_relative_to(Path(release_dir).resolve()):
        raise EvaluationError(
            f"--out {out_dir} is inside the release {release_dir}: an evaluation holds "
            "statistics of this site's real data and is never part of a release; choose a "
            "folder at the site"
        )
    unknown = [f for f in findings if f not in FINDINGS]
    if unknown:
        raise EvaluationError(f"unknown finding {unknown[0]!r}; known: {', '.join(FINDINGS)}")
    if len(state_dirs) != len(real_dirs):
        raise EvaluationError(
            f"give one --state-dir per --real folder ({len(real_dirs)}), not {len(state_dirs)}"
        )
    log("reading the release")
    release = load_release(release_dir)
    train_section = release.manifest["config"].get("train") or {}
    uncertain_as = train_section.get("uncertain_as", TrainConfig().uncertain_as)
    log("loading the real site data")
    real = load_real(
        real_dirs, state_dirs, release.model_cfg, uncertain_as, seed, allow_training_patients
    )
    public = None
    if public_dir is not None:
        log("loading the public collection (the train-on-public baseline)")
        collection = load_public(Path(public_dir), release.model_cfg)
        units = np.array([f"public/{i}" for i in range(len(collection.images))], dtype=object)
        public = LabeledSet(collection.images, collection.labels, units)
    log(f"training the judge on the training-side patients ({epochs} epochs)")
    judge = Judge.fit(real.train, real.heldout, epochs, seed, resamples, public)
    log("scoring the release; training on synthetic, and on real + synthetic")
    synthetic = SyntheticSet(release.images, release.labels, release.reports)
    scores = judge.score(synthetic, phrasing=phrasing)
    result: dict = {
        "release": {
            "folder": str(Path(release_dir).resolve()),
            "model_sha256": release.manifest["model"]["sha256"],
            "round": release.manifest["model"]["round"],
        },
        "inputs": {
            "synthetic_pairs": len(release.reports),
            "real_sites": real.sites,
            "real_studies": len(real.labels),
            "real_train": len(real.train.images),
            "real_test": len(real.heldout.images),
            "real_test_units": judge.heldout_resampler.units,
            "public_studies": None if public is None else len(public.images),
            "scored_on": f"{TRAINING_PATIENTS} (a site recorded no evaluation split: the "
            "generator trained on them)"
            if real.on_training_patients
            else HELD_OUT_PATIENTS,
            "real_files_skipped": real.skipped,
            "resolution": release.model_cfg.resolution,
            "uncertain_as": uncertain_as,
            "seed": seed,
            "epochs": epochs,
            "classifier_steps": judge.steps,
            "bootstrap": {
                "resamples": resamples,
                "confidence": CONFIDENCE,
                "method": BOOTSTRAP_NOTE,
            },
        },
    }
    result |= score_sections(scores)
    if compare:
        log(f"scoring {', '.join(compare)} with the same judge")
        result["compared"] = {
            "method": "per finding, each model's pairs for the release's conditions, scored by "
            "the same judges on the same held-out patients; 'release' is this release",
            "models": {
                **{
                    name: compared_figures(
                        judge.score(pairs, train_on_synthetic=False, phrasing=phrasing)
                    )
                    for name, pairs in compare.items()
                },
                "release": compared_figures(scores),
            },
        }
    if phrasing is not None:
        result["phrasing"] = {
            "method": f"per finding, the share of synthetic reports conditioned on it for which "
            f"{getattr(phrasing, '__name__', 'the predicate')}(report, finding) holds; "
            "resampled by pair",
            "per_label": _figures(scores.per_label["phrasing_share"]),
        }
    log("text statistics")
    result["text"] = text_statistics(
        release.reports,
        release.labels.numpy(),
        real.tokens.numpy(),
        real.labels.numpy(),
        release.model_cfg,
    ) | {
        "duplicate_rate": scores.figures["duplicate_rate"].as_dict(),
        "distinct_reports": scores.figures["distinct_reports"].as_dict(),
    }
    if real.on_training_patients:
        label_training_patients(result)
    log("drawing figures")
    written = write_figures(out_dir, release, result)
    result["figures"] = [p.relative_to(out_dir).as_posix() for p in written]
    result = {
        # docs/PRIVACY.md invariant 4: statistics of real data, not DP-protected
        "site_local": True,
        "note": "statistics of this site's real data (not differentially private): keep this "
        "folder at the site; it is not part of a release unless the site chooses to publish it",
        **result,
    }
    write_json_atomic(out_dir / "evaluation.json", result)
    write_evaluation_html(out_dir, result, findings)
    return result
