"""End to end: the whole pipeline under `dvc repro` on the smoke profile, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from asrlab.params import load_yaml  # YAML 1.2 floats, as DVC reads params

from asrlab import reads
from ci_policy import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.tts]
READS = ".asrlab-reads"  # in the smoke copy: <stage>.json, what each stage read (asrlab.reads)


def run(cmd: list[str], cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "HF_HUB_OFFLINE": "1", **extra_env}
    env.pop("MLFLOW_TRACKING_URI", None)  # the copy's own embedded store
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def executed_notebook_outputs(name: str, smoke_repo: Path, monkeypatch, cwd: Path) -> str:
    """Execute ``notebooks/<name>.ipynb`` headless on the smoke run's MLflow runs (found through ASRLAB_ROOT,
    not an inherited MLFLOW_TRACKING_URI) with ``cwd`` as its working directory; returns the text and data
    of every output, for the callers' assertions."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("ASRLAB_ROOT", str(smoke_repo))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nb = nbformat.read(ROOT / f"notebooks/{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return "".join(o.get("text", "") + json.dumps(o.get("data", {})) for c in nb.cells for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    """A smoke-profile copy of the repository after `dvc repro`; removed when the module is done (the copy and
    its caches hold several GB: Whisper tiny.en fine-tunes)."""
    if not SHARED_DATA.is_dir():
        skip_or_fail(f"shared data not found at {SHARED_DATA}")
    repo = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", "params.yaml", "experiments", "lib"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "cache.type", "reflink,hardlink,copy"], repo)  # as the repository's .dvc/config
    run(["asrlab", "profile", "smoke"], repo)
    params = load_yaml(repo / "params.yaml")
    # The data path is a param: point it at the shared data from wherever the copy lives.
    params["prepare"]["slurp"]["text_dir"] = str(SHARED_DATA / "slurp")
    params["prepare"]["slurp"]["lm_text"] = str(SHARED_DATA / "slurp" / "lm.txt")
    params["prepare"]["speechocean"]["dir"] = str(SHARED_DATA / "speechocean762")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], repo, **{reads.ENV: str(repo / READS)})  # each stage notes what it reads
    shutil.rmtree(repo / "checkpoints")  # resume state of finished runs (GBs); no test reads it
    yield repo
    shutil.rmtree(repo, ignore_errors=True)


def test_smoke_repro_produces_manifests_features_and_stats(smoke_repo: Path):
    stats = json.loads((smoke_repo / "results/data/stats.json").read_text())
    assert stats["slurp"]["sentences"] == 5007
    assert set(stats["slurp"]["per_split"]) == {"train", "dev", "test"}
    assert stats["tagger"]["dev_accuracy"] > 0.6
    assert stats["recordings"] == {"speechocean762/test": 20, "speechocean762/train": 20}

    render = json.loads((smoke_repo / "results/data/render.json").read_text())
    assert render["rejects"] == 0
    assert set(render["sets"]) == {"slurp", "general", "neural_source", "neural_target", "neural_target_eval"}
    pools = {k.split("/")[0] for k in render["sets"]["slurp"]}
    assert pools == {"synthetic", "real_proxy", "accents"}
    assert set(render["sets"]["neural_target_eval"]) <= {"synthetic_neural/dev", "synthetic_neural/test"}
    assert render["utterances"] == 60 * 3 + 40 * 2 + 6 + 6 + 4

    feats = json.loads((smoke_repo / "results/data/features.json").read_text())
    assert feats["utterances"] == render["utterances"] + 40  # + speechocean762
    assert feats["rejects"] == 0
    index = [json.loads(line) for line in (smoke_repo / "data/features/index.jsonl").read_text().splitlines()]
    assert {r["pool"] for r in index} == {"synthetic", "real_proxy", "accents", "synthetic_neural", "speechocean762"}
    for r in index:
        assert r["frames"] > 0 and (smoke_repo / "data/features" / r["shard"]).is_file()
        assert {"id", "text", "split", "corpus", "speaker", "accent"} <= set(r)


def test_smoke_repro_trains_and_scores_the_base_models(smoke_repo: Path):
    import mlflow

    for stage in ("pretrain_aed", "pretrain_scratch_aed", "pretrain_lm", "pretrain_llm_asr"):
        summary = json.loads((smoke_repo / f"results/base/{stage}.json").read_text())
        assert summary["steps"] == 6 and summary["skipped_steps"] == 0
        assert 0 < summary["trainable_params"] <= summary["params"]
    llm = json.loads((smoke_repo / "results/base/pretrain_llm_asr.json").read_text())
    assert llm["trainable_params"] < llm["params"]  # the cached (frozen) encoder is not counted as trainable
    # dev_every 3 of 6 steps: one decode mid-training (real encoder swapped back in), one at the end
    assert [point[0] for point in llm["dev_curve"]] == [3, 6]
    assert llm["dev_curve"][-1][1:] == [llm["dev_attention_wer"], llm["dev_attention_cer"]]
    for model in ("whisper", "base_aed", "scratch_aed", "base_lm", "base_llm_asr"):
        assert (smoke_repo / "models" / model / "asrlab_model.json").is_file()
        assert (smoke_repo / "models" / model / "tokenizer.json").is_file()  # a model folder carries its tokenizer
    imported = json.loads((smoke_repo / "results/base/import_whisper.json").read_text())
    assert imported["check"]["wer"] <= imported["check"]["max_wer"] and imported["vocab_size"] == 51864
    states = json.loads((smoke_repo / "results/base/encoder_states.json").read_text())
    assert states["utterances"] > 0 and states["d_model"] == 64  # the smoke base AED's encoder
    sets = ("synthetic", "real_proxy", "accents", "speechocean762")
    expected = ({f"{m}-{s}-{d}" for m in ("aed", "scratch_aed") for s in sets for d in ("attention", "ctc")}
                | {f"{m}-{s}-attention" for m in ("zero_shot", "llm_asr") for s in sets})
    metrics = json.loads((smoke_repo / "results/base/metrics.json").read_text())
    assert set(metrics) == expected
    assert all(m["utterances"] == 8 and m["cer"] >= 0 for m in metrics.values())
    headline = json.loads((smoke_repo / "results/base/headline.json").read_text())
    assert set(headline) == {"zero_shot", "aed", "llm_asr", "scratch_aed"} and set(headline["zero_shot"]) == set(sets)
    # the real tiny.en, zero-shot on the 30-s window, against tiny models trained for 6 steps
    assert headline["zero_shot"]["synthetic"]["cer"] < headline["aed"]["synthetic"]["cer"]
    assert (smoke_repo / "results/base/hyps/aed-real_proxy-attention.tsv").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{smoke_repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["base_eval"])
    assert len(runs) == len(expected) and set(runs["status"]) == {"FINISHED"}
    assert set(runs["tags.dvc_stage"]) == {"eval_base"}
    assert "metrics.scenario/alarm/wer" in runs.columns or "metrics.pool/synthetic/wer" in runs.columns


def test_smoke_repro_runs_the_syn2real_study(smoke_repo: Path):
    import mlflow
    import pandas as pd

    from asrlab.methods.task_vectors import TaskVector

    finetune = json.loads((smoke_repo / "results/syn2real/finetune.json").read_text())
    assert set(finetune["runs"]) >= {"s0/shared/synthetic/source_real", "s0/shared/synthetic/source_syn",
                                     "s0/synthetic/weather/baseline", "s0/synthetic/weather/oracle",
                                     "s1/synthetic/weather/baseline", "s0/shared/synthetic/group1_syn",
                                     "s0/shared/synthetic_neural/source_syn", "s0/synthetic_neural/weather/baseline"}
    assert "s1/synthetic_neural/weather/baseline" not in finetune["runs"]  # pool_seeds: one seed for Piper
    tau = TaskVector.load(smoke_repo / "models/syn2real_vectors/s0-shared-synthetic-single.safetensors")
    assert tau.metadata["real_run"] == "s0/shared/synthetic/source_real" and len(tau.deltas) > 50
    assert (smoke_repo / "models/syn2real_vectors/s0-shared-synthetic-avg.safetensors").is_file()
    assert (smoke_repo / "models/syn2real_vectors/s0-shared-synthetic_neural-single.safetensors").is_file()
    tab = pd.read_csv(smoke_repo / "results/syn2real/table.csv")
    esp = tab[(tab["pool"] == "synthetic") & (tab["test_set"] == "target")]
    assert list(esp["target"]) == ["weather", "mean"]
    for col in ("zero_shot_wer", "source_real_wer", "source_mix_wer", "baseline_wer", "syn2real_wer",
                "baseline_cer", "syn2real_cer", "oracle_wer", "syn2real_avg_wer"):
        assert esp[col].notna().all(), col
    so = tab[(tab["pool"] == "synthetic_neural") & (tab["test_set"] == "speechocean762")]
    assert so[["zero_shot_wer", "baseline_wer", "syn2real_wer"]].notna().all().all()
    assert "±" in (smoke_repo / "results/syn2real/table.md").read_text()  # two seeds: mean ± std
    for fig in ("lambda.png", "bars.png"):
        assert (smoke_repo / "results/syn2real" / fig).stat().st_size > 10_000
    headline = json.loads((smoke_repo / "results/syn2real/headline.json").read_text())
    assert set(headline) == {"synthetic", "synthetic_neural"}
    assert headline["synthetic"]["seeds"] == 2 and headline["synthetic_neural"]["seeds"] == 1
    assert set(headline["synthetic"]["speechocean762"]) == {"zero_shot_wer", "baseline_wer", "syn2real_wer",
                                                            "syn2real_real_tau_wer"}
    trials = [json.loads(x) for x in (smoke_repo / "results/syn2real/trials.jsonl").read_text().splitlines()]
    # espeak-ng: 2 seeds × (single τ, averaged τ); Piper: 1 seed × single τ; 2 trials each
    assert len(trials) == (2 * 2 + 1) * 2
    assert sum(t["lambda"] == 0.0 for t in trials) == 5  # λ = 0 enqueued in every sweep
    mlflow.set_tracking_uri(f"sqlite:///{smoke_repo / 'mlflow.db'}")
    sweep_runs = mlflow.search_runs(experiment_names=["syn2real_sweep"])
    assert len(sweep_runs) == len(trials) and set(sweep_runs["status"]) == {"FINISHED"}


def test_syn2real_notebook_rebuilds_the_table_from_mlflow(smoke_repo: Path, monkeypatch):
    outputs = executed_notebook_outputs("syn2real", smoke_repo, monkeypatch, smoke_repo)
    assert "table.csv matches the MLflow runs" in outputs


def test_every_stage_declares_what_it_reads(smoke_repo: Path):
    """Declared = read (issue 18): every stage of the smoke repro ran in its `asrlab <stage>` process with the
    recorder on; each param key and data file it read must be declared in its dvc.yaml entry (as DVC resolved
    it in dvc.lock): a param or a dotted prefix of it, a file under a dep or one of the stage's outs."""
    lock = yaml.safe_load((smoke_repo / "dvc.lock").read_text())["stages"]
    command = {s: v["cmd"].removeprefix("asrlab ") for s, v in lock.items()}  # lock names may be foreach@keys
    assert all(c.isidentifier() for c in command.values()), command  # one `asrlab <stage>` process each
    recorded = {p.stem: json.loads(p.read_text()) for p in (smoke_repo / READS).glob("*.json")}
    assert set(recorded) == set(command.values())
    missing = {s: reads.undeclared(recorded[command[s]], *reads.declarations(lock[s]), smoke_repo)
               for s in sorted(lock)}
    assert not any(missing.values()), "reads not declared in dvc.yaml:\n" + "\n".join(
        f"  {s}: {', '.join(m)}" for s, m in missing.items() if m)


