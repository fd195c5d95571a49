"""Training checkpoints in safetensors: model, optimizer, scheduler, RNG state and data position.

The checkpoint of a finished run (``finished``) keeps the weights and the state but not the optimizer's moments
(twice the trainable weights, never read again), and replaces every earlier checkpoint of the run.

A checkpoint is a folder ``step-XXXXXXXX`` written under a temporary name and renamed when complete; the
file ``latest`` (itself replaced atomically) names the newest one. A ``kill -9`` at any moment leaves either
the previous checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from asrlab.io import make_readable, write_text


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: str | Path, step: int, model: torch.nn.Module, optimizer, scheduler,
                    trainer_state: dict, keep: int = 2, finished: bool = False) -> Path:
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    if not finished:
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    meta = {"step": step, "finished": finished, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
            "trainer": trainer_state}
    (tmp / "state.json").write_text(json.dumps(meta))
    make_readable(tmp)  # safetensors writes 0600: the group may read a run's checkpoints (issue 18, item 7)
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_text(directory / "latest", final.name)
    for old in sorted(directory.glob("step-*"))[:-(1 if finished else keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    pointer = Path(directory) / "latest"
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore everything in place; returns the trainer state (step, data position, counters)."""
    path = Path(path)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        meta = json.loads((path / "state.json").read_text())
        finished = meta.get("finished", False)  # nothing left to optimise
        optim_state = None if finished else load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))["torch"]
    except Exception as e:  # noqa: BLE001 - truncated or damaged files: SafetensorError, JSON, OSError
        raise RuntimeError(f"{path}: damaged checkpoint ({type(e).__name__}: {e}); delete that folder "
                           f"(rm -r {path}) and rerun the stage; it then trains from the start") from e
    if missing or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not match the model (missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}); was the config changed?")
    if optim_state is not None:
        optimizer.load_state_dict(_optimizer_state(optim_state, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(rng)
    return {"step": meta["step"], **meta["trainer"]}
