"""params.yaml: the pipeline's only source of knobs. Profiles are small override files merged on top."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import time
import types
import typing
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


class Maybe:
    """Schema: a value of ``spec``, or null."""

    def __init__(self, spec):
        self.spec = spec


class Folder:
    """Schema: a string naming a folder that must exist before the stage starts (a pretrained model)."""


def fields(cls, *drop: str, **override) -> dict:
    """A dataclass's fields as a schema of optional keys (``name?``), typed by its annotations; nested
    dataclasses (or null) become nested schemas. ``drop``: fields the code sets, not params; ``override``
    replaces or adds entries."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        nested = [a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)]
        out[f"{f.name}?"] = fields(nested[0]) if nested else _kinds(hint)
    return {k: v for k, v in {**out, **{f"{k}?": v for k, v in override.items()}}.items() if k[:-1] not in drop}


def _kinds(hint) -> tuple:
    """``int | None`` -> (int, NoneType); ``list[str]`` -> (list,); ``tuple[str, ...]`` -> (list, tuple)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(k for a in typing.get_args(hint) for k in _kinds(a))
    kind = typing.get_origin(hint) or hint
    return (list, tuple) if kind is tuple else (kind,)


def check_keys(section_params: dict, name: str, required: dict, optional: dict | None = None,
               folders: bool = True) -> dict:
    """Check a stage's section before the stage touches any output, nested dicts and lists included: every
    key known (a misspelt key names the nearest valid one), every required key present, each value of its
    schema's type, every :class:`Folder` present. A schema is a type (ints pass as floats, never bools), a
    tuple of types, ``[item]`` (a list), ``{str: value}`` (any names), ``{key: value}`` (``key?``: optional,
    may be null), :class:`Maybe` or :class:`Folder`. ``optional``: more optional keys of the top level;
    ``folders=False``: leave out the folders' existence (before ``dvc repro``, which writes them)."""
    schema = {**required, **{f"{k}?": v for k, v in (optional or {}).items()}}
    found: list[tuple[str, str]] = []
    _check(_unrecorded(section_params), name, schema, found)  # checking every key is not reading it
    for where, value in found if folders else ():  # after the whole section parsed: a typo elsewhere is reported first
        if not Path(value).is_dir():
            raise FileNotFoundError(
                f"`{where}` in params.yaml is {value!r}, which is not a folder ({Path(value).resolve()}): run the "
                f"stage that writes it (`dvc repro` it) or point `{where.rsplit('.', 1)[-1]}` at a local model "
                "folder")
    return section_params


def unknown_key(key, known, what: str) -> KeyError:
    """The error for a key no schema knows: ``what`` names it, the nearest valid name (or all) follows."""
    near = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f"; did you mean `{near[0]}`?" if near else f"; valid keys: {', '.join(sorted(known))}"
    return KeyError(f"params.yaml: unknown {what}{hint}")


def _check(value, where: str, spec, folders: list) -> None:
    if isinstance(spec, Maybe):
        if value is not None:
            _check(value, where, spec.spec, folders)
    elif spec is Folder:
        _check(value, where, str, folders)
        folders.append((where, value))
    elif isinstance(spec, list):
        _check(value, where, list, folders)
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]", spec[0], folders)
    elif isinstance(spec, dict) and list(spec) == [str]:
        _check(value, where, dict, folders)
        for k, v in value.items():
            _check(v, f"{where}.{k}", spec[str], folders)
    elif isinstance(spec, dict):
        _check(value, where, dict, folders)
        known = {k.rstrip("?"): k for k in spec}
        for key in value:
            if key not in known:
                raise unknown_key(key, known, f"key `{key}` in section `{where}`")
        for key, k in known.items():
            if key not in value and not k.endswith("?"):
                raise KeyError(f"params.yaml: section `{where}` is missing the required key `{key}`")
        for key, v in value.items():
            if not (v is None and known[key].endswith("?")):
                _check(v, f"{where}.{key}", spec[known[key]], folders)
    else:
        kinds = spec if isinstance(spec, tuple) else (spec,)
        ok = any(k is object or isinstance(value, k) and not (isinstance(value, bool) and k in (int, float))
                 or k is float and type(value) is int for k in kinds)
        if not ok:
            expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise ValueError(f"params.yaml: `{where}` is {value!r} ({type(value).__name__}); expected {expected}")


TOP = {"heldout_scenarios": [str], "threads": Maybe(int), "checkpoints_dir": str}  # top-level params stages read


def checked(params: dict, name: str, schemas: dict, top: tuple[str, ...] = (), folders: bool = True) -> dict:
    """``params[name]`` checked against ``schemas[name]``, and the top-level params (those in ``top``
    required), before a stage reads or writes anything. Returns the section."""
    top_level = _unrecorded(params)  # checking every key is not reading it (asrlab.reads)
    for key, spec in TOP.items():
        if key in top_level:
            _check(top_level[key], key, spec, [])
        elif key in top:
            near = difflib.get_close_matches(key, [str(k) for k in top_level], n=1)
            hint = f" (`{near[0]}` is not a param: misspelt?)" if near else ""
            raise KeyError(f"params.yaml: the top-level key `{key}` is missing{hint}; stage `{name}` reads it")
    return check_keys(section(params, name), name, schemas[name], folders=folders)


def _unrecorded(value):
    """``value`` as plain dicts, read past any recording dict subclass (``dict.items``, not its override)."""
    if isinstance(value, dict):
        return {k: _unrecorded(v) for k, v in dict.items(value)}
    if isinstance(value, list):
        return [_unrecorded(v) for v in value]
    return value


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
    """Torch threads for a stage: the top-level param ``threads`` (``requested``) when set, else the cores
    other processes leave free now (:func:`busy_cores`): threads beyond the free cores spin against a busy
    process (issue 18: 0.19 -> 4 s per step beside one other job on 2 cores). ``ASRLAB_THREADS`` overrides
    both: tests and CI pin one thread per process with it, whatever params.yaml says."""
    if os.environ.get("ASRLAB_THREADS"):
        return max(1, int(os.environ["ASRLAB_THREADS"]))
    if requested:
        return int(requested)
    cores = os.cpu_count() or 1
    free = max(1, cores - round(busy_cores()))
    if free < cores:
        print(f"[asrlab] {cores - free} of {cores} cores busy: {free} torch thread(s)")
    return free


def set_threads(params: dict) -> int:
    """What the CLI does once before a stage: torch's threads from ``params["threads"]`` (:func:`threads`)."""
    import torch

    _check(params.get("threads"), "threads", TOP["threads"], [])
    n = threads(params.get("threads"))
    torch.set_num_threads(n)
    return n
