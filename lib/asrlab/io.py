"""Small file helpers: atomic writes, JSON lines, stable hashes and per-item seeds."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def _umask() -> int:
    """The process's umask now (reading it means setting it: set it back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    Readers never see a half-written file, and a killed stage leaves the previous output intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside ``path``; on success it replaces ``path`` whole, on error it is removed.

    A failed or killed stage leaves the previous output folder as it was (write aside, swap at the end).
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        make_readable(tmp)  # safetensors and mkstemp write 0600
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_readable(path: str | os.PathLike) -> None:
    """A folder and everything in it: files 0666 and folders 0777 less the umask (mkstemp's 0600 undone)."""
    path, mask = Path(path), _umask()
    for f in [path, *path.rglob("*")]:
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from e
    return rows


def stable_hash(*parts: Any, n: int = 16) -> str:
    """Hex digest of the JSON encoding of ``parts``: the same on every machine and Python run."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:n]


def item_seed(*parts: Any) -> int:
    """A 32-bit seed derived from ``parts`` (e.g. global seed, pool, utterance id): order-independent."""
    return int(stable_hash(*parts, n=8), 16)
