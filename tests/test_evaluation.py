"""`emixer evaluate`: metrics checked against hand-computed values, and the whole command on
phantom releases, where a faithful release must score clearly better than a label-shuffled one."""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from emixer_cli.commands.evaluate import add_parser
from emixer_model.config import FINDINGS, ModelConfig
from emixer_model.data.site import load_site
from emixer_model.data.splits import (
    SPLIT_FILE,
    EvaluationSplit,
    SplitError,
    choose_held_out,
    create_or_load_split,
    load_split,
    split_labeled,
    training_data,
    unit_files,
)
from emixer_model.evaluation.evaluate import (
    HELD_OUT_PATIENTS,
    TRAINING_PATIENTS,
    EvaluationError,
    evaluate_release,
)
from emixer_model.evaluation.image_metrics import (
    accuracy,
    auroc,
    average_ranks,
    f1_score,
    frechet_distance,
)
from emixer_model.evaluation.tables import FIGURE_TABLES, figure_tables, finding_table, lookup
from emixer_model.evaluation.text_metrics import (
    ReferenceReports,
    copy_rate,
    distinct_tokens,
    duplicate_rate,
)

# ---------------------------------------------------------------------------------------------
# metrics


def test_auroc_perfect_reversed_and_ties():
    targets = np.array([0, 0, 1, 1])
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), targets) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), targets) == 0.0
    assert auroc(np.full(4, 0.5), targets) == 0.5
    # one tie across classes out of four positive-negative pairs: (3 + 0.5) / 4
    assert auroc(np.array([0.1, 0.5, 0.5, 0.9]), targets) == 0.875


def test_auroc_undefined_with_one_class():
    assert auroc(np.array([0.1, 0.9]), np.array([1, 1])) is None
    assert auroc(np.array([0.1, 0.9]), np.array([0, 0])) is None


def test_average_ranks_share_ties():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4, 1, 4, 2, 4]


def test_f1_and_accuracy_hand_computed():
    predicted = np.array([1, 1, 0, 0, 1], dtype=bool)
    targets = np.array([1, 0, 1, 0, 1], dtype=bool)
    # tp 2, fp 1, fn 1 -> 2*2 / (2*2 + 2)
    assert f1_score(predicted, targets) == pytest.approx(4 / 6)
    assert accuracy(predicted, targets) == pytest.approx(3 / 5)
    assert f1_score(np.zeros(3, bool), np.zeros(3, bool)) is None


def test_frechet_zero_for_identical_and_grows_with_shift():
    features = np.random.default_rng(0).normal(size=(400, 6))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)
    # a mean shift of s in every dimension adds exactly D * s^2
    assert frechet_distance(features, features + 1.0) == pytest.approx(6.0)
    assert frechet_distance(features, features + 2.0) == pytest.approx(24.0)
    # doubling: means m and 2m add |m|^2; covariances C and 4C add tr(C) + 4tr(C) - 2*2tr(C)
    expected = np.trace(np.cov(features, rowvar=False)) + np.sum(features.mean(0) ** 2)
    assert frechet_distance(features, 2.0 * features) == pytest.approx(expected, rel=1e-6)


def test_frechet_refuses_mismatched_features():
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


CAT = "the cat sat on the mat".split()
CAT_REF = "the cat is on the mat".split()


def test_bleu4_hand_computed():
    # unigrams 5/6; bigrams 3/5 -> (3+1)/(5+1); trigrams 1/4 -> 2/5; 4-grams 0/3 -> 1/4; BP 1
    expected = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert ReferenceReports([CAT_REF]).bleu4(CAT) == pytest.approx(expected)
    assert ReferenceReports([CAT]).bleu4(CAT) == pytest.approx(1.0)
    assert ReferenceReports([CAT_REF]).bleu4("dog".split()) == 0.0


def test_bleu4_brevity_penalty_and_clipping():
    # "the the" against "the cat sat on the mat": unigram matches clipped at 2 of 2, BP exp(1-6/2)
    score = ReferenceReports([CAT]).bleu4(["the", "the"])
    bigram, trigram, fourgram = 1 / 2, 1 / 1, 1 / 1  # (0+1)/(1+1), (0+1)/(0+1), (0+1)/(0+1)
    assert score == pytest.approx(math.exp(1 - 6 / 2) * (1.0 * bigram * trigram * fourgram) ** 0.25)


