"""Every bad input fails clearly (naming the param or file) or lands in a rejects list, never silently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from datahelpers import SR, prepared_rows, slurp_record, tone, write_audio, write_prepared, write_records

from asrlab import cli
from asrlab.audio import tts
from asrlab.audio.io import BadAudio, load_audio
from asrlab.audio.tts import EngineUnavailable
from asrlab.io import read_jsonl, write_jsonl
from asrlab.stages import features, prepare, render

# ------------------------------------------------------------------------------------------ missing data paths


@pytest.mark.parametrize("param, key", [
    ("prepare.slurp.text_dir", ("slurp", "text_dir")),
    ("prepare.slurp.lm_text", ("slurp", "lm_text")),
    ("prepare.speechocean.dir", ("speechocean", "dir")),
    ("prepare.slurp.official_root", ("slurp", "official_root")),
])
def test_missing_data_path_names_the_param(make_params, small_slurp, tmp_path, param, key):
    params = make_params()
    params["prepare"]["slurp"].update(text_dir=str(small_slurp), lm_text=str(small_slurp / "lm.txt"))
    params["prepare"][key[0]][key[1]] = str(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match=param.replace(".", r"\.")) as e:
        prepare.run(params)
    assert "does-not-exist" in str(e.value)


def test_cli_reports_missing_data_path_and_exits_2(make_params, tmp_path, capsys):
    params = make_params()
    params["prepare"]["slurp"]["text_dir"] = str(tmp_path / "no-slurp-here")
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    assert cli.main(["--params", str(pfile), "prepare"]) == 2
    err = capsys.readouterr().err
    assert "asrlab prepare: error:" in err and "prepare.slurp.text_dir" in err and "no-slurp-here" in err
    assert not Path(params["prepare"]["out_dir"]).exists()


def test_missing_manifests_for_features(make_params):
    params = make_params()
    with pytest.raises(FileNotFoundError, match=r"render\.out_dir"):
        features.run(params)
    assert not Path(params["features"]["out_dir"]).exists()


def test_failed_prepare_keeps_previous_outputs(make_params, small_slurp, tmp_path):
    params = make_params()
    params["prepare"]["slurp"].update(text_dir=str(small_slurp), lm_text=str(small_slurp / "lm.txt"))
    prepare.run(params)
    out = Path(params["prepare"]["out_dir"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    params["prepare"]["speechocean"]["dir"] = str(tmp_path / "gone")  # fails after the tagger is trained
    with pytest.raises(FileNotFoundError):
        prepare.run(params)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ------------------------------------------------------------------------------------------ unknown scenario


def test_unknown_scenario_in_jsonl_stops_prepare(make_params, tmp_path):
    d = tmp_path / "slurp"
    write_records(d / "devel.jsonl", [slurp_record(1, "wake me up", "alarm"), slurp_record(2, "hi there", "chitchat")])
    write_records(d / "test.jsonl", [slurp_record(3, "turn it off", "iot")])
    params = make_params()
    params["prepare"]["slurp"]["text_dir"] = str(d)
    with pytest.raises(ValueError, match=r"devel\.jsonl:2: unknown scenario\(s\) \['chitchat'\]"):
        prepare.run(params)


def _render_params(make_params, **sets):
    params = make_params()
    write_prepared(params, prepared_rows(["wake me up", "turn it off"]))
    if sets:
        params["render"]["sets"] = sets
    return params


def _nothing_rendered(params) -> bool:
    return not Path(params["render"]["cache_dir"]).exists() and not Path(params["render"]["out_dir"]).exists()


def test_unknown_heldout_scenario(make_params):
    params = _render_params(make_params)
    params["heldout_scenarios"] = ["music", "wether"]
    with pytest.raises(ValueError, match=r"heldout_scenarios: unknown scenario\(s\) \['wether'\]"):
        render.run(params)
    assert _nothing_rendered(params)


def test_unknown_scenario_in_render_set(make_params):
    params = _render_params(make_params, slurp={"source": "slurp", "scenarios": ["alarm", "smalltalk"],
                                                "pools": ["synthetic"]})
    with pytest.raises(ValueError, match=r"render\.sets\.slurp\.scenarios: unknown scenario\(s\) \['smalltalk'\]"):
        render.run(params)
    assert _nothing_rendered(params)


# ------------------------------------------------------------------------------------------ render params


def test_unknown_engine(make_params):
    params = _render_params(make_params)
    params["render"]["pools"]["synthetic"]["engine"] = "festival"
    with pytest.raises(ValueError, match="unknown TTS engine 'festival'"):
        render.run(params)
    assert _nothing_rendered(params)


@pytest.mark.tts
def test_unknown_voice(make_params):
    params = _render_params(make_params)
    params["render"]["pools"]["synthetic"]["voices"] = ["en-us", "fr-fr"]
    with pytest.raises(ValueError, match="unknown espeak voice 'fr-fr'"):
        render.run(params)
    assert _nothing_rendered(params)


@pytest.mark.tts
def test_uninstalled_mbrola_voice(make_params):
    params = _render_params(make_params)
    params["render"]["pools"]["accents"]["domains"]["germanic"].append("mb-zz9-en")
    with pytest.raises(EngineUnavailable, match="mbrola-zz9"):
        render.run(params)
    assert _nothing_rendered(params)


def test_unknown_pool_and_source(make_params):
    params = _render_params(make_params, slurp={"source": "slurp", "pools": ["synthetic", "studio"]})
    with pytest.raises(ValueError, match=r"render\.sets\.slurp: unknown pool 'studio'"):
        render.run(params)
    params["render"]["sets"] = {"x": {"source": "wikipedia", "pools": ["synthetic"]}}
    with pytest.raises(ValueError, match=r"render\.sets\.x\.source: 'wikipedia'"):
        render.run(params)
    assert _nothing_rendered(params)


@pytest.mark.tts
def test_unknown_channel_param_fails_before_any_work(make_params):
    params = _render_params(make_params, slurp={"source": "slurp", "pools": ["synthetic", "real_proxy"]})
    params["render"]["pools"]["real_proxy"]["channel"]["snr"] = [10, 20]  # typo for snr_db
    with pytest.raises(ValueError, match=r"unknown channel parameter\(s\) \['snr'\]"):
        render.run(params)
    assert _nothing_rendered(params)


@pytest.mark.parametrize("missing", ["espeak-ng", "mbrola"])
def test_missing_tts_engine_says_how_to_install(make_params, monkeypatch, missing):
    real_which = tts.shutil.which
    monkeypatch.setattr(tts.shutil, "which", lambda name: None if name == missing else real_which(name) or "/bin/x")
    monkeypatch.setattr(tts, "MBROLA_DIRS", (Path("/"),))  # voice databases need not exist for this test
    monkeypatch.setattr(tts.MbrolaEngine, "_check_voice", tts.EspeakEngine._check_prefix)
    params = _render_params(make_params, slurp={"source": "slurp", "pools": ["synthetic", "real_proxy"]})
    with pytest.raises(EngineUnavailable, match=rf"{missing} not found on PATH.*setup-system\.sh"):
        render.run(params)
    assert _nothing_rendered(params)
    assert cli.main(["--params", _dump(params), "render"]) == 2  # the CLI turns it into a clean error


def _dump(params) -> str:
    path = Path(params["render"]["stats"]).parent.parent / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


# ------------------------------------------------------------------------------------------ bad audio


def _bad_files(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected words in the BadAudio message)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "empty.wav").write_bytes(b"")
    (d / "corrupt.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)
    (d / "text.wav").write_text("this is not audio\n")
    write_audio(d / "zero.wav", np.zeros((0,), dtype=np.float32))
    write_audio(d / "silent.wav", np.zeros(SR, dtype=np.float32))
    write_audio(d / "short.wav", tone(0.01))
    nan = tone(0.5)
    nan[100] = np.nan
    write_audio(d / "nan.wav", nan, subtype="FLOAT")
    return {
        "empty": (d / "empty.wav", "empty file"),
        "corrupt": (d / "corrupt.flac", "unreadable"),
        "text": (d / "text.wav", "unreadable"),
        "zero": (d / "zero.wav", "zero-length"),
        "silent": (d / "silent.wav", "all zeros"),
        "short": (d / "short.wav", "shorter than"),
        "nan": (d / "nan.wav", "NaN"),
        "missing": (d / "missing.wav", "does not exist"),
    }


def test_bad_audio_raises_naming_the_file(tmp_path):
    for name, (path, words) in _bad_files(tmp_path).items():
        with pytest.raises(BadAudio) as e:
            load_audio(path)
        assert str(path) in str(e.value) and words in str(e.value), name


def test_wrong_sample_rate_and_stereo_are_converted_with_a_warning(tmp_path):
    x = tone(1.0, sr=44_100, freq=440.0, amp=0.8)
    stereo = np.stack([x, np.zeros_like(x)], axis=1)
    path = write_audio(tmp_path / "stereo44k.wav", stereo, sr=44_100)
    with pytest.warns(UserWarning) as caught:
        audio = load_audio(path)
    messages = " | ".join(str(w.message) for w in caught)
    assert "2 channels, downmixed to mono" in messages and "sample rate 44100 Hz, resampled to 16000 Hz" in messages
    assert audio.ndim == 1 and audio.dtype == np.float32 and abs(audio.size - SR) <= 1
    assert abs(np.abs(audio[1000:-1000]).max() - 0.4) < 0.02  # mean of a 0.8 tone and silence
    # the pitch survives resampling: 440 Hz peak in the spectrum
    spec = np.abs(np.fft.rfft(audio))
    assert abs(np.fft.rfftfreq(audio.size, 1 / SR)[spec.argmax()] - 440) < 2

    path8k = write_audio(tmp_path / "mono8k.wav", tone(1.0, sr=8_000), sr=8_000)
    with pytest.warns(UserWarning, match="sample rate 8000 Hz"):
        assert abs(load_audio(path8k).size - SR) <= 1


def test_good_16k_mono_loads_without_warning(tmp_path, recwarn):
    path = write_audio(tmp_path / "ok.flac", tone(0.5))
    audio = load_audio(path)
    assert audio.size == SR // 2 and not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_features_stage_rejects_bad_audio_and_keeps_going(make_params, tmp_path):
    params = make_params()
    bad = _bad_files(tmp_path / "bad")
    good = {"good": write_audio(tmp_path / "good.flac", tone(0.6)),
            "stereo": write_audio(tmp_path / "st.wav", np.stack([tone(0.6, 22_050)] * 2, axis=1), 22_050)}
    rows = [{"id": n, "audio": str(p), "pool": "synthetic", "split": "train", "text": n} for n, p in good.items()]
    rows += [{"id": n, "audio": str(p), "pool": "synthetic", "split": "train", "text": n} for n, (p, _) in bad.items()]
    write_jsonl(Path(params["render"]["out_dir"]) / "slurp.jsonl", rows)
    stats = features.run(params)
    out = Path(params["features"]["out_dir"])
    index = read_jsonl(out / "index.jsonl")
    assert [r["id"] for r in index] == ["good", "stereo"]
    assert [r["duration"] for r in index] == [0.6, 0.6]  # 22.05 kHz stereo became 0.6 s at 16 kHz
    entries = read_jsonl(out / "rejects.jsonl")
    rejects = {r["id"]: r for r in entries if "reason" in r}
    assert set(rejects) == set(bad)
    for name, (path, words) in bad.items():
        assert words in rejects[name]["reason"] and rejects[name]["audio"] == str(path)
    warned = [r for r in entries if "warning" in r]
    assert {r["id"] for r in warned} == {"stereo"} and len(warned) == 2
    assert stats["utterances"] == 2 and stats["rejects"] == len(bad) and stats["warnings"] == 2


# ------------------------------------------------------------------------------------------ transcripts


def test_prepare_rejects_bad_transcripts_and_keeps_the_rest(make_params, tmp_path):
    d = tmp_path / "slurp"
    good = [slurp_record(i, f"set an alarm for {i} am", "alarm") for i in range(1, 11)]
    good += [slurp_record(100 + i, f"turn off light number {i}", "iot") for i in range(10)]
    bad = [slurp_record(900, "", "alarm"), slurp_record(901, "明天的天气", "weather")]
    write_records(d / "devel.jsonl", good + bad)
    write_records(d / "test.jsonl", [slurp_record(902, "  ...  ", "iot")])
    (d / "lm.txt").write_text("wake me up early\nnaïve question\nкофе\n")
    params = make_params()
    params["prepare"]["slurp"].update(text_dir=str(d), lm_text=str(d / "lm.txt"))
    params["prepare"]["speechocean"]["dir"] = None
    stats = prepare.run(params)
    out = Path(params["prepare"]["out_dir"])
    assert len(read_jsonl(out / "slurp.jsonl")) == 20
    assert {r["text"] for r in read_jsonl(out / "lm.jsonl")} == {"wake me up early", "naive question"}
    rejects = {r["id"]: r["reason"] for r in read_jsonl(out / "rejects.jsonl")}
    assert set(rejects) == {"slurp-900", "slurp-901", "slurp-902", "lm-3"}
    assert "non-ASCII" in rejects["slurp-901"] and "non-ASCII" in rejects["lm-3"]
    assert stats["rejects"]["total"] == 4 and stats["recordings"] == {}
    assert json.loads(Path(params["prepare"]["stats"]).read_text())["rejects"]["total"] == 4


# ------------------------------------------------------------------------------------------ issue 18: validate, then touch
# Each case: the stage fails with a message saying what to fix, and the previous output is the same bytes.


def _old_output(path: str | Path) -> tuple[Path, bytes]:
    """A previous output (a file inside the stage's output folder) to check afterwards."""
    f = Path(path) / "previous.bin"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"previous output")
    return f, f.read_bytes()


