"""Small helpers for the data-foundation tests: synthetic audio, fake SLURP records, prepared manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from asrlab.io import write_jsonl

SR = 16_000


def tone(seconds: float = 1.0, sr: int = SR, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_audio(path: Path, audio: np.ndarray, sr: int = SR, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, sr, **kw)
    return path


def slurp_record(sid: int, sentence: str, scenario: str = "alarm", recordings: list[str] = ()) -> dict:
    return {"slurp_id": sid, "sentence": sentence, "scenario": scenario, "intent": f"{scenario}_query",
            "recordings": [{"file": r, "wer": 0.0, "ent_wer": 0.0, "status": "correct"} for r in recordings]}


def write_records(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepared_rows(texts: list[str], scenario: str = "alarm", split: str = "train", prefix: str = "u") -> list[dict]:
    """Rows as `prepare` writes them into slurp.jsonl."""
    return [{"id": f"{prefix}{i:03d}", "text": t, "scenario": scenario, "intent": None, "corpus": "slurp",
             "recordings": [], "split": split} for i, t in enumerate(texts)]


def write_prepared(params: dict, slurp_rows: list[dict], lm_rows: list[dict] = (), recordings: list[dict] = ()) -> Path:
    """What `render` reads from `prepare`: slurp.jsonl, lm.jsonl and recordings.jsonl."""
    d = Path(params["prepare"]["out_dir"])
    write_jsonl(d / "slurp.jsonl", slurp_rows)
    write_jsonl(d / "lm.jsonl", list(lm_rows))
    write_jsonl(d / "recordings.jsonl", list(recordings))
    return d
