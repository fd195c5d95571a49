"""EFIN (Mu et al., "Efficient Scaling for LLM-based ASR", ASRU 2025): training strategies as data, FLOPs
accounting and the scaling law error(C) = A·C^(−α) + E∞.

Interpretation here (the paper's terms → asrlab):
- *pretrained speech encoder*: the base AED's encoder (trained with joint CTC/attention on general text);
  *pretrained LLM*: the base LM (``models/base_lm``); the *target data*: SLURP speech (synthetic and
  real-proxy pools, train split).
- A strategy is a list of :class:`Stage` s, each naming what is trainable (``encoder``, ``projector``,
  ``lora``, ``ctc_head``), its objective (``ctc``: the encoder's own CTC head, the base AED's character CTC
  — "its original objective" without the attention decoder; ``llm``: the LLM-ASR next-token loss) and its
  step count. The last stage has no steps of its own: the compute budgets set how long it runs.
- *Joint post-training*: encoder + projector + LoRA together from the start. *Projector-only*: the base
  encoder (not trained for the task) and the LM frozen. *Two-stage*: projector, then joint. *EFIN*:
  (1) encoder + CTC head on the target speech, (2) projector with encoder and LM frozen, (3) projector + LoRA,
  the encoder frozen unless ``efin.stage3_train_encoder``.

FLOPs are what the step executes, counted by :class:`torch.utils.flop_counter.FlopCounterMode` around the
trainer's loop (forward, and the backward that autograd runs: frozen layers after the first trainable one
pay their input-gradient matmuls, never weight gradients). Evaluation runs outside the counter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.optimize import curve_fit
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from asrlab.models.ctc import ctc_loss
from asrlab.models.llm_asr import LLMASR

# parameter-name patterns (fnmatch, as the trainer's freeze/unfreeze) of each trainable group
GROUPS: dict[str, tuple[str, ...]] = {
    "encoder": ("llm.encoder.*",),
    "projector": ("llm.projector.*",),
    "lora": ("llm.lm.*lora_*",),
    "ctc_head": ("ctc_head.*",),
}
OBJECTIVES = ("ctc", "llm")


@dataclass(frozen=True)
class Stage:
    name: str
    objective: str                 # "ctc" | "llm"
    trainable: tuple[str, ...]     # keys of GROUPS
    steps: int | None = None       # None: the scaled (last) stage, run to each budget

    def unfreeze(self) -> list[str]:
        return [pat for g in self.trainable for pat in GROUPS[g]]


@dataclass(frozen=True)
class Strategy:
    name: str
    stages: tuple[Stage, ...]
    seeds: tuple[int, ...]

    @property
    def prefix(self) -> tuple[Stage, ...]:
        """The fixed-length stages before the scaled one."""
        return self.stages[:-1]


def parse_strategies(p: dict) -> list[Strategy]:
    """Strategies from ``params.efin.strategies`` ({name: {seeds, stages: [{name, objective, train, steps}]}});
    ``stage3_train_encoder`` adds the encoder to EFIN's last stage. Bad input names the param."""
    out = []
    for name, spec in p["strategies"].items():
        where = f"efin.strategies.{name}"
        stages = []
        for i, s in enumerate(spec["stages"]):
            unknown = set(s["train"]) - set(GROUPS)
            if unknown:
                raise ValueError(f"{where}.stages[{i}].train: unknown group(s) {sorted(unknown)}; known: {sorted(GROUPS)}")
            if s["objective"] not in OBJECTIVES:
                raise ValueError(f"{where}.stages[{i}].objective = {s['objective']!r}; known: {OBJECTIVES}")
            last = i == len(spec["stages"]) - 1
            if last != (s.get("steps") is None):
                raise ValueError(f"{where}.stages[{i}].steps: every stage but the last needs steps; the last has "
                                 "none (efin.budget_steps sets its length)")
            train = tuple(s["train"])
            if last and name == "efin" and p.get("stage3_train_encoder") and "encoder" not in train:
                train = ("encoder",) + train
            stages.append(Stage(s["name"], s["objective"], train, s.get("steps")))
        if stages[-1].objective != "llm":
            raise ValueError(f"{where}: the last stage must train the LLM-ASR objective ('llm'), it is evaluated")
        out.append(Strategy(name, tuple(stages), tuple(spec["seeds"])))
    return out


class EFINModel(nn.Module):
    """The LLM-ASR model plus the encoder's CTC head; ``objective`` picks the loss the trainer sees."""

    def __init__(self, llm: LLMASR, ctc_head: nn.Linear, blank_id: int = 0, char_units: bool = True):
        super().__init__()
        self.llm, self.ctc_head, self.blank_id, self.char_units = llm, ctc_head, blank_id, char_units
        self.objective = "llm"

    def forward(self, features, feature_lengths, tokens, token_lengths, ctc_tokens=None, ctc_token_lengths=None):
        if self.objective == "llm":
            return self.llm(features, feature_lengths, tokens, token_lengths)
        if self.char_units:  # the AED's CTC head is over characters (asrlab's base AED) or its tokens (Whisper)
            if ctc_tokens is None:
                raise ValueError("a character CTC head needs character targets (SpeechData(char_targets=True))")
            tokens, token_lengths = ctc_tokens, ctc_token_lengths
        enc = self.llm.encoder(features, feature_lengths)
        return {"loss": ctc_loss(self.ctc_head(enc.hidden), enc.lengths, tokens, token_lengths, self.blank_id)}


