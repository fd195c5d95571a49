"""The efin study: what each stage trains, FLOP counts against analytic ones, the scaling-law fit, and a run
interrupted between stages resuming in the right stage with the same FLOPs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from asrlab.methods.efin import (EFINModel, GROUPS, fit_scaling_law, flops_of, flops_to_reach, interp_loglog,
                                 parse_strategies, trainable_names)
from asrlab.models.encoder import EncoderConfig
from asrlab.models.llm_asr import LLMASR, LLMASRConfig, LMConfig, LoRASettings
from asrlab.stages import efin as efin_stage
from asrlab.params import load_yaml  # YAML 1.2 floats, as DVC reads params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_yaml(ROOT / "params.yaml")["efin"]
CHARS = 8


def tiny_model(seed: int = 0) -> EFINModel:
    torch.manual_seed(seed)
    cfg = LLMASRConfig(vocab_size=24, encoder=EncoderConfig(d_model=16, layers=1, heads=2, ffn_dim=32,
                                                            max_source_positions=64, conv1_stride=2),
                       lm=LMConfig(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32), stack=2,
                       lora=LoRASettings(rank=2, alpha=4))
    llm = LLMASR.from_config(cfg)
    return EFINModel(llm, nn.Linear(16, CHARS))


def groups_of(names: set[str]) -> set[str]:
    """Which GROUPS have a trainable parameter; a LoRA-wrapped base weight must never be in ``names``."""
    import fnmatch
    assert not any(".base_layer." in n for n in names), "a frozen LM base weight is trainable"
    return {g for g, pats in GROUPS.items() if any(fnmatch.fnmatch(n, p) for n in names for p in pats)}


@pytest.mark.parametrize("stage3_encoder", [False, True])
def test_each_stage_of_each_strategy_trains_only_its_parts(stage3_encoder):
    strategies = {s.name: s for s in parse_strategies({**PARAMS, "stage3_train_encoder": stage3_encoder})}
    assert {"joint", "projector_only", "two_stage", "efin"} <= set(strategies)
    model = tiny_model()
    got = {name: [groups_of(trainable_names(model, st)) for st in s.stages] for name, s in strategies.items()}
    assert got["joint"] == [{"encoder", "projector", "lora"}]
    assert got["projector_only"] == [{"projector"}]
    assert got["two_stage"] == [{"projector"}, {"encoder", "projector", "lora"}]
    last = {"projector", "lora"} | ({"encoder"} if stage3_encoder else set())
    assert got["efin"] == [{"encoder", "ctc_head"}, {"projector"}, last]
    # the LM's base weights stay frozen everywhere
    assert not any(n.startswith("llm.lm.") and "lora_" not in n for n in trainable_names(model, strategies["joint"].stages[0]))


def test_bad_strategy_names_the_param():
    bad = copy.deepcopy(PARAMS)
    bad["strategies"]["joint"]["stages"][0]["train"] = ["encoder", "decoder"]
    with pytest.raises(ValueError, match="efin.strategies.joint.stages\\[0\\].train"):
        parse_strategies(bad)
    bad = copy.deepcopy(PARAMS)
    bad["strategies"]["efin"]["stages"][1].pop("steps")
    with pytest.raises(ValueError, match="steps"):
        parse_strategies(bad)


def test_flop_count_of_a_linear_layer_matches_the_analytic_count():
    b, i, o = 5, 12, 7
    layer = nn.Linear(i, o)
    x = torch.randn(b, i)
    assert flops_of(lambda: layer(x)) == 2 * b * i * o
    # backward of a trainable layer on an input that needs no gradient: the weight gradient only
    assert flops_of(lambda: layer(x).sum().backward()) == 2 * 2 * b * i * o
    # frozen weight, input that needs a gradient: the input gradient only — frozen parts still cost
    layer.requires_grad_(False)
    xg = torch.randn(b, i, requires_grad=True)
    assert flops_of(lambda: layer(xg).sum().backward()) == 2 * 2 * b * i * o
    # a conv1d: 2 · out channels · in channels · kernel · output frames · batch
    conv = nn.Conv1d(3, 4, kernel_size=3, padding=1)
    assert flops_of(lambda: conv(torch.randn(2, 3, 10))) == 2 * 4 * 3 * 3 * 10 * 2


def test_fit_recovers_known_constants():
    c = np.geomspace(1e12, 1e15, 8)
    a, alpha, e_inf = 40.0, 0.35, 12.0
    err = a * (c / c.min()) ** -alpha + e_inf
    fit = fit_scaling_law(c, err)
    assert fit.alpha == pytest.approx(alpha, rel=1e-3)
    assert fit.e_inf == pytest.approx(e_inf, abs=1e-2)
    assert fit.a == pytest.approx(a, rel=1e-3)
    assert fit.r2 > 0.9999
    assert fit.predict(1e16) == pytest.approx(a * 1e4 ** -alpha + e_inf, rel=1e-4)
    assert fit.inverse(float(fit.predict(3e13))) == pytest.approx(3e13, rel=1e-4)
    with pytest.raises(ValueError, match="3 distinct"):
        fit_scaling_law([1, 1, 2], [3, 3, 2])


def test_equal_compute_helpers():
    c, e = [1e3, 1e4, 1e5], [80.0, 60.0, 40.0]
    assert interp_loglog(c, e, 10 ** 3.5) == pytest.approx(70.0)
    assert np.isnan(interp_loglog(c, e, 1e6))
    assert flops_to_reach(c, e, 50.0) == pytest.approx(10 ** 4.5)
    assert flops_to_reach(c, e, 10.0) == np.inf


# -- resume between stages ----------------------------------------------------------------------------------
class FakeData:
    """Random utterances in SpeechData's shape; ``fail_after`` collates raise KeyboardInterrupt (a kill)."""

    def __init__(self, n: int = 12):
        g = torch.Generator().manual_seed(0)
        self.features = [torch.randn(int(f), 80, generator=g) for f in torch.randint(20, 40, (n,), generator=g)]
        self.tokens = [torch.randint(3, 24, (int(k),), generator=g).tolist() for k in torch.randint(2, 5, (n,), generator=g)]
        self.chars = [torch.randint(1, CHARS, (3,), generator=g).tolist() for _ in range(n)]
        self.lengths = [f.shape[0] for f in self.features]
        self.collated, self.fail_after = 0, None

    def collate(self, idx):
        from asrlab.models.batch import pad_features, pad_tokens
        self.collated += 1
        if self.fail_after is not None and self.collated > self.fail_after:
            raise KeyboardInterrupt
        feats, lens = pad_features([self.features[i] for i in idx])
        toks, tok_lens = pad_tokens([self.tokens[i] for i in idx])
        chars, char_lens = pad_tokens([self.chars[i] for i in idx])
        return {"features": feats, "feature_lengths": lens, "tokens": toks, "token_lengths": tok_lens,
                "ctc_tokens": chars, "ctc_token_lengths": char_lens}


