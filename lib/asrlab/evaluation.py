"""Scoring: WER and CER with jiwer, overall and per group, on the shared text normalisation.

Corpus-level rates (total edits / total reference words or characters), as jiwer computes them over lists;
a group's rate is the same computation restricted to its utterances. Hypotheses go to a TSV beside the
metrics so that every number can be traced back to the strings that produced it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import jiwer
import pandas as pd

from asrlab.io import atomic_path
from asrlab.text import normalize_text

GROUP_KEYS = ("scenario", "accent", "pool", "corpus", "split")


def error_rates(refs: list[str], hyps: list[str]) -> dict:
    """WER and CER (in %) of normalised hypotheses against normalised references."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("nothing to score: no utterances")
    refs = [normalize_text(r) for r in refs]
    hyps = [normalize_text(h) for h in hyps]
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
