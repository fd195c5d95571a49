"""One interface to the speech models whose layers the soft_tokens study clusters.

``soft_tokens.upstream.kind`` picks the model; ``.from`` names its folder:

* ``whisper``: a Whisper checkpoint's encoder (``models/whisper``, the imported tiny.en, or any
  ``WhisperForConditionalGeneration`` folder), on the stored log-mel features, padded per batch
  (:func:`asrlab.models.encoder.encode`), 50 Hz frames;
* ``hubert``: the small HuBERT that ``soft_tokens_ssl`` pretrains in the pipeline, on stacked log-mel frames;
* ``ssl``: a local Hugging Face HuBERT/WavLM folder (the paper: WavLM/HuBERT-large), on the 16 kHz waveform.

Every kind answers the same two questions: how many layers it has, and the frames of some of its layers
(index 0 = the input of the first transformer layer, i = the output of layer i) for a list of manifest rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from asrlab.audio.features import FeatureStore
from asrlab.models.batch import pad_features
from asrlab.training.batching import bucket_batches

KINDS = ("whisper", "hubert", "ssl")


class Upstream:
    kind: str
    n_layers: int

    def encode(self, rows: list[dict], layers: list[int]) -> dict[int, list[torch.Tensor]]:
        """{layer: [(T_i, D) float32 per row, in row order]}."""
        raise NotImplementedError

    def check_layers(self, layers: list[int], param: str) -> None:
        """Raise, naming ``param``, if a requested layer is not one of this upstream's 0..n_layers."""
        bad = [k for k in layers if not 0 <= k <= self.n_layers]
        if bad:
            raise ValueError(f"soft_tokens.{param} = {bad}: the {self.kind} upstream has layers 0..{self.n_layers}")


class WhisperUpstream(Upstream):
    kind = "whisper"

    def __init__(self, path: str | Path, features: FeatureStore, batch_frames: int = 20000):
        from asrlab.models.encoder import SpeechEncoder
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"soft_tokens.upstream.from = {path}: no Whisper folder there (config.json "
                                    "missing); `dvc repro import_whisper` writes models/whisper")
        self.encoder = SpeechEncoder.from_pretrained(str(path)).eval()
        self.n_layers, self.fs, self.batch_frames = self.encoder.n_layers, features, batch_frames

    @torch.no_grad()
    def encode(self, rows, layers):
        too_long = [r["id"] for r in rows if r["frames"] > self.encoder.max_frames]
        if too_long:
            raise ValueError(f"{len(too_long)} utterances exceed the Whisper encoder's {self.encoder.max_frames} "
                             f"frames (e.g. {too_long[0]}): lower the set's max duration")
        out = {k: [None] * len(rows) for k in layers}
        batches = bucket_batches([r["frames"] for r in rows], self.batch_frames, seed=0, epoch=0)
        with tqdm(total=len(rows), desc="whisper layers", unit="utt", mininterval=2) as bar:
            for b in batches:
                feats, lens = pad_features([self.fs.load(rows[i]["id"]) for i in b])
                enc = self.encoder(feats, lens, hidden_states=True, upto=max(layers))
                for k in layers:
                    for j, i in enumerate(b):
                        out[k][i] = enc.hidden_states[k][j, : int(enc.lengths[j])].clone()
                bar.update(len(b))
        return out


class HubertUpstream(Upstream):
    kind = "hubert"

    def __init__(self, path: str | Path, features: FeatureStore, batch: int = 32):
        from asrlab.ssl.hubert import HubertUpstream as Model, UpstreamConfig
        path = Path(path)
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"soft_tokens.upstream.from = {path}: no pipeline HuBERT there "
                                    "(`asrlab soft_tokens_ssl` with upstream.kind hubert writes it)")
        self.model = Model(UpstreamConfig(**json.loads((path / "config.json").read_text())))
        self.model.load_state_dict(load_file(str(path / "model.safetensors")))
        self.model.eval()
        self.n_layers, self.fs, self.batch = self.model.cfg.layers, features, batch

    @torch.no_grad()
    def encode(self, rows, layers):
        from asrlab.ssl.hubert import stack_frames
        out = {k: [] for k in layers}
        for i in range(0, len(rows), self.batch):
            chunk = [stack_frames(self.fs.load(r["id"]), self.model.cfg.stack) for r in rows[i: i + self.batch]]
            lengths = torch.tensor([c.shape[0] for c in chunk])
            x = torch.zeros(len(chunk), int(lengths.max()), chunk[0].shape[1])
            for j, c in enumerate(chunk):
                x[j, : c.shape[0]] = c
            states = self.model.hidden_states(x, lengths, upto=max(layers))
            for k in layers:
                out[k] += [states[k][j, : lengths[j]] for j in range(len(chunk))]
        return out


class SSLUpstream(Upstream):
    kind = "ssl"

    def __init__(self, path: str | Path):
        from transformers import AutoModel
        self.model = AutoModel.from_pretrained(str(path)).eval()
        self.n_layers = int(self.model.config.num_hidden_layers)

    @torch.no_grad()
    def encode(self, rows, layers):
        from asrlab.audio.io import load_audio
        out = {k: [] for k in layers}
        for r in tqdm(rows, desc="ssl layers", unit="utt", mininterval=2):
            x = torch.as_tensor(load_audio(r["audio"]), dtype=torch.float32)
            x = (x - x.mean()) / (x.std() + 1e-5)  # the checkpoints' feature extractor normalises each utterance
            states = self.model(x[None], output_hidden_states=True).hidden_states
            for k in layers:
                out[k].append(states[k][0])
        return out


def check_kind(spec: dict) -> str:
    """``soft_tokens.upstream.kind``, checked against :data:`KINDS`."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"soft_tokens.upstream.kind must be one of {KINDS}, got {kind!r}")
    return kind


def load(spec: dict, features: FeatureStore) -> Upstream:
    """The upstream ``soft_tokens.upstream`` describes ({kind, from, batch_frames})."""
    kind = check_kind(spec)
    if kind == "whisper":
        return WhisperUpstream(spec["from"], features, spec.get("batch_frames", 20000))
    if kind == "hubert":
        return HubertUpstream(spec["from"], features)
    return SSLUpstream(spec["from"])
