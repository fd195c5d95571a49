"""Fine-tuning and decoding throughput of the base AED: our trainer against Hugging Face Seq2SeqTrainer on
the same batches, its MFU, and batched greedy decoding on the 30-s window against per-batch padding.

The model is the one stage ``pretrain_aed`` fine-tunes: the pretrained Whisper of ``pretrain_aed.init_from``
(tiny.en, ``models/whisper``) with its own tokenizer and the ``pretrain_aed.model`` loss settings (CTC head,
label smoothing), or, when ``init_from`` is null (the smoke profile), the AED built from ``pretrain_aed.model``
with the project BPE (``data/tokenizer``). It trains on a seeded subset of the ``pretrain_aed.data`` utterances
(``data/features``, held-out scenarios excluded, as the stage does). Writes ``results/bench/train.json``:

1. our trainer (:func:`asrlab.training.trainer.train`, ``pretrain_aed.train`` settings incl. SpecAugment,
   a temporary checkpoint directory): utterances/s and audio seconds/s (frames / 100) over ``--steps``
   optimizer steps after ``--warmup`` untimed ones, from ``on_step`` timestamps. The trainer saves a
   checkpoint at ``max_steps`` whatever ``ckpt_every`` says, and ``on_step`` runs after that save, so it
   runs one step more than is timed and that last step (with the save) stays outside the window;
2. the same model (loaded again: the same initial weights), the same learning rate and SpecAugment under
   ``transformers.Seq2SeqTrainer`` on exactly the batches our trainer trained on, in the same order (a
   dataset whose items are those batches, batch size 1, a sequential sampler; checked), a thin wrapper whose
   forward returns the loss, HF's default optimizer and schedule, no eval, no saving, timed from
   ``on_step_end`` callbacks over the same warm-up / timed steps. It runs after ours: on a loaded machine the
   two windows see different load (``cpu_s_per_step`` beside the wall times). Same batches, so the ratio
   ``trainer_vs_seq2seq`` (ours / HF, utt/s) measures the trainers alone, not our length bucketing; what the
   bucketing saves over HF's own ``group_by_length`` at our mean batch size is reported separately as
   padded frames (``batching``: index arithmetic, nothing run);
3. MFU: FLOPs of one forward + backward on a real batch of the timed window (the one with the median
   padded size), counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention:
   the usual MFU convention, elementwise ops not counted), × our steps/s, over an fp32 matmul peak measured
   in the same run (best of several 2048×2048 ``torch.mm`` with the benchmark's threads, before and after
   the two trainers). A second estimate scales FLOPs per padded frame by the padded frames actually trained
   in the window. ``step_breakdown`` times the phases of that step (collate, forward, backward, gradient clipping
   with and without ``foreach``, one AdamW step as our trainer builds it, with ``foreach``, and fused as HF's
   default ``adamw_torch_fused``), so the ratio of item 2 can be read against where a step's time goes. Both
   run before the trainers (the batch is known in advance: bucketing is a pure function of the lengths), so
   their passes warm the process up for both trainers alike;
4. greedy decoding (:func:`asrlab.evaluation.evaluate`, i.e. :func:`asrlab.decode.transcribe` then WER/CER
   on the shared normaliser) of ``--decode-utterances`` SLURP test utterances (synthetic + real_proxy pools)
   with ``eval_base``'s frame budget and token limit, attention decoding on the 30-s window and on per-batch
   padding (and CTC when the model was trained with a CTC loss): utterances/s beside the WER/CER each
   produced, because a fast decode that loops or stops early is not a fast decode. The models are
   ``--decode-models`` (default: the zero-shot ``init_from`` Whisper, plus ``pretrain_aed.out_dir`` when it
   has been trained; from scratch, ``out_dir`` or else the barely trained model of this run, whose decoding
   speed is then not representative: compare ``mean_hyp_words`` with ``mean_ref_words``).

5. the same trainers and decoding again under bfloat16 autocast (``precision: bf16``; ``--no-bf16`` skips it):
   fresh models on the same batches, ``bf16`` in the JSON with ours bf16 / ours fp32, ours / HF both in bf16
   (HF's ``bf16=True``), ours bf16 / HF fp32 (HF's default), and MFU against a bf16 matmul peak measured in
   the same run (AMX on this CPU makes it several times the fp32 peak).

Targets (MFU ≥ 30 %, ≥ 1.5× Seq2SeqTrainer, ≥ 50 utt/s decoding) are recorded next to the measurements with
whether each was met. The defaults take an estimated 2.5–3.5 minutes on 2 idle cores (step times measured at
load ≈ 2; 7.8 minutes on the busy development machine). It imports the library of its own checkout
(``library`` in the JSON), whatever the environment's editable install points at. Run from anywhere, on an
idle machine:
``python benchmarks/train_bench.py [--steps 16] [--warmup 3] [--utterances 400] [--decode-utterances 40]
[--root DIR] [--out results/bench/train.json]``.
"""