def test_second_repro_is_a_noop(smoke_repo: Path):
    proc = run(["dvc", "repro"], smoke_repo)
    out = proc.stdout + proc.stderr
    assert "Running stage" not in out, out
    status = run(["dvc", "status"], smoke_repo)
    assert "up to date" in status.stdout.lower(), status.stdout


# ------------------------------------------------------------------------------ soft_tokens study (issue 7)


def test_smoke_repro_runs_the_soft_tokens_study(smoke_repo: Path):
    import mlflow

    p = load_yaml(smoke_repo / "params.yaml")["soft_tokens"]
    ks, seeds = p["kmeans"]["ks"], p["downstream"]["seeds"]
    res = smoke_repo / "results/soft_tokens"
    for k in ks:
        assert (smoke_repo / f"models/soft_tokens/centroids/k{k}.npy").is_file()
    train = json.loads((res / "train.json").read_text())
    assert set(train["models"]) == {f"{s}-s{seed}" for seed in seeds for s in ["continuous"] + [f"k{k}" for k in ks]}
    sweep = json.loads((res / "sweep.json").read_text())
    assert set(sweep["conditions"]) == set(p["sets"]["dev"])
    for ks_ in sweep["conditions"].values():
        for v in ks_.values():
            assert len(v["trials"]) == p["sweep"]["n_trials"] and v["tau_star"] > 0
    table = (res / "table.md").read_text()
    for k in ks:
        assert f"K={k} hard/hard" in table and f"K={k} hard/soft" in table
    assert (res / "wer_vs_tau.png").stat().st_size > 0
    metrics = json.loads((res / "metrics.json").read_text())
    assert metrics["wall_seconds"]["total"] > 0 and set(metrics["tau_star"]) == set(p["sets"]["test"])
    mlflow.set_tracking_uri(f"sqlite:///{smoke_repo / 'mlflow.db'}")
    sweep_runs = mlflow.search_runs(experiment_names=["soft_tokens_sweep"])
    assert len(sweep_runs) == len(p["sets"]["dev"]) * len(ks) * p["sweep"]["n_trials"]
    eval_runs = mlflow.search_runs(experiment_names=["soft_tokens_eval"])
    assert len(eval_runs) == len(p["sets"]["test"]) * len(seeds) * (1 + 2 * len(ks))
    assert set(eval_runs["status"]) == {"FINISHED"}
    # Upstream: the imported Whisper's encoder, the layer its probe picked (lowest dev CER among those probed).
    layer = json.loads((res / "layer.json").read_text())
    probe = layer["probe"]["per_layer"]
    assert layer["upstream"] == "whisper" and set(probe) == {str(k) for k in p["probe"]["layers"]}
    assert layer["layer"] == int(min(probe, key=lambda k: probe[k]["dev_cer"])) and layer["dim"] == 384
    # Alignment on exact phone labels, and the headline in the schema.
    phones = json.loads((res / "phones.json").read_text())
    assert set(phones["sets"]) == set(p["phones"]["sets"])
    for v in phones["sets"].values():
        assert v["frames"] > 100 and v["phones"] > 10 and set(v["per_k"]) == {str(k) for k in ks}
        for a in v["per_k"].values():
            assert 0 < a["pnmi"] <= 1 and 0 < a["phone_purity"] <= 1 and a["soft"]["between_within"] > 0
    head = json.loads((res / "headline.json").read_text())
    assert set(head["rel_wer_gain_pct"]) == set(head["continuous_wer"]) == {"in_domain", "accents", "speechocean762"}
    assert set(head["soft_wer"]["accents"]) == {str(k) for k in ks} and head["seeds"] == seeds
    hard, soft = head["hard_wer"]["in_domain"][str(ks[0])], head["soft_wer"]["in_domain"][str(ks[0])]
    assert head["rel_wer_gain_pct"]["in_domain"][str(ks[0])] == pytest.approx((hard - soft) / hard * 100, abs=0.01)


