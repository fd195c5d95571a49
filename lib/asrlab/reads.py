"""Declared = read (issue 18): what a stage reads while it runs, to compare with what its dvc.yaml entry declares.

Test instrumentation, off unless ``ASRLAB_RECORD_READS=<dir>`` is set: then ``asrlab <stage>`` hands the stage
its params wrapped in :class:`Params`, which notes the dotted path of every key read, and an audit hook
(``sys.addaudithook``, the "open" event) notes every file opened for reading under the repository's
``data/``, ``models/`` and ``results/`` and under any outside folder or file a param names (the shared data
roots: ``prepare.slurp.text_dir``, ``prepare.speechocean.dir``, a local model ``source``, ...). The stage
writes ``<dir>/<stage>.json``: ``{"params": [...], "files": [...]}``. :func:`undeclared` checks such a
record against the stage's declarations.

What counts as a read of a param: a value taken (``p[k]``, ``p.get(k)``, ``items()``, ``values()``, a copy,
a JSON encoding or pickle of the dict); a key looked up that is not there (the code then falls back to a
default, which DVC cannot see change); ``k in p``. Iterating over a dict's keys alone is not (a new key
changes nothing until it is read). What counts as a read of a file: a Python ``open`` for reading, a
directory listing, and the native loaders that bypass ``open`` (safetensors, the project tokenizer),
which are wrapped here to raise the same audit event. Files the stage wrote earlier in the run, and
anything in a folder it created (a staging copy of its output), are not reads. Forked worker processes
(render, features) inherit the hook and append their reads to a spool the stage's process collects.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

ENV = "ASRLAB_RECORD_READS"
REPO_DIRS = ("data", "models", "results")


class Params(dict):
    """A params dict (nested dicts wrapped too) that adds the dotted path of every key it is asked for to
    ``log``. Stage code is unchanged: it is a dict."""

    __slots__ = ("_log", "_path")

    def __init__(self, data=(), log: set | None = None, path: str = ""):
        # Without a log (type(p)(pairs): dataclasses.asdict copies so), a copy whose values were read already.
        super().__init__()
        self._log, self._path = set() if log is None else log, path
        for k, v in dict(data).items():
            dict.__setitem__(self, k, self._wrap(k, v))

    def _wrap(self, key, value):
        if isinstance(value, dict) and not isinstance(value, Params):
            return Params(value, self._log, f"{self._path}{key}.")
        return value

    def _note(self, key) -> None:
        # A dict value is not a read by itself: its own keys are, when the code takes them.
        if not isinstance(dict.get(self, key), Params):
            self._log.add(f"{self._path}{key}")

    def __getitem__(self, key):
        self._note(key)
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        self._note(key)
        return dict.get(self, key, default)

    def __contains__(self, key):
        self._note(key)
        return dict.__contains__(self, key)

    def __iter__(self):  # overridden so that dict(p), {**p} and f(**p) go through keys() and __getitem__
        return dict.__iter__(self)

    def __setitem__(self, key, value):
        dict.__setitem__(self, key, self._wrap(key, value))

    def setdefault(self, key, default=None):
        if not dict.__contains__(self, key):
            self[key] = default
        return self[key]

    def pop(self, key, *default):
        self._note(key)
        return dict.pop(self, key, *default)

    def items(self):
        return [(k, self[k]) for k in dict.keys(self)]

    def values(self):
        return [self[k] for k in dict.keys(self)]

    def copy(self):  # copies are not reads; what the code takes from them is
        return Params(dict(dict.items(self)), self._log, self._path)

    def __deepcopy__(self, memo):
        return Params({k: copy.deepcopy(v, memo) for k, v in dict.items(self)}, self._log, self._path)

    def __reduce__(self):  # pickled (a worker process): every key is read, the copy is a plain dict
        return dict, (plain(self),)


def plain(value):
    """``value`` with every :class:`Params` turned back into a dict (its keys noted as read)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _paths_named(value, root: Path) -> set[Path]:
    """Existing files and folders outside ``root`` that a param value names (the configured data roots)."""
    if isinstance(value, dict):
        return set().union(*(_paths_named(v, root) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_paths_named(v, root) for v in value)) if value else set()
    if isinstance(value, str) and value and ("/" in value or "\\" in value):
        p = Path(os.path.abspath(value))
        if p.exists() and not p.is_relative_to(root):
            return {p}
    return set()


