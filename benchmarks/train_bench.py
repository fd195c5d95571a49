"""Training and decoding throughput of the base AED: our trainer, its MFU, Hugging Face Seq2SeqTrainer
side by side, and batched greedy decoding.

Builds the AED of ``params.yaml`` ``pretrain_aed.model`` with the real tokenizer (``data/tokenizer``) and
trains it on a seeded subset of the ``pretrain_aed.data`` utterances (``data/features``, held-out scenarios
excluded, as the stage does). Writes ``results/bench/train.json``:

1. our trainer (:func:`asrlab.training.trainer.train`, ``pretrain_aed.train`` settings incl. SpecAugment,
   a temporary checkpoint directory): utterances/s and audio seconds/s (frames / 100) over ``--steps``
   optimizer steps after ``--warmup`` untimed ones, from ``on_step`` timestamps. The trainer saves a
   checkpoint at ``max_steps`` whatever ``ckpt_every`` says, and ``on_step`` runs after that save, so it
   runs one step more than is timed and that last step (with the save) stays outside the window;
2. MFU: FLOPs of one forward + backward on a real batch of the timed window (the one with the median
   padded size), counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention:
   the usual MFU convention, elementwise ops not counted), × steps/s, over an fp32 matmul peak measured in
   the same run (best of several 2048×2048 ``torch.mm`` with torch's default threads). A second estimate
   scales FLOPs per padded frame by the padded frames actually trained in the window;
3. the same model, data, SpecAugment and learning rate under ``transformers.Seq2SeqTrainer``: a thin
   wrapper whose forward returns the loss, fixed batches of our mean bucketed batch size grouped by length
   (``train_sampling_strategy="group_by_length"``), HF's default optimizer, no eval, no saving, timed from
   ``on_step_end`` callbacks over the same warm-up / timed steps;
4. :func:`asrlab.decode.transcribe` (greedy, attention with KV cache, and CTC) on ``--decode-utterances``
   SLURP test utterances (synthetic + real_proxy pools): utterances/s. The model is ``--model`` (default
   ``models/base_aed`` when it exists), otherwise the model just trained here, which has barely learned:
   its hypotheses are far from a trained model's in length (empty, or running to the token limit), and
   attention decoding time grows with output length, so that number is not representative (compare
   ``decode.*.mean_hyp_words`` with ``mean_ref_words``).

Targets (MFU ≥ 30 %, ≥ 1.5× Seq2SeqTrainer, ≥ 50 utt/s decoding) are recorded next to the measurements with
whether each was met. Run from anywhere, on an idle machine:
``python benchmarks/train_bench.py [--steps 40] [--warmup 5] [--utterances 600] [--out results/bench/train.json]``.
"""

from __future__ import annotations

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}.items():
    os.environ.setdefault(_k, _v)

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

import machine  # benchmarks/machine.py

from asrlab.audio.features import FeatureStore
from asrlab.decode import transcribe
from asrlab.io import write_json
from asrlab.models import store
from asrlab.models.aed import AEDModel
from asrlab.params import load_params
from asrlab.tokenizer import load_tokenizer
from asrlab.training.batching import bucket_batches, spec_augment
from asrlab.training.data import SpeechData, select
from asrlab.training.trainer import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
FRAMES_PER_SECOND = 100  # 10 ms hop
TARGETS = {"mfu_pct": 30.0, "speedup_vs_seq2seqtrainer": 1.5, "decode_utt_per_s": 50.0}


def build_model(params: dict, vocab_size: int, seed: int) -> AEDModel:
    torch.manual_seed(seed)  # the same initial weights for both trainers
    return AEDModel.from_config(store.aed_config(params["pretrain_aed"]["model"], vocab_size))


def load_data(params: dict, tok, spec: dict, model: AEDModel) -> SpeechData:
    fs = FeatureStore(ROOT / params["features"]["out_dir"])
    rows = select(list(fs.rows.values()), spec)
    return SpeechData(rows, fs, tok, model.max_frames, model.config.max_target_positions - 2,
                      char_targets=model.ctc_units == "chars")


