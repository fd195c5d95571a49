"""Stages ``soft_tokens_sweep`` and ``soft_tokens_eval`` of the soft_tokens study (arXiv 2606.06806).

- ``soft_tokens_sweep``: per evaluation condition (dev set) and K, an Optuna study of the temperature τ of
  the soft assignment, objective the dev WER averaged over the hard-token models' seeds. A log-spaced grid
  is enqueued first (so the WER-against-τ curve is seen whole), then TPE. ``sweep.metric`` picks WER (the
  paper) or CER (steadier where a small character CTC model leaves WER near 100 %). Every trial is an MLflow run
  (experiment ``soft_tokens_sweep``). Storage: ``OPTUNA_STORAGE`` or ``sqlite:///<repo>/optuna.db``; a
  rerun resumes a study by name (its inputs' hash is in the name).
- ``soft_tokens_eval``: every system on every test set — continuous features, K hard/hard, K hard/soft at
  the condition's τ* — one MLflow run each (experiment ``soft_tokens_eval``); the table (mean ± std over
  seeds), the CSV, WER against τ (the figure) and ``metrics.json`` with every stage's wall time.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import torch

from asrlab import evaluation, tracking
from asrlab.evaluation import write_hypotheses
from asrlab.io import stable_hash, write_json, write_text
from asrlab.ssl.layerdata import LayerSet
from asrlab.stages.soft_tokens import _paths, _section, load_centroids, load_downstream, systems
from asrlab.sweep import run_study

DECODE_FRAMES = 20000  # padded frames per decoding batch


def ctc_eval(model, data: LayerSet, **kwargs) -> evaluation.Evaluation:
    """Greedy character CTC on ``data`` in its current input mode, overall WER/CER (the one evaluation path)."""
    return evaluation.evaluate(model, data, None, method="ctc", max_frames=DECODE_FRAMES, group_keys=(),
                               progress=False, **kwargs)


def mean_rates(models: list, data: LayerSet) -> tuple[float, float]:
    """WER and CER averaged over the seeds' models."""
    evs = [ctc_eval(m, data) for m in models]
    return statistics.mean(e.wer for e in evs), statistics.mean(e.cer for e in evs)


def _models(p: dict, k: int) -> list:
    return [load_downstream(_paths(p)["downstream"] / f"k{k}-s{seed}.safetensors") for seed in p["downstream"]["seeds"]]


def sweep(params: dict) -> dict:
    p, t0 = _section(params), time.time()
    sw, paths = p["sweep"], _paths(p)
    lo, hi = sw["tau_range"]
    metric = sw.get("metric", "wer")
    out = {"tau_range": [lo, hi], "metric": metric, "conditions": {}}
    inputs = stable_hash(sw, tracking.file_hash(paths["downstream"]), tracking.file_hash(paths["centroids"]), n=10)
    for cond in p["sets"]["dev"]:
        dev = LayerSet(paths["layer"], f"dev_{cond}")
        out["conditions"][cond] = {}
        for k in p["kmeans"]["ks"]:
            c, models = load_centroids(p, k), _models(p, k)
            hard_wer, hard_cer = mean_rates(models, dev.use("tokens", c))

            def objective(trial: optuna.Trial) -> tuple[float, dict]:
                tau = trial.suggest_float("tau", lo, hi, log=True)
                wer, cer = mean_rates(models, dev.use("soft", c, tau, sw.get("top_k")))
                return {"wer": wer, "cer": cer}[metric], {"wer": wer, "cer": cer, "hard_wer": hard_wer,
                                                          "hard_cer": hard_cer}

            study = run_study(f"soft_tokens-{cond}-k{k}-{inputs}", objective, sw["n_trials"],
                              experiment="soft_tokens_sweep", run_prefix=f"{cond}-k{k}", seed=sw.get("seed", 0),
                              startup_trials=sw["startup_trials"], show_progress=False,
                              enqueue=[{"tau": float(t)} for t in np.geomspace(lo, hi, sw["grid_points"])],
                              run_params={"k": k, "set": f"dev_{cond}", "top_k": sw.get("top_k"),
                                          "seeds": len(models)})
            trials = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                            key=lambda t: t.params["tau"])
            best = study.best_trial
            out["conditions"][cond][str(k)] = {
                "tau_star": best.params["tau"], "dev_wer_soft": best.user_attrs["wer"],
                "dev_cer_soft": best.user_attrs["cer"], "dev_wer_hard": hard_wer, "dev_cer_hard": hard_cer,
                "study": study.study_name,
                "trials": [{"tau": t.params["tau"], "wer": t.user_attrs["wer"], "cer": t.user_attrs["cer"]} for t in trials]}
            print(f"[soft_tokens_sweep] {cond} K={k}: hard WER/CER {hard_wer:.1f}/{hard_cer:.1f}, "
                  f"τ*={best.params['tau']:.3g} -> {best.user_attrs['wer']:.1f}/{best.user_attrs['cer']:.1f}")
    out["wall_seconds"] = round(time.time() - t0, 1)
    write_json(paths["results"] / "sweep.json", out)
    return out


