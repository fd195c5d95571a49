"""CTC recognizer: the shared speech encoder plus a linear head over the BPE vocabulary.

Used on its own (EFIN stage 1 trains the encoder with this objective before the LLM sees it; discrete-token
downstream models) and as the auxiliary head of the AED model's joint CTC/attention loss. The blank is the
tokenizer's ``<pad>`` (id 0), which never occurs in a target, so the head needs no extra class and a
tokenizer decodes its output directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from asrlab.models.batch import check_tokens
from asrlab.models.encoder import EncoderConfig, SpeechEncoder


def ctc_loss(logits: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor, token_lengths: torch.Tensor,
             blank: int) -> torch.Tensor:
    """Mean over the batch of the per-utterance CTC loss divided by its target length (torch's "mean").

    Per-token scale, comparable with the cross-entropy it is mixed with. ``zero_infinity``: an utterance
    whose target cannot fit its frames contributes 0 instead of inf; NaN features still give NaN.
    """
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, V) as torch expects
    valid = torch.arange(tokens.shape[1], device=tokens.device)[None] < token_lengths[:, None]
    targets = tokens.masked_fill(~valid, blank)  # padding values outside [0, V) would trip the kernel
    return nn.functional.ctc_loss(log_probs, targets, lengths, token_lengths, blank=blank,
                                  reduction="mean", zero_infinity=True)


def ctc_greedy_decode(logits: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """Best path: argmax per frame, collapse repeats, drop blanks, within each utterance's valid frames."""
    best = logits.argmax(-1)  # (B, T)
    prev = torch.nn.functional.pad(best[:, :-1], (1, 0), value=-1)
    valid = torch.arange(best.shape[1], device=best.device)[None] < lengths[:, None]
    keep = (best != prev) & (best != blank) & valid
    return [row[k].tolist() for row, k in zip(best, keep)]


@dataclass
class CTCConfig:
    vocab_size: int
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    blank_id: int = 0  # the tokenizer's <pad>


@dataclass
class CTCOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, T', V)
    lengths: torch.Tensor  # (B,) valid frames of logits


class CTCModel(nn.Module):
    def __init__(self, encoder: SpeechEncoder, vocab_size: int, blank_id: int = 0):
        super().__init__()
        if not 0 <= blank_id < vocab_size:
            raise ValueError(f"blank_id={blank_id} must lie inside the vocabulary [0, {vocab_size})")
        self.encoder = encoder
        self.head = nn.Linear(encoder.d_model, vocab_size)
        self.vocab_size, self.blank_id = vocab_size, blank_id

    @classmethod
    def from_config(cls, cfg: CTCConfig) -> CTCModel:
        return cls(SpeechEncoder.from_config(cfg.encoder), cfg.vocab_size, cfg.blank_id)

    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor,
                tokens: torch.Tensor | None = None, token_lengths: torch.Tensor | None = None) -> CTCOutput:
        enc = self.encoder(features, feature_lengths)
        logits = self.head(enc.hidden)
        loss = None
        if tokens is not None:
            check_tokens(tokens, token_lengths, features.shape[0], self.vocab_size)
            loss = ctc_loss(logits, enc.lengths, tokens.to(logits.device), token_lengths.to(logits.device),
                            self.blank_id)
        return CTCOutput(loss=loss, logits=logits, lengths=enc.lengths)

    @torch.no_grad()
    def generate(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> list[list[int]]:
        out = self.forward(features, feature_lengths)
        return ctc_greedy_decode(out.logits, out.lengths, self.blank_id)
