"""A small grammar of chest X-ray report sentences, used to write phantom reports.

Phantom hospitals need reports whose findings are known exactly, so a rule labeler can later
check whether a synthetic report states its label. Reports vary in phrasing (several templates
per finding), negate some absent findings and hedge uncertain ones ("possible ...", "cannot
exclude ..."), and always fit the default text caps of ModelConfig (6 sentences x 11 words + EOS).
"""

from __future__ import annotations

import re
import string

import numpy as np

from emixer_model.config import FINDINGS

MAX_SENTENCES = 6  # ModelConfig.max_sentences
MAX_WORDS = 11  # ModelConfig.max_words minus the EOS token

SLOTS: dict[str, tuple[str, ...]] = {
    "side": ("right", "left"),
    "size": ("small", "moderate", "large"),
    "grade": ("mild", "moderate"),
    "adv": ("mildly", "moderately", "markedly"),
    "lobe": (
        "right upper lobe",
        "right middle lobe",
        "right lower lobe",
        "left upper lobe",
        "left lower lobe",
        "lingula",
    ),
    "cm": ("1", "2", "3", "4"),
}

POSITIVE: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": (
        "the heart is {adv} enlarged",
        "there is {grade} cardiomegaly",
        "the cardiac silhouette is enlarged",
        "{grade} cardiomegaly is present",
    ),
    "Pleural Effusion": (
        "there is a {size} {side} pleural effusion",
        "{size} bilateral pleural effusions are present",
        "a {size} {side} pleural effusion blunts the costophrenic angle",
        "{side} basilar opacity with a meniscus consistent with pleural effusion",
    ),
    "Consolidation": (
        "there is consolidation in the {lobe}",
        "patchy airspace opacity in the {lobe}",
        "focal consolidation is seen in the {lobe}",
        "dense {lobe} consolidation with air bronchograms",
    ),
    "Pneumothorax": (
        "there is a {size} {side} apical pneumothorax",
        "a {side} pneumothorax is present",
        "a {side} pleural line with absent lung markings indicates pneumothorax",
    ),
    "Lung Lesion": (
        "there is a {cm} cm nodule in the {lobe}",
        "a rounded mass is seen in the {lobe}",
        "a well circumscribed lesion projects over the {lobe}",
    ),
    "Edema": (
        "there is {grade} pulmonary edema",
        "interstitial edema with pulmonary vascular congestion",
        "bilateral hazy perihilar opacities consistent with {grade} pulmonary edema",
    ),
    "Support Devices": (
        "an endotracheal tube terminates above the carina",
        "a {side} picc line terminates in the superior vena cava",
        "a {side} chest pacemaker is in place",
        "a nasogastric tube extends into the stomach",
        "a {side} internal jugular catheter ends in the svc",
    ),
}

UNCERTAIN: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": (
        "possible {grade} cardiomegaly",
        "the heart may be mildly enlarged",
        "cannot exclude {grade} cardiomegaly",
    ),
    "Pleural Effusion": (
        "possible small {side} pleural effusion",
        "a small {side} pleural effusion cannot be excluded",
        "questionable trace {side} pleural effusion",
    ),
    "Consolidation": (
        "possible early consolidation in the {lobe}",
        "{lobe} opacity may represent consolidation",
        "cannot exclude {lobe} consolidation",
    ),
    "Pneumothorax": (
        "possible small {side} apical pneumothorax",
        "a tiny {side} pneumothorax cannot be excluded",
        "questionable {side} apical pneumothorax",
    ),
    "Lung Lesion": (
        "possible nodule in the {lobe}",
        "questionable nodular opacity in the {lobe}",
        "a {lobe} nodule cannot be excluded",
    ),
    "Edema": (
        "possible {grade} pulmonary edema",
        "findings may reflect mild interstitial edema",
        "cannot exclude mild pulmonary vascular congestion",
    ),
    "Support Devices": (
        "possible catheter projecting over the {side} chest",
        "a questionable tube projects over the {side} neck",
    ),
}

