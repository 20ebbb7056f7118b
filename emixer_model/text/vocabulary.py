"""The fixed report vocabulary and the report <-> token id codec.

The vocabulary ships with the package (vocabulary.json) and is never fitted on a site's data:
a fitted vocabulary would carry rare words such as patient or doctor names out of a hospital
inside the model's embedding table (docs/PRIVACY.md invariant 5). Words outside it become UNK.
"""

from __future__ import annotations

import json
import re
from importlib import resources

import numpy as np
import torch

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")


def _load_words() -> tuple[str, ...]:
    text = resources.files("emixer_model.text").joinpath("vocabulary.json").read_text("utf-8")
    return tuple(json.loads(text)["words"])


WORDS: tuple[str, ...] = _load_words()
VOCAB_SIZE: int = len(SPECIALS) + len(WORDS)
WORD_TO_ID: dict[str, int] = {word: i + len(SPECIALS) for i, word in enumerate(WORDS)}

_SENTENCE_SPLIT = re.compile(r"[.!?;\n]+")
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[list[str]]:
    """Lowercased words per sentence; sentences end at . ! ? ; or a newline, empty ones dropped."""
    if not isinstance(text, str):
        raise TypeError(
            f"a report must be a string, not {type(text).__name__}; "
            "write an empty string for a study without a report"
        )
    sentences = (_WORD.findall(part) for part in _SENTENCE_SPLIT.split(text.lower()))
    return [words for words in sentences if words]


def encode_report(text: str, max_sentences: int, max_words: int) -> np.ndarray:
    """Token ids [max_sentences, max_words]: each sentence's word ids then EOS, PAD-filled.

    Sentences past max_sentences are dropped and words past max_words - 1 are cut so every
    stored sentence still ends in EOS (the decoder learns where sentences stop).
    """
    if max_sentences < 1 or max_words < 2:
        raise ValueError(
            f"report caps {max_sentences} sentences x {max_words} words are too small; "
            "need at least 1 sentence and 2 words (one word plus EOS)"
        )
    ids = np.full((max_sentences, max_words), PAD, dtype=np.int64)
    for row, words in enumerate(tokenize(text)[:max_sentences]):
        kept = [WORD_TO_ID.get(word, UNK) for word in words[: max_words - 1]]
        ids[row, : len(kept)] = kept
        ids[row, len(kept)] = EOS
    return ids


def fits_caps(text: str, max_sentences: int, max_words: int) -> bool:
    """Whether encode_report keeps the whole report (the loader logs how many it had to cut)."""
    sentences = tokenize(text)
    return len(sentences) <= max_sentences and all(len(w) < max_words for w in sentences)


def decode_report(ids: np.ndarray | torch.Tensor) -> str:
    """Readable text of an id grid [S, W]: "Word word. Word word." (UNK shown as <unk>).

    PAD and BOS are skipped and a sentence stops at its first EOS, so generated grids with
    junk after EOS decode to clean text.
    """
    grid = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if grid.ndim != 2:
        raise ValueError(f"decode_report needs one report of shape [S, W], got shape {grid.shape}")
    if grid.size and (grid.min() < 0 or grid.max() >= VOCAB_SIZE):
        raise ValueError(
            f"token ids must lie in [0, {VOCAB_SIZE}); got {grid.min()}..{grid.max()} — "
            "was the report made with a different vocabulary?"
        )
    sentences = []
    for row in grid.tolist():
        words = []
        for token in row:
            if token == EOS:
                break
            if token in (PAD, BOS):
                continue
            words.append(SPECIALS[UNK] if token == UNK else WORDS[token - len(SPECIALS)])
        if words:
            sentence = " ".join(words)
            sentences.append(sentence[0].upper() + sentence[1:])
    return ". ".join(sentences) + "." if sentences else ""
