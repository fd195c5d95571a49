"""The hdmole study (HDMoLE, Mu et al., arXiv 2409.19878): multi-accent adaptation of the LLM-ASR base.

Three stages, data flowing one way (the report is :mod:`asrlab.stages.hdmole_report`):

- ``hdmole_cache``: per accent domain (the MBROLA ``-en`` voices grouped by language family, and real
  Mandarin-accented English from speechocean762, whose dev set is a few held-out *train* speakers), a seeded
  train/dev/test selection, plus a standard-domain test set (the native real-proxy voices the base saw). The
  base's encoder is frozen for every system, so its outputs are computed once and cached.
- ``hdmole_sweep``: an Optuna study over HDMoLE's rank, experts per domain, threshold init / regulariser and
  learning rate, on the accent dev sets (dev CER); every trial an MLflow run, resumable.
- ``hdmole_train``: every system of ``hdmole.systems`` × seed under the one trainer on the same cached
  train set — full fine-tuning (projector + LM), LoRA (peft) on the projector per rank, MoLE with static top-k,
  HDMoLE and its ablations (with the sweep's best settings) — then the test sets per accent and the standard
  domain, each an MLflow run. Adapters are saved as safetensors under ``models/hdmole``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import mlflow
import torch
import transformers
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from asrlab import evaluation, sweep, tracking
from asrlab.params import Folder, checked, fields
from asrlab.audio.features import FeatureStore
from asrlab.evaluation import Evaluation, error_rates, flat_metrics
from asrlab.io import make_readable, item_seed, stable_hash, write_json, write_jsonl
from asrlab.methods.hdmole import AccentLLMASR, MoLEConfig, adapter_state, save_adapters
from asrlab.models import store
from asrlab.models.batch import pad_features, pad_tokens
from asrlab.tokenizer import encode
from asrlab.training.trainer import TRAIN, TrainConfig, train

SPLITS = ("train", "dev", "test")
STANDARD = "standard"


# -- data ---------------------------------------------------------------------------------------------------
def split_rows(rows: list[dict], p: dict) -> dict[str, list[dict]]:
    """{"<split>/<domain>": rows}: a seeded sample of each accent domain per split, and the standard test set.

    speechocean762 (accent ``mandarin``) has no dev split: ``dev_speakers`` of its train speakers (seeded
    choice) form dev and never appear in train."""
    d, seed = p["data"], p["data"]["seed"]
    domains = list(p["domains"])
    so = sorted({r["speaker"] for r in rows if r["corpus"] == "speechocean762" and r["split"] == "train"})
    # at least one speaker stays in train; a corpus with one speaker gets no dev set (an error below)
    dev_speakers = set(random.Random(seed).sample(so, min(d["dev_speakers"], len(so) - 1))) if so else set()
    out: dict[str, list[dict]] = {}
    for dom in domains:
        pool = [r for r in rows if r["accent"] == dom and r["pool"] in d["accent_pools"]]
        if not pool:
            raise ValueError(f"hdmole.domains: no utterance with accent {dom!r} in pools {d['accent_pools']}")
        for split in SPLITS:
            if all(r["corpus"] == "speechocean762" for r in pool):  # its accent domain (mandarin): no dev split
                src = "test" if split == "test" else "train"
                keep = [r for r in pool if r["split"] == src
                        and (split == "test" or (r["speaker"] in dev_speakers) == (split == "dev"))]
            else:
                keep = [r for r in pool if r["split"] == split]
            out[f"{split}/{dom}"] = _sample(keep, d[f"{split}_per_domain"], item_seed(seed, split, dom))
    std = [r for r in rows if r["pool"] == d["standard_pool"] and r["split"] == "test" and r["corpus"] == "slurp"]
    out[f"test/{STANDARD}"] = _sample(std, d["test_per_domain"], item_seed(seed, "test", STANDARD))
    for k, v in out.items():
        if not v:
            raise ValueError(f"hdmole.data: the {k} selection is empty")
    return out


def _sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    rows = sorted(rows, key=lambda r: r["id"])
    if n is not None and len(rows) > n:
        rows = sorted(random.Random(seed).sample(rows, n), key=lambda r: r["id"])
    return rows


SCHEMA = {"hdmole": {  # hdmole_report reads it too
    "base": Folder, "cache_dir": str, "models_dir": str, "results_dir": str, "domains": [str],
    "data": {"accent_pools": [str], "standard_pool": str, "dev_speakers": int, "train_per_domain": int,
             "dev_per_domain": int, "test_per_domain": int, "seed": int},
    "seeds": [int], "decode_max_frames": int, "cache_batch": int, "train": TRAIN, "lora_targets": [str],
    "mole": fields(MoLEConfig, "domains"),
    "systems": [{"name": str, "kind": str, "tuned?": bool, "lr?": float, **fields(MoLEConfig, "domains")}],
    "sweep": {"system": str, "trials": int, "startup_trials": int, "steps": int, "seed": int, "metric": str,
              "rank": [int], "experts_per_domain": [int], "threshold_init": [float], "threshold_reg": [float],
              "lr": [float], "enqueue?": [dict]}}}


class CachedSet:
    """Cached encoder states of a selection, with token ids and accent ids; collates like ``SpeechData``."""

    def __init__(self, path: Path, tokenizer, domains: list[str], max_tokens: int):
        meta = json.loads((path / "rows.json").read_text())
        tensors = load_file(str(path / "states.safetensors"))
        states, offsets = tensors["states"], tensors["offsets"].tolist()
        keep = [i for i, r in enumerate(meta) if len(encode(tokenizer, r["text"])) <= max_tokens]
        self.rows = [meta[i] for i in keep]
        self.tokens = [encode(tokenizer, r["text"]) for r in self.rows]
        self.features = [states[offsets[i]: offsets[i + 1]] for i in keep]
        self.lengths = [int(f.shape[0]) for f in self.features]
        self.accents = [domains.index(r["accent"]) if r["accent"] in domains else -1 for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, idx: list[int]) -> dict:
        # pad_features gives Whisper's (B, D, T); the projector takes encoder states as (B, T, D)
        feats, lens = pad_features([self.features[i].float() for i in idx])
        toks, tok_lens = pad_tokens([self.tokens[i] for i in idx])
        return {"features": feats.transpose(1, 2), "feature_lengths": lens, "tokens": toks, "token_lengths": tok_lens,
                "accent": torch.tensor([self.accents[i] for i in idx])}


class Context:
    def __init__(self, params: dict):
        self.params, self.p = params, checked(params, "hdmole", SCHEMA)
        transformers.utils.logging.disable_progress_bar()
        self.tok = store.tokenizer(self.p["base"])  # the LLM-ASR's own vocabulary: its LM's embeddings
        self.domains = list(self.p["domains"])
        self.cache = Path(self.p["cache_dir"])
        self.results = Path(self.p["results_dir"])
        self._sets: dict[str, CachedSet] = {}

    @property
    def max_tokens(self) -> int:  # read where used: hdmole_cache does not, and does not declare it
        return self.params["pretrain_llm_asr"]["max_tokens"]

    def base(self):
        return store.load(self.p["base"])[1]

    def set(self, key: str) -> CachedSet:
        if key not in self._sets:
            path = self.cache / key
            if not (path / "rows.json").is_file():
                raise FileNotFoundError(f"{path}: no cached encoder states; run `asrlab hdmole_cache`")
            self._sets[key] = CachedSet(path, self.tok, self.domains, self.max_tokens)
        return self._sets[key]

    def train_set(self) -> "Concat":
        return Concat([self.set(f"train/{d}") for d in self.domains])


class Concat:
    """Several cached sets as one (the multi-accent training set)."""

    def __init__(self, parts: list[CachedSet]):
        self.rows = [r for p in parts for r in p.rows]
        self.tokens = [t for p in parts for t in p.tokens]
        self.features = [f for p in parts for f in p.features]
        self.lengths = [n for p in parts for n in p.lengths]
        self.accents = [a for p in parts for a in p.accents]

    def __len__(self) -> int:
        return len(self.rows)

    collate = CachedSet.collate


def cache(params: dict) -> dict:
    """Stage ``hdmole_cache``: the selections and the frozen encoder's states for each."""
    ctx, t0 = Context(params), time.time()
    fs = FeatureStore(params["features"]["out_dir"])
    selections = split_rows(list(fs.rows.values()), ctx.p)
    encoder = ctx.base().encoder.eval()
    summary = {}
    for key, rows in selections.items():
        rows = [r for r in rows if r["frames"] <= encoder.max_frames]
        states, offsets = [], [0]
        with torch.no_grad():
            for i in range(0, len(rows), ctx.p["cache_batch"]):
                chunk = rows[i: i + ctx.p["cache_batch"]]
                feats, lens = pad_features([fs.load(r["id"]) for r in chunk])
                enc = encoder(feats, lens)
                for h, n in zip(enc.hidden, enc.lengths):
                    states.append(h[: int(n)].to(torch.float16))
                    offsets.append(offsets[-1] + int(n))
        out = ctx.cache / key
        out.mkdir(parents=True, exist_ok=True)
        save_file({"states": torch.cat(states), "offsets": torch.tensor(offsets)}, str(out / "states.safetensors"))
        make_readable(out)  # safetensors writes 0600
        cols = ("id", "text", "accent", "corpus", "pool", "split", "speaker", "scenario")
        (out / "rows.json").write_text(json.dumps([{c: r.get(c) for c in cols} for r in rows]))
        summary[key] = {"utterances": len(rows), "speakers": len({r["speaker"] for r in rows})}
        print(f"[hdmole_cache] {key}: {len(rows)} utt")
    summary = {"sets": summary, "wall_seconds": round(time.time() - t0, 1)}
    write_json(ctx.results / "cache.json", summary)
    return summary


