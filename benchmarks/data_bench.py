"""Data-side throughput: TTS rendering per pool, the simulated channel, and log-mel feature extraction.

Renders a fixed sample of SLURP sentences (normalised as `prepare` does) in memory, never touching the
repository's audio cache, and writes the numbers to ``results/bench/data.json``:

1. render speed per pool of ``params.yaml`` (engine + voices + rate/pitch ranges), in seconds of audio per
   wall-clock second, with 1 worker (in-process, as `render` does for ``workers: 1``) and with N worker
   processes (a fork ``multiprocessing`` pool with ``imap_unordered(chunksize=8)``, as `render` does);
   synthesis only: no channel, no FLAC encoding;
2. ``asrlab.audio.channel.apply`` with ``render.pools.real_proxy.channel``: ms per utterance and x real time;
3. ``asrlab.audio.features.log_mel`` in one process: utterances/s and x real time.

Run from anywhere: ``python benchmarks/data_bench.py [--n 150] [--out results/bench/data.json]``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

import machine  # benchmarks/machine.py

from asrlab.audio import channel as channel_mod
from asrlab.audio.features import log_mel
from asrlab.audio.tts import SAMPLE_RATE, SynthesisError, get_engine
from asrlab.data.slurp import read_labelled
from asrlab.io import item_seed, write_json
from asrlab.params import load_params
from asrlab.stages.render import pool_voices

ROOT = Path(__file__).resolve().parent.parent
SEED = 1234


def sentences(slurp_dir: Path, n: int) -> list[dict]:
    """A fixed sample of ``n`` distinct normalised sentences from SLURP ``test.jsonl``."""
    path = slurp_dir / "test.jsonl"
    if not path.is_file():
        sys.exit(f"{path}: not found; pass --slurp-dir pointing at the SLURP text copy (devel.jsonl, test.jsonl)")
    rows, seen = [], set()
    for r in sorted(read_labelled(path, []), key=lambda r: r["id"]):
        if r["text"] not in seen:
            seen.add(r["text"])
            rows.append(r)
    if len(rows) < n:
        sys.exit(f"{path}: only {len(rows)} distinct sentences, asked for --n {n}")
    return sorted(random.Random(SEED).sample(rows, n), key=lambda r: r["id"])


def jobs_for(pool_name: str, pool: dict, rows: list[dict]) -> list[dict]:
    """One job per sentence: voices in turn, rate and pitch drawn from the pool's ranges (seeded)."""
    voices = sorted(pool_voices(pool_name, pool))
    jobs = []
    for i, r in enumerate(rows):
        rng = random.Random(item_seed(SEED, "bench", pool_name, r["id"]))
        jobs.append({"engine": pool["engine"], "voice": voices[i % len(voices)], "text": r["text"],
                     "rate": rng.randint(*pool["rate"]), "pitch": rng.randint(*pool["pitch"])})
    return jobs


def synth(job: dict) -> np.ndarray | None:
    try:
        return get_engine(job["engine"]).synthesize(job["text"], job["voice"], job["rate"], job["pitch"])
    except SynthesisError:
        return None


def synth_len(job: dict) -> int:
    """Worker task: synthesise and return only the sample count (-1 on failure), so no audio is pickled."""
    audio = synth(job)
    return -1 if audio is None else len(audio)


def summarize(wall: float, samples: list[int]) -> dict:
    ok = [s for s in samples if s >= 0]
    audio_s = sum(ok) / SAMPLE_RATE
    return {"wall_s": round(wall, 3), "audio_s": round(audio_s, 2), "utterances": len(ok),
            "failures": len(samples) - len(ok), "utt_per_s": round(len(ok) / wall, 2),
            "x_realtime": round(audio_s / wall, 2)}


def bench_render(pool_name: str, pool: dict, rows: list[dict], workers: int) -> tuple[dict, list[np.ndarray]]:
    voices = sorted(pool_voices(pool_name, pool))
    get_engine(pool["engine"]).check(voices)
    jobs = jobs_for(pool_name, pool, rows)
    for v in voices:  # warm the page cache for every voice (MBROLA databases) before timing
        synth({**jobs[0], "voice": v})

    t = time.perf_counter()
    audios = [synth(j) for j in jobs]
    one = summarize(time.perf_counter() - t, [-1 if a is None else len(a) for a in audios])

    t = time.perf_counter()  # includes starting the workers, as a `render` run does
    with get_context("fork").Pool(workers) as p:
        lens = list(p.imap_unordered(synth_len, jobs, chunksize=8))
    many = summarize(time.perf_counter() - t, lens)

    res = {"engine": pool["engine"], "voices": voices, "workers": {"1": one, str(workers): many},
           "speedup": round(many["x_realtime"] / one["x_realtime"], 2) if one["x_realtime"] else None}
    return res, [a for a in audios if a is not None]


