"""Declared = read (issue 18): the recorder notes params and files a stage reads; undeclared reads are listed.

The pipeline-wide check runs on the smoke repro (tests/test_pipeline_e2e.py); here a toy stage with planted
undeclared reads proves the comparison can fail, through the same CLI path and the same dvc.lock reading.
"""

from __future__ import annotations

import copy
import json
import sys
import types

from asrlab import cli, reads


def toy_stage(params: dict) -> None:
    """Reads one declared and one undeclared param, a missing key (a default in code), one declared and one
    undeclared file; writes its output and reads it back (not a read: its own output)."""
    p = params["toy"]
    assert p["declared"] == 1 and p["undeclared"] == 2 and params.get("missing", "fallback") == "fallback"
    sub = copy.deepcopy(p["nested"])  # a copy is not a read; what is taken from it is
    assert sub["used"] == 3
    open("data/declared/x.txt").read()
    open("data/undeclared/y.txt").read()
    with open("results/out.json", "w") as f:
        f.write("{}")
    open("results/out.json").read()
    open("lib/not_data.py", "w").close()
    open("lib/not_data.py").read()  # outside data/, models/, results/ and the data roots: not recorded


LOCK = {"cmd": "asrlab toy",
        "deps": [{"path": "data/declared", "md5": "0"}, {"path": "lib/asrlab/stages/toy.py", "md5": "0"}],
        "params": {"params.yaml": {"toy.declared": 1, "toy.nested": {"used": 3, "unused": 4}}},
        "outs": [{"path": "results/out.json", "md5": "0"}]}