# -- systems ------------------------------------------------------------------------------------------------
def systems(p: dict) -> dict[str, dict]:
    """``hdmole.systems`` (a list, so that a profile replaces it whole) as {name: settings}, in order."""
    out: dict[str, dict] = {}
    for s in p["systems"]:
        if "name" not in s or "kind" not in s or s["name"] in out:
            raise ValueError(f"hdmole.systems: every entry needs a unique `name` and a `kind` ({s})")
        out[s["name"]] = {k: v for k, v in s.items() if k != "name"}
    return out


def mole_config(p: dict, system: dict, tuned: dict | None) -> MoLEConfig:
    """The system's MoLE config: ``hdmole.mole`` defaults, then the sweep's best values (``tuned: true``),
    then the system's own overrides."""
    fields = {f.name for f in dataclasses.fields(MoLEConfig)}
    c = {**p["mole"], "domains": len(p["domains"])}
    if system.get("tuned") and tuned:
        c.update({k: v for k, v in tuned.items() if k in fields})
    c.update({k: v for k, v in system.items() if k in fields})
    unknown = set(c) - fields
    if unknown:
        raise ValueError(f"hdmole.mole / systems: unknown MoLE setting(s) {sorted(unknown)}; known: {sorted(fields)}")
    return MoLEConfig(**c)