from __future__ import annotations

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}.items():
    os.environ.setdefault(_k, _v)

import argparse
import dataclasses
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

ROOT = Path(__file__).resolve().parent.parent
# Measure this checkout's library, whichever checkout the environment's editable install points at.
sys.path.insert(0, str(ROOT / "lib"))

import asrlab
from asrlab.audio.features import FeatureStore
from asrlab.evaluation import evaluate
from asrlab.io import write_json
from asrlab.models import store
from asrlab.models.aed import AEDModel
from asrlab.params import load_params
from asrlab.tokenizer import load_tokenizer
from asrlab.training.batching import bucket_batches, spec_augment
from asrlab.training.data import SpeechData, select
from asrlab.training.trainer import TrainConfig, train

FRAMES_PER_SECOND = 100  # 10 ms hop
TARGETS = {"mfu_pct": 30.0, "trainer_vs_seq2seq": 1.5, "decode_utt_per_s": 50.0}


def build_model(p: dict, root: Path, tok, seed: int) -> AEDModel:
    """The model stage pretrain_aed starts from; built twice, it has the same initial weights both times."""
    torch.manual_seed(seed)  # a new CTC head (none saved) or a from-scratch model: the same init for both trainers
    m = p["model"]
    if p.get("init_from"):
        return AEDModel.from_pretrained(root / p["init_from"], m["ctc_weight"], m["label_smoothing"],
                                        ctc_units=m.get("ctc_units"))
    return AEDModel.from_config(store.aed_config(m, len(tok)))


def load_data(fs: FeatureStore, tok, spec: dict, model: AEDModel, char_targets: bool = False) -> SpeechData:
    max_tokens = model.config.max_target_positions - len(model.prompt_ids) - 1  # as stage pretrain_aed
    return SpeechData(select(list(fs.rows.values()), spec), fs, tok, model.max_frames, max_tokens, char_targets)


def padded(data: SpeechData, batch: list[int]) -> int:
    return len(batch) * max(data.lengths[i] for i in batch)


def window_rates(t: list[float], cpu: list[float], utts: list[int], frames: list[int], pads: list[int],
                 warmup: int, steps: int) -> dict:
    """Rates over steps warmup+1 .. warmup+steps; t[k] is the time step k ended (t[0]: before step 1), cpu[k]
    the process CPU time then (all threads: on a busy machine it stays near the work done while wall time grows,
    though threads spinning at a barrier count too)."""
    wall = t[warmup + steps] - t[warmup]
    sl = slice(warmup, warmup + steps)  # per-step lists are 0-based: entry k is step k + 1
    step_s = [t[k + 1] - t[k] for k in range(warmup, warmup + steps)]
    return {"timed_steps": steps, "warmup_steps": warmup, "wall_s": round(wall, 3),
            "steps_per_s": round(steps / wall, 3), "utterances": sum(utts[sl]),
            "utt_per_s": round(sum(utts[sl]) / wall, 2),
            "audio_s_per_s": round(sum(frames[sl]) / FRAMES_PER_SECOND / wall, 1),
            "mean_batch": round(sum(utts[sl]) / steps, 1),
            "padding_pct": round(100 * (1 - sum(frames[sl]) / sum(pads[sl])), 1),
            "step_s_median": round(statistics.median(step_s), 3), "step_s_max": round(max(step_s), 3),
            "cpu_s_per_step": round((cpu[warmup + steps] - cpu[warmup]) / steps, 3)}


