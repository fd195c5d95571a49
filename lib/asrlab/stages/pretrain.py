"""Stages `pretrain_aed`, `pretrain_lm`, `pretrain_llm_asr`: the base models every study adapts.

- ``pretrain_aed``: the base AED — the pretrained Whisper (``init_from: models/whisper``, its own tokenizer
  and prompt) fine-tuned with an optional character CTC head on its encoder (joint loss), or a Whisper-style
  AED built from a small config when ``init_from`` is null (the smoke profile) — on general text rendered in
  the synthetic and real-proxy pools (lm.txt sentences tagged outside the held-out scenarios).
- ``pretrain_scratch_aed``: the same recipe from scratch with the project BPE (the base that syn2real and
  efin adapt until their issues move them to the pretrained one).
- ``pretrain_lm``: the LLM-ASR's small causal LM, on training text alone.
- ``pretrain_llm_asr``: the frozen encoder of ``encoder_from`` -> projector -> the pretrained LM, on the same
  speech; with ``cache_encoder`` it trains on the encoder states stage ``encoder_states`` stored.

Each trains through the one trainer, resumes from ``checkpoints/<stage>/<config hash>`` after an
interruption, logs the training curve and a dev evaluation to MLflow, and writes its model folder
(:mod:`asrlab.models.store`, with the tokenizer the model was trained with) and ``results/base/<stage>.json``.
Dev evaluation goes through the one evaluation path (:func:`asrlab.evaluation.evaluate`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import time
from pathlib import Path

import mlflow
import torch

from asrlab import tracking
from asrlab.params import Folder, check_keys, checked, fields
from asrlab.audio.features import FeatureStore
from asrlab.evaluation import evaluate
from asrlab.io import read_jsonl, stable_hash, write_json
from asrlab.models import store
from asrlab.models.aed import AEDConfig, AEDModel
from asrlab.models.encoder import CachedEncoder
from asrlab.models.batch import pad_tokens
from asrlab.tokenizer import encode, load_tokenizer
from asrlab.models.llm_asr import LLMASRConfig
from asrlab.training.data import SELECTION, SpeechData, select
from asrlab.training.trainer import TRAIN, TrainConfig, distributed, train


def _ckpt_dir(params: dict, stage: str) -> Path:
    """Checkpoints are keyed by the stage's params and its inputs, so a changed config never resumes a stale run."""
    p = params[stage]
    inputs = [tracking.file_hash(params["tokenizer"]["out_dir"])]
    if stage == "pretrain_lm":  # text only: the LM never reads the feature store (dvc.yaml does not order it after)
        inputs += [tracking.file_hash(Path(params["prepare"]["out_dir"]) / f"{name}.jsonl") for name in p["text"]]
    else:
        inputs.append(tracking.file_hash(Path(params["features"]["out_dir"]) / "index.jsonl"))
    inputs += [tracking.file_hash(p[k]) for k in ("init_from", "encoder_from", "lm_from") if p.get(k)]
    if p.get("cache_encoder"):
        inputs.append(tracking.file_hash(Path(params["encoder_states"]["out_dir"]) / "index.jsonl"))
    return Path(params["checkpoints_dir"]) / stage / stable_hash(p, inputs, n=12)


# A pretrained model named in params (init_from, encoder_from, lm_from) must be a local folder (Folder):
# a missing one was HF's "Repo id must be in the form..." or, for encoder_from, a random frozen encoder.
_AED = {"out_dir": str, "metrics": str, "init_from?": Folder, "dev_every?": int, "data": SELECTION, "dev": SELECTION,
        "dev_decode": {"max_frames": int, "max_new_tokens": int}, "model": fields(AEDConfig, "vocab_size"), "train": TRAIN}
LLM_ASR_MODEL = fields(LLMASRConfig, "vocab_size", "lm_path")
SCHEMA = {
    "pretrain_aed": _AED, "pretrain_scratch_aed": _AED,
    "pretrain_lm": {"out_dir": str, "metrics": str, "text": [str], "train": TRAIN},
    "pretrain_llm_asr": {"out_dir": str, "metrics": str, "encoder_from?": Folder, "lm_from?": Folder,
                         "cache_encoder?": bool, "dev_every?": int, "max_tokens": int, "data": SELECTION, "dev_decode": {"max_frames": int, "max_new_tokens": int},
                         "dev": SELECTION, "model": LLM_ASR_MODEL, "train": TRAIN},
}


def _setup(params: dict, stage: str) -> dict:
    """The stage's params checked whole, and the seed *before* any model is built (reproducible initialisation)."""
    p = checked(params, stage, SCHEMA, top=("heldout_scenarios",))
    torch.manual_seed(p["train"].get("seed", 0))
    return p


def _tracked(stage: str, params: dict, tags: dict):
    """An MLflow run on rank 0; under torchrun the other ranks only train."""
    rank, _ = distributed()
    return tracking.run("base", stage, params=params, tags=tags) if rank == 0 else contextlib.nullcontext()


def _is_main() -> bool:
    return distributed()[0] == 0


def _log(step: int, metrics: dict) -> None:
    mlflow.log_metrics(metrics, step=step)


