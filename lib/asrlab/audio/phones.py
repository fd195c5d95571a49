"""Exact frame-level phone labels for MBROLA-rendered speech.

espeak-ng drives an MBROLA voice by writing a ``.pho`` file — one phone per line with its duration in
milliseconds — and MBROLA renders each phone for exactly that long (``espeak-ng --pho`` prints the same
file without rendering). So for a row of the real-proxy or accent pools (engine ``mbrola``), re-running
espeak-ng with the row's voice, rate and pitch gives every phone's start and end in the rendered audio.
The simulated channel (:mod:`asrlab.audio.channel`) only delays the signal, by the direct path from source
to microphone (plus the centre of pyroomacoustics' fractional-delay filter); :func:`channel_delay` adds that.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pyroomacoustics as pra

SILENCE = "_"


def pho(text: str, voice: str, rate: int, pitch: int, binary: str = "espeak-ng") -> list[tuple[str, int]]:
    """[(phone, milliseconds)] that espeak-ng hands MBROLA for ``text`` in ``voice`` (an ``mb-…`` voice)."""
    if not voice.startswith("mb-"):
        raise ValueError(f"phone labels need an MBROLA voice (mb-…), got {voice!r}")
    cmd = [binary, "-v", voice, "-s", str(int(rate)), "-p", str(int(pitch)), "--pho", "-q", text]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    out = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.startswith(";"):
            out.append((parts[0], int(parts[1])))
    if not out:
        raise RuntimeError(f"espeak-ng --pho gave no phones for {text!r} in {voice}")
    return out


def channel_delay(channel: dict | None, fs: int = 16_000) -> float:
    """Seconds by which the simulated room delays the speech: direct path + fractional-delay filter centre."""
    if not channel:
        return 0.0
    dist = float(np.linalg.norm(np.asarray(channel["source"]) - np.asarray(channel["mic"])))
    return dist / pra.constants.get("c") + (pra.constants.get("frac_delay_length") // 2) / fs


def frame_labels(phones: list[tuple[str, int]], n_frames: int, frame_seconds: float, delay: float = 0.0) -> list[str]:
    """The phone at the centre of each of ``n_frames`` frames (silence before the delay and after the end)."""
    ends = np.cumsum([ms for _, ms in phones]) / 1000.0 + delay
    centres = (np.arange(n_frames) + 0.5) * frame_seconds
    idx = np.searchsorted(ends, centres, side="right")
    names = [p for p, _ in phones] + [SILENCE]
    return [SILENCE if c < delay else names[i] for c, i in zip(centres, idx)]


def row_labels(row: dict, n_frames: int, frame_seconds: float) -> list[str]:
    """Frame labels of a rendered manifest row (MBROLA engine only)."""
    if row.get("engine") != "mbrola":
        raise ValueError(f"row {row.get('id')}: phone labels exist for MBROLA renders only, not {row.get('engine')!r}")
    return frame_labels(pho(row["text"], row["voice"], row["rate"], row["pitch"]), n_frames, frame_seconds,
                        channel_delay(row.get("channel")))
