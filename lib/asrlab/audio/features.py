"""80-dim log-mel features (Whisper's recipe, so real Whisper checkpoints accept them) and the sharded store.

Features are computed once per utterance and stored as float16 tensors in safetensors shards; an index
(JSON lines, one row per utterance with its manifest columns, shard and frame count) is what every model
stage reads. :class:`FeatureStore` loads an utterance by id without reading whole shards into memory.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import WhisperFeatureExtractor


@lru_cache(maxsize=4)
def _extractor(n_mels: int, n_fft: int, hop: int) -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=n_mels, n_fft=n_fft, hop_length=hop, sampling_rate=16_000)


def log_mel(audio: np.ndarray, n_mels: int = 80, n_fft: int = 400, hop: int = 160) -> np.ndarray:
    """(frames, n_mels) float32 log-mel of 16 kHz audio, padded to the utterance's own length only."""
    fe = _extractor(n_mels, n_fft, hop)
    feats = fe(audio, sampling_rate=16_000, padding="longest", truncation=False, return_tensors="np")
    return feats["input_features"][0].T.astype(np.float32)


class FeatureStore:
    """Read features by utterance id from ``<dir>/index.jsonl`` and its shards."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index = self.dir / "index.jsonl"
        if not index.is_file():
            raise FileNotFoundError(f"{index}: no feature index; run `dvc repro features` first")
        with open(index) as f:
            self.rows = {r["id"]: r for r in map(json.loads, f)}
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, utt_id: str) -> bool:
        return utt_id in self.rows

    def load(self, utt_id: str) -> torch.Tensor:
        try:
            shard = self.rows[utt_id]["shard"]
        except KeyError:
            raise KeyError(f"utterance {utt_id!r} is not in {self.dir / 'index.jsonl'}") from None
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._handles[shard].get_tensor(utt_id).float()
