"""The shared speech encoder: transformers' ``WhisperEncoder`` run on per-batch padded features.

``WhisperEncoder.forward`` (transformers 5.23) insists on exactly ``2 * max_source_positions`` mel frames
(Whisper's 30 s window), adds all position embeddings, and ignores any attention mask, so padding is
attended to. Padding every batch to the window made the tiny AED 3x slower and the padding changed the
outputs (see ../shared/docs/environment-notes.md). :func:`encode` therefore runs the encoder's own
submodules (conv1, conv2, embed_positions, layers, layer_norm) the way ``WhisperEncoder.forward`` does,
except that it

* accepts any length up to ``2 * max_source_positions`` frames and adds ``embed_positions.weight[:T]``
  for the actual (subsampled) length ``T``;
* zeroes padded frames before each convolution, so the last valid frames see the same zeros as an
  unpadded utterance would (conv padding), and masks padded keys in self-attention.

An utterance therefore encodes the same alone or batched with longer ones. The weights and their names are
those of ``WhisperEncoder``, so real Whisper checkpoints load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import WhisperConfig, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder


STRIDE_FIELD = "asrlab_conv1_stride"


def conv1_stride(encoder: WhisperEncoder) -> int:
    """Stride of the first convolution: 1 in Whisper; 2 when the config asks for 4x subsampling."""
    return int(getattr(encoder.config, STRIDE_FIELD, 1) or 1)


def configure_subsampling(encoder: WhisperEncoder) -> WhisperEncoder:
    """Give conv1 the stride its config records (weights are unchanged: a stride has no parameters)."""
    encoder.conv1.stride = (conv1_stride(encoder),)
    return encoder


def max_input_frames(encoder: WhisperEncoder) -> int:
    """Longest input (feature frames) the encoder's position table covers."""
    return 2 * conv1_stride(encoder) * encoder.max_source_positions


@dataclass
class EncoderConfig:
    """Size of a Whisper-style encoder built from scratch (a real checkpoint brings its own)."""

    d_model: int = 192
    layers: int = 4
    heads: int = 4
    ffn_dim: int | None = None  # default 4 * d_model
    n_mels: int = 80
    max_source_positions: int = 1500  # frames after subsampling: 1500 -> 30 s at a 10 ms hop, 2x subsampling
    dropout: float = 0.0
    conv1_stride: int = 1  # 2 -> 4x subsampling (25 Hz): half the encoder cost; Whisper checkpoints use 1

    def whisper_kwargs(self) -> dict:
        """The encoder half of a WhisperConfig (the extra stride travels in the config as a custom field)."""
        return dict(d_model=self.d_model, encoder_layers=self.layers, encoder_attention_heads=self.heads,
                    encoder_ffn_dim=self.ffn_dim or 4 * self.d_model, num_mel_bins=self.n_mels,
                    max_source_positions=self.max_source_positions, dropout=self.dropout,
                    **{STRIDE_FIELD: self.conv1_stride})


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # (B, T', D), zero at padded frames
    mask: torch.Tensor  # (B, T') bool, True on valid frames
    lengths: torch.Tensor  # (B,) valid frames after subsampling
    hidden_states: tuple[torch.Tensor, ...] | None = None  # with ``hidden_states=True``: transformers' order


def output_lengths(lengths: torch.Tensor, stride1: int = 1) -> torch.Tensor:
    """Frames after conv1 (kernel 3, stride ``stride1``, padding 1) and Whisper's conv2 (stride 2)."""
    return (((lengths - 1) // stride1 + 1) - 1) // 2 + 1


def lengths_to_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """(B, max_len) bool mask, True where the position is < length."""
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, T) mask to add to attention scores: 0 on valid keys, dtype-min on padding.

    Additive, not boolean: both the eager and the sdpa attention of transformers accept it (eager adds it
    to the scores; a boolean mask would be added as 0/1). Flash attention would need the 2D mask instead.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min)[:, None, None, :]


def check_features(features: torch.Tensor, lengths: torch.Tensor, n_mels: int, max_frames: int) -> None:
    """Raise ValueError with the reason for a batch the encoder cannot take."""
    if features.dim() != 3 or features.shape[0] == 0:
        raise ValueError(f"expected features of shape (batch > 0, {n_mels}, frames), got {tuple(features.shape)}"
                         " (empty batch?)")
    if features.shape[1] != n_mels:
        raise ValueError(f"expected {n_mels} mel bins on dim 1 (features are (B, n_mels, T)), "
                         f"got shape {tuple(features.shape)}")
    if lengths.shape != (features.shape[0],):
        raise ValueError(f"lengths must have shape ({features.shape[0]},), got {tuple(lengths.shape)}")
    if int(lengths.min()) < 1 or int(lengths.max()) > features.shape[2]:
        raise ValueError(f"lengths must lie in [1, {features.shape[2]}] (the padded frame count), "
                         f"got {lengths.tolist()}")
    if int(lengths.max()) > max_frames:
        raise ValueError(
            f"utterance of {int(lengths.max())} frames exceeds the encoder's limit of {max_frames} frames "
            "(subsampling x max_source_positions); split it or build the encoder with a "
            "larger max_source_positions")


