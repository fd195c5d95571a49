"""Stage `render`: speech for manifests in the voice pools declared in params.

Each *set* names a text source (``slurp`` sentences or tagged ``lm`` sentences) and the pools to render it
in; each *pool* names an engine, its voices (or accent domains of voices), speaking-rate and pitch ranges,
ranges for the engine's own options (Piper: ``noise_scale``, ``noise_w``) and an optional channel. Every
utterance's voice, rate, pitch, options, channel seed and (stochastic engine) synthesis seed are drawn from a
seed derived from (seed, pool, utterance id), so the result does not depend on worker order or on which other
utterances are rendered. Audio lands in a content-addressed cache keyed by everything that shapes it, so
re-runs and new manifests reuse it. A failing utterance goes to the rejects list, never kills the run.

Outputs: ``data/manifests/<set>.jsonl`` (one row per utterance and pool), ``recordings.jsonl`` passed
through from `prepare` (audio that exists already), ``rejects.jsonl``; metrics ``results/data/render.json``.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from multiprocessing import get_context
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from asrlab.audio import channel as channel_mod
from asrlab.audio.tts import ENGINES, SAMPLE_RATE, EngineUnavailable, SynthesisError, get_engine
from asrlab.data.slurp import check_scenarios
from asrlab.params import checked
from asrlab.io import atomic_path, item_seed, read_jsonl, stable_hash, write_json, write_jsonl


def pool_voices(name: str, pool: dict) -> dict[str, str]:
    """voice -> accent domain of a pool (``native`` for a pool without domains)."""
    if "domains" in pool:
        return {v: dom for dom, voices in pool["domains"].items() for v in voices}
    if not pool.get("voices"):
        raise ValueError(f"render.pools.{name}: give `voices` or `domains`")
    return {v: pool.get("accent", "native") for v in pool["voices"]}


def plan(row: dict, pool_name: str, pool: dict, voices: dict[str, str], seed: int, cache_dir: Path) -> dict:
    """Everything that determines one utterance's audio, drawn from its own seed, plus its cache path."""
    rng = random.Random(item_seed(seed, pool_name, row["id"]))
    voice = rng.choice(sorted(voices))
    rate = rng.randint(*pool["rate"])
    pitch = rng.randint(*pool["pitch"])
    ch = pool.get("channel")
    ch_seed = rng.getrandbits(31) if ch else None
    # drawn after the draws above, and keyed only when present: pools of deterministic engines keep their
    # voices, rates and cache addresses
    engine = ENGINES.get(pool["engine"])
    tts = {k: round(rng.uniform(*pool[k]), 4) for k in getattr(engine, "options", ()) if pool.get(k)}
    if getattr(engine, "stochastic", False):
        tts["seed"] = rng.getrandbits(31)
    key = stable_hash(pool["engine"], voice, row["text"], rate, pitch, ch, ch_seed, SAMPLE_RATE,
                      *([tts] if tts else []), n=20)
    return {
        "id": f"{row['id']}@{pool_name}", "text": row["text"], "scenario": row.get("scenario"),
        "accent": voices[voice], "split": row["split"], "corpus": row["corpus"], "pool": pool_name,
        "speaker": voice, "engine": pool["engine"], "voice": voice, "rate": rate, "pitch": pitch,
        "channel_seed": ch_seed, **({"tts": tts} if tts else {}), "audio": str(cache_dir / key[:2] / f"{key}.flac"),
        "_channel": ch,
    }


def check_pool(name: str, pool: dict) -> None:
    """Options a pool gives must be ones its engine takes, as [low, high] ranges."""
    engine = ENGINES.get(pool["engine"])
    if engine is None:
        get_engine(pool["engine"])  # raises, naming the known engines
    if pool["engine"] == "mbrola" and pool.get("domains"):  # accent domains: other languages' voices reading English
        for domain, vs in pool["domains"].items():
            for v in vs:
                if not v.endswith("-en"):
                    raise ValueError(f"render.pools.{name}.domains.{domain}: MBROLA voice {v!r} is not an English "
                                     f"reader (espeak-ng's voice for it ends in -en, e.g. {v}-en); use the -en voice")
    for k in sorted({o for e in ENGINES.values() for o in e.options}):
        if pool.get(k) is not None and k not in engine.options:
            raise ValueError(f"render.pools.{name}.{k}: engine {pool['engine']!r} has no option {k!r} "
                             f"(it takes {list(engine.options) or 'none'})")
    for k in engine.options:
        r = pool.get(k)
        if r is not None and not (isinstance(r, list) and len(r) == 2 and 0 <= r[0] <= r[1]):
            raise ValueError(f"render.pools.{name}.{k}: expected a range [low, high] with 0 <= low <= high, got {r!r}")


