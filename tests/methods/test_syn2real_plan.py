"""The syn2real study's plan of fine-tuning runs and its report table, without training anything."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import yaml

from asrlab.stages.syn2real import groups_of, plan, source_sets
from asrlab.stages.syn2real_report import table

P = yaml.safe_load(open("params.yaml"))["syn2real"]
SCENARIOS = ["alarm", "calendar", "datetime", "general", "music", "play", "qa", "social", "weather"]


def test_plan_runs_after_their_inits_and_covers_every_system():
    runs = plan(P, SCENARIOS)
    seen = {"base"}
    for r in runs:
        assert r.init in seen, f"{r.name} starts from {r.init}, which is not trained yet"
        seen.add(r.name)
    names = {r.name for r in runs}
    for seed in P["seeds"]:
        for t in P["targets"]:
            assert f"s{seed}/{t}/baseline" in names
    assert {f"s0/{t}/oracle" for t in P["targets"]} <= names
    src = next(r for r in runs if r.name == "s0/shared/source_real")
    assert not set(src.scenarios) & set(P["targets"]) and src.pools == (P["real_pool"],)
    base = next(r for r in runs if r.name == "s1/music/baseline")
    assert base.init == "s0/shared/source_mix" and base.pools == (P["synthetic_pool"],)
    assert base.train["lr"] == pytest.approx(P["finetune"]["source"]["lr"] * P["finetune"]["target_lr_scale"])


def test_leave_one_out_gives_each_target_its_own_sources_and_unknown_targets_fail():
    p = copy.deepcopy(P) | {"leave_one_out": True, "targets": ["music", "weather"]}
    sets = source_sets(p, SCENARIOS)
    assert sets["loo-music"][0] == tuple(s for s in SCENARIOS if s != "music")
    assert sets["loo-weather"][1] == ("weather",)
    with pytest.raises(ValueError, match="unknown scenario"):
        source_sets(P | {"targets": ["musik"]}, SCENARIOS)


def test_groups_are_balanced_by_size_and_cover_the_source_once():
    sizes = {"calendar": 409, "play": 388, "qa": 301, "alarm": 96, "general": 187}
    groups = groups_of(tuple(sizes), 2, sizes)
    assert sorted(s for g in groups for s in g) == sorted(sizes)
    loads = [sum(sizes[s] for s in g) for g in groups]
    assert max(loads) - min(loads) <= 200
    with pytest.raises(ValueError, match="only 1 scenario"):
        plan(P | {"targets": ["music"]}, ["alarm", "music"])


def test_table_relative_change_is_per_seed_then_averaged():
    rows = []
    for seed, (b, s) in enumerate([(50.0, 40.0), (60.0, 60.0)]):
        rows += [{"seed": seed, "target": "music", "system": "baseline", "decoding": "ctc", "lambda": 0.0, "wer": b, "cer": b / 2},
                 {"seed": seed, "target": "music", "system": "syn2real", "decoding": "ctc", "lambda": 0.3, "wer": s, "cer": s / 2}]
    tab = table(pd.DataFrame(rows), "ctc")
    music = tab[tab["target"] == "music"].iloc[0]
    assert music["syn2real_rel_wer"] == pytest.approx(-10.0)  # (-20 % + 0 %) / 2
    assert music["syn2real_rel_wer_std"] == pytest.approx(10.0)
    assert music["baseline_wer"] == pytest.approx(55.0)
    mean = tab[tab["target"] == "mean"].iloc[0]
    assert mean["syn2real_rel_wer"] == pytest.approx(100 * (50 - 55) / 55)  # change of the mean WER