# ------------------------------------------------------------------------------------------------ phones


def phones(params: dict) -> dict:
    """The paper's alignment analysis with exact labels: every frame of the MBROLA-rendered test utterances
    gets its phone from espeak-ng's ``.pho`` (:mod:`asrlab.audio.phones`); per K, phone purity and PNMI of the
    hard tokens, and the phone separability of the downstream's input representations — hard ``E[k]`` against
    soft ``p(k|x) @ E`` at the condition's τ* — beside the continuous layer."""
    from asrlab.audio.features import FeatureStore
    from asrlab.audio.phones import row_labels
    from asrlab.methods.soft_tokens import hard_assign, phone_alignment, phone_separability, soft_assign

    p, t0 = _section(params), time.time()
    paths, ph = _paths(p), p["phones"]
    unknown = [c for c in ph["sets"] if c not in p["sets"]["test"]]
    if unknown:
        raise ValueError(f"soft_tokens.phones.sets {unknown} are not test sets ({list(p['sets']['test'])})")
    taus = _read_json(paths["results"] / "sweep.json")["conditions"]
    missing = [c for c in ph["sets"] if c not in taus]
    if missing:
        raise ValueError(f"soft_tokens.phones.sets {missing} have no dev set, so no τ*: add them to soft_tokens.sets.dev")
    index = FeatureStore(params["features"]["out_dir"]).rows
    seed = p["downstream"]["seeds"][0]
    out = {"seed": seed, "sets": {}}
    for cond in ph["sets"]:
        data = LayerSet(paths["layer"], f"test_{cond}")
        keep = [i for i, r in enumerate(data.rows) if index[r["id"]].get("engine") == "mbrola"][: ph["max_utterances"]]
        if not keep:
            raise ValueError(f"test_{cond} has no MBROLA-rendered utterance: no exact phone labels there")
        frames, labels, utt = [], [], []
        for j, i in enumerate(keep):
            row, x = index[data.rows[i]["id"]], data.frames[i].float()
            hop = 0.01 * round(row["frames"] / x.shape[0])  # log-mel frames (10 ms) per layer frame
            labels += row_labels(row, x.shape[0], hop)
            frames.append(x)
            utt += [j] * x.shape[0]
        x, labels = torch.cat(frames), np.asarray(labels)
        train = np.asarray(utt) < len(keep) // 2  # the probe: first half of the utterances, scored on the rest
        res = {"utterances": len(keep), "frames": len(labels), "phones": int(len(np.unique(labels))),
               "continuous": phone_separability(x.numpy(), labels, train, max_iter=ph["probe_max_iter"]), "per_k": {}}
        for k in p["kmeans"]["ks"]:
            c = load_centroids(p, k)
            emb = load_downstream(paths["downstream"] / f"k{k}-s{seed}.safetensors").embed.weight.detach()
            tau = taus[cond][str(k)]["tau_star"]  # the condition's dev set tuned it (sets.dev and sets.test share names)
            tokens = hard_assign(x, c)
            hard = emb[tokens]
            soft = soft_assign(x, c, tau, p["sweep"].get("top_k")) @ emb
            res["per_k"][str(k)] = {
                "tau": tau, **phone_alignment(tokens.numpy(), labels),
                "hard": phone_separability(hard.numpy(), labels, train, max_iter=ph["probe_max_iter"]),
                "soft": phone_separability(soft.numpy(), labels, train, max_iter=ph["probe_max_iter"])}
            r = res["per_k"][str(k)]
            with tracking.run("soft_tokens_phones", f"{cond}-k{k}", params={"set": cond, "k": k, "tau": tau, "seed": seed,
                                                                          "utterances": len(keep)}):
                mlflow.log_metrics({"phone_purity": r["phone_purity"], "cluster_purity": r["cluster_purity"],
                                    "pnmi": r["pnmi"], **{f"{m}_{rep}": r[rep][m] for rep in ("hard", "soft")
                                                          for m in ("between_within", "probe_accuracy")},
                                    **{f"{m}_continuous": res["continuous"][m]
                                       for m in ("between_within", "probe_accuracy")}})
            print(f"[soft_tokens_phones] {cond} K={k}: purity {r['phone_purity']:.3f} PNMI {r['pnmi']:.3f}; "
                  f"between/within hard {r['hard']['between_within']:.3f} soft {r['soft']['between_within']:.3f}; "
                  f"probe acc hard {r['hard']['probe_accuracy']:.3f} soft {r['soft']['probe_accuracy']:.3f}")
        out["sets"][cond] = res
    out["wall_seconds"] = round(time.time() - t0, 1)
    write_json(paths["results"] / "phones.json", out)
    return out


