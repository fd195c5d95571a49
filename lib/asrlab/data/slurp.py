"""SLURP (Bastianelli et al., EMNLP 2020): loaders for the text-only copy and the official layout, and the
deterministic per-scenario split of the labelled sentences.

Text-only copy (the default here): ``devel.jsonl`` + ``test.jsonl`` (5,007 labelled sentences) and ``lm.txt``.
Official layout (when a user has it): ``<root>/dataset/slurp/{train,train_synthetic,devel,test}.jsonl`` with
recordings in ``<root>/audio/slurp_real`` and ``<root>/audio/slurp_synth``; its own train/devel/test split is
kept and every recording becomes a manifest row with its audio path.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from asrlab.text import TranscriptError, normalize_transcript

SCENARIOS = (
    "alarm", "audio", "calendar", "cooking", "datetime", "email", "general", "iot", "lists", "music",
    "news", "play", "qa", "recommendation", "social", "takeaway", "transport", "weather",
)
SPLITS = ("train", "dev", "test")
OFFICIAL_SPLITS = {"train": "train", "devel": "dev", "test": "test"}


def require_dir(path: str | Path, what: str, param: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} not found at {path.resolve()}: set `{param}` in params.yaml to the folder that holds it")
    return path


def check_scenarios(names, where: str) -> None:
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"{where}: unknown scenario(s) {unknown}; SLURP has {list(SCENARIOS)}")


def read_labelled(path: Path, rejects: list[dict]) -> list[dict]:
    """One row per labelled sentence of a SLURP jsonl file; bad transcripts go to ``rejects``."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
                sid, sentence, scenario = obj["slurp_id"], obj["sentence"], obj["scenario"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{where}: not a SLURP record ({e}); expected slurp_id, sentence, scenario") from e
            check_scenarios([scenario], where)
            try:
                text = normalize_transcript(sentence, where)
            except TranscriptError as e:
                rejects.append({"id": f"slurp-{sid}", "source": str(path), "line": lineno, "reason": str(e)})
                continue
            rows.append({
                "id": f"slurp-{sid}", "text": text, "scenario": scenario, "intent": obj.get("intent"),
                "corpus": "slurp", "recordings": [r["file"] for r in obj.get("recordings", [])],
            })
    return rows


def split_labelled(rows: list[dict], fractions: dict[str, float], seed: int) -> list[dict]:
    """Assign train/dev/test per scenario, deterministically, with no sentence in two splits.

    Identical sentences (after normalisation) are one unit: each unique text belongs to the scenario most
    of its rows carry, units are shuffled per scenario with a seed derived from (seed, scenario), and cut by
    ``fractions``. Every row then takes its text's split.
    """
    if set(fractions) != set(SPLITS) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"split fractions must give {SPLITS} summing to 1, got {fractions}")
    votes: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        votes[r["text"]][r["scenario"]] += 1
    by_scenario: dict[str, list[str]] = defaultdict(list)
    for text, c in votes.items():
        by_scenario[max(sorted(c), key=c.__getitem__)].append(text)
    split_of: dict[str, str] = {}
    for scenario, texts in sorted(by_scenario.items()):
        texts.sort()
        random.Random(f"{seed}/{scenario}").shuffle(texts)
        n_train = round(fractions["train"] * len(texts))
        n_dev = round(fractions["dev"] * len(texts))
        for i, t in enumerate(texts):
            split_of[t] = "train" if i < n_train else "dev" if i < n_train + n_dev else "test"
    return [{**r, "split": split_of[r["text"]]} for r in rows]


def load_text_only(text_dir: str | Path, fractions: dict, seed: int, rejects: list[dict]) -> list[dict]:
    text_dir = require_dir(text_dir, "SLURP text", "prepare.slurp.text_dir")
    rows = []
    for name in ("devel.jsonl", "test.jsonl"):
        path = text_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the SLURP text copy needs devel.jsonl and test.jsonl")
        rows += read_labelled(path, rejects)
    return split_labelled(rows, fractions, seed)


def load_official(root: str | Path, rejects: list[dict]) -> tuple[list[dict], list[dict]]:
    """Labelled sentences with the official split, and one row per recording (real and synthetic)."""
    root = require_dir(root, "official SLURP", "prepare.slurp.official_root")
    ds = require_dir(root / "dataset" / "slurp", "official SLURP dataset/slurp", "prepare.slurp.official_root")
    sentences, recordings = [], []
    speakers = _speakers(ds)
    for fname, split in OFFICIAL_SPLITS.items():
        for r in read_labelled(ds / f"{fname}.jsonl", rejects):
            sentences.append({**r, "split": split})
            recordings += _recording_rows(r, split, root / "audio" / "slurp_real", "slurp_real", rejects, speakers)
    synth = ds / "train_synthetic.jsonl"
    if synth.is_file():
        for r in read_labelled(synth, rejects):
            recordings += _recording_rows(r, "train", root / "audio" / "slurp_synth", "slurp_synth", rejects, speakers)
    return sentences, recordings


def _speakers(ds: Path) -> dict[str, str]:
    """Recording file -> speaker (``usrid``) from the official ``metadata.json``; empty when it is absent.

    SLURP file names (``audio-1434542201-headset.flac``) carry a timestamp, not a speaker.
    """
    meta = ds / "metadata.json"
    if not meta.is_file():
        return {}
    with open(meta) as f:
        return {fname: rec.get("usrid") for entry in json.load(f).values()
                for fname, rec in (entry.get("recordings") or {}).items()}


def _recording_rows(row: dict, split: str, audio_dir: Path, pool: str, rejects: list[dict],
                    speakers: dict[str, str] | None = None) -> list[dict]:
    out = []
    for fname in row["recordings"]:
        path = audio_dir / fname
        rid = f"{row['id']}-{Path(fname).stem}@{pool}"
        if not path.is_file():
            rejects.append({"id": rid, "source": str(path), "reason": "recording listed but file missing"})
            continue
        out.append({"id": rid, "text": row["text"], "scenario": row["scenario"], "accent": "native",
                    "split": split, "corpus": "slurp", "pool": pool, "speaker": (speakers or {}).get(fname),
                    "audio": str(path)})
    return out


def read_lm(path: str | Path, rejects: list[dict]) -> list[dict]:
    """``lm.txt``: one unlabelled sentence a line, normalised; duplicates kept once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.resolve()}: SLURP lm.txt not found; set `prepare.slurp.lm_text`")
    seen, rows = set(), []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = normalize_transcript(line, f"{path}:{lineno}")
            except TranscriptError as e:
                rejects.append({"id": f"lm-{lineno}", "source": str(path), "line": lineno, "reason": str(e)})
                continue
            if text not in seen:
                seen.add(text)
                rows.append({"id": f"lm-{lineno}", "text": text, "corpus": "slurp_lm"})
    return rows
