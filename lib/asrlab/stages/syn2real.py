"""The syn2real study (SYN2REAL, Su et al., EMNLP 2024): task vectors against the synthetic-to-real gap.

Four stages, data flowing one way, each once per synthetic pool (``synthetic_pools``: espeak-ng, Piper):

- ``syn2real_finetune``: from the pretrained Whisper (``base``), per source seed and *source set* (the
  scenarios that are not targets; one shared set by default, one per target with ``leave_one_out``):
  θ_real^S (source real-proxy speech) and θ_syn^S (the pool's speech) on the same texts, θ_mix^S (both); per
  seed and target, the baseline θ_mix^S → target synthetic speech (the target has text only; lr × 0.1) and
  the oracle θ_mix^S → target real speech (upper bound); for multi-source averaging, θ_real/θ_syn on groups
  of the source scenarios. The plan is a list of runs (:func:`plan`), each through the one trainer,
  resumable, saved under ``models/syn2real/<run>``.
- ``syn2real_vectors``: τ = θ_real^S − θ_syn^S per pool, seed and source set, and the mean of the groups'
  vectors, saved as safetensors with their provenance (:mod:`asrlab.methods.task_vectors`).
- ``syn2real_evaluate``: per pool, seed, target and vector, an Optuna TPE sweep of λ on the target's real dev
  speech — each trial merges in memory (baseline + λ·τ) and decodes, no retraining and no reloading — then
  the chosen λ and the reference systems (zero-shot, source real, source mix, baseline, oracle) on the
  target's real test speech and on speechocean762 test. Every trial and test evaluation is an MLflow run.
- ``syn2real_report`` (:mod:`asrlab.stages.syn2real_report`): the tables shaped like the paper's Table 1,
  the figures and ``headline.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import mlflow
import torch
import transformers

from asrlab import evaluation, sweep, tracking
from asrlab.params import Folder, checked
from asrlab.audio.features import FeatureStore
from asrlab.io import item_seed, stable_hash, write_json, write_jsonl
from asrlab.methods.task_vectors import TaskVector
from asrlab.models import store
from asrlab.training.data import SpeechData, select
from asrlab.training.trainer import TRAIN, TrainConfig, train


# -- the plan -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    name: str                  # models/syn2real/<name>
    init: str                  # "base" or the name of an earlier run
    pools: tuple[str, ...]
    scenarios: tuple[str, ...]
    train: dict = field(hash=False)
    seed: int = 0
    texts_of: tuple[str, ...] = ()  # restrict to the texts spoken in every one of these pools (same texts)


_SAMPLE = {"max_utterances?": int, "seed?": int}
SCHEMA = {"syn2real": {  # syn2real_report reads it too
    "base": Folder, "models_dir": str, "vectors_dir": str, "results_dir": str, "targets": [str],
    "leave_one_out?": bool, "real_pool": str, "synthetic_pools": [str], "pool_seeds?": {str: [int]},
    "same_texts?": bool, "seeds": [int], "source_seeds": [int], "decoding": [str],
    "eval": {"dev": _SAMPLE, "test": _SAMPLE, "max_frames": int, "window_max_frames": int, "max_new_tokens": int,
             "speechocean762": {"corpus": str, "pool": str, "seeds": [int], **_SAMPLE}},
    "finetune": {"source": TRAIN, "target": TRAIN, "target_lr_scale": float, "oracle_seeds": [int]},
    "multi_source": {"groups": int, "pools": [str], "seeds": [int], "merge": str, "density": float, "train": TRAIN},
    "sweep": {"trials": int, "lambda_range": [float], "enqueue": [float], "metric": str, "decoding": str,
              "sampler_seed": int, "startup_trials": int}}}


def source_sets(p: dict, scenarios: list[str]) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """{source-set name: (source scenarios, targets served)}: one shared set, or one per target."""
    targets = list(p["targets"])
    unknown = sorted(set(targets) - set(scenarios))
    if unknown:
        raise ValueError(f"syn2real.targets: unknown scenario(s) {unknown}; known: {sorted(scenarios)}")
    if p.get("leave_one_out"):
        return {f"loo-{t}": (tuple(s for s in scenarios if s != t), (t,)) for t in targets}
    return {"shared": (tuple(s for s in scenarios if s not in targets), tuple(targets))}


def groups_of(source: tuple[str, ...], n: int, sizes: dict[str, int] | None = None) -> list[tuple[str, ...]]:
    """Source scenarios dealt into ``n`` groups of similar size: largest first, each to the smallest group
    so far (by training sentences in ``sizes``; by count without). Deterministic."""
    sizes = sizes or {}
    groups: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for s in sorted(source, key=lambda s: (-sizes.get(s, 1), s)):
        i = load.index(min(load))
        groups[i].append(s)
        load[i] += sizes.get(s, 1)
    return [tuple(sorted(g)) for g in groups]


def source_seed(p: dict, seed: int) -> int:
    """The source models a seed builds on: its own when it is a source seed, else the first source seed."""
    return seed if seed in p["source_seeds"] else p["source_seeds"][0]


def pool_seeds(p: dict, pool: str) -> list[int]:
    """The evaluation seeds of one synthetic pool (``pool_seeds`` overrides ``seeds``: a pool may run fewer)."""
    return list((p.get("pool_seeds") or {}).get(pool, p["seeds"]))


def plan(p: dict, scenarios: list[str], sizes: dict[str, int] | None = None) -> list[Run]:
    """Every fine-tuning run, in dependency order, per synthetic pool (``synthetic_pools``). Source models
    (and τ) exist per source seed, all from the pretrained Whisper (``base``); θ_real^S is per pool, because
    it must be trained on the same texts as that pool's θ_syn^S. The target runs (baseline, oracle) per seed,
    each from the source-mix model of :func:`source_seed`."""
    real = p["real_pool"]
    ft, ms = p["finetune"], p["multi_source"]
    target_train = {**ft["target"], "lr": ft["source"]["lr"] * ft["target_lr_scale"]}
    sets = source_sets(p, scenarios)
    runs = []
    for syn in p["synthetic_pools"]:
        same = (real, syn) if p.get("same_texts", True) else ()
        for seed in p["source_seeds"]:
            for src, (source, _) in sets.items():
                for kind, pools in (("real", (real,)), ("syn", (syn,)), ("mix", (real, syn))):
                    runs.append(Run(f"s{seed}/{src}/{syn}/source_{kind}", "base", pools, source, ft["source"], seed,
                                    same))
                if seed in ms["seeds"] and ms["groups"] > 1 and syn in ms["pools"]:
                    if len(source) < ms["groups"]:
                        raise ValueError(f"syn2real.multi_source.groups = {ms['groups']} but source set {src!r} has "
                                         f"only {len(source)} scenario(s) with speech: {list(source)}")
                    for g, group in enumerate(groups_of(source, ms["groups"], sizes)):
                        for kind, pools in (("real", (real,)), ("syn", (syn,))):
                            runs.append(Run(f"s{seed}/{src}/{syn}/group{g}_{kind}", "base", pools, group,
                                            ms["train"], seed, same))
        for seed in pool_seeds(p, syn):
            for src, (_, targets) in sets.items():
                mix = f"s{source_seed(p, seed)}/{src}/{syn}/source_mix"
                for t in targets:
                    runs.append(Run(f"s{seed}/{syn}/{t}/baseline", mix, (syn,), (t,), target_train, seed))
                    if seed in ft["oracle_seeds"]:
                        runs.append(Run(f"s{seed}/{syn}/{t}/oracle", mix, (real,), (t,), target_train, seed))
    return runs


# -- shared plumbing ----------------------------------------------------------------------------------------
def sentence(row: dict) -> str:
    """The sentence an utterance speaks: its id before ``@<pool>``."""
    return row["id"].split("@")[0]


class Context:
    """What every stage reads: the base model's tokenizer, feature store, base model, and a cache of selected data."""

    def __init__(self, params: dict):
        self.params, self.p = params, checked(params, "syn2real", SCHEMA)
        transformers.utils.logging.disable_progress_bar()  # dozens of model loads: keep the log readable
        self.base_path = Path(self.p["base"])
        self.tok = store.tokenizer(self.base_path)  # every fine-tune keeps the vocabulary of the model it adapts
        self.fs = FeatureStore(params["features"]["out_dir"])
        self.rows = [r for r in self.fs.rows.values() if r["corpus"] == "slurp"]
        self.scenarios = sorted({r["scenario"] for r in self.rows})
        self.models_dir = Path(self.p["models_dir"])
        self._data: dict = {}
        # the base folder's hash covers the tokenizer files it carries
        self.inputs_hash = stable_hash(tracking.file_hash(self.base_path),
                                       tracking.file_hash(Path(self.fs.dir) / "index.jsonl"), n=12)

    def data(self, pools, scenarios, split: str, model, char_targets: bool = False, texts_of=(),
             sample: dict | None = None, corpus: str = "slurp") -> SpeechData:
        """Speech of ``pools`` × ``scenarios`` × ``split``; with ``texts_of``, only the sentences spoken in
        every one of those pools (the paper's "same texts": an utterance id is ``<sentence id>@<pool>``);
        ``sample``: {max_utterances, seed} of the selection."""
        key = (tuple(pools), tuple(scenarios), split, char_targets, tuple(texts_of), corpus,
               tuple(sorted((sample or {}).items())))
        if key not in self._data:
            rows = self.rows if corpus == "slurp" else [r for r in self.fs.rows.values() if r["corpus"] == corpus]
            if texts_of:
                common = set.intersection(*({sentence(r) for r in rows if r["pool"] == p and r["split"] == split}
                                            for p in texts_of))
                rows = [r for r in rows if sentence(r) in common]
            spec = {"corpus": [corpus], "pools": list(pools), "splits": [split], **(sample or {})}
            if scenarios:
                spec["scenarios"] = list(scenarios)
            self._data[key] = SpeechData(select(rows, spec), self.fs, self.tok, model.max_frames,
                                         model.config.max_target_positions - len(model.prompt_ids) - 1, char_targets)
        return self._data[key]

    def sizes(self) -> dict[str, int]:
        """Training sentences per scenario (for balanced source groups), in the real pool."""
        out: dict[str, int] = {}
        for r in self.rows:
            if r["split"] == "train" and r["pool"] == self.p["real_pool"]:
                out[r["scenario"]] = out.get(r["scenario"], 0) + 1
        return out

    def load(self, name: str):
        path = self.base_path if name == "base" else self.models_dir / name
        return store.load(path)[1]