def _speech(params: dict, stage: str, tok, max_frames: int, max_tokens: int, char_targets: bool = False):
    p = params[stage]
    fs = FeatureStore(params["features"]["out_dir"])
    rows = list(fs.rows.values())
    heldout = params["heldout_scenarios"]
    spec = {**p["data"], "exclude_scenarios": heldout}
    train_data = SpeechData(select(rows, spec), fs, tok, max_frames, max_tokens, char_targets)
    dev_data = SpeechData(select(rows, {**p["dev"], "exclude_scenarios": heldout}), fs, tok, max_frames, max_tokens)
    return train_data, dev_data


def _dev_eval(p: dict, model, dev, tok, methods: list[str]) -> dict:
    out, precision = {}, p["train"].get("precision", "fp32")
    for m in methods:
        result = evaluate(model, dev, tok, method=m, run_name=f"dev ({m})", precision=precision, **p["dev_decode"])
        out[f"dev_{m}_wer"], out[f"dev_{m}_cer"] = result.wer, result.cer
        out[f"dev_{m}_utt_per_s"] = round(len(dev) / result.seconds, 1)
    return out


def _dev_curve(p: dict, model, dev, tok, method: str, curve: list, swap=None):
    """An ``on_step`` callback: every ``p["dev_every"]`` steps (0: never) decode ``dev`` and log its WER/CER.

    ``swap`` is a context manager factory that puts the real encoder back for the decode (cached-state training).
    The points also go into ``curve`` as ``[step, wer, cer]``: the stage's metrics file keeps the curve.
    """
    every = int(p.get("dev_every", 0))
    precision = p["train"].get("precision", "fp32")

    def on_step(step: int) -> None:
        if not every or step % every or step >= p["train"]["max_steps"] or not _is_main():
            return  # the final step's decode is the stage's own dev evaluation
        with swap() if swap else contextlib.nullcontext():
            r = evaluate(model, dev, tok, method=method, precision=precision, progress=False, **p["dev_decode"])
        curve.append([step, r.wer, r.cer])
        _log(step, {f"dev_{method}_wer": r.wer, f"dev_{method}_cer": r.cer})
    return on_step


