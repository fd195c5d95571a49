"""Optuna sweeps shared by the studies: one storage, seeded TPE, every trial also an MLflow run, resumable.

- Storage: ``OPTUNA_STORAGE`` (any SQLAlchemy URL, e.g. PostgreSQL) or the embedded default
  ``sqlite:///<repo>/optuna.db``. An RDB storage with a heartbeat: a trial whose process died is marked
  failed after the grace period and retried once (``RetryHeartbeatStaleTrialCallback``).
- Resume: a study is identified by its name (callers put a hash of their inputs in it); rerunning a killed
  sweep keeps the completed trials and runs only the missing ones, until ``n_trials`` trials are complete.
- Many workers (processes or machines, ``asrlab sweep``, :mod:`asrlab.workers`) may run one study at once:
  they stop when ``n_trials`` trials are complete between them (trials already in flight then still finish,
  so up to workers − 1 more). Every trial start fails stale trials and closes their MLflow runs, and a
  worker that finishes waits for the trials still in flight (up to the grace period) so that a dead
  worker's run is closed too.
- Tracking: each trial runs inside an MLflow run named ``<run_prefix>-t<number>`` with the trial's params,
  the objective's metrics and the study/trial as tags.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Callable

import mlflow
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from asrlab import tracking

Objective = Callable[[optuna.Trial], tuple[float, dict[str, float]]]


def storage_url(root: str | Path = ".") -> str:
    return os.environ.get("OPTUNA_STORAGE") or f"sqlite:///{Path(root).resolve() / 'optuna.db'}"


def storage(root: str | Path = ".", heartbeat_interval: int = 10, grace_period: int = 30) -> RDBStorage:
    with warnings.catch_warnings():  # heartbeats are "experimental" in optuna 5 yet the documented route
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(storage_url(root), heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def close_stale(study: optuna.Study, root: str | Path = ".", checked: set[int] | None = None) -> int:
    """Fail the trials whose worker died (no heartbeat for the grace period; each is requeued once) and mark
    their MLflow runs KILLED, so that no run stays RUNNING. Returns how many runs were closed.
    ``checked``: failed trial numbers already looked at (a worker calls this before every trial)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    checked = set() if checked is None else checked
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if t.number not in checked and run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
            n += 1
        checked.add(t.number)
    return n


def _open_study(name: str, storage_: RDBStorage, direction: str, sampler: optuna.samplers.BaseSampler,
                enqueue: list[dict]) -> optuna.Study:
    """Create the study, or load it when it exists. Only the worker that creates it enqueues ``enqueue``
    (the database's unique study name decides, so concurrent workers enqueue each set once); on a resume a
    set is enqueued again when one of its trials failed and none is complete, running or waiting."""
    try:
        study = optuna.create_study(study_name=name, storage=storage_, direction=direction, sampler=sampler)
        for params in enqueue:
            study.enqueue_trial(params)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage_, sampler=sampler)
    trials = study.get_trials(deepcopy=False)
    live = [t.params for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)]
    failed = [t.params for t in trials if t.state == TrialState.FAIL]
    for params in enqueue:
        if any(params.items() <= p.items() for p in failed) and not any(params.items() <= p.items() for p in live):
            study.enqueue_trial(params)
    return study


def _settle(study: optuna.Study, root: str | Path, checked: set[int], heartbeat_interval: int,
            grace_period: int) -> None:
    """Wait while other workers' trials are in flight, at most until a dead worker's trial would be stale,
    closing stale ones: the last worker to leave leaves no MLflow run RUNNING."""
    deadline = time.time() + grace_period + 2 * heartbeat_interval
    while True:
        close_stale(study, root, checked)
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) or time.time() > deadline:
            return
        time.sleep(min(heartbeat_interval, 2))


def run_study(name: str, objective: Objective, n_trials: int, *, experiment: str, run_prefix: str,
              seed: int = 0, startup_trials: int = 4, direction: str = "minimize", enqueue: list[dict] = (),
              tags: dict | None = None, run_params: dict | None = None, root: str | Path = ".",
              show_progress: bool = True, heartbeat_interval: int = 10, grace_period: int = 30) -> optuna.Study:
    """Create or resume study ``name`` and run trials until ``n_trials`` are complete: ``startup_trials``
    random ones (seeded), then TPE.

    ``objective(trial)`` returns (value to minimise, metrics to log). ``enqueue``: param sets evaluated
    first (e.g. λ = 0, the unmerged model), each enqueued once even across resumes. ``run_params``: fixed
    params logged on every trial's MLflow run beside the trial's own. Parallel workers should each get their
    own ``seed``, or their random startup trials draw the same params.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module="optuna")
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
    study = _open_study(name, storage(root, heartbeat_interval, grace_period), direction, sampler, list(enqueue))
    checked: set[int] = set()
    close_stale(study, root, checked)

    def tracked(trial: optuna.Trial) -> float:
        close_stale(study, root, checked)  # a worker that died during this sweep: close its run now
        run_tags = {**(tags or {}), "optuna_study": name, "optuna_trial": str(trial.number)}
        with tracking.run(experiment, f"{run_prefix}-t{trial.number}", tags=run_tags, root=root) as active:
            trial.set_user_attr("mlflow_run_id", active.info.run_id)
            value, metrics = objective(trial)
            mlflow.log_params({**(run_params or {}), **trial.params})
            mlflow.log_metrics({"objective": value, **metrics})
            for k, v in metrics.items():
                trial.set_user_attr(k, v)
        return value

    remaining = n_trials - len(complete_trials(study))
    if remaining > 0:
        study.optimize(tracked, n_trials=remaining, show_progress_bar=show_progress,
                       callbacks=[MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,))])
    _settle(study, root, checked, heartbeat_interval, grace_period)
    return study
