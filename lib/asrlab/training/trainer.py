"""The one trainer: AdamW with warmup and cosine decay, gradient clipping, length-bucketed batches under a
frame budget, optional SpecAugment, freezing by name pattern, atomic resumable checkpoints, NaN/inf guards,
and DDP under ``torchrun`` (gloo on CPU, nccl on GPU) with no change to the calling code.

The model is any ``nn.Module`` whose ``forward(**batch)`` returns an object or mapping with ``loss``.
Batches come from ``collate(indices) -> dict of tensors``; which utterances go together is decided by
:func:`asrlab.training.batching.bucket_batches` from their lengths alone, so a resumed run, or a run over
N processes, sees the same batches in the same order.
"""

from __future__ import annotations

import fnmatch
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from asrlab.params import fields
from asrlab.training.batching import bucket_batches, spec_augment
from asrlab.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


@dataclass
class TrainConfig:
    max_steps: int
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05        # cosine decays to lr × this
    grad_clip: float = 1.0
    max_frames: int = 16000           # padded frames per batch, per process
    max_batch: int | None = None
    seed: int = 0
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    extendable: bool = False          # the final checkpoint keeps the optimizer: a later call with a larger
                                      # max_steps continues the run (efin's budgets); else only weights and state
    max_bad_steps: int = 5            # consecutive non-finite losses before aborting
    freeze: list[str] = field(default_factory=list)     # fnmatch patterns on parameter names
    unfreeze: list[str] = field(default_factory=list)   # applied after freeze
    lr_scales: dict[str, float] = field(default_factory=dict)  # {fnmatch pattern: lr factor}, e.g. a new head
    precision: str = "fp32"           # "bf16": forward under bfloat16 autocast (fp32 weights, optimizer, loss)
    specaugment: dict | None = None   # kwargs of batching.spec_augment, or None
    log_every: int = 25

    @classmethod
    def from_params(cls, p: dict) -> "TrainConfig":
        unknown = set(p) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown training parameter(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**p)

    def __post_init__(self):
        check_precision(self.precision)


TRAIN = fields(TrainConfig)  # a `train:` section of params.yaml: any TrainConfig field

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {list(PRECISIONS)}")
    return precision


