"""Scoring with jiwer per group, hypotheses TSV, and MLflow runs in a temporary sqlite store."""

import pandas as pd
import pytest

from asrlab import tracking
from asrlab.evaluation import error_rates, flat_metrics, score, write_hypotheses


def test_error_rates_normalise_and_count():
    r = error_rates(["Set an alarm!", "play music"], ["set an alarm", "play muzic"])
    assert r["wer"] == pytest.approx(100 * 1 / 5)
    assert r["cer"] == pytest.approx(100 * 1 / (len("set an alarm") + len("play music")), abs=1e-3)
    assert r["utterances"] == 2 and r["ref_words"] == 5


def test_error_rates_bad_inputs():
    with pytest.raises(ValueError, match="nothing to score"):
        error_rates([], [])
    with pytest.raises(ValueError, match="2 references but 1"):
        error_rates(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty after normalisation"):
        error_rates(["!!"], ["a"])
    assert error_rates(["a b"], [""])["wer"] == 100.0  # an empty hypothesis is all deletions


def test_score_per_group_is_corpus_level_within_group():
    rows = [
        {"ref": "wake me up", "hyp": "wake me up", "scenario": "alarm", "pool": "synthetic"},
        {"ref": "play jazz", "hyp": "play jars", "scenario": "music", "pool": "synthetic"},
        {"ref": "play some rock", "hyp": "play rock", "scenario": "music", "pool": "real_proxy"},
    ]
    s = score(rows, ("scenario", "pool"))
    assert s["overall"]["wer"] == pytest.approx(100 * 2 / 8)
    assert s["scenario/alarm"]["wer"] == 0.0
    assert s["scenario/music"]["wer"] == pytest.approx(100 * 2 / 5)
    assert s["pool/real_proxy"]["wer"] == pytest.approx(100 / 3, abs=1e-3)
    flat = flat_metrics(s)
    assert flat["wer"] == s["overall"]["wer"] and flat["scenario/music/cer"] == s["scenario/music"]["cer"]


def test_hypotheses_tsv_round_trip(tmp_path):
    rows = [{"id": "u1", "ref": "a b", "hyp": "a", "scenario": "alarm"}]
    write_hypotheses(tmp_path / "h.tsv", rows)
    assert pd.read_csv(tmp_path / "h.tsv", sep="\t").to_dict("records") == rows


def test_mlflow_run_logs_params_metrics_tags_and_artifact(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("ASRLAB_STAGE", "eval_test")
    art = tmp_path / "hyps.tsv"
    art.write_text("id\tref\thyp\n")
    with tracking.run("unit", "run-1", params={"lr": 0.1}, tags={"checkpoint_md5": "abc"}, root=tmp_path):
        mlflow.log_metrics({"wer": 12.5, "scenario/alarm/cer": 3.0})
        mlflow.log_artifact(str(art))
    assert (tmp_path / "mlflow.db").is_file()
    mlflow.set_tracking_uri(tracking.tracking_uri(tmp_path))
    runs = mlflow.search_runs(experiment_names=["unit"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["metrics.wer"] == 12.5 and run["params.lr"] == "0.1"
    assert run["tags.dvc_stage"] == "eval_test" and run["tags.checkpoint_md5"] == "abc"
    assert "tags.git_commit" in run
    client = mlflow.tracking.MlflowClient()
    assert [a.path for a in client.list_artifacts(run["run_id"])] == ["hyps.tsv"]
    assert str(tmp_path / "mlartifacts") in run["artifact_uri"]


def test_mlflow_run_that_fails_is_marked_failed(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RuntimeError):
        with tracking.run("unit", "boom", root=tmp_path):
            raise RuntimeError("boom")
    mlflow.set_tracking_uri(tracking.tracking_uri(tmp_path))
    assert mlflow.search_runs(experiment_names=["unit"]).iloc[0]["status"] == "FAILED"


def test_tracking_uri_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
