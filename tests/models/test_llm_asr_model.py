"""LLM-ASR: projector, text-only loss, training signal, greedy decoding, LoRA, checkpoints, bad inputs."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Qwen2ForCausalLM

from asrlab.models.batch import pad_features, pad_tokens
from asrlab.models.encoder import EncoderConfig
from asrlab.models.llm_asr import LLMASR, LLMASRConfig, LMConfig, LoRASettings, build_lm
from asrlab.models.projector import Projector, stack_frames

os.environ.setdefault("HF_HUB_OFFLINE", "1")

V = 40
LM = LMConfig(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, max_positions=256)
CFG = LLMASRConfig(vocab_size=V, encoder=EncoderConfig(d_model=32, layers=2, heads=2, max_source_positions=64),
                   lm=LM, stack=3)
LORA = LoRASettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LLMASR.from_config(LLMASRConfig(**{**CFG.__dict__, **overrides}))


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    feats, lengths = pad_features([torch.randn(n, 80, generator=g) for n in (40, 64, 23)])
    tokens, token_lengths = pad_tokens([[4, 5, 6], [7, 8, 9, 10, 11], [12]])
    return feats, lengths, tokens, token_lengths


def test_frame_stacking_and_projector_shapes():
    hidden = torch.arange(2 * 7 * 2, dtype=torch.float).reshape(2, 7, 2)
    stacked, lengths = stack_frames(hidden, torch.tensor([7, 4]), 3)
    assert stacked.shape == (2, 3, 6) and lengths.tolist() == [3, 2]
    assert stacked[0, 0].tolist() == hidden[0, :3].flatten().tolist()
    assert stacked[0, 2].tolist() == hidden[0, 6].tolist() + [0.0] * 4  # partial group zero-padded
    out, lengths = Projector(2, 5, stack=3)(hidden, torch.tensor([7, 4]))
    assert out.shape == (2, 3, 5) and lengths.tolist() == [3, 2]


def test_loss_is_on_text_only():
    model = make_model()
    feats, lengths, tokens, token_lengths = make_batch()
    out = model(feats, lengths, tokens, token_lengths)
    audio = [7, 11, 4]  # ceil(ceil(n / 2) / 3) for n = 40, 64, 23
    assert out.logits.shape == (3, 11 + 1 + 5 + 1, V)
    for i, (a, t) in enumerate(zip(audio, [[4, 5, 6], [7, 8, 9, 10, 11], [12]])):
        row = out.labels[i]
        assert (row[: a + 1] == -100).all()  # audio and <s>
        assert row[a + 1: a + 2 + len(t)].tolist() == t + [CFG.eos_id]
        assert (row[a + 2 + len(t):] == -100).all()  # padding
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), out.labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, manual)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_backward_and_the_loss_decreases(lora, few_steps):
    losses, _ = few_steps(make_model(lora=lora), make_batch(),
                          receives_grad=lambda m: [m.encoder.whisper_encoder.conv1.weight])
    assert losses[-1] < losses[0], losses


def test_logits_do_not_depend_on_batch_padding():
    model = make_model().eval()
    utt = torch.randn(23, 80)
    tokens, token_lengths = pad_tokens([[12, 13]])
    alone = model(*pad_features([utt]), tokens, token_lengths)
    feats, lengths = pad_features([utt, torch.randn(64, 80)])
    tok2, len2 = pad_tokens([[12, 13], [7, 8, 9, 10, 11]])
    batched = model(feats, lengths, tok2, len2)
    n = alone.logits.shape[1]
    torch.testing.assert_close(batched.logits[0, :n], alone.logits[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_greedy_generation_matches_no_cache_decoding_and_is_batch_invariant(lora):
    model = make_model(lora=lora).eval()
    feats, lengths, *_ = make_batch()
    hyps = model.generate(feats, lengths, max_new_tokens=6)
    singles = [model.generate(feats[i: i + 1, :, : int(n)], n[None], max_new_tokens=6)[0]
               for i, n in enumerate(lengths)]
    assert hyps == singles
    # Without the cache: re-run the LM on [audio] <s> + prefix at each step, one utterance at a time.
    audio, audio_lengths = model.embed_audio(feats, lengths)
    embed = model.lm.get_input_embeddings()
    for i, hyp in enumerate(hyps):
        prefix = [CFG.bos_id]
        for _ in range(6):
            x = torch.cat([audio[i, : int(audio_lengths[i])], embed(torch.tensor(prefix))])[None]
            nxt = int(model.lm(inputs_embeds=x).logits[0, -1].argmax())
            if nxt == CFG.eos_id:
                break
            prefix.append(nxt)
        assert hyp == [t for t in prefix[1:] if t not in (CFG.pad_id, CFG.bos_id)]
    assert any(hyps)


def test_lora_is_injected_on_the_lm_only_and_freezes_its_base():
    model = make_model(lora=LORA)
    lora_modules = [n for n, m in model.lm.named_modules() if n.endswith(("lora_A", "lora_B"))]
    assert len(lora_modules) == 2 * LM.layers * len(LORA.target_modules)
    assert not any("lora" in n for n, _ in list(model.encoder.named_parameters()) +
                   list(model.projector.named_parameters()))
    h, kv, ffn, r = LM.hidden, LM.kv_heads * (LM.hidden // LM.heads), LM.intermediate, LORA.rank
    per_layer = r * (h + h) + r * (h + kv) + r * (ffn + h)  # q_proj, v_proj, down_proj: r * (in + out)
    lm_trainable = {n: p.numel() for n, p in model.lm.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in lm_trainable)
    assert sum(lm_trainable.values()) == LM.layers * per_layer
    # (Whisper's sinusoidal encoder positions are frozen by design.)
    assert all(p.requires_grad for n, p in model.encoder.named_parameters() if "embed_positions" not in n)
    assert all(p.requires_grad for p in model.projector.parameters())
    # A training step leaves the base LM unchanged.
    base = {n: p.detach().clone() for n, p in model.lm.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(*make_batch()).loss.backward()
    opt.step()
    assert all(torch.equal(p, base[n]) for n, p in model.lm.named_parameters() if not p.requires_grad)


def test_lm_loads_from_a_local_checkpoint(tmp_path):
    lm = build_lm(CFG).eval()
    lm.save_pretrained(tmp_path)
    model = make_model(lm_path=str(tmp_path), lora=LORA).eval()
    assert isinstance(model.lm.get_base_model(), Qwen2ForCausalLM)
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    torch.testing.assert_close(model.lm(input_ids=ids).logits, lm(input_ids=ids).logits)  # LoRA B starts at 0
    again = Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(input_ids=ids).logits, lm(input_ids=ids).logits)


def test_bad_inputs():
    model = make_model()
    feats, lengths, tokens, token_lengths = make_batch()
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.zeros(0, 80, 5), torch.zeros(0, dtype=torch.long), tokens[:0], token_lengths[:0])
    with pytest.raises(ValueError, match="empty batch"):
        model.generate(torch.zeros(0, 80, 5), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="limit of 128 frames"):
        model.generate(torch.randn(1, 80, 129), torch.tensor([129]))
    with pytest.raises(ValueError, match="vocabulary"):
        model(feats, lengths, tokens + V, token_lengths)
    with pytest.raises(ValueError, match="inside the vocabulary"):
        make_model(eos_id=V)
    feats[2, 0, 0] = float("nan")
    assert torch.isnan(model(feats, lengths, tokens, token_lengths).loss)
