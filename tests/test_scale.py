"""Scale-out (issue 8): many sweep workers on one Optuna study, on the embedded sqlite default and on a real
PostgreSQL server started here; a worker killed mid-trial; an MLflow tracking server on PostgreSQL.

PostgreSQL runs from Debian's packages (scripts/setup-system.sh) as a throwaway cluster on loopback
(scripts/postgres-local.sh). Workers run `asrlab sweep check`: a synthetic objective that only waits, so the
tests time the engines, not a model."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from ci_policy import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
PG = ROOT / "scripts" / "postgres-local.sh"
TRIALS = 12  # 6 s of trials for 3 workers: a worker slow to start (a loaded machine) still gets some


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A cluster in a temporary folder outside pytest's (which the unprivileged server user cannot enter)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="asrlab-pg-")) / "cluster"
        self.dir.parent.chmod(0o711)  # as root, the cluster belongs to `postgres`, which must reach it
        self.port = free_port()
        self._sh("start", str(self.port))

    def _sh(self, *args: str) -> str:
        out = subprocess.run(["bash", str(PG), args[0], str(self.dir), *args[1:]], capture_output=True, text=True)
        if out.returncode:
            skip_or_fail(f"postgres-local.sh {args[0]} failed: {out.stderr[-1500:]}")
        return out.stdout.strip().splitlines()[-1]

    def database(self, name: str) -> str:
        return self._sh("createdb", name)

    def stop(self) -> None:
        self._sh("stop", "immediate")  # a throwaway cluster: no shutdown checkpoint
        shutil.rmtree(self.dir.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    if not any(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")) and shutil.which("pg_ctl") is None:
        skip_or_fail("PostgreSQL is not installed (sudo bash scripts/setup-system.sh)")
    pg = Postgres()
    yield pg
    pg.stop()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A clean environment for the worker processes: their params, and no inherited stores."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sweep_check": {"trials": TRIALS, "trial_seconds": 0.5}}))
    for var in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    return {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")},
            "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")]),
            "ASRLAB_THREADS": "1", "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def start_workers(n: int, cwd: Path, env: dict, *extra: str) -> list[subprocess.Popen]:
    """``n`` independent `asrlab sweep check` processes, as if on n machines (each its own --worker-index)."""
    return [subprocess.Popen([sys.executable, "-m", "asrlab.cli", "sweep", "check", "--worker-index", str(i), *extra],
                             cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(n)]


def finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode in (0, -signal.SIGKILL), out[-3000:]


def runs_of(tracking_uri: str) -> list:
    client = mlflow.MlflowClient(tracking_uri)
    return client.search_runs([client.get_experiment_by_name("sweep_check").experiment_id])


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_three_workers_share_one_study(engine, tmp_path, env, request):
    """sqlite: one machine, `asrlab sweep check --workers 3` (it creates the files before the workers
    start); PostgreSQL: three independent `asrlab sweep check` processes, as on three machines."""
    if engine == "sqlite":  # the embedded default: optuna.db and mlflow.db where the command runs
        storage, tracking_uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
        finish([subprocess.Popen([sys.executable, "-m", "asrlab.cli", "sweep", "check", "--workers", "3"],
                                 cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)])
    else:
        pg = request.getfixturevalue("postgres")
        storage, tracking_uri = pg.database("optuna_share"), pg.database("mlflow_share")
        finish(start_workers(3, tmp_path, {**env, "OPTUNA_STORAGE": storage, "MLFLOW_TRACKING_URI": tracking_uri}))

    study = optuna.load_study(study_name="check", storage=storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert TRIALS <= len(complete) <= TRIALS + 2  # trials in flight when the last completes still finish
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) == len(study.trials)
    assert sum(t.params == {"lambda": 0.0} for t in study.trials) == 1  # enqueued once, not once per worker
    runs = runs_of(tracking_uri)
    assert len(runs) == len(complete) and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["sweep_worker"] for r in runs}) == 3  # every worker ran trials


def test_worker_killed_mid_trial_is_retried_and_closed(postgres, tmp_path, env):
    """SIGKILL one of three workers in the middle of a trial: its trial fails after the grace period and is
    retried, the study still reaches the requested complete trials, and no MLflow run is left RUNNING."""
    storage, tracking_uri = postgres.database("optuna_fault"), postgres.database("mlflow_fault")
    env = {**env, "OPTUNA_STORAGE": storage, "MLFLOW_TRACKING_URI": tracking_uri}
    procs = start_workers(3, tmp_path, env, "--trials", "8", "--heartbeat", "1", "--grace", "3")
    victim, deadline = procs[1], time.time() + 120
    while time.time() < deadline:  # wait for the victim to be inside a trial, after one trial completed
        time.sleep(0.3)
        try:
            trials = optuna.load_study(study_name="check", storage=storage).trials
        except KeyError:
            continue
        mine = [t for t in trials if t.state == TrialState.RUNNING
                and t.user_attrs.get("mlflow_run_id")
                and mlflow.MlflowClient(tracking_uri).get_run(t.user_attrs["mlflow_run_id"]).data.tags
                .get("sweep_worker", "").endswith(f":{victim.pid}")]
        if mine and any(t.state == TrialState.COMPLETE for t in trials):
            break
    else:
        pytest.fail("the victim never started a trial")
    victim.send_signal(signal.SIGKILL)
    killed = mine[0].number
    finish(procs)

    study = optuna.load_study(study_name="check", storage=storage)
    by_state = {s: [t for t in study.trials if t.state == s] for s in TrialState}
    assert [t.number for t in by_state[TrialState.FAIL]] == [killed]
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].params.items() >= mine[0].params.items()
    assert len(by_state[TrialState.COMPLETE]) >= 8 and not by_state[TrialState.RUNNING]
    statuses = [r.info.status for r in runs_of(tracking_uri)]
    assert "RUNNING" not in statuses and statuses.count("KILLED") == 1
    assert statuses.count("FINISHED") == len(by_state[TrialState.COMPLETE])
    print(f"\nfault test: trial {killed} killed -> FAIL, retried as trial {retry[0].number} "
          f"({retry[0].state.name}); {len(by_state[TrialState.COMPLETE])} complete, "
          f"{len(by_state[TrialState.FAIL])} failed, MLflow {sorted(set(statuses))}")


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"mlflow server at {url} not healthy after {timeout} s")


def test_mlflow_server_on_postgresql(postgres, tmp_path, env, monkeypatch):
    """`make mlflow-server` on the test PostgreSQL: evaluation runs and a sweep log over HTTP through
    asrlab.tracking unchanged; mlflow.search_runs reads them back, artifacts come back from local disk."""
    port, artifacts = free_port(), tmp_path / "artifacts"
    backend = postgres.database("mlflow_server")
    server = subprocess.Popen(["make", "-s", "-C", str(ROOT), "mlflow-server", f"MLFLOW_BACKEND={backend}",
                               f"MLFLOW_ARTIFACTS={artifacts}", f"MLFLOW_PORT={port}", "MLFLOW_WORKERS=1"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        from asrlab import tracking

        hyps = tmp_path / "hyps.tsv"
        hyps.write_text("id\tref\thyp\n1\tset an alarm\tset alarm\n")
        for target, wer in (("weather", 12.5), ("music", 30.0)):
            with tracking.run("scale_eval", f"{target}-eval", params={"lambda": 0.4}, tags={"target": target},
                              root=tmp_path):
                mlflow.log_metrics({"wer": wer, "cer": wer / 2})
                mlflow.log_artifact(str(hyps))
        env = {**env, "MLFLOW_TRACKING_URI": url, "OPTUNA_STORAGE": postgres.database("optuna_server")}
        out = subprocess.run([sys.executable, "-m", "asrlab.cli", "sweep", "check", "--trials", "3"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

        mlflow.set_tracking_uri(url)
        runs = mlflow.search_runs(experiment_names=["scale_eval"], order_by=["metrics.wer ASC"])
        assert list(runs["tags.target"]) == ["weather", "music"] and list(runs["metrics.cer"]) == [6.25, 15.0]
        assert set(runs["status"]) == {"FINISHED"} and (runs["tags.git_commit"] != "").all()
        local = mlflow.artifacts.download_artifacts(run_id=runs["run_id"][0], artifact_path="hyps.tsv",
                                                    dst_path=str(tmp_path / "back"))
        assert Path(local).read_text() == hyps.read_text()
        assert any(artifacts.rglob("hyps.tsv"))  # stored by the server on its local disk
        sweep_runs = mlflow.search_runs(experiment_names=["sweep_check"])
        assert len(sweep_runs) >= 3 and set(sweep_runs["status"]) == {"FINISHED"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
