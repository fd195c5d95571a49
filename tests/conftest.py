"""Shared fixtures for the data-foundation unit tests.

The real read-only data lives in ``../shared/data`` beside the repository (see its README); fixtures derive
absolute paths from this file, so the tests work from any clone placed beside ``shared/``. Everything a
stage writes goes into ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()


from ci_policy import IN_CI, skip_or_fail


def pytest_collection_modifyitems(config, items):
    """Skip ``tts`` tests where espeak-ng / mbrola are not installed (a developer's laptop); fail in CI."""
    missing = [b for b in ("espeak-ng", "mbrola") if shutil.which(b) is None]
    if not missing:
        return
    if IN_CI:
        raise pytest.UsageError(f"{', '.join(missing)} not installed in CI: the set-up must install them")
    skip = pytest.mark.skip(reason=f"{', '.join(missing)} not installed (bash scripts/setup-system.sh)")
    for item in items:
        if "tts" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        skip_or_fail(f"shared data not found at {SHARED_DATA} (the repository must sit beside shared/)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def slurp_dir(shared_data) -> Path:
    return shared_data / "slurp"


@pytest.fixture(scope="session")
def so762_dir(shared_data) -> Path:
    return shared_data / "speechocean762"


@pytest.fixture(scope="session")
def slurp_split(slurp_dir) -> list[dict]:
    """The text-only copy loaded and split with the params.yaml fractions and seed."""
    from asrlab.data.slurp import load_text_only

    rejects: list[dict] = []
    rows = load_text_only(slurp_dir, {"train": 0.6, "dev": 0.15, "test": 0.25}, 1234, rejects)
    assert rejects == []
    return rows


@pytest.fixture(scope="session")
def small_slurp(tmp_path_factory, slurp_dir) -> Path:
    """A small text-only SLURP copy (12 sentences per scenario from each file) and a 161-line lm.txt.

    lm.txt is 150 real lines, then 10 labelled sentences (those landing in dev/test must be dropped by
    `prepare`: no leakage), then one non-ASCII line (a reject, ``lm-161``).
    """
    d = tmp_path_factory.mktemp("slurp_small")
    labelled = []
    for name in ("devel.jsonl", "test.jsonl"):
        per: dict[str, int] = defaultdict(int)
        with open(slurp_dir / name) as f, open(d / name, "w") as out:
            for line in f:
                rec = json.loads(line)
                if per[rec["scenario"]] < 12:
                    per[rec["scenario"]] += 1
                    out.write(line)
                    labelled.append(rec["sentence"])
    with open(slurp_dir / "lm.txt") as f:
        lm = [next(f) for _ in range(150)]
    lm += [s + "\n" for s in labelled[:10]]
    lm.append("東京の天気\n")
    (d / "lm.txt").write_text("".join(lm))
    return d


@pytest.fixture
def repo_params(tmp_path) -> dict:
    """params.yaml with the smoke profile merged in, as the e2e test runs it; outputs under tmp_path."""
    from asrlab.params import deep_merge, load_yaml

    params = deep_merge(load_yaml(ROOT / "params.yaml"), load_yaml(ROOT / "experiments/profiles/smoke.yaml"))
    for name, section in params.items():
        for key in ("out_dir", "metrics", "stats", "results_dir"):
            if isinstance(section, dict) and key in section:
                section[key] = str(tmp_path / name / key)
    return params


@pytest.fixture
def make_params(tmp_path, slurp_dir, so762_dir):
    """Params dict like params.yaml, with every output under tmp_path and real data as absolute paths."""

    def make(**overrides) -> dict:
        params = {
            "heldout_scenarios": ["music", "social", "general", "datetime", "weather"],
            "prepare": {
                "seed": 1234,
                "out_dir": str(tmp_path / "data" / "prepared"),
                "stats": str(tmp_path / "results" / "stats.json"),
                "slurp": {"text_dir": str(slurp_dir), "lm_text": str(slurp_dir / "lm.txt"), "official_root": None,
                          "split": {"train": 0.6, "dev": 0.15, "test": 0.25}},
                "tagger": {"C": 10.0, "path": str(tmp_path / "data" / "tagger" / "tagger.joblib")},
                "lm_dev_sentences": 20,
                "speechocean": {"dir": str(so762_dir), "max_per_split": 3},
            },
            "render": {
                "seed": 1234,
                "workers": 1,
                "out_dir": str(tmp_path / "data" / "manifests"),
                "cache_dir": str(tmp_path / "data" / "audio"),
                "stats": str(tmp_path / "results" / "render.json"),
                "pools": {
                    "synthetic": {"engine": "espeak", "voices": ["en-us", "en-us+m3", "en-us+f3"],
                                  "rate": [145, 195], "pitch": [30, 70], "channel": None},
                    "real_proxy": {"engine": "mbrola", "voices": ["mb-us1", "mb-us2"], "rate": [145, 195],
                                   "pitch": [35, 65],
                                   "channel": {"rt60": [0.15, 0.3], "snr_db": [15, 30], "gain_db": [-6, 3],
                                               "noise": "pink", "max_order": 6}},
                    "accents": {"engine": "mbrola", "domains": {"germanic": ["mb-de2-en"], "romance": ["mb-fr1-en"]},
                                "rate": [145, 195], "pitch": [35, 65], "channel": None},
                },
                "sets": {"slurp": {"source": "slurp", "pools": ["synthetic"]}},
            },
            "features": {
                "out_dir": str(tmp_path / "data" / "features"),
                "stats": str(tmp_path / "results" / "features.json"),
                "n_mels": 80, "n_fft": 400, "hop": 160, "shard_size": 2, "workers": 1,
            },
        }
        for dotted, value in overrides.items():  # e.g. render__workers=2
            *keys, last = dotted.split("__")
            d = params
            for k in keys:
                d = d[k]
            d[last] = value
        return params

    return make


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri():
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI; keep one test's store from leaking."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved
