"""asrlab.io: atomic writes, JSON lines, stable hashes and per-item seeds."""

from __future__ import annotations

import hashlib

import pytest

from asrlab.io import atomic_path, item_seed, read_jsonl, stable_hash, write_json, write_jsonl, write_text


def test_atomic_path_renames_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_text("done")
        assert not target.exists()  # readers never see the file before it is complete
    assert target.read_text() == "done"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_path_leaves_no_file_on_exception(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half a file")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind either


def test_atomic_path_keeps_previous_output_on_exception(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("{broken")
            raise ValueError("boom")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_jsonl_is_atomic_when_rows_fail(tmp_path):
    target = tmp_path / "rows.jsonl"
    write_jsonl(target, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError):
        write_jsonl(target, rows())
    assert read_jsonl(target) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_jsonl_round_trip_keeps_unicode_and_skips_blank_lines(tmp_path):
    rows = [{"id": "a", "text": "café"}, {"id": "b", "n": [1, 2]}]
    assert write_jsonl(tmp_path / "x.jsonl", rows) == 2
    (tmp_path / "y.jsonl").write_text((tmp_path / "x.jsonl").read_text() + "\n\n")
    assert read_jsonl(tmp_path / "y.jsonl") == rows


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_text(path, '{"ok": 1}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_jsonl(path)


def test_stable_hash_and_item_seed():
    assert stable_hash("espeak", "en-us", "hi", 170) == stable_hash("espeak", "en-us", "hi", 170)
    assert stable_hash("espeak", "en-us", "hi", 170) != stable_hash("espeak", "en-us", "hi", 171)
    assert len(stable_hash("x", n=20)) == 20
    # the content-addressed audio cache must not change between Python runs or machines: SHA-1 of the JSON
    assert stable_hash("a", 1) == hashlib.sha1(b'["a", 1]').hexdigest()[:16]
    s = item_seed(1234, "synthetic", "slurp-1")
    assert s == item_seed(1234, "synthetic", "slurp-1") and 0 <= s < 2**32
    assert s != item_seed(1234, "synthetic", "slurp-2") and s != item_seed(1235, "synthetic", "slurp-1")
