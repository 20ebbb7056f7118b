"""A small grammar of chest X-ray report sentences, used to write phantom reports.

Phantom hospitals need reports whose findings are known exactly, so a rule labeler can later
check whether a synthetic report states its label. Reports vary in phrasing (several templates
per finding), negate some absent findings and hedge uncertain ones ("possible ...", "cannot
exclude ..."), and always fit the default text caps of ModelConfig (6 sentences x 11 words + EOS).

There is ONE public grammar (PUBLIC_GRAMMAR): the public phantom collection, the report warm
start and the reports written for public studies without one all use it. A site's grammar is the
public grammar plus site-only parts (docs/PHANTOM_WORLD.md): the sentences of the site-only
finding (SITE_ONLY_PARTS), and a site's own phrasing of a shared finding (SITE_PHRASING_PARTS,
recognised by `uses_site_phrasing`). No public text ever uses a site-only part, so an experiment
can tell whether a release learned something only the sites knew.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np

from emixer_model.config import FINDINGS
from emixer_model.text.vocabulary import tokenize

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


@dataclass(frozen=True)
class Grammar:
    """One reporting style: the sentences it writes for each finding it names.

    positive and uncertain hold sentence templates with {slot}s (SLOTS); negated holds noun
    phrases NEGATION_FORMS deny; negated_sentences whole sentences that deny without a negation
    word; short the finding's name in impressions and merged sentences. A finding without
    positive sentences is one this style never names, not even to deny it.
    """

    name: str
    positive: Mapping[str, tuple[str, ...]]
    uncertain: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    negated: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    negated_sentences: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    short: Mapping[str, str] = field(default_factory=dict)

    @property
    def findings(self) -> tuple[str, ...]:
        """The findings this style names, in FINDINGS order."""
        return tuple(f for f in FINDINGS if f in self.positive)

    def plus(self, parts: Grammar) -> Grammar:
        """This grammar with `parts` added: where `parts` has sentences of a kind for a finding,
        they take the place of this grammar's (a site phrases a shared finding its own way) or
        add a finding this grammar never names (the site-only finding)."""
        merged = {
            f.name: {**getattr(self, f.name), **getattr(parts, f.name)}
            for f in fields(self)
            if f.name != "name"
        }
        return Grammar(name=f"{self.name} + {parts.name}", **merged)


PUBLIC_GRAMMAR = Grammar(
    name="public",
    positive=POSITIVE,
    uncertain=UNCERTAIN,
    negated=NEGATED,
    negated_sentences=NEGATED_SENTENCES,
    short=SHORT,
)

# The finding only some sites see: free air under the diaphragm, as at a surgical or trauma
# hospital. It is in FINDINGS (fixed in code) but no public text names it.
SITE_ONLY_FINDING = "Pneumoperitoneum"
SITE_ONLY_PARTS = Grammar(
    name="site-only finding",
    positive={
        SITE_ONLY_FINDING: (
            "there is free air under the {side} hemidiaphragm",
            "free subdiaphragmatic air consistent with pneumoperitoneum",
            "{size} pneumoperitoneum with free air under both hemidiaphragms",
            "pneumoperitoneum is present",
        )
    },
    uncertain={
        SITE_ONLY_FINDING: (
            "possible free air under the {side} hemidiaphragm",
            "a small pneumoperitoneum cannot be excluded",
            "questionable free subdiaphragmatic air",
        )
    },
    negated={SITE_ONLY_FINDING: ("free air", "pneumoperitoneum", "free subdiaphragmatic air")},
    short={SITE_ONLY_FINDING: "pneumoperitoneum"},
)
SITE_GRAMMAR = PUBLIC_GRAMMAR.plus(SITE_ONLY_PARTS)  # a site that sees the site-only finding
# A site's own phrasing of a shared finding: every positive cardiomegaly sentence of such a site
# names the cardiothoracic ratio, a phrase no public text uses (SITE_PHRASING recognises it).
SITE_PHRASING_PARTS = Grammar(
    name="site phrasing",
    positive={
        "Cardiomegaly": (
            "the cardiothoracic ratio is increased",
            "the cardiothoracic ratio is {adv} increased",
            "increased cardiothoracic ratio consistent with cardiomegaly",
        )
    },
)
SITE_PHRASING: dict[str, re.Pattern[str]] = {
    "Cardiomegaly": re.compile(r"\bcardiothoracic ratio\b"),
}


def uses_site_phrasing(report: str, finding: str) -> bool:
    """Whether a report (written, or decoded from token ids) states `finding` in a site's own
    phrasing: what shows that a site's phrasing reached a release."""
    if finding not in SITE_PHRASING:
        raise ValueError(
            f"no site phrasing is defined for {finding!r}; findings with one: "
            + ", ".join(SITE_PHRASING)
        )
    return any(SITE_PHRASING[finding].search(" ".join(words)) for words in tokenize(report))


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


def _check_labels(labels: dict[str, int], grammar: Grammar) -> None:
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
        if value != 0 and name != "No Finding" and name not in grammar.positive:
            raise ValueError(
                f"the {grammar.name} grammar never names {name!r}; write its reports with a "
                "grammar that has its sentences (a site's), or leave the finding out"
            )