def test_rouge_l_hand_computed_and_best_match():
    # LCS "the cat on the mat" = 5: precision = recall = 5/6
    assert ReferenceReports([CAT_REF]).rouge_l(CAT) == pytest.approx(5 / 6)
    refs = ReferenceReports([CAT_REF, "a dog".split(), CAT])
    assert refs.lcs_lengths(CAT).tolist() == [5, 0, 6]
    assert refs.rouge_l(CAT) == pytest.approx(1.0)
    # LCS 2 ("b d") of a 3-word candidate against a 4-word reference: P 2/3, R 2/4
    assert ReferenceReports([list("abcd")]).rouge_l(list("xbd")) == pytest.approx(4 / 7)


def test_duplicate_copy_and_distinct():
    reports = [("a", "b"), ("a", "b"), ("c",), ("d",)]
    assert duplicate_rate(reports) == 0.5
    assert copy_rate(reports, [("c",), ("a", "b", "c")]) == 0.25
    assert distinct_tokens(reports) == 4


# ---------------------------------------------------------------------------------------------
# the evaluation split: held out before round 1, recorded, reused

SPLIT_MODEL = ModelConfig(resolution=32)


def _patients(site: Path) -> dict[str, str]:
    """{file: patient} of a site's labeled studies and of unlabeled.csv's scans."""
    patient = {r["dicom"]: r["patient"] for r in csv.DictReader((site / "studies.csv").open())}
    if (site / "unlabeled.csv").is_file():
        patient |= {r["dicom"]: r["patient"] for r in csv.DictReader(open(site / "unlabeled.csv"))}
    return patient


@pytest.fixture
def linked_site(tmp_path, tiny_sites) -> Path:
    """A copy of a phantom site whose unlabeled scans belong to labeled patients (unlabeled.csv)."""
    site = tmp_path / "site"
    shutil.copytree(tiny_sites[0], site)
    patients = sorted(set(_patients(site).values()))
    scans = sorted((site / "unlabeled").glob("*.dcm"))
    with (site / "unlabeled.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dicom", "patient"])
        for number, scan in enumerate(scans):
            writer.writerow([f"unlabeled/{scan.name}", patients[number]])
    return site


def _add_study(site: Path, name: str, patient: str, dicom_patient: str) -> str:
    """A new labeled study: a copy of the first image with DICOM PatientID `dicom_patient`."""
    import pydicom

    first = next(csv.DictReader((site / "studies.csv").open()))
    ds = pydicom.dcmread(site / first["dicom"])
    ds.PatientID = dicom_patient
    ds.save_as(site / "images" / name)
    row = dict(first, dicom=f"images/{name}", patient=patient)
    with (site / "studies.csv").open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(first)).writerow(row)
    return f"images/{name}"


def _side_files(split: EvaluationSplit) -> tuple[set[str], set[str]]:
    return {f for u in split.evaluation for f in u}, {f for u in split.training for f in u}


def test_evaluation_split_keeps_every_patient_on_one_side(tmp_path, linked_site):
    data = load_site(linked_site, tmp_path / "state", SPLIT_MODEL)
    split = create_or_load_split(data, tmp_path / "state", 0.3, seed=0)
    patient = _patients(linked_site)
    held_files, trained_files = _side_files(split)
    held = {patient[f] for f in held_files}
    trained = {patient[f] for f in trained_files}
    assert held and trained and held.isdisjoint(trained)
    # a patient's unlabeled scan went where the patient's labeled studies went
    linked = [f for f in held_files | trained_files if f.startswith("unlabeled/")]
    assert linked and all((f in held_files) == (patient[f] in held) for f in linked)
    # training sees none of the held-out files; the evaluation set is exactly their studies
    train = training_data(data, split)
    assert set(unit_files(train)).isdisjoint(split.evaluation)
    judge_train, evaluation = split_labeled(data, split, "site")
    labeled_held = [f for f in held_files if not f.startswith("unlabeled/")]
    assert len(evaluation.images) == len(labeled_held) > 0
    assert len(judge_train.images) + len(evaluation.images) == len(data.images)
    assert set(judge_train.units).isdisjoint(evaluation.units)


