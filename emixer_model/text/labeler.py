"""A negation-aware rule labeler: which findings does a report state, deny or hedge?

It turns real and synthetic reports into CheXpert-style labels so an evaluation can measure
whether a generated report states the label it was generated for. Rules in the NegEx style:
a finding mention (with synonyms) is negated or uncertain when a cue precedes it in the same
sentence (up to a scope break such as "but") or a post-cue follows it ("... cannot be excluded").
Text is tokenised exactly as the vocabulary does, so a decoded report labels like its source.
"""

from __future__ import annotations

import re

from emixer_model.config import FINDINGS
from emixer_model.text.vocabulary import tokenize


def _any(*patterns: str) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(patterns) + r")\b")


MENTIONS: dict[str, re.Pattern[str]] = {
    "Cardiomegaly": _any(
        r"cardiomegaly",
        r"(?:heart|cardiac silhouette|cardiac shadow|cardiomediastinal silhouette)"
        r"(?: \w+){0,3} enlarged",
        r"enlarged (?:heart|cardiac silhouette)",
        r"(?:cardiac|heart) enlargement",
        r"enlargement of the (?:heart|cardiac silhouette)",
        r"cardiothoracic ratio(?: \w+){0,2} increased",
        r"increased cardiothoracic ratio",
    ),
    "Pleural Effusion": _any(
        r"effusions?",
        r"pleural fluid",
        r"hydrothorax",
        r"costophrenic (?:angle )?blunting",
        r"blunting of the(?: \w+)? costophrenic",
    ),
    "Consolidation": _any(
        r"consolidations?",
        r"consolidative",
        r"airspace (?:opacity|opacities|opacification|disease)",
        r"infiltrates?",
    ),
    "Pneumothorax": _any(r"pneumothorax", r"pneumothoraces"),
    "Lung Lesion": _any(r"nodules?", r"nodular", r"masse?s?", r"lesions?", r"granulomas?"),
    "Edema": _any(
        r"edema",
        r"(?:vascular|venous|pulmonary) congestion",
        r"congestion",
        r"congestive heart failure",
        r"fluid overload",
    ),
    "Support Devices": _any(
        r"tubes?",
        r"catheters?",
        r"(?:picc|central|venous|arterial|dialysis|midline) lines?",
        r"lines (?:and|or) tubes",
        r"picc",
        r"pacemakers?",
        r"defibrillators?",
        r"(?:pacer|pacing) (?:leads?|wires?)",
        r"sternotomy wires",
        r"support devices?",
    ),
    "Pneumoperitoneum": _any(
        r"pneumoperitoneum",
        r"free (?:subdiaphragmatic |intraperitoneal )?air",
        r"subdiaphragmatic (?:free )?air",
        r"air under the (?:\w+ )?(?:hemidiaphragms?|diaphragm)",
    ),
}
# Statements that deny a finding without a negation word ("heart size is normal").
NORMAL_STATEMENTS: dict[str, re.Pattern[str]] = {
    "Cardiomegaly": _any(
        r"(?:heart size|heart|cardiac silhouette|cardiomediastinal silhouette|cardiac size)"
        r"(?: is| are| appears)?(?: \w+)? (?:normal|within normal limits|unremarkable)",
        r"normal (?:heart size|heart|cardiac silhouette|cardiomediastinal silhouette)",
    ),
}

UNCERTAIN_BEFORE = _any(
    r"possible",
    r"possibly",
    r"probable",
    r"may",
    r"might",
    r"could",
    r"questionable",
    r"question of",
    r"suspicious for",
    r"concerning for",
    r"(?:cannot|can not|could not) (?:exclude|rule out)",
    r"suggest|suggests|suggestive|suggesting",
    r"likely",
    r"equivocal",
    r"borderline",
    r"versus",
)
NEGATION_BEFORE = _any(
    r"no", r"without", r"negative for", r"free of", r"resolved", r"not", r"absence of", r"rule out"
)
UNCERTAIN_AFTER = _any(
    r"(?:cannot|can not|could not) be (?:excluded|ruled out)",
    r"not (?:excluded|ruled out)",
    r"(?:is|are) (?:possible|questioned|suspected|likely)",
    r"may be present",
)
NEGATION_AFTER = _any(
    r"(?:has|have)? ?resolved",
    r"(?:is|are|has been|have been) removed",
    r"(?:is|are) (?:absent|not seen|not identified|not present)",
    r"no longer (?:seen|present|visible)",
)
# Scope breaks: a cue before one of these does not reach a mention after it.
SCOPE_BREAK = re.compile(
    r"\b(?:but|however|although|though|while|whereas|which|and (?:there|the|a|an))\b"
)
NO_FINDING = _any(r"no acute", r"normal", r"clear", r"unremarkable", r"no active disease")


def _last_cue_end(pattern: re.Pattern[str], text: str) -> int:
    """End offset of the last cue in text, -1 when there is none."""
    ends = [m.end() for m in pattern.finditer(text)]
    return ends[-1] if ends else -1


def _mention_value(sentence: str, start: int, end: int) -> int:
    """1, 0 or -1 for one mention at sentence[start:end], from the cues around it."""
    breaks_before = [m.end() for m in SCOPE_BREAK.finditer(sentence, 0, start)]
    before = sentence[breaks_before[-1] if breaks_before else 0 : end]
    uncertain, negated = (
        _last_cue_end(UNCERTAIN_BEFORE, before),
        _last_cue_end(NEGATION_BEFORE, before),
    )
    if uncertain >= 0 or negated >= 0:
        return -1 if uncertain >= negated else 0
    next_break = SCOPE_BREAK.search(sentence, end)
    after = sentence[end : next_break.start() if next_break else len(sentence)]
    if UNCERTAIN_AFTER.search(after):
        return -1
    if NEGATION_AFTER.search(after):
        return 0
    return 1


def label_report(text: str) -> dict[str, int]:
    """Finding -> 1 stated, 0 denied, -1 hedged; findings the text never mentions are left out.

    Several mentions of one finding combine as: any positive wins, then uncertain, then negated.
    "No Finding" is 1 when nothing else is positive or uncertain and the text says normal, clear
    or no acute disease.
    """
    found: dict[str, set[int]] = {}
    for words in tokenize(text):
        sentence = " ".join(words)
        for finding, pattern in MENTIONS.items():
            for m in pattern.finditer(sentence):
                found.setdefault(finding, set()).add(_mention_value(sentence, m.start(), m.end()))
        for finding, pattern in NORMAL_STATEMENTS.items():
            if pattern.search(sentence):
                found.setdefault(finding, set()).add(0)
    labels = {
        finding: 1 if 1 in values else -1 if -1 in values else 0
        for finding in FINDINGS
        if (values := found.get(finding))
    }
    if all(v == 0 for v in labels.values()) and any(
        NO_FINDING.search(" ".join(words)) for words in tokenize(text)
    ):
        labels["No Finding"] = 1
    return labels