# -- stage 1: fine-tuning -----------------------------------------------------------------------------------
def finetune(params: dict) -> dict:
    ctx, t_stage = Context(params), time.time()
    runs = plan(ctx.p, ctx.scenarios, ctx.sizes())
    print(f"[syn2real_finetune] {len(runs)} fine-tuning runs: " + ", ".join(r.name for r in runs))
    summary = {}
    for i, run in enumerate(runs, 1):
        t0 = time.time()
        torch.manual_seed(run.seed)
        model = ctx.load(run.init)
        data = ctx.data(run.pools, run.scenarios, "train", model, char_targets=model.ctc_units == "chars",
                        texts_of=run.texts_of)
        cfg = TrainConfig.from_params({**run.train, "seed": run.seed})
        ckpt = Path(params["checkpoints_dir"]) / "syn2real" / stable_hash(
            asdict(run), ctx.inputs_hash, n=12)
        if run.init != "base":  # a fine-tune of an earlier run resumes only against that run's weights
            ckpt = ckpt.with_name(ckpt.name + "-" + tracking.file_hash(ctx.models_dir / run.init)[:8])
        print(f"[syn2real_finetune] ({i}/{len(runs)}) {run.name}: {len(data)} utt from {run.init}")
        with tracking.run("syn2real_finetune", run.name, params={**run.train, "init": run.init,
                          "pools": ",".join(run.pools), "scenarios": ",".join(run.scenarios), "seed": run.seed},
                          tags={"seed": str(run.seed)}):
            result = train(model, data.lengths, data.collate, cfg, ckpt, desc=run.name,
                           on_log=lambda step, m: mlflow.log_metrics(m, step=step))
            out = ctx.models_dir / run.name
            store.save(model, "aed", out, tok=ctx.tok)
            # what the weights are, not how the run got there (a resumed run writes the same file)
            write_json(out / "run.json", {**asdict(run), "utterances": len(data),
                                          **{k: v for k, v in result.items() if k != "resumed_from"}})
            result["wall_seconds"] = round(time.time() - t0, 1)
            mlflow.log_metrics({"wall_seconds": result["wall_seconds"], "utterances": len(data)})
        summary[run.name] = {"utterances": len(data), "steps": result["steps"], "last_loss": result["last_loss"],
                             "wall_seconds": result["wall_seconds"]}
    summary = {"runs": summary, "wall_seconds": round(time.time() - t_stage, 1)}
    write_json(Path(ctx.p["results_dir"]) / "finetune.json", summary)
    return summary


