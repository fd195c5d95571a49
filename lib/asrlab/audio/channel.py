"""Simulated recording channel for the real-proxy pool: room reverberation, additive noise, gain.

A shoebox room (pyroomacoustics image-source method) of random size and RT60 with random source and
microphone positions gives a room impulse response; noise is added at a random SNR; a random gain sets
the level. Every draw comes from one per-utterance seed, so the same (audio, seed) gives the same output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyroomacoustics as pra
from scipy.signal import fftconvolve


@dataclass(frozen=True)
class ChannelConfig:
    room_min: tuple[float, float, float] = (3.0, 3.0, 2.4)
    room_max: tuple[float, float, float] = (8.0, 6.0, 3.5)
    rt60: tuple[float, float] = (0.15, 0.45)
    snr_db: tuple[float, float] = (15.0, 30.0)
    gain_db: tuple[float, float] = (-6.0, 3.0)
    noise: str = "pink"        # "white" or "pink"
    max_order: int = 12        # image-source order cap: bounds cost for long RT60s
    wall_margin: float = 0.5   # metres kept between source/mic and the walls

    @classmethod
    def from_params(cls, p: dict) -> "ChannelConfig":
        unknown = set(p) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown channel parameter(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})

    def as_dict(self) -> dict:
        return asdict(self)


def draw(cfg: ChannelConfig, seed: int) -> dict:
    """The channel's random parameters for one utterance (logged in the manifest)."""
    rng = np.random.default_rng(seed)
    room = rng.uniform(cfg.room_min, cfg.room_max)
    m = cfg.wall_margin
    src, mic = (rng.uniform([m, m, 1.0], room - [m, m, 0.8]) for _ in range(2))
    return {
        "room": np.round(room, 3).tolist(), "source": np.round(src, 3).tolist(), "mic": np.round(mic, 3).tolist(),
        "rt60": round(float(rng.uniform(*cfg.rt60)), 3), "snr_db": round(float(rng.uniform(*cfg.snr_db)), 2),
        "gain_db": round(float(rng.uniform(*cfg.gain_db)), 2), "noise_seed": int(rng.integers(2**31)),
    }


def room_impulse_response(d: dict, max_order: int, fs: int) -> np.ndarray:
    absorption, order = pra.inverse_sabine(d["rt60"], d["room"])
    room = pra.ShoeBox(d["room"], fs=fs, materials=pra.Material(absorption), max_order=min(order, max_order))
    room.add_source(d["source"])
    room.add_microphone(d["mic"])
    room.compute_rir()
    return np.asarray(room.rir[0][0], dtype=np.float64)


def noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if kind == "white":
        return white
    if kind != "pink":
        raise ValueError(f"unknown noise {kind!r}: 'white' or 'pink'")
    spec = np.fft.rfft(white)
    spec /= np.sqrt(np.maximum(np.arange(spec.size), 1))
    return np.fft.irfft(spec, n)


def apply(audio: np.ndarray, cfg: ChannelConfig, seed: int, fs: int = 16_000) -> tuple[np.ndarray, dict]:
    """Pass ``audio`` through the channel drawn from ``seed``; returns (audio, the drawn parameters)."""
    d = draw(cfg, seed)
    x = np.asarray(audio, dtype=np.float64)
    rir = room_impulse_response(d, cfg.max_order, fs)
    y = fftconvolve(x, rir)[: len(x) + int(0.1 * fs)]  # keep a short reverberant tail
    y *= np.sqrt(np.mean(x**2) / max(np.mean(y**2), 1e-12))  # same speech level as the dry signal
    nz = noise(cfg.noise, len(y), np.random.default_rng(d["noise_seed"]))
    nz *= np.sqrt(np.mean(y**2) / max(np.mean(nz**2), 1e-12) / 10 ** (d["snr_db"] / 10))
    y = (y + nz) * 10 ** (d["gain_db"] / 20)
    peak = np.abs(y).max()
    if peak > 0.99:  # the gain models level, not clipping
        y *= 0.99 / peak
    return y.astype(np.float32), d
