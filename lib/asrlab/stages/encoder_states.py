"""Stage `encoder_states`: the frozen speech encoder's outputs, computed once per utterance.

The base LLM-ASR trains its projector and LM on a frozen encoder (``pretrain_llm_asr.encoder_from``, the
fine-tuned Whisper AED). Its states for the utterances that ``pretrain_llm_asr.data`` and ``.dev`` select
are stored here in the feature store's format (float16 safetensors shards + ``index.jsonl`` with the feature
index's columns, ``frames`` now counting encoder frames), so :class:`asrlab.audio.features.FeatureStore`
and :class:`asrlab.training.data.SpeechData` read them unchanged and training skips the encoder entirely.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from asrlab.params import Folder, check_keys, checked
from asrlab.audio.features import FeatureStore
from asrlab.io import atomic_dir, write_json, write_jsonl
from asrlab.models.batch import pad_features
from asrlab.models.encoder import SpeechEncoder
from asrlab.training.batching import bucket_batches
from asrlab.training.data import select


SCHEMA = {"encoder_states": {"out_dir": str, "metrics": str, "batch_frames": int, "shard_size": int}}


def selections(params: dict, rows: list[dict]) -> list[dict]:
    """Every utterance pretrain_llm_asr trains or validates on (held-out scenarios excluded), once."""
    p, heldout = params["pretrain_llm_asr"], params["heldout_scenarios"]
    chosen = {r["id"]: r for key in ("data", "dev") for r in select(rows, {**p[key], "exclude_scenarios": heldout})}
    return [chosen[k] for k in sorted(chosen)]


def run(params: dict) -> dict:
    p, t0 = checked(params, "encoder_states", SCHEMA, top=("heldout_scenarios",)), time.time()
    src = params["pretrain_llm_asr"]["encoder_from"]
    if not src:
        raise ValueError("pretrain_llm_asr.encoder_from is null: there is no pretrained encoder to cache")
    check_keys({"encoder_from": src}, "pretrain_llm_asr", {"encoder_from": Folder})
    fs = FeatureStore(params["features"]["out_dir"])
    encoder = SpeechEncoder.from_pretrained(src).eval()
    rows = [r for r in selections(params, list(fs.rows.values())) if r["frames"] <= encoder.max_frames]
    with atomic_dir(p["out_dir"]) as tmp:  # replaces out_dir only when complete
        index, shard, n_shards = [], {}, 0

        def flush():
            nonlocal shard, n_shards
            if shard:
                name = f"shard-{n_shards:05d}.safetensors"
                save_file(shard, str(tmp / name))
                for r in index[-len(shard):]:
                    r["shard"] = name
                n_shards, shard = n_shards + 1, {}

        batches = sorted(bucket_batches([r["frames"] for r in rows], p["batch_frames"], seed=0, epoch=0),
                         key=lambda b: min(rows[i]["id"] for i in b))
        with torch.no_grad(), tqdm(total=len(rows), desc="encoder_states", unit="utt", mininterval=2) as bar:
            for b in batches:
                feats, lens = pad_features([fs.load(rows[i]["id"]) for i in b])
                enc = encoder(feats, lens)
                for i, h, n in zip(b, enc.hidden, enc.lengths.tolist()):
                    shard[rows[i]["id"]] = h[:n].to(torch.float16).contiguous()
                    index.append({**{k: v for k, v in rows[i].items() if k != "shard"}, "frames": n, "shard": None})
                if len(shard) >= p["shard_size"]:
                    flush()
                bar.update(len(b))
        flush()
        write_jsonl(tmp / "index.jsonl", index)
    summary = {"encoder_from": src, "utterances": len(index), "shards": n_shards, "d_model": encoder.d_model,
               "frames": sum(r["frames"] for r in index), "wall_seconds": round(time.time() - t0, 1)}
    write_json(p["metrics"], summary)
    print(f"[encoder_states] {len(index)} utterances from {src} in {summary['wall_seconds']} s")
    return summary
