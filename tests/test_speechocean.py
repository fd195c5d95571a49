"""speechocean762 importer: Kaldi lists -> rows with speaker, gender, age and split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from datahelpers import tone, write_audio

from asrlab.audio.io import load_audio
from asrlab.data.speechocean import load_speechocean


def test_real_corpus_rows(so762_dir):
    rejects: list[dict] = []
    rows = load_speechocean(so762_dir, rejects)
    assert rejects == []
    assert Counter(r["split"] for r in rows) == {"train": 2500, "test": 2500}
    speakers = {s: {r["speaker"] for r in rows if r["split"] == s} for s in ("train", "test")}
    assert len(speakers["train"]) == len(speakers["test"]) == 125
    assert not speakers["train"] & speakers["test"]  # speaker-disjoint splits
    gender = {r["speaker"]: r["gender"] for r in rows}
    assert Counter(gender.values()) == {"f": 125, "m": 125}
    assert all(isinstance(r["age"], int) and 3 < r["age"] < 80 for r in rows)
    first = next(r for r in rows if r["id"] == "so762-000010011")
    assert first == {
        "id": "so762-000010011", "text": "we call it bear", "scenario": None, "accent": "mandarin", "split": "train",
        "corpus": "speechocean762", "pool": "speechocean762", "speaker": "0001", "gender": "m", "age": 6,
        "audio": str(so762_dir / "audio/SPEAKER0001/000010011.opus"),
    }
    assert Path(first["audio"]).is_absolute() and Path(first["audio"]).is_file()


def test_real_opus_reads_as_16k_float(so762_dir):
    audio = load_audio(so762_dir / "audio/SPEAKER0001/000010011.opus")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 0.3 < audio.size / 16_000 < 10


def test_max_per_split(so762_dir):
    rows = load_speechocean(so762_dir, [], max_per_split=4)
    assert Counter(r["split"] for r in rows) == {"train": 4, "test": 4}
    assert [r["id"] for r in rows[:4]] == sorted(r["id"] for r in rows[:4])


def _fake_corpus(root: Path) -> Path:
    """Two tiny splits; Kaldi lists mix tabs and spaces and spk2age drops leading zeros."""
    lists = {
        "train": {
            "text": "000010001\tHELLO WORLD\n000010002 GOOD MORNING\n000020001\tNICE TO MEET YOU\n",
            "wav.scp": "000010001\taudio/SPEAKER0001/000010001.wav\n000010002 audio/SPEAKER0001/000010002.wav\n"
                       "000020001\taudio/SPEAKER0002/000020001.wav\n",
            "utt2spk": "000010001 0001\n000010002 0001\n000020001 0002\n",
            "spk2gender": "0001\tm\n0002 f\n",
            "spk2age": "1\t7\n0002 33\n",
        },
        "test": {
            "text": "000030001\tTHANK YOU\n",
            "wav.scp": "000030001\taudio/SPEAKER0003/000030001.wav\n",
            "utt2spk": "000030001\t0003\n",
            "spk2gender": "0003\tf\n",
            "spk2age": "0003\tunknown\n",
        },
    }
    for split, files in lists.items():
        (root / split).mkdir(parents=True)
        for name, content in files.items():
            (root / split / name).write_text(content)
    for utt in ("000010001", "000010002", "000020001", "000030001"):
        write_audio(root / "audio" / f"SPEAKER{utt[1:5]}" / f"{utt}.wav", tone(0.2))
    return root


def test_fake_corpus_rows(tmp_path):
    root = _fake_corpus(tmp_path / "so")
    rejects: list[dict] = []
    rows = {r["id"]: r for r in load_speechocean(root, rejects)}
    assert rejects == []
    assert set(rows) == {"so762-000010001", "so762-000010002", "so762-000020001", "so762-000030001"}
    assert rows["so762-000010002"]["text"] == "good morning"
    assert (rows["so762-000010001"]["speaker"], rows["so762-000010001"]["gender"], rows["so762-000010001"]["age"]) \
        == ("0001", "m", 7)  # age matched through the integer id
    assert (rows["so762-000020001"]["gender"], rows["so762-000020001"]["age"]) == ("f", 33)
    assert rows["so762-000030001"]["split"] == "test" and rows["so762-000030001"]["age"] is None
    assert sf.info(rows["so762-000020001"]["audio"]).samplerate == 16_000


def test_missing_wav_goes_to_rejects(tmp_path):
    root = _fake_corpus(tmp_path / "so")
    (root / "audio/SPEAKER0001/000010002.wav").unlink()
    rejects: list[dict] = []
    rows = load_speechocean(root, rejects)
    assert "so762-000010002" not in {r["id"] for r in rows} and len(rows) == 3
    assert len(rejects) == 1 and rejects[0]["id"] == "so762-000010002"
    assert rejects[0]["source"].endswith("000010002.wav") and "missing" in rejects[0]["reason"]


def test_bad_transcripts_and_unlisted_audio_go_to_rejects(tmp_path):
    root = _fake_corpus(tmp_path / "so")
    (root / "train/text").write_text(
        "000010001\tHELLO WORLD\n000010002\t你好\n000020001\n000099999\tNOT IN WAV SCP\n")
    rejects: list[dict] = []
    rows = load_speechocean(root, rejects)
    assert [r["id"] for r in rows] == ["so762-000010001", "so762-000030001"]
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert set(reasons) == {"so762-000010002", "so762-000020001", "so762-000099999"}
    assert "non-ASCII" in reasons["so762-000010002"]
    assert "empty" in reasons["so762-000020001"]
    assert "wav.scp" in reasons["so762-000099999"]


def test_max_per_split_counts_kept_rows_only(tmp_path):
    root = _fake_corpus(tmp_path / "so")
    (root / "audio/SPEAKER0001/000010001.wav").unlink()  # first utterance rejected
    rows = load_speechocean(root, [], max_per_split=2)
    assert [r["id"] for r in rows] == ["so762-000010002", "so762-000020001", "so762-000030001"]


@pytest.mark.parametrize("name", ["text", "wav.scp", "utt2spk", "spk2gender", "spk2age"])
def test_missing_list_file_is_a_clear_error(tmp_path, name):
    root = _fake_corpus(tmp_path / "so")
    (root / "test" / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"test/{name}: missing Kaldi list"):
        load_speechocean(root, [])


def test_missing_root_names_the_param(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prepare\.speechocean\.dir") as e:
        load_speechocean(tmp_path / "nowhere", [])
    assert "train/ and test/" in str(e.value) and "null to skip" not in str(e.value)  # null breaks dvc.yaml deps


def test_malformed_list_line(tmp_path):
    root = _fake_corpus(tmp_path / "so")
    (root / "train/utt2spk").write_text("000010001 0001\n000010002\n")
    with pytest.raises(ValueError, match=r"utt2spk:2"):
        load_speechocean(root, [])
