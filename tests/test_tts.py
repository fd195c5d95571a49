"""TTS engines: 16 kHz mono float audio of plausible length, and clear errors for missing programs / voices."""

from __future__ import annotations

import io
import re
import subprocess

import numpy as np
import pytest
import soundfile as sf

from asrlab.audio import tts
from asrlab.audio.tts import EngineUnavailable, SynthesisError, get_engine, to_mono_16k

TEXT = "set an alarm for five am tomorrow"


@pytest.mark.tts
@pytest.mark.parametrize("engine, voice", [("espeak", "en-us+f3"), ("mbrola", "mb-us1"), ("mbrola", "mb-de2-en")])
def test_engine_gives_16k_mono_float_of_plausible_length(engine, voice):
    eng = get_engine(engine)
    eng.check([voice])
    audio = eng.synthesize(TEXT, voice, rate=175, pitch=50)
    assert isinstance(audio, np.ndarray) and audio.dtype == np.float32 and audio.ndim == 1
    seconds = audio.size / tts.SAMPLE_RATE
    assert 1.0 < seconds < 5.0  # seven words at 175 wpm is ~2.4 s
    assert np.isfinite(audio).all() and 0.05 < np.abs(audio).max() <= 1.0
    # the engine's native rate (22.05 kHz for espeak-ng, 16 kHz for these MBROLA voices) became 16 kHz
    raw = subprocess.run(["espeak-ng", "-v", voice, "-s", "175", "-p", "50", "--stdout", TEXT],
                         capture_output=True, check=True).stdout
    native, sr = sf.read(io.BytesIO(raw), dtype="float32")
    assert abs(audio.size - native.shape[0] * tts.SAMPLE_RATE / sr) <= 2
    # longer text -> longer audio; faster speech -> shorter audio
    longer = eng.synthesize(TEXT + " and remind me to call my mother", voice, rate=175, pitch=50)
    faster = eng.synthesize(TEXT, voice, rate=300, pitch=50)
    assert longer.size > 1.4 * audio.size
    assert faster.size < 0.8 * audio.size


@pytest.mark.tts
def test_voices_differ():
    a = get_engine("espeak").synthesize("hello there", "en-us+f3")
    b = get_engine("espeak").synthesize("hello there", "en-us+m3")
    assert a.size != b.size or not np.allclose(a, b)


@pytest.mark.tts
def test_failing_voice_raises_synthesis_error():
    # passes the prefix check but espeak-ng has no such voice: one utterance fails, with the voice named
    with pytest.raises(SynthesisError, match="mb-zz9-en"):
        get_engine("mbrola").synthesize("hello", "mb-zz9-en")


def test_unknown_engine():
    with pytest.raises(ValueError, match=r"unknown TTS engine 'festival'.*espeak.*mbrola"):
        get_engine("festival")


@pytest.mark.tts
@pytest.mark.parametrize("engine, voice, hint", [("espeak", "fr-fr", "'en-us'"), ("espeak", "mb-us1", "'en-us'"),
                                                 ("mbrola", "en-us+f3", "'mb-us1'")])
def test_voice_of_the_wrong_kind(engine, voice, hint):
    with pytest.raises(ValueError, match=re.escape(f"unknown {engine} voice '{voice}'")) as e:
        get_engine(engine).check([voice])
    assert hint in str(e.value)


@pytest.mark.tts
@pytest.mark.parametrize("voice, what", [("en-zz", "no voice 'en-zz'"), ("en-us+zz", "no variant 'zz'")])
def test_made_up_espeak_voice_is_caught_although_espeak_would_fall_back(voice, what):
    get_engine("espeak").check(["en-us", "en-us+m1", "en-us+f4"])  # the project's voices pass
    with pytest.raises(ValueError, match=re.escape(what)):
        get_engine("espeak").check([voice])


@pytest.mark.tts
def test_uninstalled_mbrola_voice_says_what_to_install():
    with pytest.raises(EngineUnavailable, match=r"'zz9'.*mbrola-zz9"):
        get_engine("mbrola").check(["mb-us1", "mb-zz9-en"])


def test_missing_espeak_binary(monkeypatch):
    monkeypatch.setattr(tts.shutil, "which", lambda name: None)
    for engine in ("espeak", "mbrola"):
        with pytest.raises(EngineUnavailable, match=r"espeak-ng not found on PATH.*setup-system\.sh"):
            get_engine(engine).check(["en-us" if engine == "espeak" else "mb-us1"])


def test_missing_binary_by_name():
    with pytest.raises(EngineUnavailable, match="espeak-ng-not-installed-here not found"):
        tts.EspeakEngine(binary="espeak-ng-not-installed-here").check(["en-us"])


def test_missing_mbrola_binary(monkeypatch):
    real_which = tts.shutil.which
    monkeypatch.setattr(tts.shutil, "which", lambda name: None if name == "mbrola" else real_which(name) or "/x")
    with pytest.raises(EngineUnavailable, match=r"mbrola not found on PATH.*mbrola"):
        get_engine("mbrola").check(["mb-us1"])
    get_engine("espeak").check(["en-us"])  # espeak alone is still fine


def test_to_mono_16k_downmixes_and_resamples():
    t = np.arange(22050) / 22050
    left = np.sin(2 * np.pi * 300 * t).astype(np.float32)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    out = to_mono_16k(stereo, 22050)
    assert out.dtype == np.float32 and out.ndim == 1 and out.size == 16_000
    assert abs(np.abs(out[1000:-1000]).max() - 0.5) < 0.02  # mean of the two channels
    same = to_mono_16k(left[:16000], 16_000)
    assert np.array_equal(same, left[:16000])