# -- stage 2: task vectors ----------------------------------------------------------------------------------
def vector_files(p: dict, scenarios: list[str]) -> dict[str, dict[str, Path]]:
    """{"s<source seed>/<source set>/<synthetic pool>": {"single" | "avg": path}}."""
    out = {}
    vdir = Path(p["vectors_dir"])
    ms = p["multi_source"]
    for syn in p["synthetic_pools"]:
        for seed in p["source_seeds"]:
            for src in source_sets(p, scenarios):
                key = f"s{seed}/{src}/{syn}"
                out[key] = {"single": vdir / f"s{seed}-{src}-{syn}-single.safetensors"}
                if seed in ms["seeds"] and ms["groups"] > 1 and syn in ms["pools"]:
                    out[key]["avg"] = vdir / f"s{seed}-{src}-{syn}-avg.safetensors"
    return out


def _tau(ctx: Context, real: str, syn: str) -> TaskVector:
    meta = {"real_run": real, "syn_run": syn,
            "real_md5": tracking.file_hash(ctx.models_dir / real), "syn_md5": tracking.file_hash(ctx.models_dir / syn),
            "git_commit": tracking.git_commit()}
    return TaskVector.from_models(ctx.load(real), ctx.load(syn), meta)


def vectors(params: dict) -> dict:
    ctx, t0 = Context(params), time.time()
    summary = {}
    for key, files in vector_files(ctx.p, ctx.scenarios).items():  # key: "s<source seed>/<source set>"
        tau = _tau(ctx, f"{key}/source_real", f"{key}/source_syn")
        tau.save(files["single"])
        summary[f"{key}/single"] = {"norm": round(tau.norm(), 4)}
        if "avg" in files:
            parts = [_tau(ctx, f"{key}/group{g}_real", f"{key}/group{g}_syn")
                     for g in range(ctx.p["multi_source"]["groups"])]
            avg = TaskVector.merge(parts, ctx.p["multi_source"]["merge"], density=ctx.p["multi_source"]["density"])
            avg.save(files["avg"])
            summary[f"{key}/avg"] = {"norm": round(avg.norm(), 4), "parts": len(parts),
                                     "cosine_to_single": round(_cosine(avg, tau), 4)}
        print(f"[syn2real_vectors] {key}: " + json.dumps({k: v for k, v in summary.items() if k.startswith(key)}))
    summary = {"vectors": summary, "wall_seconds": round(time.time() - t0, 1)}
    write_json(Path(ctx.p["results_dir"]) / "vectors.json", summary)
    return summary


