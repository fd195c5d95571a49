"""Reading audio for features and training: validated, mono, 16 kHz.

Policy (documented in the README): stereo is downmixed and other sample rates are resampled, each with a
warning; unreadable, empty, zero-length or silent audio raises :class:`BadAudio` naming the file, and the
calling stage puts that utterance into its rejects list instead of failing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import soundfile as sf

from asrlab.audio.tts import SAMPLE_RATE, to_mono_16k


class BadAudio(ValueError):
    """An audio file that cannot be used; the message names the file and the problem."""


def load_audio(path: str | Path, min_seconds: float = 0.05) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise BadAudio(f"{path}: audio file does not exist")
    if path.stat().st_size == 0:
        raise BadAudio(f"{path}: empty file (0 bytes)")
    try:
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise BadAudio(f"{path}: unreadable audio ({e}); re-encode it or drop the utterance") from e
    if audio.shape[0] == 0:
        raise BadAudio(f"{path}: zero-length audio")
    if audio.shape[1] > 1:
        warnings.warn(f"{path}: {audio.shape[1]} channels, downmixed to mono", stacklevel=2)
    if sr != SAMPLE_RATE:
        warnings.warn(f"{path}: sample rate {sr} Hz, resampled to {SAMPLE_RATE} Hz", stacklevel=2)
    audio = to_mono_16k(audio, sr)
    if audio.size < min_seconds * SAMPLE_RATE:
        raise BadAudio(f"{path}: {audio.size / SAMPLE_RATE:.3f} s is shorter than {min_seconds} s")
    if not np.isfinite(audio).all():
        raise BadAudio(f"{path}: audio holds NaN or inf samples")
    if not np.any(audio):
        raise BadAudio(f"{path}: audio is all zeros")
    return audio