def autocast(precision: str, device: torch.device | str = "cpu"):
    """The forward pass's numerics: fp32, or bfloat16 autocast — matmuls and convolutions in bf16 (AMX on
    recent x86 CPUs, tensor cores on GPUs), reductions, norms and losses in fp32 by torch's autocast policy."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=check_precision(precision) == "bf16")


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups of the trainable parameters: weight decay on matrices only, and the learning rate scaled
    by the first ``cfg.lr_scales`` pattern a name matches (a freshly initialised head on a pretrained model
    learns at a higher rate than the weights it sits on). The schedule scales every group alike."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((f for pat, f in cfg.lr_scales.items() if fnmatch.fnmatch(name, pat)), 1.0)
        groups.setdefault((cfg.weight_decay if p.ndim >= 2 else 0.0, scale), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr": cfg.lr * scale} for (wd, scale), ps in groups.items()]


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def apply_freezing(model: torch.nn.Module, freeze: list[str], unfreeze: list[str] = ()) -> str:
    """Set requires_grad by name pattern; returns a report of trainable parameters."""
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatch(name, pat) for pat in freeze):
            p.requires_grad_(False)
        if any(fnmatch.fnmatch(name, pat) for pat in unfreeze):
            p.requires_grad_(True)
    groups: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        g = groups.setdefault(name.split(".")[0], [0, 0])
        g[0] += p.numel()
        g[1] += p.numel() if p.requires_grad else 0
    total = sum(g[0] for g in groups.values())
    trainable = sum(g[1] for g in groups.values())
    lines = [f"{'module':<24}{'params':>12}{'trainable':>12}"]
    lines += [f"{k:<24}{n:>12,}{t:>12,}" for k, (n, t) in groups.items()]
    lines.append(f"{'total':<24}{total:>12,}{trainable:>12,}  ({100 * trainable / max(total, 1):.2f} % trainable)")
    if trainable == 0:
        raise ValueError("no trainable parameters left after freezing: check the freeze patterns")
    return "\n".join(lines)


def warmup_cosine(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def train(model: torch.nn.Module, lengths: list[int], collate: Callable[[list[int]], dict], cfg: TrainConfig,
          ckpt_dir: str | os.PathLike, on_log: Callable[[int, dict], None] | None = None,
          on_step: Callable[[int], None] | None = None, desc: str = "train") -> dict:
    """Train ``model`` in place for ``cfg.max_steps`` optimizer updates, resuming from ``ckpt_dir`` if it
    holds a checkpoint. Returns a summary (steps, skipped steps, last loss, resumed_from)."""
    rank, world = distributed()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model.to(device)
    report = apply_freezing(model, cfg.freeze, cfg.unfreeze)
    if rank == 0:
        print(report)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg))

    state = {"epoch": 0, "batch": 0, "bad_in_a_row": 0, "skipped": 0, "last_loss": float("nan")}
    step, resumed_from = 0, None
    ckpt = latest_checkpoint(ckpt_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        step, resumed_from = state.pop("step"), str(ckpt)
        if rank == 0:
            print(f"[{desc}] resumed from {ckpt} at step {step}")
    ddp = DistributedDataParallel(model) if world > 1 else model

    def epoch_batches(epoch: int) -> list[list[int]]:
        batches = bucket_batches(lengths, cfg.max_frames, cfg.seed, epoch, cfg.max_batch)
        n = len(batches) // world * world  # every rank takes the same number of batches
        if n == 0:
            raise ValueError(f"fewer batches ({len(batches)}) than processes ({world})")
        return batches[rank:n:world]

    batches = epoch_batches(state["epoch"])
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, unit="step", disable=rank != 0, mininterval=2)
    ddp.train()
    loss_value = state.get("last_loss", float("nan"))  # a run resumed at max_steps still reports its loss
    while step < cfg.max_steps:
        if state["batch"] >= len(batches):
            state["epoch"] += 1
            state["batch"] = 0
            batches = epoch_batches(state["epoch"])
        batch = collate(batches[state["batch"]])
        state["batch"] += 1
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if cfg.specaugment and "features" in batch:
            spec_augment(batch["features"], batch["feature_lengths"], **cfg.specaugment)
        with autocast(cfg.precision, device):
            out = ddp(**batch)
        loss = out["loss"] if isinstance(out, Mapping) else out.loss
        loss = loss.float()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        bad = torch.tensor([float(not (torch.isfinite(loss) and torch.isfinite(grad_norm)))])
        if world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # all ranks skip together
        if bad.item():
            optimizer.zero_grad(set_to_none=True)
            state["bad_in_a_row"] += 1
            state["skipped"] += 1
            warnings.warn(f"[{desc}] step {step}: non-finite loss/gradient ({loss.item()}), update skipped "
                          f"({state['bad_in_a_row']}/{cfg.max_bad_steps} in a row)", stacklevel=2)
            if state["bad_in_a_row"] >= cfg.max_bad_steps:
                raise NonFiniteLoss(f"[{desc}] {state['bad_in_a_row']} consecutive non-finite losses at step {step}: "
                                    "lower the learning rate, check the inputs for NaN, or raise max_bad_steps")
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["bad_in_a_row"] = 0
        step += 1
        loss_value = state["last_loss"] = loss.item()
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if on_log is not None and rank == 0:
                on_log(step, {"train_loss": loss_value, "lr": scheduler.get_last_lr()[0]})
        if rank == 0 and (step % cfg.ckpt_every == 0 or step == cfg.max_steps):
            save_checkpoint(ckpt_dir, step, model, optimizer, scheduler, state, cfg.keep_checkpoints,
                            finished=step == cfg.max_steps and not cfg.extendable)
        if on_step is not None:
            on_step(step)
    bar.close()
    if world > 1:
        dist.barrier()
    return {"steps": step, "skipped_steps": state["skipped"], "last_loss": loss_value, "resumed_from": resumed_from,
            "world_size": world}
