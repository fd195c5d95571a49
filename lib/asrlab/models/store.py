"""Build the models from params and save/load them as folders, so that every stage meets at files.

A saved model folder holds ``asrlab_model.json`` (kind and config), its tokenizer (``save_pretrained``:
the project BPE for models built from scratch, Whisper's own for a pretrained Whisper; :func:`tokenizer`
loads it) and its weights in safetensors:
- ``aed``: Whisper's own ``save_pretrained`` layout + ``ctc_head.safetensors`` (loads with
  ``WhisperForConditionalGeneration.from_pretrained`` too);
- ``llm_asr``: ``encoder/config.json`` and ``lm/config.json`` (the architectures, which may come from real
  checkpoints) and ``model.safetensors`` (encoder, projector, LM and LoRA weights);
- ``lm``: a causal LM's ``save_pretrained`` (the text-only pretraining of the LLM-ASR's LM).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from asrlab.io import make_readable
from asrlab.models.aed import AEDConfig, AEDModel
from asrlab.models.encoder import EncoderConfig, SpeechEncoder
from asrlab.models.llm_asr import LLMASR, LLMASRConfig, LMConfig, LoRASettings, add_lora
from asrlab.models.projector import Projector
from asrlab.tokenizer import load_tokenizer

META = "asrlab_model.json"
_GENERIC_TOKENIZERS = {"TokenizersBackend", "PreTrainedTokenizerFast"}  # save_pretrained of a bare tokenizers file


def aed_config(p: dict, vocab_size: int) -> AEDConfig:
    return AEDConfig(vocab_size=vocab_size, encoder=EncoderConfig(**p["encoder"]),
                     **{k: v for k, v in p.items() if k != "encoder"})


def llm_asr_config(p: dict, vocab_size: int, lm_path: str | None = None) -> LLMASRConfig:
    lora = LoRASettings(**{**p["lora"], "target_modules": tuple(p["lora"]["target_modules"])}) if p.get("lora") else None
    rest = {k: v for k, v in p.items() if k not in ("encoder", "lm", "lora")}
    return LLMASRConfig(vocab_size=vocab_size, encoder=EncoderConfig(**p["encoder"]), lm=LMConfig(**p.get("lm", {})),
                        lora=lora, lm_path=lm_path, **rest)


def build_llm_asr(cfg: LLMASRConfig, encoder_from: str | None = None) -> LLMASR:
    """The LLM-ASR model; ``encoder_from`` names a saved AED (or Whisper) folder whose encoder it reuses."""
    encoder = SpeechEncoder.from_pretrained(encoder_from) if encoder_from else None
    return LLMASR.from_config(cfg, encoder=encoder)


def tokenizer(path: str | Path):
    """The tokenizer a model folder carries (written by :func:`save`, or by a converted/downloaded Whisper)."""
    path = Path(path)
    cfg_file = path / "tokenizer_config.json"
    cls = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
    if cls is not None and cls not in _GENERIC_TOKENIZERS:
        return AutoTokenizer.from_pretrained(str(path))  # Whisper's, or a real LM checkpoint's own
    if (path / "tokenizer.json").is_file():
        # The project BPE (a bare `tokenizers` file). Not AutoTokenizer: next to a Qwen2 config.json it
        # rebuilds the file as a Qwen2 byte-level tokenizer, which encodes the same text to other ids.
        return load_tokenizer(path)
    raise FileNotFoundError(f"{path}: the model folder has no tokenizer (tokenizer.json); re-run the stage "
                            "that wrote it")


def save(model: torch.nn.Module, kind: str, path: str | Path, config=None, tok=None) -> None:
    """Write ``model`` (and its tokenizer ``tok``, which every ASR model folder should carry) to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tok is not None:
        tok.save_pretrained(str(path))
    meta = {"kind": kind}
    if kind == "aed":
        model.save_pretrained(path)
        meta.update(ctc_weight=model.ctc_weight, label_smoothing=model.label_smoothing)
    elif kind == "lm":
        model.save_pretrained(path)
    elif kind == "llm_asr":
        lm = model.lm.get_base_model() if hasattr(model.lm, "get_base_model") else model.lm
        lm.config.save_pretrained(path / "lm")
        model.encoder.whisper_encoder.config.save_pretrained(path / "encoder")
        save_model(model, str(path / "model.safetensors"))
        meta["config"] = {**dataclasses.asdict(config), "lm_path": None}
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    (path / META).write_text(json.dumps(meta, indent=2, default=list))
    make_readable(path)  # some writers leave temporary files' 0600


def load(path: str | Path) -> tuple[str, torch.nn.Module]:
    """The model saved in folder ``path``; a truncated or damaged weights file is an error naming the folder."""
    path = Path(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path}: not a saved asrlab model (no {META}); run the stage that trains it")
    try:
        return _load(path)
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise RuntimeError(f"{path}: damaged model folder ({type(e).__name__}: {e}); delete it (rm -r {path}) and "
                           "rerun the stage that writes it (dvc repro -f <stage>)") from e


def _load(path: Path) -> tuple[str, torch.nn.Module]:
    meta = json.loads((path / META).read_text())
    kind = meta["kind"]
    if kind == "aed":
        return kind, AEDModel.from_pretrained(path, meta["ctc_weight"], meta["label_smoothing"])
    if kind == "llm_asr":
        c = dict(meta["config"])
        vocab_size = c.pop("vocab_size")
        c.pop("lm_path", None)
        cfg = llm_asr_config(c, vocab_size)
        encoder = SpeechEncoder(WhisperEncoder(WhisperConfig.from_pretrained(path / "encoder")))
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path / "lm"))
        projector = Projector(encoder.d_model, lm.config.hidden_size, cfg.stack, cfg.projector_hidden)
        if cfg.lora is not None:
            lm = add_lora(lm, cfg.lora)
        model = LLMASR(encoder, projector, lm, cfg.pad_id, cfg.bos_id, cfg.eos_id)
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
        return kind, model
    raise ValueError(f"{path}: cannot load model kind {kind!r} as an ASR model")
