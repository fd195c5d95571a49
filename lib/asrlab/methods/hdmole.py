"""HDMoLE (Mu et al., arXiv 2409.19878): a mixture of LoRA experts with hierarchical routing and dynamic
thresholds, for multi-accent LLM-ASR. The paper's equations were not at hand; this is our interpretation.

**Layer.** :class:`MoLELinear` wraps a frozen ``nn.Linear`` ``W`` with E LoRA experts ``(A_e, B_e)`` of rank r:

    y = W x + (α / r) · Σ_e w_e(x) · B_e A_e x            B_e = 0 at init, so the wrapped model starts as the base

**Local router** (one per layer): logits ``l(x) = R x`` per token, ``q = softmax(l)``.

**Global router** (one per model, :class:`AccentRouter`): accent-domain posteriors ``g = softmax(C · pool(h))``
from the mean-pooled encoder states ``h`` of the utterance, trained with an auxiliary cross-entropy on the
accent labels (weight ``accent_loss``). Each expert belongs to a domain, ``d(e) = e mod K`` (E = K · experts
per domain). **Hierarchical routing** combines the two per token:

    p_e ∝ q_e · (β · g_{d(e)} + (1 − β) / K)               β = ``global_mix`` ∈ [0, 1]

so the experts of the utterance's domain are preferred (β·g), while every expert keeps the floor (1 − β)/K and
the local router can still pick experts of other domains. Hierarchy off: ``p = q``.

**Dynamic threshold** (``routing: dynamic``): a learnable scalar θ per layer, threshold ``t = sigmoid(θ) / E``.
Experts with ``p_e < t`` are dropped and the rest renormalised, ``w = p ⊙ m / Σ p ⊙ m``. Since
``max_e p_e ≥ 1/E > t``, the top expert always stays (and the argmax is kept explicitly too). θ is trained by a
**straight-through** estimator: the forward pass uses the hard mask ``m = [p ≥ t]``, the backward pass the
gradient of the sigmoid relaxation ``σ((p − t) / T)`` (temperature ``T``). ``threshold_reg`` adds
``ρ · mean_tokens(Σ_e σ((p_e − t)/T)) / E`` — the soft fraction of active experts — to favour sparsity; without
it the threshold moves only by what the ASR loss asks. **Static top-k** (``routing: topk``) keeps the k largest
``p_e`` instead; ``routing: dense`` keeps all.

**Load balancing** (``load_balance`` weight λ): Switch-style ``λ · E · Σ_e f_e · P_e`` per layer, with ``f_e`` the
fraction of (valid) tokens routed to expert e (hard mask, normalised per token) and ``P_e`` the mean ``p_e``.

With E = 1, hierarchy off and routing dense, the layer is exactly plain LoRA (tested against peft).
Layers are injected by fnmatch patterns on module names (:func:`inject`); adapters (experts, routers,
thresholds) are saved and loaded as safetensors (:func:`save_adapters`, :func:`load_adapters`).
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from asrlab.models.llm_asr import LLMASR


@dataclass
class MoLEConfig:
    experts_per_domain: int = 1
    domains: int = 4                     # K accent domains of the global router
    rank: int = 8
    alpha: float = 16.0
    routing: str = "dynamic"             # dynamic | topk | dense
    top_k: int = 2                       # for routing: topk
    hierarchy: bool = True               # global (accent) router combined with the local ones
    global_mix: float = 0.5              # β: how strongly the domain posterior steers the local routing
    threshold_init: float = -1.0         # θ at init: t = sigmoid(θ) / E
    threshold_temperature: float = 0.02  # T of the sigmoid relaxation (straight-through gradient)
    threshold_reg: float = 0.0           # ρ: weight of the soft active-expert fraction
    load_balance: float = 0.01           # λ; 0 turns it off
    accent_loss: float = 0.5             # weight of the accent classifier's cross-entropy (hierarchy only)
    target_modules: list[str] = field(default_factory=lambda: ["projector.linear1", "projector.linear2"])

    def __post_init__(self) -> None:
        if self.routing not in ("dynamic", "topk", "dense"):
            raise ValueError(f"hdmole routing={self.routing!r}: use 'dynamic', 'topk' or 'dense'")
        if self.experts_per_domain < 1 or self.domains < 1 or self.rank < 1:
            raise ValueError("hdmole: experts_per_domain, domains and rank must be >= 1")
        if not 0.0 <= self.global_mix <= 1.0:
            raise ValueError(f"hdmole global_mix={self.global_mix} must lie in [0, 1]")

    @property
    def experts(self) -> int:
        return self.experts_per_domain * self.domains


class RoutingContext:
    """What every MoLE layer of one model reads for the current batch: the global posteriors (B, K), the
    valid-token mask of the projector's sequence (B, T'), and the auxiliary losses the layers add up."""

    def __init__(self) -> None:
        self.posteriors: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.aux: list[torch.Tensor] = []
        self.record = False              # count active experts per token (evaluation)


class MoLELinear(nn.Module):
    """A frozen ``nn.Linear`` plus a routed mixture of LoRA experts (see the module docstring)."""

    def __init__(self, base: nn.Linear, cfg: MoLEConfig, ctx: RoutingContext):
        super().__init__()
        self.base, self.cfg, self.ctx = base, cfg, ctx
        for p in self.base.parameters():
            p.requires_grad_(False)
        e, r = cfg.experts, cfg.rank
        self.lora_A = nn.Parameter(torch.empty(e, r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(e, base.out_features, r))
        for i in range(e):  # peft's LoRA init: kaiming-uniform A, zero B
            nn.init.kaiming_uniform_(self.lora_A.data[i], a=math.sqrt(5))
        self.router = nn.Linear(base.in_features, e, bias=False)
        nn.init.zeros_(self.router.weight)  # uniform local routing at init
        self.threshold = nn.Parameter(torch.tensor(float(cfg.threshold_init)))
        self.register_buffer("domain_of", torch.arange(e) % cfg.domains, persistent=False)
        self.register_buffer("active_counts", torch.zeros(e + 1, dtype=torch.long), persistent=False)
        self.scaling = cfg.alpha / r

    def routing_probs(self, x: torch.Tensor) -> torch.Tensor:
        """p (…, E): local softmax, combined with the global domain posteriors when the hierarchy is on."""
        q = torch.softmax(self.router(x).float(), dim=-1)
        g = self.ctx.posteriors
        if not self.cfg.hierarchy or g is None:
            return q
        prior = self.cfg.global_mix * g[:, self.domain_of] + (1 - self.cfg.global_mix) / self.cfg.domains  # (B, E)
        prior = prior.view(prior.shape[0], *([1] * (q.dim() - 2)), -1)
        p = q * prior
        return p / p.sum(-1, keepdim=True)

    def gate(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weights w, soft mask or None): the routing rule of ``cfg.routing`` applied to p."""
        e = p.shape[-1]
        if self.cfg.routing == "dense" or e == 1:
            return p, None
        top = nn.functional.one_hot(p.argmax(-1), e).to(p.dtype)
        if self.cfg.routing == "topk":
            k = min(self.cfg.top_k, e)
            hard = torch.zeros_like(p).scatter_(-1, p.topk(k, dim=-1).indices, 1.0)
            w = p * hard
            return w / w.sum(-1, keepdim=True), None
        t = torch.sigmoid(self.threshold) / e
        soft = torch.sigmoid((p - t) / self.cfg.threshold_temperature)
        hard = torch.maximum((p >= t).to(p.dtype), top)
        m = hard + soft - soft.detach()   # straight-through: hard forward, sigmoid gradient
        w = p * m
        return w / w.sum(-1, keepdim=True), soft

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.routing_probs(x)
        w, soft = self.gate(p)
        h = torch.einsum("...i,eri->...er", x, self.lora_A)
        delta = torch.einsum("...er,eor->...o", h * w.to(h.dtype).unsqueeze(-1), self.lora_B)
        active = (w > 0).detach()
        mask = self.ctx.mask if self.ctx.mask is not None and self.ctx.mask.shape == p.shape[:-1] else None
        valid = mask if mask is not None else torch.ones(p.shape[:-1], dtype=torch.bool, device=p.device)
        if self.training:
            self._aux_losses(p, active, soft, valid)
        if self.ctx.record:
            self.active_counts += torch.bincount(active.sum(-1)[valid].flatten(), minlength=p.shape[-1] + 1)
        return self.base(x) + self.scaling * delta

    def _aux_losses(self, p, active, soft, valid) -> None:
        e, n = p.shape[-1], valid.sum().clamp(min=1)
        v = valid.unsqueeze(-1).to(p.dtype)
        if self.cfg.load_balance > 0 and e > 1:
            routed = active.to(p.dtype) / active.sum(-1, keepdim=True)
            f = (routed * v).flatten(0, -2).sum(0) / n
            pm = (p * v).flatten(0, -2).sum(0) / n
            self.ctx.aux.append(self.cfg.load_balance * e * (f * pm).sum())
        if soft is not None and self.cfg.threshold_reg > 0:
            self.ctx.aux.append(self.cfg.threshold_reg * (soft * v).flatten(0, -2).sum() / (n * e))

    def merged_lora_weight(self) -> torch.Tensor:
        """ΔW of one expert alone (E = 1): what a merged plain LoRA would add to W."""
        return self.scaling * self.lora_B[0] @ self.lora_A[0]