def test_soft_tokens_notebook_rebuilds_the_table_from_mlflow(smoke_repo: Path, monkeypatch):
    outputs = executed_notebook_outputs("soft_tokens", smoke_repo, monkeypatch, ROOT / "notebooks")
    assert "hard/soft" in outputs and "sets at the floor" in outputs


# ---------------------------------------------------------------------------------- scale-out (issue 8)


def test_sweep_worker_extends_the_stage_s_own_syn2real_study(smoke_repo: Path):
    """`asrlab sweep syn2real` names its studies as syn2real_evaluate does: a worker asking for one more
    trial finds the stage's study (2 trials) and adds exactly one, with the real λ objective."""
    import optuna

    storage = f"sqlite:///{smoke_repo / 'optuna.db'}"
    before = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
    out = run(["asrlab", "sweep", "syn2real", "--trials", "3", "--only", "weather-synthetic-s0-single"], smoke_repo).stdout
    after = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
    assert set(after) == set(before)  # no new study: the worker found the stage's
    grown = [name for name in after if after[name] != before[name]]
    assert len(grown) == 1 and grown[0].startswith("syn2real-weather-synthetic-s0-single-") and grown[0] in out
    study = optuna.load_study(study_name=grown[0], storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3 and 0 <= done[-1].user_attrs["dev_wer"]


def test_ddp_training_matches_one_process(smoke_repo: Path, tmp_path):
    """pretrain_aed under `torchrun --nproc_per_node 2` (gloo, max_frames per rank) against one process with
    twice the max_frames (the same effective batch). Tolerance: the train loss at every step within 10 %
    (rank 0 logs the loss of its half of the batch, and the length buckets differ), dev CTC CER within 5
    points. (Greedy attention decoding of a 6-step model loops: its CER swings by hundreds of points.)"""
    import mlflow

    losses, summaries = {}, {}
    for name, launcher, scale in (("ddp", ["torchrun", "--standalone", "--nproc_per_node", "2", "-m"], 1),
                                  ("single", [sys.executable, "-m"], 2)):
        p = load_yaml(smoke_repo / "params.yaml")
        p["checkpoints_dir"] = str(tmp_path / name / "checkpoints")
        p["pretrain_aed"].update(out_dir=str(tmp_path / name / "model"), metrics=str(tmp_path / name / "m.json"))
        p["pretrain_aed"]["train"].update(max_frames=scale * p["pretrain_aed"]["train"]["max_frames"], log_every=1)
        p["pretrain_aed"]["dev"]["max_utterances"] = 8
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(p))
        uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "ASRLAB_THREADS": "1",
               "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
        proc = subprocess.run([*launcher, "asrlab.cli", "--params", str(tmp_path / f"{name}.yaml"), "pretrain_aed"],
                              cwd=smoke_repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summaries[name] = json.loads((tmp_path / name / "m.json").read_text())
        client = mlflow.MlflowClient(uri)
        (run_,) = client.search_runs([client.get_experiment_by_name("base").experiment_id])
        losses[name] = [m.value for m in sorted(client.get_metric_history(run_.info.run_id, "train_loss"),
                                                key=lambda m: m.step)]
    ddp, single = summaries["ddp"], summaries["single"]
    print(f"\nDDP vs one process: train loss {losses['ddp']} / {losses['single']}; "
          f"dev CTC CER {ddp['dev_ctc_cer']} / {single['dev_ctc_cer']}")
    assert ddp["world_size"] == 2 and single["world_size"] == 1 and ddp["steps"] == single["steps"]
    assert len(losses["ddp"]) == len(losses["single"]) == single["steps"]
    for a, b in zip(losses["ddp"], losses["single"]):
        assert abs(a - b) <= 0.10 * b, (losses["ddp"], losses["single"])
    assert abs(ddp["dev_ctc_cer"] - single["dev_ctc_cer"]) <= 5.0


def test_dvc_remote_round_trips_data_models_and_vectors(smoke_repo: Path, tmp_path):
    """The repository has a default local remote; in a temporary clone with a temporary remote, `dvc push`
    then `dvc pull` restore the SLURP splits, rendered audio, checkpoints and task vectors bit for bit."""
    from asrlab.tracking import file_hash

    assert run(["dvc", "remote", "default"], ROOT).stdout.strip() == "local"
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-f", "-d", "tmp", str(remote)], smoke_repo)
    checked = ("data/prepared", "data/audio", "models/base_aed", "models/syn2real_vectors")
    run(["dvc", "push", "-q", *checked], smoke_repo)  # not models/syn2real: 15 Whisper copies, 2 GB twice more
    run(["git", "add", ".dvc", "dvc.yaml", "dvc.lock", "params.yaml"], smoke_repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "smoke"], smoke_repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(smoke_repo), str(clone)], tmp_path)
    try:
        run(["dvc", "config", "--local", "cache.type", "reflink,hardlink,copy"], clone)
        run(["dvc", "pull", "-q", *checked], clone)
        for path in checked:
            assert (clone / path).exists() and file_hash(clone / path) == file_hash(smoke_repo / path), path
    finally:  # several GB
        shutil.rmtree(clone, ignore_errors=True)
        shutil.rmtree(remote, ignore_errors=True)

