"""One command line for the pipeline: ``asrlab <stage>``, each stage reading its section of params.yaml."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import yaml

from asrlab import reads, workers
from asrlab.params import TOP, checked, deep_merge, load_params, load_yaml, set_threads, unknown_key

STAGES = {  # command -> (module, function)
    "prepare": ("prepare", "run"), "render": ("render", "run"), "features": ("features", "run"),
    "tokenizer": ("tokenizer", "run"), "import_whisper": ("import_whisper", "run"),
    "pretrain_aed": ("pretrain", "pretrain_aed"), "pretrain_scratch_aed": ("pretrain", "pretrain_scratch_aed"),
    "encoder_states": ("encoder_states", "run"),
    "pretrain_lm": ("pretrain", "pretrain_lm"), "pretrain_llm_asr": ("pretrain", "pretrain_llm_asr"),
    "eval_base": ("eval_base", "run"),
    "syn2real_finetune": ("syn2real", "finetune"), "syn2real_vectors": ("syn2real", "vectors"),
    "syn2real_evaluate": ("syn2real", "evaluate"), "syn2real_report": ("syn2real_report", "run"),
}
STAGES.update({  # soft_tokens study (issue 7)
    "soft_tokens_ssl": ("soft_tokens", "ssl"), "soft_tokens_layer": ("soft_tokens", "layer"),
    "soft_tokens_kmeans": ("soft_tokens", "kmeans"), "soft_tokens_train": ("soft_tokens", "train_downstream"),
    "soft_tokens_sweep": ("soft_tokens_eval", "sweep"),
    "soft_tokens_phones": ("soft_tokens_eval", "phones"), "soft_tokens_eval": ("soft_tokens_eval", "evaluate"),
})
STAGES.update({  # hdmole study (issue 5)
    "hdmole_cache": ("hdmole", "cache"), "hdmole_sweep": ("hdmole", "run_sweep"),
    "hdmole_train": ("hdmole", "run_systems"), "hdmole_report": ("hdmole_report", "run"),
})
STAGES.update({  # efin study (issue 6)
    "efin_train": ("efin", "train_all"), "efin_report": ("efin_report", "run"),
})


def _profile(args) -> None:
    """Merge ``experiments/profiles/<name>.yaml`` over params.yaml (e.g. smoke for tests and CI)."""
    override = Path(args.profiles_dir) / f"{args.name}.yaml"
    if not override.is_file():
        known = sorted(p.stem for p in Path(args.profiles_dir).glob("*.yaml"))
        raise SystemExit(f"asrlab: no profile {args.name!r} in {args.profiles_dir} (known: {known})")
    merged = deep_merge(load_params(args.params), load_yaml(override))
    Path(args.out or args.params).write_text(yaml.safe_dump(merged, sort_keys=False))
    print(f"wrote {args.out or args.params} = {args.params} + {override}")


def check_all(params: dict) -> list[str]:
    """``asrlab check``: every section against its stage's schema, and no unknown top-level key, in one go
    (a stage checks its own section when it starts, but ``dvc repro`` removes a stage's outputs before its
    command runs: run this first). Returns the sections checked."""
    schemas = dict(workers.SCHEMA)
    for module in {m for m, _ in STAGES.values()}:
        schemas.update(getattr(importlib.import_module(f"asrlab.stages.{module}"), "SCHEMA", {}))
    known = {*schemas, *TOP}
    for key in params:
        if key not in known:
            raise unknown_key(key, known, f"top-level key `{key}`")
    for name in sorted(schemas):
        if name in params:
            checked(params, name, schemas, top=("heldout_scenarios",), folders=False)
    return sorted(n for n in schemas if n in params)


def _message(e: Exception) -> str:
    """A KeyError's text without repr quotes; a bare key (a lookup no schema covered) said as a missing param."""
    if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str):
        text = e.args[0]
        return text if " " in text else (f"params.yaml: missing param `{text}` (the stage reads it); compare "
                                         "your params.yaml with the repository's")
    return str(e)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="asrlab", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        sub.add_parser(stage, help=f"run the `{stage}` stage of dvc.yaml")
    prof = sub.add_parser("profile", help="merge a profile's overrides into a params file")
    prof.add_argument("name")
    prof.add_argument("--profiles-dir", default="experiments/profiles")
    prof.add_argument("--out", help="write here instead of over --params")
    sub.add_parser("check", help="check every section of the params file (run before `dvc repro`)")
    workers.add_arguments(sub.add_parser("sweep", help="a sweep worker: run trials of a study's Optuna sweeps"))
    args = parser.parse_args(argv)

    errors = (FileNotFoundError, ValueError, KeyError, RuntimeError)
    if args.command == "profile":
        try:
            _profile(args)
        except errors as e:
            print(f"asrlab profile: error: {_message(e)}", file=sys.stderr)
            return 2
        return 0
    if args.command == "check":
        try:
            sections = check_all(load_params(args.params))
        except errors as e:
            print(f"asrlab check: error: {_message(e)}", file=sys.stderr)
            return 2
        print(f"{args.params}: {len(sections)} sections valid")
        return 0
    if args.command == "sweep":  # many workers, processes or machines share one study (asrlab.workers)
        try:
            return workers.main(args, args.params)
        except errors as e:
            print(f"asrlab sweep: error: {_message(e)}", file=sys.stderr)
            return 2
    recorder = None
    try:
        module, function = STAGES[args.command]
        os.environ["ASRLAB_STAGE"] = args.command  # MLflow runs record the DVC stage
        params = load_params(args.params)
        stage = getattr(importlib.import_module(f"asrlab.stages.{module}"), function)
        set_threads(params)  # how fast, not what: no stage declares `threads`
        if os.environ.get(reads.ENV):  # tests: note every param and file the stage reads (asrlab.reads)
            recorder = reads.Recorder(params, spool=Path(os.environ[reads.ENV]) / f".{args.command}.workers")
            params = recorder.params
        stage(params)
    except errors as e:
        print(f"asrlab {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    finally:
        if recorder is not None:
            reads.write(recorder.stop(), os.environ[reads.ENV], args.command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
