"""Downstream ASR on SSL tokens or features: input embedding -> small transformer -> character CTC.

One model for the study's three inputs (the paper's rows):

* ``tokens``: hard token ids (B, T) -> the lookup ``E[id]``; or a distribution over the K tokens (B, T, K)
  -> the soft embedding ``p @ E`` (:func:`asrlab.methods.soft_tokens.soft_embedding`);
* ``features``: the continuous SSL layer (B, T, D) -> a linear projection (the continuous baseline).

Both feed the same local convolution, sinusoidal positions, pre-norm transformer and CTC head over
characters (:mod:`asrlab.text`, blank 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from asrlab.methods.soft_tokens import soft_embedding
from asrlab.models.ctc import ctc_greedy_decode, ctc_loss
from asrlab.ssl.hubert import lengths_mask
from asrlab.text import CHARS


@dataclass
class DownstreamConfig:
    input: str              # "tokens" or "features"
    n_tokens: int = 0       # K, for tokens
    feature_dim: int = 0    # D, for features
    d_model: int = 144
    layers: int = 3
    heads: int = 4
    ffn_dim: int = 576
    dropout: float = 0.1
    vocab_size: int = len(CHARS) + 1  # characters + blank 0


def sinusoids(T: int, d: int) -> torch.Tensor:
    pos = torch.arange(T, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(T, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe


class DownstreamCTC(nn.Module):
    ctc_units = "chars"  # its CTC head is over characters: asrlab.decode writes them as text, no tokenizer

    def __init__(self, cfg: DownstreamConfig):
        super().__init__()
        if cfg.input not in ("tokens", "features"):
            raise ValueError(f"downstream input must be 'tokens' or 'features', got {cfg.input!r}")
        self.cfg = cfg
        if cfg.input == "tokens":
            self.embed = nn.Embedding(cfg.n_tokens, cfg.d_model)
        else:
            self.embed = nn.Sequential(nn.LayerNorm(cfg.feature_dim), nn.Linear(cfg.feature_dim, cfg.d_model))
        self.local = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=5, padding=2)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, cfg.ffn_dim, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        # layers 0: no transformer, a shallow probe (input projection, local convolution, CTC head)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False) if cfg.layers else None
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def input_embedding(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> E[ids]; (B, T, K) distribution -> p @ E; (B, T, D) features -> projection."""
        if self.cfg.input == "features":
            return self.embed(inputs.float())
        if inputs.dtype in (torch.int64, torch.int32):
            return self.embed(inputs)
        if inputs.shape[-1] != self.cfg.n_tokens:
            raise ValueError(f"a token distribution needs K={self.cfg.n_tokens} entries per frame, got {inputs.shape}")
        return soft_embedding(inputs, self.embed.weight)

    def logits(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.input_embedding(inputs)
        valid = lengths_mask(lengths.to(x.device), x.shape[1])
        x = x.masked_fill(~valid[..., None], 0.0)
        x = x + nn.functional.gelu(self.local(x.transpose(1, 2))).transpose(1, 2)
        x = x + sinusoids(x.shape[1], x.shape[2]).to(x)
        if self.encoder is not None:
            x = self.encoder(x, src_key_padding_mask=~valid)
        return self.head(self.norm(x))

    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor, targets: torch.Tensor | None = None,
                target_lengths: torch.Tensor | None = None) -> dict:
        """``features``: the inputs of :meth:`input_embedding` (named as every model's input frames are)."""
        logits = self.logits(features, feature_lengths)
        out = {"logits": logits, "lengths": feature_lengths}
        if targets is not None:
            out["loss"] = ctc_loss(logits, feature_lengths, targets, target_lengths, blank=0)
        return out

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        return ctc_greedy_decode(self.logits(inputs, lengths), lengths, blank=0)

    def config_dict(self) -> dict:
        return asdict(self.cfg)
