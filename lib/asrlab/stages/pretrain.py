"""Stages `pretrain_aed`, `pretrain_lm`, `pretrain_llm_asr`: the base models every study adapts.

- ``pretrain_aed``: a Whisper-style AED (joint CTC/attention loss) on general text rendered in the
  synthetic and real-proxy pools (lm.txt sentences tagged outside the held-out scenarios).
- ``pretrain_lm``: the LLM-ASR's small causal LM, on training text alone.
- ``pretrain_llm_asr``: encoder (initialised from the base AED's) -> projector -> the pretrained LM with
  LoRA, on the same speech.

Each trains through the one trainer, resumes from ``checkpoints/<stage>/<config hash>`` after an
interruption, logs the training curve and a dev evaluation to MLflow, and writes its model folder
(:mod:`asrlab.models.store`) and ``results/base/<stage>.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import mlflow
import torch

from asrlab import tracking
from asrlab.audio.features import FeatureStore
from asrlab.decode import transcribe
from asrlab.evaluation import error_rates
from asrlab.io import read_jsonl, stable_hash, write_json
from asrlab.models import store
from asrlab.models.aed import AEDModel
from asrlab.models.batch import pad_tokens
from asrlab.tokenizer import encode, load_tokenizer
from asrlab.training.data import SpeechData, select
from asrlab.training.trainer import TrainConfig, distributed, train


def _ckpt_dir(params: dict, stage: str) -> Path:
    """Checkpoints are keyed by the stage's params and its inputs, so a changed config never resumes a stale run."""
    p = params[stage]
    inputs = [tracking.file_hash(params["tokenizer"]["out_dir"]), tracking.file_hash(Path(params["features"]["out_dir"]) / "index.jsonl")]
    return Path(params.get("checkpoints_dir", "checkpoints")) / stage / stable_hash(p, inputs, n=12)


def _setup(p: dict) -> None:
    """Threads, and the seed *before* any model is built, so random initialisation is reproducible."""
    torch.set_num_threads(int(os.environ.get("ASRLAB_THREADS", os.cpu_count() or 1)))
    torch.manual_seed(p["train"].get("seed", 0))


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
    heldout = params.get("heldout_scenarios", [])
    spec = {**p["data"], "exclude_scenarios": heldout}
    train_data = SpeechData(select(rows, spec), fs, tok, max_frames, max_tokens, char_targets)
    dev_data = SpeechData(select(rows, {**p["dev"], "exclude_scenarios": heldout}), fs, tok, max_frames, max_tokens)
    return train_data, dev_data


def _dev_eval(model, dev, tok, methods: list[str]) -> dict:
    refs = [r["text"] for r in dev.rows]
    out = {}
    for m in methods:
        t0 = time.time()
        hyps = transcribe(model, dev, tok, method=m, desc=f"dev ({m})")
        rates = error_rates(refs, hyps)
        out[f"dev_{m}_wer"], out[f"dev_{m}_cer"] = rates["wer"], rates["cer"]
        out[f"dev_{m}_utt_per_s"] = round(len(refs) / (time.time() - t0), 1)
    return out


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


def pretrain_aed(params: dict) -> dict:
    stage, p, t0 = "pretrain_aed", params["pretrain_aed"], time.time()
    _setup(p)
    tok = load_tokenizer(params["tokenizer"]["out_dir"])
    cfg = store.aed_config(p["model"], len(tok))
    model = AEDModel.from_pretrained(p["init_from"]) if p.get("init_from") else AEDModel.from_config(cfg)
    train_data, dev = _speech(params, stage, tok, model.max_frames, model.config.max_target_positions - 2,
                              char_targets=model.ctc_units == "chars")
    with _tracked(stage, {**p["train"], **{f"model.{k}": v for k, v in p["model"].items()}}, {"model_kind": "aed"}):
        summary = train(model, train_data.lengths, train_data.collate, TrainConfig.from_params(p["train"]),
                        _ckpt_dir(params, stage), on_log=_log, desc=stage)
        if not _is_main():
            return summary
        summary.update(train_utterances=len(train_data), train_hours=round(sum(train_data.lengths) / 360000, 2))
        summary.update(_dev_eval(model, dev, tok, ["attention", "ctc"]))
        return _finish(params, stage, model, "aed", cfg, summary, t0, tok)


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
    stage, p, t0 = "pretrain_lm", params["pretrain_lm"], time.time()
    _setup(p)
    tok = load_tokenizer(params["tokenizer"]["out_dir"])
    heldout = set(params.get("heldout_scenarios", []))
    prepared = Path(params["prepare"]["out_dir"])
    rows = [r for name in p["text"] for r in read_jsonl(prepared / f"{name}.jsonl")
            if r["split"] == "train" and r.get("scenario") not in heldout]
    texts = [encode(tok, r["text"]) for r in rows]
    cfg = store.llm_asr_config(params["pretrain_llm_asr"]["model"], len(tok))
    from asrlab.models.llm_asr import build_lm
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
    stage, p, t0 = "pretrain_llm_asr", params["pretrain_llm_asr"], time.time()
    _setup(p)
    tok = load_tokenizer(params["tokenizer"]["out_dir"])
    cfg = store.llm_asr_config(p["model"], len(tok), lm_path=p.get("lm_from"))
    model = store.build_llm_asr(cfg, encoder_from=p.get("encoder_from"))
    train_data, dev = _speech(params, stage, tok, model.max_frames, p["max_tokens"])
    with _tracked(stage, {**p["train"], "encoder_from": p.get("encoder_from"), "lm_from": p.get("lm_from"),
                          "lora": json.dumps(p["model"].get("lora"))}, {"model_kind": "llm_asr"}):
        summary = train(model, train_data.lengths, train_data.collate, TrainConfig.from_params(p["train"]),
                        _ckpt_dir(params, stage), on_log=_log, desc=stage)
        if not _is_main():
            return summary
        summary.update(train_utterances=len(train_data))
        summary.update(_dev_eval(model, dev, tok, ["attention"]))
        return _finish(params, stage, model, "llm_asr", cfg, summary, t0, tok)
