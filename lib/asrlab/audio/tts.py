"""TTS engines behind one small interface: ``engine.synthesize(text, voice, rate, pitch) -> 16 kHz float32``.

- ``espeak``: espeak-ng formant voices (``en-us`` and its ``+m1…+f4`` variants): the synthetic pool.
- ``mbrola``: MBROLA diphone voices, which concatenate recordings of human speakers, driven through
  espeak-ng (``mb-us1`` …, and ``mb-de2-en`` … for foreign-accented English): the real-proxy and accent pools.

Both come from Debian packages (``scripts/setup-system.sh``); a missing program or voice raises
:class:`EngineUnavailable` saying what to install.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from functools import lru_cache
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

SAMPLE_RATE = 16_000
MBROLA_DIRS = (Path("/usr/share/mbrola"), Path("/usr/share/mbrola/voices"), Path("/usr/local/share/mbrola"))


class EngineUnavailable(RuntimeError):
    """A TTS program or voice is not installed."""


class SynthesisError(RuntimeError):
    """The engine ran but produced no usable audio for one utterance."""


def to_mono_16k(audio: np.ndarray, sr: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if sr != SAMPLE_RATE:
        g = gcd(sr, SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, sr // g).astype(np.float32)
    return audio


@lru_cache(maxsize=2)
def espeak_voice_names(binary: str = "espeak-ng") -> tuple[frozenset, frozenset]:
    """(voice names and language codes, variant names) that espeak-ng lists, lower-cased."""
    def table(arg: str) -> list[list[str]]:
        out = subprocess.run([binary, arg], capture_output=True, text=True, check=False).stdout
        return [line.split() for line in out.splitlines()[1:] if len(line.split()) >= 5]

    voices = set()
    for row in table("--voices"):
        voices.update({row[1].lower(), row[3].lower(), Path(row[4]).name.lower()})
    variants = {Path(row[4]).name.lower() for row in table("--voices=variant")}
    return frozenset(voices), frozenset(variants)


class EspeakEngine:
    name = "espeak"
    voice_prefix = "en"
    voice_hint = "an English espeak-ng voice such as 'en-us' or 'en-us+f3'"

    def __init__(self, binary: str = "espeak-ng"):
        self.binary = binary

    def check(self, voices: list[str]) -> None:
        if shutil.which(self.binary) is None:
            raise EngineUnavailable(
                f"{self.binary} not found on PATH: run `bash scripts/setup-system.sh` "
                "(Debian package espeak-ng; conda: espeak-ng from conda-forge)")
        for v in voices:
            self._check_voice(v)

    def _check_voice(self, voice: str) -> None:
        self._check_prefix(voice)
        # espeak-ng silently falls back to another voice for an unknown name: check against its own lists.
        base, _, variant = voice.partition("+")
        known, variants = espeak_voice_names(self.binary)
        if base.lower() not in known:
            raise ValueError(f"unknown {self.name} voice {voice!r}: espeak-ng has no voice {base!r} "
                             "(see `espeak-ng --voices=en`)")
        if variant and variant.lower() not in variants:
            raise ValueError(f"unknown {self.name} voice {voice!r}: espeak-ng has no variant {variant!r} "
                             "(see `espeak-ng --voices=variant`)")

    def _check_prefix(self, voice: str) -> None:
        if not voice.startswith(self.voice_prefix):
            raise ValueError(f"unknown {self.name} voice {voice!r}: expected {self.voice_hint}")

    def synthesize(self, text: str, voice: str, rate: int = 175, pitch: int = 50) -> np.ndarray:
        cmd = [self.binary, "-v", voice, "-s", str(int(rate)), "-p", str(int(pitch)), "--stdout", text]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        except subprocess.TimeoutExpired as e:
            raise SynthesisError(f"{self.name} timed out on {text!r}") from e
        if proc.returncode != 0 or len(proc.stdout) <= 44:
            err = proc.stderr.decode(errors="replace").strip()
            raise SynthesisError(f"{self.name} voice {voice} produced no audio for {text!r}: {err or 'empty output'}")
        audio, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
        if audio.size == 0 or not np.any(audio):
            raise SynthesisError(f"{self.name} voice {voice} produced silence for {text!r}")
        return to_mono_16k(audio, sr)


class MbrolaEngine(EspeakEngine):
    name = "mbrola"
    voice_prefix = "mb-"
    voice_hint = "an MBROLA voice such as 'mb-us1' or 'mb-de2-en'"

    def check(self, voices: list[str]) -> None:
        super().check(voices)
        if shutil.which("mbrola") is None:
            raise EngineUnavailable("mbrola not found on PATH: run `bash scripts/setup-system.sh` (Debian "
                                    "package mbrola, in the contrib/non-free components)")

    def _check_voice(self, voice: str) -> None:
        self._check_prefix(voice)
        db = voice[3:].split("-")[0]  # mb-de2-en -> de2
        if not any((d / db / db).is_file() for d in MBROLA_DIRS):
            raise EngineUnavailable(
                f"MBROLA voice database {db!r} (for {voice}) is not installed: install Debian package "
                f"mbrola-{db} (`bash scripts/setup-system.sh` installs the project's voices)")


ENGINES = {"espeak": EspeakEngine, "mbrola": MbrolaEngine}


def get_engine(name: str):
    try:
        return ENGINES[name]()
    except KeyError:
        raise ValueError(f"unknown TTS engine {name!r}; choose one of {sorted(ENGINES)}") from None
