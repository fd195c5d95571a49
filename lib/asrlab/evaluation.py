"""Scoring: WER and CER with jiwer, overall and per group, on the shared text normalisation.

Corpus-level rates (total edits / total reference words or characters), as jiwer computes them over lists;
a group's rate is the same computation restricted to its utterances. Hypotheses go to a TSV beside the
metrics so that every number can be traced back to the strings that produced it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import jiwer
import pandas as pd

from asrlab.io import atomic_path
from asrlab.text import normalize_for_scoring

GROUP_KEYS = ("scenario", "accent", "pool", "corpus", "split")


def error_rates(refs: list[str], hyps: list[str]) -> dict:
    """WER and CER (in %) of normalised hypotheses against normalised references."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("nothing to score: no utterances")
    refs = [normalize_for_scoring(r) for r in refs]
    hyps = [normalize_for_scoring(h) for h in hyps]
    if not all(refs):
        raise ValueError("a reference is empty after normalisation; WER is undefined for it")
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    return {"wer": round(100 * words.wer, 3), "cer": round(100 * chars.cer, 3), "utterances": len(refs),
            "ref_words": sum(len(r.split()) for r in refs)}


def score(rows: list[dict], group_keys: tuple[str, ...] = GROUP_KEYS) -> dict:
    """rows: dicts with ``ref``, ``hyp`` and group columns. Returns {"overall": …, "<key>/<value>": …}."""
    out = {"overall": error_rates([r["ref"] for r in rows], [r["hyp"] for r in rows])}
    for key in group_keys:
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            if r.get(key) is not None:
                groups[str(r[key])].append(r)
        if len(groups) > 1 or (groups and key not in ("split", "corpus")):
            for value, rs in sorted(groups.items()):
                out[f"{key}/{value}"] = error_rates([r["ref"] for r in rs], [r["hyp"] for r in rs])
    return out


def flat_metrics(scores: dict, prefix: str = "") -> dict[str, float]:
    """{"overall": {"wer": …}} -> {"wer": …, "scenario/alarm/wer": …} for MLflow and DVC metrics."""
    flat = {}
    for group, m in scores.items():
        stem = "" if group == "overall" else f"{group}/"
        for k in ("wer", "cer"):
            flat[f"{prefix}{stem}{k}"] = m[k]
    return flat


def write_hypotheses(path: str | Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False)


ROW_KEYS = ("id", "scenario", "accent", "pool", "corpus", "speaker", "voice")


@dataclass
class Evaluation:
    """One scored decoding pass: per-group scores, the hypothesis rows behind them, and its speed."""

    scores: dict
    rows: list[dict]
    seconds: float

    @property
    def wer(self) -> float:
        return self.scores["overall"]["wer"]

    @property
    def cer(self) -> float:
        return self.scores["overall"]["cer"]

    def summary(self) -> dict:
        """Overall WER/CER/utterances and per-group WER/CER, for metrics JSON files."""
        return {**{k: self.scores["overall"][k] for k in ("wer", "cer", "utterances")},
                "per_group": {g: {"wer": m["wer"], "cer": m["cer"]} for g, m in self.scores.items() if g != "overall"}}


def evaluate(model, data, tokenizer, *, method: str = "attention", window: bool = False,
             max_frames: int = 60000, max_new_tokens: int = 96, group_keys: tuple[str, ...] = GROUP_KEYS,
             hyps_path: str | Path | None = None, experiment: str | None = None, run_name: str | None = None,
             params: dict | None = None, tags: dict | None = None, progress: bool = True,
             precision: str = "fp32") -> Evaluation:
    """The one evaluation path: decode ``data`` (:func:`asrlab.decode.transcribe`), score with the one
    normaliser per group, write the hypotheses TSV, and log an MLflow run when ``experiment`` is given.

    ``method``: "attention" (greedy, KV cache) or "ctc"; ``window``: pad to the encoder's 30-s window
    (zero-shot Whisper) instead of per-batch padding (every fine-tuned model); ``precision``: "fp32" or
    "bf16" (autocast).
    """
    from asrlab import tracking  # mlflow import on first use: scoring alone stays light
    from asrlab.decode import transcribe
    import mlflow

    t0 = time.time()
    hyps = transcribe(model, data, tokenizer, max_frames=max_frames, method=method, max_new_tokens=max_new_tokens,
                      desc=run_name or "decode", progress=progress, window=window, precision=precision)
    seconds = time.time() - t0
    rows = [{**{k: r.get(k) for k in ROW_KEYS if k in r}, "ref": r["text"], "hyp": h} for r, h in zip(data.rows, hyps)]
    result = Evaluation(score(rows, group_keys), rows, seconds)
    if hyps_path is not None:
        write_hypotheses(hyps_path, rows)
    if experiment is not None:
        run_params = {"decoding": method, "window": window, "precision": precision, **(params or {})}
        with tracking.run(experiment, run_name or experiment, params=run_params, tags=tags):
            mlflow.log_metrics(flat_metrics(result.scores))
            mlflow.log_metric("utt_per_s", len(rows) / max(seconds, 1e-9))
            if hyps_path is not None:
                mlflow.log_artifact(str(hyps_path))
    return result