# Noun phrases for negated (absent) findings; sentence forms come from NEGATION_FORMS.
NEGATED: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": ("cardiomegaly",),
    "Pleural Effusion": ("pleural effusion", "pleural effusions"),
    "Consolidation": ("focal consolidation", "consolidation", "focal airspace opacity"),
    "Pneumothorax": ("pneumothorax",),
    "Lung Lesion": ("suspicious pulmonary nodule", "pulmonary nodule or mass"),
    "Edema": ("pulmonary edema", "vascular congestion"),
    "Support Devices": ("lines or tubes", "support devices"),
}
NEGATION_FORMS: tuple[str, ...] = ("no {a}", "there {be} no {a}", "no evidence of {a}")
NEGATION_PAIR_FORMS: tuple[str, ...] = ("no {a} or {b}", "there {be} no {a} or {b}")
PLURAL: frozenset[str] = frozenset({"pleural effusions", "lines or tubes", "support devices"})
# Whole sentences that deny a finding without a negation word.
NEGATED_SENTENCES: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": (
        "heart size is normal",
        "the heart is not enlarged",
        "the cardiac silhouette is normal in size",
    ),
}

# Short names for impressions and for merged sentences when a report has many findings.
SHORT: dict[str, str] = {
    "Cardiomegaly": "cardiomegaly",
    "Pleural Effusion": "pleural effusion",
    "Consolidation": "consolidation",
    "Pneumothorax": "pneumothorax",
    "Lung Lesion": "pulmonary nodule",
    "Edema": "pulmonary edema",
    "Support Devices": "support devices",
}

NORMAL_REPORTS: tuple[tuple[str, ...], ...] = (
    ("the lungs are clear", "heart size is normal", "no acute cardiopulmonary process"),
    (
        "the cardiomediastinal silhouette is within normal limits",
        "the lungs are clear without focal consolidation",
        "impression: no acute cardiopulmonary abnormality",
    ),
    (
        "lungs are well expanded and clear",
        "no pleural effusion or pneumothorax",
        "heart size is normal",
        "impression: normal chest radiograph",
    ),
    ("normal heart size", "clear lungs", "no acute cardiopulmonary disease"),
)
IMPRESSION_FORMS: tuple[str, ...] = (
    "impression: {a}",
    "impression: findings consistent with {a}",
    "impression: {a} as described",
)
IMPRESSION_DEVICES_ONLY: tuple[str, ...] = (
    "impression: no acute cardiopulmonary process",
    "impression: support devices as described",
)
IMPRESSION_UNCERTAIN_ONLY: tuple[str, ...] = (
    "impression: findings as above",
    "impression: clinical correlation is recommended",
    "impression: follow up radiograph is recommended",
)
FILLERS: tuple[str, ...] = (
    "the lungs are otherwise clear",
    "the osseous structures are intact",
    "no acute osseous abnormality",
)

_FIELDS = string.Formatter()


def _fill(template: str, rng: np.random.Generator) -> str:
    """Fill every {slot} of a template with a random choice of its options."""
    # In order of appearance: iterating a set would make the draws depend on PYTHONHASHSEED.
    names = dict.fromkeys(field for _, field, _, _ in _FIELDS.parse(template) if field)
    return template.format(**{name: SLOTS[name][rng.integers(len(SLOTS[name]))] for name in names})


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[rng.integers(len(options))]


