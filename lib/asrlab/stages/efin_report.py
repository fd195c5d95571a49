"""Stage ``efin_report``: ``results/efin/table.{md,csv}`` (WER and CER per strategy and budget, mean ± std over
seeds), the scaling-law constants with R² and the held-out prediction error, the headline (EFIN's relative CER
reduction against joint training at equal FLOPs, and the share of joint training's FLOPs EFIN needs to reach
joint training's best CER), and ``scaling.png`` (error against FLOPs, log-log, fitted curves). From the records
of ``efin_train``; ``notebooks/efin.ipynb`` rebuilds the same from MLflow with these functions.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from asrlab.io import read_jsonl, write_json, write_text
from asrlab.params import checked
from asrlab.stages.efin import SCHEMA
from asrlab.methods.efin import Fit, fit_scaling_law, flops_to_reach, interp_loglog


def table(evals: pd.DataFrame, sets: list[str]) -> pd.DataFrame:
    """One row per (strategy, steps): mean FLOPs, seeds, and each set's WER/CER mean and std over seeds."""
    rows = []
    for (strategy, steps), g in evals.groupby(["strategy", "steps"], sort=False):
        row = {"strategy": strategy, "steps": int(steps), "heldout": bool(g["heldout"].any()),
               "flops": g["flops"].mean(), "seeds": len(g)}
        for s in sets:
            for m in ("wer", "cer", "loss"):
                row[f"{s}_{m}"] = g[f"{s}_{m}"].mean()
                row[f"{s}_{m}_std"] = g[f"{s}_{m}"].std(ddof=0) if len(g) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def headline(evals: pd.DataFrame, metric: str, base: str = "joint", method: str = "efin") -> dict:
    """Per seed present in both strategies: (1) the relative error reduction of ``method`` against ``base`` at
    the largest compute both curves cover (log-C interpolation between measured budgets); (2) the compute
    ``method`` needs to reach ``base``'s best error, as a share of the compute at which ``base`` reached it.
    Mean ± std over seeds."""
    out = {"metric": metric, "per_seed": {}}
    for seed in sorted(set(evals[evals.strategy == base].seed) & set(evals[evals.strategy == method].seed)):
        b = evals[(evals.strategy == base) & (evals.seed == seed)].sort_values("flops")
        m = evals[(evals.strategy == method) & (evals.seed == seed)].sort_values("flops")
        c_common = min(b.flops.max(), m.flops.max())
        if c_common < max(b.flops.min(), m.flops.min()):
            rel = float("nan")  # the curves do not overlap in compute
        else:
            eb = interp_loglog(b.flops, b[metric], c_common)
            em = interp_loglog(m.flops, m[metric], c_common)
            rel = 100 * (eb - em) / eb
        best = b.loc[b[metric].idxmin()]
        share = 100 * flops_to_reach(m.flops, m[metric], best[metric]) / best.flops
        out["per_seed"][int(seed)] = {"compute": float(c_common), "rel_reduction_pct": rel,
                                      "base_best": float(best[metric]), "base_best_flops": float(best.flops),
                                      "flops_share_pct": share}
    for k in ("rel_reduction_pct", "flops_share_pct"):
        vals = np.array([v[k] for v in out["per_seed"].values()], dtype=float)
        finite = vals[np.isfinite(vals)]
        out[k] = float(finite.mean()) if len(finite) else float("nan")
        out[f"{k}_std"] = float(finite.std()) if len(finite) > 1 else float("nan")
        out[f"{k}_seeds"] = f"{len(finite)}/{len(vals)}"  # inf share: never reached within the budgets
    return out


def fits_from(evals: pd.DataFrame, metric: str) -> dict[str, Fit]:
    """The scaling law per strategy on the non-held-out points of every seed (as ``efin_train`` fitted it)."""
    return {s: fit_scaling_law(g.loc[~g.heldout, "flops"], g.loc[~g.heldout, metric])
            for s, g in evals.groupby("strategy", sort=False)}


def refit(evals: pd.DataFrame, metric: str) -> dict:
    """The scaling law per strategy from evaluation records, scored on the held-out budget (mean over seeds);
    on the fit metric this reproduces ``fits.json`` from MLflow runs alone."""
    out = {}
    for name, f in fits_from(evals, metric).items():
        held = evals[(evals.strategy == name) & evals.heldout]
        pred = float(f.predict(held.flops.mean())) if len(held) else math.nan
        measured = float(held[metric].mean()) if len(held) else math.nan
        out[name] = {**asdict(f), "heldout_flops": float(held.flops.mean()) if len(held) else math.nan,
                     "heldout_predicted": pred, "predicted_at_actual": pred, "heldout_measured": measured,
                     "abs_error": pred - measured}
    return out


def _pm(v, s, nd: int = 1) -> str:
    if pd.isna(v):
        return "–"
    return f"{v:.{nd}f}" if pd.isna(s) else f"{v:.{nd}f} ± {s:.{nd}f}"