def _negations(
    absent: list[str], room: int, rng: np.random.Generator, grammar: Grammar
) -> list[str]:
    """Up to `room` sentences denying some absent findings (one or two per sentence)."""
    chosen = [absent[i] for i in rng.permutation(len(absent))][: int(rng.integers(1, 4))]
    out: list[str] = []
    while chosen and len(out) < room:
        first = chosen.pop(0)
        if first in grammar.negated_sentences and rng.random() < 0.6:
            out.append(_pick(grammar.negated_sentences[first], rng))
        elif chosen and rng.random() < 0.5:
            second = chosen.pop(0)
            a, b = (
                _pick(tuple(p for p in grammar.negated[f] if " or " not in p), rng)
                for f in (first, second)
            )
            be = "are" if a in PLURAL else "is"
            out.append(_pick(NEGATION_PAIR_FORMS, rng).format(a=a, b=b, be=be))
        else:
            a = _pick(grammar.negated[first], rng)
            be = "are" if a in PLURAL else "is"
            out.append(_pick(NEGATION_FORMS, rng).format(a=a, be=be))
    return out


def _attach_without(
    sentences: list[str], absent: list[str], rng: np.random.Generator, grammar: Grammar
) -> None:
    """Deny one absent finding inside a positive sentence ("... effusion without pneumothorax").

    The denied finding is removed from `absent` so it is not denied twice.
    """
    finding = absent[rng.integers(len(absent))]
    phrase = _pick(grammar.negated[finding], rng)
    for i, sentence in enumerate(sentences):
        if len(sentence.split()) + 1 + len(phrase.split()) <= MAX_WORDS:
            sentences[i] = f"{sentence} without {phrase}"
            absent.remove(finding)
            return


def _abnormal(
    positive: list[str],
    uncertain: list[str],
    absent: list[str],
    rng: np.random.Generator,
    grammar: Grammar,
) -> list[str]:
    """Findings first (positive, then uncertain), an impression, then negations if room is left."""
    short = grammar.short
    if len(positive) + len(uncertain) + 1 <= MAX_SENTENCES:
        sentences = [_fill(_pick(grammar.positive[f], rng), rng) for f in positive]
        if absent and rng.random() < 0.4:
            _attach_without(sentences, absent, rng, grammar)
        sentences += [_fill(_pick(grammar.uncertain[f], rng), rng) for f in uncertain]
        pathology = [short[f] for f in positive if f != "Support Devices"][:3]
        if pathology:
            impression = _pick(IMPRESSION_FORMS, rng).format(a=_join(pathology))
        elif positive:
            impression = _pick(IMPRESSION_DEVICES_ONLY, rng)
        else:
            impression = _pick(IMPRESSION_UNCERTAIN_ONLY, rng)
        room = MAX_SENTENCES - len(sentences) - 1
        if room and absent:
            sentences += _negations(absent, room, rng, grammar)
        if len(sentences) < MAX_SENTENCES - 1 and rng.random() < 0.3:
            sentences.append(_pick(FILLERS, rng))
        return sentences + [impression]
    # Too many findings for one sentence each: state the last ones together, hedged ones last.
    room = MAX_SENTENCES - (1 if uncertain else 0)
    single = positive if len(positive) <= room else positive[: room - 1]
    sentences = [_fill(_pick(grammar.positive[f], rng), rng) for f in single]
    rest = positive[len(single) :]
    if rest:
        sentences.append("also noted: " + _join([short[f] for f in rest]))
    if uncertain:
        sentences.append("possible " + _join([short[f] for f in uncertain]))
    return sentences


def write_report(
    labels: dict[str, int], rng: np.random.Generator, grammar: Grammar = PUBLIC_GRAMMAR
) -> str:
    """Write a findings + impression report stating exactly the given labels, in `grammar`'s style.

    labels maps FINDINGS names to 1 (positive), 0 (negative) or -1 (uncertain); a finding left
    out is blank. Positive and uncertain findings are always stated; some negative or blank ones
    the grammar names are denied explicitly. "No Finding" alone (nothing else positive or
    uncertain) gives a normal report; a positive finding overrides a contradictory "No Finding".
    A positive or uncertain finding the grammar never names raises ValueError (the public grammar
    never writes the site-only finding).
    """
    _check_labels(labels, grammar)
    others = grammar.findings
    positive = [f for f in others if labels.get(f) == 1]
    uncertain = [f for f in others if labels.get(f) == -1]
    absent = [f for f in others if labels.get(f) not in (1, -1)]
    positive = [positive[i] for i in rng.permutation(len(positive))]
    if positive or uncertain:
        sentences = _abnormal(positive, uncertain, absent, rng, grammar)
    else:
        sentences = list(_pick(NORMAL_REPORTS, rng))
        mentioned = " ".join(sentences)
        unsaid = [f for f in absent if grammar.short[f].split()[-1] not in mentioned]
        room = MAX_SENTENCES - len(sentences) - 1
        if unsaid and rng.random() < 0.5:
            sentences[-1:-1] = _negations(unsaid, room, rng, grammar)
    return " ".join(s[0].upper() + s[1:] + "." for s in sentences)


def grammar_words(grammar: Grammar) -> set[str]:
    """Every word write_report can emit with `grammar`: the vocabulary must cover it, and words
    only a site-only part uses must never appear in public text."""
    texts: list[str] = [
        t
        for group in (
            grammar.positive,
            grammar.uncertain,
            grammar.negated,
            grammar.negated_sentences,
        )
        for options in group.values()
        for t in options
    ]
    texts += [*NEGATION_FORMS, *NEGATION_PAIR_FORMS, *grammar.short.values(), *IMPRESSION_FORMS]
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
