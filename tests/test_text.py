"""Report grammar, fixed vocabulary codec and rule labeler agree with each other."""

import numpy as np
import pytest
import torch

from emixer_model.config import FINDINGS, ModelConfig
from emixer_model.text import vocabulary
from emixer_model.text.grammar import grammar_words, write_report
from emixer_model.text.labeler import label_report
from emixer_model.text.vocabulary import (
    EOS,
    PAD,
    UNK,
    VOCAB_SIZE,
    WORDS,
    decode_report,
    encode_report,
    tokenize,
)

OTHERS = FINDINGS[1:]


def _labels(rng: np.random.Generator) -> dict[str, int]:
    """Random ground truth: a spread from normal studies to every finding at once."""
    p = rng.choice((0.1, 0.3, 0.9))
    labels = {}
    for finding in OTHERS:
        u = rng.random()
        if u < p:
            labels[finding] = -1 if rng.random() < 0.25 else 1
        elif u < p + 0.2:
            labels[finding] = 0
    if not any(v in (1, -1) for v in labels.values()):
        labels["No Finding"] = 1
    return labels


@pytest.fixture(scope="module")
def corpus() -> list[tuple[dict[str, int], str]]:
    rng = np.random.default_rng(7)
    return [(labels, write_report(labels, rng)) for labels in (_labels(rng) for _ in range(2000))]


def _f1(pairs: list[tuple[bool, bool]]) -> float:
    tp = sum(t and p for t, p in pairs)
    wrong = sum(t != p for t, p in pairs)
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 1.0


def test_labeler_recovers_grammar_labels(corpus):
    found = [(labels, label_report(report)) for labels, report in corpus]
    for finding in FINDINGS:
        for value in (1, -1):
            pairs = [(t.get(finding) == value, g.get(finding) == value) for t, g in found]
            if any(t for t, _ in pairs):
                assert _f1(pairs) >= 0.95, (finding, value)
    # Negations: a finding the grammar denies is labeled 0, never positive or uncertain.
    negated = [(t, g) for t, g in found if 0 in g.values()]
    assert len(negated) > len(found) // 2
    for truth, got in negated:
        for finding, value in got.items():
            if value == 0:
                assert truth.get(finding) not in (1, -1)


def test_reports_fit_the_default_text_caps(corpus):
    cfg = ModelConfig()
    for _, report in corpus:
        sentences = tokenize(report)
        assert len(sentences) <= cfg.max_sentences
        assert max(len(s) for s in sentences) <= cfg.max_words - 1


def test_grammar_varies_phrasing_and_has_hedges(corpus):
    cardio = {r.split(".")[0] for t, r in corpus if t.get("Cardiomegaly") == 1 and len(t) == 1}
    assert len({s.split()[0] for s in cardio}) >= 2
    text = " ".join(r.lower() for _, r in corpus)
    for phrase in ("possible", "cannot", "without", "there is no", "no acute"):
        assert phrase in text


def test_round_trip_keeps_labels(corpus):
    cfg = ModelConfig()
    for _, report in corpus[:500]:
        ids = encode_report(report, cfg.max_sentences, cfg.max_words)
        assert label_report(decode_report(ids)) == label_report(report)
        assert label_report(decode_report(torch.from_numpy(ids))) == label_report(report)


def test_vocabulary_file_is_clean_and_covers_the_grammar():
    assert len(WORDS) == len(set(WORDS))
    assert VOCAB_SIZE == 4 + len(WORDS)
    assert all(w.isalnum() and w == w.lower() for w in WORDS)
    assert grammar_words() <= set(WORDS)
    assert 300 <= len(WORDS) <= 700


def test_encode_layout_truncation_and_unknown_words():
    ids = encode_report("Heart size is normal. Dr Zyxwv says hello!", 3, 4)
    assert ids.shape == (3, 4) and ids.dtype == np.int64
    assert ids[0].tolist() == [vocabulary.WORD_TO_ID[w] for w in ("heart", "size", "is")] + [EOS]
    assert ids[1, 1] == UNK and ids[1, 3] == EOS  # "zyxwv" is unknown; cut at 3 words
    assert (ids[2] == PAD).all()
    assert "<unk>" in decode_report(ids)
    many = encode_report("no effusion. " * 10, 2, 5)
    assert many.shape == (2, 5) and (many[:, 2] == EOS).all()
    assert decode_report(encode_report("", 2, 5)) == ""


def test_decode_format_and_bad_input():
    ids = encode_report("the lungs are clear; no pneumothorax", 4, 8)
    assert decode_report(ids) == "The lungs are clear. No pneumothorax."
    with pytest.raises(ValueError, match="vocabulary"):
        decode_report(np.full((2, 3), VOCAB_SIZE))
    with pytest.raises(ValueError, match="shape"):
        decode_report(np.zeros(5, dtype=np.int64))
    with pytest.raises(TypeError, match="empty string"):
        encode_report(float("nan"), 6, 12)  # a blank CSV cell read as NaN
    with pytest.raises(ValueError, match="too small"):
        encode_report("x", 0, 12)


def test_write_report_refuses_bad_labels():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="FINDINGS"):
        write_report({"Pneumonia": 1}, rng)
    with pytest.raises(ValueError, match="uncertain"):
        write_report({"Edema": 2}, rng)


def test_normal_report_for_no_finding():
    report = write_report({"No Finding": 1}, np.random.default_rng(3))
    got = label_report(report)
    assert got["No Finding"] == 1
    assert all(v == 0 for f, v in got.items() if f != "No Finding")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No pleural effusion or pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0}),
        ("Small effusion, but no pneumothorax.", {"Pleural Effusion": 1, "Pneumothorax": 0}),
        ("Left pneumothorax cannot be excluded.", {"Pneumothorax": -1}),
        ("The heart is not enlarged.", {"Cardiomegaly": 0}),
        ("Enlarged heart with vascular congestion.", {"Cardiomegaly": 1, "Edema": 1}),
        ("Negative for focal airspace opacity.", {"Consolidation": 0}),
        ("The pneumothorax has resolved.", {"Pneumothorax": 0}),
        (
            "Right PICC line in place. Questionable nodule.",
            {"Support Devices": 1, "Lung Lesion": -1},
        ),
        ("Lungs are clear. No acute disease.", {"No Finding": 1}),
        ("Chest free of masses; no edema.", {"Lung Lesion": 0, "Edema": 0}),
    ],
)
def test_labeler_on_hand_written_sentences(text, expected):
    got = label_report(text)
    assert {f: got[f] for f in expected} == expected
    assert all(got[f] == 0 or f in expected for f in got)