def planned_batches(lengths: list[int], cfg: TrainConfig, n: int) -> list[list[int]]:
    """The first ``n`` batches a single-process :func:`train` takes: epoch after epoch of bucket_batches."""
    out, epoch = [], 0
    while len(out) < n:
        out += bucket_batches(lengths, cfg.max_frames, cfg.seed, epoch, cfg.max_batch)
        epoch += 1
    return out[:n]


def bench_ours(model: AEDModel, data: SpeechData, cfg: TrainConfig, warmup: int, steps: int) -> tuple[dict, list]:
    """Returns the rates and the batch of every completed step (all steps, the untimed last one included)."""
    calls: list[list[int]] = []  # the batches, in the order the trainer asked for them

    def collate(idx: list[int]) -> dict:
        calls.append(list(idx))
        return data.collate(idx)

    marks: list[tuple[float, float, int]] = []  # (time, CPU time, collate calls so far)

    def on_step(step: int) -> None:
        marks.append((time.perf_counter(), time.process_time(), len(calls)))

    with tempfile.TemporaryDirectory(prefix="train_bench_") as ckpt:
        t0 = time.perf_counter()
        summary = train(model, data.lengths, collate, cfg, ckpt, on_step=on_step, desc="ours")
        total = time.perf_counter() - t0
    # Each mark closes one optimizer step; a step skipped for a non-finite loss also consumed a batch, so the
    # batches of step k are the collate calls between marks k-1 and k. t[k] is the time step k ended (no t[0]:
    # the window starts at the end of a warm-up step).
    t, cpu, utts, frames, pads, batches = [float("nan")], [float("nan")], [], [], [], []
    prev_calls = 0
    for tk, ck, n_calls in marks:
        group, prev_calls = calls[prev_calls:n_calls], n_calls
        t.append(tk)
        cpu.append(ck)
        utts.append(sum(len(b) for b in group))
        frames.append(sum(data.lengths[i] for b in group for i in b))
        pads.append(sum(padded(data, b) for b in group))
        batches.append(group[-1])
    res = window_rates(t, cpu, utts, frames, pads, warmup, steps)
    res.update(skipped_steps=summary["skipped_steps"], last_loss=round(summary["last_loss"], 4),
               total_wall_s=round(total, 1))
    return res, batches


def matmul_peak(n: int = 2048, reps: int = 10, dtype: torch.dtype = torch.float32) -> dict:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "reps": reps, "best_s": round(best, 5),
            "gflops": round(2 * n ** 3 / best / 1e9, 2)}


def step_flops(model: AEDModel, data: SpeechData, idx: list[int]) -> dict:
    model.train()
    batch = data.collate(idx)
    with FlopCounterMode(display=False) as fc:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    by_module = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    total = int(fc.get_total_flops())
    proj = by_module.get("AEDModel.whisper.proj_out", 0)  # the vocabulary projection (51,864-way for Whisper .en)
    return {"batch": len(idx), "padded_frames": padded(data, idx), "max_tokens": int(batch["token_lengths"].max()),
            "flops": total, "output_projection_flops_pct": round(100 * proj / total, 1)}


OURS_STEP = ("collate", "forward", "backward", "clip_grad_norm", "adamw_ours")