# -------------------------------------------------------------------------------------------------- eval


def evaluate(params: dict) -> dict:
    p, t0 = _section(params), time.time()
    paths = _paths(p)
    res = paths["results"]
    taus = _read_json(res / "sweep.json")["conditions"]
    long = []
    for cond in p["sets"]["test"]:
        data = LayerSet(paths["layer"], f"test_{cond}")
        hyps = {"id": [r["id"] for r in data.rows], "ref": [r["text"] for r in data.rows]}
        for sysm in systems(p):
            model = load_downstream(paths["downstream"] / f"{sysm['name']}.safetensors")
            k = sysm["k"]
            if k is None:
                decodings = [("continuous", None)]
            else:
                c = load_centroids(p, k)
                decodings = [("hard", 0.0), ("soft", taus[cond][str(k)]["tau_star"])]
            for decoding, tau in decodings:
                if decoding == "continuous":
                    data.use("features")
                elif decoding == "hard":
                    data.use("tokens", c)
                else:
                    data.use("soft", c, tau, p["sweep"].get("top_k"))
                label = "continuous" if k is None else f"K={k} hard/{decoding}"
                row = {"system": label, "k": k, "decoding": decoding, "seed": sysm["seed"], "set": cond, "tau": tau,
                       "utterances": len(data)}
                ev = ctc_eval(model, data, experiment="soft_tokens_eval", run_name=f"{cond}-{sysm['name']}-{decoding}",
                              params=row, tags={"model_kind": "downstream_ctc"})
                hyps[f"{label} s{sysm['seed']}"] = [r["hyp"] for r in ev.rows]
                long.append({**row, "wer": ev.wer, "cer": ev.cer})
        write_hypotheses(res / "hyps" / f"{cond}.tsv", [dict(zip(hyps, vals)) for vals in zip(*hyps.values())])
    table = summarise(pd.DataFrame(long))
    table.to_csv(res / "table.csv", index=False)
    write_text(res / "table.md", table_markdown(table, taus, p["floor_cer"]))
    plot_tau(taus, res / "wer_vs_tau.png")
    metrics = {"results": {f"{r.system}|{r.set}": {"wer_mean": r.wer_mean, "wer_std": r.wer_std,
                                                   "cer_mean": r.cer_mean, "cer_std": r.cer_std}
                           for r in table.itertuples()},
               "tau_star": {cond: {k: v["tau_star"] for k, v in ks.items()} for cond, ks in taus.items()},
               "floor_sets": floor_sets(table, p["floor_cer"]), "wall_seconds": {}}
    for stage in ("ssl", "layer", "kmeans", "train", "sweep", "phones"):
        f = res / f"{stage}.json"
        if f.is_file():
            metrics["wall_seconds"][f"soft_tokens_{stage}"] = _read_json(f).get("wall_seconds")
    metrics["wall_seconds"]["soft_tokens_eval"] = round(time.time() - t0, 1)
    metrics["wall_seconds"]["total"] = round(sum(v or 0 for v in metrics["wall_seconds"].values()), 1)
    write_json(res / "metrics.json", metrics)
    phones_ = _read_json(res / "phones.json")
    write_json(res / "headline.json", headline(table, p, taus, _read_json(res / "layer.json"), phones_))
    with open(res / "table.md", "a") as f:
        f.write("\n" + alignment_markdown(phones_))
    print((res / "table.md").read_text())
    return metrics