# ------------------------------------------------------------------------------ hdmole study (issue 5)


def test_smoke_repro_runs_the_hdmole_study(smoke_repo: Path):
    import mlflow
    import pandas as pd

    p = load_yaml(smoke_repo / "params.yaml")["hdmole"]
    res = smoke_repo / "results/hdmole"
    cache = json.loads((res / "cache.json").read_text())
    assert set(cache["sets"]) == {f"{s}/{d}" for s in ("train", "dev", "test") for d in p["domains"]} | {"test/standard"}
    sweep = json.loads((res / "sweep.json").read_text())
    assert sweep["trials"] == p["sweep"]["trials"] and set(sweep["best"]) >= {"rank", "lr", "threshold_init"}
    tab = pd.read_csv(res / "table.csv")
    assert list(tab["system"]) == [s["name"] for s in p["systems"]]
    for col in [f"{d}_{m}" for d in [*p["domains"], "accent", "standard"] for m in ("cer", "wer")]:
        assert tab[col].notna().all(), col
    by = tab.set_index("system")
    assert by.loc["full_ft", "trainable_pct"] == 100.0 and 0 < by.loc["hdmole", "trainable_pct"] < 100
    assert "±" in (res / "table.md").read_text()
    for fig in ("error_vs_params.png", "active_experts.png"):
        assert (res / fig).stat().st_size > 10_000
    for seed in p["seeds"]:
        assert (smoke_repo / f"models/hdmole/hdmole-s{seed}/adapters.safetensors").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{smoke_repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["hdmole"])
    trained = sum(s["kind"] != "frozen" for s in p["systems"])
    assert len(runs) == trained * len(p["seeds"]) + 1 and set(runs["status"]) == {"FINISHED"}
    assert len(mlflow.search_runs(experiment_names=["hdmole_sweep"])) == p["sweep"]["trials"]


