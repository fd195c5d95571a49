"""Stage ``efin_train``: every strategy of :mod:`asrlab.methods.efin` at its compute budgets, the scaling-law
fits, and the held-out budget predicted before it is run.

Budgets are checkpoints of one run per (strategy, seed): the learning rate is constant after warmup
(``min_lr_ratio: 1``), so stopping the scaled last stage at ``budget_steps`` and going on from its checkpoint
is the same run as stopping there. Each budget is evaluated (outside the FLOP counter) on the dev and test
sets; its compute is the FLOPs the run executed up to that step, every earlier stage included.

Order: (A) every strategy and seed up to its last budget; (B) per strategy, the fit on those points and the
prediction for ``heldout_steps`` (its compute estimated from the last stage's FLOPs per step), written and
logged; (C) the runs continue to ``heldout_steps`` and the prediction error is measured.

Resume: each stage of each run trains into ``checkpoints/efin/s<seed>-<hash of the stages so far>`` (a stage
shared by two strategies — same stages before it — is trained once) with a ``flops.json`` of cumulative
FLOPs per step beside it; the last stage keeps its evaluations in ``evals-<hash of the evaluation params>.jsonl``.
A rerun loads finished stages from their checkpoints, resumes an interrupted stage where it stopped, and
skips done evaluations.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import torch
import transformers

from asrlab import evaluation, tracking
from asrlab.params import Folder, checked, fields
from asrlab.audio.features import FeatureStore
from asrlab.io import read_jsonl, stable_hash, write_json, write_jsonl
from asrlab.methods.efin import EFINModel, Fit, FlopCounter, Stage, Strategy, fit_scaling_law, parse_strategies
from asrlab.models import store
from asrlab.models.aed import AEDModel
from asrlab.models.encoder import SpeechEncoder
from asrlab.models.llm_asr import LLMASR, LoRASettings
from asrlab.training.batching import bucket_batches
from asrlab.training.checkpoint import latest_checkpoint
from asrlab.training.data import SELECTION, SpeechData, select
from asrlab.training.trainer import TRAIN, TrainConfig, train


SCHEMA = {"efin": {  # efin_report reads it too; parse_strategies checks the strategies' values
    "results_dir": str, "encoder_from": Folder, "lm_from": Folder, "max_tokens": int, "max_new_tokens": int,
    "decode_max_frames": int,
    "model": {"stack": int, "projector_hidden": int, "lora": fields(LoRASettings)},
    "data": SELECTION, "eval_sets": {str: SELECTION}, "fit_on": {"set": str, "metric": str}, "train": TRAIN,
    "budget_steps": [int], "heldout_steps": int, "overhead_batches": int, "stage3_train_encoder?": bool,
    "strategies": {str: {"seeds": [int], "stages": [{"name": str, "objective": str, "train": [str], "steps?": int}]}}}}


class Study:
    """Data, models and the per-run checkpoint layout of the efin study."""

    def __init__(self, params: dict):
        self.params, self.p = params, checked(params, "efin", SCHEMA)
        transformers.utils.logging.disable_progress_bar()
        self.strategies = parse_strategies(self.p)
        steps = list(self.p["budget_steps"])
        if len(steps) < 4 or steps != sorted(set(steps)) or steps[0] < 1:
            raise ValueError(f"efin.budget_steps = {steps}: at least 4 increasing step counts (>= 1)")
        if self.p["heldout_steps"] <= steps[-1]:
            raise ValueError(f"efin.heldout_steps = {self.p['heldout_steps']} must exceed the last budget {steps[-1]}")
        self.tok = store.tokenizer(self.p["lm_from"])  # the LLM's vocabulary: its embeddings and output layer
        self.fs = FeatureStore(self.params["features"]["out_dir"])
        rows = list(self.fs.rows.values())
        # the encoder and the LM come from their folders: only stacking, projector and LoRA are configured here
        self.cfg = store.llm_asr_config({**self.p["model"], "encoder": {}}, len(self.tok), lm_path=self.p["lm_from"])
        max_frames = self._aed().max_frames
        self.train_data = SpeechData(select(rows, self.p["data"]), self.fs, self.tok, max_frames,
                                     self.p["max_tokens"], char_targets=True)
        self.eval_sets = {name: SpeechData(select(rows, spec), self.fs, self.tok, max_frames, self.p["max_tokens"])
                          for name, spec in self.p["eval_sets"].items()}
        if self.p["fit_on"]["set"] not in self.eval_sets:
            raise ValueError(f"efin.fit_on.set = {self.p['fit_on']['set']!r} is not one of efin.eval_sets "
                             f"{sorted(self.eval_sets)}")
        # the LM folder's hash covers the tokenizer files it carries
        self.inputs_hash = stable_hash(tracking.file_hash(self.p["encoder_from"]), tracking.file_hash(self.p["lm_from"]),
                                       tracking.file_hash(Path(self.fs.dir) / "index.jsonl"), n=12)
        self.ckpt_root = Path(self.params["checkpoints_dir"]) / "efin"

    def _aed(self) -> AEDModel:
        return store.load(self.p["encoder_from"])[1]

    def build(self, seed: int) -> EFINModel:
        """Base AED encoder + its CTC head (characters or tokens), base LM with fresh LoRA, a fresh projector (seeded)."""
        aed = self._aed()
        torch.manual_seed(seed)
        llm = LLMASR.from_config(self.cfg, encoder=SpeechEncoder(aed.whisper.model.encoder))
        return EFINModel(llm, aed.ctc_head, blank_id=aed.blank_id, char_units=aed.ctc_units == "chars")

    def stage_dir(self, strategy: Strategy, i: int, seed: int) -> Path:
        """Keyed by the stages up to ``i`` (and, for the scaled stage, the budgets) — not by the strategy's name."""
        stages = [asdict(s) for s in strategy.stages[: i + 1]]
        extra = (self.p["budget_steps"], self.p["heldout_steps"]) if i == len(strategy.stages) - 1 else ()
        model = (self.p["model"], self.p["max_tokens"], self.p["lm_from"])  # shapes, data filter and LM: all train
        return self.ckpt_root / f"s{seed}-{stable_hash(stages, extra, self.p['train'], self.p['data'], model, self.inputs_hash, n=12)}"

    def train_stage(self, model: EFINModel, stage: Stage, ckpt: Path, steps: int, seed: int, desc: str) -> float:
        """Train ``stage`` to ``steps`` (resuming), counting FLOPs; returns the stage's cumulative FLOPs."""
        model.objective = stage.objective
        cfg = TrainConfig.from_params({**self.p["train"], "max_steps": steps, "seed": seed, "freeze": ["*"],
                                       "unfreeze": stage.unfreeze(), "keep_checkpoints": 1, "extendable": True,
                                       "ckpt_every": min(steps, self.p["train"].get("ckpt_every", steps))})
        ckpt.mkdir(parents=True, exist_ok=True)
        side = ckpt / "flops.json"
        by_step = json.loads(side.read_text()) if side.is_file() else {"0": 0}
        last = latest_checkpoint(ckpt)
        start = json.loads((last / "state.json").read_text())["step"] if last else 0
        if str(start) not in by_step:
            raise RuntimeError(f"{ckpt}: checkpoint at step {start} but no FLOP count for it; delete the folder")
        base = by_step[str(start)]
        with FlopCounter() as counter:
            def on_step(step: int) -> None:
                by_step[str(step)] = base + counter.get_total_flops()
                side.write_text(json.dumps(by_step))
            train(model, self.train_data.lengths, self.train_data.collate, cfg, ckpt, on_step=on_step, desc=desc)
        return float(by_step[str(steps)])

    def evaluate(self, model: EFINModel) -> dict:
        """WER and CER (greedy decoding) and the teacher-forced token loss of every evaluation set."""
        out = {}
        for name, data in self.eval_sets.items():
            ev = evaluation.evaluate(model.llm, data, self.tok, max_frames=self.p["decode_max_frames"],
                                     max_new_tokens=self.p["max_new_tokens"], group_keys=(), progress=False)
            out[f"{name}_wer"], out[f"{name}_cer"] = ev.wer, ev.cer
            out[f"{name}_loss"] = round(token_loss(model.llm, data, self.p["train"]["max_frames"]), 4)
        return out

    def run(self, strategy: Strategy, seed: int, targets: list[int], heldout: bool = False) -> list[dict]:
        """Evaluation records of ``strategy``/``seed`` at the last stage's ``targets`` steps (done ones reused)."""
        final_dir = self.stage_dir(strategy, len(strategy.prefix), seed)
        # keyed by what the evaluation reads, so changed eval sets or decoding are evaluated anew
        evals_file = final_dir / f"evals-{stable_hash(self.p['eval_sets'], self.p['max_new_tokens'], n=8)}.jsonl"
        done = {r["steps"]: r for r in read_jsonl(evals_file)} if evals_file.is_file() else {}
        if all(s in done for s in targets):
            return [done[s] for s in targets]
        model = self.build(seed)
        stage_flops = {}
        for i, st in enumerate(strategy.prefix):
            stage_flops[st.name] = self.train_stage(model, st, self.stage_dir(strategy, i, seed), st.steps, seed,
                                                    f"{strategy.name}/s{seed}/{st.name}")
        final = strategy.stages[-1]
        records = []
        for k, steps in enumerate(targets):
            if steps in done:
                records.append(done[steps])
                continue
            t0 = time.time()
            flops_final = self.train_stage(model, final, final_dir, steps, seed, f"{strategy.name}/s{seed}/{final.name}")
            t_train = time.time() - t0
            t0 = time.time()
            rates = self.evaluate(model)
            rec = {"strategy": strategy.name, "seed": seed, "steps": steps, "budget": k, "heldout": heldout and k == len(targets) - 1,
                   "flops": sum(stage_flops.values()) + flops_final,
                   "stage_flops": {**stage_flops, final.name: flops_final}, **rates,
                   "train_seconds": round(t_train, 1), "eval_seconds": round(time.time() - t0, 1)}
            with tracking.run("efin", f"{strategy.name}/s{seed}/step{steps}",
                              params={"strategy": strategy.name, "stages": json.dumps([asdict(s) for s in strategy.stages]),
                                      "seed": seed, "steps": steps, **self.p["train"]},
                              tags={"strategy": strategy.name, "seed": str(seed), "budget": str(k),
                                    "heldout": str(rec["heldout"]).lower(), "study": self.inputs_hash}):
                mlflow.log_metrics({"flops": rec["flops"], "steps": steps, **rates,
                                    **{f"flops_{n}": v for n, v in rec["stage_flops"].items()}})
            done[steps] = rec
            write_jsonl(evals_file, sorted(done.values(), key=lambda r: r["steps"]))
            records.append(rec)
            print(f"[efin_train] {strategy.name}/s{seed} step {steps}: {rec['flops']:.3e} FLOPs, "
                  + ", ".join(f"{n}={v}" for n, v in rates.items()))
        return records

    def counter_overhead(self, batches: int) -> dict:
        """Seconds per forward+backward of the joint model with and without the FLOP counter (same batches)."""
        model = self.build(0)
        idx = bucket_batches(self.train_data.lengths, self.p["train"]["max_frames"], 0, 0)[:batches]
        batches_ = [self.train_data.collate(b) for b in idx]

        def step(b):
            model(**b).loss.backward()

        times = {}
        for mode in ("plain", "counted", "plain_again"):
            t0 = time.perf_counter()
            for b in batches_:
                if mode == "counted":
                    with FlopCounter():
                        step(b)
                else:
                    step(b)
            times[mode] = (time.perf_counter() - t0) / len(batches_)
        plain = (times["plain"] + times["plain_again"]) / 2
        return {"batches": len(batches_), "plain_s_per_step": round(plain, 4),
                "counted_s_per_step": round(times["counted"], 4),
                "overhead_pct": round(100 * (times["counted"] - plain) / plain, 1)}