def step_breakdown(model: AEDModel, data: SpeechData, idx: list[int], cfg: TrainConfig, reps: int = 3) -> dict:
    """Median seconds of each phase of one training step on batch ``idx`` (after one untimed repetition), on
    a copy of the model (the optimizer steps move its weights).

    Gradient clipping as both trainers call it (``clip_grad_norm_`` defaults: one norm per tensor on CPU) and
    with ``foreach=True``; AdamW as our trainer builds it (``torch.optim.AdamW`` defaults: the per-tensor loop
    on CPU), with ``foreach=True``, and fused (HF's default ``adamw_torch_fused``), each from fresh state (its
    first, state-allocating step untimed) on the same gradients.
    """
    model = copy.deepcopy(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    phases: dict[str, list[float]] = {k: [] for k in ("collate", "forward", "backward", "clip_grad_norm",
                                                      "clip_grad_norm_foreach")}
    for r in range(reps + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        batch = data.collate(idx)
        t1 = time.perf_counter()
        loss = model(**batch).loss
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)  # the same work: norms, then a scale
        t5 = time.perf_counter()
        if r:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                phases[k].append(dt)
    for name, kw in (("adamw_ours", {}), ("adamw_foreach", {"foreach": True}), ("adamw_torch_fused", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)
        opt.step()
        phases[name] = []
        for _ in range(reps):
            t = time.perf_counter()
            opt.step()
            phases[name].append(time.perf_counter() - t)
        del opt
    del model
    out = {k: round(statistics.median(v), 4) for k, v in phases.items()}
    ours = sum(out[k] for k in OURS_STEP)
    out["step_ours_s"] = round(ours, 4)
    out["pct_of_step_ours"] = {k: round(100 * out[k] / ours, 1) for k in OURS_STEP}
    out["batch"] = len(idx)
    return out


class LossOnly(torch.nn.Module):
    """What Seq2SeqTrainer needs: forward(**batch) -> {"loss": ...}."""

    def __init__(self, aed: AEDModel):
        super().__init__()
        self.aed = aed

    def forward(self, features, feature_lengths, tokens, token_lengths, ctc_tokens=None, ctc_token_lengths=None):
        return {"loss": self.aed(features, feature_lengths, tokens, token_lengths, ctc_tokens, ctc_token_lengths).loss}


class Batches(torch.utils.data.Dataset):
    """Item i is the i-th batch (utterance indices) our trainer trained on; HF takes them one per step."""

    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[int]:
        return self.batches[i]


class InOrderSeq2SeqTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer whose training sampler keeps the dataset's order (ours already shuffled the batches)."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(self.train_dataset)


class StepTimes(TrainerCallback):
    def __init__(self):
        self.t: list[float] = []
        self.cpu: list[float] = []

    def on_train_begin(self, args, state, control, **kw):
        self.t, self.cpu = [time.perf_counter()], [time.process_time()]

    def on_step_end(self, args, state, control, **kw):
        self.t.append(time.perf_counter())
        self.cpu.append(time.process_time())


def bench_hf(model: AEDModel, data: SpeechData, cfg: TrainConfig, batches: list[list[int]], warmup: int,
             steps: int) -> dict:
    """Seq2SeqTrainer on ``batches``; ``cfg.precision == "bf16"`` sets its ``bf16=True`` (autocast, as ours)."""
    seen: list[list[int]] = []

    def collate(items: list[list[int]]) -> dict:
        (idx,) = items  # batch size 1 over a dataset of batches
        seen.append(list(idx))
        batch = data.collate(idx)
        if cfg.specaugment:
            spec_augment(batch["features"], batch["feature_lengths"], **cfg.specaugment)
        return batch

    cb = StepTimes()
    with tempfile.TemporaryDirectory(prefix="train_bench_hf_") as out:
        args = Seq2SeqTrainingArguments(
            output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=1,
            learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
            lr_scheduler_type="cosine", max_grad_norm=cfg.grad_clip, seed=cfg.seed,
            dataloader_num_workers=0, remove_unused_columns=False, eval_strategy="no", save_strategy="no",
            logging_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, bf16=cfg.precision == "bf16")
        trainer = InOrderSeq2SeqTrainer(model=LossOnly(model), args=args, train_dataset=Batches(batches),
                                        data_collator=collate, callbacks=[cb])
        t0 = time.perf_counter()
        out_train = trainer.train()
        total = time.perf_counter() - t0
    n = len(cb.t) - 1
    if n != warmup + steps:
        raise RuntimeError(f"Seq2SeqTrainer ran {n} steps, expected {warmup + steps}")
    # The dataloader may collate one batch ahead; the order of batches is still the order of steps.
    if seen[:n] != batches[:n]:
        raise RuntimeError("Seq2SeqTrainer did not train on our trainer's batches in our order")
    utts = [len(b) for b in seen[:n]]
    frames = [sum(data.lengths[i] for i in b) for b in seen[:n]]
    pads = [padded(data, b) for b in seen[:n]]
    res = window_rates(cb.t, cb.cpu, utts, frames, pads, warmup, steps)
    res.update(optim=getattr(args.optim, "value", str(args.optim)),
               lr_scheduler=getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type)),
               last_loss=round(float(out_train.training_loss), 4), total_wall_s=round(total, 1),
               training_loss_note="mean over all steps (HF TrainOutput.training_loss)")
    return res


