"""params.yaml: the pipeline's only source of knobs. Profiles are small override files merged on top."""

from __future__ import annotations

import copy
import difflib
import os
import re
import time
from pathlib import Path

import yaml


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats, as DVC parses params: ``2e-3`` is a float, not a string."""


Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def load_yaml(path: str | Path) -> dict:
    """The project's one YAML loader (params, profiles). Bad YAML is an error naming file, line and column."""
    path = Path(path)
    try:
        with open(path) as f:
            return yaml.load(f, Loader=Loader) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: invalid YAML: {e.problem or e.context}; fix that line of {path.name}") from None


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.resolve()}: no params file; run asrlab from the repository root")
    return load_yaml(path)


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


def check_keys(section_params: dict, name: str, required: dict, optional: dict | None = None) -> dict:
    """Check a stage's section before the stage touches any output: every key known, every required key
    present, each value of its declared type (``{key: type}``; ints are accepted where floats are)."""
    optional = optional or {}
    known = {**required, **optional}
    for key in section_params:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean `{near[0]}`?" if near else f"; valid keys: {', '.join(sorted(known))}"
            raise KeyError(f"params.yaml: unknown key `{key}` in section `{name}`{hint}")
    for key in required:
        if key not in section_params:
            raise KeyError(f"params.yaml: section `{name}` is missing the required key `{key}`")
    for key, value in section_params.items():
        kind = known[key]
        ok = value is None and key in optional or isinstance(value, kind) and not (
            isinstance(value, bool) and kind in (int, float)) or (kind is float and type(value) is int)
        if not ok:
            raise ValueError(f"params.yaml: `{name}.{key}` is {value!r} ({type(value).__name__}); "
                             f"expected {getattr(kind, '__name__', kind)}")
    return section_params


def busy_cores(seconds: float = 0.5) -> float:
    """Cores other processes keep busy right now: the non-idle share of every core's time over ``seconds``
    (``/proc/stat``), times the cores. Not the load average: a pipeline's previous stage leaves a 1-minute
    load of ~2 behind for a minute after it ends, which would make the next stage run on one thread on a
    quiet machine. Falls back to the 1-minute load where ``/proc/stat`` does not exist."""
    try:
        t0, i0 = _cpu_times()
        time.sleep(seconds)
        t1, i1 = _cpu_times()
    except OSError:
        return os.getloadavg()[0]
    return (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int]:
    """(all, idle + iowait) jiffies of all cores since boot, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + (v[4] if len(v) > 4 else 0)


def threads(requested: int | None = None) -> int:
    """Torch threads for a stage: ``ASRLAB_THREADS`` if set (tests, CI), else ``requested``, else the cores
    other processes leave free now (:func:`busy_cores`): threads beyond the free cores spin against a busy
    process (issue 18: 0.19 -> 4 s per step beside one other job on 2 cores)."""
    if os.environ.get("ASRLAB_THREADS"):
        return max(1, int(os.environ["ASRLAB_THREADS"]))
    if requested:
        return int(requested)
    cores = os.cpu_count() or 1
    free = max(1, cores - round(busy_cores()))
    if free < cores:
        print(f"[asrlab] {cores - free} of {cores} cores busy: {free} torch thread(s)")
    return free
