"""Scenario tagger: trained on the train split only, useful on dev, and wired that way into `prepare`."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import joblib
import pytest

from asrlab.data.slurp import read_lm
from asrlab.data.tagger import tag, train_tagger
from asrlab.stages import prepare


@pytest.fixture(scope="module")
def tagger(slurp_split):
    """Fit on 30 train sentences per scenario (fast; the full train split takes ~15 s)."""
    per = defaultdict(list)
    for r in slurp_split:
        if r["split"] == "train" and len(per[r["scenario"]]) < 30:
            per[r["scenario"]].append(r)
    train = [r for rows in per.values() for r in rows]
    return train_tagger([r["text"] for r in train], [r["scenario"] for r in train], C=10.0, seed=0)


def test_dev_accuracy_well_above_chance(tagger, slurp_split):
    dev = [r for r in slurp_split if r["split"] == "dev"]
    pred, probs = tag(tagger, [r["text"] for r in dev])
    acc = sum(p == r["scenario"] for p, r in zip(pred, dev)) / len(dev)
    majority = Counter(r["scenario"] for r in dev).most_common(1)[0][1] / len(dev)
    assert len(tagger.classes_) == 18
    assert acc > 0.6  # chance is 1/18
    assert acc > 4 * majority  # the majority class is ~14 %
    assert all(0 < p <= 1 for p in probs)


@pytest.mark.parametrize("text, scenario", [
    ("wake me up at seven am tomorrow", "alarm"),
    ("will it rain tomorrow", "weather"),
    ("send an email to john about the meeting", "email"),
    ("turn off the lights in the kitchen", "iot"),
    ("order a pizza for delivery", "takeaway"),
    ("book a taxi to the airport", "transport"),
    ("add milk to my shopping list", "lists"),
])
def test_predicts_sensible_scenarios(tagger, text, scenario):
    pred, prob = tag(tagger, [text])
    assert pred == [scenario]
    assert prob[0] > 1 / 18


def test_tag_empty_and_single_scenario():
    assert tag(None, []) == ([], [])
    with pytest.raises(ValueError, match="two scenarios"):
        train_tagger(["set an alarm", "wake me up"], ["alarm", "alarm"])


def test_prepare_trains_tagger_on_train_split_only(small_slurp, make_params, monkeypatch):
    """`prepare` on a small copy: the tagger sees exactly the train sentences; lm.txt is tagged."""
    seen: dict = {}
    real_train = prepare.train_tagger

    def spy(texts, scenarios, **kw):
        seen["texts"], seen["scenarios"] = list(texts), list(scenarios)
        return real_train(texts, scenarios, **kw)

    monkeypatch.setattr(prepare, "train_tagger", spy)
    params = make_params()
    params["prepare"]["slurp"].update(text_dir=str(small_slurp), lm_text=str(small_slurp / "lm.txt"))
    stats = prepare.run(params)

    out = Path(params["prepare"]["out_dir"])
    sentences = [json.loads(line) for line in open(out / "slurp.jsonl")]
    assert len(sentences) == 18 * 12 * 2
    train = [r for r in sentences if r["split"] == "train"]
    assert seen["texts"] == [r["text"] for r in train]
    assert seen["scenarios"] == [r["scenario"] for r in train]
    held = {r["text"] for r in sentences if r["split"] != "train"}
    assert held and not held & set(seen["texts"])

    # the saved model is the one that was trained: it does not know dev/test-only words
    model = joblib.load(params["prepare"]["tagger"]["path"])
    words = model.steps[0][1].transformer_list[0][1]  # the word n-gram TF-IDF (min_df=1)
    analyse = words.build_analyzer()
    train_grams = {g for t in seen["texts"] for g in analyse(t)}
    held_only = {g for t in held for g in analyse(t)} - train_grams
    assert set(words.vocabulary_) == train_grams
    assert held_only and not held_only & set(words.vocabulary_)

    lm = [json.loads(line) for line in open(out / "lm.jsonl")]
    assert lm and all(r["scenario"] in model.classes_ and 0 < r["tag_prob"] <= 1 for r in lm)
    assert Counter(r["split"] for r in lm)["dev"] == params["prepare"]["lm_dev_sentences"]
    assert not held & {r["text"] for r in lm}  # no labelled dev/test sentence leaks into LM text
    lm_texts = {r["text"] for r in read_lm(small_slurp / "lm.txt", [])}
    assert stats["lm"]["dropped_overlap_dev_test"] == len(held & lm_texts) > 0
    assert stats["lm"]["sentences"] == len(lm_texts) - len(held & lm_texts)
    assert stats["tagger"]["train_sentences"] == len(train)
    assert stats["tagger"]["dev_sentences"] == sum(r["split"] == "dev" for r in sentences)
    assert stats["lm"]["sentences"] == len(lm)

    # speechocean762 rows capped by max_per_split; the non-ASCII lm line is a reject
    recs = [json.loads(line) for line in open(out / "recordings.jsonl")]
    assert Counter(r["split"] for r in recs) == {"train": 3, "test": 3}
    rejects = [json.loads(line) for line in open(out / "rejects.jsonl")]
    assert [r["id"] for r in rejects] == ["lm-161"]
    assert stats["rejects"]["total"] == 1
    assert json.loads(Path(params["prepare"]["stats"]).read_text()) == stats


def test_prepare_outputs_are_byte_identical_across_processes(small_slurp, make_params, tmp_path):
    """Other stages depend on data/prepared: a rerun must not change its hash (string hashing differs
    between processes, so run in two with different hash seeds)."""
    import hashlib
    import os
    import subprocess
    import sys

    import yaml

    digests = []
    for seed in ("1", "2"):
        params = make_params()
        params["prepare"]["slurp"].update(text_dir=str(small_slurp), lm_text=str(small_slurp / "lm.txt"))
        out = tmp_path / f"run{seed}"
        params["prepare"].update(out_dir=str(out), stats=str(out / "stats.json"))
        params["prepare"]["tagger"]["path"] = str(tmp_path / f"tagger{seed}.joblib")
        (tmp_path / f"p{seed}.yaml").write_text(yaml.safe_dump(params))
        proc = subprocess.run([sys.executable, "-m", "asrlab.cli", "--params", str(tmp_path / f"p{seed}.yaml"),
                               "prepare"], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        digests.append({f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in sorted(out.glob("*.jsonl"))})
    assert digests[0] == digests[1] and len(digests[0]) == 4
