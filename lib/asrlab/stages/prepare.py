"""Stage `prepare`: SLURP sentences split per scenario, lm.txt tagged with a scenario, speechocean762 rows.

Outputs (``prepare.out_dir``): ``slurp.jsonl``, ``lm.jsonl``, ``recordings.jsonl`` (rows that already have
audio: speechocean762, and the official SLURP recordings when configured), ``rejects.jsonl``,
and the tagger at ``prepare.tagger.path``, an output of its own: its pickle is not byte-stable across runs,
and no stage should rerun because of that; metrics ``results/data/stats.json``.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import joblib
from sklearn.metrics import accuracy_score, f1_score

from asrlab.data import slurp
from asrlab.data.speechocean import load_speechocean
from asrlab.data.tagger import tag, train_tagger
from asrlab.io import atomic_path, write_json, write_jsonl
from asrlab.params import checked

# Checked whole before anything is read or written: a misspelt optional key fell back to its default
# (`speechocean.max_per_split` misspelt read all 5,000 recordings). speechocean.dir null: tests only.
SCHEMA = {"prepare": {
    "seed": int, "out_dir": str, "stats": str, "lm_dev_sentences": int,
    "slurp": {"text_dir": str, "lm_text": str, "official_root?": str, "split": {str: float}},
    "tagger": {"C": float, "path": str},
    "speechocean": {"dir?": str, "max_per_split?": int}}}


def check_params(params: dict) -> dict:
    """The `prepare` section checked whole, and official_root inside the SLURP folder dvc.yaml declares."""
    p = checked(params, "prepare", SCHEMA)
    root, text_dir = p["slurp"].get("official_root"), p["slurp"]["text_dir"]
    if root and Path(root).exists() and not Path(root).resolve().is_relative_to(Path(text_dir).resolve()):
        # dvc.yaml declares text_dir, the one SLURP folder (a null official_root cannot be a DVC dependency)
        raise ValueError(f"prepare.slurp.official_root {root} is not inside prepare.slurp.text_dir {text_dir}, the "
                         "SLURP folder dvc.yaml declares: set text_dir to the official release's folder too")
    return p


def run(params: dict) -> dict:
    p = check_params(params)
    t0 = time.time()
    out = Path(p["out_dir"])
    rejects: list[dict] = []
    sl = p["slurp"]
    recordings: list[dict] = []
    if sl.get("official_root"):
        sentences, recordings = slurp.load_official(sl["official_root"], rejects)
    else:
        sentences = slurp.load_text_only(sl["text_dir"], sl["split"], p["seed"], rejects)

    # Scenario tagger: fit on train, report on dev, label lm.txt.
    train = [r for r in sentences if r["split"] == "train"]
    dev = [r for r in sentences if r["split"] == "dev"]
    model = train_tagger([r["text"] for r in train], [r["scenario"] for r in train], C=p["tagger"]["C"], seed=p["seed"])
    dev_pred, _ = tag(model, [r["text"] for r in dev])
    dev_gold = [r["scenario"] for r in dev]
    tagger_metrics = {
        "dev_accuracy": round(accuracy_score(dev_gold, dev_pred), 4),
        "dev_macro_f1": round(f1_score(dev_gold, dev_pred, average="macro"), 4),
        "train_sentences": len(train), "dev_sentences": len(dev),
    }

    lm = slurp.read_lm(sl["lm_text"], rejects)
    # lm.txt is SLURP's train side; drop any sentence that is also a labelled dev/test sentence (no leakage).
    held = {r["text"] for r in sentences if r["split"] != "train"}
    n_lm_read = len(lm)
    lm = [r for r in lm if r["text"] not in held]
    scenarios, probs = tag(model, [r["text"] for r in lm])
    rng = random.Random(f"{p['seed']}/lm-dev")
    dev_ids = set(rng.sample([r["id"] for r in lm], min(p["lm_dev_sentences"], len(lm))))
    lm = [{**r, "scenario": s, "tag_prob": pr, "split": "dev" if r["id"] in dev_ids else "train"}
          for r, s, pr in zip(lm, scenarios, probs)]

    so = p.get("speechocean") or {}
    if so.get("dir"):
        recordings += load_speechocean(so["dir"], rejects, so.get("max_per_split"))

    write_jsonl(out / "slurp.jsonl", sentences)
    write_jsonl(out / "lm.jsonl", lm)
    write_jsonl(out / "recordings.jsonl", recordings)
    write_jsonl(out / "rejects.jsonl", rejects)
    with atomic_path(p["tagger"]["path"]) as tmp:
        joblib.dump(model, tmp)

    stats = {
        "slurp": {
            "sentences": len(sentences),
            "per_split": dict(sorted(Counter(r["split"] for r in sentences).items())),
            "per_scenario_split": {s: dict(sorted(Counter(r["split"] for r in sentences if r["scenario"] == s).items()))
                                   for s in sorted({r["scenario"] for r in sentences})},
        },
        "lm": {"sentences_read": n_lm_read, "dropped_overlap_dev_test": n_lm_read - len(lm), "sentences": len(lm),
               "per_tagged_scenario": dict(sorted(Counter(r["scenario"] for r in lm).items()))},
        "recordings": {f"{k[0]}/{k[1]}": v for k, v in sorted(Counter((r["pool"], r["split"]) for r in recordings).items())},
        "tagger": tagger_metrics,
        "rejects": {"total": len(rejects)},
        "wall_seconds": round(time.time() - t0, 2),
    }
    write_json(p["stats"], stats)
    print(f"[prepare] {len(sentences)} SLURP sentences, {len(lm)} lm sentences, {len(recordings)} recordings, "
          f"{len(rejects)} rejects; tagger dev accuracy {tagger_metrics['dev_accuracy']:.3f}")
    return stats