def trainable_names(model: nn.Module, stage: Stage) -> set[str]:
    """Parameter names the trainer will update in ``stage`` (its freeze ["*"] / unfreeze rules)."""
    from asrlab.training.trainer import apply_freezing
    apply_freezing(model, ["*"], stage.unfreeze())
    return {n for n, p in model.named_parameters() if p.requires_grad}


# -- FLOPs --------------------------------------------------------------------------------------------------
class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: every count goes to "Global", no module hooks."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        return None


class FlopCounter(FlopCounterMode):
    """``FlopCounterMode`` (same dispatch, same FLOP formulas) without the per-module breakdown: its module
    hooks on every call of every submodule cost more than a small model's step; only the total is needed."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _GlobalOnly()


def flops_of(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) that ``fn()`` executes: matmuls, convolutions, attention, forward and backward."""
    with FlopCounter() as counter:
        fn()
    return counter.get_total_flops()


# -- the scaling law ----------------------------------------------------------------------------------------
def power_law(c: np.ndarray, a: float, alpha: float, e_inf: float) -> np.ndarray:
    return a * np.power(c, -alpha) + e_inf


@dataclass
class Fit:
    a: float          # in units of c0: error = a·(C / c0)^(−α) + E∞
    alpha: float
    e_inf: float
    c0: float         # FLOPs that C is measured in (the smallest fitted compute), for a well-scaled fit
    r2: float
    points: int

    def predict(self, flops) -> np.ndarray:
        return power_law(np.asarray(flops, dtype=float) / self.c0, self.a, self.alpha, self.e_inf)

    def inverse(self, error: float) -> float:
        """The compute at which the fitted curve reaches ``error`` (inf when at or below E∞)."""
        if error <= self.e_inf or self.a <= 0 or self.alpha <= 0:
            return math.inf
        return self.c0 * ((error - self.e_inf) / self.a) ** (-1.0 / self.alpha)


def fit_scaling_law(flops, errors) -> Fit:
    """Least-squares fit of error(C) = A·C^(−α) + E∞ with A ≥ 0, α ∈ [0, 3], 0 ≤ E∞ ≤ min(error); R² on the
    fitted points. C is scaled by its minimum, so A reads in those units (``Fit.c0``). NaN constants when the
    optimiser does not converge."""
    c, e = np.asarray(flops, dtype=float), np.asarray(errors, dtype=float)
    if len(c) < 3 or len(np.unique(c)) < 3:
        raise ValueError(f"a 3-constant scaling law needs at least 3 distinct compute budgets, got {len(np.unique(c))}")
    c0 = float(c.min())
    x = c / c0
    lo = float(e.min())
    p0 = (max(float(e.max()) - lo, 1e-3), 0.5, 0.5 * lo)
    try:
        (a, alpha, e_inf), _ = curve_fit(power_law, x, e, p0=p0, bounds=([0.0, 0.0, 0.0], [np.inf, 3.0, lo + 1e-9]),
                                         maxfev=20000)
    except RuntimeError:  # no convergence: reported as NaN constants, never replaced by a made-up curve
        return Fit(math.nan, math.nan, math.nan, c0, math.nan, len(c))
    resid = e - power_law(x, a, alpha, e_inf)
    ss_tot = float(((e - e.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return Fit(float(a), float(alpha), float(e_inf), c0, r2, len(c))


# -- equal-compute comparisons ------------------------------------------------------------------------------
def interp_loglog(flops, errors, at: float) -> float:
    """Error at compute ``at`` by linear interpolation in log C between measured points (NaN outside them)."""
    c, e = np.asarray(flops, dtype=float), np.asarray(errors, dtype=float)
    order = np.argsort(c)
    c, e = c[order], e[order]
    if not c[0] <= at <= c[-1]:
        return float("nan")
    return float(np.interp(math.log(at), np.log(c), e))


def flops_to_reach(flops, errors, target: float) -> float:
    """The least compute at which a measured curve first reaches ``target`` error (log-C interpolation between
    the bracketing points); inf if it never does."""
    c, e = np.asarray(flops, dtype=float), np.asarray(errors, dtype=float)
    order = np.argsort(c)
    c, e = c[order], e[order]
    if e[0] <= target:
        return float(c[0])
    for i in range(1, len(c)):
        if e[i] <= target:
            t = (e[i - 1] - target) / (e[i - 1] - e[i])
            return float(math.exp(math.log(c[i - 1]) + t * (math.log(c[i]) - math.log(c[i - 1]))))
    return math.inf
