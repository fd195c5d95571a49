"""LLM-ASR (the hdmole and efin model): speech encoder -> projector -> causal LM, text after the audio.

The LM reads ``[audio embeddings] <s> t1 .. tn </s>`` and is trained to predict ``t1 .. tn </s>``: labels are
-100 on the audio, on ``<s>``'s own position and on padding, so the loss is on text only. A Qwen2 LM is built
from a small ``Qwen2Config`` whose ids are inside our vocabulary, or loaded from a local checkpoint directory
(Qwen2.5 at paper scale, with its own tokenizer). LoRA (peft) goes on the LM only and freezes its base
weights; the encoder and projector keep whatever ``requires_grad`` the caller gives them (EFIN's stages
freeze and unfreeze them in turn).

Batches are assembled per utterance, so no padding sits between an utterance's audio and its text: right
padding for training, left padding for generation (``generate`` derives the positions from the attention
mask). An utterance therefore gets the same logits and the same hypothesis alone or in a batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from asrlab.models.batch import check_tokens, cut_at_eos
from asrlab.models.encoder import EncoderConfig, SpeechEncoder
from asrlab.models.projector import Projector


@dataclass
class LMConfig:
    """A small Qwen2 built from scratch (ignored when ``LLMASRConfig.lm_path`` is set)."""

    hidden: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int | None = None  # default 3 * hidden (Qwen2's ratio is about 5.4; small is fine here)
    max_positions: int = 1024
    tie_embeddings: bool = False  # Qwen2Config's default; a random tied LM just repeats its input token


@dataclass
class LoRASettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LLMASRConfig:
    vocab_size: int
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    lm_path: str | None = None  # local checkpoint directory of a causal LM
    lm_dtype: str = "float32"  # transformers 5 otherwise loads in the checkpoint's dtype (bf16 for Qwen2.5)
    stack: int = 4
    projector_hidden: int | None = None  # default: the LM's hidden size
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    lora: LoRASettings | None = None  # None: no adapters, the LM is trained (or frozen) as a whole


def build_lm(cfg: LLMASRConfig) -> PreTrainedModel:
    """The causal LM: from ``cfg.lm_path`` if given, else a Qwen2 from ``cfg.lm``."""
    if cfg.lm_path:
        return AutoModelForCausalLM.from_pretrained(cfg.lm_path, dtype=getattr(torch, cfg.lm_dtype))
    ids = (cfg.pad_id, cfg.bos_id, cfg.eos_id)
    if not all(0 <= i < cfg.vocab_size for i in ids):
        raise ValueError(f"pad/bos/eos ids {ids} must lie inside the vocabulary [0, {cfg.vocab_size})")
    lm = cfg.lm
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=lm.hidden, num_hidden_layers=lm.layers,
        num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads,
        intermediate_size=lm.intermediate or 3 * lm.hidden, max_position_embeddings=lm.max_positions,
        tie_word_embeddings=lm.tie_embeddings, pad_token_id=cfg.pad_id, bos_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id))


def add_lora(lm: PreTrainedModel, settings: LoRASettings) -> PeftModel:
    """Wrap ``lm`` with LoRA adapters on ``settings.target_modules``; peft freezes every base weight."""
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules))
    with warnings.catch_warnings():
        # peft 0.21 reads `model.is_gradient_checkpointing`, deprecated in transformers 5.23 (FutureWarning
        # on every call; harmless, but it breaks `pytest -W error`).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(lm, config)


@dataclass
class LLMASROutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, L, V) over the whole assembled sequence
    labels: torch.Tensor | None  # (B, L), HF convention: logits[:, p] is scored against labels[:, p + 1]


class LLMASR(nn.Module):
    def __init__(self, encoder: SpeechEncoder, projector: Projector, lm: PreTrainedModel | PeftModel,
                 pad_id: int = 0, bos_id: int = 1, eos_id: int = 2):
        super().__init__()
        self.encoder, self.projector, self.lm = encoder, projector, lm
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    @classmethod
    def from_config(cls, cfg: LLMASRConfig, encoder: SpeechEncoder | None = None) -> LLMASR:
        """Build the model; pass ``encoder`` to reuse a trained one (EFIN stage 1)."""
        encoder = encoder or SpeechEncoder.from_config(cfg.encoder)
        lm = build_lm(cfg)
        projector = Projector(encoder.d_model, lm.config.hidden_size, cfg.stack, cfg.projector_hidden)
        if cfg.lora is not None:
            lm = add_lora(lm, cfg.lora)
        return cls(encoder, projector, lm, cfg.pad_id, cfg.bos_id, cfg.eos_id)

    @property
    def max_frames(self) -> int:
        return self.encoder.max_frames

    @property
    def vocab_size(self) -> int:
        return self.lm.get_input_embeddings().num_embeddings

    def embed_audio(self, features: torch.Tensor, feature_lengths: torch.Tensor):
        enc = self.encoder(features, feature_lengths)
        return self.projector(enc.hidden, enc.lengths)

    def _assemble(self, audio: torch.Tensor, audio_lengths: torch.Tensor, text: list[torch.Tensor],
                  left_pad: bool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Per utterance ``audio[:len] + embed(text)``, padded to one length with the pad token's embedding.

        Returns (embeddings (B, L, H), attention mask (B, L), start of each utterance's text).
        """
        embed = self.lm.get_input_embeddings()
        rows = [torch.cat([a[: int(n)], embed(t)]) for a, n, t in zip(audio, audio_lengths, text)]
        width = max(r.shape[0] for r in rows)
        pad = embed(torch.tensor([self.pad_id], device=audio.device))[0]
        out = pad.expand(len(rows), width, -1).clone()
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=audio.device)
        text_start = []
        for i, (row, n) in enumerate(zip(rows, audio_lengths)):
            offset = width - row.shape[0] if left_pad else 0
            out[i, offset: offset + row.shape[0]] = row
            mask[i, offset: offset + row.shape[0]] = 1
            text_start.append(offset + int(n))
        return out, mask, text_start

    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor, tokens: torch.Tensor,
                token_lengths: torch.Tensor) -> LLMASROutput:
        """Cross-entropy on ``t1 .. tn </s>`` given the audio and ``<s>`` (``tokens`` without bos/eos)."""
        check_tokens(tokens, token_lengths, features.shape[0], self.vocab_size)
        audio, audio_lengths = self.embed_audio(features, feature_lengths)
        dev = audio.device
        texts = [torch.cat([torch.tensor([self.bos_id], device=dev), t[: int(n)].to(dev),
                            torch.tensor([self.eos_id], device=dev)]) for t, n in zip(tokens, token_lengths)]
        embeds, mask, text_start = self._assemble(audio, audio_lengths, texts, left_pad=False)
        labels = torch.full(mask.shape, -100, dtype=torch.long, device=dev)
        for i, (t, s) in enumerate(zip(texts, text_start)):
            labels[i, s + 1: s + len(t)] = t[1:]  # not <s>: it is given, never predicted
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                           ignore_index=-100)
        return LLMASROutput(loss=loss, logits=logits, labels=labels)

    @torch.no_grad()
    def generate(self, features: torch.Tensor, feature_lengths: torch.Tensor,
                 max_new_tokens: int = 64) -> list[list[int]]:
        """Greedy decoding with the KV cache (``generate`` on ``inputs_embeds``), prompt ``[audio] <s>``."""
        audio, audio_lengths = self.embed_audio(features, feature_lengths)
        bos = torch.tensor([self.bos_id], device=audio.device)
        embeds, mask, _ = self._assemble(audio, audio_lengths, [bos] * audio.shape[0], left_pad=True)
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                               bos_token_id=self.bos_id, eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        # With inputs_embeds and no input_ids, generate returns only the new tokens.
        ids = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen)
        return cut_at_eos(ids, self.eos_id, drop={self.pad_id, self.bos_id})
