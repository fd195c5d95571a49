"""Batch conventions shared by the models, and helpers to build batches from stored utterances.

Every model's ``forward(features, feature_lengths, tokens, token_lengths)`` takes

* ``features``: (B, n_mels, T) float, padded per batch (Whisper's layout; the store holds (frames, n_mels));
* ``feature_lengths``: (B,) valid frames;
* ``tokens``: (B, U) token ids of the normalised transcript *without* bos/eos, padded with anything;
* ``token_lengths``: (B,) valid tokens.

Each model adds the bos/eos its recipe needs, so a collator does not have to know which model it feeds.
``generate`` returns ``list[list[int]]``: token ids without special tokens, ready for ``tokenizer.decode``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_features(utterances: Sequence[torch.Tensor], pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (frames, n_mels) tensors into ((B, n_mels, T_max), lengths (B,))."""
    if len(utterances) == 0:
        raise ValueError("empty batch: no utterances to pad")
    lengths = torch.tensor([u.shape[0] for u in utterances], dtype=torch.long)
    out = utterances[0].new_full((len(utterances), int(lengths.max()), utterances[0].shape[1]), pad_value)
    for i, u in enumerate(utterances):
        out[i, : u.shape[0]] = u
    return out.transpose(1, 2).contiguous(), lengths


def pad_tokens(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ((B, U_max), lengths (B,))."""
    if len(sequences) == 0:
        raise ValueError("empty batch: no token sequences to pad")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    out = torch.full((len(sequences), max(int(lengths.max()), 1)), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out, lengths


def check_tokens(tokens: torch.Tensor, token_lengths: torch.Tensor, batch_size: int, vocab_size: int) -> None:
    """Raise ValueError for targets that do not fit the batch or the vocabulary."""
    if batch_size == 0:
        raise ValueError("empty batch: no utterances")
    if tokens.dim() != 2 or tokens.shape[0] != batch_size or token_lengths.shape != (batch_size,):
        raise ValueError(f"tokens must be (B={batch_size}, U) with token_lengths (B,), got "
                         f"{tuple(tokens.shape)} and {tuple(token_lengths.shape)}")
    if int(token_lengths.min()) < 0 or int(token_lengths.max()) > tokens.shape[1]:
        raise ValueError(f"token_lengths must lie in [0, {tokens.shape[1]}], got {token_lengths.tolist()}")
    valid = torch.arange(tokens.shape[1], device=tokens.device)[None] < token_lengths.to(tokens.device)[:, None]
    if valid.any() and (int(tokens[valid].min()) < 0 or int(tokens[valid].max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}) (the model's vocabulary)")


def cut_at_eos(ids: torch.Tensor, eos_id: int, drop: Sequence[int] = ()) -> list[list[int]]:
    """Rows of ``ids`` up to (not including) the first ``eos_id``, without the ids in ``drop``."""
    out = []
    for row in ids.tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        out.append([t for t in row if t not in drop])
    return out