def _join(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _check_labels(labels: dict[str, int]) -> None:
    for name, value in labels.items():
        if name not in FINDINGS:
            raise ValueError(
                f"unknown finding {name!r}; labels must use the names in config.FINDINGS: "
                + ", ".join(FINDINGS)
            )
        if value not in (1, 0, -1):
            raise ValueError(
                f"label of {name!r} is {value!r}; use 1 (positive), 0 (negative), -1 (uncertain) "
                "or leave the finding out when it is blank"
            )


def _negations(absent: list[str], room: int, rng: np.random.Generator) -> list[str]:
    """Up to `room` sentences denying some absent findings (one or two per sentence)."""
    chosen = [absent[i] for i in rng.permutation(len(absent))][: int(rng.integers(1, 4))]
    out: list[str] = []
    while chosen and len(out) < room:
        first = chosen.pop(0)
        if first in NEGATED_SENTENCES and rng.random() < 0.6:
            out.append(_pick(NEGATED_SENTENCES[first], rng))
        elif chosen and rng.random() < 0.5:
            second = chosen.pop(0)
            a, b = (
                _pick(tuple(p for p in NEGATED[f] if " or " not in p), rng) for f in (first, second)
            )
            be = "are" if a in PLURAL else "is"
            out.append(_pick(NEGATION_PAIR_FORMS, rng).format(a=a, b=b, be=be))
        else:
            a = _pick(NEGATED[first], rng)
            be = "are" if a in PLURAL else "is"
            out.append(_pick(NEGATION_FORMS, rng).format(a=a, be=be))
    return out


def _attach_without(sentences: list[str], absent: list[str], rng: np.random.Generator) -> None:
    """Deny one absent finding inside a positive sentence ("... effusion without pneumothorax").

    The denied finding is removed from `absent` so it is not denied twice.
    """
    finding = absent[rng.integers(len(absent))]
    phrase = _pick(NEGATED[finding], rng)
    for i, sentence in enumerate(sentences):
        if len(sentence.split()) + 1 + len(phrase.split()) <= MAX_WORDS:
            sentences[i] = f"{sentence} without {phrase}"
            absent.remove(finding)
            return


def _abnormal(
    positive: list[str], uncertain: list[str], absent: list[str], rng: np.random.Generator
) -> list[str]:
    """Findings first (positive, then uncertain), an impression, then negations if room is left."""
    if len(positive) + len(uncertain) + 1 <= MAX_SENTENCES:
        sentences = [_fill(_pick(POSITIVE[f], rng), rng) for f in positive]
        if absent and rng.random() < 0.4:
            _attach_without(sentences, absent, rng)
        sentences += [_fill(_pick(UNCERTAIN[f], rng), rng) for f in uncertain]
        pathology = [SHORT[f] for f in positive if f != "Support Devices"][:3]
        if pathology:
            impression = _pick(IMPRESSION_FORMS, rng).format(a=_join(pathology))
        elif positive:
            impression = _pick(IMPRESSION_DEVICES_ONLY, rng)
        else:
            impression = _pick(IMPRESSION_UNCERTAIN_ONLY, rng)
        room = MAX_SENTENCES - len(sentences) - 1
        if room and absent:
            sentences += _negations(absent, room, rng)
        if len(sentences) < MAX_SENTENCES - 1 and rng.random() < 0.3:
            sentences.append(_pick(FILLERS, rng))
        return sentences + [impression]
    # Too many findings for one sentence each: state the last ones together, hedged ones last.
    room = MAX_SENTENCES - (1 if uncertain else 0)
    single = positive if len(positive) <= room else positive[: room - 1]
    sentences = [_fill(_pick(POSITIVE[f], rng), rng) for f in single]
    rest = positive[len(single) :]
    if rest:
        sentences.append("also noted: " + _join([SHORT[f] for f in rest]))
    if uncertain:
        sentences.append("possible " + _join([SHORT[f] for f in uncertain]))
    return sentences


def write_report(labels: dict[str, int], rng: np.random.Generator) -> str:
    """Write a findings + impression report stating exactly the given labels.

    labels maps FINDINGS names to 1 (positive), 0 (negative) or -1 (uncertain); a finding left
    out is blank. Positive and uncertain findings are always stated; some negative or blank ones
    are denied explicitly. "No Finding" alone (nothing else positive or uncertain) gives a normal
    report; a positive finding overrides a contradictory "No Finding".
    """
    _check_labels(labels)
    others = [f for f in FINDINGS if f != "No Finding"]
    positive = [f for f in others if labels.get(f) == 1]
    uncertain = [f for f in others if labels.get(f) == -1]
    absent = [f for f in others if labels.get(f) not in (1, -1)]
    positive = [positive[i] for i in rng.permutation(len(positive))]
    if positive or uncertain:
        sentences = _abnormal(positive, uncertain, absent, rng)
    else:
        sentences = list(_pick(NORMAL_REPORTS, rng))
        mentioned = " ".join(sentences)
        unsaid = [f for f in absent if SHORT[f].split()[-1] not in mentioned]
        room = MAX_SENTENCES - len(sentences) - 1
        if unsaid and rng.random() < 0.5:
            sentences[-1:-1] = _negations(unsaid, room, rng)
    return " ".join(s[0].upper() + s[1:] + "." for s in sentences)


def grammar_words() -> set[str]:
    """Every word write_report can emit, so the fixed vocabulary can be checked to cover it."""
    texts: list[str] = [
        t
        for group in (POSITIVE, UNCERTAIN, NEGATED, NEGATED_SENTENCES)
        for options in group.values()
        for t in options
    ]
    texts += [*NEGATION_FORMS, *NEGATION_PAIR_FORMS, *SHORT.values(), *IMPRESSION_FORMS]
    texts += [
        *IMPRESSION_DEVICES_ONLY,
        *IMPRESSION_UNCERTAIN_ONLY,
        *FILLERS,
        "also noted possible and without is are",
    ]
    texts += [s for report in NORMAL_REPORTS for s in report]
    texts += [option for options in SLOTS.values() for option in options]
    words: set[str] = set()
    for text in texts:
        words.update(re.findall(r"[a-z0-9]+", re.sub(r"\{\w+\}", " ", text.lower())))
    return words
