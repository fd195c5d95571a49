"""MLflow runs for every evaluation: params, metrics, provenance tags (git commit, DVC stage, file hashes)
and artifacts. Embedded default ``sqlite:///<repo>/mlflow.db`` (artifacts in ``<repo>/mlartifacts``);
``MLFLOW_TRACKING_URI`` points at a server instead. Open the UI with ``make mlflow-ui``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import mlflow


def tracking_uri(root: str | Path = ".") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


@functools.lru_cache(maxsize=8)  # asked once per run; sweeps start many runs in one process
def git_commit(root: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def file_hash(path: str | Path) -> str:
    """md5 of a file, or of a folder's files (sorted by name), like DVC's content hashes."""
    path = Path(path)
    h = hashlib.md5()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def run(experiment: str, run_name: str, params: dict | None = None, tags: dict | None = None,
        root: str | Path = ".") -> Iterator[mlflow.ActiveRun]:
    """Start an MLflow run with provenance tags; a failure inside marks the run FAILED, never RUNNING."""
    mlflow.set_tracking_uri(tracking_uri(root))
    if mlflow.get_experiment_by_name(experiment) is None:
        location = None
        if mlflow.get_tracking_uri().startswith("sqlite:"):
            location = (Path(root).resolve() / "mlartifacts" / experiment).as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    base_tags = {"git_commit": git_commit(root), "dvc_stage": os.environ.get("ASRLAB_STAGE", "interactive")}
    with mlflow.start_run(run_name=run_name, tags={**base_tags, **(tags or {})}) as active:
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        yield active