def batching_padding(data: SpeechData, cfg: TrainConfig) -> dict:
    """Padded frames of one epoch: our bucketing under max_frames against HF's LengthGroupedSampler
    (train_sampling_strategy="group_by_length") at our mean batch size. Index arithmetic only."""
    ours = bucket_batches(data.lengths, cfg.max_frames, cfg.seed, 0, cfg.max_batch)
    size = max(1, round(len(data) / len(ours)))
    order = list(LengthGroupedSampler(size, lengths=data.lengths,
                                      generator=torch.Generator().manual_seed(cfg.seed)))
    hf = [order[k: k + size] for k in range(0, len(order) - size + 1, size)]  # dataloader_drop_last
    frames = sum(data.lengths)

    def pct(bs):
        return round(100 * (1 - sum(sum(data.lengths[i] for i in b) for b in bs) / sum(padded(data, b) for b in bs)), 1)

    out = {"ours_bucketed": {"batches": len(ours), "padded_frames": sum(padded(data, b) for b in ours),
                             "padding_pct": pct(ours)},
           "hf_group_by_length": {"batch_size": size, "batches": len(hf),
                                  "padded_frames": sum(padded(data, b) for b in hf), "padding_pct": pct(hf),
                                  "max_padded_frames": max(padded(data, b) for b in hf)},
           "audio_frames": frames}
    out["hf_over_ours_padded_frames_per_utt"] = round(
        (out["hf_group_by_length"]["padded_frames"] / (len(hf) * size))
        / (out["ours_bucketed"]["padded_frames"] / len(data)), 3)
    return out


def head(data: SpeechData, n: int) -> SpeechData:
    part = copy.copy(data)
    part.rows, part.tokens, part.features, part.lengths = (x[:n] for x in (data.rows, data.tokens, data.features,
                                                                           data.lengths))
    part.chars = data.chars[:n] if data.chars is not None else None
    return part


def bench_decode(model: AEDModel, data: SpeechData, tok, modes: list[tuple[str, bool, str]], max_frames: int,
                 max_new_tokens: int) -> dict:
    mean_ref = round(sum(len(r["text"].split()) for r in data.rows) / len(data), 1)
    out = {}
    for method, window, precision in modes:
        name = f"{method}_{'window' if window else 'per_batch'}" + ("_bf16" if precision == "bf16" else "")
        kw = dict(method=method, window=window, max_frames=max_frames, max_new_tokens=max_new_tokens, progress=False,
                  precision=precision)
        evaluate(model, head(data, 4), tok, **kw)  # warm-up: first calls of this decoding path
        res = evaluate(model, data, tok, **kw)
        hyps = [r["hyp"] for r in res.rows]
        # the batches transcribe() makes: a window batch holds max_frames // window utterances
        lengths = [model.max_frames] * len(data) if window else data.lengths
        n_batches = len(bucket_batches(lengths, max(max_frames, model.max_frames if window else 0), 0, 0))
        out[name] = {"method": method, "window": window, "precision": precision, "utterances": len(hyps), "wall_s": round(res.seconds, 3),
                     "utt_per_s": round(len(hyps) / res.seconds, 2),
                     "audio_s_per_s": round(sum(data.lengths) / FRAMES_PER_SECOND / res.seconds, 1),
                     "wer": res.wer, "cer": res.cer,
                     "mean_utt_per_batch": round(len(data) / n_batches, 1),
                     "mean_hyp_words": round(sum(len(h.split()) for h in hyps) / len(hyps), 1),
                     # a batch decodes until its longest hypothesis ends: one runaway output costs the whole batch
                     "max_hyp_words": max(len(h.split()) for h in hyps),
                     "mean_ref_words": mean_ref, "distinct_hyps": len(set(hyps))}
    return out


TRAINED_HERE = "trained_here"