@torch.no_grad()
def token_loss(model: LLMASR, data: SpeechData, max_frames: int) -> float:
    """Mean next-token cross-entropy per utterance batch, weighted by utterances (smooth where CER is not)."""
    was = model.training
    model.eval()
    total = 0.0
    for idx in bucket_batches(data.lengths, max_frames, seed=0, epoch=0):
        b = data.collate(idx)
        total += float(model(b["features"], b["feature_lengths"], b["tokens"], b["token_lengths"]).loss) * len(idx)
    model.train(was)
    return total / len(data)


def fit_points(records: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    rs = [r for r in records if not r["heldout"]]
    return np.array([r["flops"] for r in rs]), np.array([r[metric] for r in rs])


def train_all(params: dict) -> dict:
    study, t_stage = Study(params), time.time()
    p = study.p
    metric = f"{p['fit_on']['set']}_{p['fit_on']['metric']}"
    results = Path(p["results_dir"])
    overhead = study.counter_overhead(p["overhead_batches"])
    print(f"[efin_train] FLOP counter overhead: {overhead}")
    records: dict[tuple[str, int], list[dict]] = {}
    t0 = time.time()
    for strat in study.strategies:                      # (A) the fitted budgets
        for seed in strat.seeds:
            records[strat.name, seed] = study.run(strat, seed, list(p["budget_steps"]))
    wall = {"budgets": round(time.time() - t0, 1)}
    fits = {}
    for strat in study.strategies:                      # (B) fit, and predict the held-out budget first
        pooled = [r for seed in strat.seeds for r in records[strat.name, seed]]
        fit = fit_scaling_law(*fit_points(pooled, metric))
        last = [r for r in pooled if r["steps"] == p["budget_steps"][-1]]
        first = [r for r in pooled if r["steps"] == p["budget_steps"][0]]
        per_step = np.mean([(a["stage_flops"][strat.stages[-1].name] - b["stage_flops"][strat.stages[-1].name])
                            / (p["budget_steps"][-1] - p["budget_steps"][0]) for a, b in zip(last, first)])
        c_est = float(np.mean([r["flops"] for r in last]) + per_step * (p["heldout_steps"] - p["budget_steps"][-1]))
        fits[strat.name] = {**asdict(fit), "metric": metric, "heldout_steps": p["heldout_steps"],
                            "heldout_flops_estimate": c_est, "predicted_at_estimate": float(fit.predict(c_est)),
                            "predicted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(results / "fits.json", fits)  # the prediction is on disk before the held-out run
        with tracking.run("efin", f"fit/{strat.name}", params={"metric": metric, "heldout_steps": p["heldout_steps"]},
                          tags={"strategy": strat.name, "kind": "fit", "study": study.inputs_hash}):
            mlflow.log_metrics({k: v for k, v in fits[strat.name].items() if isinstance(v, float)})
    t0 = time.time()
    for strat in study.strategies:                      # (C) run the held-out budget, measure the error
        fit = Fit(**{k: fits[strat.name][k] for k in ("a", "alpha", "e_inf", "c0", "r2", "points")})
        held = []
        for seed in strat.seeds:
            records[strat.name, seed] = study.run(strat, seed, list(p["budget_steps"]) + [p["heldout_steps"]], heldout=True)
            held.append(records[strat.name, seed][-1])
        measured = float(np.mean([r[metric] for r in held]))
        c_act = float(np.mean([r["flops"] for r in held]))
        pred = float(fit.predict(c_act))
        fits[strat.name].update(heldout_flops=c_act, heldout_measured=measured, predicted_at_actual=pred,
                                abs_error=pred - measured, rel_error_pct=100 * (pred - measured) / measured,
                                estimate_abs_error=fits[strat.name]["predicted_at_estimate"] - measured)
    wall["heldout"] = round(time.time() - t0, 1)
    write_json(results / "fits.json", fits)
    evals = [r for rs in records.values() for r in rs]
    write_jsonl(results / "evaluations.jsonl", evals)
    summary = {"strategies": [s.name for s in study.strategies], "evaluations": len(evals),
               "train_utterances": len(study.train_data), "counter_overhead": overhead,
               "eval_utterances": {k: len(v) for k, v in study.eval_sets.items()},
               "wall_seconds": {**wall, "total": round(time.time() - t_stage, 1)}}
    write_json(results / "train.json", summary)
    print(f"[efin_train] {json.dumps(summary)}")
    return summary
