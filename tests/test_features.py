"""Log-mel features and the sharded feature store written by stage `features`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datahelpers import SR, tone, write_audio

from asrlab.audio.features import FeatureStore, log_mel
from asrlab.audio.io import load_audio
from asrlab.io import read_jsonl, write_jsonl
from asrlab.stages import features


@pytest.mark.parametrize("samples", [SR, int(2.5 * SR) + 37, 4000])
def test_log_mel_shape(samples):
    audio = np.random.default_rng(0).standard_normal(samples).astype(np.float32) * 0.1
    feats = log_mel(audio)
    assert feats.dtype == np.float32 and feats.shape[1] == 80
    assert abs(feats.shape[0] - samples / 160) <= 1
    assert np.isfinite(feats).all()


def test_log_mel_options_and_content():
    a = tone(1.0, freq=300.0)
    b = tone(1.0, freq=3000.0)
    fa, fb = log_mel(a), log_mel(b)
    assert not np.allclose(fa, fb)
    # the louder mel bin follows the tone's frequency
    assert fa.mean(axis=0).argmax() < fb.mean(axis=0).argmax()
    assert log_mel(a, n_mels=40, hop=320).shape == (50, 40)


def _manifest_row(uid: str, audio: Path, **extra) -> dict:
    return {"id": uid, "text": f"text of {uid}", "scenario": "alarm", "accent": "native", "split": "train",
            "corpus": "slurp", "pool": "synthetic", "speaker": "en-us+f3", "audio": str(audio), **extra}


@pytest.fixture
def manifests(make_params, tmp_path):
    """Two manifests (a rendered set and passed-through recordings) with five good utterances."""
    params = make_params()
    out = Path(params["render"]["out_dir"])
    audio = tmp_path / "wav"
    rows = [_manifest_row(f"u{i}", write_audio(audio / f"u{i}.flac", tone(0.5 + 0.25 * i, freq=200 + 100 * i)))
            for i in range(3)]
    write_jsonl(out / "slurp.jsonl", rows)
    recs = [_manifest_row(f"so-{i}", write_audio(audio / f"so-{i}.wav", tone(0.4, freq=500)), pool="speechocean762",
                          split="test", corpus="speechocean762", gender="f", age=9) for i in range(2)]
    write_jsonl(out / "recordings.jsonl", recs)
    write_jsonl(out / "rejects.jsonl", [{"id": "ignored", "reason": "render reject"}])
    return params, rows + recs


def test_feature_store_round_trip(manifests):
    params, rows = manifests
    stats = features.run(params)
    out = Path(params["features"]["out_dir"])
    store = FeatureStore(out)
    assert len(store) == 5 and "u1" in store and "ignored" not in store
    for r in rows:
        expected = log_mel(load_audio(r["audio"]))
        got = store.load(r["id"])
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        assert tuple(got.shape) == expected.shape
        np.testing.assert_allclose(got.numpy(), expected, atol=2e-2, rtol=1e-2)  # stored as float16
    with pytest.raises(KeyError, match="'nope'"):
        store.load("nope")
    assert stats["utterances"] == 5 and stats["rejects"] == 0 and stats["warnings"] == 0
    assert stats["shards"] == 3 and len(list(out.glob("shard-*.safetensors"))) == 3  # shard_size 2
    assert stats["per_pool_split"]["speechocean762/test"]["utterances"] == 2
    assert stats["frames"] == sum(store.rows[r["id"]]["frames"] for r in rows)
    assert json.loads(Path(params["features"]["stats"]).read_text()) == stats


def test_index_rows_carry_manifest_columns(manifests):
    params, rows = manifests
    features.run(params)
    index = read_jsonl(Path(params["features"]["out_dir"]) / "index.jsonl")
    assert [r["id"] for r in index] == ["so-0", "so-1", "u0", "u1", "u2"]  # manifests in name order
    by_id = {r["id"]: r for r in index}
    for r in rows:
        row = by_id[r["id"]]
        assert {k: row[k] for k in r} == r  # every manifest column is kept
        assert row["shard"].startswith("shard-") and row["frames"] > 0
        assert abs(row["duration"] - load_audio(r["audio"]).size / SR) < 1e-3
        assert abs(row["frames"] - row["duration"] * 100) <= 1


def test_rerun_rewrites_shards(manifests):
    params, _ = manifests
    features.run(params)
    out = Path(params["features"]["out_dir"])
    stale = out / "shard-00099.safetensors"
    stale.write_bytes(b"old")
    features.run(params)
    assert not stale.exists()
    assert len(FeatureStore(out)) == 5


def test_failed_rerun_leaves_the_previous_store_whole(manifests, monkeypatch):
    params, _ = manifests
    features.run(params)
    out = Path(params["features"]["out_dir"])

    def broken(*a, **kw):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(features, "save_file", broken)  # the stage dies while writing shards
    with pytest.raises(RuntimeError, match="killed mid-run"):
        features.run(params)
    # the new store is written aside and swapped in only when complete: the old one is untouched
    assert len(FeatureStore(out)) == 5
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_duplicate_ids_across_manifests(manifests):
    params, rows = manifests
    out = Path(params["render"]["out_dir"])
    write_jsonl(out / "extra.jsonl", [rows[0]])
    with pytest.raises(ValueError, match=r"'u0' appears in more than one manifest"):
        features.run(params)


def test_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro features"):
        FeatureStore(tmp_path)


def test_an_unexpected_error_on_one_utterance_becomes_a_reject(manifests, monkeypatch):
    params, rows = manifests
    real = features.log_mel

    def flaky(audio, *a):
        if len(audio) == len(features.load_audio(rows[0]["audio"])):
            raise MemoryError("boom")
        return real(audio, *a)

    monkeypatch.setattr(features, "log_mel", flaky)  # forked workers inherit it
    stats = features.run(params)
    assert stats["rejects"] >= 1 and stats["utterances"] == len(rows) - stats["rejects"]
    rejects = [json.loads(line) for line in (Path(params["features"]["out_dir"]) / "rejects.jsonl").read_text().splitlines()]
    assert any("MemoryError('boom')" in r["reason"] for r in rejects)


@pytest.mark.parametrize("typo, near", [("shard_sise", "shard_size"), ("worker", "workers")])
def test_misspelt_key_is_an_error_and_keeps_the_old_store(manifests, typo, near):
    params, _ = manifests
    features.run(params)
    out = Path(params["features"]["out_dir"])
    before = sorted(p.name for p in out.iterdir())
    right = near
    params["features"][typo] = params["features"].pop(right)
    with pytest.raises(KeyError, match=f"unknown key `{typo}` in section `features`; did you mean `{near}`"):
        features.run(params)
    assert sorted(p.name for p in out.iterdir()) == before
    assert len(FeatureStore(out)) == 5