def test_hdmole_notebook_rebuilds_the_table_from_mlflow(smoke_repo: Path, monkeypatch):
    outputs = executed_notebook_outputs("hdmole", smoke_repo, monkeypatch, smoke_repo)
    assert "table.csv matches the MLflow runs" in outputs


# ------------------------------------------------------------------------------ efin study (issue 6)


def test_smoke_repro_runs_the_efin_study(smoke_repo: Path):
    import mlflow

    p = load_yaml(smoke_repo / "params.yaml")["efin"]
    res = smoke_repo / "results/efin"
    evals = [json.loads(x) for x in (res / "evaluations.jsonl").read_text().splitlines()]
    budgets = p["budget_steps"] + [p["heldout_steps"]]
    expected = {(name, seed, s) for name, spec in p["strategies"].items() for seed in spec["seeds"] for s in budgets}
    assert {(r["strategy"], r["seed"], r["steps"]) for r in evals} == expected
    for r in evals:  # compute grows with the budget and every stage is counted
        assert r["flops"] > 0 and all(v > 0 for v in r["stage_flops"].values())
        assert r["flops"] == sum(r["stage_flops"].values())
    by_run: dict = {}
    for r in sorted(evals, key=lambda r: r["steps"]):
        by_run.setdefault((r["strategy"], r["seed"]), []).append(r["flops"])
    assert all(f == sorted(f) and len(set(f)) == len(f) for f in by_run.values())
    fits = json.loads((res / "fits.json").read_text())
    assert set(fits) == set(p["strategies"])
    for f in fits.values():
        assert {"a", "alpha", "e_inf", "r2", "predicted_at_estimate", "heldout_measured", "abs_error"} <= set(f)
    table = (res / "table.md").read_text()
    assert "Scaling law" in table and "relative CER reduction" in table and "±" in table
    assert (res / "scaling.png").stat().st_size > 10_000
    mlflow.set_tracking_uri(f"sqlite:///{smoke_repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["efin"], filter_string="tags.dvc_stage = 'efin_train'")
    runs = runs[runs["metrics.flops"].notna()]
    assert len(runs) == len(expected) and set(runs["status"]) == {"FINISHED"}


def test_efin_notebook_rebuilds_the_table_from_mlflow(smoke_repo: Path, monkeypatch):
    outputs = executed_notebook_outputs("efin", smoke_repo, monkeypatch, ROOT / "notebooks")
    assert "table.csv matches the MLflow runs" in outputs and "Scaling law" in outputs


# ------------------------------------------------------------------------------ dvc.yaml's top-level metrics and plots


def test_top_level_metrics_and_plots_read_the_smoke_run(smoke_repo: Path):
    """`dvc metrics show` parses every top-level metric file, and `dvc plots show` finds each table plot's x and
    y columns in the smoke run's table.csv (a misnamed column would draw an empty chart, not fail)."""
    top = yaml.safe_load((smoke_repo / "dvc.yaml").read_text())
    (shown,) = json.loads(run(["dvc", "metrics", "show", "--json"], smoke_repo).stdout).values()
    for path in top["metrics"]:
        assert "error" not in shown["data"][path] and shown["data"][path]["data"], path
    plots = json.loads(run(["dvc", "plots", "show", "--json"], smoke_repo).stdout)
    assert not plots.get("errors"), plots["errors"]
    for entry in top["plots"]:
        (path, spec), = (entry.items() if isinstance(entry, dict) else [(entry, None)])
        if spec is None:  # an image
            assert (smoke_repo / path).stat().st_size > 0, path
            continue
        (vega,) = plots["data"][path]
        rows = vega["content"]["data"]["values"]
        assert rows and all(spec["x"] in r and spec["y"] in r for r in rows), (path, rows[:2])
        assert any(r[spec["x"]] not in (None, "") for r in rows), (path, rows[:2])
