"""HDMoLE layer, routers, thresholds, injection and adapters (asrlab.methods.hdmole), on tiny models."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from asrlab.methods.hdmole import (AccentLLMASR, MoLEConfig, MoLELinear, RoutingContext, adapter_state, inject,
                                   load_adapters, mole_layers, save_adapters)
from asrlab.models.batch import pad_tokens
from asrlab.models.encoder import EncoderConfig
from asrlab.models.llm_asr import LLMASR, LLMASRConfig, LMConfig, LoRASettings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CFG = LLMASRConfig(vocab_size=40, encoder=EncoderConfig(d_model=16, layers=1, heads=2, max_source_positions=64),
                   lm=LMConfig(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, max_positions=256), stack=2,
                   lora=LoRASettings(rank=2, alpha=4, target_modules=("q_proj", "v_proj")))


def tiny_model(cfg: MoLEConfig | None, seed: int = 0) -> AccentLLMASR:
    torch.manual_seed(seed)
    return AccentLLMASR(LLMASR.from_config(CFG), cfg)


def batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([12, 9, 5])
    feats = torch.randn(3, 12, 16, generator=g)
    for i, n in enumerate(lengths):
        feats[i, n:] = 0
    tokens, token_lengths = pad_tokens([[4, 5, 6], [7, 8, 9, 10], [12]])
    return {"features": feats, "feature_lengths": lengths, "tokens": tokens, "token_lengths": token_lengths,
            "accent": torch.tensor([0, 1, -1])}


def randomise(model: nn.Module, seed: int = 3) -> None:
    """Non-zero experts, routers and thresholds (B and the routers start at zero)."""
    g = torch.Generator().manual_seed(seed)
    for m in mole_layers(model).values():
        m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.1
        m.router.weight.data = torch.randn(m.router.weight.shape, generator=g)


def test_one_expert_without_threshold_or_hierarchy_equals_peft_lora():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5))
    lora = nn.Sequential(nn.Linear(6, 5))
    lora.load_state_dict(base.state_dict())
    inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_modules=["0"]), lora)
    cfg = MoLEConfig(experts_per_domain=1, domains=1, rank=3, alpha=6, routing="dense", hierarchy=False,
                     load_balance=0.0, target_modules=["0"])
    inject(base, cfg, RoutingContext())
    layer = base[0]
    torch.manual_seed(1)
    layer.lora_B.data.normal_()
    lora[0].lora_A["default"].weight.data = layer.lora_A.data[0].clone()
    lora[0].lora_B["default"].weight.data = layer.lora_B.data[0].clone()
    x = torch.randn(4, 7, 6)
    torch.testing.assert_close(base(x), lora(x))


def test_base_weights_stay_frozen_and_gradients_reach_routers_and_thresholds():
    model = tiny_model(MoLEConfig(domains=2, experts_per_domain=2, rank=2, threshold_reg=0.0,  # ASR loss alone
                                  target_modules=["projector.linear*"]))
    randomise(model)
    for m in mole_layers(model).values():
        assert not any(p.requires_grad for p in m.base.parameters())
    model(**batch()).loss.backward()
    for name, m in mole_layers(model).items():
        assert m.base.weight.grad is None, name
        for p in (m.lora_A, m.lora_B, m.router.weight, m.threshold):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.accent_router.proj.weight.grad.abs().sum() > 0


def test_active_experts_vary_across_tokens_and_at_least_one_stays():
    ctx = RoutingContext()
    layer = MoLELinear(nn.Linear(8, 8), MoLEConfig(domains=1, experts_per_domain=6, hierarchy=False,
                                                   threshold_init=3.0), ctx)
    torch.manual_seed(0)
    layer.router.weight.data.normal_(0, 2.0)
    w, _ = layer.gate(layer.routing_probs(torch.randn(200, 8)))
    active = (w > 0).sum(-1)
    assert active.min() >= 1 and len(set(active.tolist())) > 2
    torch.testing.assert_close(w.sum(-1), torch.ones(200))
    layer.cfg.routing, layer.cfg.top_k = "topk", 2
    w, _ = layer.gate(layer.routing_probs(torch.randn(50, 8)))
    assert set((w > 0).sum(-1).tolist()) == {2}


def test_hierarchy_prefers_the_domain_experts():
    ctx = RoutingContext()
    layer = MoLELinear(nn.Linear(4, 4), MoLEConfig(domains=2, experts_per_domain=2, global_mix=0.8), ctx)
    ctx.posteriors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = layer.routing_probs(torch.randn(2, 5, 4))  # zero local router: only the global posteriors differ
    assert (p[0, :, [0, 2]] > p[0, :, [1, 3]]).all() and (p[1, :, [1, 3]] > p[1, :, [0, 2]]).all()
    assert (p > 0).all()  # the other domain's experts can still contribute


def test_injection_by_pattern_wraps_exactly_the_named_layers():
    model = tiny_model(None)
    names = inject(model, MoLEConfig(target_modules=["projector.linear2", "lm.*.mlp.up_proj"]), RoutingContext())
    assert names == ["projector.linear2", "lm.base_model.model.model.layers.0.mlp.up_proj"]
    assert set(mole_layers(model)) == set(names)
    assert isinstance(model.projector.linear1, nn.Linear) and not isinstance(model.projector.linear1, MoLELinear)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        inject(model, MoLEConfig(target_modules=["projector.nope"]), RoutingContext())


def test_adapters_round_trip_through_safetensors(tmp_path):
    cfg = MoLEConfig(domains=2, experts_per_domain=2, rank=2, target_modules=["projector.linear*"])
    model = tiny_model(cfg, seed=0)
    randomise(model)
    model.eval()
    with torch.no_grad():
        ref = model(**batch()).logits
    save_adapters(model, cfg, tmp_path / "a.safetensors")
    other = tiny_model(cfg, seed=0)  # same base, fresh adapters
    other.eval()
    assert not torch.allclose(other(**batch()).logits, ref)
    load_adapters(other, tmp_path / "a.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(other(**batch()).logits, ref)
    assert all(not k.startswith("lm.") for k in adapter_state(model))  # the LM's own LoRA is not an adapter
    with pytest.raises(ValueError, match="adapter keys differ"):
        load_adapters(tiny_model(MoLEConfig(domains=2, experts_per_domain=1, target_modules=["projector.linear*"])),
                      tmp_path / "a.safetensors")


def test_active_expert_counts_cover_valid_tokens_only():
    model = tiny_model(MoLEConfig(domains=2, experts_per_domain=2, target_modules=["projector.linear1"]))
    randomise(model)
    model.eval()
    model.ctx.record = True
    b = batch()
    with torch.no_grad():
        model(**b)
    counts = model.active_expert_counts()["projector.linear1"]
    assert sum(counts) == int(((b["feature_lengths"] + 1) // 2).sum()) and counts[0] == 0


def test_selections_hold_out_speechocean_dev_speakers_and_sample_per_domain():
    from asrlab.stages.hdmole import split_rows

    rows = [{"id": f"so-{s}-{i}", "text": "a b", "accent": "mandarin", "corpus": "speechocean762",
             "pool": "speechocean762", "split": split, "speaker": f"{s:02d}"}
            for split in ("train", "test") for s in range(6) for i in range(5)]
    rows += [{"id": f"acc-{split}-{i}", "text": "a b", "accent": "germanic", "corpus": "slurp", "pool": "accents",
              "split": split, "speaker": "mb-de2-en"} for split in ("train", "dev", "test") for i in range(8)]
    rows += [{"id": f"std-{i}", "text": "a b", "accent": "native", "corpus": "slurp", "pool": "real_proxy",
              "split": "test", "speaker": "mb-us1"} for i in range(8)]
    p = {"domains": ["germanic", "mandarin"],
         "data": {"accent_pools": ["accents", "speechocean762"], "standard_pool": "real_proxy", "dev_speakers": 2,
                  "train_per_domain": 100, "dev_per_domain": 100, "test_per_domain": 6, "seed": 0}}
    sel = split_rows(rows, p)
    dev = {r["speaker"] for r in sel["dev/mandarin"]}
    train = {r["speaker"] for r in sel["train/mandarin"]}
    assert len(dev) == 2 and not dev & train and len(train) == 4
    assert all(r["split"] == "test" for r in sel["test/mandarin"]) and len(sel["test/mandarin"]) == 6
    assert len(sel["test/standard"]) == 6 and {r["pool"] for r in sel["test/standard"]} == {"real_proxy"}
    assert split_rows(rows, p) == sel  # seeded
    with pytest.raises(ValueError, match="no utterance with accent 'romance'"):
        split_rows(rows, {**p, "domains": ["romance"]})
