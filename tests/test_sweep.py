"""Sweeps: a sweep killed with SIGKILL mid-trial resumes, keeps its finished trials, fails and retries the
killed one, and leaves no MLflow run RUNNING."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna

WORKER = Path(__file__).with_name("sweep_worker.py")


def test_killed_sweep_resumes_where_it_stopped(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "8", "0.7"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    done = []
    while time.time() < deadline:  # kill once two trials are complete and a third is running
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name="resume-test", storage=url)
        except KeyError:
            continue
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
        if len(done) >= 2 and running:
            break
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: t.params for t in done}
    assert before[0] == {"lambda": 0.0}  # the enqueued trial ran first
    time.sleep(3)  # past the grace period: the killed trial is stale

    out = subprocess.run([sys.executable, str(WORKER), str(tmp_path), "8", "0.05"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    study = optuna.load_study(study_name="resume-test", storage=url)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 8
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the killed trial
    failed = next(t for t in study.trials if t.state == optuna.trial.TrialState.FAIL)
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed.number]
    assert len(retried) == 1 and retried[0].params.items() >= failed.params.items()  # requeued with its λ, if drawn
    for number, params in before.items():  # finished trials are kept, not rerun
        assert study.trials[number].params == params
        assert study.trials[number].state == optuna.trial.TrialState.COMPLETE
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep_test").experiment_id])
    statuses = [r.info.status for r in runs]
    assert "RUNNING" not in statuses and statuses.count("KILLED") == 1 and statuses.count("FINISHED") == 8
