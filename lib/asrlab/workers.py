"""Sweep workers: ``asrlab sweep <study> --trials N`` runs trials of a study's Optuna sweeps until each sweep
has N complete trials, sharing them with every other worker on the same storage.

Start any number of workers, in one shell (``--workers 3``) or on many machines with the same
``OPTUNA_STORAGE`` (``--storage``) and ``MLFLOW_TRACKING_URI``; give each machine's workers their own
``--worker-index`` so that their random startup trials differ. Workers go through the sweeps in one order, so
they meet on the same sweep; the study stage that owns the sweeps (e.g. ``syn2real_evaluate``) then finds the
trials done and only evaluates the chosen λ. Faults, retries and MLflow runs: :mod:`asrlab.sweep`.
"""

from __future__ import annotations

import fnmatch
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from asrlab.io import item_seed

if TYPE_CHECKING:  # mlflow, optuna and torch load only when a worker runs, not for `asrlab --help`
    from asrlab.sweep import Objective


@dataclass
class Sweep:
    """One Optuna study of a study's sweep plan: its name, how to build its objective (lazily: it loads
    models), and the keyword arguments of :func:`asrlab.sweep.run_study`."""
    name: str
    label: str                                  # what ``--only`` matches, e.g. "weather-synthetic-s0-single"
    objective: Callable[[], Objective]
    n_trials: int
    kwargs: dict = field(default_factory=dict)


def syn2real_sweeps(params: dict) -> Iterator[Sweep]:
    """The λ sweeps of ``syn2real_evaluate`` (:func:`asrlab.stages.syn2real.lambda_sweeps`, so the stage reuses
    the workers' trials), each objective loading its baseline, task vector and dev set when it is first run."""
    from asrlab.methods.task_vectors import TaskVector
    from asrlab.stages import syn2real as s2r

    ctx = s2r.Context(params)
    for syn, seed, src, target in s2r.targets(ctx):
        for ls in s2r.lambda_sweeps(ctx, syn, seed, src, target):

            def objective(ls=ls) -> Objective:
                model = ctx.load(ls.baseline)
                dev = s2r.dev_data(ctx, ls.target, model)
                keep = {k: v.clone() for k, v in model.state_dict().items()}
                return s2r.lambda_objective(ctx, model, keep, TaskVector.load(ls.vector), dev)

            yield Sweep(ls.name, ls.label, objective, ctx.p["sweep"]["trials"], ls.kwargs)


SCHEMA = {"sweep_check": {"trials": int, "trial_seconds": float}}


def check_sweeps(params: dict) -> Iterator[Sweep]:
    """``asrlab sweep check``: one sweep of a synthetic objective that only waits ``trial_seconds`` — to try
    a new storage, tracking server or fleet of workers before spending compute (and to test them)."""
    import time

    from asrlab.params import checked

    p = checked(params, "sweep_check", SCHEMA)

    def objective() -> Objective:
        def trial_fn(trial):
            lam = trial.suggest_float("lambda", 0.0, 1.0)
            time.sleep(p["trial_seconds"])
            return (lam - 0.3) ** 2, {"dev_cer": 100 * (lam - 0.3) ** 2}
        return trial_fn

    yield Sweep("check", "check", objective, p["trials"],
                dict(experiment="sweep_check", run_prefix="check", enqueue=[{"lambda": 0.0}]))


SWEEPS: dict[str, Callable[[dict], Iterator[Sweep]]] = {"syn2real": syn2real_sweeps, "check": check_sweeps}


