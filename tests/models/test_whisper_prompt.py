"""A pretrained Whisper's conventions in the AED: prompt from the generation config, suppress lists, the
30-s window, and the cached-encoder path of the LLM-ASR."""

from __future__ import annotations

import os

import torch
from transformers import GenerationConfig

from asrlab.decode import WHISPER_FLOOR_BELOW_MAX, pad_to_window
from asrlab.models.aed import AEDConfig, AEDModel
from asrlab.models.batch import pad_features, pad_tokens
from asrlab.models.encoder import CachedEncoder, EncoderConfig
from asrlab.models.llm_asr import LLMASR, LLMASRConfig, LMConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

V = 40
SOT, NOTS, EOT = 30, 31, 2  # stand-ins for <|startoftranscript|>, <|notimestamps|>, <|endoftext|>


def whisper_like(seed=0) -> AEDModel:
    """A tiny random AED whose generation config looks like a converted Whisper .en checkpoint's."""
    torch.manual_seed(seed)
    cfg = AEDConfig(vocab_size=V, encoder=EncoderConfig(d_model=32, layers=1, heads=2, max_source_positions=64),
                    decoder_layers=1, decoder_heads=2, max_target_positions=16, bos_id=SOT, eos_id=EOT, pad_id=EOT)
    model = AEDModel.from_config(cfg)
    model.whisper.generation_config = GenerationConfig(
        decoder_start_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT, no_timestamps_token_id=NOTS,
        is_multilingual=False, suppress_tokens=[5, 6], begin_suppress_tokens=[7])
    return model.eval()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    feats, lengths = pad_features([torch.randn(n, 80, generator=g) for n in (40, 64)])
    tokens, token_lengths = pad_tokens([[4, 8, 9], [10, 11, 12, 13]])
    return feats, lengths, tokens, token_lengths


def test_prompt_comes_from_the_generation_config():
    assert whisper_like().prompt_ids == [SOT, NOTS]
    multi = whisper_like()
    gen = multi.whisper.generation_config
    gen.is_multilingual, gen.lang_to_id, gen.task_to_id = True, {"<|en|>": 20}, {"transcribe": 21}
    assert multi.prompt_ids == [SOT, 20, 21, NOTS]
    scratch = AEDModel.from_config(AEDConfig(vocab_size=V, encoder=EncoderConfig(d_model=32, layers=1, heads=2)))
    assert scratch.prompt_ids == [scratch.config.decoder_start_token_id]


def test_training_loss_sees_the_prompt_then_the_text():
    """The loss equals cross-entropy of t1..tn </s> given ``prompt t1..t(n-1)``, computed by hand."""
    model = whisper_like()
    model.label_smoothing = 0.0
    feats, lengths, tokens, token_lengths = batch()
    out = model(feats[:1], lengths[:1], tokens[:1, :3], token_lengths[:1])
    enc = model.encode(feats[:1], lengths[:1])
    dec_in = torch.tensor([[SOT, NOTS, 4, 8, 9]])
    logits = model._decode_step(enc, dec_in).logits
    expected = torch.nn.functional.cross_entropy(logits[0, 1:], torch.tensor([4, 8, 9, EOT]))
    assert torch.allclose(out.att_loss, expected, atol=1e-5)


def test_generate_starts_after_the_prompt_and_respects_suppress_lists():
    model = whisper_like()
    # Make the suppressed ids the most likely everywhere: greedy must still never pick them.
    with torch.no_grad():
        model.whisper.proj_out.weight[[5, 6, 7]] *= 0
        model.whisper.proj_out.weight[[5, 6, 7]] += 50.0
    feats, lengths, _, _ = batch()
    for hyp in model.generate(feats, lengths, max_new_tokens=6):
        assert not {5, 6} & set(hyp) and SOT not in hyp and NOTS not in hyp
    first = [h[0] for h in model.generate(feats, lengths, max_new_tokens=1) if h]
    assert 7 not in first


def test_window_padding_fills_with_the_silence_floor_and_keeps_the_utterance():
    g = torch.Generator().manual_seed(0)
    feats, lengths = pad_features([torch.randn(n, 80, generator=g) for n in (10, 25)])
    out, out_lengths = pad_to_window(feats, lengths, 64)
    assert out.shape == (2, 80, 64) and out_lengths.tolist() == [64, 64]
    assert torch.equal(out[0, :, :10], feats[0, :, :10])
    assert torch.allclose(out[0, :, 10:], feats[0, :, :10].max() - WHISPER_FLOOR_BELOW_MAX)
    assert torch.allclose(out[1, :, 25:], feats[1, :, :25].max() - WHISPER_FLOOR_BELOW_MAX)


def test_cached_encoder_states_give_the_same_loss_as_the_frozen_encoder():
    torch.manual_seed(0)
    cfg = LLMASRConfig(vocab_size=V, encoder=EncoderConfig(d_model=32, layers=1, heads=2, max_source_positions=64),
                       lm=LMConfig(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64), stack=2)
    model = LLMASR.from_config(cfg).eval()
    feats, lengths, tokens, token_lengths = batch()
    with torch.no_grad():
        reference = model(feats, lengths, tokens, token_lengths).loss
        enc = model.encoder(feats, lengths)
        states, state_lengths = pad_features([h[:n] for h, n in zip(enc.hidden, enc.lengths.tolist())])
        model.encoder = CachedEncoder(model.encoder.d_model)
        cached = model(states, state_lengths, tokens, token_lengths).loss
    assert torch.allclose(reference, cached, atol=1e-5)