def synthesize(job: dict) -> tuple[dict | None, dict | None, str]:
    """Render one planned utterance into the cache (a worker's task). Returns (row, reject, cache) with
    cache one of "hit", "miss" or "damaged" (an entry that did not decode in full, rendered again)."""
    row = {k: v for k, v in job.items() if not k.startswith("_")}
    path = Path(row["audio"])
    cfg = channel_mod.ChannelConfig.from_params(job["_channel"]) if job["_channel"] else None
    if cfg is not None:
        row["channel"] = channel_mod.draw(cfg, row["channel_seed"])
    cache = "miss"
    try:
        if path.is_file():
            try:  # a full decode: a truncated FLAC can have a valid header (sf.info alone passes it)
                audio, sr = sf.read(path, dtype="float32")
                if len(audio) == 0 or sr != SAMPLE_RATE:
                    raise ValueError(f"{path}: empty or not {SAMPLE_RATE} Hz")
                row["duration"] = round(len(audio) / sr, 3)
                return row, None, "hit"
            except (sf.LibsndfileError, RuntimeError, ValueError):  # damaged: render again, never reject for ever
                path.unlink()
                cache = "damaged"
        audio = get_engine(row["engine"]).synthesize(row["text"], row["voice"], row["rate"], row["pitch"],
                                                     **row.get("tts", {}))
        if cfg is not None:
            audio, _ = channel_mod.apply(audio, cfg, row["channel_seed"], SAMPLE_RATE)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            sf.write(tmp, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        row["duration"] = round(len(audio) / SAMPLE_RATE, 3)
        return row, None, cache
    except EngineUnavailable:
        raise  # checked before rendering; if it happens now, every utterance would fail: stop
    except Exception as e:  # noqa: BLE001 - one bad utterance must not kill a long render
        reason = str(e) if isinstance(e, (SynthesisError, sf.LibsndfileError, ValueError, OSError)) else repr(e)
        return None, {"id": row["id"], "voice": row["voice"], "text": row["text"], "reason": reason}, cache


def select(rows: list[dict], spec: dict, heldout: list[str], seed: int, name: str) -> list[dict]:
    if spec.get("splits"):
        rows = [r for r in rows if r["split"] in spec["splits"]]
    if spec.get("scenarios"):
        check_scenarios(spec["scenarios"], f"render.sets.{name}.scenarios")
        rows = [r for r in rows if r.get("scenario") in spec["scenarios"]]
    if spec.get("exclude_heldout") and spec.get("only_heldout"):
        raise ValueError(f"render.sets.{name}: exclude_heldout and only_heldout exclude each other")
    if spec.get("exclude_heldout"):
        rows = [r for r in rows if r.get("scenario") not in set(heldout)]
    if spec.get("only_heldout"):
        rows = [r for r in rows if r.get("scenario") in set(heldout)]
    n = spec.get("max_utterances")
    if n is not None and len(rows) > n:
        rows = random.Random(f"{seed}/{name}").sample(rows, n)
    return sorted(rows, key=lambda r: r["id"])


POOL = {"engine": str, "voices?": [str], "domains?": {str: [str]}, "accent?": str, "rate": [int], "pitch": [int],
        "channel?": dict, **{f"{k}?": [float] for e in ENGINES.values() for k in e.options}}  # channel: ChannelConfig
SET = {"source": str, "pools": [str], "splits?": [str], "scenarios?": [str], "exclude_heldout?": bool,
       "only_heldout?": bool, "max_utterances?": int}
SCHEMA = {"render": {"seed": int, "workers": int, "out_dir": str, "cache_dir": str, "stats": str,
                     "pools": {str: POOL}, "sets": {str: SET}}}


def run(params: dict) -> dict:
    p = checked(params, "render", SCHEMA, top=("heldout_scenarios",))
    t0 = time.time()
    heldout = params["heldout_scenarios"]
    check_scenarios(heldout, "heldout_scenarios")
    prepared = Path(params["prepare"]["out_dir"])
    out, cache_dir = Path(p["out_dir"]), Path(p["cache_dir"])
    sources = {"slurp": prepared / "slurp.jsonl", "lm": prepared / "lm.jsonl"}

    pools = p["pools"]
    for name, pool in pools.items():
        check_pool(name, pool)
    voices = {name: pool_voices(name, pool) for name, pool in pools.items()}
    jobs_by_set: dict[str, list[dict]] = {}
    for set_name, spec in p["sets"].items():
        if spec["source"] not in sources:
            raise ValueError(f"render.sets.{set_name}.source: {spec['source']!r} is not one of {sorted(sources)}")
        rows = select(read_jsonl(sources[spec["source"]]), spec, heldout, p["seed"], set_name)
        jobs_by_set[set_name] = []
        for pool_name in spec["pools"]:
            if pool_name not in pools:
                raise ValueError(f"render.sets.{set_name}: unknown pool {pool_name!r}; declared: {sorted(pools)}")
            jobs_by_set[set_name] += [plan(r, pool_name, pools[pool_name], voices[pool_name], p["seed"], cache_dir)
                                      for r in rows]
    for name, pool in pools.items():  # fail fast, before any work, when an engine or a voice is missing
        get_engine(pool["engine"]).check(sorted(voices[name]))
        if pool.get("channel"):  # a bad channel param would otherwise stop the run midway, inside a worker
            channel_mod.ChannelConfig.from_params(pool["channel"])

    jobs = [j for js in jobs_by_set.values() for j in js]
    results: dict[str, dict] = {}
    rejects: list[dict] = []
    hits = damaged = 0
    with get_context("fork").Pool(p["workers"]) if p["workers"] > 1 else _Serial() as pool:
        it = pool.imap_unordered(synthesize, jobs, chunksize=8)
        for row, reject, cache in tqdm(it, total=len(jobs), desc="render", unit="utt", mininterval=2):
            hits += cache == "hit"
            damaged += cache == "damaged"
            if row is not None:
                results[row["id"]] = row
            else:
                rejects.append(reject)

    stats: dict = {"sets": {}, "rejects": len(rejects), "utterances": len(results), "cache_hits": hits,
                   "cache_damaged": damaged}
    synth_seconds = 0.0
    for set_name, js in jobs_by_set.items():
        rows = [results[j["id"]] for j in js if j["id"] in results]
        write_jsonl(out / f"{set_name}.jsonl", rows)
        agg: dict = defaultdict(lambda: {"utterances": 0, "hours": 0.0})
        for r in rows:
            a = agg[f"{r['pool']}/{r['split']}"]
            a["utterances"] += 1
            a["hours"] += r["duration"] / 3600
        stats["sets"][set_name] = {k: {"utterances": v["utterances"], "hours": round(v["hours"], 3)}
                                   for k, v in sorted(agg.items())}
        synth_seconds += sum(r["duration"] for r in rows)
    write_jsonl(out / "recordings.jsonl", read_jsonl(prepared / "recordings.jsonl"))
    write_jsonl(out / "rejects.jsonl", sorted(rejects, key=lambda r: r["id"]))
    wall = time.time() - t0
    stats.update(wall_seconds=round(wall, 1), audio_hours=round(synth_seconds / 3600, 3),
                 new_audio_x_realtime=round(synth_seconds / wall, 1) if hits == 0 else None)
    write_json(p["stats"], stats)
    print(f"[render] {len(results)} utterances ({synth_seconds / 3600:.2f} h, {hits} from cache), "
          f"{len(rejects)} rejects, {wall:.0f} s")
    return stats


class _Serial:
    """Stand-in for a process pool with one worker: same interface, no processes (easier to debug)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, items, chunksize=1):
        return map(fn, items)