def _cosine(a: TaskVector, b: TaskVector) -> float:
    dot = sum(float((a.deltas[k].double() * b.deltas[k].double()).sum()) for k in a.deltas)
    return dot / max(a.norm() * b.norm(), 1e-12)


# -- stage 3: λ sweeps and test evaluation ------------------------------------------------------------------
def targets(ctx: Context) -> Iterator[tuple[str, int, str, str]]:
    """(synthetic pool, seed, source set, target) of every evaluation, in the order the stage and the sweep
    workers go."""
    for syn in ctx.p["synthetic_pools"]:
        for seed in pool_seeds(ctx.p, syn):
            for src, (_, ts) in source_sets(ctx.p, ctx.scenarios).items():
                for target in ts:
                    yield syn, seed, src, target


@dataclass(frozen=True)
class LambdaSweep:
    """The Optuna study of λ for one pool, seed, target and task vector, on the target's real dev speech. Its
    name keys everything its trials depend on (a new baseline or τ is a new study), so that
    ``syn2real_evaluate`` and every sweep worker (:mod:`asrlab.workers`) meet on one study."""
    name: str
    label: str                 # "<target>-<pool>-s<seed>-<kind>": what ``asrlab sweep --only`` matches
    target: str
    kind: str                  # "single" or "avg"
    vector: Path
    baseline: str              # the run whose weights λ·τ is added to
    kwargs: dict = field(hash=False, compare=False)  # the rest of sweep.run_study's arguments


