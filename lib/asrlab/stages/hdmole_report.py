"""Stage ``hdmole_report``: ``results/hdmole/table.{md,csv}`` shaped like the paper's table (per system: CER and
WER per accent domain and their mean, the standard domain's CER/WER and its change against the frozen base,
trainable parameters as a % of full fine-tuning; mean ± std over seeds), ``error_vs_params.png`` and
``active_experts.png`` (active experts per token, per MoLE layer: the dynamic thresholds at work), from the
records ``hdmole_train`` wrote. ``notebooks/hdmole.ipynb`` rebuilds the same from the MLflow runs with
:func:`records_from_mlflow` and these functions.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from asrlab.io import read_jsonl, write_json, write_text
from asrlab.params import checked
from asrlab.stages.hdmole import SCHEMA

STANDARD = "standard"


def table(evals: pd.DataFrame, domains: list[str]) -> pd.DataFrame:
    """One row per system (in order of appearance): mean and std over seeds of every error column."""
    cols = [f"{d}_{m}" for d in [*domains, "accent", STANDARD] for m in ("cer", "wer")]
    rows = []
    base = evals[evals["system"] == "base"]
    for system, g in evals.groupby("system", sort=False):
        row = {"system": system, "seeds": len(g), "trainable_params": int(g["trainable_params"].iloc[0]),
               "trainable_pct": float(g["trainable_pct"].iloc[0])}
        for c in cols:
            row[c] = g[c].mean()
            row[f"{c}_std"] = g[c].std(ddof=0) if len(g) > 1 else float("nan")
        if len(base):
            for m in ("cer", "wer"):  # forgetting: the standard domain's change against the frozen base
                row[f"{STANDARD}_delta_{m}"] = row[f"{STANDARD}_{m}"] - base[f"{STANDARD}_{m}"].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def _pm(v, s) -> str:
    return "–" if pd.isna(v) else (f"{v:.1f}" if pd.isna(s) else f"{v:.1f} ± {s:.1f}")


def markdown(tab: pd.DataFrame, domains: list[str]) -> str:
    head = ["system", "trainable params", "% of full FT", *[f"{d} CER / WER" for d in domains],
            "accent mean CER / WER", "standard CER / WER", "standard Δ CER"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for _, r in tab.iterrows():
        cells = [r["system"], f"{r['trainable_params']:,}", f"{r['trainable_pct']:.2f}"]
        for d in [*domains, "accent", STANDARD]:
            cells.append(f"{_pm(r[f'{d}_cer'], r[f'{d}_cer_std'])} / {_pm(r[f'{d}_wer'], r[f'{d}_wer_std'])}")
        cells.append(f"{r.get(f'{STANDARD}_delta_cer', float('nan')):+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = int(tab["seeds"].max())
    lines.append(f"\nCER / WER in %, mean ± std over {seeds} seeds (the frozen base: one run). Accent domains: "
                 f"{', '.join(domains)}; standard: the native real-proxy voices the base was trained on "
                 "(Δ: change against the frozen base, > 0 is forgetting). Full FT trains the projector and the LM "
                 "(the encoder is frozen for every system).")
    return "\n".join(lines) + "\n"


def active_histograms(experts: pd.DataFrame, system: str = "hdmole") -> pd.DataFrame:
    """Fraction of tokens with k active experts (columns k) per layer, summed over seeds and test sets."""
    g = experts[experts["system"] == system]
    if g.empty:
        return pd.DataFrame()
    out = {}
    for layer, rows in g.groupby("layer"):
        width = max(len(c) for c in rows["counts"])
        total = [sum(c[k] if k < len(c) else 0 for c in rows["counts"]) for k in range(width)]
        n = max(sum(total), 1)
        out[layer] = [t / n for t in total]
    return pd.DataFrame(out).T


def plot_error_vs_params(tab: pd.DataFrame, path: str | Path, metric: str = "cer") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for _, r in tab[tab["trainable_params"] > 0].iterrows():
        ax.errorbar(r["trainable_params"], r[f"accent_{metric}"], yerr=r[f"accent_{metric}_std"], fmt="o", capsize=3)
        ax.annotate(r["system"], (r["trainable_params"], r[f"accent_{metric}"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    base = tab[tab["system"] == "base"]
    if len(base):
        ax.axhline(base[f"accent_{metric}"].iloc[0], ls="--", color="grey", label="frozen base")
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"accent-domain mean {metric.upper()} %")
    ax.set_title("error against trainable parameters (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_active_experts(experts: pd.DataFrame, path: str | Path, systems: tuple[str, ...] = ("hdmole", "hdmole_no_hier")) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hists = {s: active_histograms(experts, s) for s in systems}
    hists = {s: h for s, h in hists.items() if not h.empty}
    fig, axes = plt.subplots(1, max(len(hists), 1), figsize=(5 * max(len(hists), 1), 3.6), squeeze=False)
    for ax, (system, h) in zip(axes[0], hists.items()):
        width = 0.8 / len(h)
        ks = range(1, h.shape[1])  # k = 0 never happens: the top expert always stays
        for i, (layer, fr) in enumerate(h.iterrows()):
            ax.bar([k + (i - (len(h) - 1) / 2) * width for k in ks], [fr.iloc[k] for k in ks], width=width, label=layer)
        ax.set_xticks(list(ks))
        ax.set_xlabel("active experts per token")
        ax.set_ylabel("fraction of tokens")
        ax.set_title(f"{system}: dynamic thresholds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def records_from_mlflow(runs: pd.DataFrame, domains: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(evaluations, active-expert counts) in ``hdmole_train``'s record layout, from ``mlflow.search_runs``."""
    evals, experts = [], []
    for _, r in runs.iterrows():
        rec = {"system": r["tags.system"], "seed": int(r["tags.seed"]),
               "trainable_params": int(r["metrics.trainable_params"]), "trainable_pct": r["metrics.trainable_pct"]}
        for d in [*domains, STANDARD]:
            for m in ("cer", "wer"):
                rec[f"{d}_{m}"] = r[f"metrics.{d}/{m}"]
        rec["accent_cer"], rec["accent_wer"] = r["metrics.accent_cer"], r["metrics.accent_wer"]
        evals.append(rec)
        counts: dict[tuple[str, str], dict[int, int]] = {}
        for c in runs.columns:
            if c.startswith("metrics.active/") and pd.notna(r[c]):
                _, dom, layer, k = c[len("metrics."):].split("/")
                counts.setdefault((dom, layer), {})[int(k)] = int(r[c])
        for (dom, layer), ks in counts.items():
            experts.append({"system": rec["system"], "seed": rec["seed"], "set": dom, "layer": layer,
                            "counts": [ks.get(k, 0) for k in range(max(ks) + 1)]})
    return pd.DataFrame(evals), pd.DataFrame(experts)


