"""Stage `eval_base`: score the base models per scenario on synthetic and real-proxy test speech and on
speechocean762 test. Every (model, test set, decoding) is an MLflow run with overall and per-group WER and
CER, provenance tags and the hypotheses TSV; ``results/base/metrics.json`` gathers the headline numbers and
``results/base/table.md`` shows them side by side.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlflow
import torch

from asrlab import tracking
from asrlab.audio.features import FeatureStore
from asrlab.decode import transcribe
from asrlab.evaluation import flat_metrics, score, write_hypotheses
from asrlab.io import write_json, write_text
from asrlab.models import store
from asrlab.tokenizer import load_tokenizer
from asrlab.training.data import SpeechData, select


def run(params: dict) -> dict:
    p = params["eval_base"]
    torch.set_num_threads(int(os.environ.get("ASRLAB_THREADS", os.cpu_count() or 1)))
    tok = load_tokenizer(params["tokenizer"]["out_dir"])
    fs = FeatureStore(params["features"]["out_dir"])
    rows = list(fs.rows.values())
    out_dir = Path(p["out_dir"])
    index_md5 = tracking.file_hash(Path(fs.dir) / "index.jsonl")  # once: the same for every run below
    results: dict = {}
    for model_name, spec in p["models"].items():
        _, model = store.load(spec["path"])
        tags = {"checkpoint_md5": tracking.file_hash(spec["path"]), "features_index_md5": index_md5}
        for set_name, sel in p["sets"].items():
            data = SpeechData(select(rows, sel), fs, tok, max_frames=model.max_frames)
            for method in spec["decoding"]:
                t0 = time.time()
                hyps = transcribe(model, data, tok, method=method, desc=f"{model_name}/{set_name}/{method}")
                seconds = time.time() - t0
                scored = [{**{k: r.get(k) for k in ("id", "scenario", "accent", "pool", "corpus", "speaker")},
                           "ref": r["text"], "hyp": h} for r, h in zip(data.rows, hyps)]
                scores = score(scored)
                name = f"{model_name}-{set_name}-{method}"
                hyp_path = out_dir / "hyps" / f"{name}.tsv"
                write_hypotheses(hyp_path, scored)
                with tracking.run("base_eval", name, params={"model": model_name, "model_path": spec["path"],
                                                              "test_set": set_name, "decoding": method,
                                                              "selection": str(sel)}, tags=tags):
                    mlflow.log_metrics(flat_metrics(scores))
                    mlflow.log_metric("utt_per_s", len(hyps) / seconds)
                    mlflow.log_artifact(str(hyp_path))
                results[name] = {"wer": scores["overall"]["wer"], "cer": scores["overall"]["cer"],
                                 "utterances": scores["overall"]["utterances"],
                                 "per_group": {k: {"wer": v["wer"], "cer": v["cer"]} for k, v in scores.items()
                                               if k != "overall"}}
                print(f"[eval_base] {name}: WER {scores['overall']['wer']:.1f} CER {scores['overall']['cer']:.1f} "
                      f"({len(hyps)} utt, {len(hyps) / seconds:.0f} utt/s)")
    write_json(p["metrics"], {k: {m: v[m] for m in ("wer", "cer", "utterances")} for k, v in results.items()})
    write_json(out_dir / "per_group.json", {k: v["per_group"] for k, v in results.items()})
    lines = ["| model | test set | decoding | utterances | WER % | CER % |", "|---|---|---|---:|---:|---:|"]
    for k, v in results.items():
        m, s, d = k.split("-")
        lines.append(f"| {m} | {s} | {d} | {v['utterances']} | {v['wer']:.1f} | {v['cer']:.1f} |")
    write_text(out_dir / "table.md", "\n".join(lines) + "\n")
    return results
