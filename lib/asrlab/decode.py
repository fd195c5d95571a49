"""Batched transcription: greedy attention decoding with a KV cache (AED, LLM-ASR) or greedy CTC.

Two ways to present the audio to a Whisper-style encoder:

* ``window=False`` (the default, right for every model trained here): per-batch padding with a padding
  mask, so an utterance encodes the same alone or batched;
* ``window=True``: every utterance padded to the encoder's whole window (30 s for Whisper) with the value
  Whisper's own feature extractor gives silence, no mask — how a pretrained Whisper was trained, and the only
  way it decodes zero-shot (on per-batch padding an un-fine-tuned Whisper loops).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from asrlab.text import chars_to_text
from asrlab.tokenizer import decode
from asrlab.training.batching import bucket_batches
from asrlab.training.trainer import autocast, check_precision

# Whisper's log-mel floor is (max - 8) in log10 units, and features are (x + 4) / 4: silence sits at
# max(features) - 2 of the same utterance (asrlab.audio.features.log_mel).
WHISPER_FLOOR_BELOW_MAX = 2.0


def pad_to_window(features: torch.Tensor, lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n_mels, T) per-batch padded features -> (B, n_mels, width), each utterance followed by the log-mel
    of silence, as if its audio had been zero-padded to the window; lengths all ``width``."""
    B, n_mels, T = features.shape
    if int(lengths.max()) > width:
        raise ValueError(f"utterance of {int(lengths.max())} frames is longer than the {width}-frame window")
    out = features.new_empty(B, n_mels, width)
    for i, n in enumerate(lengths.tolist()):
        utt = features[i, :, :n]
        out[i, :, :n] = utt
        out[i, :, n:] = utt.max() - WHISPER_FLOOR_BELOW_MAX
    return out, torch.full_like(lengths, width)


@torch.no_grad()
def transcribe(model: torch.nn.Module, data, tokenizer, max_frames: int = 60000, method: str = "attention",
               max_new_tokens: int = 96, desc: str = "decode", progress: bool = True,
               window: bool = False, precision: str = "fp32") -> list[str]:
    """Hypotheses for every utterance of ``data`` (a :class:`asrlab.training.data.SpeechData`), in order.

    Utterances of similar length are batched together (at most ``max_frames`` padded frames a batch; with
    ``window`` a batch holds ``max_frames // window`` utterances).
    """
    if method not in ("attention", "ctc"):
        raise ValueError(f"unknown decoding method {method!r}: 'attention' or 'ctc'")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hyps: list[str | None] = [None] * len(data)
    width = model.max_frames if window else None
    lengths = [width] * len(data) if window else data.lengths
    batches = sorted(bucket_batches(lengths, max(max_frames, width or 0), seed=0, epoch=0),
                     key=lambda b: -max(data.lengths[i] for i in b))
    with tqdm(total=len(data), desc=desc, unit="utt", mininterval=2, disable=not progress) as bar:
        for idx in batches:
            batch = data.collate(idx)
            feats, lens = batch["features"].to(device), batch["feature_lengths"].to(device)
            if window:
                feats, lens = pad_to_window(feats, lens, width)
            with autocast(precision, device):
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
