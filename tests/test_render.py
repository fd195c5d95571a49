"""Stage `render`: pools, the content-addressed cache, seeded per-utterance draws, and failure isolation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from datahelpers import prepared_rows, write_prepared

from asrlab.audio import tts
from asrlab.audio.tts import EngineUnavailable, SynthesisError
from asrlab.io import read_jsonl, stable_hash
from asrlab.stages import features, render
from asrlab.params import load_yaml  # YAML 1.2 floats, as DVC reads params
from ci_policy import skip_or_fail

TEXTS = ["wake me up at six", "turn the lights off", "what is the weather", "play some jazz"]


def manifest(params, name="slurp") -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(Path(params["render"]["out_dir"]) / f"{name}.jsonl")}


def cache_files(params) -> dict[Path, int]:
    """Every file under the cache (temporary files included) and its modification time."""
    return {p: p.stat().st_mtime_ns for p in Path(params["render"]["cache_dir"]).rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------ with engines


@pytest.mark.tts
def test_render_every_pool(make_params):
    params = make_params()
    params["render"]["sets"] = {"slurp": {"source": "slurp", "pools": ["synthetic", "real_proxy", "accents"]}}
    recordings = [{"id": "so762-1", "audio": "/x.opus", "pool": "speechocean762", "split": "train"}]
    write_prepared(params, prepared_rows(TEXTS[:2]), recordings=recordings)
    stats = render.run(params)

    rows = manifest(params)
    assert set(rows) == {f"u{i:03d}@{p}" for i in range(2) for p in ("synthetic", "real_proxy", "accents")}
    pools = params["render"]["pools"]
    for r in rows.values():
        pool = pools[r["pool"]]
        assert r["engine"] == pool["engine"] and r["speaker"] == r["voice"]
        assert pool["rate"][0] <= r["rate"] <= pool["rate"][1] and pool["pitch"][0] <= r["pitch"] <= pool["pitch"][1]
        info = sf.info(r["audio"])
        assert info.samplerate == 16_000 and info.channels == 1
        assert 0.5 < r["duration"] < 4 and abs(info.duration - r["duration"]) < 0.002
        assert r["text"] in TEXTS[:2] and r["split"] == "train" and r["scenario"] == "alarm"
        assert not any(k.startswith("_") for k in r)
        if r["pool"] == "real_proxy":
            assert r["voice"] in pool["voices"] and r["accent"] == "native"
            assert isinstance(r["channel_seed"], int) and 15 <= r["channel"]["snr_db"] <= 30
        else:
            assert r["channel_seed"] is None and "channel" not in r
        if r["pool"] == "accents":
            assert (r["voice"], r["accent"]) in {("mb-de2-en", "germanic"), ("mb-fr1-en", "romance")}
    assert stats["utterances"] == 6 and stats["rejects"] == 0 and stats["cache_hits"] == 0
    assert stats["sets"]["slurp"]["real_proxy/train"]["utterances"] == 2
    out = Path(params["render"]["out_dir"])
    assert read_jsonl(out / "recordings.jsonl") == recordings
    assert read_jsonl(out / "rejects.jsonl") == []
    assert json.loads(Path(params["render"]["stats"]).read_text()) == stats


@pytest.mark.tts
def test_cache_second_run_hits_and_new_sentence_renders_alone(make_params):
    params = make_params(render__workers=2)
    params["render"]["sets"] = {"slurp": {"source": "slurp", "pools": ["synthetic", "real_proxy"]}}
    write_prepared(params, prepared_rows(TEXTS[:3]))
    first = render.run(params)
    rows1, files1 = manifest(params), cache_files(params)
    assert first["cache_hits"] == 0 and first["utterances"] == 6
    assert sorted(files1) == sorted(Path(r["audio"]) for r in rows1.values())  # no temporary files left

    params["render"]["workers"] = 1  # worker count does not change anything either
    second = render.run(params)
    assert second["cache_hits"] == 6 and second["utterances"] == 6 and second["rejects"] == 0
    assert manifest(params) == rows1
    assert cache_files(params) == files1  # nothing rewritten

    write_prepared(params, prepared_rows(TEXTS[:3] + ["remind me to call mum"]))
    third = render.run(params)
    assert third["cache_hits"] == 6 and third["utterances"] == 8
    files3 = cache_files(params)
    assert {p: files3[p] for p in files1} == files1
    new = set(files3) - set(files1)
    assert len(new) == 2  # the new sentence, once per pool
    rows3 = manifest(params)
    assert {Path(rows3[f"u003@{p}"]["audio"]) for p in ("synthetic", "real_proxy")} == new
    assert {k: rows3[k] for k in rows1} == rows1


@pytest.mark.tts
def test_voice_and_audio_of_an_utterance_do_not_depend_on_the_others(make_params, tmp_path):
    rows = prepared_rows(TEXTS)
    runs = {}
    for name, subset in {"all": rows, "two": [rows[2], rows[3]]}.items():
        params = make_params()
        params["prepare"]["out_dir"] = str(tmp_path / name / "prepared")
        params["render"].update(out_dir=str(tmp_path / name / "manifests"), cache_dir=str(tmp_path / name / "audio"),
                                stats=str(tmp_path / name / "render.json"))
        params["render"]["sets"] = {"slurp": {"source": "slurp", "pools": ["synthetic", "real_proxy"]}}
        write_prepared(params, subset)
        render.run(params)
        runs[name] = manifest(params)
    for uid in ("u002@synthetic", "u003@synthetic", "u002@real_proxy", "u003@real_proxy"):
        a, b = runs["all"][uid], runs["two"][uid]
        for key in ("voice", "rate", "pitch", "channel_seed", "channel", "duration"):
            assert a.get(key) == b.get(key), (uid, key)
        assert Path(a["audio"]).name == Path(b["audio"]).name  # same content address
        assert np.array_equal(sf.read(a["audio"])[0], sf.read(b["audio"])[0])  # and the same samples


@pytest.mark.tts
@pytest.mark.parametrize("workers", [1, 2])
def test_one_bad_utterance_lands_in_rejects(make_params, monkeypatch, workers):
    real = tts.EspeakEngine.synthesize

    def flaky(self, text, voice, rate=175, pitch=50):
        if text == "turn the lights off":
            raise SynthesisError(f"espeak voice {voice} produced no audio for {text!r}: simulated")
        return real(self, text, voice, rate, pitch)

    monkeypatch.setattr(tts.EspeakEngine, "synthesize", flaky)  # inherited by forked workers
    params = make_params(render__workers=workers)
    write_prepared(params, prepared_rows(TEXTS))
    stats = render.run(params)
    assert stats["rejects"] == 1 and stats["utterances"] == 3
    rows = manifest(params)
    assert set(rows) == {"u000@synthetic", "u002@synthetic", "u003@synthetic"}
    rejects = read_jsonl(Path(params["render"]["out_dir"]) / "rejects.jsonl")
    assert len(rejects) == 1
    assert rejects[0]["id"] == "u001@synthetic" and rejects[0]["text"] == "turn the lights off"
    assert "simulated" in rejects[0]["reason"]
    assert stats["sets"]["slurp"]["synthetic/train"]["utterances"] == 3
    assert len(cache_files(params)) == 3  # no half-written file for the failed one

    monkeypatch.setattr(tts.EspeakEngine, "synthesize", real)  # fixed: the next run renders only that one
    again = render.run(params)
    assert again["rejects"] == 0 and again["utterances"] == 4 and again["cache_hits"] == 3


# The neural pool as params.yaml declares it (Piper from PyPI: no Debian engine needed, so no tts marker)
NEURAL = load_yaml(Path(__file__).resolve().parents[1] / "params.yaml")["render"]["pools"][
    "synthetic_neural"]


def test_render_neural_pool_seeded_cached_and_featurised(make_params, tmp_path):
    try:
        tts.get_engine("piper").check(NEURAL["voices"])
    except EngineUnavailable as e:
        skip_or_fail(str(e))
    runs = {}
    for workers in (2, 1):
        params = make_params(render__workers=workers)
        d = tmp_path / f"w{workers}"
        params["prepare"]["out_dir"] = str(d / "prepared")
        params["render"].update(out_dir=str(d / "manifests"), cache_dir=str(d / "audio"), stats=str(d / "render.json"),
                                pools={"synthetic_neural": NEURAL},
                                sets={"neural": {"source": "slurp", "pools": ["synthetic_neural"]}})
        params["features"]["out_dir"] = str(d / "features")
        write_prepared(params, prepared_rows(TEXTS[:3]))
        stats = render.run(params)
        assert stats["utterances"] == 3 and stats["rejects"] == 0 and stats["cache_hits"] == 0
        runs[workers] = manifest(params, "neural")
    rows = runs[2]
    assert set(rows) == {f"u{i:03d}@synthetic_neural" for i in range(3)}
    for r in rows.values():
        assert r["engine"] == "piper" and r["voice"] in NEURAL["voices"]
        for key, value in (("rate", r["rate"]), ("pitch", r["pitch"]), ("noise_scale", r["tts"]["noise_scale"]),
                           ("noise_w", r["tts"]["noise_w"])):
            assert NEURAL[key][0] <= value <= NEURAL[key][1], key
        assert isinstance(r["tts"]["seed"], int)
        info = sf.info(r["audio"])
        assert info.samplerate == 16_000 and info.channels == 1 and 0.5 < r["duration"] < 4
    assert len({r["tts"]["seed"] for r in rows.values()}) == 3  # each utterance its own noise
    # two workers or one: the same draws, the same content addresses and the same samples
    for uid, r in rows.items():
        r1 = runs[1][uid]
        assert {k: v for k, v in r.items() if k != "audio"} == {k: v for k, v in r1.items() if k != "audio"}
        assert Path(r["audio"]).name == Path(r1["audio"]).name
        assert np.array_equal(sf.read(r["audio"])[0], sf.read(r1["audio"])[0])
    again = render.run(params)
    assert again["cache_hits"] == 3
    index = features.run(params)  # the features stage reads every manifest: the new pool comes along
    assert index["per_pool_split"] == {"synthetic_neural/train": {"utterances": 3, "hours": index["audio_hours"]}}


def test_plan_draws_engine_options_and_a_seed_only_for_the_engine_that_takes_them(tmp_path):
    rows = prepared_rows([f"sentence number {i}" for i in range(40)])
    neural = [render.plan(r, "n", NEURAL, render.pool_voices("n", NEURAL), 1234, tmp_path) for r in rows]
    assert all(set(x["tts"]) == {"noise_scale", "noise_w", "seed"} for x in neural)
    assert len({x["tts"]["noise_scale"] for x in neural}) > 30 and len({x["tts"]["seed"] for x in neural}) == 40
    other = render.plan(rows[0], "n", {**NEURAL, "noise_w": None}, render.pool_voices("n", NEURAL), 1234, tmp_path)
    assert set(other["tts"]) == {"noise_scale", "seed"} and other["audio"] != neural[0]["audio"]
    # espeak/MBROLA pools: no options, and the cache address of before (their rendered audio stays valid)
    x = render.plan(rows[0], "p", POOL, render.pool_voices("p", POOL), 1234, tmp_path)
    assert "tts" not in x
    key = stable_hash("espeak", x["voice"], x["text"], x["rate"], x["pitch"], POOL["channel"], x["channel_seed"],
                      16_000, n=20)
    assert Path(x["audio"]).stem == key


def test_check_pool_rejects_options_the_engine_does_not_take():
    with pytest.raises(ValueError, match=r"render\.pools\.s\.noise_scale: engine 'espeak' has no option"):
        render.check_pool("s", {**POOL, "noise_scale": [0.5, 0.8]})
    with pytest.raises(ValueError, match=r"render\.pools\.n\.noise_w: expected a range"):
        render.check_pool("n", {**NEURAL, "noise_w": 0.8})
    render.check_pool("n", NEURAL)
    render.check_pool("n", {**NEURAL, "noise_scale": None})  # null: the voice's own value


# ------------------------------------------------------------------------------------------ planning only


POOL = {"engine": "espeak", "voices": [f"en-us+{v}" for v in ("m1", "m2", "m3", "f1", "f2", "f3")],
        "rate": [145, 195], "pitch": [30, 70], "channel": {"snr_db": [15, 30]}}


def test_plan_is_seeded_per_utterance(tmp_path):
    rows = prepared_rows([f"sentence number {i}" for i in range(60)])
    voices = render.pool_voices("p", POOL)
    a = [render.plan(r, "p", POOL, voices, 1234, tmp_path) for r in rows]
    b = [render.plan(r, "p", POOL, voices, 1234, tmp_path) for r in reversed(rows)][::-1]
    assert a == b
    c = [render.plan(r, "p", POOL, voices, 4321, tmp_path) for r in rows]
    assert sum(x["voice"] != y["voice"] for x, y in zip(a, c)) > 20  # a new seed redraws the voices
    assert len(Counter(x["voice"] for x in a)) == 6  # every voice of the pool gets used
    # the same utterance in another pool draws independently
    d = [render.plan(r, "q", POOL, voices, 1234, tmp_path) for r in rows]
    assert [x["voice"] for x in a] != [x["voice"] for x in d]


def test_plan_cache_key_covers_what_shapes_the_audio(tmp_path):
    voices = render.pool_voices("p", POOL)
    row = prepared_rows(["hello there"])[0]
    base = render.plan(row, "p", POOL, voices, 1, tmp_path)
    assert base["audio"].startswith(str(tmp_path)) and base["audio"].endswith(".flac")
    assert Path(base["audio"]).parent.name == Path(base["audio"]).stem[:2]
    other_text = render.plan({**row, "text": "hello here"}, "p", POOL, voices, 1, tmp_path)
    no_channel = render.plan(row, "p", {**POOL, "channel": None}, voices, 1, tmp_path)
    other_split = render.plan({**row, "split": "test"}, "p", POOL, voices, 1, tmp_path)
    assert other_text["audio"] != base["audio"] and no_channel["audio"] != base["audio"]
    assert other_split["audio"] == base["audio"]  # metadata that does not shape audio shares the cache


def test_pool_voices():
    assert render.pool_voices("s", {"voices": ["en-us", "en-us+f3"]}) == {"en-us": "native", "en-us+f3": "native"}
    assert render.pool_voices("a", {"domains": {"germanic": ["mb-de2-en"], "romance": ["mb-fr1-en", "mb-ro1-en"]}}) \
        == {"mb-de2-en": "germanic", "mb-fr1-en": "romance", "mb-ro1-en": "romance"}
    with pytest.raises(ValueError, match=r"render\.pools\.empty"):
        render.pool_voices("empty", {"voices": []})


def test_select_filters_and_samples_deterministically():
    rows = []
    for sc in ("alarm", "weather", "music", "iot"):
        for split in ("train", "dev"):
            rows += prepared_rows([f"{sc} {split} {i}" for i in range(10)], sc, split, prefix=f"{sc}-{split}-")
    heldout = ["music", "weather"]
    assert len(render.select(rows, {}, heldout, 1, "x")) == 80
    ex = render.select(rows, {"exclude_heldout": True}, heldout, 1, "x")
    assert {r["scenario"] for r in ex} == {"alarm", "iot"} and len(ex) == 40
    held = render.select(rows, {"only_heldout": True, "splits": ["train"]}, heldout, 1, "x")
    assert {(r["scenario"], r["split"]) for r in held} == {("music", "train"), ("weather", "train")}
    with pytest.raises(ValueError, match="exclude each other"):
        render.select(rows, {"only_heldout": True, "exclude_heldout": True}, heldout, 1, "x")
    only = render.select(rows, {"scenarios": ["music"], "splits": ["dev"]}, heldout, 1, "x")
    assert {(r["scenario"], r["split"]) for r in only} == {("music", "dev")} and len(only) == 10
    s1 = render.select(rows, {"max_utterances": 15}, heldout, 1, "x")
    assert len(s1) == 15 and s1 == sorted(s1, key=lambda r: r["id"])
    assert [r["id"] for r in s1] == [r["id"] for r in render.select(rows, {"max_utterances": 15}, heldout, 1, "x")]
    assert [r["id"] for r in s1] != [r["id"] for r in render.select(rows, {"max_utterances": 15}, heldout, 2, "x")]
    assert [r["id"] for r in s1] != [r["id"] for r in render.select(rows, {"max_utterances": 15}, heldout, 1, "y")]


@pytest.mark.parametrize("size", [0, 100])
def test_damaged_cache_entry_is_rendered_again_and_counted(make_params, size):
    params = make_params(render__workers=1)
    params["render"]["sets"] = {"slurp": {"source": "slurp", "pools": ["synthetic"]}}
    write_prepared(params, prepared_rows(TEXTS[:2]))
    render.run(params)
    rows = manifest(params)
    victim = Path(sorted(rows.values(), key=lambda r: r["id"])[0]["audio"])
    good = victim.read_bytes()
    victim.write_bytes(good[:size])  # 100 bytes: the FLAC header survives, so sf.info alone passes it
    again = render.run(params)
    assert again["cache_damaged"] == 1 and again["cache_hits"] == 1 and again["rejects"] == 0
    assert victim.read_bytes() == good and manifest(params) == rows


def test_accent_voice_without_en_is_an_error():
    pool = {"engine": "mbrola", "domains": {"germanic": ["mb-de2-en", "mb-de5"]}, "rate": [145, 195], "pitch": [35, 65]}
    with pytest.raises(ValueError, match=r"render.pools.accents.domains.germanic: MBROLA voice 'mb-de5' .*mb-de5-en"):
        render.check_pool("accents", pool)
    pool["domains"]["germanic"] = ["mb-de2-en"]
    render.check_pool("accents", pool)