def headline(table: pd.DataFrame, p: dict, taus: dict, layer: dict, phones_: dict) -> dict:
    """The issue's headline: relative WER gain of hard/soft over hard/hard per set and K, the continuous and
    soft WERs, τ*, the upstream layer, the alignment measures and the seeds."""
    m = {(r.system, r.set): r for r in table.itertuples()}
    sets, ks = list(p["sets"]["test"]), p["kmeans"]["ks"]
    gain = {t: {str(k): round((m[(f"K={k} hard/hard", t)].wer_mean - m[(f"K={k} hard/soft", t)].wer_mean)
                              / max(m[(f"K={k} hard/hard", t)].wer_mean, 1e-9) * 100, 2) for k in ks} for t in sets}
    return {"rel_wer_gain_pct": gain,
            "continuous_wer": {t: m[("continuous", t)].wer_mean for t in sets},
            "continuous_wer_std": {t: m[("continuous", t)].wer_std for t in sets},
            "hard_wer": {t: {str(k): m[(f"K={k} hard/hard", t)].wer_mean for k in ks} for t in sets},
            "soft_wer": {t: {str(k): m[(f"K={k} hard/soft", t)].wer_mean for k in ks} for t in sets},
            "soft_wer_std": {t: {str(k): m[(f"K={k} hard/soft", t)].wer_std for k in ks} for t in sets},
            "tau_star": {c: {k: v["tau_star"] for k, v in kv.items()} for c, kv in taus.items()},
            "upstream": {"kind": layer.get("upstream"), "from": layer.get("from"), "layer": layer.get("layer")},
            "alignment": {c: {"continuous": v["continuous"],
                              **{k: {"phone_purity": a["phone_purity"], "pnmi": a["pnmi"],
                                     "between_within": {"hard": a["hard"]["between_within"],
                                                        "soft": a["soft"]["between_within"]},
                                     "probe_accuracy": {"hard": a["hard"]["probe_accuracy"],
                                                        "soft": a["soft"]["probe_accuracy"]}}
                                 for k, a in v["per_k"].items()}} for c, v in phones_["sets"].items()},
            "seeds": list(p["downstream"]["seeds"])}