def test_evaluation_split_is_recorded_reloaded_and_never_changed(tmp_path, linked_site):
    state = tmp_path / "state"
    data = load_site(linked_site, state, SPLIT_MODEL)
    assert create_or_load_split(data, state, 0.0) is None and not (state / SPLIT_FILE).exists()
    split = create_or_load_split(data, state, 0.3, seed=4)
    record = json.loads((state / SPLIT_FILE).read_text())
    assert record["fraction"] == 0.3 and record["seed"] == 4
    assert all(len(u["id"]) == 16 and u["files"] for u in record["evaluation"])
    assert load_split(state) == split == create_or_load_split(data, state, 0.3, seed=9)
    with pytest.raises(SplitError, match="holds out 0.3 .* asks for holdout_fraction 0.2"):
        create_or_load_split(data, state, 0.2)
    with pytest.raises(SplitError, match="holdout_fraction 0"):
        create_or_load_split(data, state, 0.0)
    with pytest.raises(SplitError, match="has trained rounds without an evaluation split"):
        create_or_load_split(data, tmp_path / "trained", 0.3, already_trained=True)


def test_evaluation_split_is_stable_when_studies_are_added(tmp_path, linked_site):
    state = tmp_path / "state"
    split = create_or_load_split(load_site(linked_site, state, SPLIT_MODEL), state, 0.3)
    held_files, trained_files = _side_files(split)
    patient = _patients(linked_site)
    held_patient = patient[min(f for f in held_files if f.startswith("images/"))]
    trained_patient = patient[min(f for f in trained_files if f.startswith("images/"))]
    new_patient = _add_study(linked_site, "new.dcm", "NEW-PATIENT", "NEW-PATIENT")
    more_of_held = _add_study(linked_site, "held.dcm", held_patient, held_patient)
    linking = _add_study(linked_site, "link.dcm", trained_patient, held_patient)

    grown = load_site(linked_site, state, SPLIT_MODEL)
    assert create_or_load_split(grown, state, 0.3) == split  # the record, not a new choice
    scored, never_trained = split.sides(grown)
    files = unit_files(grown)
    unit_of = {f: number for number, unit in enumerate(files) for f in unit}
    # the new patient trains; a new study of a held-out patient stays held out
    assert unit_of[new_patient] not in never_trained
    assert unit_of[more_of_held] in never_trained
    # a study linking a held-out and a trained patient: neither trained on nor scored
    assert unit_of[linking] in never_trained and unit_of[linking] not in scored
    trained_units = set(unit_files(training_data(grown, split)))
    assert trained_units.isdisjoint(files[u] for u in never_trained)


def test_the_splitter_ranks_units_by_identity_not_position():
    keys = [f"images/p{i}.dcm" for i in range(40)]
    held = {keys[i] for i in choose_held_out(keys, 0.25, seed=1)}
    assert len(held) == 10
    assert {keys[::-1][i] for i in choose_held_out(keys[::-1], 0.25, seed=1)} == held
    grown = keys + ["images/p40.dcm"]
    assert len(held - {grown[i] for i in choose_held_out(grown, 0.25, seed=1)}) <= 1
    assert {keys[i] for i in choose_held_out(keys, 0.25, seed=2)} != held
    assert len(choose_held_out(keys[:2], 0.9, seed=0)) == 1  # one unit is always left to train


# ---------------------------------------------------------------------------------------------
# the command on phantom releases

RESOLUTION = 64
EPOCHS = 25
PAIRS_PER_FINDING = 6