def _set(d: dict, dotted: str, value) -> None:
    *keys, last = dotted.split(".")
    for k in keys:
        d = d[int(k)] if isinstance(d, list) else d[k]
    d[last] = value


def _rename(d: dict, dotted: str, new: str) -> None:
    *keys, last = dotted.split(".")
    for k in keys:
        d = d[int(k)] if isinstance(d, list) else d[k]
    d[new] = d.pop(last)


BAD_PARAMS = [  # (stage, function, edit, error, message): misspelt keys fell back to their defaults before
    ("features", "features.run", lambda p: _rename(p, "features.shard_size", "shard_sise"), KeyError,
     r"unknown key `shard_sise` in section `features`; did you mean `shard_size`"),
    ("render", "render.run", lambda p: _rename(p, "render.sets.general.max_utterances", "max_utterance"), KeyError,
     r"unknown key `max_utterance` in section `render.sets.general`; did you mean `max_utterances`"),
    ("prepare", "prepare.run", lambda p: _rename(p, "prepare.speechocean.max_per_split", "max_per_splt"), KeyError,
     r"unknown key `max_per_splt` in section `prepare.speechocean`; did you mean `max_per_split`"),
    ("pretrain_llm_asr", "pretrain.pretrain_llm_asr", lambda p: _rename(p, "pretrain_llm_asr.encoder_from", "encoder_form"),
     KeyError, r"unknown key `encoder_form` in section `pretrain_llm_asr`; did you mean `encoder_from`"),
    ("pretrain_lm", "pretrain.pretrain_lm", lambda p: _rename(p, "heldout_scenarios", "heldout_scenario"), KeyError,
     r"top-level key `heldout_scenarios` is missing \(`heldout_scenario` is not a param: misspelt\?\)"),
    ("render", "render.run", lambda p: _rename(p, "heldout_scenarios", "heldout_scenarois"), KeyError,
     r"top-level key `heldout_scenarios` is missing"),
    ("pretrain_aed", "pretrain.pretrain_aed", lambda p: p["pretrain_aed"].pop("model"), KeyError,
     r"section `pretrain_aed` is missing the required key `model`"),
    ("pretrain_aed", "pretrain.pretrain_aed", lambda p: _set(p, "pretrain_aed.train.lr", "2e-3"), ValueError,  # PyYAML 1.1's
     r"`pretrain_aed.train.lr` is '2e-3' \(str\); expected float"),
    ("pretrain_aed", "pretrain.pretrain_aed", lambda p: _set(p, "pretrain_aed.model.encoder.layers", 2.5), ValueError,
     r"`pretrain_aed.model.encoder.layers` is 2.5 \(float\); expected int"),
    ("pretrain_aed", "pretrain.pretrain_aed", lambda p: _set(p, "pretrain_aed.init_from", "models/nowhere"), FileNotFoundError,
     r"`pretrain_aed.init_from` in params.yaml is 'models/nowhere', which is not a folder"),
    ("efin", "efin.train_all", lambda p: _set(p, "efin.lm_from", "models/no_lm"), FileNotFoundError,
     r"`efin.lm_from` in params.yaml is 'models/no_lm', which is not a folder"),
    ("hdmole", "hdmole.run_systems", lambda p: _rename(p, "hdmole.systems.1.lr", "lr_"), KeyError,
     r"unknown key `lr_` in section `hdmole.systems\[1\]`; did you mean `lr`"),
    ("syn2real", "syn2real.finetune", lambda p: _rename(p, "syn2real.finetune.target_lr_scale", "target_lr_scal"), KeyError,
     r"unknown key `target_lr_scal` in section `syn2real.finetune`; did you mean `target_lr_scale`"),
    ("soft_tokens", "soft_tokens.kmeans", lambda p: _rename(p, "soft_tokens.kmeans.max_iter", "max_iters"), KeyError,
     r"unknown key `max_iters` in section `soft_tokens.kmeans`; did you mean `max_iter`"),
    ("eval_base", "eval_base.run", lambda p: _set(p, "eval_base.models.aed.path", "models/gone"), FileNotFoundError,
     r"`eval_base.models.aed.path` in params.yaml is 'models/gone', which is not a folder"),
    ("tokenizer", "tokenizer.run", lambda p: _set(p, "tokenizer.vocab_size", "500"), ValueError,
     r"`tokenizer.vocab_size` is '500' \(str\); expected int"),
    ("import_whisper", "import_whisper.run", lambda p: _rename(p, "import_whisper.check.max_wer", "max_werr"), KeyError,
     r"unknown key `max_werr` in section `import_whisper.check`; did you mean `max_wer`"),
]