def lambda_sweeps(ctx: Context, syn: str, seed: int, src: str, target: str) -> list[LambdaSweep]:
    """The λ sweeps of one target: one per task vector of the source set (single, and the groups' mean)."""
    p, sw = ctx.p, ctx.p["sweep"]
    baseline = f"s{seed}/{syn}/{target}/baseline"
    baseline_md5 = tracking.file_hash(ctx.models_dir / baseline)
    out = []
    for kind, path in vector_files(p, ctx.scenarios)[f"s{source_seed(p, seed)}/{src}/{syn}"].items():
        dev_spec = {k: p["eval"][k] for k in ("dev", "max_frames", "max_new_tokens")}  # what a trial decodes
        key = stable_hash(ctx.inputs_hash, tracking.file_hash(path), baseline_md5, sw, dev_spec, n=10)
        label = f"{target}-{syn}-s{seed}-{kind}"
        out.append(LambdaSweep(
            f"syn2real-{label}-{key}", label, target, kind, path, baseline, dict(
                experiment="syn2real_sweep", run_prefix=label,
                seed=item_seed(sw["sampler_seed"], seed, target, kind, syn),
                startup_trials=sw["startup_trials"], enqueue=[{"lambda": v} for v in sw["enqueue"]],
                tags={"study": "syn2real", "pool": syn, "seed": str(seed), "target": target, "vector": kind,
                      "split": "dev"})))
    return out


def dev_data(ctx: Context, target: str, model) -> SpeechData:
    """The target's real(-proxy) dev speech the λ sweeps score on."""
    return ctx.data([ctx.p["real_pool"]], [target], "dev", model, sample=ctx.p["eval"]["dev"])


def lambda_objective(ctx: Context, model, keep: dict, tau: TaskVector, dev: SpeechData,
                     trial_seconds: list[float] | None = None) -> sweep.Objective:
    """One trial: the weights set to keep + λ·τ in memory (no retraining, no reloading), then dev decoded and
    scored; ``sweep.metric`` is minimised. ``trial_seconds`` collects each trial's wall time."""
    sw, ev = ctx.p["sweep"], ctx.p["eval"]

    def objective(trial):
        t0 = time.time()
        tau.apply_to(model, trial.suggest_float("lambda", *sw["lambda_range"]), base=keep)
        rates = evaluation.evaluate(model, dev, ctx.tok, method=sw["decoding"], group_keys=(), progress=False,
                                    max_frames=ev["max_frames"], max_new_tokens=ev["max_new_tokens"]).scores["overall"]
        if trial_seconds is not None:
            trial_seconds.append(time.time() - t0)
        return rates[sw["metric"]], {"dev_wer": rates["wer"], "dev_cer": rates["cer"]}
    return objective


