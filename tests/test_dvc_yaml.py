"""dvc.yaml, the map of the project: short, complete and the same pipeline it was before issue 18 shortened it.

The pipeline is read the way DVC reads it (``dvc.repo.Repo(...).index.stages``: templating and YAML anchors
resolved), on the default params and on the smoke profile.
"""

from __future__ import annotations

import ast
import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from asrlab.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "lib"
MAX_LINES = 333
BEFORE = json.loads((Path(__file__).parent / "dvc_pipeline_before_issue18.json").read_text())


def dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def resolved(repo: Path) -> dict:
    """{stage: {cmd, deps, params: {file: [keys]}, outs: {path: flags}}} as DVC resolves ``repo``'s dvc.yaml."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    out = {}
    with Repo(str(repo)) as r:
        for s in r.index.stages:
            params, deps = {}, []
            for d in s.deps:
                if isinstance(d, ParamsDependency):
                    params.setdefault(d.def_path, []).extend(sorted(d.params) if d.params else ["*"])
                else:
                    deps.append(d.def_path)
            outs = {o.def_path: {"cache": o.use_cache, "metric": bool(o.metric), "plot": bool(o.plot),
                                 "persist": o.persist} for o in s.outs}
            out[s.name] = {"cmd": s.cmd, "deps": deps, "params": params, "outs": outs}
    return out


@pytest.fixture(scope="module", params=["default", "smoke"])
def pipeline(request, tmp_path_factory) -> dict:
    """The resolved pipeline in a scratch copy (dvc.yaml, params.yaml, profiles) with the profile applied."""
    from dvc.repo import Repo

    from asrlab.cli import main

    repo = tmp_path_factory.mktemp(request.param)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    Repo.init(str(repo), no_scm=True).close()
    if request.param != "default":
        assert main(["--params", str(repo / "params.yaml"), "profile", request.param,
                     "--profiles-dir", str(ROOT / "experiments/profiles")]) == 0
    return resolved(repo)


def test_dvc_yaml_is_short():
    lines = (ROOT / "dvc.yaml").read_text().count("\n")
    assert lines <= MAX_LINES, f"dvc.yaml has {lines} lines; the map should stay readable (<= {MAX_LINES})"


def under(path: str, declared: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in declared)


def test_the_pipeline_is_the_one_before_issue_18(pipeline):
    """Same stage names, commands and outs (with their cache/metric/plot/persist flags); every param key and
    every data/model dependency of the long dvc.yaml still declared; code deps may be coarser (a directory)."""
    assert set(pipeline) >= set(BEFORE), f"stages gone: {sorted(set(BEFORE) - set(pipeline))}"
    for name, before in BEFORE.items():
        now = pipeline[name]
        assert now["cmd"] == before["cmd"], name
        assert now["outs"] == before["outs"], name
        for file, keys in before["params"].items():
            have = now["params"].get(file, [])
            missing = [k for k in keys if not any(k == h or k.startswith(h + ".") for h in have)]
            assert not missing, f"{name}: params {missing} of {file} no longer declared"
        for dep in before["deps"]:
            if dep.startswith("lib/"):
                assert under(dep, now["deps"]), f"{name}: code dep {dep} not covered"
            else:
                assert dep in now["deps"], f"{name}: data/model dep {dep} gone"


def module_file(module: str) -> Path | None:
    base = LIB / module.replace(".", "/")
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def asrlab_imports(module: str) -> set[str]:
    """The asrlab modules ``module`` imports anywhere in its file (lazy imports inside functions too)."""
    path = module_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("asrlab")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("asrlab"):
                found |= {f"{base}.{a.name}" if module_file(f"{base}.{a.name}") else base for a in node.names}
    return found


def code_files(module: str) -> set[str]:
    """Files of every asrlab module ``module`` needs, transitively, repo-relative; packages' ``__init__.py``
    that hold only a docstring are left out (they cannot change a result)."""
    seen, todo = set(), [module, "asrlab.params"]  # the CLI loads params with asrlab.params for every stage
    while todo:
        m = todo.pop()
        if m in seen or module_file(m) is None:
            continue
        seen.add(m)
        todo += asrlab_imports(m)
        todo += [".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)]  # parents' __init__ run too
    files = set()
    for m in seen:
        path = module_file(m)
        body = ast.parse(path.read_text()).body
        if path.name == "__init__.py" and all(isinstance(n, ast.Expr) for n in body):
            continue
        files.add(str(path.relative_to(ROOT)))
    return files


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_cover_what_the_stage_imports(stage):
    """Under-declared code is the bug (a stale result after an edit); over-declared only costs a rerun."""
    deps = dvc_yaml()["stages"][stage]["deps"]
    missing = sorted(f for f in code_files(f"asrlab.stages.{STAGES[stage][0]}") if not under(f, deps))
    assert not missing, f"{stage} imports {missing} but dvc.yaml does not list them (or their directory)"


def test_every_stage_is_one_asrlab_command_with_its_params():
    stages = dvc_yaml()["stages"]
    assert set(stages) == set(STAGES), set(stages) ^ set(STAGES)
    for name, stage in stages.items():
        assert stage["cmd"] == f"asrlab {name}", name
        assert stage.get("params"), f"{name} declares no params"


def stage_outputs(kind: str) -> set[str]:
    """Paths the stages declare under ``kind`` (outs, metrics or plots)."""
    paths = set()
    for stage in dvc_yaml()["stages"].values():
        for entry in stage.get(kind, []):
            paths |= set(entry) if isinstance(entry, dict) else {entry}
    return paths


def test_top_level_metrics_and_plots_are_files_the_stages_write():
    top = dvc_yaml()
    assert top.get("metrics") and top.get("plots")
    written = stage_outputs("outs") | stage_outputs("metrics") | stage_outputs("plots")
    assert set(top["metrics"]) <= written, f"top-level metrics no stage writes: {set(top['metrics']) - written}"
    tables = 0
    for entry in top["plots"]:
        (path, spec), = (entry.items() if isinstance(entry, dict) else [(entry, None)])
        assert path in written, f"top-level plot {path} is no stage's output"
        if path.endswith(".csv"):
            tables += 1
            committed = ROOT / path  # the default run's table, kept in git
            if committed.is_file():
                header = next(csv.reader(committed.open()))
                assert {spec["x"], spec["y"]} <= set(header), (path, spec, header)
    assert tables >= 3, "the studies' table.csv files should be plot data"