def encode(encoder: WhisperEncoder, features: torch.Tensor, lengths: torch.Tensor, hidden_states: bool = False,
           upto: int | None = None) -> EncoderOutput:
    """Run ``encoder`` on ``features`` (B, n_mels, T) padded per batch, ``lengths`` (B,) valid frames.

    ``hidden_states``: also return every layer's output in transformers' order (index 0 the input of the first
    layer, index i the output of layer i, the last one after the final layer norm), zero at padded frames.
    ``upto``: stop after that many layers; ``hidden`` is then layer ``upto``'s output (no final layer norm
    unless ``upto`` is the last layer), the layers above it are not run.
    """
    n_layers = len(encoder.layers)
    upto = n_layers if upto is None else upto
    if not 0 <= upto <= n_layers:
        raise ValueError(f"upto={upto}: the encoder has layers 0..{n_layers}")
    check_features(features, lengths, encoder.num_mel_bins, max_input_frames(encoder))
    stride1 = conv1_stride(encoder)
    lengths = lengths.to(features.device)
    features = features[:, :, : int(lengths.max())]
    in_mask = lengths_to_mask(lengths, features.shape[2])[:, None, :]
    x = nn.functional.gelu(encoder.conv1(features.masked_fill(~in_mask, 0.0)))
    mid_mask = lengths_to_mask((lengths - 1) // stride1 + 1, x.shape[2])[:, None, :]
    x = nn.functional.gelu(encoder.conv2(x.masked_fill(~mid_mask, 0.0)))
    x = x.permute(0, 2, 1)  # (B, T', D)
    out_lengths = output_lengths(lengths, stride1)
    mask = lengths_to_mask(out_lengths, x.shape[1])
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    x = nn.functional.dropout(x, p=encoder.dropout, training=encoder.training)
    attn_mask = additive_mask(mask, x.dtype)
    keep = ~mask[:, :, None]
    states = []
    for layer in encoder.layers[:upto]:
        if hidden_states:
            states.append(x.masked_fill(keep, 0.0))
        if encoder.training and encoder.layerdrop > 0.0 and torch.rand([]) < encoder.layerdrop:
            continue
        x = layer(x, attn_mask)
    x = (encoder.layer_norm(x) if upto == n_layers else x).masked_fill(keep, 0.0)
    return EncoderOutput(hidden=x, mask=mask, lengths=out_lengths,
                         hidden_states=tuple(states) + (x,) if hidden_states else None)


class SpeechEncoder(nn.Module):
    """A ``WhisperEncoder`` with :func:`encode` as its forward; the encoder of the CTC and LLM-ASR models.

    The AED model does not hold one of these: it calls :func:`encode` on its own Whisper's encoder, so its
    state dict keeps the Whisper names only (task vectors are built from state dicts).
    """

    def __init__(self, whisper_encoder: WhisperEncoder):
        super().__init__()
        self.whisper_encoder = configure_subsampling(whisper_encoder)

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> SpeechEncoder:
        # The decoder-side fields are irrelevant to the encoder; ids inside a 1-token vocabulary keep the
        # config valid.
        wcfg = WhisperConfig(vocab_size=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             decoder_start_token_id=1, begin_suppress_tokens=None, **cfg.whisper_kwargs())
        return cls(WhisperEncoder(wcfg))

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> SpeechEncoder:
        """The encoder of a local Whisper checkpoint directory (e.g. openai/whisper-small, downloaded).

        Loads the whole WhisperModel (a WhisperEncoder cannot map the checkpoint's ``model.encoder.``
        names by itself) and keeps its encoder.
        """
        return cls(WhisperModel.from_pretrained(path, dtype=dtype).get_encoder())

    @property
    def d_model(self) -> int:
        return self.whisper_encoder.config.d_model

    @property
    def max_frames(self) -> int:
        return max_input_frames(self.whisper_encoder)

    @property
    def n_layers(self) -> int:
        return len(self.whisper_encoder.layers)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, **kwargs) -> EncoderOutput:
        """:func:`encode`; ``kwargs``: its ``hidden_states`` and ``upto``."""
        return encode(self.whisper_encoder, features, lengths, **kwargs)


class CachedEncoder(nn.Module):
    """Stands in for a frozen encoder whose outputs were computed once (stage ``encoder_states``): its
    "features" are the encoder states, (B, D, T') padded per batch like log-mels, passed through unchanged.

    Training through it costs only what comes after the encoder; the real encoder goes back into the model
    before it is saved (:func:`swap_encoder`).
    """

    def __init__(self, d_model: int, max_frames: int = 1 << 20):
        super().__init__()
        self._d_model, self._max_frames = d_model, max_frames

    @property
    def d_model(self) -> int:
        return self._d_model

    @property
    def max_frames(self) -> int:
        return self._max_frames

    def forward(self, states: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        if states.shape[1] != self._d_model:
            raise ValueError(f"cached encoder states have {states.shape[1]} dims, the encoder {self._d_model}: "
                             "the cache was made by another encoder (re-run `asrlab encoder_states`)")
        lengths = lengths.to(states.device)
        mask = lengths_to_mask(lengths, states.shape[2])
        return EncoderOutput(hidden=states.transpose(1, 2) * mask[:, :, None], mask=mask, lengths=lengths)