def run(params: dict) -> dict:
    p = checked(params, "hdmole", SCHEMA)
    out = Path(p["results_dir"])
    domains = list(p["domains"])
    evals = pd.DataFrame(read_jsonl(out / "evaluations.jsonl"))
    experts = pd.DataFrame(read_jsonl(out / "active_experts.jsonl"))
    tab = table(evals, domains)
    tab.to_csv(out / "table.csv", index=False)
    write_text(out / "table.md", markdown(tab, domains))
    plot_error_vs_params(tab, out / "error_vs_params.png")
    plot_active_experts(experts, out / "active_experts.png")
    by = tab.set_index("system")
    metrics = {s: {"accent_cer": round(float(by.loc[s, "accent_cer"]), 3), "accent_wer": round(float(by.loc[s, "accent_wer"]), 3),
                   "standard_cer": round(float(by.loc[s, f"{STANDARD}_cer"]), 3),
                   "trainable_pct": round(float(by.loc[s, "trainable_pct"]), 3)} for s in by.index}
    if "hdmole" in by.index and "full_ft" in by.index:
        metrics["hdmole_gap_to_full_ft_cer"] = round(float(by.loc["hdmole", "accent_cer"] - by.loc["full_ft", "accent_cer"]), 3)
    write_json(out / "metrics.json", metrics)
    print(markdown(tab, domains))
    return metrics
