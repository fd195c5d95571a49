"""Projector from speech-encoder frames to LLM input embeddings: frame stacking by k, then a 2-layer MLP.

Stacking k consecutive frames (concatenating their vectors) cuts the sequence the LLM attends to by k (50 Hz
encoder frames -> 12.5 Hz at k = 4), the usual LLM-ASR recipe (e.g. SLAM-ASR, Ma et al. 2024). The two
Linear layers are named ``linear1`` / ``linear2`` so that LoRA-style adapters (HDMoLE puts its mixture of LoRA
experts here) can target them by name.
"""

from __future__ import annotations

import torch
from torch import nn


def stack_frames(hidden: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) -> (B, ceil(T / k), k * D); a partial last group is zero-padded, lengths -> ceil(len / k).

    The encoder zeroes padded frames, so a group straddling an utterance's end holds the same zeros
    whether or not the utterance is batched with a longer one.
    """
    b, t, d = hidden.shape
    pad = (-t) % k
    if pad:
        hidden = nn.functional.pad(hidden, (0, 0, 0, pad))
    return hidden.reshape(b, (t + pad) // k, k * d), (lengths + k - 1) // k


class Projector(nn.Module):
    def __init__(self, encoder_dim: int, lm_dim: int, stack: int = 4, hidden_dim: int | None = None):
        super().__init__()
        if stack < 1:
            raise ValueError(f"stack={stack} must be >= 1")
        self.stack = stack
        self.linear1 = nn.Linear(stack * encoder_dim, hidden_dim or lm_dim)
        self.act = nn.GELU()
        self.linear2 = nn.Linear(hidden_dim or lm_dim, lm_dim)

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (B, T, D) and valid lengths -> LM embeddings (B, T', H) and their lengths."""
        stacked, lengths = stack_frames(hidden, lengths, self.stack)
        return self.linear2(self.act(self.linear1(stacked))), lengths