def work(study: str, params: dict, trials: int | None = None, only: str | None = None, worker_index: int = 0,
         heartbeat_interval: int = 10, grace_period: int = 30) -> dict[str, int]:
    """Run one worker over every sweep of ``study`` (``only``: a glob on the sweep labels). Worker 0 samples
    with the study's own seed, as the stage would; worker i > 0 with a seed derived from it and i.
    Returns {study name: complete trials}."""
    from asrlab import sweep

    if study not in SWEEPS:
        raise ValueError(f"asrlab sweep: unknown study {study!r}; known: {sorted(SWEEPS)}")
    prepare_stores()
    done = {}
    for sw in SWEEPS[study](params):
        if only and not fnmatch.fnmatch(sw.label, only):
            continue
        n = sw.n_trials if trials is None else trials
        kwargs = dict(sw.kwargs)
        kwargs["tags"] = {**kwargs.get("tags", {}), "sweep_worker": f"{socket.gethostname()}:{os.getpid()}"}
        if worker_index:
            kwargs["seed"] = item_seed(kwargs.get("seed", 0), "worker", worker_index)
        print(f"[sweep] worker {worker_index} pid {os.getpid()}: {sw.name} -> {n} complete trials", flush=True)
        result = sweep.run_study(sw.name, sw.objective(), n, show_progress=False,
                                 heartbeat_interval=heartbeat_interval, grace_period=grace_period, **kwargs)
        done[sw.name] = len(sweep.complete_trials(result))
        print(f"[sweep] worker {worker_index}: {sw.name} has {done[sw.name]} complete trials", flush=True)
    if not done:
        raise ValueError(f"asrlab sweep {study}: no sweep matches --only {only!r}")
    return done


def spawn(argv: list[str], workers: int, first_index: int = 0) -> int:
    """Start ``workers`` worker processes of ``asrlab <argv>`` (indices first_index, first_index + 1, ...) and
    wait for them all; returns the worst exit code."""
    procs = [subprocess.Popen([sys.executable, "-m", "asrlab.cli", *argv, "--workers", "1",
                               "--worker-index", str(first_index + i)]) for i in range(workers)]
    return max(proc.wait() for proc in procs)


def prepare_stores(root: str | Path = ".", attempts: int = 6) -> None:
    """Create the Optuna and MLflow schemas. Workers starting together on a fresh database race to create
    them and all but one fail (PostgreSQL: "duplicate key ... pg_type"): the losers wait and try again, and
    then find the schema made. ``--workers N`` calls this once before it starts N workers: on a fresh sqlite
    file a lost race can leave MLflow's migration half done ("duplicate column"), so do not start the first
    workers on a new sqlite file from separate shells."""
    import random
    import time

    import mlflow
    import sqlalchemy

    from asrlab import sweep, tracking

    for attempt in range(attempts):
        try:
            sweep.storage(root)
            mlflow.MlflowClient(tracking.tracking_uri(root)).search_experiments(max_results=1)
            return
        except (sqlalchemy.exc.SQLAlchemyError, mlflow.exceptions.MlflowException):
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.5, 2.0))


def add_arguments(parser) -> None:
    parser.add_argument("study", help=f"the study whose sweeps to work on: {', '.join(SWEEPS)}")
    parser.add_argument("--trials", type=int, help="complete trials per sweep (default: the study's params)")
    parser.add_argument("--storage", help="Optuna storage URL (default: $OPTUNA_STORAGE, else sqlite optuna.db)")
    parser.add_argument("--only", help="a glob on sweep labels, e.g. 'weather-s0-*'")
    parser.add_argument("--workers", type=int, default=1, help="worker processes to start here (default 1)")
    parser.add_argument("--worker-index", type=int, default=0, help="this worker's index (its sampler seed)")
    parser.add_argument("--heartbeat", type=int, default=10, help="seconds between a running trial's heartbeats")
    parser.add_argument("--grace", type=int, default=30, help="seconds without heartbeat before a trial is stale")


def main(args, params_path: str) -> int:
    """The ``asrlab sweep`` command."""
    from asrlab.params import load_params, set_threads

    if args.storage:
        os.environ["OPTUNA_STORAGE"] = args.storage  # inherited by spawned workers
    if args.workers > 1:
        prepare_stores()
        argv = ["--params", params_path, "sweep", args.study, "--heartbeat", str(args.heartbeat),
                "--grace", str(args.grace)]
        for flag, value in (("--trials", args.trials), ("--only", args.only)):
            if value is not None:
                argv += [flag, str(value)]
        return spawn(argv, args.workers, args.worker_index)
    params = load_params(Path(params_path))
    set_threads(params)
    work(args.study, params, args.trials, args.only, args.worker_index,
         args.heartbeat, args.grace)
    return 0