def write_release(out: Path, rows: list[tuple[np.ndarray, list[str], str]]) -> Path:
    """A release folder in the `emixer release` format from (image01, labels, report) rows."""
    from emixer_model.data.dicom import write_dicom

    (out / "images").mkdir(parents=True)
    lines = []
    for number, (image, labels, report) in enumerate(rows, start=1):
        sample_id = f"{number:06d}"
        dicom = f"images/{sample_id}.dcm"
        write_dicom(out / dicom, image, bits_stored=8, sop_class="sc")
        row = {"id": sample_id, "dicom": dicom, "png": None, "labels": labels, "report": report}
        lines.append(json.dumps(row))
    (out / "reports.jsonl").write_text("\n".join(lines) + "\n")
    history = [
        {
            "round": r,
            "noise_multiplier": 1.1,
            "sample_rate": 0.1,
            "steps": 10,
            "epsilon": 0.5 * r,
            "losses": {"d_real": 0.7, "d_fake": 0.6, "rotation": 1.2, "report": 3.0, "g": 0.9},
        }
        for r in (1, 2)
    ]
    site = {"epsilon": 1.0, "delta": 1e-3, "budget": 10.0, "accountant": "rdp", "history": history}
    manifest = {
        "model": {"sha256": "0" * 64, "round": 2},
        "config": {"model": {"resolution": RESOLUTION}, "train": {"uncertain_as": "positive"}},
        "counts": {"total": len(rows)},
        "privacy": {"release_epsilon": 1.0, "sites": {"site_1": site}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def phantom_world(tmp_path_factory) -> dict[str, Path]:
    """One real phantom site, a faithful release and the same pairs with labels moved along."""
    from emixer_model.data.phantoms import (
        render_phantom,
        write_phantom_sites,
        write_public_collection,
    )
    from emixer_model.text.grammar import SITE_GRAMMAR, write_report

    root = tmp_path_factory.mktemp("evaluation")
    (site,) = write_phantom_sites(root / "real", sites=1, per_site=150, unlabeled=2, size=64)
    rng = np.random.default_rng(1)
    conditions = [[f] for f in FINDINGS] * PAIRS_PER_FINDING
    pairs = []
    for condition in conditions:
        labels = {f: int(f in condition) for f in FINDINGS}
        pairs.append(
            (
                render_phantom(labels, rng, RESOLUTION),
                write_report(labels, rng, SITE_GRAMMAR),
            )
        )
    faithful = [(img, cond, rep) for (img, rep), cond in zip(pairs, conditions, strict=True)]
    # every pair gets the next finding's label: images and reports no longer match their labels
    moved = conditions[1:] + conditions[:1]
    shuffled = [(img, cond, rep) for (img, rep), cond in zip(pairs, moved, strict=True)]
    state = root / "state"
    create_or_load_split(load_site(site, state, ModelConfig(resolution=RESOLUTION)), state, 0.2)
    return {
        "site": site,
        "state": state,
        "evaluations": root / "evaluations",
        "public": write_public_collection(root / "public", n=60, size=64),
        "faithful": write_release(root / "faithful", faithful),
        "shuffled": write_release(root / "shuffled", shuffled),
    }


def evaluate(world: dict[str, Path], release: str) -> dict:
    """Evaluate one of the world's releases into evaluations/<release>, with the public
    collection's baseline."""
    out = world["evaluations"] / release
    return evaluate_release(
        world[release],
        [world["site"]],
        [world["state"]],
        out,
        seed=0,
        epochs=EPOCHS,
        public_dir=world["public"],
    )


@pytest.fixture(scope="module")
def faithful_result(phantom_world) -> dict:
    return evaluate(phantom_world, "faithful")


def test_faithful_release_scores_clearly_higher_than_shuffled(phantom_world, faithful_result):
    shuffled = evaluate(phantom_world, "shuffled")
    second = ("label_fidelity", "second_judge", "mean_auroc")
    for judge in (("label_fidelity", "mean_auroc"), second):
        assert lookup(faithful_result, judge)["value"] > lookup(shuffled, judge)["value"] + 0.1
    assert faithful_result["report_consistency"]["macro_f1"]["value"] > 0.9
    assert shuffled["report_consistency"]["macro_f1"]["value"] < 0.3
    # image and report of a pair still agree with each other when only the labels were moved
    assert (
        shuffled["image_report_agreement"]["kappa"]
        == faithful_result["image_report_agreement"]["kappa"]
    )


def test_evaluation_json_has_every_section(phantom_world, faithful_result):
    written = json.loads((phantom_world["evaluations"] / "faithful/evaluation.json").read_text())
    assert written == faithful_result
    for section in (
        "release",
        "inputs",
        "label_fidelity",
        "report_consistency",
        "image_report_agreement",
        "tstr",
        "frechet",
        "text",
        "figures",
    ):
        assert section in written, section
    assert set(written["label_fidelity"]["per_label"]) == set(FINDINGS)
    second = written["label_fidelity"]["second_judge"]
    assert set(second["per_label"]) == set(second["real_per_label"]) == set(FINDINGS)
    assert second["real_heldout_auroc"]["n"] == written["inputs"]["real_test"]
    assert "linear" in second["method"]
    # every figure the tables show carries its interval, sample size and verdict
    shown = [(name, entry) for _, rows in figure_tables(written) for name, entry in rows]
    assert len(shown) == sum(len(rows) for _, rows in FIGURE_TABLES)
    for name, entry in shown:
        assert {"value", "low", "high", "n", "verdict"} <= set(entry), name
    assert written["inputs"]["real_test"] == written["tstr"]["mean_auroc"]["real"]["n"]
    assert written["inputs"]["bootstrap"]["resamples"] > 0
    tstr = written["tstr"]
    means = {name: entry["value"] for name, entry in tstr["mean_auroc"].items()}
    assert list(means) == ["real", "public", "synthetic", "real_plus_synthetic"]
    assert list(tstr["per_label"]) == list(means)
    assert tstr["augmentation_gain"]["value"] == pytest.approx(
        means["real_plus_synthetic"] - means["real"], abs=1e-3
    )
    assert tstr["synthetic_minus_public"]["value"] == pytest.approx(
        means["synthetic"] - means["public"], abs=1e-3
    )
    assert written["inputs"]["public_studies"] == 60
    assert "not Inception" in written["frechet"]["note"]
    assert written["frechet"]["distance"]["value"] >= 0.0
    text = written["text"]
    for key in ("bleu4", "rouge_l"):
        assert 0.0 < text[key]["mean"] <= 1.0
        assert "same positive label set" in text[key]["method"]
    assert text["distinct_words"]["synthetic"] > 5
    assert 0.0 <= text["duplicate_rate"]["value"] <= 1.0 and 0.0 <= text["copy_rate"] <= 1.0


def test_scores_exactly_the_recorded_evaluation_patients(phantom_world, faithful_result):
    split = load_split(phantom_world["state"])
    held = [f for unit in split.evaluation for f in unit if not f.startswith("unlabeled/")]
    inputs = faithful_result["inputs"]
    assert inputs["real_test"] == len(held) and inputs["scored_on"] == HELD_OUT_PATIENTS
    assert inputs["real_train"] + inputs["real_test"] == inputs["real_studies"]
    assert TRAINING_PATIENTS not in json.dumps(faithful_result)


def test_evaluation_refuses_training_patients(phantom_world, tmp_path):
    release, unsplit = phantom_world["faithful"], tmp_path / "trained-without-holdout"
    with pytest.raises(EvaluationError, match="records no evaluation split.*training-patients"):
        evaluate_release(release, [phantom_world["site"]], [unsplit], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = evaluate_release(
        release,
        [phantom_world["site"]],
        [unsplit],
        tmp_path / "out",
        epochs=2,
        allow_training_patients=True,
    )
    assert result["inputs"]["scored_on"].startswith(TRAINING_PATIENTS)

    def verdicts(entry: dict) -> list[str]:
        if "verdict" in entry and "n" in entry:
            return [entry["verdict"]]
        return [v for child in entry.values() if isinstance(child, dict) for v in verdicts(child)]

    labelled = verdicts(result)
    assert len(labelled) > 20 and all(v.startswith(TRAINING_PATIENTS) for v in labelled)
    assert TRAINING_PATIENTS in (tmp_path / "out" / "evaluation.html").read_text()


def test_phrasing_share_reaches_json_and_page(phantom_world, tmp_path):
    def names_the_finding(report: str, finding: str) -> bool:
        return finding.split()[0].lower() in report.lower()

    result = evaluate_release(
        phantom_world["faithful"],
        [phantom_world["site"]],
        [phantom_world["state"]],
        tmp_path,
        epochs=1,
        resamples=20,
        phrasing=names_the_finding,
    )
    shares = result["phrasing"]["per_label"]
    assert set(shares) == set(FINDINGS) and "names_the_finding" in result["phrasing"]["method"]
    assert shares["Cardiomegaly"]["n"] == PAIRS_PER_FINDING and shares["Cardiomegaly"]["value"] > 0
    names, rows = finding_table(result, FINDINGS)
    assert "phrasing share" in names and len(rows) == len(FINDINGS)
    assert "phrasing share" in (tmp_path / "evaluation.html").read_text()


def test_evaluation_stays_out_of_the_release(phantom_world, faithful_result, tmp_path):
    release = phantom_world["faithful"]
    assert sorted(p.name for p in release.iterdir()) == ["images", "manifest.json", "reports.jsonl"]
    out = phantom_world["evaluations"] / "faithful"
    assert {"evaluation.json", "evaluation.html", "figures"} <= {p.name for p in out.iterdir()}
    with pytest.raises(EvaluationError, match="inside the release"):
        evaluate_release(release, [phantom_world["site"]], [phantom_world["state"]], release / "e")


def test_figures_are_png_files(phantom_world, faithful_result):
    assert len(faithful_result["figures"]) == 4
    for relative in faithful_result["figures"]:
        data = (phantom_world["evaluations"] / "faithful" / relative).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), relative


def test_same_seed_same_result(phantom_world, faithful_result):
    again = evaluate(phantom_world, "faithful")
    assert figure_tables(again) == figure_tables(faithful_result)


def test_command_prints_the_tables(phantom_world, capsys, monkeypatch, tmp_path):
    from emixer_cli.common import console

    monkeypatch.setattr(console, "width", 200)  # one table row per line, as on a wide terminal
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "evaluate",
            "--release",
            str(phantom_world["faithful"]),
            "--real",
            str(phantom_world["site"]),
            "--state-dir",
            str(phantom_world["state"]),
            "--out",
            str(tmp_path / "eval"),
            "--epochs",
            "2",
            "--focus-findings",
            "Edema,Cardiomegaly",
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "augmentation gain" in out and "evaluation.json" in out
    assert "95% interval" in out and "distinguishable from" in out
    per_finding = out[out.index("per finding") :]
    assert "Edema" in per_finding and "Cardiomegaly" in per_finding
    assert "Pneumothorax" not in per_finding
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["inputs"]["epochs"] == 2
    assert set(saved["label_fidelity"]["per_label"]) == set(FINDINGS)


# ---------------------------------------------------------------------------------------------
# bad input: one clear sentence naming what is missing


def copy_release(world: dict[str, Path], tmp_path: Path) -> Path:
    target = tmp_path / "release"
    shutil.copytree(world["faithful"], target)
    return target


def test_release_without_manifest(phantom_world, tmp_path):
    release = copy_release(phantom_world, tmp_path)
    (release / "manifest.json").unlink()
    with pytest.raises(EvaluationError, match="no manifest.json"):
        evaluate_release(release, [phantom_world["site"]], [phantom_world["state"]], tmp_path)


def test_release_without_reports(phantom_world, tmp_path):
    release = copy_release(phantom_world, tmp_path)
    (release / "reports.jsonl").unlink()
    with pytest.raises(EvaluationError, match="no reports.jsonl"):
        evaluate_release(release, [phantom_world["site"]], [phantom_world["state"]], tmp_path)


def test_listed_dicom_missing_is_named(phantom_world, tmp_path):
    release = copy_release(phantom_world, tmp_path)
    (release / "images" / "000003.dcm").unlink()
    with pytest.raises(EvaluationError, match=r"line 3 lists images/000003.dcm .* missing"):
        evaluate_release(release, [phantom_world["site"]], [phantom_world["state"]], tmp_path)


def test_unknown_label_in_release_is_named(phantom_world, tmp_path):
    release = copy_release(phantom_world, tmp_path)
    path = release / "reports.jsonl"
    path.write_text(path.read_text().replace('"Edema"', '"Oedema"', 1))
    with pytest.raises(EvaluationError, match="unknown finding 'Oedema'"):
        evaluate_release(release, [phantom_world["site"]], [phantom_world["state"]], tmp_path)


def test_real_site_missing_or_too_small(phantom_world, tmp_path):
    from emixer_model.data.phantoms import write_phantom_sites
    from emixer_model.data.site import SiteDataError

    with pytest.raises(SiteDataError):
        evaluate_release(
            phantom_world["faithful"], [tmp_path / "nowhere"], [tmp_path / "s"], tmp_path / "e"
        )
    (tiny,) = write_phantom_sites(tmp_path / "tiny", sites=1, per_site=4, unlabeled=1, size=64)
    with pytest.raises(EvaluationError, match="give 4 usable labeled studies"):
        evaluate_release(
            phantom_world["faithful"],
            [tiny],
            [tmp_path / "s"],
            tmp_path / "e",
            allow_training_patients=True,
        )


def test_command_turns_errors_into_one_line(phantom_world, tmp_path, capsys):
    from emixer_cli.main import main

    code = main(
        ["evaluate", "--release", str(tmp_path / "release"), "--real", str(phantom_world["site"])]
        + ["--state-dir", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "e")]
    )
    out = capsys.readouterr().out
    assert code == 2 and "one --state-dir per --real folder" in out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1
