"""params.yaml: the pipeline's only source of knobs. Profiles are small override files merged on top."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.resolve()}: no params file; run asrlab from the repository root")
    with open(path) as f:
        return yaml.safe_load(f) or {}


def section(params: dict, name: str) -> dict:
    if name not in params:
        raise KeyError(f"params.yaml has no `{name}` section")
    return params[name]


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``: dicts merge key by key, everything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out
