"""Stage `features`: log-mel features for every utterance that has audio, in shards with one index.

Reads every manifest the `render` stage wrote (rendered sets and passed-through recordings). Bad audio
(unreadable, empty, zero-length, silent) goes to ``rejects.jsonl``; other sample rates and stereo are
resampled / downmixed with a warning (see :mod:`asrlab.audio.io`). Output: ``<out_dir>/shard-*.safetensors``,
``index.jsonl``, ``rejects.jsonl``; metrics ``results/data/features.json`` (utterances and hours per pool
and split, frames, wall time).
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from multiprocessing import get_context
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from asrlab.audio.features import log_mel
from asrlab.audio.io import BadAudio, load_audio
from asrlab.io import atomic_dir, atomic_path, read_jsonl, write_json, write_jsonl
from asrlab.params import checked

SCHEMA = {"features": {"out_dir": str, "stats": str, "n_mels": int, "n_fft": int, "hop": int, "shard_size": int,
                       "workers": int}}

_CFG: dict = {}


def _init(cfg: dict) -> None:
    _CFG.update(cfg)
    torch.set_num_threads(1)


def extract(row: dict):
    """Worker: (row, fp16 features, duration, warnings) or (row, None, reason)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            audio = load_audio(row["audio"])
            feats = log_mel(audio, _CFG["n_mels"], _CFG["n_fft"], _CFG["hop"])
        except BadAudio as e:
            return row, None, str(e), []
        except Exception as e:  # noqa: BLE001 - one bad utterance must not kill the stage
            return row, None, f"{row['audio']}: {e!r}", []
    return row, torch.from_numpy(feats).to(torch.float16).contiguous(), len(audio) / 16_000, [str(w.message) for w in caught]


def run(params: dict) -> dict:
    p = checked(params, "features", SCHEMA)  # before any old output is removed
    t0 = time.time()
    manifests = Path(params["render"]["out_dir"])
    if not manifests.is_dir():
        raise FileNotFoundError(f"{manifests.resolve()}: no manifests; run `dvc repro render` first or set "
                                "`render.out_dir` in params.yaml")
    rows = [r for m in sorted(manifests.glob("*.jsonl")) if m.name != "rejects.jsonl" for r in read_jsonl(m)]
    seen = set()
    for r in rows:
        if r["id"] in seen:
            raise ValueError(f"utterance id {r['id']!r} appears in more than one manifest under {manifests}")
        seen.add(r["id"])
    cfg = {k: p[k] for k in ("n_mels", "n_fft", "hop")}
    with atomic_dir(p["out_dir"]) as out:  # the old store stays whole until the new one is complete
        index, rejects, warned, n_shards = _extract_all(rows, cfg, p, out)
    return _report(p, index, rejects, warned, n_shards, t0)


def _extract_all(rows: list[dict], cfg: dict, p: dict, out: Path):
    index, rejects, warned = [], [], []
    shard: dict[str, torch.Tensor] = {}
    n_shards = 0

    def flush():
        nonlocal shard, n_shards
        if shard:
            name = f"shard-{n_shards:05d}.safetensors"
            with atomic_path(out / name) as tmp:
                save_file(shard, str(tmp))
            for uid in shard:
                index[pos[uid]]["shard"] = name
            n_shards += 1
            shard = {}

    pos: dict[str, int] = {}
    ctx = get_context("fork")
    with ctx.Pool(p["workers"], initializer=_init, initargs=(cfg,)) as pool:
        it = pool.imap(extract, rows, chunksize=16)  # ordered: shards follow manifest order
        for row, feats, info, warns in tqdm(it, total=len(rows), desc="features", unit="utt", mininterval=2):
            if feats is None:
                rejects.append({"id": row["id"], "audio": row["audio"], "reason": info})
                continue
            warned += [{"id": row["id"], "warning": w} for w in warns]
            pos[row["id"]] = len(index)
            index.append({**row, "duration": round(info, 3), "frames": int(feats.shape[0]), "shard": None})
            shard[row["id"]] = feats
            if len(shard) >= p["shard_size"]:
                flush()
    flush()
    write_jsonl(out / "rejects.jsonl", rejects + warned)
    write_jsonl(out / "index.jsonl", index)  # last: its presence means the shards are complete
    return index, rejects, warned, n_shards


def _report(p: dict, index: list, rejects: list, warned: list, n_shards: int, t0: float) -> dict:
    agg: dict = defaultdict(lambda: {"utterances": 0, "hours": 0.0})
    for r in index:
        a = agg[f"{r['pool']}/{r['split']}"]
        a["utterances"] += 1
        a["hours"] += r["duration"] / 3600
    wall = time.time() - t0
    audio_s = sum(r["duration"] for r in index)
    stats = {
        "utterances": len(index), "rejects": len(rejects), "warnings": len(warned), "shards": n_shards,
        "frames": sum(r["frames"] for r in index), "audio_hours": round(audio_s / 3600, 3),
        "wall_seconds": round(wall, 1), "x_realtime": round(audio_s / wall, 1),
        "per_pool_split": {k: {"utterances": v["utterances"], "hours": round(v["hours"], 3)} for k, v in sorted(agg.items())},
    }
    write_json(p["stats"], stats)
    print(f"[features] {len(index)} utterances ({audio_s / 3600:.2f} h) in {n_shards} shards, "
          f"{len(rejects)} rejects, {wall:.0f} s")
    return stats