def decode_models(p: dict, root: Path, paths: list[Path] | None, trained: AEDModel, tok):
    """(label, model, tokenizer) to decode with, one at a time: ``paths`` (relative to ``root``), or by default
    the zero-shot ``init_from`` Whisper (the 30-s window is its right padding) and ``out_dir`` once stage
    pretrain_aed has saved it; from scratch with nothing saved, the model our trainer just trained."""
    if paths is None:
        paths = [Path(p["init_from"])] if p.get("init_from") else []
        paths += [Path(p["out_dir"])] if (root / p["out_dir"] / store.META).is_file() else []
    if not paths:
        yield TRAINED_HERE, trained, tok
    for path in paths:
        kind, model = store.load(root / path)
        if kind != "aed":
            sys.exit(f"{root / path}: a {kind} model, not an AED")
        yield os.path.relpath(root / path, root), model, store.tokenizer(root / path)
        del model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="timed optimizer steps per trainer (default 16)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    ap.add_argument("--utterances", type=int, default=400, help="training utterances (default 400)")
    ap.add_argument("--decode-utterances", type=int, default=40, help="test utterances decoded (default 40)")
    ap.add_argument("--decode-models", type=Path, nargs="+", default=None,
                    help="saved AEDs to decode with, relative to --root (default: pretrain_aed.init_from, zero-shot, "
                         "and pretrain_aed.out_dir if trained; from scratch: out_dir, else the model trained here)")
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="where the params' relative paths (features, tokenizer, models) resolve (default: this "
                         "repository); only read")
    ap.add_argument("--out", type=Path, default=ROOT / "results/bench/train.json", help="JSON output path")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false",
                    help="skip the bf16-autocast pair of trainers and bf16 decoding (default: run them too)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.utterances < 2 or args.decode_utterances < 4:
        ap.error("--steps and --warmup must be >= 1, --utterances >= 2, --decode-utterances >= 4")

    t0, cpu0 = time.perf_counter(), time.process_time()
    load_before = os.getloadavg()
    params = load_params(args.params)
    p, root = params["pretrain_aed"], args.root.resolve()
    heldout = params.get("heldout_scenarios", [])
    init_from = p.get("init_from")
    tok = store.tokenizer(root / init_from) if init_from else load_tokenizer(root / params["tokenizer"]["out_dir"])
    torch.set_num_threads(int(os.environ.get("ASRLAB_THREADS", os.cpu_count() or 1)))  # as the stages do
    fs = FeatureStore(root / params["features"]["out_dir"])

    seed = p["train"].get("seed", 0)
    model = build_model(p, root, tok, seed)
    n_params = sum(x.numel() for x in model.parameters())
    train_spec = {**p["data"], "exclude_scenarios": heldout, "max_utterances": args.utterances, "seed": 0}
    data = load_data(fs, tok, train_spec, model, char_targets=model.ctc_units == "chars")
    cfg = TrainConfig.from_params({**p["train"], "max_steps": args.warmup + args.steps + 1,
                                   "ckpt_every": 10 ** 9, "log_every": 10 ** 9})

    # The batches our trainer will take (a pure function of lengths, budget, seed and epoch). FLOPs and the
    # phase times of one step, on the timed batch of median padded size, are measured first: their few
    # forward/backward passes also warm the process up for both trainers alike.
    planned = planned_batches(data.lengths, cfg, args.warmup + args.steps + 1)
    timed_batches = planned[args.warmup: args.warmup + args.steps]
    median_batch = sorted(timed_batches, key=lambda b: padded(data, b))[len(timed_batches) // 2]
    peak_before = matmul_peak()
    flops = step_flops(model, data, median_batch)
    breakdown = step_breakdown(model, data, median_batch, cfg)

    ours, batches = bench_ours(model, data, cfg, args.warmup, args.steps)
    if batches != planned:  # a step skipped for a non-finite loss shifts the batches
        timed_batches = batches[args.warmup: args.warmup + args.steps]
    hf_model = build_model(p, root, tok, seed)
    hf = bench_hf(hf_model, data, cfg, batches[: args.warmup + args.steps], args.warmup, args.steps)
    del hf_model
    bf16 = None
    if args.bf16:  # both trainers again under bfloat16 autocast, fresh models, the same batches
        cfg16 = dataclasses.replace(cfg, precision="bf16")
        ours16, _ = bench_ours(build_model(p, root, tok, seed), data, cfg16, args.warmup, args.steps)
        hf16 = bench_hf(build_model(p, root, tok, seed), data, cfg16, batches[: args.warmup + args.steps],
                        args.warmup, args.steps)
        peak16 = matmul_peak(dtype=torch.bfloat16)
        base = cfg.precision == "bf16"
        bf16 = {"ours": ours16, "seq2seqtrainer": hf16, "peak_bf16_mm": peak16,
                "ours_vs_seq2seq_both_bf16": round(ours16["utt_per_s"] / hf16["utt_per_s"], 3),
                "ours_bf16_vs_seq2seq_fp32": None if base else round(ours16["utt_per_s"] / hf["utt_per_s"], 3),
                "ours_bf16_vs_ours_fp32": None if base else round(ours16["utt_per_s"] / ours["utt_per_s"], 3),
                "mfu_bf16_pct": round(100 * flops["flops"] * ours16["steps_per_s"] / (peak16["gflops"] * 1e9), 2),
                "loss_note": "last_loss of each trainer: bf16 autocast must train like fp32 (same batches)"}
    peak_after = matmul_peak()
    peak = max(peak_before["gflops"], peak_after["gflops"]) * 1e9
    window_padded = sum(padded(data, b) for b in timed_batches)
    mfu = flops["flops"] * ours["steps_per_s"] / peak
    mfu_scaled = flops["flops"] / flops["padded_frames"] * window_padded / ours["wall_s"] / peak
    mfu_res = {"flops_per_step": flops["flops"], "flops_batch": flops, "peak_gflops": round(peak / 1e9, 2),
               "achieved_gflops": round(flops["flops"] * ours["steps_per_s"] / 1e9, 2),
               "mfu_pct": round(100 * mfu, 2),
               "mfu_scaled_by_padded_frames_pct": round(100 * mfu_scaled, 2),
               "peak_runs": {"before_trainers": peak_before, "after_trainers": peak_after}}
    batching = batching_padding(data, cfg)

    test_spec = {"corpus": ["slurp"], "pools": ["synthetic", "real_proxy"], "splits": ["test"],
                 "max_utterances": args.decode_utterances, "seed": 0}
    ev = params["eval_base"]
    decode, decode_notes, test_utts = {}, {}, None
    for label, dec_model, dec_tok in decode_models(p, root, args.decode_models, model, tok):
        if label == TRAINED_HERE:
            decode_notes[label] = (f"the model trained here ({args.warmup + args.steps + 1} steps): barely trained, "
                                   "so hypothesis lengths (mean_hyp_words vs mean_ref_words) and hence attention "
                                   "decoding speed are not representative of a trained model")
        test = load_data(fs, dec_tok, test_spec, dec_model)
        test_utts = len(test)
        modes = [("attention", True), ("attention", False)] + ([("ctc", False)] if dec_model.ctc_weight > 0 else [])
        modes = [(m, w, "fp32") for m, w in modes] + ([(m, w, "bf16") for m, w in modes] if args.bf16 else [])
        decode[label] = bench_decode(dec_model, test, dec_tok, modes, ev["max_frames"], ev["max_new_tokens"])
    del model

    speedup = ours["utt_per_s"] / hf["utt_per_s"]
    targets = {
        "mfu_pct": {"target": f">= {TARGETS['mfu_pct']}", "measured": mfu_res["mfu_pct"],
                    "met": mfu_res["mfu_pct"] >= TARGETS["mfu_pct"]},
        "trainer_vs_seq2seq": {"target": f">= {TARGETS['trainer_vs_seq2seq']} (the old goal)",
                               "measured": round(speedup, 3), "met": speedup >= TARGETS["trainer_vs_seq2seq"]},
        **{f"decode/{label}/{name}_utt_per_s": {"target": f">= {TARGETS['decode_utt_per_s']}",
                                                "measured": d["utt_per_s"], "wer": d["wer"],
                                                "met": d["utt_per_s"] >= TARGETS["decode_utt_per_s"]}
           for label, runs in decode.items() for name, d in runs.items()},
    }

    result = {
        "machine": machine.facts(load_before, transformers=transformers.__version__),
        "library": str(Path(asrlab.__file__).parent),
        "model": {"init_from": init_from, "config": p["model"], "params": n_params, "vocab_size": len(tok)},
        "data": {"root": str(root), "train_selection": train_spec, "train_utterances": len(data),
                 "train_audio_s": round(sum(data.lengths) / FRAMES_PER_SECOND, 1),
                 "test_selection": test_spec, "test_utterances": test_utts},
        "train_config": {k: v for k, v in vars(cfg).items() if k not in ("ckpt_every", "log_every")},
        "ours": ours, "seq2seqtrainer": hf,
        "trainer_vs_seq2seq": round(speedup, 3), "bf16": bf16,
        "mfu_pct": mfu_res["mfu_pct"], "mfu": mfu_res, "step_breakdown": breakdown, "batching": batching,
        "decode_settings": {"max_frames": ev["max_frames"], "max_new_tokens": ev["max_new_tokens"],
                            "source": "params.yaml eval_base"},
        "decode": decode, "decode_notes": decode_notes,
        "decode_per_batch_vs_window": {
            label: {"utt_per_s_ratio": round(runs["attention_per_batch"]["utt_per_s"]
                                             / runs["attention_window"]["utt_per_s"], 2),
                    "wer_window": runs["attention_window"]["wer"], "wer_per_batch": runs["attention_per_batch"]["wer"]}
            for label, runs in decode.items()},
        "targets": targets,
        "notes": ("utt/s and audio s/s over the timed steps only (warm-up excluded); audio s = frames / 100. "
                  "Both trainers train on the same batches in the same order (ours: length-bucketed under "
                  "max_frames, so the batch size varies); Seq2SeqTrainer with HF's default optimizer and the "
                  "same SpecAugment in the collator. MFU counts matmul/conv/attention FLOPs (FlopCounterMode) of "
                  "one forward+backward; the optimizer step is not counted. Decoding: eval_base's frame budget "
                  "for both paddings, so the window holds fewer utterances per batch."),
        "total_wall_s": round(time.perf_counter() - t0, 1),
        "total_cpu_s": round(time.process_time() - cpu0, 1),
    }
    write_json(args.out, result)

    print(f"\nAED {n_params / 1e6:.2f} M params ({init_from or 'from scratch'}), {len(data)} training utterances "
          f"({result['data']['train_audio_s'] / 60:.1f} min audio), {args.warmup} warm-up + {args.steps} timed steps")
    print(f"{'trainer':<16}{'batch':>7}{'steps/s':>9}{'utt/s':>8}{'audio s/s':>11}{'pad %':>7}{'step s (med)':>14}")
    for name, r in (("ours", ours), ("Seq2SeqTrainer", hf)):
        print(f"{name:<16}{r['mean_batch']:>7.1f}{r['steps_per_s']:>9.2f}{r['utt_per_s']:>8.1f}"
              f"{r['audio_s_per_s']:>11.1f}{r['padding_pct']:>7.1f}{r['step_s_median']:>14.3f}")
    print(f"ours / Seq2SeqTrainer (same batches): {speedup:.2f}x utt/s")
    if bf16:
        print(f"bf16 autocast: ours {bf16['ours']['utt_per_s']} utt/s, Seq2SeqTrainer {bf16['seq2seqtrainer']['utt_per_s']}"
              f" utt/s; ours bf16 / ours fp32 {bf16['ours_bf16_vs_ours_fp32']}x, ours bf16 / HF fp32 "
              f"{bf16['ours_bf16_vs_seq2seq_fp32']}x; MFU vs the bf16 peak {bf16['mfu_bf16_pct']} %")
    print("step (s): " + ", ".join(f"{k} {v}" for k, v in breakdown.items() if isinstance(v, float)))
    print(f"FLOPs/step {flops['flops'] / 1e9:.1f} G (batch {flops['batch']}, {flops['padded_frames']} padded frames, "
          f"{flops['output_projection_flops_pct']} % in the output projection); peak fp32 mm "
          f"{mfu_res['peak_gflops']:.1f} GFLOP/s; MFU {mfu_res['mfu_pct']:.1f} % "
          f"(scaled by padded frames {mfu_res['mfu_scaled_by_padded_frames_pct']:.1f} %)")
    print(f"padding per epoch: ours {batching['ours_bucketed']['padding_pct']} %, HF group_by_length at batch "
          f"{batching['hf_group_by_length']['batch_size']}: {batching['hf_group_by_length']['padding_pct']} %")
    for label, runs in decode.items():
        for name, d in runs.items():
            print(f"decode {label} {name:<20} {d['utterances']} utts: {d['utt_per_s']:.1f} utt/s, "
                  f"WER {d['wer']:.1f} %, CER {d['cer']:.1f} % (mean {d['mean_hyp_words']} words/hyp vs "
                  f"{d['mean_ref_words']} in refs)")
    print("targets: " + "; ".join(f"{k} {v['measured']} ({v['target']}): {'met' if v['met'] else 'NOT met'}"
                                  for k, v in targets.items()))
    print(machine.summary_line(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
