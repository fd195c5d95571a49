"""CTC model: loss, training signal, greedy decoding, padding invariance, bad inputs."""

from __future__ import annotations

import pytest
import torch

from asrlab.models.batch import pad_features, pad_tokens
from asrlab.models.ctc import CTCConfig, CTCModel, ctc_greedy_decode
from asrlab.models.encoder import EncoderConfig

V = 30
CFG = CTCConfig(vocab_size=V, encoder=EncoderConfig(d_model=32, layers=2, heads=2, max_source_positions=64))


def make_model(seed=0):
    torch.manual_seed(seed)
    return CTCModel.from_config(CFG)


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    feats, lengths = pad_features([torch.randn(n, 80, generator=g) for n in (40, 64, 23)])
    tokens, token_lengths = pad_tokens([[4, 5, 6], [7, 8, 9, 10, 11], [12]])
    return feats, lengths, tokens, token_lengths


def test_greedy_decoding_collapses_repeats_and_drops_blanks():
    frames = torch.tensor([[5, 5, 0, 5, 7, 7, 0, 0, 9, 9], [3, 3, 3, 0, 3, 4, 4, 4, 4, 4]])
    logits = torch.nn.functional.one_hot(frames, 10).float()
    assert ctc_greedy_decode(logits, torch.tensor([10, 6]), blank=0) == [[5, 5, 7, 9], [3, 3, 4]]


def test_forward_backward_and_the_loss_decreases(few_steps):
    losses, out = few_steps(make_model(), make_batch())
    assert out.logits.shape == (3, 32, V) and out.lengths.tolist() == [20, 32, 12]
    assert losses[-1] < losses[0], losses


def test_generate_returns_token_ids_without_blanks():
    model, (feats, lengths, *_) = make_model().eval(), make_batch()
    hyps = model.generate(feats, lengths)
    assert len(hyps) == 3 and all(isinstance(t, int) and 0 < t < V for h in hyps for t in h)
    assert all(len(h) <= n for h, n in zip(hyps, [20, 32, 12]))


def test_logits_on_valid_frames_do_not_depend_on_batch_padding():
    model = make_model().eval()
    utt = torch.randn(23, 80)
    alone = model(*pad_features([utt]))
    batched = model(*pad_features([utt, torch.randn(64, 80)]))
    n = int(alone.lengths[0])
    torch.testing.assert_close(batched.logits[0, :n], alone.logits[0], atol=1e-5, rtol=1e-4)


def test_bad_inputs():
    model = make_model()
    feats, lengths, tokens, token_lengths = make_batch()
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.zeros(0, 80, 5), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="vocabulary"):
        model(feats, lengths, tokens + V, token_lengths)
    with pytest.raises(ValueError, match="blank_id"):
        CTCModel(model.encoder, V, blank_id=V)
    feats[1, 7, 3] = float("nan")
    assert torch.isnan(model(feats, lengths, tokens, token_lengths).loss)
