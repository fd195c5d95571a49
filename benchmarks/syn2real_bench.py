"""Cost of one SYN2REAL λ trial against one plain evaluation pass (target: ≤ 1.1×).

A trial (as ``syn2real_evaluate`` runs it) sets the weights to baseline + λ·τ in memory
(:meth:`TaskVector.apply_to` with ``base=``), decodes the target's dev speech and scores it. A plain
evaluation pass decodes and scores the same data with the model as it is. Measured three ways, each the
median of ``--repeats``:

1. ``plain``: decode + score;
2. ``merge_and_eval``: in-memory merge + decode + score (the compute a trial adds: one pass over the weights);
3. ``trial``: whole Optuna trials through :func:`asrlab.sweep.run_study` — merge, decode, score, plus the
   Optuna storage (sqlite) and each trial's MLflow run (sqlite), in a temporary directory: one study of
   ``--repeats`` trials, its wall time divided by the trials (after a warm-up study that creates the databases).

Uses ``syn2real.base`` (``make repro`` first) as the baseline and, when present, the syn2real vector of seed 0;
otherwise a random τ of the same shapes (the cost does not depend on the values). The dev set is the real-proxy
dev speech of ``--target``. Writes ``results/bench/syn2real.json``. Run on an idle machine:
``python benchmarks/syn2real_bench.py [--repeats 7] [--target general] [--decoding ctc]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from machine import facts, summary_line  # noqa: E402

from asrlab import sweep  # noqa: E402
from asrlab.audio.features import FeatureStore  # noqa: E402
from asrlab.decode import transcribe  # noqa: E402
from asrlab.evaluation import error_rates  # noqa: E402
from asrlab.io import write_json  # noqa: E402
from asrlab.methods.task_vectors import TaskVector  # noqa: E402
from asrlab.models import store  # noqa: E402
from asrlab.params import load_params  # noqa: E402
from asrlab.training.data import SpeechData, select  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--target", default="general")
    ap.add_argument("--decoding", default="ctc", choices=["ctc", "attention"])
    ap.add_argument("--out", default=str(ROOT / "results/bench/syn2real.json"))
    args = ap.parse_args()
    load_before, t_start = os.getloadavg(), time.time()
    os.chdir(ROOT)
    params = load_params("params.yaml")
    torch.set_num_threads(int(os.environ.get("ASRLAB_THREADS", os.cpu_count() or 1)))
    tok = store.tokenizer(params["syn2real"]["base"])  # the model folder carries its tokenizer
    fs = FeatureStore(params["features"]["out_dir"])
    _, model = store.load(params["syn2real"]["base"])
    spec = {"corpus": ["slurp"], "pools": [params["syn2real"]["real_pool"]], "scenarios": [args.target], "splits": ["dev"]}
    dev = SpeechData(select(list(fs.rows.values()), spec), fs, tok, model.max_frames)
    vec = Path(params["syn2real"]["vectors_dir"]) / "s0-shared-synthetic-single.safetensors"
    if vec.is_file():
        tau, source = TaskVector.load(vec), str(vec)
    else:
        g = torch.Generator().manual_seed(0)
        tau = TaskVector({k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()
                          if v.is_floating_point()})
        source = "random (no syn2real vector yet)"
    keep = {k: v.clone() for k, v in model.state_dict().items()}
    refs = [r["text"] for r in dev.rows]

    def plain() -> float:
        return error_rates(refs, transcribe(model, dev, tok, method=args.decoding, progress=False))["cer"]

    def merged(lam: float) -> float:
        tau.apply_to(model, lam, base=keep)
        return plain()

    def timed(fn, *a) -> float:
        t0 = time.perf_counter()
        fn(*a)
        return time.perf_counter() - t0

    plain()  # warm-up
    plain_s = [timed(plain) for _ in range(args.repeats)]
    merge_s = [timed(merged, 0.1 * i) for i in range(args.repeats)]
    merge_only = [timed(tau.apply_to, model, 0.3, keep) for _ in range(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")}

        def objective(trial):
            cer = merged(trial.suggest_float("lambda", 0.0, 1.0))
            return cer, {"dev_cer": cer}

        # a first study creates the MLflow and Optuna databases (migrations take seconds): not a trial's cost
        sweep.run_study("warmup", objective, 1, experiment="bench", run_prefix="w", root=tmp, show_progress=False)
        t0 = time.perf_counter()  # one study of `repeats` trials, as a sweep runs them
        sweep.run_study("bench", objective, args.repeats, experiment="bench", run_prefix="b", root=tmp,
                        show_progress=False)
        trial_s = (time.perf_counter() - t0) / args.repeats
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v
    med = statistics.median
    result = {
        "what": "one λ trial vs one plain evaluation pass on the target's real-proxy dev speech",
        "target": args.target, "utterances": len(dev), "decoding": args.decoding, "vector": source,
        "repeats": args.repeats,
        "plain_eval_s": round(med(plain_s), 4),
        "merge_only_s": round(med(merge_only), 4),
        "merge_and_eval_s": round(med(merge_s), 4),
        "trial_with_optuna_and_mlflow_s": round(trial_s, 4),
        "ratio_merge_and_eval": round(med(merge_s) / med(plain_s), 3),
        "ratio_full_trial": round(trial_s / med(plain_s), 3),
        "target_ratio": 1.1,
    }
    result["target_met_compute"] = result["ratio_merge_and_eval"] <= 1.1
    result["target_met_full_trial"] = result["ratio_full_trial"] <= 1.1
    result["total_wall_s"] = round(time.time() - t_start, 1)
    result["machine"] = facts(load_before)
    write_json(args.out, result)
    print({k: v for k, v in result.items() if k != "machine"})
    print(summary_line(result, args.out))


if __name__ == "__main__":
    main()
