"""Stages of the soft_tokens study (arXiv 2606.06806), upstream to trained downstream models.

- ``soft_tokens_ssl``: with ``upstream.kind: hubert`` only, a small HuBERT pretrained by masked prediction of
  MFCC k-means targets on unlabelled training audio (:mod:`asrlab.ssl.hubert`); for a pretrained upstream
  (``whisper``: the imported Whisper's encoder, the default; ``ssl``: a local HuBERT/WavLM folder) there is
  nothing to pretrain and it records which upstream the study uses.
- ``soft_tokens_layer``: the upstream's layer (``upstream.layer``, or the one a character-CTC probe picks on
  dev when it is null) for the downstream train set and every dev/test set (:mod:`asrlab.ssl.upstream`).
- ``soft_tokens_kmeans``: MiniBatchKMeans centroids of that layer on the train set, one file per K.
- ``soft_tokens_train``: downstream CTC models (:mod:`asrlab.ssl.downstream`) through the one trainer:
  continuous features and, per K, hard tokens (or soft tokens with ``downstream.train_soft_tau``), per seed.

Evaluation, the τ sweep and the table are in :mod:`asrlab.stages.soft_tokens_eval`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from threadpoolctl import threadpool_limits

from asrlab import evaluation, tracking
from asrlab.params import checked, fields
from asrlab.audio.features import FeatureStore
from asrlab.io import atomic_path, stable_hash, write_json
from asrlab.methods.soft_tokens import fit_kmeans
from asrlab.ssl.downstream import DownstreamConfig, DownstreamCTC
from asrlab.ssl import upstream
from asrlab.ssl.hubert import HubertUpstream, UpstreamConfig, mfcc, stack_frames
from asrlab.ssl.layerdata import LayerSet, save_set
from asrlab.training.data import SELECTION, select
from asrlab.training.trainer import TRAIN, TrainConfig, train

EXPERIMENT = "soft_tokens"


_DOWNSTREAM = fields(DownstreamConfig, "input", "n_tokens", "feature_dim", "vocab_size")
SCHEMA = {"soft_tokens": {  # soft_tokens_eval's stages read it too
    "out_dir": str, "layer_dir": str, "results_dir": str,
    "upstream": {"kind": str, "from": str, "layer?": int, "batch_frames?": int},
    "probe": {"layers?": [int], "data": {"train": SELECTION, "dev": SELECTION}, "model": _DOWNSTREAM, "train": TRAIN,
              "decode_frames?": int},
    "ssl": {"data": SELECTION, "mfcc_kmeans": {"k": int, "frames": int, "seed": int},
            "model": fields(UpstreamConfig, "n_targets"), "train": TRAIN},
    "sets": {"train": SELECTION, "dev": {str: SELECTION}, "test": {str: SELECTION}},
    "kmeans": {"ks": [int], "frames": int, "batch_size?": int, "max_iter?": int, "seed": int},
    "downstream": {"seeds": [int], "train_soft_tau?": float, "top_k?": int, "model": _DOWNSTREAM, "train": TRAIN},
    "sweep": {"tau_range": [float], "grid_points": int, "n_trials": int, "metric?": str, "top_k?": int, "seed?": int,
              "startup_trials": int},
    "floor_cer": float,
    "phones": {"sets": [str], "max_utterances": int, "probe_max_iter": int}}}


def _section(params: dict) -> dict:
    return checked(params, "soft_tokens", SCHEMA)


def _paths(p: dict) -> dict:
    out = Path(p["out_dir"])
    return {"upstream": out / "upstream", "centroids": out / "centroids", "downstream": out / "downstream",
            "layer": Path(p["layer_dir"]), "results": Path(p["results_dir"])}


def _log(step: int, metrics: dict) -> None:
    mlflow.log_metrics(metrics, step=step)


def load_centroids(p: dict, k: int) -> torch.Tensor:
    return torch.from_numpy(np.load(_paths(p)["centroids"] / f"k{k}.npy"))


def load_downstream(path: Path) -> DownstreamCTC:
    model = DownstreamCTC(DownstreamConfig(**json.loads(path.with_suffix(".json").read_text())))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# ------------------------------------------------------------------------------------------------ upstream


def ssl(params: dict) -> dict:
    """Pretrain the in-pipeline HuBERT upstream (iteration 1: MFCC k-means targets) when the study uses it."""
    p, t0 = _section(params), time.time()
    s, out, spec = p["ssl"], _paths(p)["upstream"], p["upstream"]
    if upstream.check_kind(spec) == "hubert" and Path(spec["from"]) != out:
        raise ValueError(f"soft_tokens.upstream.from is {spec['from']!r}, but the pipeline HuBERT is written to "
                         f"{out}: with kind hubert, set from: {out}")
    out.mkdir(parents=True, exist_ok=True)
    if spec["kind"] != "hubert":  # a pretrained model: nothing to pretrain, the layer stage reads it directly
        summary = {"upstream": spec["kind"], "from": spec["from"], "pretrained_here": False,
                   "wall_seconds": round(time.time() - t0, 1)}
        write_json(out / "upstream.json", summary)
        write_json(Path(p["results_dir"]) / "ssl.json", summary)
        return summary
    fs = FeatureStore(params["features"]["out_dir"])
    rows = select(list(fs.rows.values()), s["data"])
    logmels = [fs.load(r["id"]).numpy() for r in rows]
    stack = s["model"].get("stack", 2)
    frames = [stack_frames(torch.from_numpy(m), stack).to(torch.float16) for m in logmels]
    ceps = [mfcc(m, stack) for m in logmels]
    # Iteration-1 targets: k-means over MFCCs on a seeded sample of frames, then every frame's nearest cluster.
    allc = np.concatenate(ceps)
    mean, std = allc.mean(0), allc.std(0) + 1e-5
    rng = np.random.default_rng(s["mfcc_kmeans"]["seed"])
    sample = allc[rng.choice(len(allc), min(len(allc), s["mfcc_kmeans"]["frames"]), replace=False)]
    cent = torch.from_numpy(fit_kmeans((sample - mean) / std, s["mfcc_kmeans"]["k"], s["mfcc_kmeans"]["seed"]))
    targets = [torch.cdist(torch.from_numpy((c - mean) / std), cent).argmin(-1) for c in ceps]
    t_targets = time.time() - t0

    torch.manual_seed(s["train"].get("seed", 0))
    cfg = UpstreamConfig(**{**s["model"], "n_targets": s["mfcc_kmeans"]["k"]})
    model = HubertUpstream(cfg)
    lengths = [int(f.shape[0]) for f in frames]

    def collate(idx):
        T = max(lengths[i] for i in idx)
        x = torch.zeros(len(idx), T, frames[0].shape[1])
        y = torch.zeros(len(idx), T, dtype=torch.long)
        for j, i in enumerate(idx):
            x[j, : lengths[i]], y[j, : lengths[i]] = frames[i].float(), targets[i][: lengths[i]]
        return {"frames": x, "frame_lengths": torch.tensor([lengths[i] for i in idx]), "targets": y}

    ckpt = Path(params["checkpoints_dir"]) / "soft_tokens_ssl" / stable_hash(
        s, tracking.file_hash(Path(params["features"]["out_dir"]) / "index.jsonl"), n=12)
    with tracking.run(EXPERIMENT, "ssl", params={**s["train"], **{f"model.{k}": v for k, v in s["model"].items()}},
                      tags={"model_kind": "hubert_upstream"}):
        summary = train(model, lengths, collate, TrainConfig.from_params(s["train"]), ckpt, on_log=_log,
                        desc="soft_tokens_ssl")
        model.eval()
        with torch.no_grad():  # masked-prediction accuracy on a fixed batch, a sanity signal of learning
            torch.manual_seed(0)
            probe = model(**collate(list(range(min(64, len(frames))))))
        summary.update(utterances=len(rows), hours=round(sum(lengths) * stack / 100 / 3600, 2),
                       mfcc_kmeans_seconds=round(t_targets, 1), masked_accuracy=round(float(probe["masked_accuracy"]), 4),
                       masked_loss=round(float(probe["loss"]), 4), params=sum(x.numel() for x in model.parameters()),
                       wall_seconds=round(time.time() - t0, 1))
        mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    with atomic_path(out / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(out / "config.json", model.config_dict())
    write_json(Path(p["results_dir"]) / "ssl.json", summary)
    print(f"[soft_tokens_ssl] {summary}")
    return summary


def _set_specs(p: dict) -> dict:
    specs = {"train": p["sets"]["train"]}
    specs.update({f"dev_{k}": v for k, v in p["sets"]["dev"].items()})
    specs.update({f"test_{k}": v for k, v in p["sets"]["test"].items()})
    return specs


def probe_layers(params: dict, up: upstream.Upstream, every: list[dict]) -> dict:
    """Which layer carries the most about the words: per layer, a shallow character-CTC probe (the
    downstream model with ``probe.model``) trained on ``probe.data.train`` by the one trainer and scored
    on ``probe.data.dev``; the layer of the lowest dev CER is chosen."""
    p = _section(params)
    pr = p["probe"]
    layers = pr.get("layers") or list(range(up.n_layers + 1))
    up.check_layers(layers, "probe.layers")
    train_rows, dev_rows = select(every, pr["data"]["train"]), select(every, pr["data"]["dev"])
    train_frames, dev_frames = up.encode(train_rows, layers), up.encode(dev_rows, layers)
    per_layer = {}
    for k in layers:
        data = LayerSet.from_frames(train_rows, train_frames[k], f"probe_train_l{k}")
        dev = LayerSet.from_frames(dev_rows, dev_frames[k], f"probe_dev_l{k}")
        torch.manual_seed(pr["train"].get("seed", 0))
        model = DownstreamCTC(DownstreamConfig(input="features", feature_dim=int(data.frames[0].shape[1]),
                                               **pr["model"]))
        ckpt = Path(params["checkpoints_dir"]) / "soft_tokens_probe" / stable_hash(
            pr, p["upstream"], k, tracking.file_hash(Path(params["features"]["out_dir"]) / "index.jsonl"), n=12)
        with tracking.run(EXPERIMENT, f"probe-layer{k}", params={**pr["train"], "layer": k, "upstream": up.kind},
                          tags={"model_kind": "layer_probe"}):
            s = train(model, data.lengths, data.collate, TrainConfig.from_params(pr["train"]), ckpt, on_log=_log,
                      desc=f"probe layer {k}")
            ev = evaluation.evaluate(model.eval(), dev, None, method="ctc", max_frames=pr.get("decode_frames", 20000),
                                     group_keys=(), progress=False)
            mlflow.log_metrics({"dev_wer": ev.wer, "dev_cer": ev.cer})
        per_layer[str(k)] = {"dev_wer": round(ev.wer, 2), "dev_cer": round(ev.cer, 2),
                             "last_loss": round(s["last_loss"], 4)}
        print(f"[soft_tokens_layer] probe layer {k}: dev WER/CER {ev.wer:.1f}/{ev.cer:.1f}")
    chosen = int(min(per_layer, key=lambda k: per_layer[k]["dev_cer"]))
    return {"chosen": chosen, "train_utterances": len(train_rows), "dev_utterances": len(dev_rows),
            "per_layer": per_layer}


def layer(params: dict) -> dict:
    """Frames of the chosen upstream layer for every set the downstream trains, tunes or is tested on."""
    p, t0 = _section(params), time.time()
    paths, spec = _paths(p), p["upstream"]
    fs = FeatureStore(params["features"]["out_dir"])
    every = list(fs.rows.values())
    sets = {name: select(every, s) for name, s in _set_specs(p).items()}
    empty = [name for name, rows in sets.items() if not rows]
    if empty:
        raise ValueError(f"soft_tokens.sets select no utterances for {empty}: check their corpus/pools/splits")
    up = upstream.load(spec, fs)
    chosen, probe = spec.get("layer"), None
    if chosen is None:
        probe = probe_layers(params, up, every)
        chosen = probe["chosen"]
    else:
        up.check_layers([chosen], "upstream.layer")
    summary = {"upstream": spec["kind"], "from": spec["from"], "layers": up.n_layers, "layer": chosen,
               "probe": probe, "sets": {}}
    for name, rows in sets.items():
        frames = up.encode(rows, [chosen])[chosen]
        save_set(paths["layer"], name, rows, frames)
        summary["sets"][name], summary["dim"] = len(rows), int(frames[0].shape[1])
    summary["wall_seconds"] = round(time.time() - t0, 1)
    write_json(paths["results"] / "layer.json", summary)
    print(f"[soft_tokens_layer] {summary}")
    return summary


def kmeans(params: dict) -> dict:
    """Centroids of the layer's train frames for each K (the paper's tokenizer), saved as ``k<K>.npy``."""
    p, t0 = _section(params), time.time()
    paths, km = _paths(p), p["kmeans"]
    train_set = LayerSet(paths["layer"], "train")
    frames = torch.cat(train_set.frames).float().numpy()
    rng = np.random.default_rng(km["seed"])
    sample = frames[rng.choice(len(frames), min(len(frames), km["frames"]), replace=False)]
    paths["centroids"].mkdir(parents=True, exist_ok=True)
    summary = {"frames": len(sample), "dim": int(frames.shape[1]), "per_k": {}}
    for k in km["ks"]:
        t = time.time()
        with threadpool_limits(torch.get_num_threads()):  # scikit-learn's OpenMP threads obey ASRLAB_THREADS too
            c = fit_kmeans(sample, k, km["seed"], km.get("batch_size", 4096), km.get("max_iter", 50))
        with atomic_path(paths["centroids"] / f"k{k}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, c)
        d = torch.cdist(torch.from_numpy(sample[:20000]), torch.from_numpy(c)).min(-1).values
        used = len(torch.unique(torch.cdist(torch.from_numpy(sample), torch.from_numpy(c)).argmin(-1)))
        summary["per_k"][str(k)] = {"seconds": round(time.time() - t, 1), "mean_distance": round(float(d.mean()), 4),
                                    "clusters_used": used}
    summary["wall_seconds"] = round(time.time() - t0, 1)
    write_json(paths["results"] / "kmeans.json", summary)
    print(f"[soft_tokens_kmeans] {summary}")
    return summary


# ---------------------------------------------------------------------------------------------- downstream


def systems(p: dict) -> list[dict]:
    """Every downstream model to train: continuous, then hard-token models per K; one per seed."""
    out = []
    for seed in p["downstream"]["seeds"]:
        out.append({"name": f"continuous-s{seed}", "input": "features", "k": None, "seed": seed})
        for k in p["kmeans"]["ks"]:
            out.append({"name": f"k{k}-s{seed}", "input": "tokens", "k": k, "seed": seed})
    return out


def train_downstream(params: dict) -> dict:
    p, t0 = _section(params), time.time()
    paths, d = _paths(p), p["downstream"]
    data = LayerSet(paths["layer"], "train")
    soft_tau = d.get("train_soft_tau")
    summary = {"train_utterances": len(data), "train_soft_tau": soft_tau, "models": {}}
    paths["downstream"].mkdir(parents=True, exist_ok=True)
    layer_hash = tracking.file_hash(paths["layer"] / "train.safetensors")
    centroids_hash = tracking.file_hash(paths["centroids"])  # the inputs, not the kmeans params that made them
    for sysm in systems(p):
        t = time.time()
        if sysm["input"] == "features":
            data.use("features")
            cfg = DownstreamConfig(input="features", feature_dim=int(data.frames[0].shape[1]), **d["model"])
        else:
            c = load_centroids(p, sysm["k"])
            data.use("soft", c, soft_tau, d.get("top_k")) if soft_tau else data.use("tokens", c)
            cfg = DownstreamConfig(input="tokens", n_tokens=sysm["k"], **d["model"])
        torch.manual_seed(sysm["seed"])
        model = DownstreamCTC(cfg)
        tcfg = TrainConfig.from_params({**d["train"], "seed": sysm["seed"]})
        ckpt = Path(params["checkpoints_dir"]) / "soft_tokens_train" / (
            sysm["name"] + "-" + stable_hash(d, centroids_hash, layer_hash, n=12))
        with tracking.run(EXPERIMENT, f"train-{sysm['name']}", params={**d["train"], **sysm, "train_soft_tau": soft_tau},
                          tags={"model_kind": "downstream_ctc", "system": sysm["input"]}):
            s = train(model, data.lengths, data.collate, tcfg, ckpt, on_log=_log, desc=sysm["name"])
            s["seconds"] = round(time.time() - t, 1)
            mlflow.log_metrics({"seconds": s["seconds"], "last_loss": s["last_loss"]})
        path = paths["downstream"] / f"{sysm['name']}.safetensors"
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        write_json(path.with_suffix(".json"), model.config_dict())
        summary["models"][sysm["name"]] = {k: s[k] for k in ("steps", "last_loss", "seconds", "skipped_steps")}
    summary["params_per_model"] = {n: sum(x.numel() for x in load_downstream(paths["downstream"] / f"{n}.safetensors").parameters())
                                   for n in sorted({f"continuous-s{d['seeds'][0]}", f"k{p['kmeans']['ks'][-1]}-s{d['seeds'][0]}"})}
    summary["wall_seconds"] = round(time.time() - t0, 1)
    write_json(paths["results"] / "train.json", summary)
    print(f"[soft_tokens_train] wall {summary['wall_seconds']} s")
    return summary
