"""ASR text normalisation, shared by data preparation, tokenizer training and evaluation.

One function, so that references, training targets and hypotheses are compared in the same space:
lower case, ASCII (accents folded, e.g. "café" -> "cafe"), apostrophes kept inside words, every other
punctuation mark turned into a space, whitespace collapsed. Digits are kept as written (SLURP writes
"5am"); expanding them is a modelling choice, not a normalisation.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'"})
_NOT_ALLOWED = re.compile(r"[^a-z0-9' ]+")
_LONE_APOSTROPHE = re.compile(r"(?<![a-z0-9])'|'(?![a-z0-9])")
_SPACES = re.compile(r"\s+")


class TranscriptError(ValueError):
    """A transcript that normalises to nothing, or holds characters that cannot be written in ASCII."""


def fold_ascii(text: str) -> tuple[str, str]:
    """Fold to ASCII by Unicode decomposition; returns (folded text, characters that had no ASCII form)."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES))
    kept, dropped = [], []
    for ch in decomposed:
        if ch.isascii():
            kept.append(ch)
        elif not unicodedata.combining(ch):
            dropped.append(ch)
    return "".join(kept), "".join(dropped)


def normalize_text(text: str) -> str:
    """Normalise a transcript for ASR training and scoring (see module docstring).

    Characters with no ASCII form (e.g. CJK) are removed; use :func:`normalize_transcript` to reject them.
    """
    folded, _ = fold_ascii(text)
    folded = _NOT_ALLOWED.sub(" ", folded.lower())
    folded = _LONE_APOSTROPHE.sub(" ", folded)
    return _SPACES.sub(" ", folded).strip()


def normalize_transcript(text: str, where: str = "transcript") -> str:
    """Like :func:`normalize_text`, but raises :class:`TranscriptError` naming ``where`` when the text is
    empty after normalisation or contains characters with no ASCII form (which TTS and the tokenizer
    would silently lose)."""
    if text is None or not str(text).strip():
        raise TranscriptError(f"{where}: empty transcript")
    _, dropped = fold_ascii(str(text))
    if dropped:
        raise TranscriptError(
            f"{where}: non-ASCII characters {sorted(set(dropped))!r} in {text!r}; "
            "transliterate them in the source or drop the utterance")
    norm = normalize_text(str(text))
    if not norm:
        raise TranscriptError(f"{where}: transcript {text!r} is empty after normalisation")
    return norm


@lru_cache(maxsize=1)
def _whisper_normalizer():
    # Whisper's own English normaliser (transformers ships it): numbers to digits, contractions expanded,
    # fillers and punctuation dropped. No British-to-American spelling map ships offline: an empty one.
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer
    return EnglishTextNormalizer({})


def normalize_for_scoring(text: str) -> str:
    """The one normaliser that WER/CER apply to reference and hypothesis alike.

    SLURP references are lowercase words ("wake me up at five am"); a pretrained Whisper writes cased text
    with digits and punctuation ("Wake me up at 5 a.m."). Whisper's ``EnglishTextNormalizer`` maps both into
    one space ("wake me up at 5 am"), then :func:`normalize_text` folds what is left to our alphabet.
    """
    return normalize_text(_whisper_normalizer()(text))


# Character units for CTC heads: blank = 0, then these characters (the alphabet normalize_text leaves).
CHARS = " abcdefghijklmnopqrstuvwxyz0123456789'"
_CHAR_ID = {c: i + 1 for i, c in enumerate(CHARS)}


def char_ids(text: str) -> list[int]:
    """CTC character targets of a normalised text (ids 1..len(CHARS); 0 is the blank)."""
    return [_CHAR_ID[c] for c in normalize_text(text)]


def chars_to_text(ids) -> str:
    return normalize_text("".join(CHARS[i - 1] for i in ids if 0 < i <= len(CHARS)))
