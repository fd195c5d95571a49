"""params.yaml handling: one YAML loader (numbers as DVC reads them) and the key check of a section."""

from __future__ import annotations

import pytest

from asrlab.params import check_keys, load_params


def test_numbers_parse_as_dvc_parses_them(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("a: {lr: 2e-3, big: 1E+5, neg: -3e-4, f: 1.5, i: 7, s: '2e-3', v: 1.0.0, inf: .inf}\n")
    a = load_params(f)["a"]
    assert a["lr"] == 2e-3 and isinstance(a["lr"], float)
    assert a["big"] == 1e5 and a["neg"] == -3e-4 and a["f"] == 1.5
    assert a["i"] == 7 and isinstance(a["i"], int)
    assert a["s"] == "2e-3" and a["v"] == "1.0.0" and a["inf"] == float("inf")


def test_bad_yaml_names_line_and_column(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("features:\n  out_dir: data/features\n  hop: [160\n")
    with pytest.raises(ValueError, match=r"params.yaml:\d+:\d+: invalid YAML"):
        load_params(f)


def test_check_keys():
    keys = {"out_dir": str, "lr": float, "steps": int}
    check_keys({"out_dir": "x", "lr": 1, "steps": 3}, "s", keys)
    with pytest.raises(KeyError, match="unknown key `stpes` in section `s`; did you mean `steps`"):
        check_keys({"out_dir": "x", "lr": 1e-3, "stpes": 3}, "s", keys)
    with pytest.raises(KeyError, match="section `s` is missing the required key `steps`"):
        check_keys({"out_dir": "x", "lr": 1e-3}, "s", keys)
    with pytest.raises(ValueError, match=r"`s.lr` is '2e-3' \(str\); expected float"):
        check_keys({"out_dir": "x", "lr": "2e-3", "steps": 3}, "s", keys)


@pytest.mark.parametrize("stage, key", [("pretrain_aed", "init_from"), ("pretrain_llm_asr", "encoder_from"),
                                        ("pretrain_llm_asr", "lm_from")])
def test_missing_pretrained_folder_names_the_param(repo_params, tmp_path, stage, key):
    from asrlab.stages import pretrain

    out = tmp_path / "models" / "old"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"previous")
    params = repo_params
    params[stage].update({"encoder_from": None, "lm_from": None} if stage == "pretrain_llm_asr" else {})
    params[stage].update({key: str(tmp_path / "nowhere"), "out_dir": str(out)})
    with pytest.raises(FileNotFoundError, match=rf"`{stage}.{key}` in params.yaml is .*nowhere.*not a folder"):
        getattr(pretrain, stage)(params)
    assert (out / "model.safetensors").read_bytes() == b"previous"


def test_threads_env_override_then_param_then_free_cores(monkeypatch):
    import os

    from asrlab import params
    from asrlab.params import threads

    monkeypatch.setenv("ASRLAB_THREADS", "1")
    assert threads(4) == 1
    monkeypatch.delenv("ASRLAB_THREADS")
    assert threads(3) == 3
    monkeypatch.setattr(params, "busy_cores", lambda: 1.2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert threads() == 1
    monkeypatch.setattr(params, "busy_cores", lambda: 0.3)
    assert threads() == 2


def test_busy_cores_is_the_non_idle_share_now_not_the_load_average(monkeypatch):
    import os

    from asrlab import params

    samples = iter([(1000, 800), (1200, 900)])  # 200 jiffies, of which 100 idle: half of every core busy
    monkeypatch.setattr(params, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))  # a stage that just ended: not counted
    assert params.busy_cores(0.0) == 1.0


def test_prepare_misspelt_nested_key_names_section_and_nearest(make_params):
    from pathlib import Path

    from asrlab.stages import prepare

    params = make_params()
    params["prepare"]["speechocean"]["max_per_splt"] = params["prepare"]["speechocean"].pop("max_per_split")
    with pytest.raises(KeyError, match="unknown key `max_per_splt` in section `prepare.speechocean`; did you mean "
                                       "`max_per_split`"):
        prepare.run(params)
    assert not Path(params["prepare"]["out_dir"]).exists()  # nothing written


def test_threads_param_is_set_once_by_the_cli_helper(monkeypatch):
    import torch

    from asrlab.params import set_threads

    monkeypatch.delenv("ASRLAB_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert set_threads({"threads": 1}) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("ASRLAB_THREADS", "2")  # tests and CI override params.yaml
        assert set_threads({"threads": 1}) == 2
        with pytest.raises(ValueError, match=r"`threads` is 'two' \(str\); expected int"):
            set_threads({"threads": "two"})
    finally:
        torch.set_num_threads(before)
