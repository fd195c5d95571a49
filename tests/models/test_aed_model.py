"""AED (Whisper + CTC head): joint loss, masked cross-attention, greedy decoding, checkpoints, bad inputs."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutput

from asrlab.models.aed import CTC_HEAD_FILE, AEDConfig, AEDModel
from asrlab.models.batch import pad_features, pad_tokens
from asrlab.models.encoder import EncoderConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

V = 40
CFG = AEDConfig(vocab_size=V, encoder=EncoderConfig(d_model=32, layers=2, heads=2, max_source_positions=64),
                decoder_layers=2, decoder_heads=2, max_target_positions=16, label_smoothing=0.1)


def make_model(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return AEDModel.from_config(cfg)


def make_decoding_model(seed=0, allow_eos=False):
    """A random model whose greedy output is not degenerate.

    With tied embeddings a random decoder echoes its input token (<s>, then the same token forever); an
    untied random output layer gives varied ids. <pad>/<s> (and </s> unless ``allow_eos``) are made
    impossible, so that decoding runs to max_new_tokens and raw ids can be compared.
    """
    model = make_model(seed).eval()
    weight = torch.randn(V, CFG.encoder.d_model, generator=torch.Generator().manual_seed(seed))
    weight[[CFG.pad_id, CFG.bos_id] + ([] if allow_eos else [CFG.eos_id])] = -100.0
    model.whisper.proj_out.weight = torch.nn.Parameter(weight)
    return model


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    feats, lengths = pad_features([torch.randn(n, 80, generator=g) for n in (40, 64, 23)])
    tokens, token_lengths = pad_tokens([[4, 5, 6], [7, 8, 9, 10, 11], [12]])
    return feats, lengths, tokens, token_lengths


def test_config_ids_must_be_inside_the_vocabulary():
    cfg = CFG.whisper_config()
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id, cfg.decoder_start_token_id) == (0, 1, 2, 1)
    assert cfg.begin_suppress_tokens is None and cfg.suppress_tokens is None
    with pytest.raises(ValueError, match="inside the vocabulary"):
        AEDConfig(vocab_size=2, encoder=CFG.encoder).whisper_config()


def test_joint_loss_and_shapes():
    model = make_model()
    out = model(*make_batch())
    assert out.logits.shape == (3, 6, V) and out.ctc_logits.shape == (3, 32, V)
    torch.testing.assert_close(out.loss, 0.3 * out.ctc_loss + 0.7 * out.att_loss)


def test_backward_and_the_loss_decreases(few_steps):
    losses, _ = few_steps(make_model(), make_batch(),
                          receives_grad=lambda m: [m.ctc_head.weight, m.whisper.model.encoder.conv1.weight])
    assert losses[-1] < losses[0], losses


def test_decoder_and_ctc_ignore_encoder_padding():
    model = make_model().eval()
    utt = torch.randn(23, 80)
    tokens, token_lengths = pad_tokens([[4, 5, 6]])
    alone = model(*pad_features([utt]), tokens, token_lengths)
    feats, lengths = pad_features([utt, torch.randn(64, 80)])
    tok2, len2 = pad_tokens([[4, 5, 6], [7, 8, 9, 10, 11]])
    batched = model(feats, lengths, tok2, len2)
    torch.testing.assert_close(batched.logits[0, :4], alone.logits[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched.ctc_logits[0, :12], alone.ctc_logits[0], atol=1e-5, rtol=1e-4)
    # Control: upstream Whisper (no cross-attention mask) does see the padding.
    enc = model.encode(feats, lengths)
    dec_in = torch.tensor([[1, 4, 5, 6], [1, 7, 8, 9]])
    unmasked = model.whisper(encoder_outputs=(enc.hidden,), decoder_input_ids=dec_in).logits
    assert (unmasked[0] - alone.logits[0]).abs().max() > 1e-3


def test_greedy_decoding_matches_no_cache_decoding_and_transformers_generate():
    model = make_decoding_model()
    feats, lengths, *_ = make_batch()
    hyps = model.generate(feats, lengths, max_new_tokens=8)
    assert [len(h) for h in hyps] == [8, 8, 8] and len({tuple(h) for h in hyps}) > 1
    # Without the cache: the whole prefix re-decoded at every step.
    enc, ids = model.encode(feats, lengths), torch.ones(3, 1, dtype=torch.long)
    for _ in range(8):
        nxt = model._decode_step(enc, ids).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    assert hyps == ids[:, 1:].tolist()
    # Each utterance decodes the same alone.
    assert [model.generate(feats[i: i + 1, :, : int(n)], n[None], max_new_tokens=8)[0]
            for i, n in enumerate(lengths)] == hyps
    # On an unpadded batch there is nothing to mask: transformers' own generate agrees.
    full = torch.full((3,), feats.shape[2])
    enc = model.encode(feats, full)
    gen = GenerationConfig(max_new_tokens=8, do_sample=False, num_beams=1, eos_token_id=2, pad_token_id=0,
                           bos_token_id=1, decoder_start_token_id=1)
    ref = GenerationMixin.generate(model.whisper, encoder_outputs=BaseModelOutput(last_hidden_state=enc.hidden),
                                   generation_config=gen)
    assert model.generate(feats, full, max_new_tokens=8) == ref[:, 1:].tolist()


def test_generation_stops_at_eos_and_within_max_target_positions():
    model = make_decoding_model(allow_eos=True)
    feats, lengths, *_ = make_batch()
    hyps = model.generate(feats, lengths)
    assert all(len(h) <= CFG.max_target_positions - 1 and CFG.eos_id not in h for h in hyps)
    assert min(len(h) for h in hyps) < CFG.max_target_positions - 1  # some stopped at </s>
    # Batched rows that finished early do not disturb the others.
    assert [model.generate(feats[i: i + 1, :, : int(n)], n[None])[0] for i, n in enumerate(lengths)] == hyps
    ctc_hyps = model.generate_ctc(feats, lengths)
    assert len(ctc_hyps) == 3 and all(CFG.pad_id not in h for h in ctc_hyps)


def test_save_and_load_pretrained_round_trip(tmp_path):
    model, batch = make_model().eval(), make_batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / CTC_HEAD_FILE).is_file()
    again = AEDModel.from_pretrained(tmp_path).eval()
    a, b = model(*batch), again(*batch)
    torch.testing.assert_close(b.logits, a.logits)
    torch.testing.assert_close(b.ctc_logits, a.ctc_logits)
    torch.testing.assert_close(b.loss, a.loss)
    assert again.generate(batch[0], batch[1], max_new_tokens=5) == model.generate(batch[0], batch[1],
                                                                                  max_new_tokens=5)
    # A plain Whisper checkpoint (no CTC head) loads with a new head.
    model.whisper.save_pretrained(tmp_path / "plain")
    plain = AEDModel.from_pretrained(tmp_path / "plain").eval()
    torch.testing.assert_close(plain(*batch).logits, a.logits)


def test_bad_inputs():
    model = make_model()
    feats, lengths, tokens, token_lengths = make_batch()
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.zeros(0, 80, 5), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="limit of 128 frames"):
        model(torch.randn(1, 80, 129), torch.tensor([129]))
    long_tokens, long_lengths = pad_tokens([[5] * 16])
    with pytest.raises(ValueError, match="max_target_positions=16"):
        model(feats[:1], lengths[:1], long_tokens, long_lengths)
    with pytest.raises(ValueError, match="ctc_weight"):
        AEDModel(model.whisper, ctc_weight=1.5)
    feats[0, 3, 3] = float("nan")
    assert torch.isnan(model(feats, lengths, tokens, token_lengths).loss)


def test_character_ctc_head_trains_decodes_and_survives_save_and_load(tmp_path, few_steps):
    from dataclasses import replace

    from asrlab.text import CHARS, char_ids, chars_to_text

    cfg = replace(CFG, ctc_units="chars", encoder=replace(CFG.encoder, conv1_stride=2))
    model = make_model(cfg=cfg)
    assert model.ctc_head.out_features == len(CHARS) + 1 and model.blank_id == 0
    feats, lengths, tokens, token_lengths = make_batch()
    chars, char_lengths = pad_tokens([char_ids("hi"), char_ids("ok go"), char_ids("no")])
    with pytest.raises(ValueError, match="character CTC head"):
        model(feats, lengths, tokens, token_lengths)
    losses, out = few_steps(model, (feats, lengths, tokens, token_lengths, chars, char_lengths),
                            receives_grad=lambda m: [m.ctc_head.weight])
    assert losses[-1] < losses[0] and out.ctc_logits.shape[-1] == len(CHARS) + 1
    hyps = model.eval().generate_ctc(feats, lengths)
    assert all(0 < i <= len(CHARS) for h in hyps for i in h)
    assert chars_to_text(char_ids("Set an alarm!")) == "set an alarm"
    model.save_pretrained(tmp_path)
    again = AEDModel.from_pretrained(tmp_path)
    assert again.ctc_units == "chars" and again.whisper.model.encoder.conv1.stride == (2,)
    torch.testing.assert_close(again.eval().forward(feats, lengths).ctc_logits, model.forward(feats, lengths).ctc_logits)


def test_a_model_folder_carries_the_tokenizer_it_was_saved_with(tmp_path):
    """store.save(tok=) puts the vocabulary beside the weights; store.tokenizer gives it back (same ids and
    special ids) and refuses a folder saved without one, rather than falling back to another tokenizer."""
    import dataclasses

    from asrlab.models import store
    from asrlab.tokenizer import encode, load_tokenizer, save_tokenizer, train_tokenizer

    texts = ["set an alarm for seven am", "wake me up at five", "play some jazz music please"]
    tok = load_tokenizer(save_tokenizer(train_tokenizer(texts, vocab_size=60, min_frequency=1), tmp_path / "bpe"))
    model = make_model(cfg=dataclasses.replace(CFG, vocab_size=len(tok)))
    store.save(model, "aed", tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        store.tokenizer(tmp_path / "bare")
    store.save(model, "aed", tmp_path / "model", tok=tok)
    again = store.tokenizer(tmp_path / "model")
    assert again.get_vocab() == tok.get_vocab() and len(again) == len(tok)
    assert encode(again, "Wake me up at FIVE!") == encode(tok, "Wake me up at FIVE!")
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)
    assert store.load(tmp_path / "model")[0] == "aed"
    old = os.umask(0o022)
    try:  # group- and world-readable model files (issue 18), whatever the writers' own modes
        store.save(model, "aed", tmp_path / "readable", tok=tok)
    finally:
        os.umask(old)
    assert {oct(f.stat().st_mode & 0o777) for f in (tmp_path / "readable").rglob("*") if f.is_file()} == {"0o644"}