def build(ctx: Context, system: dict, tuned: dict | None, keep_encoder: bool = False):
    """(model, freeze patterns, unfreeze patterns, MoLE config or None) of one system."""
    kind = system["kind"]
    base = ctx.base()
    if kind == "mole":
        cfg = mole_config(ctx.p, system, tuned)
        model = AccentLLMASR(base, cfg, keep_encoder)
        return model, ["*"], list(adapter_state(model)), cfg
    model = AccentLLMASR(base, None, keep_encoder)
    if kind == "full":  # the base's LM weights come frozen (peft): unfreeze everything the model holds
        return model, [], ["*"], None
    if kind == "lora":
        lora = LoraConfig(r=system["rank"], lora_alpha=system.get("alpha", 2 * system["rank"]),
                          target_modules=list(ctx.p["lora_targets"]))
        inject_adapter_in_model(lora, model.projector)
        return model, ["*"], ["projector.*lora_*"], None
    if kind == "frozen":
        return model, [], [], None
    raise ValueError(f"hdmole.systems: unknown kind {kind!r} (full | lora | mole | frozen)")


def full_ft_params(model: AccentLLMASR) -> int:
    """Trainable parameters of full fine-tuning: everything after the frozen (cached) encoder — the projector
    and the whole LM (with its LoRA, were the base to carry one)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("encoder."))


def _train_cfg(p: dict, system: dict, tuned: dict | None, seed: int, steps: int | None = None) -> TrainConfig:
    lr = system.get("lr") or (tuned.get("lr") if system.get("tuned") and tuned else None) or p["train"]["lr"]
    t = {**p["train"], "lr": lr, "seed": seed}
    if steps is not None:
        t["max_steps"], t["ckpt_every"] = steps, steps
    return TrainConfig.from_params(t)


def evaluate(ctx: Context, model, key: str, hyps_path: Path | None = None) -> tuple[Evaluation, dict]:
    """The evaluation of ``model`` on cached set ``key`` (overall rates; hypotheses to ``hyps_path``) and its
    active-expert histograms per layer."""
    routed = isinstance(model, AccentLLMASR)
    if routed:
        model.reset_counts()
        model.ctx.record = True
    ev = evaluation.evaluate(model, ctx.set(key), ctx.tok, max_frames=ctx.p["decode_max_frames"],
                             max_new_tokens=ctx.max_tokens + 2, group_keys=(), hyps_path=hyps_path, progress=False)
    counts = model.active_expert_counts() if routed else {}
    if routed:
        model.ctx.record = False
    return ev, counts


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fit(ctx: Context, name: str, system: dict, tuned: dict | None, seed: int, steps: int | None = None):
    """Build and train one system; returns (model, MoLE config, trainable parameters, train summary)."""
    torch.manual_seed(seed)
    model, freeze, unfreeze, cfg = build(ctx, system, tuned)
    data = ctx.train_set()
    tcfg = dataclasses.replace(_train_cfg(ctx.p, system, tuned, seed, steps), freeze=freeze, unfreeze=unfreeze)
    # keyed by the base folder, which holds the tokenizer too
    ckpt = Path(ctx.params["checkpoints_dir"]) / "hdmole" / stable_hash(
        name, system, tuned if system.get("tuned") else None, dataclasses.asdict(tcfg),
        dataclasses.asdict(cfg) if cfg else None, ctx.p["lora_targets"], ctx.domains, ctx.max_tokens,
        tracking.file_hash(ctx.p["base"]), tracking.file_hash(ctx.cache / "train"), n=12)
    summary = train(model, data.lengths, data.collate, tcfg, ckpt, desc=name,
                    on_log=lambda step, m: mlflow.log_metrics(m, step=step) if mlflow.active_run() else None)
    return model, cfg, trainable(model), summary


# -- stage: the sweep ---------------------------------------------------------------------------------------
def run_sweep(params: dict) -> dict:
    ctx, t0 = Context(params), time.time()
    sw = ctx.p["sweep"]
    system = systems(ctx.p).get(sw["system"])
    if system is None or system["kind"] != "mole":
        raise ValueError(f"hdmole.sweep.system = {sw['system']!r} must name a `mole` system of hdmole.systems")
    dev_keys = [f"dev/{d}" for d in ctx.domains]

    def objective(trial):
        tuned = {"rank": trial.suggest_categorical("rank", sw["rank"]),
                 "experts_per_domain": trial.suggest_categorical("experts_per_domain", sw["experts_per_domain"]),
                 "threshold_init": trial.suggest_float("threshold_init", *sw["threshold_init"]),
                 "threshold_reg": trial.suggest_float("threshold_reg", *sw["threshold_reg"]),
                 "lr": trial.suggest_float("lr", *sw["lr"], log=True)}
        model, _, n, _ = fit(ctx, f"sweep-t{trial.number}", {**system, "tuned": True}, tuned, sw["seed"], sw["steps"])
        rows, metrics = [], {"trainable_params": n}
        for key in dev_keys:
            ev, _ = evaluate(ctx, model, key)
            metrics.update(flat_metrics(ev.scores, prefix=f"{key.split('/')[1]}/"))
            rows += ev.rows
        overall = error_rates([r["ref"] for r in rows], [r["hyp"] for r in rows])
        metrics.update(dev_cer=overall["cer"], dev_wer=overall["wer"])
        return overall[sw["metric"]], metrics

    key = stable_hash(tracking.file_hash(ctx.p["base"]), tracking.file_hash(ctx.cache), sw, system, ctx.p["mole"],
                      ctx.p["train"], n=10)
    study = sweep.run_study(f"hdmole-{key}", objective, sw["trials"], experiment="hdmole_sweep", run_prefix="hdmole",
                            seed=sw["seed"], startup_trials=sw["startup_trials"], enqueue=sw.get("enqueue") or [],
                            show_progress=False, tags={"study": "hdmole", "split": "dev"})
    done = sweep.complete_trials(study)
    best = min(done, key=lambda t: (t.value, t.number))
    trials = [{"trial": t.number, **t.params, "value": t.value, **t.user_attrs} for t in done]
    write_jsonl(ctx.results / "trials.jsonl", trials)
    out = {"best": best.params, "best_value": best.value, "metric": sw["metric"], "trials": len(done),
           "study": study.study_name, "wall_seconds": round(time.time() - t0, 1)}
    write_json(ctx.results / "sweep.json", out)
    print(f"[hdmole_sweep] best {best.params} (dev {sw['metric']} {best.value:.2f}, {len(done)} trials)")
    return out


# -- stage: train and evaluate every system -----------------------------------------------------------------
def run_systems(params: dict) -> dict:
    ctx, t_stage = Context(params), time.time()
    p = ctx.p
    tuned = json.loads((ctx.results / "sweep.json").read_text())["best"]
    test_keys = [f"test/{d}" for d in ctx.domains] + [f"test/{STANDARD}"]
    full = full_ft_params(AccentLLMASR(ctx.base(), None))
    records, experts = [], []
    for name, system in systems(p).items():
        seeds = [p["seeds"][0]] if system["kind"] == "frozen" else p["seeds"]
        for seed in seeds:
            t0 = time.time()
            run_name = f"{name}-s{seed}"
            with tracking.run("hdmole", run_name, params={**system, "seed": seed, **(tuned if system.get("tuned") else {})},
                              tags={"study": "hdmole", "system": name, "seed": str(seed), "split": "test"}):
                if system["kind"] == "frozen":
                    model, cfg, n, summary = build(ctx, system, None)[0], None, 0, {"steps": 0, "last_loss": None}
                else:
                    model, cfg, n, summary = fit(ctx, run_name, system, tuned, seed)
                    out = Path(p["models_dir"]) / run_name / "adapters.safetensors"
                    if cfg is not None:
                        save_adapters(model, cfg, out)
                    else:  # full fine-tuning / peft LoRA: the trained tensors themselves
                        out.parent.mkdir(parents=True, exist_ok=True)
                        save_file({k: v.detach().contiguous() for k, v in model.named_parameters() if v.requires_grad},
                                  str(out))
                    make_readable(out.parent)  # safetensors writes 0600
                train_s = time.time() - t0
                rec = {"system": name, "kind": system["kind"], "seed": seed, "trainable_params": n,
                       "trainable_pct": round(100 * n / full, 3), "steps": summary["steps"],
                       "train_loss": summary["last_loss"], "train_seconds": round(train_s, 1)}
                metrics = {"trainable_params": n, "trainable_pct": rec["trainable_pct"]}
                for key in test_keys:
                    dom = key.split("/")[1]
                    ev, counts = evaluate(ctx, model, key, ctx.results / "hyps" / f"{run_name}-{dom}.tsv")
                    rec[f"{dom}_wer"], rec[f"{dom}_cer"] = ev.wer, ev.cer
                    metrics.update(flat_metrics(ev.scores, prefix=f"{dom}/"))
                    for layer, hist in counts.items():
                        experts.append({"system": name, "seed": seed, "set": dom, "layer": layer, "counts": hist})
                        metrics.update({f"active/{dom}/{layer}/{k}": c for k, c in enumerate(hist)})
                accents = [f"{d}_cer" for d in ctx.domains]
                rec["accent_cer"] = round(sum(rec[a] for a in accents) / len(accents), 3)
                rec["accent_wer"] = round(sum(rec[a.replace("_cer", "_wer")] for a in accents) / len(accents), 3)
                metrics.update(accent_cer=rec["accent_cer"], accent_wer=rec["accent_wer"])
                rec["wall_seconds"] = round(time.time() - t0, 1)
                mlflow.log_metrics({**metrics, "wall_seconds": rec["wall_seconds"]})
            records.append(rec)
            print(f"[hdmole_train] {run_name:<22} params {n:>9,} ({rec['trainable_pct']:.2f} %)  accent CER "
                  f"{rec['accent_cer']:6.2f}  standard CER {rec[f'{STANDARD}_cer']:6.2f}  ({rec['wall_seconds']} s)")
    write_jsonl(ctx.results / "evaluations.jsonl", records)
    write_jsonl(ctx.results / "active_experts.jsonl", experts)
    summary = {"runs": len(records), "full_ft_params": full, "wall_seconds": round(time.time() - t_stage, 1)}
    write_json(ctx.results / "train.json", summary)
    return summary