def window_rates(t: list[float], utts: list[int], frames: list[int], padded: list[int], warmup: int,
                 steps: int) -> dict:
    """Rates over steps warmup+1 .. warmup+steps; t[k] is the time step k ended (t[0]: before step 1)."""
    wall = t[warmup + steps] - t[warmup]
    sl = slice(warmup, warmup + steps)  # per-step lists are 0-based: entry k is step k + 1
    step_s = [t[k + 1] - t[k] for k in range(warmup, warmup + steps)]
    return {"timed_steps": steps, "warmup_steps": warmup, "wall_s": round(wall, 3),
            "steps_per_s": round(steps / wall, 3), "utterances": sum(utts[sl]),
            "utt_per_s": round(sum(utts[sl]) / wall, 2),
            "audio_s_per_s": round(sum(frames[sl]) / FRAMES_PER_SECOND / wall, 1),
            "mean_batch": round(sum(utts[sl]) / steps, 1),
            "padding_pct": round(100 * (1 - sum(frames[sl]) / sum(padded[sl])), 1),
            "step_s_median": round(statistics.median(step_s), 3), "step_s_max": round(max(step_s), 3)}


def bench_ours(model: AEDModel, data: SpeechData, cfg: TrainConfig, warmup: int, steps: int) -> tuple[dict, list]:
    calls: list[list[int]] = []  # the batches, in the order the trainer asked for them

    def collate(idx: list[int]) -> dict:
        calls.append(list(idx))
        return data.collate(idx)

    marks: list[tuple[int, float, int]] = []  # (step, time, collate calls so far)

    def on_step(step: int) -> None:
        marks.append((step, time.perf_counter(), len(calls)))

    with tempfile.TemporaryDirectory(prefix="train_bench_") as ckpt:
        t0 = time.perf_counter()
        summary = train(model, data.lengths, collate, cfg, ckpt, on_step=on_step, desc="ours")
        total = time.perf_counter() - t0
    # Each mark closes one optimizer step; a step skipped for a non-finite loss also consumed a batch, so the
    # batches of step k are the collate calls between marks k-1 and k. t[k] is the time step k ended (no t[0]:
    # the window starts at the end of a warm-up step).
    t, utts, frames, padded, batches = [float("nan")], [], [], [], []
    prev_calls = 0
    for _, tk, n_calls in marks:
        group, prev_calls = calls[prev_calls:n_calls], n_calls
        t.append(tk)
        utts.append(sum(len(b) for b in group))
        frames.append(sum(data.lengths[i] for b in group for i in b))
        padded.append(sum(len(b) * max(data.lengths[i] for i in b) for b in group))
        batches.append(group[-1])
    res = window_rates(t, utts, frames, padded, warmup, steps)
    res.update(skipped_steps=summary["skipped_steps"], last_loss=round(summary["last_loss"], 4),
               total_wall_s=round(total, 1))
    return res, batches[warmup: warmup + steps]


def matmul_peak(n: int = 2048, reps: int = 10) -> dict:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return {"n": n, "dtype": "float32", "reps": reps, "best_s": round(best, 5),
            "gflops": round(2 * n ** 3 / best / 1e9, 2)}


def step_flops(model: AEDModel, data: SpeechData, idx: list[int]) -> dict:
    model.train()
    batch = data.collate(idx)
    with FlopCounterMode(display=False) as fc:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return {"batch": len(idx), "padded_frames": len(idx) * max(data.lengths[i] for i in idx),
            "max_tokens": int(batch["token_lengths"].max()), "flops": int(fc.get_total_flops())}


class LossOnly(torch.nn.Module):
    """What Seq2SeqTrainer needs: forward(**batch) -> {"loss": ...}."""

    def __init__(self, aed: AEDModel):
        super().__init__()
        self.aed = aed

    def forward(self, features, feature_lengths, tokens, token_lengths, ctc_tokens=None, ctc_token_lengths=None):
        return {"loss": self.aed(features, feature_lengths, tokens, token_lengths, ctc_tokens, ctc_token_lengths).loss}


class Utterances(torch.utils.data.Dataset):
    def __init__(self, data: SpeechData):
        self.data = data
        self.lengths = data.lengths

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> int:
        return i