def test_planted_undeclared_reads_are_listed(tmp_path, monkeypatch):
    for d in ("data/declared", "data/undeclared", "results", "lib"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "data/declared/x.txt").write_text("x")
    (tmp_path / "data/undeclared/y.txt").write_text("y")
    (tmp_path / "params.yaml").write_text(json.dumps(
        {"toy": {"declared": 1, "undeclared": 2, "nested": {"used": 3, "unused": 4}}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "asrlab.stages._toy", types.SimpleNamespace(run=toy_stage))
    monkeypatch.setitem(cli.STAGES, "toy", ("_toy", "run"))
    monkeypatch.setenv(reads.ENV, str(tmp_path / "reads"))
    assert cli.main(["toy"]) == 0

    record = json.loads((tmp_path / "reads/toy.json").read_text())
    assert record["params"] == ["missing", "toy.declared", "toy.nested.used", "toy.undeclared"]
    assert record["files"] == [str(tmp_path / "data/declared/x.txt"), str(tmp_path / "data/undeclared/y.txt")]
    params, paths = reads.declarations(LOCK)
    assert reads.undeclared(record, params, paths, tmp_path) == [
        "param missing", "param toy.undeclared", "file data/undeclared/y.txt"]
    # declared, nothing is listed: a prefix covers its keys, a folder its files
    assert reads.undeclared(record, [*params, "toy", "missing"], [*paths, "data/undeclared"], tmp_path) == []


def test_data_roots_named_by_params_are_watched(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    (shared / "corpus").mkdir(parents=True)
    (shared / "corpus/a.txt").write_text("a")
    (shared / "other.txt").write_text("b")
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    rec = reads.Recorder({"prepare": {"text_dir": "../shared/corpus"}})
    rec.params["prepare"]["text_dir"]
    open(shared / "corpus/a.txt").read()
    open(shared / "other.txt").read()  # named by no param: not a data root
    record = rec.stop()
    assert record == {"params": ["prepare.text_dir"], "files": [str(shared / "corpus/a.txt")]}
    assert reads.undeclared(record, ["prepare"], ["../shared/corpus"], repo) == []
    assert reads.undeclared(record, ["prepare.other"], [], repo) == [
        "param prepare.text_dir", f"file {shared / 'corpus/a.txt'}"]


def test_params_wrapper_is_a_dict_to_the_stage():
    log: set = set()
    p = reads.Params({"a": {"b": 1, "c": {"d": 2}}, "e": [1, 2]}, log)
    assert isinstance(p, dict) and p == {"a": {"b": 1, "c": {"d": 2}}, "e": [1, 2]}
    assert list(p) == ["a", "e"] and log == set()  # the key set alone is not a read
    assert json.loads(json.dumps(p)) == {"a": {"b": 1, "c": {"d": 2}}, "e": [1, 2]}
    assert log == {"a.b", "a.c.d", "e"}
    log.clear()
    assert {**p["a"]["c"]} == {"d": 2} and log == {"a.c.d"}
    assert reads.plain(p) == {"a": {"b": 1, "c": {"d": 2}}, "e": [1, 2]} and type(reads.plain(p)["a"]) is dict


def test_official_slurp_root_must_lie_in_the_declared_text_dir(make_params, tmp_path):
    """dvc.yaml declares prepare.slurp.text_dir; a null official_root cannot be a dependency of its own."""
    import pytest

    from asrlab.stages import prepare

    params = make_params()
    (tmp_path / "official").mkdir()
    params["prepare"]["slurp"]["official_root"] = str(tmp_path / "official")
    with pytest.raises(ValueError, match=r"prepare\.slurp\.official_root .* not inside prepare\.slurp\.text_dir"):
        prepare.check_params(params)
    params["prepare"]["slurp"]["text_dir"] = str(tmp_path)
    prepare.check_params(params)


def test_a_folder_the_stage_creates_is_its_own(tmp_path, monkeypatch):
    import tempfile

    (tmp_path / "models/old").mkdir(parents=True)
    (tmp_path / "models/old/a.txt").write_text("a")
    monkeypatch.chdir(tmp_path)
    rec = reads.Recorder({})
    staging = tempfile.mkdtemp(prefix=".out.", dir="models")  # as a stage stages its output
    (tmp_path / staging / "b.txt").write_bytes(b"b")  # written natively, say: no open() event
    open(f"{staging}/b.txt").read()
    (tmp_path / "models/old").mkdir(exist_ok=True)  # an existing folder is not the stage's
    open("models/old/a.txt").read()
    assert rec.stop()["files"] == [str(tmp_path / "models/old/a.txt")]


def test_dataclass_asdict_of_params_is_a_read_of_all_it_copies():
    from dataclasses import asdict, dataclass

    @dataclass
    class Run:
        train: dict

    log: set = set()
    p = reads.Params({"train": {"lr": 1, "steps": {"max": 2}}}, log)
    assert asdict(Run(p["train"])) == {"train": {"lr": 1, "steps": {"max": 2}}}
    assert log == {"train.lr", "train.steps.max"}


def _read(path: str) -> str:
    return open(path).read()


def test_reads_of_forked_workers_are_collected(tmp_path, monkeypatch):
    from multiprocessing import get_context

    (tmp_path / "data").mkdir()
    for name in ("a", "b"):
        (tmp_path / f"data/{name}.txt").write_text(name)
    monkeypatch.chdir(tmp_path)
    rec = reads.Recorder({}, spool=tmp_path / "spool")
    with get_context("fork").Pool(2) as pool:
        assert pool.map(_read, ["data/a.txt", "data/b.txt"]) == ["a", "b"]
    assert rec.stop()["files"] == [str(tmp_path / "data/a.txt"), str(tmp_path / "data/b.txt")]
    assert not (tmp_path / "spool").exists()


def test_checking_a_section_is_not_reading_it():
    """Every stage validates its whole section first; only what the stage then takes counts as read."""
    from asrlab.params import checked
    from asrlab.reads import Params

    log: set = set()
    params = Params({"threads": None, "heldout_scenarios": ["weather"], "s": {"a": 1, "b": {"c": 2.0}}}, log)
    section = checked(params, "s", {"s": {"a": int, "b": {"c": float}}}, top=("heldout_scenarios",))
    assert log == set()
    assert section["b"]["c"] == 2.0 and log == {"s.b.c"}