def alignment_markdown(phones_: dict) -> str:
    """The alignment table: per test set and K, hard-token purity/PNMI and hard vs soft phone separability."""
    lines = ["Phone alignment (exact MBROLA labels; representations of the seed-"
             f"{phones_['seed']} downstream):", "",
             "| set | K | phone purity | PNMI | between/within hard → soft | probe acc. hard → soft |",
             "|---|---|---|---|---|---|"]
    for cond, v in phones_["sets"].items():
        c = v["continuous"]
        lines.append(f"| {cond} | continuous | | | {c['between_within']:.3f} | {c['probe_accuracy']:.3f} |")
        for k, a in sorted(v["per_k"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {cond} | {k} (τ {a['tau']:.3g}) | {a['phone_purity']:.3f} | {a['pnmi']:.3f} | "
                         f"{a['hard']['between_within']:.3f} → {a['soft']['between_within']:.3f} | "
                         f"{a['hard']['probe_accuracy']:.3f} → {a['soft']['probe_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def summarise(long: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (system, set)."""
    g = long.groupby(["system", "set"], sort=False)
    out = g.agg(wer_mean=("wer", "mean"), wer_std=("wer", "std"), cer_mean=("cer", "mean"), cer_std=("cer", "std"),
                seeds=("seed", "nunique"), tau=("tau", "first"), utterances=("utterances", "first")).reset_index()
    return out.round(2).fillna({"wer_std": 0.0, "cer_std": 0.0})


def floor_sets(table: pd.DataFrame, floor_cer: float) -> list[str]:
    """Test sets where every system's mean CER is at the floor (≥ ``floor_cer`` %)."""
    return [s for s, g in table.groupby("set", sort=False) if (g["cer_mean"] >= floor_cer).all()]


def table_markdown(table: pd.DataFrame, taus: dict, floor_cer: float) -> str:
    sets = list(dict.fromkeys(table["set"]))
    systems_ = list(dict.fromkeys(table["system"]))
    cell = {(r.system, r.set): f"{r.wer_mean:.1f} ± {r.wer_std:.1f} / {r.cer_mean:.1f}" for r in table.itertuples()}
    lines = ["| system | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    lines += [f"| {s} | " + " | ".join(cell.get((s, t), "") for t in sets) + " |" for s in systems_]
    seeds = int(table["seeds"].max())
    notes = [f"WER mean ± std over {seeds} seeds / CER mean, in %; greedy character CTC. hard/soft uses the τ* "
             "tuned on the condition's dev set:"]
    notes += [f"- {cond}: " + ", ".join(f"K={k} τ*={v['tau_star']:.3g}" for k, v in ks.items()) for cond, ks in taus.items()]
    mean = {(r.system, r.set): (r.wer_mean, r.cer_mean) for r in table.itertuples()}
    for k in dict.fromkeys(s.split()[0] for s in systems_ if s.startswith("K=")):
        parts = []
        for t in sets:
            hard, soft, cont = mean.get((f"{k} hard/hard", t)), mean.get((f"{k} hard/soft", t)), mean.get(("continuous", t))
            if hard and soft and cont:
                parts.append(f"{t} {soft[0] - hard[0]:+.1f} / {soft[1] - hard[1]:+.1f} (soft − continuous "
                             f"{soft[0] - cont[0]:+.1f} / {soft[1] - cont[1]:+.1f})")
        notes.append(f"- {k}, soft − hard WER / CER points: " + "; ".join(parts))
    floor = floor_sets(table, floor_cer)
    if floor:
        notes.append(f"- At the floor (CER ≥ {floor_cer:.0f} % for every system): {', '.join(floor)} — no comparison "
                     "there counts.")
    else:
        notes.append(f"- No test set is at the floor (CER ≥ {floor_cer:.0f} % for every system).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def plot_tau(taus: dict, path: Path) -> None:
    """Dev WER and CER against τ per condition and K (the paper's U shape), hard assignment dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(taus), figsize=(4.2 * len(taus), 6.4), squeeze=False)
    for col, (cond, ks) in enumerate(taus.items()):
        for row, m in enumerate(("wer", "cer")):
            ax = axes[row][col]
            for i, (k, v) in enumerate(ks.items()):
                t = [x["tau"] for x in v["trials"]]
                ax.plot(t, [x[m] for x in v["trials"]], "o-", ms=3, color=f"C{i}", label=f"K={k} soft")
                ax.axhline(v[f"dev_{m}_hard"], ls="--", color=f"C{i}", lw=1, label=f"K={k} hard")
            ax.set_xscale("log")
            ax.set_xlabel("τ")
            ax.set_ylabel(f"dev {m.upper()} (%)")
            ax.set_title(cond)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