class GroupedSeq2SeqTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer infers group_by_length lengths from an ``input_ids`` key or a ``datasets`` length
    column (``datasets`` is not installed); give its own LengthGroupedSampler the lengths directly."""

    def _get_train_sampler(self, train_dataset=None):
        return LengthGroupedSampler(self.args.train_batch_size, lengths=self.train_dataset.lengths)


class StepTimes(TrainerCallback):
    def __init__(self):
        self.t: list[float] = []

    def on_train_begin(self, args, state, control, **kw):
        self.t = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kw):
        self.t.append(time.perf_counter())


def bench_hf(model: AEDModel, data: SpeechData, cfg: TrainConfig, batch_size: int, warmup: int, steps: int) -> dict:
    seen: list[list[int]] = []

    def collate(idx: list[int]) -> dict:
        seen.append(list(idx))
        batch = data.collate(idx)
        if cfg.specaugment:
            spec_augment(batch["features"], batch["feature_lengths"], **cfg.specaugment)
        return batch

    cb = StepTimes()
    with tempfile.TemporaryDirectory(prefix="train_bench_hf_") as out:
        args = Seq2SeqTrainingArguments(
            output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=batch_size,
            learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
            lr_scheduler_type="cosine", max_grad_norm=cfg.grad_clip, seed=cfg.seed,
            train_sampling_strategy="group_by_length", dataloader_drop_last=True, dataloader_num_workers=0,
            remove_unused_columns=False, eval_strategy="no", save_strategy="no", logging_strategy="no",
            report_to=[], disable_tqdm=True, use_cpu=True)
        trainer = GroupedSeq2SeqTrainer(model=LossOnly(model), args=args, train_dataset=Utterances(data),
                                        data_collator=collate, callbacks=[cb])
        t0 = time.perf_counter()
        out_train = trainer.train()
        total = time.perf_counter() - t0
    n = len(cb.t) - 1
    if n != warmup + steps:
        raise RuntimeError(f"Seq2SeqTrainer ran {n} steps, expected {warmup + steps}")
    # The dataloader may collate one batch ahead; the order of batches is still the order of steps.
    utts = [len(b) for b in seen[:n]]
    frames = [sum(data.lengths[i] for i in b) for b in seen[:n]]
    padded = [len(b) * max(data.lengths[i] for i in b) for b in seen[:n]]
    res = window_rates(cb.t, utts, frames, padded, warmup, steps)
    res.update(batch_size=batch_size, optim=getattr(args.optim, "value", str(args.optim)),
               lr_scheduler=getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type)),
               last_loss=round(float(out_train.training_loss), 4), total_wall_s=round(total, 1),
               training_loss_note="mean over all steps (HF TrainOutput.training_loss)")
    return res


def bench_decode(model: AEDModel, data: SpeechData, tok, methods: list[str]) -> dict:
    refs = [r["text"] for r in data.rows]
    out = {}
    for m in methods:
        # warm-up on a handful of utterances (first calls of the cached decoding path)
        warm = copy.copy(data)
        warm.rows, warm.tokens, warm.features, warm.lengths = (x[:8] for x in (data.rows, data.tokens,
                                                                                 data.features, data.lengths))
        transcribe(model, warm, tok, method=m, desc=f"warm-up ({m})")
        t = time.perf_counter()
        hyps = transcribe(model, data, tok, method=m, desc=f"decode ({m})")
        wall = time.perf_counter() - t
        out[m] = {"utterances": len(hyps), "wall_s": round(wall, 3), "utt_per_s": round(len(hyps) / wall, 1),
                  "audio_s_per_s": round(sum(data.lengths) / FRAMES_PER_SECOND / wall, 1),
                  "mean_hyp_words": round(sum(len(h.split()) for h in hyps) / len(hyps), 1),
                  # a batch decodes until its longest hypothesis ends: one runaway output costs the whole batch
                  "max_hyp_words": max(len(h.split()) for h in hyps),
                  "mean_ref_words": round(sum(len(r.split()) for r in refs) / len(refs), 1),
                  "distinct_hyps": len(set(hyps))}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="timed optimizer steps per trainer (default 40)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before them (default 5)")
    ap.add_argument("--utterances", type=int, default=600, help="training utterances (default 600)")
    ap.add_argument("--decode-utterances", type=int, default=300, help="test utterances decoded (default 300)")
    ap.add_argument("--model", type=Path, default=None,
                    help="saved AED to decode with (default models/base_aed if it exists, else the model trained here)")
    ap.add_argument("--out", type=Path, default=ROOT / "results/bench/train.json", help="JSON output path")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.utterances < 2 or args.decode_utterances < 1:
        ap.error("--steps and --warmup must be >= 1, --utterances >= 2, --decode-utterances >= 1")

    t0 = time.perf_counter()
    load_before = os.getloadavg()
    params = load_params(args.params)
    p = params["pretrain_aed"]
    heldout = params.get("heldout_scenarios", [])
    tok = load_tokenizer(ROOT / params["tokenizer"]["out_dir"])
    torch.set_num_threads(int(os.environ.get("ASRLAB_THREADS", os.cpu_count() or 1)))  # as the stages do

    seed = p["train"].get("seed", 0)
    model = build_model(params, len(tok), seed)
    n_params = sum(x.numel() for x in model.parameters())
    train_spec = {**p["data"], "exclude_scenarios": heldout, "max_utterances": args.utterances, "seed": 0}
    data = load_data(params, tok, train_spec, model)
    cfg = TrainConfig.from_params({**p["train"], "max_steps": args.warmup + args.steps + 1,
                                   "ckpt_every": 10 ** 9, "log_every": 10 ** 9})

    peak_before = matmul_peak()
    ours, timed_batches = bench_ours(model, data, cfg, args.warmup, args.steps)

    # FLOPs of one real step: the timed batch of median padded size.
    by_size = sorted(timed_batches, key=lambda b: len(b) * max(data.lengths[i] for i in b))
    flops = step_flops(model, data, by_size[len(by_size) // 2])
    peak_after = matmul_peak()
    peak = max(peak_before["gflops"], peak_after["gflops"]) * 1e9
    window_padded = sum(len(b) * max(data.lengths[i] for i in b) for b in timed_batches)
    mfu = flops["flops"] * ours["steps_per_s"] / peak
    mfu_scaled = flops["flops"] / flops["padded_frames"] * window_padded / ours["wall_s"] / peak
    mfu_res = {"flops_per_step": flops["flops"], "flops_batch": flops, "peak_gflops": round(peak / 1e9, 2),
               "achieved_gflops": round(flops["flops"] * ours["steps_per_s"] / 1e9, 2),
               "mfu_pct": round(100 * mfu, 2),
               "mfu_scaled_by_padded_frames_pct": round(100 * mfu_scaled, 2),
               "peak_runs": {"before_training": peak_before, "after_training": peak_after}}

    mean_batch = max(1, round(statistics.mean(len(b) for b in bucket_batches(
        data.lengths, cfg.max_frames, cfg.seed, 0, cfg.max_batch))))
    hf_model = build_model(params, len(tok), seed)
    hf = bench_hf(hf_model, data, cfg, mean_batch, args.warmup, args.steps)
    del hf_model

    model_path = args.model or (ROOT / p["out_dir"] if (ROOT / p["out_dir"] / store.META).is_file() else None)
    if model_path is not None:
        kind, dec_model = store.load(model_path)
        if kind != "aed":
            sys.exit(f"{model_path}: a {kind} model, not an AED")
        decode_model = str(model_path)
    else:
        dec_model = model
        decode_model = (f"the model trained here ({args.warmup + args.steps + 1} steps): barely trained, so "
                        "hypothesis lengths (mean_hyp_words vs mean_ref_words) and hence attention decoding speed "
                        "are not representative of a trained model")
    test_spec = {"corpus": ["slurp"], "pools": ["synthetic", "real_proxy"], "splits": ["test"],
                 "max_utterances": args.decode_utterances, "seed": 0}
    test = load_data(params, tok, test_spec, dec_model)
    decode = bench_decode(dec_model, test, tok, ["attention", "ctc"])

    speedup = ours["utt_per_s"] / hf["utt_per_s"]
    targets = {
        "mfu_pct": {"target": f">= {TARGETS['mfu_pct']}", "measured": mfu_res["mfu_pct"],
                    "met": mfu_res["mfu_pct"] >= TARGETS["mfu_pct"]},
        "speedup_vs_seq2seqtrainer": {"target": f">= {TARGETS['speedup_vs_seq2seqtrainer']}",
                                      "measured": round(speedup, 3),
                                      "met": speedup >= TARGETS["speedup_vs_seq2seqtrainer"]},
        **{f"decode_{m}_utt_per_s": {"target": f">= {TARGETS['decode_utt_per_s']}", "measured": d["utt_per_s"],
                                     "met": d["utt_per_s"] >= TARGETS["decode_utt_per_s"]}
           for m, d in decode.items()},
    }

    result = {
        "machine": machine.facts(load_before, transformers=transformers.__version__),
        "model": {"config": p["model"], "params": n_params, "vocab_size": len(tok)},
        "data": {"train_selection": train_spec, "train_utterances": len(data),
                 "train_audio_s": round(sum(data.lengths) / FRAMES_PER_SECOND, 1),
                 "test_selection": test_spec, "test_utterances": len(test)},
        "train_config": {k: v for k, v in vars(cfg).items() if k not in ("ckpt_every", "log_every")},
        "ours": ours, "mfu": mfu_res, "seq2seqtrainer": hf,
        "speedup_ours_over_seq2seqtrainer": {"utt_per_s": round(speedup, 3),
                                             "audio_s_per_s": round(ours["audio_s_per_s"] / hf["audio_s_per_s"], 3)},
        "decode_model": decode_model, "decode": decode, "targets": targets,
        "notes": ("utt/s and audio s/s over the timed steps only (warm-up excluded); audio s = frames / 100. "
                  "Ours: length-bucketed batches under max_frames (batch size varies). Seq2SeqTrainer: fixed "
                  "batches of our mean bucketed batch size, LengthGroupedSampler, HF's default optimizer, same "
                  "SpecAugment in the collator. MFU counts matmul/conv/attention FLOPs (FlopCounterMode) of one "
                  "forward+backward; the optimizer step is not counted."),
        "total_wall_s": round(time.perf_counter() - t0, 1),
    }
    write_json(args.out, result)

    print(f"\nAED {n_params / 1e6:.2f} M params, {len(data)} training utterances "
          f"({result['data']['train_audio_s'] / 60:.1f} min audio), {args.warmup} warm-up + {args.steps} timed steps")
    print(f"{'trainer':<16}{'batch':>7}{'steps/s':>9}{'utt/s':>8}{'audio s/s':>11}{'pad %':>7}{'step s (med)':>14}")
    for name, r in (("ours", ours), ("Seq2SeqTrainer", hf)):
        print(f"{name:<16}{r['mean_batch']:>7.1f}{r['steps_per_s']:>9.2f}{r['utt_per_s']:>8.1f}"
              f"{r['audio_s_per_s']:>11.1f}{r['padding_pct']:>7.1f}{r['step_s_median']:>14.3f}")
    print(f"ours / Seq2SeqTrainer: {speedup:.2f}x utt/s")
    print(f"FLOPs/step {flops['flops'] / 1e9:.1f} G (batch {flops['batch']}, {flops['padded_frames']} padded frames); "
          f"peak fp32 mm {mfu_res['peak_gflops']:.1f} GFLOP/s; MFU {mfu_res['mfu_pct']:.1f} % "
          f"(scaled by padded frames {mfu_res['mfu_scaled_by_padded_frames_pct']:.1f} %)")
    for m, d in decode.items():
        print(f"decode {m:<9} {d['utterances']} utts: {d['utt_per_s']:.1f} utt/s, {d['audio_s_per_s']:.0f} audio s/s "
              f"(mean {d['mean_hyp_words']} words/hyp vs {d['mean_ref_words']} in refs)")
    print(f"decode model: {decode_model}")
    print("targets: " + "; ".join(f"{k} {v['measured']} ({v['target']}): {'met' if v['met'] else 'NOT met'}"
                                  for k, v in targets.items()))
    print(machine.summary_line(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