def fake_study(tmp_path: Path) -> efin_stage.Study:
    study = object.__new__(efin_stage.Study)
    study.p = {**copy.deepcopy(PARAMS), "budget_steps": [2, 4, 6, 8], "heldout_steps": 10,
               "train": {"lr": 0.001, "warmup_steps": 1, "min_lr_ratio": 1.0, "max_frames": 120, "ckpt_every": 2}}
    study.p["strategies"]["efin"]["stages"][0]["steps"] = 3
    study.p["strategies"]["efin"]["stages"][1]["steps"] = 4
    study.strategies = parse_strategies(study.p)
    study.train_data = FakeData()
    study.inputs_hash = "test"
    study.ckpt_root = tmp_path / "ckpt"
    study.build = lambda seed: tiny_model(seed)
    study.evaluate = lambda model: {"slurp_test_cer": 50.0, "slurp_test_wer": 90.0}
    return study


def test_a_run_interrupted_between_stages_resumes_in_the_right_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(efin_stage.tracking, "run", lambda *a, **k: __import__("contextlib").nullcontext())
    monkeypatch.setattr(efin_stage.mlflow, "log_metrics", lambda *a, **k: None)
    # uninterrupted reference
    ref = fake_study(tmp_path / "ref")
    efin = {s.name: s for s in ref.strategies}["efin"]
    expected = ref.run(efin, 0, [2, 4])
    calls_ref = ref.train_data.collated
    # killed after stage 1 (3 steps) and 3 steps into stage 2 (its checkpoint at step 2)
    study = fake_study(tmp_path / "cut")
    study.train_data.fail_after = 3 + 3
    with pytest.raises(KeyboardInterrupt):
        study.run(efin, 0, [2, 4])
    s1, s2 = (study.stage_dir(efin, i, 0) for i in (0, 1))
    assert (s1 / "latest").read_text().strip() == "step-00000003"  # stage 1 finished
    assert (s2 / "latest").read_text().strip() == "step-00000002"  # stage 2 checkpointed mid-way
    assert not list(study.stage_dir(efin, 2, 0).glob("evals-*.jsonl"))
    study.train_data.fail_after, study.train_data.collated = None, 0
    got = study.run(efin, 0, [2, 4])
    # stage 1 is not retrained; stage 2 resumes at step 2: 2 + 4 collates instead of 3 + 4 + 4
    assert study.train_data.collated == calls_ref - 3 - 2
    assert [r["flops"] for r in got] == pytest.approx([r["flops"] for r in expected])
    assert got[0]["stage_flops"] == pytest.approx(expected[0]["stage_flops"])
    # stage 1 (encoder + CTC) and stage 2 (projector) are counted; done evaluations are not redone
    assert all(v > 0 for v in got[0]["stage_flops"].values())
    study.train_data.collated = 0
    assert study.run(efin, 0, [2, 4]) == got and study.train_data.collated == 0