@pytest.mark.parametrize("section, stage, edit, error, message", BAD_PARAMS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_PARAMS)])
def test_bad_param_fails_before_any_output_is_touched(repo_params, monkeypatch, tmp_path, section, stage, edit,
                                                      error, message):
    import importlib

    monkeypatch.chdir(tmp_path)
    for folder in ("models/whisper", "models/base_aed", "models/base_lm", "models/scratch_aed",
                   "models/base_llm_asr"):  # the pretrained models the sections name exist
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    params = repo_params
    section_params = params[section]
    out_key = next(k for k in ("out_dir", "results_dir") if k in section_params)
    old, before = _old_output(section_params[out_key])
    edit(params)
    module, function = stage.split(".")
    with pytest.raises(error, match=message):
        getattr(importlib.import_module(f"asrlab.stages.{module}"), function)(params)
    assert old.read_bytes() == before


def test_committed_params_and_profiles_pass_the_check(repo_params):
    from asrlab.params import deep_merge, load_yaml

    from asrlab.cli import check_all

    root = Path(__file__).resolve().parents[1]
    base = load_yaml(root / "params.yaml")
    for profile in ("smoke", "paper"):
        assert len(check_all(deep_merge(base, load_yaml(root / f"experiments/profiles/{profile}.yaml")))) >= 16
    base["heldout_scenaros"] = base.pop("heldout_scenarios")
    with pytest.raises(KeyError, match="unknown top-level key `heldout_scenaros`; did you mean `heldout_scenarios`"):
        check_all(base)