def _finish(params: dict, stage: str, model, kind: str, config, summary: dict, t0: float, tok) -> dict:
    p = params[stage]
    store.save(model, kind, p["out_dir"], config, tok=tok)
    summary["wall_seconds"] = round(time.time() - t0, 1)
    summary["trainable_params"] = sum(x.numel() for x in model.parameters() if x.requires_grad)
    summary["params"] = sum(x.numel() for x in model.parameters())
    mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    write_json(p["metrics"], summary)
    print(f"[{stage}] " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return summary


def _aed(params: dict, stage: str) -> dict:
    p, t0 = _setup(params, stage), time.time()
    m = p["model"]
    if p.get("init_from"):  # a pretrained Whisper with its own tokenizer, prompt and special ids
        tok = store.tokenizer(p["init_from"])
        model, cfg = AEDModel.from_pretrained(p["init_from"], m["ctc_weight"], m["label_smoothing"],
                                              ctc_units=m.get("ctc_units")), None
    else:
        tok = load_tokenizer(params["tokenizer"]["out_dir"])
        cfg = store.aed_config(m, len(tok))
        model = AEDModel.from_config(cfg)
    max_tokens = model.config.max_target_positions - len(model.prompt_ids) - 1
    train_data, dev = _speech(params, stage, tok, model.max_frames, max_tokens, char_targets=model.ctc_units == "chars")
    with _tracked(stage, {**p["train"], "init_from": p.get("init_from"), **{f"model.{k}": v for k, v in m.items()}},
                  {"model_kind": "aed"}):
        curve = []
        summary = train(model, train_data.lengths, train_data.collate, TrainConfig.from_params(p["train"]),
                        _ckpt_dir(params, stage), on_log=_log, desc=stage,
                        on_step=_dev_curve(p, model, dev, tok, "attention", curve))
        if not _is_main():
            return summary
        summary.update(train_utterances=len(train_data), train_hours=round(sum(train_data.lengths) / 360000, 2))
        methods = ["attention", "ctc"] if model.ctc_weight > 0 else ["attention"]
        summary.update(_dev_eval(p, model, dev, tok, methods))
        summary["dev_curve"] = curve + [[summary["steps"], summary["dev_attention_wer"], summary["dev_attention_cer"]]]
        return _finish(params, stage, model, "aed", cfg, summary, t0, tok)


def pretrain_aed(params: dict) -> dict:
    return _aed(params, "pretrain_aed")


def pretrain_scratch_aed(params: dict) -> dict:
    return _aed(params, "pretrain_scratch_aed")


class CausalLMObjective(torch.nn.Module):
    """Next-token cross-entropy on ``<s> t1 .. tn </s>``, batched in the trainer's convention."""

    def __init__(self, lm, bos_id: int, eos_id: int, pad_id: int):
        super().__init__()
        self.lm, self.bos_id, self.eos_id, self.pad_id = lm, bos_id, eos_id, pad_id

    def forward(self, tokens: torch.Tensor, token_lengths: torch.Tensor) -> dict:
        B, U = tokens.shape
        ids = torch.full((B, U + 2), self.pad_id, dtype=torch.long, device=tokens.device)
        labels = torch.full_like(ids, -100)
        for i, n in enumerate(token_lengths.tolist()):
            seq = torch.cat([torch.tensor([self.bos_id], device=tokens.device), tokens[i, :n],
                             torch.tensor([self.eos_id], device=tokens.device)])
            ids[i, : n + 2] = seq
            labels[i, 1: n + 2] = seq[1:]
        mask = (labels != -100) | (torch.arange(U + 2, device=tokens.device) == 0)
        return {"loss": self.lm(input_ids=ids, attention_mask=mask.long(), labels=labels).loss}


def pretrain_lm(params: dict) -> dict:
    stage, t0 = "pretrain_lm", time.time()
    p = _setup(params, stage)
    check_keys(params["pretrain_llm_asr"]["model"], "pretrain_llm_asr.model", LLM_ASR_MODEL)  # the LM's size
    tok = load_tokenizer(params["tokenizer"]["out_dir"])
    heldout = set(params["heldout_scenarios"])
    prepared = Path(params["prepare"]["out_dir"])
    rows = [r for name in p["text"] for r in read_jsonl(prepared / f"{name}.jsonl")
            if r["split"] == "train" and r.get("scenario") not in heldout]
    texts = [encode(tok, r["text"]) for r in rows]
    from asrlab.models.llm_asr import LLMASRConfig, LMConfig, build_lm
    cfg = LLMASRConfig(len(tok), lm=LMConfig(**params["pretrain_llm_asr"]["model"]["lm"]))  # the LM part alone
    lm = build_lm(cfg)
    objective = CausalLMObjective(lm, cfg.bos_id, cfg.eos_id, cfg.pad_id)

    def collate(idx):
        toks, lens = pad_tokens([texts[i] for i in idx], cfg.pad_id)
        return {"tokens": toks, "token_lengths": lens}

    with _tracked(stage, p["train"], {"model_kind": "lm"}):
        summary = train(objective, [len(t) + 2 for t in texts], collate, TrainConfig.from_params(p["train"]),
                        _ckpt_dir(params, stage), on_log=_log, desc=stage)
        if not _is_main():
            return summary
        summary["train_sentences"] = len(texts)
        return _finish(params, stage, lm, "lm", None, summary, t0, tok)


def pretrain_llm_asr(params: dict) -> dict:
    stage, t0 = "pretrain_llm_asr", time.time()
    p = _setup(params, stage)
    tok = store.tokenizer(p["lm_from"]) if p.get("lm_from") else load_tokenizer(params["tokenizer"]["out_dir"])
    cfg = store.llm_asr_config(p["model"], len(tok), lm_path=p.get("lm_from"))
    model = store.build_llm_asr(cfg, encoder_from=p.get("encoder_from"))
    train_data, dev = _speech(params, stage, tok, model.max_frames, p["max_tokens"])
    encoder = model.encoder
    if p.get("cache_encoder"):  # train on the states `encoder_states` stored: the encoder must stay frozen
        if not any(fnmatch.fnmatch("encoder.x", pat) for pat in p["train"].get("freeze", [])):
            raise ValueError("pretrain_llm_asr.cache_encoder needs the encoder frozen (train.freeze: ['encoder.*'])")
        states = FeatureStore(params["encoder_states"]["out_dir"])
        spec = {**p["data"], "exclude_scenarios": params["heldout_scenarios"]}
        train_data = SpeechData(select(list(states.rows.values()), spec), states, tok, None, p["max_tokens"])
        model.encoder = CachedEncoder(encoder.d_model)
    with _tracked(stage, {**p["train"], "encoder_from": p.get("encoder_from"), "lm_from": p.get("lm_from"),
                          "cache_encoder": bool(p.get("cache_encoder")), "lora": json.dumps(p["model"].get("lora"))},
                  {"model_kind": "llm_asr"}):
        stand_in = model.encoder

        @contextlib.contextmanager
        def real_encoder():
            model.encoder = encoder
            try:
                yield
            finally:
                model.encoder = stand_in
        curve = []
        try:
            summary = train(model, train_data.lengths, train_data.collate, TrainConfig.from_params(p["train"]),
                            _ckpt_dir(params, stage), on_log=_log, desc=stage,
                            on_step=_dev_curve(p, model, dev, tok, "attention", curve, real_encoder))
        finally:
            model.encoder = encoder  # the real (frozen) encoder goes back before evaluation and saving
            if p.get("cache_encoder"):  # the trainer froze the stand-in; the count below must see it frozen
                encoder.requires_grad_(False)
        if not _is_main():
            return summary
        summary.update(train_utterances=len(train_data))
        summary.update(_dev_eval(p, model, dev, tok, ["attention"]))
        summary["dev_curve"] = curve + [[summary["steps"], summary["dev_attention_wer"], summary["dev_attention_cer"]]]
        return _finish(params, stage, model, "llm_asr", cfg, summary, t0, tok)
