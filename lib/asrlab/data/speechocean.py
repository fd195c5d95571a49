"""speechocean762 (Zhang et al., Interspeech 2021): Kaldi-style lists -> manifest rows.

Rows carry speaker, gender, age and split; the audio path is absolute so later stages need no corpus root.
Kaldi lists here mix tabs and spaces, and ``spk2age`` may drop the leading zeros of speaker ids, so ids
are matched as integers where the strings differ.
"""

from __future__ import annotations

from pathlib import Path

from asrlab.text import TranscriptError, normalize_transcript

SPLITS = {"train": "train", "test": "test"}


def read_kaldi_map(path: Path, allow_empty: bool = False) -> dict[str, str]:
    """``<key> <value>`` lines; with ``allow_empty`` a bare key maps to "" (Kaldi's empty transcript)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing Kaldi list; speechocean762 needs text, wav.scp, utt2spk, "
                                "spk2gender and spk2age in each split folder")
    out = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().split(maxsplit=1)
            if len(parts) == 1 and allow_empty:
                parts.append("")
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected '<key> <value>', got {line.strip()!r}")
            out[parts[0]] = parts[1]
    return out


def _by_int(mapping: dict[str, str]) -> dict[int, str]:
    return {int(k): v for k, v in mapping.items() if k.isdigit()}


def load_speechocean(root: str | Path, rejects: list[dict], max_per_split: int | None = None) -> list[dict]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"speechocean762 not found at {root.resolve()}: set `prepare.speechocean.dir` "
                                "in params.yaml to the folder that holds its train/ and test/ Kaldi lists "
                                "(dvc.yaml depends on both, so it cannot be null)")
    rows = []
    for folder, split in SPLITS.items():
        d = root / folder
        text = read_kaldi_map(d / "text", allow_empty=True)  # an empty transcript is a reject, not a crash
        wav, utt2spk = (read_kaldi_map(d / n) for n in ("wav.scp", "utt2spk"))
        gender, age = _by_int(read_kaldi_map(d / "spk2gender")), _by_int(read_kaldi_map(d / "spk2age"))
        n = 0
        for utt in sorted(text):
            if max_per_split is not None and n >= max_per_split:
                break
            uid = f"so762-{utt}"
            where = f"{d / 'text'}: utterance {utt}"
            if utt not in wav or utt not in utt2spk:
                rejects.append({"id": uid, "source": str(d), "reason": f"{where} has no wav.scp/utt2spk entry"})
                continue
            try:
                norm = normalize_transcript(text[utt], where)
            except TranscriptError as e:
                rejects.append({"id": uid, "source": str(d / "text"), "reason": str(e)})
                continue
            audio = root / wav[utt]
            if not audio.is_file():
                rejects.append({"id": uid, "source": str(audio), "reason": "audio file listed in wav.scp is missing"})
                continue
            spk = utt2spk[utt]
            spk_int = int(spk) if spk.isdigit() else None
            age_s = age.get(spk_int)
            rows.append({
                "id": uid, "text": norm, "scenario": None, "accent": "mandarin", "split": split,
                "corpus": "speechocean762", "pool": "speechocean762", "speaker": spk,
                "gender": gender.get(spk_int), "age": int(age_s) if age_s and age_s.isdigit() else None,
                "audio": str(audio),
            })
            n += 1
    return rows