def test_cli_check_and_stage_errors_are_one_clean_line(repo_params, tmp_path, capsys):
    pfile = tmp_path / "params.yaml"
    repo_params["features"]["shard_sise"] = repo_params["features"].pop("shard_size")
    pfile.write_text(yaml.safe_dump(repo_params))
    assert cli.main(["--params", str(pfile), "check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asrlab check: error: params.yaml: unknown key `shard_sise` in section `features`; did "
                          "you mean `shard_size`?") and "Traceback" not in err and "\"" not in err and "'" not in err


def test_invalid_yaml_is_file_line_column_not_a_traceback(make_params, tmp_path, capsys):
    params = make_params()
    old, before = _old_output(params["features"]["out_dir"])
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params) + "features: [oops\n")
    for command in (["features"], ["check"], ["profile", "smoke", "--profiles-dir", str(tmp_path)]):
        (tmp_path / "smoke.yaml").write_text("features: {hop: 160}\n")
        assert cli.main(["--params", str(pfile), *command]) == 2
        err = capsys.readouterr().err
        assert f"error: {pfile}:" in err and ": invalid YAML:" in err and "Traceback" not in err, command
    assert old.read_bytes() == before


def test_a_key_no_schema_covers_is_said_as_a_missing_param(make_params, tmp_path, capsys):
    params = make_params()
    del params["render"]  # features reads render.out_dir
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    assert cli.main(["--params", str(pfile), "features"]) == 2
    assert "asrlab features: error: params.yaml: missing param `render` (the stage reads it)" in capsys.readouterr().err


