"""Batched transcription: greedy attention decoding with a KV cache (AED, LLM-ASR) or greedy CTC."""

from __future__ import annotations

import torch
from tqdm import tqdm

from asrlab.text import chars_to_text
from asrlab.tokenizer import decode
from asrlab.training.batching import bucket_batches


@torch.no_grad()
def transcribe(model: torch.nn.Module, data, tokenizer, max_frames: int = 60000, method: str = "attention",
               max_new_tokens: int = 96, desc: str = "decode", progress: bool = True) -> list[str]:
    """Hypotheses for every utterance of ``data`` (a :class:`asrlab.training.data.SpeechData`), in order.

    Utterances of similar length are batched together (at most ``max_frames`` padded frames a batch).
    """
    if method not in ("attention", "ctc"):
        raise ValueError(f"unknown decoding method {method!r}: 'attention' or 'ctc'")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hyps: list[str | None] = [None] * len(data)
    batches = sorted(bucket_batches(data.lengths, max_frames, seed=0, epoch=0),
                     key=lambda b: -max(data.lengths[i] for i in b))
    with tqdm(total=len(data), desc=desc, unit="utt", mininterval=2, disable=not progress) as bar:
        for idx in batches:
            batch = data.collate(idx)
            feats, lens = batch["features"].to(device), batch["feature_lengths"].to(device)
            if method == "ctc":
                ids = model.generate_ctc(feats, lens) if hasattr(model, "generate_ctc") else model.generate(feats, lens)
            else:
                ids = model.generate(feats, lens, max_new_tokens=max_new_tokens)
            chars = method == "ctc" and getattr(model, "ctc_units", "tokens") == "chars"
            for i, seq in zip(idx, ids):
                hyps[i] = chars_to_text(seq) if chars else decode(tokenizer, seq)
            bar.update(len(idx))
    model.train(was_training)
    return hyps  # type: ignore[return-value]
