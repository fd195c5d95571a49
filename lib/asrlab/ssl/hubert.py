"""A small HuBERT upstream, pretrained by masked prediction of k-means targets (HuBERT's first iteration).

Frontend: ``transformers.HubertModel`` normally runs a 7-layer convolution over the 16 kHz waveform
(320 samples per 20 ms frame). On 2 CPU cores that convolution costs more than the transformer, so this
upstream reads the stored 80-dim log-mel frames instead: ``stack`` frames (10 ms hop) are stacked into one
vector (2 -> HuBERT's 50 Hz; the default profile uses 4 -> 25 Hz, half the cost of every later model) and go
straight into ``HubertModel.feature_projection``; the waveform
convolutions (kept minimal in the config) are bypassed. Everything after that — projection, mask embedding,
convolutional positional embedding, transformer layers — is HubertModel's own code and weights. A real
HuBERT/WavLM checkpoint takes waveform instead (:class:`asrlab.ssl.upstream.SSLUpstream`).

Targets (iteration 1): k-means clusters of 39-dim MFCC (13 cepstra of the log-mel by DCT-II, + Δ + ΔΔ),
averaged to the upstream's frame rate. Loss: cross-entropy on masked frames only (HuBERT's α = 1), through a linear head (the
paper's cosine-similarity codebook head is replaced by a plain softmax classifier, which is equivalent up to
parametrisation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from transformers import HubertConfig, HubertModel
from transformers.models.hubert.modeling_hubert import _compute_mask_indices

@dataclass
class UpstreamConfig:
    stack: int = 2               # log-mel frames (10 ms) per upstream frame: 2 = HuBERT's 20 ms; 4 = 40 ms
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    ffn_dim: int = 512
    n_mels: int = 80
    n_targets: int = 100
    pos_conv_kernel: int = 32
    pos_conv_groups: int = 8
    mask_prob: float = 0.65      # HuBERT's p = 8 %, span 10 -> ~65 % of frames masked
    mask_length: int = 10
    dropout: float = 0.0

    def hubert_config(self) -> HubertConfig:
        return HubertConfig(
            hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
            intermediate_size=self.ffn_dim, conv_dim=(self.stack * self.n_mels,), conv_kernel=(self.stack,),
            conv_stride=(self.stack,), num_conv_pos_embeddings=self.pos_conv_kernel,
            num_conv_pos_embedding_groups=self.pos_conv_groups, feat_proj_layer_norm=True,
            mask_time_prob=self.mask_prob, mask_time_length=self.mask_length, hidden_dropout=self.dropout,
            attention_dropout=self.dropout, activation_dropout=self.dropout, feat_proj_dropout=self.dropout,
            layerdrop=0.0, vocab_size=self.n_targets)


def stack_frames(feats: torch.Tensor, stack: int) -> torch.Tensor:
    """(T, n_mels) log-mel at 100 Hz -> (T // stack, stack n_mels) (trailing frames that do not fill one are dropped)."""
    T = max(feats.shape[0] // stack, 1) * stack
    if feats.shape[0] < T:
        feats = torch.nn.functional.pad(feats, (0, 0, 0, T - feats.shape[0]))
    return feats[:T].reshape(T // stack, stack * feats.shape[1])


def mfcc(logmel: np.ndarray, stack: int, n_ceps: int = 13) -> np.ndarray:
    """(T, n_mels) log-mel -> (T // stack, 3 n_ceps): DCT-II cepstra with Δ and ΔΔ, averaged over each stack."""
    n = logmel.shape[1]
    k = np.arange(n_ceps)[:, None]
    dct = np.sqrt(2.0 / n) * np.cos(np.pi / n * (np.arange(n)[None] + 0.5) * k)
    c = logmel.astype(np.float32) @ dct.T.astype(np.float32)
    d1 = np.gradient(c, axis=0) if len(c) > 1 else np.zeros_like(c)
    d2 = np.gradient(d1, axis=0) if len(c) > 1 else np.zeros_like(c)
    x = np.concatenate([c, d1, d2], axis=1)
    T = max(len(x) // stack, 1) * stack
    if len(x) < T:
        x = np.pad(x, ((0, T - len(x)), (0, 0)), mode="edge")
    return x[:T].reshape(T // stack, stack, -1).mean(1)


def lengths_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    return torch.arange(T, device=lengths.device)[None] < lengths[:, None]


class HubertUpstream(nn.Module):
    """HubertModel on stacked log-mel frames + a masked-prediction head. ``forward`` returns {"loss"}."""

    def __init__(self, cfg: UpstreamConfig):
        super().__init__()
        self.cfg = cfg
        self.hubert = HubertModel(cfg.hubert_config())
        self.head = nn.Linear(cfg.hidden, cfg.n_targets)

    def hidden_states(self, frames: torch.Tensor, lengths: torch.Tensor, upto: int | None = None,
                      mask_time: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[projected input, layer 1, …, layer ``upto``] (each (B, T, hidden)) for frames (B, T, 160).

        Runs HubertEncoder's own submodules in its order (zeroed padding, positional conv, layer norm,
        layers) so that it can stop at the requested layer.
        """
        h, enc = self.hubert, self.hubert.encoder
        valid = lengths_mask(lengths, frames.shape[1])
        x = h.feature_projection(frames)
        if mask_time is not None:
            x = x.masked_scatter(mask_time[..., None], h.masked_spec_embed.to(x.dtype).expand_as(x)[mask_time])
        x = x.masked_fill(~valid[..., None], 0.0)
        x = enc.layer_norm(x + enc.pos_conv_embed(x))
        x = enc.dropout(x)
        attn = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~valid, torch.finfo(x.dtype).min)[:, None, None, :]
        out = [x]
        for layer in enc.layers[: upto if upto is not None else len(enc.layers)]:
            x = layer(x, attention_mask=attn)
            x = x[0] if isinstance(x, tuple) else x
            out.append(x)
        return out

    def forward(self, frames: torch.Tensor, frame_lengths: torch.Tensor, targets: torch.Tensor) -> dict:
        valid = lengths_mask(frame_lengths, frames.shape[1])
        mask = torch.from_numpy(_compute_mask_indices(
            tuple(valid.shape), self.cfg.mask_prob, self.cfg.mask_length, attention_mask=valid.long(),
            min_masks=1)).to(frames.device) & valid
        last = self.hidden_states(frames, frame_lengths, mask_time=mask)[-1]
        logits = self.head(last[mask])
        loss = nn.functional.cross_entropy(logits, targets[mask])
        acc = (logits.argmax(-1) == targets[mask]).float().mean()
        return {"loss": loss, "masked_accuracy": acc.detach()}

    @torch.no_grad()
    def layer(self, frames: torch.Tensor, lengths: torch.Tensor, layer: int) -> torch.Tensor:
        """Output of transformer layer ``layer`` (1-based; 0 = projected input), (B, T, hidden)."""
        return self.hidden_states(frames, lengths, upto=layer)[layer]

    def config_dict(self) -> dict:
        return asdict(self.cfg)
