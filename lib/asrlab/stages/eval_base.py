"""Stage `eval_base`: score zero-shot Whisper and the base models on every test set, per group.

Models (``eval_base.models``): the imported Whisper zero-shot (the 30-s window: ``window: true``), the base
AED (fine-tuned Whisper: attention and its character CTC head), the base LLM-ASR, and any other model folder.
Sets (``eval_base.sets``): synthetic, real-proxy and accent test speech of SLURP and speechocean762 test
(real non-native speech). Every (model, set, decoding) goes through the one evaluation path
(:func:`asrlab.evaluation.evaluate`): an MLflow run with overall and per-group WER/CER, provenance tags and
the hypotheses TSV. ``results/base/metrics.json`` gathers the numbers, ``table.md`` shows them side by side,
``headline.json`` is ``{model: {set: {"wer", "cer"}}}`` for each model's first decoding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from asrlab import tracking
from asrlab.params import Folder, checked
from asrlab.audio.features import FeatureStore
from asrlab.evaluation import evaluate
from asrlab.io import write_json, write_text
from asrlab.models import store
from asrlab.training.data import SELECTION, SpeechData, select


SCHEMA = {"eval_base": {
    "out_dir": str, "metrics": str, "max_frames": int, "max_new_tokens": int, "precision?": str,
    "models": {str: {"path": Folder, "decoding": [str], "window?": bool}}, "sets": {str: SELECTION}}}


def run(params: dict) -> dict:
    p = checked(params, "eval_base", SCHEMA)
    fs = FeatureStore(params["features"]["out_dir"])
    rows = list(fs.rows.values())
    out_dir = Path(p["out_dir"])
    index_md5 = tracking.file_hash(Path(fs.dir) / "index.jsonl")  # once: the same for every run below
    results: dict = {}
    headline: dict = {}
    for model_name, spec in p["models"].items():
        _, model = store.load(spec["path"])
        tok = store.tokenizer(spec["path"])
        window = bool(spec.get("window", False))
        tags = {"checkpoint_md5": tracking.file_hash(spec["path"]), "features_index_md5": index_md5}
        for set_name, sel in p["sets"].items():
            data = SpeechData(select(rows, sel), fs, tok, max_frames=model.max_frames)
            for method in spec["decoding"]:
                name = f"{model_name}-{set_name}-{method}"
                result = evaluate(model, data, tok, method=method, window=window, max_frames=p["max_frames"],
                                  max_new_tokens=p["max_new_tokens"], precision=p["precision"], hyps_path=out_dir / "hyps" / f"{name}.tsv",
                                  experiment="base_eval", run_name=name, tags=tags,
                                  params={"model": model_name, "model_path": spec["path"], "test_set": set_name,
                                          "selection": str(sel)})
                results[name] = result.summary()
                if method == spec["decoding"][0]:
                    headline.setdefault(model_name, {})[set_name] = {"wer": result.wer, "cer": result.cer}
                print(f"[eval_base] {name}: WER {result.wer:.1f} CER {result.cer:.1f} "
                      f"({len(data)} utt, {len(data) / result.seconds:.1f} utt/s)")
    write_json(p["metrics"], {k: {m: v[m] for m in ("wer", "cer", "utterances")} for k, v in results.items()})
    write_json(out_dir / "per_group.json", {k: v["per_group"] for k, v in results.items()})
    write_json(out_dir / "headline.json", headline)
    lines = ["| model | test set | decoding | utterances | WER % | CER % |", "|---|---|---|---:|---:|---:|"]
    for k, v in results.items():
        m, s, d = k.split("-")
        lines.append(f"| {m} | {s} | {d} | {v['utterances']} | {v['wer']:.1f} | {v['cer']:.1f} |")
    write_text(out_dir / "table.md", "\n".join(lines) + "\n")
    return results
