"""SLURP loaders (text-only copy and official layout) and the per-scenario split."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
import soundfile as sf
from datahelpers import slurp_record, tone, write_audio, write_records

from asrlab.data import slurp

FRACTIONS = {"train": 0.6, "dev": 0.15, "test": 0.25}

# Sentences per scenario (devel + test) from shared/data/README.md.
README_COUNTS = {
    "alarm": 64 + 96, "audio": 35 + 62, "calendar": 280 + 402, "cooking": 43 + 72, "datetime": 73 + 103,
    "email": 157 + 271, "general": 122 + 189, "iot": 118 + 220, "lists": 112 + 142, "music": 56 + 81,
    "news": 82 + 124, "play": 260 + 387, "qa": 214 + 288, "recommendation": 69 + 94, "social": 68 + 106,
    "takeaway": 44 + 57, "transport": 110 + 124, "weather": 126 + 156,
}


# ------------------------------------------------------------------------------------------ text-only copy


def test_text_only_copy_has_5007_labelled_sentences_in_18_scenarios(slurp_split):
    assert len(slurp_split) == 5007
    assert set(r["scenario"] for r in slurp_split) == set(slurp.SCENARIOS)
    assert len(slurp.SCENARIOS) == 18
    assert Counter(r["scenario"] for r in slurp_split) == README_COUNTS
    assert len({r["id"] for r in slurp_split}) == 5007


def test_text_only_rows_are_normalised_and_complete(slurp_split):
    for r in slurp_split:
        assert r["id"].startswith("slurp-") and r["corpus"] == "slurp"
        assert r["split"] in slurp.SPLITS
        assert r["text"] and r["text"] == r["text"].lower() and r["text"].isascii()
        assert isinstance(r["intent"], str) and r["intent"]
    by_id = {r["id"]: r for r in slurp_split}
    # first record of devel.jsonl, recordings kept as file names
    assert by_id["slurp-13804"]["text"] == "siri what is one american dollar in japanese yen"
    assert by_id["slurp-13804"]["recordings"] == ["audio-1434542201-headset.flac", "audio-1434542201.flac"]


def test_missing_text_dir_names_the_param(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prepare\.slurp\.text_dir"):
        slurp.load_text_only(tmp_path / "nowhere", FRACTIONS, 1, [])


def test_text_dir_without_test_jsonl(tmp_path):
    write_records(tmp_path / "devel.jsonl", [slurp_record(1, "wake me up")])
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        slurp.load_text_only(tmp_path, FRACTIONS, 1, [])


def test_bad_transcripts_go_to_rejects(tmp_path):
    path = write_records(tmp_path / "devel.jsonl", [
        slurp_record(1, "wake me up at six"),
        slurp_record(2, ""),
        slurp_record(3, "东京天气"),
        slurp_record(4, "?!"),
        slurp_record(5, "Turn the lights OFF", "iot"),
    ])
    rejects: list[dict] = []
    rows = slurp.read_labelled(path, rejects)
    assert [r["id"] for r in rows] == ["slurp-1", "slurp-5"]
    assert rows[1]["text"] == "turn the lights off"
    assert [r["id"] for r in rejects] == ["slurp-2", "slurp-3", "slurp-4"]
    assert [r["line"] for r in rejects] == [2, 3, 4]
    assert "non-ASCII" in rejects[1]["reason"]


def test_unknown_scenario_in_jsonl_is_an_error_naming_file_and_line(tmp_path):
    path = write_records(tmp_path / "devel.jsonl", [slurp_record(1, "hello"), slurp_record(2, "hi", "smalltalk")])
    with pytest.raises(ValueError, match=r"devel\.jsonl:2.*smalltalk"):
        slurp.read_labelled(path, [])


def test_not_a_slurp_record(tmp_path):
    path = tmp_path / "devel.jsonl"
    path.write_text('{"slurp_id": 1, "text": "no sentence key", "scenario": "alarm"}\n')
    with pytest.raises(ValueError, match=r"devel\.jsonl:1.*sentence"):
        slurp.read_labelled(path, [])
    path.write_text("{truncated\n")
    with pytest.raises(ValueError, match=r"devel\.jsonl:1"):
        slurp.read_labelled(path, [])


def test_read_lm_dedups_and_rejects(tmp_path):
    path = tmp_path / "lm.txt"
    path.write_text("Play some jazz\nplay some jazz!\n\n\u00e9t\u00e9 in paris\n東京\n   \nwhat's next\n")
    rejects: list[dict] = []
    rows = slurp.read_lm(path, rejects)
    assert [r["text"] for r in rows] == ["play some jazz", "ete in paris", "what's next"]
    assert [r["id"] for r in rows] == ["lm-1", "lm-4", "lm-7"]
    assert [r["id"] for r in rejects] == ["lm-5"]


def test_read_lm_missing_names_the_param(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prepare\.slurp\.lm_text"):
        slurp.read_lm(tmp_path / "lm.txt", [])


def test_real_lm_txt_reads_cleanly(slurp_dir):
    rejects: list[dict] = []
    rows = slurp.read_lm(slurp_dir / "lm.txt", rejects)
    assert rejects == []
    assert 10_000 < len(rows) <= 29_104
    assert len({r["text"] for r in rows}) == len(rows)


# ------------------------------------------------------------------------------------------ splits


def test_split_is_deterministic_and_seed_dependent(slurp_split):
    texts = [{k: r[k] for k in ("id", "text", "scenario")} for r in slurp_split]
    a = slurp.split_labelled(texts, FRACTIONS, 1234)
    b = slurp.split_labelled(list(reversed(texts)), FRACTIONS, 1234)  # input order does not matter either
    assert {r["id"]: r["split"] for r in a} == {r["id"]: r["split"] for r in b}
    assert [r["split"] for r in a] == [r["split"] for r in slurp_split]
    c = slurp.split_labelled(texts, FRACTIONS, 4321)
    changed = sum(x["split"] != y["split"] for x, y in zip(a, c))
    assert changed > 0.3 * len(a)  # a different seed gives a genuinely different split


def test_no_normalised_sentence_in_two_splits(slurp_split):
    splits_of = defaultdict(set)
    for r in slurp_split:
        splits_of[r["text"]].add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    # the real data has repeated sentences, so this is not vacuous
    assert len(splits_of) < len(slurp_split)


def test_split_fractions_per_scenario(slurp_split):
    for scenario in slurp.SCENARIOS:
        rows = [r for r in slurp_split if r["scenario"] == scenario]
        counts = Counter(r["split"] for r in rows)
        for split, frac in FRACTIONS.items():
            assert abs(counts[split] / len(rows) - frac) < 0.05, (scenario, split, counts)


def test_split_other_fractions():
    rows = [{"id": f"{sc}{i}", "text": f"{sc} sentence {i}", "scenario": sc}
            for sc in ("alarm", "iot") for i in range(200)]
    out = slurp.split_labelled(rows, {"train": 0.8, "dev": 0.1, "test": 0.1}, 7)
    for sc in ("alarm", "iot"):
        assert Counter(r["split"] for r in out if r["scenario"] == sc) == {"train": 160, "dev": 20, "test": 20}


def test_duplicate_sentences_share_a_split_even_across_scenarios():
    rows = [{"id": f"a{i}", "text": f"alarm sentence {i}", "scenario": "alarm"} for i in range(40)]
    rows += [{"id": "dup1", "text": "stop", "scenario": "alarm"}, {"id": "dup2", "text": "stop", "scenario": "alarm"},
             {"id": "dup3", "text": "stop", "scenario": "audio"}]
    for seed in range(20):
        out = {r["id"]: r["split"] for r in slurp.split_labelled(rows, FRACTIONS, seed)}
        assert out["dup1"] == out["dup2"] == out["dup3"]


@pytest.mark.parametrize("fractions", [{"train": 0.6, "dev": 0.2, "test": 0.3},
                                       {"train": 0.8, "test": 0.2}, {"train": 0.5, "dev": 0.25, "eval": 0.25}])
def test_bad_split_fractions(fractions):
    with pytest.raises(ValueError, match="split fractions"):
        slurp.split_labelled([{"id": "a", "text": "a", "scenario": "alarm"}], fractions, 1)


# ------------------------------------------------------------------------------------------ official layout


@pytest.fixture
def official_root(tmp_path):
    """A tiny SLURP release in the official layout, with real FLAC files written by soundfile."""
    root = tmp_path / "slurp_official"
    ds = root / "dataset" / "slurp"
    write_records(ds / "train.jsonl", [
        slurp_record(1, "Wake me up at six", "alarm", ["audio-1001.flac", "audio-1001-headset.flac"]),
        slurp_record(2, "turn the lights off", "iot", ["audio-1002.flac"]),
    ])
    write_records(ds / "devel.jsonl", [slurp_record(3, "what's the weather", "weather", ["audio-1003.flac"])])
    write_records(ds / "test.jsonl", [
        slurp_record(4, "play some jazz", "play", ["audio-1004.flac", "audio-1099.flac"]),  # 1099 is missing
        slurp_record(5, "", "play", ["audio-1005.flac"]),  # empty transcript: a reject, its recording too
    ])
    write_records(ds / "train_synthetic.jsonl", [slurp_record(6, "set a timer", "alarm", ["audio--1600-1.flac"])])
    (ds / "metadata.json").write_text(json.dumps({
        "1": {"recordings": {"audio-1001.flac": {"usrid": "FE-488"}, "audio-1001-headset.flac": {"usrid": "FE-488"}}},
        "3": {"recordings": {"audio-1003.flac": {"usrid": "MO-012"}}},
    }))
    for name in ("audio-1001.flac", "audio-1001-headset.flac", "audio-1002.flac", "audio-1003.flac",
                 "audio-1004.flac", "audio-1005.flac"):
        write_audio(root / "audio" / "slurp_real" / name, tone(0.3))
    write_audio(root / "audio" / "slurp_synth" / "audio--1600-1.flac", tone(0.2))
    return root


def test_official_layout_rows_and_audio_paths(official_root):
    rejects: list[dict] = []
    sentences, recordings = slurp.load_official(official_root, rejects)
    assert {r["id"]: r["split"] for r in sentences} == {"slurp-1": "train", "slurp-2": "train",
                                                        "slurp-3": "dev", "slurp-4": "test"}
    rec = {r["id"]: r for r in recordings}
    assert set(rec) == {"slurp-1-audio-1001@slurp_real", "slurp-1-audio-1001-headset@slurp_real",
                        "slurp-2-audio-1002@slurp_real", "slurp-3-audio-1003@slurp_real",
                        "slurp-4-audio-1004@slurp_real", "slurp-6-audio--1600-1@slurp_synth"}
    for r in recordings:
        assert r["corpus"] == "slurp" and r["accent"] == "native"
        assert r["audio"].endswith(".flac")
        assert sf.info(r["audio"]).frames > 0
    assert rec["slurp-3-audio-1003@slurp_real"]["split"] == "dev"
    assert rec["slurp-3-audio-1003@slurp_real"]["text"] == "what's the weather"
    assert rec["slurp-3-audio-1003@slurp_real"]["audio"] == str(official_root / "audio/slurp_real/audio-1003.flac")
    synth = rec["slurp-6-audio--1600-1@slurp_synth"]
    assert synth["split"] == "train" and synth["pool"] == "slurp_synth"
    assert synth["audio"] == str(official_root / "audio/slurp_synth/audio--1600-1.flac")
    # speakers come from metadata.json, not from the file name (which holds a timestamp)
    assert rec["slurp-1-audio-1001@slurp_real"]["speaker"] == "FE-488"
    assert rec["slurp-3-audio-1003@slurp_real"]["speaker"] == "MO-012"
    assert rec["slurp-2-audio-1002@slurp_real"]["speaker"] is None


def test_official_layout_missing_recording_and_bad_transcript_go_to_rejects(official_root):
    rejects: list[dict] = []
    slurp.load_official(official_root, rejects)
    by_id = {r["id"]: r for r in rejects}
    assert set(by_id) == {"slurp-4-audio-1099@slurp_real", "slurp-5"}
    assert "missing" in by_id["slurp-4-audio-1099@slurp_real"]["reason"]
    assert by_id["slurp-4-audio-1099@slurp_real"]["source"].endswith("audio-1099.flac")
    assert "empty" in by_id["slurp-5"]["reason"]


def test_official_layout_without_synthetic_or_metadata(official_root):
    (official_root / "dataset/slurp/train_synthetic.jsonl").unlink()
    (official_root / "dataset/slurp/metadata.json").unlink()
    _, recordings = slurp.load_official(official_root, [])
    assert {r["pool"] for r in recordings} == {"slurp_real"}
    assert all(r["speaker"] is None for r in recordings)


def test_official_layout_missing_root_or_dataset_names_the_param(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prepare\.slurp\.official_root"):
        slurp.load_official(tmp_path / "nowhere", [])
    (tmp_path / "root" / "audio").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"dataset/slurp.*prepare\.slurp\.official_root"):
        slurp.load_official(tmp_path / "root", [])


def test_check_scenarios():
    slurp.check_scenarios(["alarm", "weather"], "x")
    with pytest.raises(ValueError, match=r"render\.sets\.a\.scenarios.*'wether'"):
        slurp.check_scenarios(["alarm", "wether"], "render.sets.a.scenarios")