def evaluate(params: dict) -> dict:
    """λ sweeps on the target's real dev speech, then every system on two test sets: the target's real(-proxy)
    test speech and speechocean762 test (real recordings, target-independent). Zero-shot Whisper is decoded
    on the 30-s window (it loops on per-batch padding); every fine-tuned model on per-batch padding."""
    ctx, t_stage = Context(params), time.time()
    p, sw, ev = ctx.p, ctx.p["sweep"], ctx.p["eval"]
    results_dir = Path(p["results_dir"])
    records, trials, costs = [], [], {"trial_seconds": [], "plain_eval_seconds": []}
    base = ctx.load("base")
    so_test = ctx.data([ev["speechocean762"]["pool"]], [], "test", base, corpus=ev["speechocean762"]["corpus"],
                       sample={k: v for k, v in ev["speechocean762"].items() if k in ("max_utterances", "seed")})
    done_once: set[tuple] = set()
    zero_shot: dict[tuple, dict] = {}

    def test_eval(model, system: str, syn: str, seed: int, target: str, lam: float | None = None,
                  run_name: str | None = None, once: tuple | None = None) -> None:
        """``model`` on both test sets; ``once``: a key for the target-independent speechocean762 pass."""
        sets = {"target": ctx.data([p["real_pool"]], [target], "test", base, sample=ev["test"])}
        if (once is None or once not in done_once) and seed in ev["speechocean762"]["seeds"]:
            sets["speechocean762"] = so_test
            if once is not None:
                done_once.add(once)
        window = system == "zero_shot"
        for set_name, data in sets.items():
            for method in p["decoding"]:
                tag = f"{syn}-s{seed}-{target}-{system}-{set_name}-{method}"
                if window and (set_name, target, method) in zero_shot:  # pool-independent: decoded once
                    records.append({**zero_shot[(set_name, target, method)], "pool": syn})
                    continue
                e = evaluation.evaluate(
                    model, data, ctx.tok, method=method, window=window, group_keys=("speaker",), progress=False,
                    max_frames=ev["window_max_frames"] if window else ev["max_frames"],
                    max_new_tokens=ev["max_new_tokens"], hyps_path=results_dir / "hyps" / f"{tag}.tsv",
                    experiment="syn2real", run_name=tag, params={"lambda": lam, "model": run_name or system},
                    tags={"study": "syn2real", "pool": syn, "seed": str(seed), "target": target, "system": system,
                          "test_set": set_name, "decoding": method, "split": "test"})
                records.append({"pool": syn, "seed": seed, "target": target, "system": system, "test_set": set_name,
                                "decoding": method, "lambda": lam, "wer": e.wer, "cer": e.cer,
                                "utterances": e.scores["overall"]["utterances"]})
                if window:
                    zero_shot[(set_name, target, method)] = records[-1]
                print(f"[syn2real_evaluate] {syn} s{seed} {target:>10} {system:<13} {set_name:<14} {method:<9} "
                      f"WER {e.wer:6.2f} CER {e.cer:6.2f}" + (f"  λ={lam:.3f}" if lam is not None else ""))

    for syn, seed, src, target in targets(ctx):
        src_seed = source_seed(p, seed)
        dev = dev_data(ctx, target, base)
        if seed == pool_seeds(p, syn)[0]:  # the pretrained model does not depend on the seed
            test_eval(base, "zero_shot", syn, seed, target, once=("zero_shot", syn))
        if seed == src_seed:
            for kind in ("real", "mix"):
                name = f"s{seed}/{src}/{syn}/source_{kind}"
                test_eval(ctx.load(name), f"source_{kind}", syn, seed, target, run_name=name, once=(name,))
        if (ctx.models_dir / f"s{seed}/{syn}/{target}/oracle").is_dir():
            test_eval(ctx.load(f"s{seed}/{syn}/{target}/oracle"), "oracle", syn, seed, target,
                      run_name=f"s{seed}/{syn}/{target}/oracle")
        model = ctx.load(f"s{seed}/{syn}/{target}/baseline")
        keep = {k: v.clone() for k, v in model.state_dict().items()}
        test_eval(model, "baseline", syn, seed, target, lam=0.0, run_name=f"s{seed}/{syn}/{target}/baseline")
        t0 = time.time()  # the plain evaluation pass the trial cost is compared with
        evaluation.evaluate(model, dev, ctx.tok, method=sw["decoding"], group_keys=(), progress=False,
                            max_frames=ev["max_frames"], max_new_tokens=ev["max_new_tokens"])
        costs["plain_eval_seconds"].append(time.time() - t0)
        for ls in lambda_sweeps(ctx, syn, seed, src, target):
            tau = TaskVector.load(ls.vector)
            study = sweep.run_study(ls.name, lambda_objective(ctx, model, keep, tau, dev, costs["trial_seconds"]),
                                    sw["trials"], show_progress=False, **ls.kwargs)
            done = sweep.complete_trials(study)
            # best dev value; among equals the smallest λ (the least change to the baseline)
            best = min(done, key=lambda t: (t.value, t.params["lambda"]))
            lam = best.params["lambda"]
            trials += [{"pool": syn, "seed": seed, "target": target, "vector": ls.kind, "trial": t.number,
                        "lambda": t.params["lambda"], "dev_wer": t.user_attrs["dev_wer"],
                        "dev_cer": t.user_attrs["dev_cer"]} for t in done]
            tau.apply_to(model, lam, base=keep)
            test_eval(model, "syn2real" if ls.kind == "single" else "syn2real_avg", syn, seed, target, lam=lam,
                      run_name=str(ls.vector))
            print(f"[syn2real_evaluate] {syn} s{seed} {target} {ls.kind}: λ* = {lam:.3f} "
                  f"(dev {sw['metric']} {best.value:.2f}, {len(done)} trials, study {ls.name})")
        model.load_state_dict(keep)
    write_jsonl(results_dir / "evaluations.jsonl", records)
    write_jsonl(results_dir / "trials.jsonl", trials)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    summary = {"evaluations": len(records), "trials": len(trials),
               "trial_seconds_mean": round(mean(costs["trial_seconds"]), 4),
               "plain_eval_seconds_mean": round(mean(costs["plain_eval_seconds"]), 4),
               "wall_seconds": round(time.time() - t_stage, 1)}
    summary["trial_cost_ratio"] = round(summary["trial_seconds_mean"] / max(summary["plain_eval_seconds_mean"], 1e-9), 3)
    write_json(results_dir / "evaluate.json", summary)
    return summary
