"""The soft_tokens method (arXiv 2606.06806) and its models: soft assignment, soft embedding, k-means,
the HuBERT upstream and the token/feature CTC downstream, on tiny tensors on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asrlab.methods.soft_tokens import distances, fit_kmeans, hard_assign, soft_assign, soft_embedding
from asrlab.ssl.downstream import DownstreamConfig, DownstreamCTC
from asrlab.ssl.hubert import HubertUpstream, UpstreamConfig, mfcc, stack_frames


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(16, 8, generator=g)
    x = torch.randn(3, 5, 8, generator=g)
    table = torch.randn(16, 4, generator=g)
    return x, centroids, table


def test_distances_are_euclidean(setup):
    x, c, _ = setup
    d = distances(x, c)
    assert d.shape == (3, 5, 16)
    assert torch.allclose(d[1, 2, 7], (x[1, 2] - c[7]).norm(), atol=1e-5)


def test_small_tau_gives_the_hard_embedding(setup):
    x, c, table = setup
    hard = table[hard_assign(x, c)]
    two = distances(x, c).topk(2, largest=False).values
    gap = (two[..., 1] - two[..., 0]).min().item()  # the closest call between nearest and second nearest
    errors = [(soft_embedding(soft_assign(x, c, gap * f), table) - hard).abs().max().item() for f in (1.0, 0.1, 0.02)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


def test_tau_zero_is_exactly_the_one_hot_lookup(setup):
    x, c, table = setup
    p = soft_assign(x, c, 0.0)
    assert set(p.unique().tolist()) == {0.0, 1.0} and torch.equal(p.sum(-1), torch.ones(3, 5))
    assert torch.equal(soft_embedding(p, table), table[hard_assign(x, c)])


def test_large_tau_tends_to_the_mean_embedding(setup):
    x, c, table = setup
    mean = table.mean(0).expand(3, 5, 4)
    gaps = [(soft_embedding(soft_assign(x, c, tau), table) - mean).abs().max().item() for tau in (1.0, 10.0, 1e4)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


def test_one_hot_distribution_equals_the_lookup(setup):
    _, _, table = setup
    ids = torch.tensor([[0, 3, 15], [7, 7, 1]])
    p = torch.nn.functional.one_hot(ids, 16).float()
    assert torch.equal(soft_embedding(p, table), table[ids])


def test_soft_assignment_is_a_distribution_ordered_by_distance(setup):
    x, c, _ = setup
    p = soft_assign(x, c, 2.0)
    assert torch.allclose(p.sum(-1), torch.ones(3, 5), atol=1e-6) and (p > 0).all()
    d = distances(x, c)
    assert torch.equal(p.argmax(-1), d.argmin(-1)) and torch.equal(p.argmin(-1), d.argmax(-1))


def test_top_k_keeps_the_k_nearest(setup):
    x, c, _ = setup
    p = soft_assign(x, c, 2.0, top_k=3)
    assert torch.equal((p > 0).sum(-1), torch.full((3, 5), 3))
    nearest = distances(x, c).topk(3, largest=False).indices
    assert torch.equal(p.gather(-1, nearest).sum(-1).round(decimals=5), torch.ones(3, 5))


def test_negative_tau_is_rejected(setup):
    x, c, _ = setup
    with pytest.raises(ValueError, match="τ"):
        soft_assign(x, c, -1.0)


def test_kmeans_is_deterministic_for_a_seed_and_finds_the_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 10
    frames = (centres[rng.integers(0, 4, 2000)] + rng.normal(size=(2000, 6)) * 0.1).astype(np.float32)
    a, b = fit_kmeans(frames, 4, seed=3), fit_kmeans(frames, 4, seed=3)
    assert a.dtype == np.float32 and a.shape == (4, 6)
    assert np.array_equal(a, b)
    # every true centre has a centroid next to it
    assert np.abs(centres[:, None] - a[None]).max(-1).min(1).max() < 0.5
    with pytest.raises(ValueError, match="at least k"):
        fit_kmeans(frames[:3], 4)


@pytest.mark.parametrize("input_kind", ["hard", "soft", "features"])
def test_downstream_shapes_dtypes_and_gradients(input_kind):
    torch.manual_seed(0)
    K, D, B, T = 12, 10, 3, 17
    cfg = DownstreamConfig(input="features" if input_kind == "features" else "tokens", n_tokens=K, feature_dim=D,
                           d_model=16, layers=1, heads=2, ffn_dim=32, dropout=0.0)
    model = DownstreamCTC(cfg)
    lengths = torch.tensor([17, 12, 9])
    inputs = {"hard": torch.randint(0, K, (B, T)), "soft": torch.randn(B, T, K).softmax(-1),
              "features": torch.randn(B, T, D)}[input_kind]
    targets, target_lengths = torch.randint(1, cfg.vocab_size, (B, 5)), torch.tensor([5, 4, 3])
    out = model(inputs, lengths, targets, target_lengths)
    assert out["logits"].shape == (B, T, cfg.vocab_size) and out["logits"].dtype == torch.float32
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.embed.weight.grad.abs().sum() > 0 if input_kind != "features" else model.embed[1].weight.grad.abs().sum() > 0
    hyps = model.generate(inputs, lengths)
    assert len(hyps) == B and all(len(h) <= n for h, n in zip(hyps, lengths.tolist()))
    # padding does not change a shorter utterance's output
    model.eval()
    alone = model.logits(inputs[2:3, :9], lengths[2:3])
    batched = model.logits(inputs, lengths)[2:3, :9]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_downstream_soft_input_with_one_hot_equals_hard_input():
    torch.manual_seed(0)
    model = DownstreamCTC(DownstreamConfig(input="tokens", n_tokens=12, d_model=16, layers=1, heads=2, ffn_dim=32)).eval()
    ids, lengths = torch.randint(0, 12, (2, 9)), torch.tensor([9, 6])
    one_hot = torch.nn.functional.one_hot(ids, 12).float()
    assert torch.allclose(model.logits(ids, lengths), model.logits(one_hot, lengths), atol=1e-6)
    with pytest.raises(ValueError, match="K=12"):
        model.logits(torch.rand(2, 9, 5), lengths)


def test_upstream_masked_prediction_learns_and_layers_have_shapes():
    torch.manual_seed(0)
    cfg = UpstreamConfig(stack=2, hidden=32, layers=2, heads=2, ffn_dim=64, n_targets=5, pos_conv_kernel=4,
                         pos_conv_groups=2, mask_length=2)
    model = HubertUpstream(cfg)
    frames, lengths = torch.randn(4, 20, 160), torch.tensor([20, 18, 15, 11])
    # masked frames see only their context: a target constant over each utterance is learnable from it
    targets = torch.arange(4)[:, None].expand(4, 20) % 5
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(frames, lengths, targets)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    h = model.layer(frames, lengths, 2)
    assert h.shape == (4, 20, 32) and h.dtype == torch.float32
    assert len(model.hidden_states(frames, lengths)) == 3
    # an utterance's layer output does not depend on the padding it is batched with
    assert torch.allclose(model.layer(frames[3:, :11], lengths[3:], 2), h[3:, :11], atol=1e-4)


def test_stacking_and_mfcc_rates():
    logmel = torch.randn(103, 80)
    assert stack_frames(logmel, 4).shape == (25, 320)
    assert torch.equal(stack_frames(logmel, 2)[1], torch.cat([logmel[2], logmel[3]]))
    m = mfcc(logmel.numpy(), 4)
    assert m.shape == (25, 39) and m.dtype == np.float32
    assert stack_frames(torch.randn(3, 80), 4).shape == (1, 320)  # shorter than one stack: padded, not empty


def test_layer_set_round_trip_and_input_modes(tmp_path):
    from asrlab.ssl.layerdata import LayerSet, save_set

    rows = [{"id": f"u{i}", "text": t, "split": "dev", "pool": "synthetic"} for i, t in enumerate(["set an alarm", "hi"])]
    frames = [torch.randn(7, 6), torch.randn(4, 6)]
    save_set(tmp_path, "dev_x", rows, frames)
    data = LayerSet(tmp_path, "dev_x")
    assert data.lengths == [7, 4] and [r["id"] for r in data.rows] == ["u0", "u1"]
    c = torch.randn(5, 6)
    feats = data.use("features").collate([0, 1])
    assert feats["features"].shape == (2, 7, 6) and torch.equal(feats["features"][1, 4:], torch.zeros(3, 6))
    assert feats["targets"].shape[0] == 2 and feats["target_lengths"].tolist() == [12, 2]
    hard = data.use("tokens", c).collate([0, 1])["features"]
    assert hard.dtype == torch.int64 and torch.equal(hard[0], hard_assign(frames[0].half().float(), c))
    soft = data.use("soft", c, tau=0.0).collate([0, 1])["features"]
    assert soft.shape == (2, 7, 5) and torch.equal(soft[0].argmax(-1), hard[0])
    with pytest.raises(ValueError, match="mode"):
        data.use("logits")


@pytest.mark.parametrize("mode", ["features", "tokens", "soft"])
def test_layer_set_decodes_through_the_one_evaluation_path(tmp_path, mode):
    """evaluate() batches a LayerSet like SpeechData and writes the downstream's characters: in every input mode
    its hypotheses are the model's greedy CTC output on each utterance alone, scored against the rows' text."""
    from asrlab.evaluation import error_rates, evaluate
    from asrlab.ssl.layerdata import LayerSet, save_set
    from asrlab.text import chars_to_text

    torch.manual_seed(0)
    rows = [{"id": f"u{i}", "text": t, "scenario": "alarm", "speaker": f"s{i % 2}"}
            for i, t in enumerate(["set an alarm", "wake me up", "hi there", "play jazz", "stop"])]
    frames = [torch.randn(n, 6) for n in (9, 4, 7, 12, 3)]
    save_set(tmp_path, "test_x", rows, frames)
    data, c = LayerSet(tmp_path, "test_x"), torch.randn(5, 6)
    data.use(mode, c, 0.5) if mode != "features" else data.use("features")
    cfg = DownstreamConfig(input="features" if mode == "features" else "tokens", n_tokens=5, feature_dim=6,
                           d_model=16, layers=1, heads=2, ffn_dim=32)
    model = DownstreamCTC(cfg).eval()
    with torch.no_grad():  # a bias towards "a" and " " so that the hypotheses are not all empty
        model.head.bias[2] += 3.0
    alone = [chars_to_text(model.generate(*data.inputs([i]))[0]) for i in range(len(data))]
    assert any(alone)
    ev = evaluate(model, data, None, method="ctc", max_frames=20, group_keys=("speaker",), progress=False,
                  hyps_path=tmp_path / "h.tsv")
    assert [r["hyp"] for r in ev.rows] == alone and [r["id"] for r in ev.rows] == [r["id"] for r in rows]
    assert ev.scores["overall"] == error_rates([r["text"] for r in rows], alone)
    assert {"speaker/s0", "speaker/s1"} <= set(ev.scores) and (tmp_path / "h.tsv").is_file()


# -- the alignment analysis and the upstream interface ----------------------------------------------------------


def test_phone_alignment_is_one_for_a_perfect_tokeniser_and_near_zero_for_a_random_one():
    from asrlab.methods.soft_tokens import phone_alignment
    rng = np.random.default_rng(0)
    phones = rng.integers(0, 10, 20000)
    perfect = phone_alignment(phones * 3 + 7, phones)  # tokens a relabelling of the phones
    assert perfect["phone_purity"] == pytest.approx(1.0) and perfect["pnmi"] == pytest.approx(1.0)
    split = phone_alignment(phones * 2 + rng.integers(0, 2, len(phones)), phones)  # two tokens per phone
    assert split["phone_purity"] == pytest.approx(1.0) and split["cluster_purity"] < 0.6
    noise = phone_alignment(rng.integers(0, 10, len(phones)), phones)
    assert noise["pnmi"] < 0.01 and noise["phone_purity"] < 0.15


def test_phone_separability_ranks_separated_above_mixed_representations():
    from asrlab.methods.soft_tokens import phone_separability
    rng = np.random.default_rng(0)
    phones = rng.integers(0, 4, 2000)
    means = rng.normal(size=(4, 6)) * 4
    separated = means[phones] + rng.normal(size=(2000, 6))
    mixed = rng.normal(size=(2000, 6))
    train = np.arange(2000) < 1000
    a, b = phone_separability(separated, phones, train), phone_separability(mixed, phones, train)
    assert a["between_within"] > 5 > 0.1 > b["between_within"]
    assert a["probe_accuracy"] > 0.95 and b["probe_accuracy"] < 0.4


def test_frame_labels_follow_the_durations_and_the_channel_delay():
    from asrlab.audio.phones import SILENCE, frame_labels
    phones = [("s", 100), ("E", 50), ("t", 50)]  # 0-100 ms s, 100-150 E, 150-200 t
    # 20-ms frames labelled at their centres (10, 30, … ms); after the last phone, silence
    assert frame_labels(phones, 11, 0.02) == ["s"] * 5 + ["E"] * 2 + ["t"] * 3 + [SILENCE]
    delayed = frame_labels(phones, 13, 0.02, delay=0.04)  # everything 40 ms later, silence before
    assert delayed == [SILENCE] * 2 + ["s"] * 5 + ["E"] * 2 + ["t"] * 3 + [SILENCE]


def test_channel_delay_is_the_direct_path_of_the_simulated_room():
    from asrlab.audio.channel import ChannelConfig, draw, room_impulse_response
    from asrlab.audio.phones import channel_delay
    cfg = ChannelConfig()
    for seed in range(6):  # the direct path: the RIR's first strong tap (a reflection may be stronger still)
        d = draw(cfg, seed)
        a = np.abs(room_impulse_response(d, cfg.max_order, 16000))
        n = int(round(channel_delay(d) * 16000))
        assert a[n - 1: n + 2].max() > 0.5 * a.max() and a[: n - 2].max() < 0.2 * a.max()
    assert channel_delay(None) == 0.0


def test_pho_durations_add_up_to_the_mbrola_audio():
    import io
    import shutil
    import subprocess

    import soundfile as sf

    from asrlab.audio.phones import pho
    if shutil.which("mbrola") is None:
        pytest.skip("mbrola is not installed (scripts/setup-system.sh installs it)")
    text, voice = "set an alarm for seven", "mb-us1"
    phones = pho(text, voice, 160, 50)
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "-p", "50", "--stdout", text],
                         capture_output=True, check=True).stdout
    audio, sr = sf.read(io.BytesIO(wav))
    assert abs(sum(ms for _, ms in phones) / 1000 - len(audio) / sr) < 0.01
    assert [p for p, _ in phones[:3]] == ["s", "E", "t"]
    with pytest.raises(ValueError, match="MBROLA voice"):
        pho(text, "en-us", 160, 50)


def test_upstream_kinds_and_bad_folders_are_named(tmp_path):
    from asrlab.ssl import upstream
    with pytest.raises(ValueError, match="upstream.kind must be one of"):
        upstream.load({"kind": "wav2vec", "from": str(tmp_path)}, None)
    with pytest.raises(FileNotFoundError, match="no Whisper folder there"):
        upstream.load({"kind": "whisper", "from": str(tmp_path)}, None)
    with pytest.raises(FileNotFoundError, match="no pipeline HuBERT there"):
        upstream.load({"kind": "hubert", "from": str(tmp_path)}, None)


def test_whisper_upstream_gives_each_rows_layer_frames(tmp_path):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from asrlab.ssl import upstream

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=100,
                        max_target_positions=20, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1)
    WhisperForConditionalGeneration(cfg).save_pretrained(tmp_path / "w")

    class Store:  # the FeatureStore interface the upstream reads: load(id) -> (frames, n_mels)
        feats = {"a": torch.randn(41, 80), "b": torch.randn(90, 80)}

        def load(self, i):
            return self.feats[i]

    up = upstream.load({"kind": "whisper", "from": str(tmp_path / "w"), "batch_frames": 200}, Store())
    rows = [{"id": "a", "frames": 41}, {"id": "b", "frames": 90}]
    out = up.encode(rows, [0, 2])
    assert up.n_layers == 2 and set(out) == {0, 2}
    assert [f.shape for f in out[2]] == [(21, 32), (45, 32)]
    alone = up.encode(rows[:1], [2])[2][0]
    torch.testing.assert_close(alone, out[2][0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="exceed the Whisper encoder's 200 frames"):
        up.encode([{"id": "c", "frames": 201}], [2])
