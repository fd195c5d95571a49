"""asrlab.text: one normalisation for references, training targets and hypotheses."""

from __future__ import annotations

import pytest

from asrlab.text import TranscriptError, fold_ascii, normalize_text, normalize_transcript


@pytest.mark.parametrize("raw, expected", [
    ("Wake me up at 5am!", "wake me up at 5am"),
    ("Café  au   lait", "cafe au lait"),
    ("naïve résumé", "naive resume"),
    ("don't stop", "don't stop"),                       # apostrophe inside a word is kept
    ("it\u2019s olly\u2018s", "it's olly's"),           # typographic apostrophes become '
    ("'quoted' words '", "quoted words"),               # lone / edge apostrophes go
    ("email: bob@example.com, now", "email bob example com now"),
    ("  tabs\tand\nnewlines  ", "tabs and newlines"),
    ("Set 2 alarms", "set 2 alarms"),                   # digits stay as written
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


def test_normalize_text_is_idempotent():
    for raw in ("Hello, World!", "it\u2019s 5PM", "Ünïcödé  text"):
        once = normalize_text(raw)
        assert normalize_text(once) == once


def test_fold_ascii_reports_characters_without_ascii_form():
    folded, dropped = fold_ascii("café 東京")
    assert folded == "cafe "
    assert dropped == "東京"


def test_normalize_transcript_accepts_foldable_accents():
    assert normalize_transcript("Crème Brûlée?", "x") == "creme brulee"


@pytest.mark.parametrize("raw", ["", "   ", None, "?!...", "' '"])
def test_normalize_transcript_rejects_empty(raw):
    with pytest.raises(TranscriptError, match="utt-7"):
        normalize_transcript(raw, "utt-7")


@pytest.mark.parametrize("raw", ["东京天气", "play 音乐 now", "привет"])
def test_normalize_transcript_rejects_non_ascii(raw):
    with pytest.raises(TranscriptError, match="non-ASCII") as e:
        normalize_transcript(raw, "file.jsonl:3")
    assert "file.jsonl:3" in str(e.value)


def test_transcript_error_is_a_value_error():
    # stages catch ValueError for bad input; TranscriptError must be one
    assert issubclass(TranscriptError, ValueError)
