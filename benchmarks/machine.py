"""Machine facts every benchmark records beside its numbers (load, threads, versions), and its last line."""

from __future__ import annotations

import datetime as dt
import os
import platform

import torch


def facts(load_before: tuple[float, float, float], **versions: str) -> dict:
    return {
        "nproc": os.cpu_count(), "sched_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        **versions,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def summary_line(result: dict, out) -> str:
    m = result["machine"]
    return (f"\nnproc {m['nproc']}, torch threads {m['torch_threads']}, python {m['python']}, "
            f"load {m['loadavg_before'][0]:.2f} -> {m['loadavg_after'][0]:.2f}; "
            f"total {result['total_wall_s']:.0f} s -> {out}")