class AccentRouter(nn.Module):
    """The global router: accent-domain logits from mean-pooled encoder states."""

    def __init__(self, dim: int, domains: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, domains)

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]).unsqueeze(-1)
        pooled = (hidden.float() * mask).sum(1) / lengths.clamp(min=1)[:, None].float()
        return self.proj(self.norm(pooled))


def inject(model: nn.Module, cfg: MoLEConfig, ctx: RoutingContext) -> list[str]:
    """Replace every ``nn.Linear`` whose qualified name matches one of ``cfg.target_modules`` (fnmatch) by a
    :class:`MoLELinear`; returns the names wrapped. No match is an error (a mistyped pattern)."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(fnmatch.fnmatch(n, pat) for pat in cfg.target_modules)]
    if not names:
        raise ValueError(f"hdmole target_modules {cfg.target_modules} match no nn.Linear of the model")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoLELinear(getattr(parent, child), cfg, ctx))
    return names


def mole_layers(model: nn.Module) -> dict[str, MoLELinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoLELinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The HDMoLE weights of ``model``: experts, local routers and thresholds of every MoLE layer, and the
    accent router (never the wrapped base weights, nor other adapters such as the LM's own LoRA)."""
    prefixes = [f"{n}." for n in mole_layers(model)] + ["accent_router."]
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()
            if any(k.startswith(p) for p in prefixes) and ".base." not in k}