# Native loaders that open files without Python's open(): wrapped to raise the same audit event.
_NATIVE = (("safetensors", "safe_open"), ("safetensors.torch", "load_file"), ("safetensors.torch", "load_model"),
           ("asrlab.tokenizer", "load_tokenizer"))


def _audited(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, (str, os.PathLike)):
                path = Path(a)
                sys.audit("open", str(path / "tokenizer.json" if path.is_dir() else path), "r", 0)
        return fn(*args, **kwargs)
    return wrapper


class Recorder:
    """Records one stage's reads from construction to :meth:`stop` (an audit hook cannot be removed, so it
    goes quiet instead)."""

    def __init__(self, params: dict, root: str | Path = ".", spool: str | Path | None = None):
        self.root = Path(os.path.abspath(root))
        self.spool = Path(os.path.abspath(spool)) if spool else None  # forked workers append their reads here
        self.child = False
        self.keys: set[str] = set()
        self.files: set[str] = set()
        self.written: set[str] = set()
        self.made: list[str] = []  # folders the stage created (its staging copies): nothing read there is a read
        self.roots = [self.root / d for d in REPO_DIRS] + sorted(_paths_named(params, self.root))
        self.params = Params(params, self.keys)
        self.active = True
        for module, name in _NATIVE:
            mod = importlib.import_module(module)
            if not hasattr(getattr(mod, name), "__wrapped__"):
                setattr(mod, name, _audited(getattr(mod, name)))
        sys.addaudithook(self._hook)
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self.child = True

    def _hook(self, event: str, args: tuple) -> None:
        if not self.active or event not in ("open", "os.listdir", "os.scandir", "os.mkdir"):
            return
        path = args[0]
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)):
            return  # a file descriptor
        path = os.path.abspath(path)
        if event == "os.mkdir":
            if not os.path.exists(path):
                self.made.append(path + os.sep)
            return
        if event == "open":
            mode, flags = args[1], args[2]
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
            if writes:
                self.written.add(path)
                return
        if path in self.written or (path + os.sep).startswith(tuple(self.made)) or not any(
                Path(path).is_relative_to(r) for r in self.roots):
            return
        if self.child and self.spool and path not in self.files:
            self.active = False  # this open is the recorder's own
            try:
                self.spool.mkdir(parents=True, exist_ok=True)
                with open(self.spool / f"{os.getpid()}.txt", "a") as f:
                    f.write(path + "\n")
            finally:
                self.active = True
        self.files.add(path)

    def stop(self) -> dict:
        self.active = False
        if self.spool and self.spool.is_dir():
            for f in self.spool.glob("*.txt"):
                self.files.update(f.read_text().splitlines())
            shutil.rmtree(self.spool)
        return {"params": sorted(self.keys), "files": sorted(self.files)}


def undeclared(record: dict, params: list[str], paths: list[str | Path], root: str | Path = ".") -> list[str]:
    """The reads in ``record`` that the declarations do not cover, one line each. A param is covered when it
    or a dotted prefix of it is among ``params``; a file when it lies under one of ``paths`` (the stage's
    deps and outs, relative to ``root`` or absolute)."""
    root = Path(os.path.abspath(root))
    declared = set(params)
    missing = [f"param {k}" for k in record["params"]
               if not any(".".join(k.split(".")[:i]) in declared for i in range(1, k.count(".") + 2))]
    under = [Path(os.path.abspath(root / p)) for p in paths]
    for f in record["files"]:
        if not any(Path(f).is_relative_to(u) for u in under):
            rel = Path(f).relative_to(root) if Path(f).is_relative_to(root) else Path(f)
            missing.append(f"file {rel}")
    return missing


def declarations(lock_stage: dict) -> tuple[list[str], list[str]]:
    """(param keys, dep and out paths) of one stage of ``dvc.lock``: what DVC resolved from dvc.yaml."""
    params = [k for per_file in (lock_stage.get("params") or {}).values() for k in per_file]
    paths = [d["path"] for kind in ("deps", "outs") for d in lock_stage.get(kind) or []]
    return params, paths


def write(record: dict, directory: str | Path, stage: str) -> Path:
    out = Path(directory) / f"{stage}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    return out
