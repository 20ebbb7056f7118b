"""Report grammar, fixed vocabulary codec and rule labeler agree with each other."""

import itertools
import string

import numpy as np
import pytest
import torch

from emixer_model.config import FINDINGS, ModelConfig
from emixer_model.text import vocabulary
from emixer_model.text.grammar import (
    NEGATION_FORMS,
    PUBLIC_GRAMMAR,
    SITE_GRAMMAR,
    SITE_ONLY_FINDING,
    SITE_ONLY_PARTS,
    SITE_PHRASING,
    SITE_PHRASING_PARTS,
    SLOTS,
    grammar_words,
    uses_site_phrasing,
    write_report,
)
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
from tests.conftest import site_knowledge_in

# The public grammar, and a site's with every site-only part (the site-only finding's sentences
# and its own phrasing of a shared finding).
PHRASING_GRAMMAR = SITE_GRAMMAR.plus(SITE_PHRASING_PARTS)
GRAMMARS = (PUBLIC_GRAMMAR, PHRASING_GRAMMAR)


def _labels(rng: np.random.Generator, findings: tuple[str, ...]) -> dict[str, int]:
    """Random ground truth: a spread from normal studies to every finding at once."""
    p = rng.choice((0.1, 0.3, 0.9))
    labels = {}
    for finding in findings:
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
    """Reports of random labels, every other one in the public grammar, the rest a site's."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(2000):
        grammar = GRAMMARS[i % 2]
        labels = _labels(rng, grammar.findings)
        out.append((labels, write_report(labels, rng, grammar)))
    return out


def _f1(pairs: list[tuple[bool, bool]]) -> float:
    tp = sum(t and p for t, p in pairs)
    wrong = sum(t != p for t, p in pairs)
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 1.0


def test_labeler_recovers_grammar_labels(corpus):
    found = [(labels, label_report(report)) for labels, report in corpus]
    for finding in FINDINGS:
        for value in (1,) if finding == "No Finding" else (1, -1):
            pairs = [(t.get(finding) == value, g.get(finding) == value) for t, g in found]
            assert sum(t for t, _ in pairs) >= 20, (finding, value)  # every label is exercised
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
    assert list(WORDS) == sorted(WORDS)
    for grammar in (PUBLIC_GRAMMAR, SITE_ONLY_PARTS, SITE_PHRASING_PARTS):
        assert grammar_words(grammar) <= set(WORDS), grammar.name
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
    for value in (1, -1):  # the public grammar never names the site-only finding
        with pytest.raises(ValueError, match="public grammar never names 'Pneumoperitoneum'"):
            write_report({SITE_ONLY_FINDING: value}, rng)
    assert SITE_ONLY_FINDING in FINDINGS and SITE_ONLY_FINDING not in PUBLIC_GRAMMAR.findings


def _filled(template: str) -> list[str]:
    """Every way a template's {slots} can be filled."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    choices = itertools.product(*(SLOTS[name] for name in names))
    return [template.format(**dict(zip(names, choice, strict=True))) for choice in choices]


SITE_SENTENCES = [
    *(
        (text, {finding: value})
        for kind, value in (("positive", 1), ("uncertain", -1))
        for parts in (SITE_ONLY_PARTS, SITE_PHRASING_PARTS)
        for finding, templates in getattr(parts, kind).items()
        for template in templates
        for text in _filled(template)
    ),
    *(
        (form.format(a=phrase, be="is"), {SITE_ONLY_FINDING: 0})
        for phrase in SITE_ONLY_PARTS.negated[SITE_ONLY_FINDING]
        for form in NEGATION_FORMS
    ),
    (
        f"Small effusion without {SITE_ONLY_PARTS.negated[SITE_ONLY_FINDING][0]}",
        {
            "Pleural Effusion": 1,
            SITE_ONLY_FINDING: 0,
        },
    ),
]


@pytest.mark.parametrize(("text", "expected"), SITE_SENTENCES)
def test_labeler_reads_every_site_only_sentence(text, expected):
    assert "{" not in text
    got = label_report(text)
    assert {f: got.get(f) for f in expected} == expected, text
    assert all(f in expected for f in got), (text, got)  # nothing else is read into it


def test_every_finding_a_grammar_names_has_all_its_parts():
    for grammar in (PUBLIC_GRAMMAR, SITE_GRAMMAR, PHRASING_GRAMMAR):
        for finding in grammar.findings:
            assert grammar.uncertain[finding] and grammar.negated[finding], finding
            assert grammar.short[finding], finding
    assert SITE_GRAMMAR.findings == PHRASING_GRAMMAR.findings == FINDINGS[1:]
    assert set(PUBLIC_GRAMMAR.findings) == set(FINDINGS[1:]) - {SITE_ONLY_FINDING}


def test_site_phrasing_marks_every_site_sentence_and_no_public_one():
    for finding, templates in SITE_PHRASING_PARTS.positive.items():
        assert finding in SITE_PHRASING and finding in PUBLIC_GRAMMAR.findings  # a shared finding
        for text in (t for template in templates for t in _filled(template)):
            assert uses_site_phrasing(text.capitalize() + ".", finding), text
    public_sentences = [
        text
        for group in (PUBLIC_GRAMMAR.positive, PUBLIC_GRAMMAR.uncertain, PUBLIC_GRAMMAR.negated)
        for templates in group.values()
        for template in templates
        for text in _filled(template)
    ]
    for finding in SITE_PHRASING:
        assert not any(uses_site_phrasing(text, finding) for text in public_sentences)
    with pytest.raises(ValueError, match="no site phrasing is defined for 'Edema'"):
        uses_site_phrasing("Mild edema.", "Edema")


def test_public_reports_never_name_what_only_sites_know(corpus):
    site_only_words = grammar_words(SITE_ONLY_PARTS) - grammar_words(PUBLIC_GRAMMAR)
    assert {"pneumoperitoneum", "subdiaphragmatic", "hemidiaphragm"} <= site_only_words
    public = [report for i, (_, report) in enumerate(corpus) if i % 2 == 0]
    site = [report for i, (_, report) in enumerate(corpus) if i % 2 == 1]
    assert [r for r in public if site_knowledge_in(r)] == []
    # the site grammar does write them, so the check above could fail
    assert sum(SITE_ONLY_FINDING in site_knowledge_in(r) for r in site) > 100
    assert sum("Cardiomegaly phrasing" in site_knowledge_in(r) for r in site) > 50


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
        (
            "Free air under the right hemidiaphragm, but no pneumothorax.",
            {"Pneumoperitoneum": 1, "Pneumothorax": 0},
        ),
        ("Dense consolidation with air bronchograms.", {"Consolidation": 1}),
        ("Subdiaphragmatic free air has resolved.", {"Pneumoperitoneum": 0}),
    ],
)
def test_labeler_on_hand_written_sentences(text, expected):
    got = label_report(text)
    assert {f: got[f] for f in expected} == expected
    assert all(got[f] == 0 or f in expected for f in got)
