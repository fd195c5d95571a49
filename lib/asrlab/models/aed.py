"""Attention encoder-decoder (the syn2real model): Whisper with a CTC head and a joint loss.

``transformers.WhisperForConditionalGeneration`` from a small ``WhisperConfig`` here, or a real checkpoint
(``openai/whisper-small`` downloaded to a local directory) at paper scale, through the same class. Three
changes to how transformers runs it, each needed for a tiny model to learn on 2 CPU cores
(../shared/docs/environment-notes.md):

* the encoder runs on per-batch padded features with a padding mask (:func:`asrlab.models.encoder.encode`);
* the decoder's cross-attention does not see encoder padding. ``WhisperDecoder.forward`` (transformers
  5.23) passes ``encoder_attention_mask=None`` to every ``WhisperDecoderLayer`` whatever it is given, so
  :func:`_install_cross_attention_mask` adds a forward pre-hook to each decoder layer that moves a
  ``cross_attention_mask`` keyword (which ``WhisperForConditionalGeneration.forward`` forwards down to the
  layers in ``**kwargs``) into the layer's own ``encoder_attention_mask`` argument. Weights, names and
  checkpoints are untouched; without the keyword the model behaves as upstream;
* the loss is ESPnet's joint CTC/attention loss, ``ctc_weight * CTC + (1 - ctc_weight) * CE`` with label
  smoothing (Watanabe et al. 2017, "Hybrid CTC/attention"), because from scratch and CE alone the tiny
  model never learned to listen.

Greedy decoding is a short loop with the KV cache (``EncoderDecoderCache``, cross-attention keys computed
once) rather than ``generate``: ``GenerationMixin.generate`` rejects the ``cross_attention_mask`` keyword
(its ``_validate_model_kwargs`` checks names against ``forward``'s signature), and joint CTC/attention beam
search, the next step, needs its own loop anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import WhisperConfig, WhisperForConditionalGeneration

from asrlab.models.batch import check_tokens, cut_at_eos
from asrlab.models.ctc import ctc_greedy_decode, ctc_loss
from asrlab.text import CHARS
from asrlab.models.encoder import (EncoderConfig, EncoderOutput, additive_mask, configure_subsampling, encode,
                                   max_input_frames)

_MASK_KWARG = "cross_attention_mask"
CTC_UNITS_FIELD = "asrlab_ctc_units"  # saved in config.json, so a reloaded model keeps its CTC head
CTC_HEAD_FILE = "ctc_head.safetensors"


def _move_mask_into_layer(module, args, kwargs):
    mask = kwargs.pop(_MASK_KWARG, None)
    if mask is not None:
        kwargs["encoder_attention_mask"] = mask
    return args, kwargs


def _install_cross_attention_mask(whisper: WhisperForConditionalGeneration) -> None:
    """Let ``whisper(..., cross_attention_mask=m)`` reach every decoder layer's cross-attention."""
    for layer in whisper.model.decoder.layers:
        layer.register_forward_pre_hook(_move_mask_into_layer, with_kwargs=True)


@dataclass
class AEDConfig:
    vocab_size: int
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # d_model is shared with the decoder
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_ffn_dim: int | None = None  # default 4 * d_model
    max_target_positions: int = 128  # tokens incl. the start token; longer targets raise
    pad_id: int = 0
    bos_id: int = 1  # also the decoder start token
    eos_id: int = 2
    ctc_weight: float = 0.3
    label_smoothing: float = 0.1
    ctc_units: str = "tokens"  # "chars": the CTC head predicts characters (learns to align much sooner)

    def whisper_config(self) -> WhisperConfig:
        ids = (self.pad_id, self.bos_id, self.eos_id)
        if not all(0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"pad/bos/eos ids {ids} must lie inside the vocabulary [0, {self.vocab_size})")
        d = self.encoder.d_model
        return WhisperConfig(
            vocab_size=self.vocab_size, decoder_layers=self.decoder_layers,
            decoder_attention_heads=self.decoder_heads, decoder_ffn_dim=self.decoder_ffn_dim or 4 * d,
            max_target_positions=self.max_target_positions, pad_token_id=self.pad_id,
            bos_token_id=self.bos_id, eos_token_id=self.eos_id, decoder_start_token_id=self.bos_id,
            begin_suppress_tokens=None, suppress_tokens=None, **{CTC_UNITS_FIELD: self.ctc_units},
            **self.encoder.whisper_kwargs())


@dataclass
class AEDOutput:
    loss: torch.Tensor | None
    att_loss: torch.Tensor | None
    ctc_loss: torch.Tensor | None
    logits: torch.Tensor | None  # (B, U + 1, V) decoder logits
    ctc_logits: torch.Tensor  # (B, T', V)
    encoder: EncoderOutput


