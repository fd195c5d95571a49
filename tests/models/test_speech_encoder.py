"""The shared speech encoder: Whisper's encoder on per-batch padding, its mask, and bad inputs."""

from __future__ import annotations

import os

import pytest
import torch

from asrlab.models.batch import pad_features
from asrlab.models.encoder import EncoderConfig, SpeechEncoder, output_lengths

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CFG = EncoderConfig(d_model=32, layers=2, heads=2, max_source_positions=60)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return SpeechEncoder.from_config(CFG).eval()


def test_matches_whisper_encoder_on_a_full_window(encoder):
    x = torch.randn(2, 80, 2 * CFG.max_source_positions)
    ours = encoder(x, torch.tensor([120, 120])).hidden
    upstream = encoder.whisper_encoder(x).last_hidden_state
    torch.testing.assert_close(ours, upstream)


def test_hidden_states_match_whisper_encoders_own_on_a_full_window(encoder):
    x = torch.randn(2, 80, 2 * CFG.max_source_positions)
    ours = encoder(x, torch.tensor([120, 120]), hidden_states=True)
    upstream = encoder.whisper_encoder(x, output_hidden_states=True).hidden_states
    assert len(ours.hidden_states) == len(upstream) == CFG.layers + 1
    for a, b in zip(ours.hidden_states, upstream):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.hidden_states[-1], ours.hidden)


def test_upto_stops_at_a_layer_and_returns_its_output(encoder):
    feats, lengths = pad_features([torch.randn(41, 80), torch.randn(17, 80)])
    full = encoder(feats, lengths, hidden_states=True)
    for k in range(CFG.layers + 1):
        part = encoder(feats, lengths, upto=k)
        torch.testing.assert_close(part.hidden, full.hidden_states[k])
        assert part.hidden[1, int(part.lengths[1]):].abs().max() == 0  # padding zero at every layer
    with pytest.raises(ValueError, match="upto=3: the encoder has layers 0..2"):
        encoder(feats, lengths, upto=3)


def test_lengths_mask_and_zeroed_padding(encoder):
    out = encoder(torch.randn(3, 80, 41), torch.tensor([41, 40, 7]))
    assert out.lengths.tolist() == [21, 20, 4] == output_lengths(torch.tensor([41, 40, 7])).tolist()
    assert out.hidden.shape == (3, 21, 32) and out.mask.sum(1).tolist() == [21, 20, 4]
    assert out.hidden[2, 4:].abs().max() == 0
    assert out.hidden[2, :4].abs().min() > 0


@pytest.mark.parametrize("length", [17, 18, 33])
def test_an_utterance_encodes_the_same_alone_and_batched_with_a_longer_one(encoder, length):
    utt = torch.randn(length, 80)
    alone = encoder(*pad_features([utt]))
    feats, lengths = pad_features([utt, torch.randn(101, 80)], pad_value=3.0)  # pad value must not matter
    batched = encoder(feats, lengths)
    n = int(alone.lengths[0])
    torch.testing.assert_close(batched.hidden[0, :n], alone.hidden[0], atol=1e-5, rtol=1e-4)
    assert int(batched.lengths[0]) == n


def test_too_long_utterance_names_the_limit(encoder):
    x = torch.randn(1, 80, 121)
    with pytest.raises(ValueError, match=r"121 frames exceeds .* limit of 120 frames.*max_source_positions"):
        encoder(x, torch.tensor([121]))
    # Padding beyond the longest utterance is trimmed, not counted.
    assert encoder(x, torch.tensor([120])).hidden.shape[1] == 60


def test_bad_batches_raise_clear_errors(encoder):
    with pytest.raises(ValueError, match="empty batch"):
        encoder(torch.zeros(0, 80, 10), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        pad_features([])
    with pytest.raises(ValueError, match="80 mel bins"):
        encoder(torch.zeros(1, 10, 80), torch.tensor([80]))
    with pytest.raises(ValueError, match="lengths must lie"):
        encoder(torch.zeros(2, 80, 10), torch.tensor([11, 3]))
    with pytest.raises(ValueError, match="lengths must lie"):
        encoder(torch.zeros(2, 80, 10), torch.tensor([0, 3]))


def test_nan_features_give_nan_outputs(encoder):
    x = torch.randn(1, 80, 20)
    x[0, 3, 5] = float("nan")
    assert torch.isnan(encoder(x, torch.tensor([20])).hidden).any()


def test_loads_the_encoder_of_a_whisper_checkpoint(tmp_path):
    from transformers import WhisperForConditionalGeneration

    from asrlab.models.aed import AEDConfig
    from asrlab.models.encoder import encode

    torch.manual_seed(0)
    whisper = WhisperForConditionalGeneration(AEDConfig(vocab_size=20, encoder=CFG).whisper_config()).eval()
    whisper.save_pretrained(tmp_path)
    loaded = SpeechEncoder.from_pretrained(str(tmp_path)).eval()
    x, lengths = pad_features([torch.randn(30, 80), torch.randn(50, 80)])
    torch.testing.assert_close(loaded(x, lengths).hidden, encode(whisper.model.encoder, x, lengths).hidden)


@pytest.mark.parametrize("length", [17, 18, 33])
def test_4x_subsampling_is_padding_invariant_and_counts_lengths(length):
    torch.manual_seed(0)
    enc = SpeechEncoder.from_config(EncoderConfig(d_model=32, layers=2, heads=2, max_source_positions=60,
                                                  conv1_stride=2)).eval()
    assert enc.max_frames == 240
    utt = torch.randn(length, 80)
    alone = enc(*pad_features([utt]))
    assert int(alone.lengths[0]) == ((length - 1) // 2 + 1 - 1) // 2 + 1 == int(output_lengths(torch.tensor([length]), 2)[0])
    batched = enc(*pad_features([utt, torch.randn(101, 80)], pad_value=3.0))
    n = int(alone.lengths[0])
    torch.testing.assert_close(batched.hidden[0, :n], alone.hidden[0], atol=1e-5, rtol=1e-4)


def test_4x_subsampling_survives_save_and_load(tmp_path):
    from asrlab.models.aed import AEDConfig, AEDModel

    torch.manual_seed(0)
    model = AEDModel.from_config(AEDConfig(vocab_size=50, encoder=EncoderConfig(
        d_model=32, layers=1, heads=2, max_source_positions=60, conv1_stride=2), decoder_layers=1, decoder_heads=2))
    model.save_pretrained(tmp_path)
    again = AEDModel.from_pretrained(tmp_path)
    assert again.whisper.model.encoder.conv1.stride == (2,) and again.max_frames == 240
    reused = SpeechEncoder.from_pretrained(str(tmp_path))
    assert reused.whisper_encoder.conv1.stride == (2,)
    x, lens = pad_features([torch.randn(50, 80)])
    torch.testing.assert_close(model.eval().encode(x, lens).hidden, again.eval().encode(x, lens).hidden)
