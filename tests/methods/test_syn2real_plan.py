"""The syn2real study's plan of fine-tuning runs and its report table, without training anything."""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from asrlab.stages.syn2real import groups_of, plan, pool_seeds, sentence, source_sets
from asrlab.stages.syn2real_report import table
from asrlab.params import load_yaml  # YAML 1.2 floats, as DVC reads params

P = load_yaml("params.yaml")["syn2real"]
SCENARIOS = ["alarm", "calendar", "datetime", "general", "music", "play", "qa", "social", "weather"]


def test_plan_runs_after_their_inits_and_covers_every_system():
    runs = plan(P, SCENARIOS)
    seen = {"base"}
    for r in runs:
        assert r.init in seen, f"{r.name} starts from {r.init}, which is not trained yet"
        seen.add(r.name)
    names = {r.name for r in runs}
    assert P["base"] == "models/whisper"  # the paper's protocol: every source model from the pretrained Whisper
    assert set(P["synthetic_pools"]) == {"synthetic", "synthetic_neural"}
    for syn in P["synthetic_pools"]:
        for seed in pool_seeds(P, syn):
            for t in P["targets"]:
                assert f"s{seed}/{syn}/{t}/baseline" in names
        assert {f"s0/{syn}/{t}/oracle" for t in P["targets"]} <= names
        src = next(r for r in runs if r.name == f"s0/shared/{syn}/source_real")
        assert not set(src.scenarios) & set(P["targets"]) and src.pools == (P["real_pool"],)
        assert src.init == "base" and src.texts_of == (P["real_pool"], syn)  # same texts as θ_syn of this pool
    assert pool_seeds(P, "synthetic_neural") == [0] and "s1/synthetic_neural/music/baseline" not in names
    base = next(r for r in runs if r.name == "s1/synthetic/music/baseline")
    assert base.init == "s0/shared/synthetic/source_mix" and base.pools == ("synthetic",)
    assert base.train["lr"] == pytest.approx(P["finetune"]["source"]["lr"] * P["finetune"]["target_lr_scale"])
    assert any("group" in n for n in names if "/synthetic/" in n)
    assert not any("group" in n for n in names if "synthetic_neural" in n)  # multi_source.pools


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
    for seed, (b, s) in enumerate([(50.0, 40.0), (60.0, 60.0)]):  # noqa: B007
        rows += [{"seed": seed, "target": "music", "system": "baseline", "decoding": "ctc", "lambda": 0.0, "wer": b, "cer": b / 2},
                 {"seed": seed, "target": "music", "system": "syn2real", "decoding": "ctc", "lambda": 0.3, "wer": s, "cer": s / 2}]
    tab = table(pd.DataFrame(rows), "ctc")
    music = tab[tab["target"] == "music"].iloc[0]
    assert music["syn2real_rel_wer"] == pytest.approx(-10.0)  # (-20 % + 0 %) / 2
    assert music["syn2real_rel_wer_std"] == pytest.approx(10.0)
    assert music["baseline_wer"] == pytest.approx(55.0)
    mean = tab[tab["target"] == "mean"].iloc[0]
    assert mean["syn2real_rel_wer"] == pytest.approx(100 * (50 - 55) / 55)  # change of the mean WER


def test_same_texts_pairs_utterances_by_sentence_id():
    assert sentence({"id": "slurp-123@real_proxy"}) == sentence({"id": "slurp-123@synthetic_neural"}) == "slurp-123"


def test_headline_has_the_issue_schema():
    from asrlab.stages.syn2real_report import headline
    rows = []
    for ts in ("target", "speechocean762"):
        for seed, (b, s) in enumerate([(30.0, 27.0), (32.0, 28.0)]):
            rows += [{"pool": "synthetic", "seed": seed, "target": "music", "system": sy, "test_set": ts,
                      "decoding": "attention", "lambda": lam, "wer": w, "cer": w / 2}
                     for sy, lam, w in (("baseline", 0.0, b), ("syn2real", 0.3, s))]
        rows.append({"pool": "synthetic", "seed": 0, "target": "music", "system": "zero_shot", "test_set": ts,
                     "decoding": "attention", "lambda": None, "wer": 40.0, "cer": 20.0})
    ev = pd.DataFrame(rows)
    tabs = {("synthetic", ts): table(ev[ev["test_set"] == ts], "attention") for ts in ("target", "speechocean762")}
    h = headline(tabs, ev)["synthetic"]
    assert set(h) == {"mean_rel_wer_change_pct", "targets_improved", "targets", "seeds", "baseline_wer",
                      "syn2real_wer", "source_real_wer", "oracle_wer", "zero_shot_wer", "speechocean762"}
    assert set(h["speechocean762"]) == {"zero_shot_wer", "baseline_wer", "syn2real_wer", "syn2real_real_tau_wer"}
    assert h["mean_rel_wer_change_pct"] == pytest.approx(100 * (27.5 - 31) / 31, abs=1e-3)
    assert h["targets_improved"] == 1 and h["targets"] == 1 and h["seeds"] == 2 and h["zero_shot_wer"] == 40.0
