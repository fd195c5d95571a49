"""One SSL layer's frames for a set of utterances (a DVC output of ``soft_tokens_layer``), batched for the
downstream as continuous features, hard tokens or soft token distributions.

On disk: ``<dir>/<set>.safetensors`` ({utterance id: (T, D) float16}) and ``<dir>/<set>.jsonl`` (the rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from asrlab.io import atomic_path, write_jsonl
from asrlab.methods.soft_tokens import hard_assign, soft_assign
from asrlab.models.batch import pad_tokens
from asrlab.text import char_ids

ROW_KEYS = ("id", "text", "scenario", "accent", "split", "corpus", "pool", "speaker")


def save_set(directory: str | Path, name: str, rows: list[dict], frames: list[torch.Tensor]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / f"{name}.safetensors") as tmp:
        save_file({r["id"]: f.to(torch.float16).contiguous() for r, f in zip(rows, frames)}, str(tmp))
    write_jsonl(directory / f"{name}.jsonl", [{k: r.get(k) for k in ROW_KEYS} for r in rows])


class LayerSet:
    """Frames of one set, in row order. ``mode``: "features", "tokens" (hard ids) or "soft" (p(k|x))."""

    def __init__(self, directory: str | Path, name: str):
        directory = Path(directory)
        with open(directory / f"{name}.jsonl") as f:
            rows = [json.loads(line) for line in f]
        tensors = load_file(str(directory / f"{name}.safetensors"))
        self._init(rows, [tensors[r["id"]] for r in rows], name)

    @classmethod
    def from_frames(cls, rows: list[dict], frames: list[torch.Tensor], name: str) -> "LayerSet":
        """A set held in memory (the layer probe's), as if saved by :func:`save_set` and read back."""
        self = cls.__new__(cls)
        self._init(rows, [f.to(torch.float16) for f in frames], name)
        return self

    def _init(self, rows: list[dict], frames: list[torch.Tensor], name: str) -> None:
        self.rows, self.frames = rows, frames
        self.targets = [char_ids(r["text"]) for r in self.rows]
        self.lengths = [int(f.shape[0]) for f in self.frames]
        self.name = name
        self.mode, self.centroids, self.tau, self.top_k, self.tokens = "features", None, 0.0, None, None

    def __len__(self) -> int:
        return len(self.rows)

    def use(self, mode: str, centroids: torch.Tensor | None = None, tau: float = 0.0, top_k: int | None = None):
        """Set what :meth:`collate` returns; hard tokens are assigned once and cached."""
        if mode not in ("features", "tokens", "soft"):
            raise ValueError(f"unknown input mode {mode!r}")
        self.mode, self.centroids, self.tau, self.top_k = mode, centroids, tau, top_k
        if mode == "tokens":
            self.tokens = [hard_assign(f.float(), centroids) for f in self.frames]
        return self

    def inputs(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([self.lengths[i] for i in idx])
        T = int(lengths.max())
        if self.mode == "tokens":
            x = torch.zeros(len(idx), T, dtype=torch.long)
            for j, i in enumerate(idx):
                x[j, : self.lengths[i]] = self.tokens[i]
            return x, lengths
        x = torch.zeros(len(idx), T, self.frames[0].shape[1])
        for j, i in enumerate(idx):
            x[j, : self.lengths[i]] = self.frames[i].float()
        if self.mode == "soft":
            x = soft_assign(x, self.centroids, self.tau, self.top_k)
        return x, lengths

    def collate(self, idx: list[int]) -> dict:
        """The downstream's batch; ``features`` / ``feature_lengths`` as every dataset names a model's input
        frames (here ids, distributions or layer frames), so that :func:`asrlab.decode.transcribe` decodes it."""
        x, lengths = self.inputs(idx)
        targets, target_lengths = pad_tokens([self.targets[i] for i in idx])
        return {"features": x, "feature_lengths": lengths, "targets": targets, "target_lengths": target_lengths}
