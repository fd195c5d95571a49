"""Sweep throughput: complete λ-trials per minute with 1 and 3 workers, sqlite vs PostgreSQL.

Each configuration runs ``asrlab sweep syn2real --only <target>-synthetic-s0-single --trials N --workers W`` — the real
syn2real λ objective (merge baseline + λ·τ in memory, decode the target's real-proxy dev speech, score), each
trial an MLflow run — on fresh stores of one engine for both Optuna and MLflow: the embedded sqlite files, or
a PostgreSQL cluster started for the benchmark (``scripts/postgres-local.sh``, Debian's packages). Reported:

- ``trials_per_min``: complete trials / (last trial's end − first trial's start) × 60: the sweep's rate once
  the workers run, from the trials' own timestamps in the Optuna storage;
- ``wall_s``: launch to the last worker's exit (process start, model loading, the final wait included).

Needs the default-profile syn2real models (``make repro``, or ``dvc pull``/``dvc checkout``). Writes
``results/bench/sweep.json``. With 2 cores, 3 workers cannot be 3× faster; the point is the storage's share.
``python benchmarks/sweep_bench.py [--trials 30] [--target general]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import optuna  # noqa: E402

from machine import facts, summary_line  # noqa: E402

from asrlab.io import write_json  # noqa: E402

PG = ROOT / "scripts" / "postgres-local.sh"


def pg(*args: str) -> str:
    return subprocess.run(["bash", str(PG), *args], check=True, capture_output=True, text=True).stdout.strip()


def run_config(engine: str, workers: int, trials: int, only: str, tmp: Path, cluster: Path | None) -> dict:
    tag = f"{engine}-{workers}w"
    if engine == "sqlite":
        storage, tracking_uri = f"sqlite:///{tmp / tag}-optuna.db", f"sqlite:///{tmp / tag}-mlflow.db"
    else:
        storage = pg("createdb", str(cluster), f"optuna_{workers}w").splitlines()[-1]
        tracking_uri = pg("createdb", str(cluster), f"mlflow_{workers}w").splitlines()[-1]
    env = {**os.environ, "OPTUNA_STORAGE": storage, "MLFLOW_TRACKING_URI": tracking_uri, "ASRLAB_THREADS": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "asrlab.cli", "sweep", "syn2real", "--only", only, "--trials",
                           str(trials), "--workers", str(workers)], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"{tag}: asrlab sweep failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    (summary,) = optuna.get_all_study_summaries(storage)
    done = [t for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials
            if t.state == optuna.trial.TrialState.COMPLETE]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    result = {"engine": engine, "workers": workers, "complete_trials": len(done), "span_s": round(span, 1),
              "trials_per_min": round(60 * len(done) / span, 1), "wall_s": round(wall, 1),
              "mean_trial_s": round(sum((t.duration.total_seconds() for t in done), 0.0) / len(done), 3)}
    print(result, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=30, help="complete trials per configuration")
    ap.add_argument("--target", default="general")
    ap.add_argument("--out", default=str(ROOT / "results/bench/sweep.json"))
    args = ap.parse_args()
    load_before, t_start = os.getloadavg(), time.time()
    only = f"{args.target}-synthetic-s0-single"
    results = []
    with tempfile.TemporaryDirectory(prefix="asrlab-sweep-bench-") as tmp:
        Path(tmp).chmod(0o711)  # as root the cluster belongs to `postgres`, which must reach it
        cluster = Path(tmp) / "pg"
        pg("start", str(cluster), os.environ.get("BENCH_PGPORT", "55432"))
        try:
            for engine in ("sqlite", "postgresql"):
                for workers in (1, 3):
                    results.append(run_config(engine, workers, args.trials, only, Path(tmp), cluster))
        finally:
            pg("stop", str(cluster), "immediate")
    rate = {(r["engine"], r["workers"]): r["trials_per_min"] for r in results}
    out = {"what": "complete syn2real λ-trials per minute (asrlab sweep), 1 vs 3 workers, sqlite vs PostgreSQL "
                   "for both Optuna and MLflow", "study": only, "trials": args.trials, "results": results,
           "speedup_3_workers": {e: round(rate[(e, 3)] / rate[(e, 1)], 2) for e in ("sqlite", "postgresql")},
           "total_wall_s": round(time.time() - t_start, 1), "machine": facts(load_before, optuna=optuna.__version__)}
    write_json(args.out, out)
    print(summary_line(out, args.out))


if __name__ == "__main__":
    main()
