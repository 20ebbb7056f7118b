"""Report text metrics: BLEU-4, ROUGE-L, duplicate and copy rates, written out (no nltk/rouge deps).

Reports are compared as token sequences (any hashable tokens: words or vocabulary ids), so the
caller decides the normalisation once and both sides go through it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np

Tokens = Sequence[Hashable]
BLEU_ORDER = 4


def ngram_counts(tokens: Tokens, n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


class ReferenceReports:
    """A set of reference reports, prepared once and scored against many candidates.

    BLEU-4 is the multi-reference definition (n-gram counts clipped by the largest count in any
    reference, brevity penalty against the closest reference length) with BLEU+1 smoothing (Lin
    and Och 2004: add one to the matched and total counts of 2- to 4-grams), so one missing 4-gram
    does not zero a sentence's score. ROUGE-L is the LCS F1 against the best-matching reference.
    """

    def __init__(self, references: Sequence[Tokens]) -> None:
        if not references:
            raise ValueError("ReferenceReports needs at least one reference")
        self.lengths = np.array([len(r) for r in references])
        self.max_counts: list[Counter] = []
        for n in range(1, BLEU_ORDER + 1):
            merged: Counter = Counter()
            for reference in references:
                merged |= ngram_counts(reference, n)  # | keeps the larger count
            self.max_counts.append(merged)
        # references as a padded integer matrix for the vectorised LCS; -1 pads and never matches
        self.token_ids: dict[Hashable, int] = {}
        for reference in references:
            for token in reference:
                self.token_ids.setdefault(token, len(self.token_ids))
        self.matrix = np.full((len(references), max(1, self.lengths.max())), -1, dtype=np.int64)
        for row, reference in enumerate(references):
            self.matrix[row, : len(reference)] = [self.token_ids[t] for t in reference]

    def bleu4(self, candidate: Tokens) -> float:
        if not candidate:
            return 0.0
        log_precision = 0.0
        for n in range(1, BLEU_ORDER + 1):
            counts = ngram_counts(candidate, n)
            matched = sum(min(c, self.max_counts[n - 1][g]) for g, c in counts.items())
            total = sum(counts.values())
            if n > 1:
                matched, total = matched + 1, total + 1
            if matched == 0:
                return 0.0
            log_precision += math.log(matched / total) / BLEU_ORDER
        length = len(candidate)
        closest = int(min(self.lengths, key=lambda r: (abs(int(r) - length), r)))
        brevity = 1.0 if length > closest else math.exp(1.0 - closest / length)
        return brevity * math.exp(log_precision)

    def lcs_lengths(self, candidate: Tokens) -> np.ndarray:
        """LCS length of the candidate with every reference at once, one numpy row per token.

        Row update: dp[j] = max over k <= j of max(prev[k], prev[k-1] + match[k]); the running
        maximum replaces the left-neighbour term of the textbook recurrence.
        """
        previous = np.zeros((len(self.matrix), self.matrix.shape[1] + 1), dtype=np.int64)
        for token in candidate:
            token_id = self.token_ids.get(token, -2)
            match = self.matrix == token_id
            step = np.maximum(previous[:, 1:], previous[:, :-1] + match)
            current = np.zeros_like(previous)
            current[:, 1:] = np.maximum.accumulate(step, axis=1)
            previous = current
        return previous[:, -1]

    def rouge_l(self, candidate: Tokens) -> float:
        if not candidate:
            return 0.0
        lcs = self.lcs_lengths(candidate).astype(np.float64)
        lengths = np.maximum(self.lengths, 1)
        precision = lcs / len(candidate)
        recall = lcs / lengths
        denominator = precision + recall
        f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(lcs), where=lcs > 0)
        return float(f1.max())


def duplicate_rate(reports: Sequence[Tokens]) -> float:
    """Share of reports identical to at least one other report in the same list."""
    if not reports:
        return 0.0
    counts = Counter(tuple(r) for r in reports)
    return sum(c for c in counts.values() if c > 1) / len(reports)


def copy_rate(reports: Sequence[Tokens], references: Sequence[Tokens]) -> float:
    """Share of reports identical to some reference: a memorisation signal for synthetic text."""
    if not reports:
        return 0.0
    known = {tuple(r) for r in references}
    return sum(tuple(r) in known for r in reports) / len(reports)


def distinct_tokens(reports: Sequence[Tokens]) -> int:
    return len({t for r in reports for t in r})
