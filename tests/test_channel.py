"""Simulated recording channel: seeded, SNR as drawn, never clipping."""

from __future__ import annotations

import numpy as np
import pytest
from datahelpers import SR, tone

from asrlab.audio import channel
from asrlab.audio.channel import ChannelConfig

CFG = ChannelConfig(rt60=(0.15, 0.3), max_order=8)


def speechlike(seconds: float = 1.5, seed: int = 0) -> np.ndarray:
    """Amplitude-modulated harmonic signal, a cheap stand-in for speech."""
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    x = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) / k for k, f in enumerate((150, 300, 450, 900), 1))
    return (0.3 * x * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def test_same_seed_same_output_different_seed_different_output():
    x = speechlike()
    y1, d1 = channel.apply(x, CFG, seed=11)
    y2, d2 = channel.apply(x, CFG, seed=11)
    y3, d3 = channel.apply(x, CFG, seed=12)
    assert np.array_equal(y1, y2) and d1 == d2
    assert d3 != d1
    assert y3.shape != y1.shape or not np.allclose(y1, y3, atol=1e-3)
    assert y1.dtype == np.float32 and y1.ndim == 1


def test_draws_within_configured_ranges():
    cfg = ChannelConfig(rt60=(0.2, 0.3), snr_db=(10, 12), gain_db=(-2, -1))
    for seed in range(30):
        d = channel.draw(cfg, seed)
        assert 0.2 <= d["rt60"] <= 0.3 and 10 <= d["snr_db"] <= 12 and -2 <= d["gain_db"] <= -1
        room = np.array(d["room"])
        assert np.all(room >= np.array(cfg.room_min) - 1e-3) and np.all(room <= np.array(cfg.room_max) + 1e-3)
        for pos in (d["source"], d["mic"]):
            assert np.all(np.array(pos) > 0) and np.all(np.array(pos) < room)
    assert len({channel.draw(cfg, s)["snr_db"] for s in range(30)}) > 20


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_snr_roughly_as_drawn(seed):
    """Polarity trick: the channel is linear in the speech and adds the same noise whatever its sign, so
    y(x) - y(-x) is twice the reverberant speech and y(x) + y(-x) twice the noise."""
    cfg = ChannelConfig(rt60=(0.15, 0.45), snr_db=(5, 30), gain_db=(-6, 0))
    x = speechlike(2.0, seed)
    y_pos, d = channel.apply(x, cfg, seed)
    y_neg, d_neg = channel.apply(-x, cfg, seed)
    assert d == d_neg
    speech, noise = (y_pos - y_neg) / 2, (y_pos + y_neg) / 2
    assert np.sqrt(np.mean(noise**2)) > 1e-4  # there is noise at all
    snr = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2))
    assert abs(snr - d["snr_db"]) < 0.5, (snr, d)


def test_gain_sets_level_and_nothing_clips():
    x = tone(1.0, amp=0.99)
    loud = ChannelConfig(rt60=(0.15, 0.2), gain_db=(12.0, 12.0), snr_db=(20, 20), max_order=6)
    y, _ = channel.apply(x, loud, seed=5)
    assert np.abs(y).max() <= 0.99 + 1e-6
    assert np.abs(y).max() > 0.9  # rescaled to just below full scale, not squashed
    quiet = ChannelConfig(rt60=(0.15, 0.2), gain_db=(-6.0, -6.0), snr_db=(30, 30), max_order=6)
    z, _ = channel.apply(tone(1.0, amp=0.1), quiet, seed=5)
    rms_in, rms_out = np.sqrt(np.mean(tone(1.0, amp=0.1) ** 2)), np.sqrt(np.mean(z[:SR] ** 2))
    assert abs(20 * np.log10(rms_out / rms_in) - (-6.0)) < 1.0


def test_output_length_keeps_a_short_tail():
    x = speechlike(1.0)
    y, _ = channel.apply(x, CFG, seed=3)
    assert x.size < y.size <= x.size + int(0.1 * SR)


def test_white_and_pink_noise():
    rng = np.random.default_rng(0)
    white, pink = channel.noise("white", 2**15, rng), channel.noise("pink", 2**15, rng)
    spec = np.abs(np.fft.rfft(pink)) ** 2
    assert spec[10:100].mean() > 10 * spec[-1000:].mean()  # pink: energy falls with frequency
    wspec = np.abs(np.fft.rfft(white)) ** 2
    assert 0.5 < wspec[10:100].mean() / wspec[-1000:].mean() < 2
    with pytest.raises(ValueError, match="unknown noise 'brown'"):
        channel.noise("brown", 10, rng)


def test_config_from_params():
    cfg = ChannelConfig.from_params({"rt60": [0.2, 0.4], "snr_db": [10, 20], "noise": "white"})
    assert cfg.rt60 == (0.2, 0.4) and cfg.noise == "white" and cfg.max_order == 12
    with pytest.raises(ValueError, match=r"unknown channel parameter\(s\) \['snr'\]"):
        ChannelConfig.from_params({"snr": [10, 20]})