def markdown(tab: pd.DataFrame, sets: list[str], fits: dict, head: dict, loss_fits: dict | None = None) -> str:
    cols = [f"{s} {m.upper()} %" for s in sets for m in ("wer", "cer")]
    lines = ["**WER and CER % per strategy and compute budget (mean ± std over seeds; * = held-out budget)**", "",
             "| strategy | steps (last stage) | GFLOPs | seeds | " + " | ".join(cols) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(cols)]
    for _, r in tab.iterrows():
        cells = [r.strategy, f"{r.steps}{'*' if r.heldout else ''}", f"{r.flops / 1e9:,.0f}", str(r.seeds)]
        cells += [_pm(r[f"{s}_{m}"], r[f"{s}_{m}_std"]) for s in sets for m in ("wer", "cer")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"**Scaling law error(C) = A·(C/c0)^(−α) + E∞ on {head['metric']} (fitted budgets of every seed)**", "",
              "| strategy | A | α | E∞ | c0 (GFLOPs) | R² | points | held-out GFLOPs | predicted | measured | error (points) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, f in fits.items():
        lines.append(f"| {name} | {f['a']:.2f} | {f['alpha']:.3f} | {f['e_inf']:.1f} | {f['c0'] / 1e9:,.0f} | "
                     f"{f['r2']:.3f} | {f['points']} | {f.get('heldout_flops', math.nan) / 1e9:,.0f} | "
                     f"{f.get('predicted_at_actual', math.nan):.1f} | {f.get('heldout_measured', math.nan):.1f} | "
                     f"{f.get('abs_error', math.nan):+.1f} |")
    if loss_fits:
        lines += ["", "**The same law on the teacher-forced token loss (fitted budgets; the held-out budget scored "
                  "after the fact)**", "", "| strategy | A | α | E∞ | R² | held-out predicted | measured |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, f in loss_fits.items():
            lines.append(f"| {name} | {f['a']:.3f} | {f['alpha']:.3f} | {f['e_inf']:.3f} | {f['r2']:.3f} | "
                         f"{f['heldout_predicted']:.3f} | {f['heldout_measured']:.3f} |")
    lines += ["", f"**Headline ({head['metric']}, EFIN against joint post-training; the paper: 21.1 % CERR with 49.9 % of the FLOPs)**", "",
              f"- relative CER reduction at equal FLOPs (largest compute both cover): "
              f"{_pm(head['rel_reduction_pct'], head['rel_reduction_pct_std'])} % (seeds {head['rel_reduction_pct_seeds']})",
              f"- FLOPs EFIN needs to reach joint training's best CER, as a share of joint's: "
              f"{_pm(head['flops_share_pct'], head['flops_share_pct_std'])} % (seeds where reached: {head['flops_share_pct_seeds']})", ""]
    return "\n".join(lines)


def plot(evals: pd.DataFrame, fits: dict, metric: str, path: str | Path | None = None):
    """Error against FLOPs on log-log axes: every seed's points, the fitted curve, the held-out point ringed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, g) in enumerate(evals.groupby("strategy", sort=False)):
        color = f"C{i}"
        fit = g.loc[~g.heldout]
        ax.scatter(fit.flops, fit[metric], color=color, s=14, alpha=0.7, label=name)
        held = g.loc[g.heldout]
        ax.scatter(held.flops, held[metric], facecolors="none", edgecolors=color, s=60)
        f = fits[name]
        c = np.geomspace(g.flops.min(), g.flops.max(), 100)
        ax.plot(c, Fit(**{k: f[k] for k in ("a", "alpha", "e_inf", "c0", "r2", "points")}).predict(c), color=color,
                lw=1.2, label=f"fit α={f['alpha']:.2f}, R²={f['r2']:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs (counted)")
    ax.set_ylabel(f"{metric} %")
    ax.set_title("error against compute (rings: held-out budget)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def _json_safe(obj):
    """NaN and ±inf as null (strict JSON for DVC metrics); "never reached" is also counted in ``*_seeds``."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def run(params: dict) -> dict:
    p = checked(params, "efin", SCHEMA)
    results = Path(p["results_dir"])
    evals = pd.DataFrame(read_jsonl(results / "evaluations.jsonl"))
    fits = json.loads((results / "fits.json").read_text())
    metric = f"{p['fit_on']['set']}_{p['fit_on']['metric']}"
    sets = list(p["eval_sets"])
    tab = table(evals, sets)
    head = headline(evals, metric)
    lf = refit(evals, f"{p['fit_on']['set']}_loss")
    tab.to_csv(results / "table.csv", index=False, float_format="%.3f")
    write_text(results / "table.md", markdown(tab, sets, fits, head, lf))
    plot(evals, fits, metric, results / "scaling.png")
    metrics = _json_safe({"headline": head, "fits": fits, "loss_fits": lf})
    write_json(results / "metrics.json", metrics)
    print((results / "table.md").read_text())
    return metrics
