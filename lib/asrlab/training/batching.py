"""Batches bucketed by length under a max-frames budget, and SpecAugment (padding: asrlab.models.batch).

Batches are a pure function of (lengths, budget, seed, epoch): a resumed or distributed run sees exactly the
batches an uninterrupted single-process run would, so "data position" is just (epoch, batch index).
"""

from __future__ import annotations

import random

import torch


def bucket_batches(lengths: list[int], max_frames: int, seed: int, epoch: int, max_batch: int | None = None) -> list[list[int]]:
    """Indices grouped into batches whose padded size (longest × count) stays within ``max_frames``.

    Utterances are sorted by length with a little seeded jitter so that batches differ between epochs,
    cut greedily, and the batch order is shuffled.
    """
    if not lengths:
        raise ValueError("no utterances to batch: the training set is empty")
    too_long = [i for i, n in enumerate(lengths) if n > max_frames]
    if too_long:
        raise ValueError(f"{len(too_long)} utterance(s) are longer than max_frames={max_frames} "
                         f"(longest {max(lengths)} frames): raise the budget or filter them")
    rng = random.Random(f"{seed}/{epoch}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] * (1 + 0.1 * rng.random()))
    batches, cur, longest = [], [], 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if cur and (new_longest * (len(cur) + 1) > max_frames or (max_batch and len(cur) >= max_batch)):
            batches.append(cur)
            cur, new_longest = [], lengths[i]
        cur.append(i)
        longest = new_longest
    batches.append(cur)
    rng.shuffle(batches)
    return batches


def spec_augment(feats: torch.Tensor, lengths: torch.Tensor, freq_masks: int = 2, freq_width: int = 15,
                 time_masks: int = 2, time_width: int = 40, generator: torch.Generator | None = None) -> torch.Tensor:
    """SpecAugment (Park et al., 2019) frequency and time masking, in place on a (B, n_mels, T) batch.

    Masks are drawn from torch's RNG (or ``generator``), which the trainer checkpoints, so resumes repeat them.
    """
    B, n_mels, _ = feats.shape
    for b in range(B):
        T = int(lengths[b])
        for _ in range(freq_masks):
            w = int(torch.randint(0, freq_width + 1, (1,), generator=generator))
            f0 = int(torch.randint(0, max(1, n_mels - w), (1,), generator=generator))
            feats[b, f0: f0 + w, :T] = 0
        for _ in range(time_masks):
            w = int(torch.randint(0, min(time_width, T // 5) + 1, (1,), generator=generator))
            t0 = int(torch.randint(0, max(1, T - w), (1,), generator=generator))
            feats[b, :, t0: t0 + w] = 0
    return feats
