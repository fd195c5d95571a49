"""Inference speed (utterances/s) of HDMoLE against a merged LoRA and the frozen base LLM-ASR.

Each model decodes the same accent test utterances from log-mel features (encoder included, greedy attention
decoding, as ``hdmole_train`` scores them), median wall time of ``--repeats`` passes after one warm-up; and
a teacher-forced forward pass on the references (the same tokens for every model: decoding speed also
depends on how long each model's hypotheses are, recorded as ``mean_hyp_words``):

- ``base``: the frozen base LLM-ASR;
- ``lora_merged``: peft LoRA on the projector with its weights merged into the Linear layers (the base's cost);
- ``hdmole``: the HDMoLE projector (accent router, local routers, thresholds, E LoRA experts), unmerged — a
  routed mixture cannot be merged, its weights depend on the input.

Trained adapters of seed 0 from ``models/hdmole`` when present (``make repro`` first), else random ones of the
default shapes (the cost does not depend on the values, only on the number of active experts). Writes
``results/bench/hdmole.json``. Run on an idle machine: ``python benchmarks/hdmole_bench.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from machine import facts, summary_line  # noqa: E402

from asrlab.audio.features import FeatureStore  # noqa: E402
from asrlab.decode import transcribe  # noqa: E402
from asrlab.io import write_json  # noqa: E402
from asrlab.methods.hdmole import AccentLLMASR, MoLEConfig, load_adapters  # noqa: E402
from asrlab.models import store  # noqa: E402
from asrlab.params import load_params  # noqa: E402
from asrlab.stages.hdmole import systems  # noqa: E402
from asrlab.tokenizer import load_tokenizer  # noqa: E402
from asrlab.training.data import SpeechData  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", default="test/germanic", help="a cached selection of hdmole_cache")
    ap.add_argument("--lora", default="lora_r32", help="the LoRA system of params whose adapters are merged")
    ap.add_argument("--out", default=str(ROOT / "results/bench/hdmole.json"))
    args = ap.parse_args()
    load_before, t_start = os.getloadavg(), time.time()
    os.chdir(ROOT)
    params = load_params("params.yaml")
    p = params["hdmole"]
    torch.set_num_threads(int(os.environ.get("ASRLAB_THREADS", os.cpu_count() or 1)))
    tok = load_tokenizer(params["tokenizer"]["out_dir"])
    fs = FeatureStore(params["features"]["out_dir"])
    rows = json.loads((Path(p["cache_dir"]) / args.set / "rows.json").read_text())
    data = SpeechData([fs.rows[r["id"]] for r in rows], fs, tok)
    models_dir = Path(p["models_dir"])
    sources = {}

    def base_model():
        return store.load(p["base"])[1]

    frozen = AccentLLMASR(base_model(), None, keep_encoder=True)
    lora = AccentLLMASR(base_model(), None, keep_encoder=True)
    rank = systems(p)[args.lora]["rank"]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(p["lora_targets"])),
                            lora.projector)
    trained = models_dir / f"{args.lora}-s0" / "adapters.safetensors"
    if trained.is_file():
        lora.load_state_dict(load_file(str(trained)), strict=False)
        sources["lora_merged"] = str(trained)
    else:
        for m in lora.modules():
            if isinstance(m, LoraLayer):
                torch.nn.init.normal_(m.lora_B["default"].weight, std=0.01)
        sources["lora_merged"] = "random"
    for m in lora.modules():
        if isinstance(m, LoraLayer):
            m.merge()
    adapters = models_dir / "hdmole-s0" / "adapters.safetensors"
    if adapters.is_file():
        with safe_open(str(adapters), "pt") as f:
            cfg = MoLEConfig(**json.loads(f.metadata()["hdmole_config"]))
        hd = AccentLLMASR(base_model(), cfg, keep_encoder=True)
        load_adapters(hd, adapters)
        sources["hdmole"] = str(adapters)
    else:
        cfg = MoLEConfig(**{**p["mole"], "domains": len(p["domains"])})
        hd = AccentLLMASR(base_model(), cfg, keep_encoder=True)
        sources["hdmole"] = "random"
    models = {"base": frozen, "lora_merged": lora, "hdmole": hd}

    def forward_pass(model) -> None:
        """Teacher-forced forward on the references: the same tokens for every model."""
        model.eval()
        with torch.no_grad():
            for i in range(0, len(data), 16):
                model(**data.collate(list(range(i, min(i + 16, len(data))))))

    def decode(model) -> list[str]:
        return transcribe(model, data, tok, progress=False, max_new_tokens=params["pretrain_llm_asr"]["max_tokens"] + 2)

    hyps = {name: decode(model) for name, model in models.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    fwd: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):  # round robin: a change in machine load hits every model alike
        for name, model in models.items():
            t0 = time.perf_counter()
            decode(model)
            times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            forward_pass(model)
            fwd[name].append(time.perf_counter() - t0)
    results = {}
    for name in models:
        med, med_fwd = statistics.median(times[name]), statistics.median(fwd[name])
        # decoding speed also depends on how long the hypotheses are: record their mean length
        results[name] = {"utterances": len(data), "median_s": round(med, 4), "utt_per_s": round(len(data) / med, 2),
                         "times_s": [round(t, 4) for t in times[name]], "mean_hyp_words": round(
                             sum(len(h.split()) for h in hyps[name]) / len(data), 2),
                         "forward_utt_per_s": round(len(data) / med_fwd, 2)}
        print(f"{name:<12} {len(data)} utt  decode {len(data) / med:7.1f} utt/s (mean hyp "
              f"{results[name]['mean_hyp_words']} words)  teacher-forced forward {len(data) / med_fwd:7.1f} utt/s")
    for name in ("lora_merged", "hdmole"):
        for k in ("utt_per_s", "forward_utt_per_s"):
            results[name][f"{k}_relative_to_base"] = round(results[name][k] / results["base"][k], 3)
    result = {"set": args.set, "repeats": args.repeats, "models": results, "adapters": sources,
              "experts": cfg.experts, "routing": cfg.routing, "total_wall_s": round(time.time() - t_start, 1),
              "machine": facts(load_before)}
    write_json(args.out, result)
    print(summary_line(result, args.out))


if __name__ == "__main__":
    main()