def bench_channel(cfg_params: dict, audios: list[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
    cfg = channel_mod.ChannelConfig.from_params(cfg_params)
    channel_mod.apply(audios[0], cfg, 0)  # warm-up (imports, FFT plans)
    out, per = [], []
    t = time.perf_counter()
    for i, a in enumerate(audios):
        t1 = time.perf_counter()
        y, _ = channel_mod.apply(a, cfg, item_seed(SEED, "bench-channel", i))
        per.append(time.perf_counter() - t1)
        out.append(y)
    wall = time.perf_counter() - t
    audio_s = sum(len(a) for a in audios) / SAMPLE_RATE
    return {"config": cfg.as_dict(), "utterances": len(audios), "audio_s": round(audio_s, 2),
            "wall_s": round(wall, 3), "ms_per_utt": round(1000 * wall / len(audios), 2),
            "ms_per_utt_median": round(1000 * float(np.median(per)), 2),
            "ms_per_utt_p95": round(1000 * float(np.percentile(per, 95)), 2),
            "x_realtime": round(audio_s / wall, 1)}, out


def bench_features(audios: list[np.ndarray], fp: dict) -> dict:
    kw = {"n_mels": fp.get("n_mels", 80), "n_fft": fp.get("n_fft", 400), "hop": fp.get("hop", 160)}
    log_mel(audios[0], **kw)  # warm-up (builds the extractor's mel filters)
    t = time.perf_counter()
    frames = sum(log_mel(a, **kw).shape[0] for a in audios)
    wall = time.perf_counter() - t
    audio_s = sum(len(a) for a in audios) / SAMPLE_RATE
    return {**kw, "processes": 1, "utterances": len(audios), "frames": frames, "audio_s": round(audio_s, 2),
            "wall_s": round(wall, 3), "utt_per_s": round(len(audios) / wall, 1),
            "x_realtime": round(audio_s / wall, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=150, help="SLURP sentences rendered per pool (default 150)")
    ap.add_argument("--out", type=Path, default=ROOT / "results/bench/data.json", help="JSON output path")
    ap.add_argument("--slurp-dir", type=Path, default=ROOT / "../shared/data/slurp",
                    help="folder with SLURP test.jsonl (default: ../shared/data/slurp from the repo root)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--workers", type=int, default=2, help="worker processes for the parallel render run")
    args = ap.parse_args(argv)
    if args.n < 1 or args.workers < 2:
        ap.error("--n must be >= 1 and --workers >= 2")

    t0 = time.perf_counter()
    load_before = os.getloadavg()
    params = load_params(args.params)
    rp = params["render"]
    rows = sentences(args.slurp_dir.resolve(), args.n)

    render, audio_by_pool = {}, {}
    for name, pool in rp["pools"].items():
        render[name], audio_by_pool[name] = bench_render(name, pool, rows, args.workers)

    ch_pool = "real_proxy"
    channel, _ = bench_channel(rp["pools"][ch_pool]["channel"], audio_by_pool[ch_pool])
    channel["input_pool"] = ch_pool
    features = bench_features([a for aa in audio_by_pool.values() for a in aa], params.get("features", {}))
    features["input"] = "dry audio of every pool"

    result = {
        "machine": machine.facts(load_before, numpy=np.__version__),
        "n_utterances": args.n,
        "slurp_file": str((args.slurp_dir / "test.jsonl").resolve()),
        "render_note": "synthesis only (no channel, no FLAC); 1 worker runs in-process, N workers in a fork pool "
                       "whose start-up is timed; x_realtime = seconds of audio per wall-clock second",
        "render": render, "channel": channel, "features": features,
        "total_wall_s": round(time.perf_counter() - t0, 1),
    }
    write_json(args.out, result)

    w = str(args.workers)
    print(f"\nrender ({args.n} SLURP sentences per pool; x real time = audio s / wall s)")
    print(f"{'pool':<12}{'engine':<8}{'voices':>7}{'audio s':>9}{'1w xRT':>9}{f'{w}w xRT':>9}{'speedup':>9}{'fail':>6}")
    for name, r in render.items():
        a, b = r["workers"]["1"], r["workers"][w]
        print(f"{name:<12}{r['engine']:<8}{len(r['voices']):>7}{a['audio_s']:>9.1f}{a['x_realtime']:>9.1f}"
              f"{b['x_realtime']:>9.1f}{r['speedup']:>9.2f}{a['failures']:>6}")
    print(f"\nchannel ({ch_pool}, {channel['utterances']} utts): {channel['ms_per_utt']:.1f} ms/utt "
          f"(median {channel['ms_per_utt_median']:.1f}, p95 {channel['ms_per_utt_p95']:.1f}), "
          f"{channel['x_realtime']:.0f}x real time")
    print(f"log_mel (1 process, {features['utterances']} utts): {features['utt_per_s']:.0f} utt/s, "
          f"{features['x_realtime']:.0f}x real time")
    print(machine.summary_line(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