def save_adapters(model: nn.Module, cfg: MoLEConfig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(path), metadata={"hdmole_config": json.dumps(asdict(cfg))})


def load_adapters(model: nn.Module, path: str | Path) -> None:
    """Load saved adapters into a model injected with the same config; every key must match."""
    state = load_file(str(path))
    own = adapter_state(model)
    shapes = [k for k in set(state) & set(own) if state[k].shape != own[k].shape]
    if set(state) != set(own) or shapes:
        raise ValueError(f"{path}: adapter keys differ from the model's (missing {sorted(set(own) - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - set(own))[:5]}, other shape {sorted(shapes)[:5]})")
    model.load_state_dict(state, strict=False)


class AccentLLMASR(LLMASR):
    """The LLM-ASR model for this study: optionally without its encoder (then ``features`` are cached encoder
    states), with the global accent router and the MoLE layers' auxiliary losses added to ``loss``.

    ``accent`` (B,) holds domain ids in ``[0, K)``, or -1 for utterances outside the accent domains (e.g. the
    standard domain), which the accent cross-entropy ignores.
    """

    def __init__(self, base: LLMASR, cfg: MoLEConfig | None, keep_encoder: bool = False):
        super().__init__(base.encoder if keep_encoder else None, base.projector, base.lm,
                         base.pad_id, base.bos_id, base.eos_id)
        self.cfg, self.ctx = cfg, RoutingContext()
        self.encoder_dim = base.encoder.d_model
        self.accent_router = AccentRouter(self.encoder_dim, cfg.domains) if cfg and cfg.hierarchy else None
        self.wrapped = inject(self, cfg, self.ctx) if cfg else []
        self._accent_logits: torch.Tensor | None = None

    @property
    def max_frames(self) -> int | None:
        return self.encoder.max_frames if self.encoder is not None else None

    def embed_audio(self, features: torch.Tensor, feature_lengths: torch.Tensor):
        if self.encoder is not None:
            enc = self.encoder(features, feature_lengths)
            features, feature_lengths = enc.hidden, enc.lengths
        features = features.float()
        if self.accent_router is not None:
            self._accent_logits = self.accent_router(features, feature_lengths)
            self.ctx.posteriors = torch.softmax(self._accent_logits, -1)
        stack = self.projector.stack
        steps = (features.shape[1] + stack - 1) // stack
        self.ctx.mask = torch.arange(steps, device=features.device)[None] < ((feature_lengths + stack - 1) // stack)[:, None]
        return self.projector(features, feature_lengths)

    def forward(self, features, feature_lengths, tokens, token_lengths, accent: torch.Tensor | None = None):
        self.ctx.aux = []
        out = super().forward(features, feature_lengths, tokens, token_lengths)
        loss = out.loss + sum(self.ctx.aux, torch.zeros((), device=out.loss.device))
        if self._accent_logits is not None and accent is not None and bool((accent >= 0).any()):
            loss = loss + self.cfg.accent_loss * nn.functional.cross_entropy(
                self._accent_logits, accent.to(self._accent_logits.device), ignore_index=-1)
        out.loss = loss
        return out

    def active_expert_counts(self) -> dict[str, list[int]]:
        """{layer: histogram of active experts per valid token} since the last reset."""
        return {n: m.active_counts.tolist() for n, m in mole_layers(self).items()}

    def reset_counts(self) -> None:
        for m in mole_layers(self).values():
            m.active_counts.zero_()
