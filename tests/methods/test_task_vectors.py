"""Task-vector algebra on real AED models: exact reconstruction, identity, averaging, merges, mismatches."""

from __future__ import annotations

import pytest
import torch

from asrlab.methods.task_vectors import MismatchError, TaskVector
from asrlab.models.aed import AEDConfig, AEDModel
from asrlab.models.encoder import EncoderConfig

CFG = AEDConfig(vocab_size=40, encoder=EncoderConfig(d_model=32, layers=2, heads=2, max_source_positions=64),
                decoder_layers=1, decoder_heads=2, max_target_positions=16)


def model(seed: int, cfg: AEDConfig = CFG) -> AEDModel:
    torch.manual_seed(seed)
    return AEDModel.from_config(cfg)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_syn_plus_tau_equals_real_exactly_and_lambda_zero_is_identity():
    base, real, syn = model(0), model(1), model(2)
    tau = TaskVector.from_models(real, base) - TaskVector.from_models(syn, base)
    target = model(2)
    tau.apply_to(target, 1.0)
    # fp32 subtraction then addition is exact up to rounding: compare with a tight tolerance
    for k, v in real.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v, rtol=0, atol=1e-6)
    untouched = model(2)
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    tau.apply_to(untouched, 0.0)
    assert states_equal(before, untouched.state_dict())


def test_tied_weights_are_updated_once():
    a, b = model(0), model(1)
    tied = a.whisper.proj_out.weight.data_ptr() == a.whisper.model.decoder.embed_tokens.weight.data_ptr()
    assert tied, "the AED ties its output layer to the token embedding"
    tau = TaskVector.from_models(b, a)
    c = model(0)
    tau.apply_to(c, 1.0)
    torch.testing.assert_close(c.whisper.proj_out.weight, b.whisper.proj_out.weight, rtol=0, atol=1e-6)


def test_apply_with_base_is_a_sweep_trial_without_drift():
    base, ft = model(0), model(1)
    tau = TaskVector.from_models(ft, base)
    keep = {k: v.clone() for k, v in base.state_dict().items()}
    m = model(0)
    for lam in (0.7, 0.1, 0.3):  # trials in any order land at base + λτ
        tau.apply_to(m, lam, base=keep)
    expect = model(0)
    tau.apply_to(expect, 0.3)
    for k, v in expect.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=0, atol=1e-6)


def test_scalar_and_per_module_lambda():
    base, ft = model(0), model(1)
    tau = TaskVector.from_models(ft, base)
    assert (2 * tau).norm() == pytest.approx(2 * tau.norm(), rel=1e-6)
    assert (-tau + tau).norm() == 0.0
    m = model(0)
    tau.apply_to(m, {"whisper.model.encoder.*": 1.0})  # encoder only, everything else λ = 0
    enc = "whisper.model.encoder.layers.0.fc1.weight"
    dec = "whisper.model.decoder.layers.0.fc1.weight"
    torch.testing.assert_close(m.state_dict()[enc], ft.state_dict()[enc], rtol=0, atol=1e-6)
    assert torch.equal(m.state_dict()[dec], base.state_dict()[dec])


def test_mean_of_vectors_and_merges():
    base = model(0)
    taus = [TaskVector.from_models(model(s), base) for s in (1, 2, 3)]
    mean = TaskVector.merge(taus, "mean")
    k = next(iter(mean.deltas))
    torch.testing.assert_close(mean.deltas[k], (taus[0].deltas[k] + taus[1].deltas[k] + taus[2].deltas[k]) / 3)
    ties = TaskVector.merge(taus, "ties", density=0.2)
    kept = (ties.deltas[k] != 0).float().mean().item()
    assert 0 < kept <= 0.6  # trimmed to the top 20 % of each vector, then disjoint merge
    d1, d2 = (TaskVector.merge(taus, "dare_linear", density=0.5, seed=s) for s in (0, 0))
    assert all(torch.equal(d1.deltas[x], d2.deltas[x]) for x in d1.deltas)  # seeded
    with pytest.raises(ValueError, match="unknown merge method"):
        TaskVector.merge(taus, "magic")


def test_non_float_buffers_are_skipped():
    a, b = model(0), model(1)
    a.register_buffer("step_count", torch.tensor(3))
    b.register_buffer("step_count", torch.tensor(5))
    tau = TaskVector.from_models(b, a)
    assert "step_count" not in tau.deltas
    tau.apply_to(a, 1.0)
    assert a.step_count.item() == 3


def test_mismatched_models_list_every_difference():
    other = AEDConfig(vocab_size=40, encoder=EncoderConfig(d_model=32, layers=3, heads=2, max_source_positions=64),
                      decoder_layers=1, decoder_heads=2, max_target_positions=24)
    with pytest.raises(MismatchError) as err:
        TaskVector.from_models(model(0, other), model(1))
    msg = str(err.value)
    assert "whisper.model.encoder.layers.2.fc1.weight: only in finetuned" in msg
    assert "whisper.model.decoder.embed_positions.weight: shape (24, 32)" in msg
    with pytest.raises(MismatchError, match="architectures differ"):
        TaskVector.from_models(model(0), torch.nn.Linear(2, 2))
    tau = TaskVector.from_models(model(1), model(0))
    with pytest.raises(MismatchError, match="only in model"):
        tau.apply_to(model(0, other))


def test_save_and_load_round_trip_with_metadata(tmp_path):
    tau = TaskVector.from_models(model(1), model(0), metadata={"real_run": "abc", "syn_md5": "123"})
    path = tau.save(tmp_path / "tau.safetensors")
    back = TaskVector.load(path)
    assert back.metadata == {"real_run": "abc", "syn_md5": "123"}
    assert all(torch.equal(back.deltas[k], v) for k, v in tau.deltas.items())
