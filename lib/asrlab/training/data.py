"""Utterances for training and evaluation: rows of the feature index, selected by params, with their
features and token ids, batched in the models' convention (:mod:`asrlab.models.batch`)."""

from __future__ import annotations

import random
import warnings

import torch

from asrlab.audio.features import FeatureStore
from asrlab.models.batch import pad_features, pad_tokens
from asrlab.text import char_ids
from asrlab.tokenizer import encode

SELECT_KEYS = {"corpus", "pools", "splits", "scenarios", "exclude_scenarios", "max_utterances", "seed"}
# A data selection in params.yaml (exclude_scenarios is the code's: heldout_scenarios)
SELECTION = {"corpus?": [str], "pools?": [str], "splits?": [str], "scenarios?": [str], "max_utterances?": int,
             "seed?": int}


def select(rows: list[dict], spec: dict) -> list[dict]:
    """Rows of the feature index matching ``spec`` (corpus, pools, splits, scenarios, exclude_scenarios),
    then a seeded sample of ``max_utterances``. Sorted by id, so the selection is deterministic."""
    unknown = set(spec) - SELECT_KEYS
    if unknown:
        raise ValueError(f"unknown data selection key(s) {sorted(unknown)}; known: {sorted(SELECT_KEYS)}")

    def keep(r: dict) -> bool:
        return ((not spec.get("corpus") or r["corpus"] in spec["corpus"])
                and (not spec.get("pools") or r["pool"] in spec["pools"])
                and (not spec.get("splits") or r["split"] in spec["splits"])
                and (not spec.get("scenarios") or r.get("scenario") in spec["scenarios"])
                and r.get("scenario") not in (spec.get("exclude_scenarios") or ()))

    out = sorted((r for r in rows if keep(r)), key=lambda r: r["id"])
    n = spec.get("max_utterances")
    if n is not None and len(out) > n:
        out = sorted(random.Random(spec.get("seed", 0)).sample(out, n), key=lambda r: r["id"])
    if not out:
        raise ValueError(f"data selection {spec} matches no utterance in the feature index")
    return out


class SpeechData:
    """Selected utterances with features held in memory (float16) and their token ids."""

    def __init__(self, rows: list[dict], store: FeatureStore, tokenizer, max_frames: int | None = None,
                 max_tokens: int | None = None, char_targets: bool = False):
        kept = []
        for r in rows:
            if max_frames is not None and r["frames"] > max_frames:
                continue
            kept.append(r)
        if len(kept) < len(rows):
            warnings.warn(f"{len(rows) - len(kept)} utterance(s) longer than the encoder's {max_frames} frames "
                          "were left out", stacklevel=2)
        tokens = [encode(tokenizer, r["text"]) for r in kept]
        if max_tokens is not None:
            keep = [i for i, t in enumerate(tokens) if len(t) <= max_tokens]
            if len(keep) < len(kept):
                warnings.warn(f"{len(kept) - len(keep)} transcript(s) longer than {max_tokens} tokens were left out",
                              stacklevel=2)
            kept, tokens = [kept[i] for i in keep], [tokens[i] for i in keep]
        if not kept:
            raise ValueError("no utterance left after the length filters")
        self.rows, self.tokens = kept, tokens
        self.chars = [char_ids(r["text"]) for r in kept] if char_targets else None
        self.features = [store.load(r["id"]).to(torch.float16) for r in kept]
        self.lengths = [int(f.shape[0]) for f in self.features]

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, idx: list[int]) -> dict:
        feats, lens = pad_features([self.features[i].float() for i in idx])
        toks, tok_lens = pad_tokens([self.tokens[i] for i in idx])
        batch = {"features": feats, "feature_lengths": lens, "tokens": toks, "token_lengths": tok_lens}
        if self.chars is not None:
            batch["ctc_tokens"], batch["ctc_token_lengths"] = pad_tokens([self.chars[i] for i in idx])
        return batch
