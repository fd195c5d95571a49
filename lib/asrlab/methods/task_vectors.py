"""Task vectors (Ilharco et al., 2023) as used by SYN2REAL (Su et al., EMNLP 2024).

A task vector is the per-parameter difference between two models of one architecture,
``τ = θ_finetuned − θ_pretrained``. SYN2REAL builds ``τ = θ(source, real) − θ(source, synthetic)`` —
both fine-tuned from the same base on the same source texts, one with real speech, one with TTS speech — and
adds ``λ·τ`` to a model fine-tuned on the target domain's synthetic speech, to move it towards real speech.

    tau = TaskVector.from_state_dicts(real.state_dict(), syn.state_dict(), metadata={...})
    tau.apply_to(model, 0.3)                                   # θ ← θ + 0.3·τ, in place
    tau.apply_to(model, {"model.encoder.*": 0.5, "*": 0.2})    # per-module λ, first matching pattern wins
    tau.apply_to(model, lam, base=baseline_state)              # θ ← base + λ·τ: a sweep trial, no drift
    avg = TaskVector.merge([tau_a, tau_b], method="mean")      # or "ties", "dare_linear", "dare_ties"

Only floating-point tensors take part (integer/bool buffers such as position ids are skipped). Tied weights
(Whisper ties ``proj_out`` to the decoder's token embedding) appear under several state-dict keys sharing one
storage; :meth:`apply_to` updates each storage once. Vectors combine only when their keys and shapes match;
every mismatch is listed in the error. Saved as safetensors with string metadata (source runs, hashes).
TIES and DARE use peft's merge utilities per tensor.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Iterable, Mapping

import torch
from peft.utils import merge_utils
from safetensors import safe_open
from safetensors.torch import save_file

Lambda = float | Mapping[str, float]


class MismatchError(ValueError):
    """Two models or vectors whose keys, shapes or architectures differ; the message lists every difference."""


def _mismatches(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], names=("a", "b")) -> list[str]:
    out = [f"{k}: only in {names[0]}" for k in sorted(set(a) - set(b))]
    out += [f"{k}: only in {names[1]}" for k in sorted(set(b) - set(a))]
    out += [f"{k}: shape {tuple(a[k].shape)} in {names[0]} vs {tuple(b[k].shape)} in {names[1]}"
            for k in sorted(set(a) & set(b)) if a[k].shape != b[k].shape]
    return out


def _check(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], names=("a", "b"), what="models") -> None:
    problems = _mismatches(a, b, names)
    if problems:
        listing = "\n  ".join(problems)
        raise MismatchError(f"{what} do not match ({len(problems)} difference(s)):\n  {listing}")


def _floats(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}


def _lambda_for(lam: Lambda, key: str) -> float:
    if isinstance(lam, Mapping):
        for pattern, value in lam.items():
            if fnmatch.fnmatch(key, pattern):
                return float(value)
        return 0.0
    return float(lam)


class TaskVector:
    """A mapping parameter name -> float delta tensor, with metadata; immutable in use (operators return new
    vectors)."""

    def __init__(self, deltas: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
        self.deltas = {k: v.detach() for k, v in deltas.items()}
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_state_dicts(cls, finetuned: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor],
                         metadata: Mapping[str, str] | None = None) -> "TaskVector":
        """τ = finetuned − pretrained over every floating-point tensor; raises on any key/shape mismatch."""
        ft, pre = _floats(finetuned), _floats(pretrained)
        _check(ft, pre, ("finetuned", "pretrained"))
        return cls({k: ft[k].float() - pre[k].float() for k in ft}, metadata)

    @classmethod
    def from_models(cls, finetuned: torch.nn.Module, pretrained: torch.nn.Module,
                    metadata: Mapping[str, str] | None = None) -> "TaskVector":
        if type(finetuned) is not type(pretrained):
            raise MismatchError(f"architectures differ: {type(finetuned).__name__} vs {type(pretrained).__name__}")
        return cls.from_state_dicts(finetuned.state_dict(), pretrained.state_dict(), metadata)

    # -- algebra --------------------------------------------------------------------------------------------
    def _zip(self, other: "TaskVector", op) -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        _check(self.deltas, other.deltas, ("left", "right"), "task vectors")
        return TaskVector({k: op(v, other.deltas[k]) for k, v in self.deltas.items()}, self.metadata)

    def __add__(self, other: "TaskVector") -> "TaskVector":
        return self._zip(other, torch.add)

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        return self._zip(other, torch.sub)

    def __neg__(self) -> "TaskVector":
        return self * -1.0

    def __mul__(self, scale: float) -> "TaskVector":
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return TaskVector({k: v * float(scale) for k, v in self.deltas.items()}, self.metadata)

    __rmul__ = __mul__

    def norm(self) -> float:
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in self.deltas.values())))

    def __len__(self) -> int:
        return len(self.deltas)

    @staticmethod
    def merge(vectors: Iterable["TaskVector"], method: str = "mean", density: float = 0.2,
              seed: int = 0) -> "TaskVector":
        """Combine several vectors: ``mean`` (task arithmetic with weights 1/n), ``ties`` (trim to the top
        ``density`` magnitudes, elect signs, disjoint mean), ``dare_linear`` / ``dare_ties`` (random drop with
        keep-probability ``density`` and rescale, seeded)."""
        vectors = list(vectors)
        if not vectors:
            raise ValueError("merge needs at least one task vector")
        for i, v in enumerate(vectors[1:], 1):
            _check(vectors[0].deltas, v.deltas, ("vector 0", f"vector {i}"), "task vectors")
        methods = {"mean": None, "ties": merge_utils.ties, "dare_linear": merge_utils.dare_linear,
                   "dare_ties": merge_utils.dare_ties}
        if method not in methods:
            raise ValueError(f"unknown merge method {method!r}; known: {sorted(methods)}")
        meta = {"merge": method, "density": str(density), "parts": json.dumps([v.metadata for v in vectors])}
        if method == "mean":
            return TaskVector({k: torch.stack([v.deltas[k] for v in vectors]).mean(0) for k in vectors[0].deltas}, meta)
        # dare_linear sums the weighted vectors (weights 1/n: a mean); ties and dare_ties end in a disjoint mean
        weights = torch.full((len(vectors),), 1.0 / len(vectors)) if method == "dare_linear" else torch.ones(len(vectors))
        merged = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for k in vectors[0].deltas:
                merged[k] = methods[method]([v.deltas[k] for v in vectors], weights, density)
        return TaskVector(merged, meta)

    # -- use ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_to(self, model: torch.nn.Module, lam: Lambda = 1.0,
                 base: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
        """θ ← θ + λ·τ in place, or θ ← base + λ·τ when ``base`` (a state dict, e.g. kept in memory for a
        sweep) is given. ``lam`` is a float or {fnmatch pattern: λ} (first match wins, unmatched keys get 0)."""
        state = model.state_dict(keep_vars=True)
        _check(_floats(state), self.deltas, ("model", "task vector"))
        if base is not None:
            _check(_floats(base), self.deltas, ("base", "task vector"))
        seen: set[int] = set()
        for key, delta in self.deltas.items():
            target = state[key]
            ptr = target.data_ptr()
            if ptr in seen:  # tied weights: one storage, several keys
                continue
            seen.add(ptr)
            scale = _lambda_for(lam, key)
            if base is not None:
                target.copy_(base[key] + scale * delta.to(target.dtype))
            elif scale:
                target.add_(delta.to(target.dtype), alpha=scale)
        return model

    # -- files ----------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in self.deltas.items()}, str(tmp), metadata=self.metadata)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TaskVector":
        with safe_open(str(path), framework="pt") as f:
            return cls({k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {})