class AEDModel(nn.Module):
    """Whisper encoder-decoder + CTC head on the encoder; the state dict is ``whisper.*`` and ``ctc_head.*``."""

    def __init__(self, whisper: WhisperForConditionalGeneration, ctc_weight: float = 0.3,
                 label_smoothing: float = 0.1, ctc_head: nn.Linear | None = None):
        super().__init__()
        if not 0.0 <= ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight={ctc_weight} must lie in [0, 1]")
        cfg = whisper.config
        self.whisper = whisper
        # The CTC blank is the pad token: it never occurs in a target (see asrlab.models.ctc). In a real
        # Whisper, pad = eos = <|endoftext|>, which is not a CTC target either.
        self.ctc_units = getattr(cfg, CTC_UNITS_FIELD, "tokens") or "tokens"
        if self.ctc_units not in ("tokens", "chars"):
            raise ValueError(f"ctc_units={self.ctc_units!r}: 'tokens' or 'chars'")
        # Characters: blank 0, then asrlab.text.CHARS.
        n_out = len(CHARS) + 1 if self.ctc_units == "chars" else cfg.vocab_size
        self.ctc_head = ctc_head or nn.Linear(cfg.d_model, n_out)
        self.ctc_weight, self.label_smoothing = ctc_weight, label_smoothing
        configure_subsampling(whisper.model.encoder)
        _install_cross_attention_mask(whisper)

    @classmethod
    def from_config(cls, cfg: AEDConfig) -> AEDModel:
        return cls(WhisperForConditionalGeneration(cfg.whisper_config()), cfg.ctc_weight, cfg.label_smoothing)

    @classmethod
    def from_pretrained(cls, path: str | Path, ctc_weight: float = 0.3, label_smoothing: float = 0.1,
                        dtype: torch.dtype = torch.float32, ctc_units: str | None = None) -> AEDModel:
        """Load a local Whisper checkpoint directory; the CTC head too if ``save_pretrained`` wrote one,
        otherwise a new head (a real openai/whisper-* has none) over ``ctc_units`` (default: the config's,
        else the checkpoint's vocabulary).

        ``dtype``: transformers 5 would otherwise keep the checkpoint's dtype (fp16/bf16 checkpoints exist).
        """
        whisper = WhisperForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
        head_file = Path(path) / CTC_HEAD_FILE
        saved_units = getattr(whisper.config, CTC_UNITS_FIELD, None)
        if ctc_units is not None and saved_units is not None and head_file.is_file() and ctc_units != saved_units:
            raise ValueError(f"{path}: its CTC head predicts {saved_units!r}, not ctc_units={ctc_units!r}")
        if ctc_units is not None:
            setattr(whisper.config, CTC_UNITS_FIELD, ctc_units)
        model = cls(whisper, ctc_weight, label_smoothing)
        if head_file.is_file():
            model.ctc_head.load_state_dict(load_file(str(head_file)))
            model.ctc_head.to(dtype)
        return model

    def save_pretrained(self, path: str | Path) -> None:
        self.whisper.save_pretrained(str(path))
        save_file({k: v.contiguous() for k, v in self.ctc_head.state_dict().items()},
                  str(Path(path) / CTC_HEAD_FILE))

    @property
    def config(self) -> WhisperConfig:
        return self.whisper.config

    @property
    def prompt_ids(self) -> list[int]:
        """The decoder's prompt, from the checkpoint's generation config: a pretrained Whisper's
        ``<|startoftranscript|> [<|en|> <|transcribe|>] <|notimestamps|>``; ``[decoder_start]`` from scratch."""
        gen, cfg = self.whisper.generation_config, self.config
        prompt = [cfg.decoder_start_token_id]
        if getattr(gen, "no_timestamps_token_id", None) is None:
            return prompt
        if getattr(gen, "is_multilingual", False):
            prompt += [gen.lang_to_id["<|en|>"], gen.task_to_id["transcribe"]]
        return prompt + [gen.no_timestamps_token_id]

    @property
    def blank_id(self) -> int:
        return 0 if self.ctc_units == "chars" else self.config.pad_token_id

    @property
    def max_frames(self) -> int:
        """Longest input in feature frames."""
        return max_input_frames(self.whisper.model.encoder)

    def encode(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> EncoderOutput:
        return encode(self.whisper.model.encoder, features, feature_lengths)

    def _decode_step(self, enc: EncoderOutput, decoder_input_ids: torch.Tensor, past_key_values=None,
                     use_cache: bool = False):
        return self.whisper(encoder_outputs=(enc.hidden,), decoder_input_ids=decoder_input_ids,
                            past_key_values=past_key_values, use_cache=use_cache,
                            **{_MASK_KWARG: additive_mask(enc.mask, enc.hidden.dtype)})

    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor,
                tokens: torch.Tensor | None = None, token_lengths: torch.Tensor | None = None,
                ctc_tokens: torch.Tensor | None = None, ctc_token_lengths: torch.Tensor | None = None) -> AEDOutput:
        """Joint loss on targets ``tokens`` (no bos/eos): decoder input ``prompt t1..tn``, labels ``t1..tn </s>``
        (the prompt's positions but its last carry no loss; the prompt is ``[<s>]`` from scratch).

        With a character CTC head, ``ctc_tokens`` (:func:`asrlab.text.char_ids`) are its targets.
        """
        enc = self.encode(features, feature_lengths)
        ctc_logits = self.ctc_head(enc.hidden)
        if tokens is None:
            return AEDOutput(None, None, None, None, ctc_logits, enc)
        cfg = self.config
        check_tokens(tokens, token_lengths, features.shape[0], cfg.vocab_size)
        tokens, token_lengths = tokens.to(enc.hidden.device), token_lengths.to(enc.hidden.device)
        prompt = torch.tensor(self.prompt_ids, device=tokens.device)
        if tokens.shape[1] + len(prompt) > cfg.max_target_positions:
            raise ValueError(f"target of {tokens.shape[1]} tokens + {len(prompt)} prompt tokens exceeds "
                             f"max_target_positions={cfg.max_target_positions} of the decoder")
        labels = nn.functional.pad(tokens, (0, 1), value=cfg.pad_token_id)
        positions = torch.arange(labels.shape[1], device=labels.device)[None]
        labels = labels.masked_fill(positions == token_lengths[:, None], cfg.eos_token_id)
        labels = labels.masked_fill(positions > token_lengths[:, None], -100)
        # The decoder is causal, so right padding cannot reach the valid positions: no decoder mask needed.
        # Input: prompt then t1..tn; labels: -100 under all prompt tokens but the last, which predicts t1.
        B = tokens.shape[0]
        decoder_input_ids = torch.cat([prompt.expand(B, -1), labels[:, :-1].clamp(min=0)], 1)
        labels = torch.cat([labels.new_full((B, len(prompt) - 1), -100), labels], 1)
        logits = self._decode_step(enc, decoder_input_ids).logits
        att = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                          label_smoothing=self.label_smoothing)
        if self.ctc_units == "chars":
            if ctc_tokens is None:
                raise ValueError("this AED has a character CTC head: pass ctc_tokens/ctc_token_lengths "
                                 "(SpeechData(..., char_targets=True) does)")
            ctc = ctc_loss(ctc_logits, enc.lengths, ctc_tokens.to(enc.hidden.device),
                           ctc_token_lengths.to(enc.hidden.device), self.blank_id)
        else:
            ctc = ctc_loss(ctc_logits, enc.lengths, tokens, token_lengths, self.blank_id)
        loss = self.ctc_weight * ctc + (1.0 - self.ctc_weight) * att
        return AEDOutput(loss, att, ctc, logits, ctc_logits, enc)

    @torch.no_grad()
    def generate(self, features: torch.Tensor, feature_lengths: torch.Tensor, max_new_tokens: int | None = None,
                 prompt_ids: list[int] | None = None) -> list[list[int]]:
        """Greedy attention decoding with the KV cache, batched; ids up to ``</s>``, specials dropped.

        ``prompt_ids`` default :attr:`prompt_ids` (the checkpoint's). The generation config's
        ``suppress_tokens`` are never emitted, its ``begin_suppress_tokens`` not as the first token.
        """
        cfg, gen = self.config, self.whisper.generation_config
        enc = self.encode(features, feature_lengths)
        prompt = torch.tensor(prompt_ids or self.prompt_ids, device=enc.hidden.device)
        suppress = [i for i in (getattr(gen, "suppress_tokens", None) or []) if i < cfg.vocab_size]
        begin_suppress = [i for i in (getattr(gen, "begin_suppress_tokens", None) or []) if i < cfg.vocab_size]
        room = cfg.max_target_positions - len(prompt)
        max_new_tokens = room if max_new_tokens is None else min(max_new_tokens, room)
        batch = enc.hidden.shape[0]
        step_ids = prompt[None].expand(batch, -1)
        # The first call creates the EncoderDecoderCache (sized to the decoder's layers); later calls feed
        # one token each and reuse the cached self- and cross-attention keys/values.
        cache, new, done = None, [], torch.zeros(batch, dtype=torch.bool, device=enc.hidden.device)
        for step in range(max_new_tokens):
            out = self._decode_step(enc, step_ids, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1]
            banned = suppress + (begin_suppress if step == 0 else [])
            if banned:
                logits[:, banned] = float("-inf")
            nxt = logits.argmax(-1).masked_fill(done, cfg.pad_token_id)
            new.append(nxt)
            done |= nxt == cfg.eos_token_id
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
        ids = torch.stack(new, 1) if new else torch.empty(batch, 0, dtype=torch.long)
        specials = {cfg.pad_token_id, cfg.bos_token_id, cfg.decoder_start_token_id, *self.prompt_ids}
        return cut_at_eos(ids, cfg.eos_token_id, drop=specials)

    @torch.no_grad()
    def generate_ctc(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> list[list[int]]:
        """Greedy CTC decoding with the auxiliary head (a check that the encoder listens)."""
        out = self.forward(features, feature_lengths)
        return ctc_greedy_decode(out.ctc_logits, out.encoder.lengths, self.blank_id)
