"""Stage ``syn2real_report``: ``results/syn2real/table.{md,csv}`` shaped like the paper's Table 1 (per target:
each system's WER and CER as mean ± std over seeds, SYN2REAL's relative change, λ*; the mean), the λ curves
(``lambda.png``) and the baseline-vs-SYN2REAL bars (``bars.png``), from the records ``syn2real_evaluate``
wrote. ``notebooks/syn2real.ipynb`` rebuilds the same from MLflow runs with :func:`table` and the plots.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from asrlab.io import read_jsonl, write_json, write_text
from asrlab.params import checked
from asrlab.stages.syn2real import SCHEMA

SYSTEMS = ("zero_shot", "source_real", "source_mix", "baseline", "syn2real", "syn2real_avg", "oracle")


def table(evals: pd.DataFrame, decoding: str) -> pd.DataFrame:
    """Per target (rows) and the mean: each system's WER and CER as mean ± std over seeds, SYN2REAL's relative
    change against the baseline (computed per seed, then averaged), and λ* per seed."""
    ev = evals[evals["decoding"] == decoding]
    rows = []
    for target, g in ev.groupby("target", sort=False):
        row = {"target": target}
        for system in SYSTEMS:
            s = g[g["system"] == system]
            for m in ("wer", "cer"):
                row[f"{system}_{m}"] = s[m].mean() if len(s) else float("nan")
                row[f"{system}_{m}_std"] = s[m].std(ddof=0) if len(s) > 1 else float("nan")  # one run: no ±
        for system in ("syn2real", "syn2real_avg"):
            for m in ("wer", "cer"):
                pair = g[g["system"].isin(["baseline", system])].pivot_table(index="seed", columns="system", values=m)
                if system in pair:
                    rel = 100 * (pair[system] - pair["baseline"]) / pair["baseline"]
                    row[f"{system}_rel_{m}"] = rel.mean()
                    row[f"{system}_rel_{m}_std"] = rel.std(ddof=0) if len(rel) > 1 else float("nan")
            lams = g[g["system"] == system].sort_values("seed")["lambda"].tolist()
            row[f"{system}_lambda"] = " ".join(f"{x:.2f}" for x in lams)
        rows.append(row)
    tab = pd.DataFrame(rows)
    mean = {"target": "mean"}
    for c in tab.columns:
        if c != "target" and pd.api.types.is_numeric_dtype(tab[c]) and not c.endswith("_std"):
            mean[c] = tab[c].mean()
    # the paper's headline: relative change of the mean WER (baseline mean → SYN2REAL mean)
    for system in ("syn2real", "syn2real_avg"):
        for m in ("wer", "cer"):
            if f"{system}_{m}" in tab:
                mean[f"{system}_rel_{m}"] = 100 * (tab[f"{system}_{m}"].mean() - tab[f"baseline_{m}"].mean()) / tab[f"baseline_{m}"].mean()
    return pd.concat([tab, pd.DataFrame([mean])], ignore_index=True)


def _pm(v, s) -> str:
    return "–" if pd.isna(v) else (f"{v:.2f}" if pd.isna(s) else f"{v:.2f} ± {s:.2f}")


def markdown(tab: pd.DataFrame, decoding: str, seeds: int) -> str:
    head = ["target", "zero-shot", "source real", "source real + syn", "baseline", "+SYN2REAL", "rel. Δ %", "λ*",
            "+SYN2REAL (avg τ)", "rel. Δ %", "λ* (avg)", "oracle"]
    lines = []
    for m in ("wer", "cer"):
        lines += [f"**{m.upper()} % ({decoding} decoding, mean ± std over {seeds} seed(s))**", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, r in tab.iterrows():
            rel = lambda s: ("–" if pd.isna(r.get(f"{s}_rel_{m}")) else _pm(r[f"{s}_rel_{m}"], r.get(f"{s}_rel_{m}_std")))  # noqa: E731
            cells = [r["target"]] + [_pm(r.get(f"{s}_{m}"), r.get(f"{s}_{m}_std")) for s in ("zero_shot", "source_real", "source_mix", "baseline", "syn2real")]
            cells += [rel("syn2real"), r.get("syn2real_lambda") or "",
                      _pm(r.get(f"syn2real_avg_{m}"), r.get(f"syn2real_avg_{m}_std")),
                      rel("syn2real_avg"), r.get("syn2real_avg_lambda") or "",
                      _pm(r.get(f"oracle_{m}"), r.get(f"oracle_{m}_std"))]
            lines.append("| " + " | ".join(str(c) if not isinstance(c, float) or not pd.isna(c) else "" for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_lambda(trials: pd.DataFrame, path: str | Path | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(trials["target"]))
    fig, axes = plt.subplots(2, len(targets), figsize=(3.2 * len(targets), 5.5), squeeze=False, sharex=True)
    for j, target in enumerate(targets):
        for i, m in enumerate(("dev_wer", "dev_cer")):
            ax = axes[i][j]
            for (seed, vec), g in trials[trials["target"] == target].groupby(["seed", "vector"]):
                g = g.sort_values("lambda")
                ax.plot(g["lambda"], g[m], marker="o", ms=3, ls="-" if vec == "single" else "--",
                        label=f"seed {seed}, τ {vec}")
            ax.set_title(target if i == 0 else "")
            ax.set_xlabel("λ" if i == 1 else "")
            ax.set_ylabel(f"dev {m[4:].upper()} %" if j == 0 else "")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("SYN2REAL: target real-speech dev error against λ (Optuna trials)")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def plot_bars(tab: pd.DataFrame, path: str | Path | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    systems = [s for s in ("baseline", "syn2real", "syn2real_avg", "oracle") if f"{s}_wer" in tab and tab[f"{s}_wer"].notna().any()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(tab))
    w = 0.8 / len(systems)
    for ax, m in zip(axes, ("wer", "cer")):
        for k, s in enumerate(systems):
            ax.bar(x + k * w, tab[f"{s}_{m}"], w, yerr=tab.get(f"{s}_{m}_std"), label=s, capsize=2)
        ax.set_xticks(x + w * (len(systems) - 1) / 2, tab["target"], rotation=30)
        ax.set_ylabel(f"test {m.upper()} %")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Target real-speech test error: baseline (target synthetic) vs + λ·τ, and the oracle")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def _r(x) -> float | None:
    return None if x is None or pd.isna(x) else round(float(x), 3)


def headline(tabs: dict[tuple[str, str], pd.DataFrame], evals: pd.DataFrame) -> dict:
    """``results/syn2real/headline.json``: one object per synthetic pool (issue 17, item 7). Target figures
    are the mean rows of the target real-proxy test table; speechocean762 the mean rows of its table."""
    out = {}
    for (pool, test_set), tab in tabs.items():
        if test_set != "target":
            continue
        mean = tab[tab["target"] == "mean"].iloc[0]
        per_target = tab[tab["target"] != "mean"]
        ev = evals[evals["pool"] == pool]
        so = tabs.get((pool, "speechocean762"))
        so_mean = so[so["target"] == "mean"].iloc[0] if so is not None else {}
        out[pool] = {
            "mean_rel_wer_change_pct": _r(mean.get("syn2real_rel_wer")),
            "targets_improved": int((per_target["syn2real_rel_wer"] < 0).sum()),
            "targets": len(per_target), "seeds": int(ev["seed"].nunique()),
            **{f"{s}_wer": _r(mean.get(f"{s}_wer")) for s in ("baseline", "syn2real", "source_real", "oracle",
                                                               "zero_shot")},
            "speechocean762": {f"{s}_wer": _r(so_mean.get(f"{s}_wer")) for s in ("zero_shot", "baseline", "syn2real")}
            | {"syn2real_real_tau_wer": _r(so_mean.get("syn2real_real_tau_wer"))},  # null until the real-recordings τ runs
        }
    return out


TEST_SETS = {"target": "target real-proxy test", "speechocean762": "speechocean762 test (real recordings)"}


def run(params: dict) -> dict:
    p = checked(params, "syn2real", SCHEMA)
    out = Path(p["results_dir"])
    evals = pd.DataFrame(read_jsonl(out / "evaluations.jsonl"))
    trials = pd.DataFrame(read_jsonl(out / "trials.jsonl"))
    decoding = p["sweep"]["decoding"]
    tabs = {(pool, ts): table(evals[(evals["pool"] == pool) & (evals["test_set"] == ts)], decoding)
            for pool in p["synthetic_pools"] for ts in TEST_SETS}
    csv = pd.concat([t.assign(pool=pool, test_set=ts) for (pool, ts), t in tabs.items()], ignore_index=True)
    csv.to_csv(out / "table.csv", index=False, float_format="%.3f")
    parts = [f"# SYN2REAL on {evals['target'].nunique()} target scenario(s), synthetic pools {', '.join(p['synthetic_pools'])}", "",
             f"λ chosen by Optuna on the target's real-proxy dev speech ({p['sweep']['trials']} trials, objective dev "
             f"{p['sweep']['metric'].upper()}, {decoding} decoding). Zero-shot: the pretrained Whisper on the 30-s "
             "window. Relative Δ: per seed (SYN2REAL − baseline) / baseline, then mean ± std over seeds; the mean "
             "row's Δ is the paper's figure, the change of the mean (paper: WER −10.03 %). Source models and τ are "
             "shared by the seeds (`source_seeds`); zero-shot, source and oracle rows are single runs; on "
             "speechocean762 the target-independent rows are measured once.", ""]
    for (pool, ts), tab in tabs.items():
        seeds = int(evals[evals["pool"] == pool]["seed"].nunique())
        parts += [f"## {pool} — {TEST_SETS[ts]}", "", markdown(tab, decoding, seeds)]
    write_text(out / "table.md", "\n".join(parts))
    tr = trials.assign(target=trials["pool"] + "/" + trials["target"]) if len(trials) else trials
    plot_lambda(tr, out / "lambda.png")
    first = tabs[(p["synthetic_pools"][0], "target")]
    plot_bars(first[first["target"] != "mean"], out / "bars.png")
    head = headline(tabs, evals)
    write_json(out / "headline.json", head)
    metrics = {"decoding": decoding, **{pool: {k: v for k, v in h.items()} for pool, h in head.items()},
               "lambda_star": {f"{pool}/{t}": lam for (pool, ts), tab in tabs.items() if ts == "target"
                               for t, lam in zip(tab["target"], tab.get("syn2real_lambda", [])) if t != "mean"}}
    write_json(out / "metrics.json", metrics)
    print("\n".join(parts))
    return metrics