def test_truncated_model_folder_names_the_folder_to_delete(tmp_path):
    from asrlab.models import store
    from asrlab.models.aed import AEDConfig, AEDModel
    from asrlab.models.encoder import EncoderConfig

    model = AEDModel.from_config(AEDConfig(vocab_size=12, encoder=EncoderConfig(
        d_model=8, layers=1, heads=2, ffn_dim=16, max_source_positions=20), decoder_layers=1, decoder_heads=2,
        max_target_positions=8))
    store.save(model, "aed", tmp_path / "aed")
    weights = tmp_path / "aed" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(RuntimeError, match=rf"{tmp_path / 'aed'}: damaged model folder \(SafetensorError.*"
                                           rf"rm -r {tmp_path / 'aed'}"):
        store.load(tmp_path / "aed")


def test_checkpoints_and_feature_shards_are_group_readable(tmp_path):
    import os

    import torch

    from asrlab.io import atomic_dir
    from asrlab.training.checkpoint import save_checkpoint
    from safetensors.torch import save_file

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ckpt", 1, model, opt, sched, {})
        with atomic_dir(tmp_path / "features") as d:
            save_file({"x": torch.zeros(2)}, str(d / "shard-00000.safetensors"))
    finally:
        os.umask(old)
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"model.safetensors", "optimizer.safetensors", "shard-00000.safetensors"}
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {"0o644"}
