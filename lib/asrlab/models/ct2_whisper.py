"""CTranslate2 Whisper folders (faster-whisper's format) -> Hugging Face Whisper folders.

**The file** ``model.bin`` (written by ``ModelSpec._serialize`` in ctranslate2's
``python/ctranslate2/specs/model_spec.py``, read by ``Model::load`` in ``src/models/model.cc``), little-endian::

    uint32 binary_version                       # 1..6; ctranslate2 writes 6 since late 2022 (before Whisper)
    string spec_name, uint32 spec_revision      # from version 2; "WhisperSpec", revision 1..3
    uint32 n_variables, then per variable:
        string name; uint8 rank; rank x uint32 dims
        version >= 4: uint8 dtype id; uint32 byte count
        version <  4: uint8 item size (4 float32, 2 int16, 1 int8); uint32 element count
        raw bytes (C order)
    uint32 n_aliases, then (string alias, string target) pairs   # from version 3
    string = uint16 length (bytes incl. the trailing NUL) + bytes

Versions 5 and 6 changed only how int8 is rounded when quantizing and added ``config.json`` beside the file.
dtype ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16. Rank-0 variables are the spec's
settings (``decoder/num_heads``, ``encoder/num_heads``, ``decoder/activation`` ...), kept in
:attr:`Ct2Model.scalars`. A quantized weight ``w`` comes with ``w_scale``: int8 has one scale per output row
(``w_int8 = rint(w * 127 / max|row|)``, a conv's row is one output channel), int16 one scalar for the whole
(fused) tensor; the float weight is ``w_int / scale``. Duplicated
weights are stored once and aliased (tiny.en: ``decoder/projection/weight`` -> ``decoder/embeddings/weight``);
an alias also covers the target's ``_scale``.

**The name map** (ctranslate2's ``WhisperLoader`` in ``converters/transformers.py``, inverted), CT2 -> HF::

    encoder/conv1|conv2/{weight,bias}          model.encoder.conv1|conv2
    encoder|decoder/position_encodings/encodings   model.{encoder,decoder}.embed_positions.weight
    encoder|decoder/layer_norm/{gamma,beta}    model.{encoder,decoder}.layer_norm.{weight,bias}
    decoder/embeddings/weight                  model.decoder.embed_tokens.weight (proj_out tied to it)
    decoder/projection/weight                  proj_out.weight, only if it differs from the embeddings
    per layer, X/layer_N -> model.X.layers.N:
      self_attention/linear_0 = [q; k; v]      self_attn.{q,k,v}_proj
      self_attention/linear_1                  self_attn.out_proj
      self_attention/layer_norm                self_attn_layer_norm
      attention/linear_0 (decoder)             encoder_attn.q_proj
      attention/linear_1 = [k; v]              encoder_attn.{k,v}_proj
      attention/linear_2                       encoder_attn.out_proj
      attention/layer_norm                     encoder_attn_layer_norm
      ffn/linear_0, ffn/linear_1, ffn/layer_norm    fc1, fc2, final_layer_norm

HF's ``k_proj`` has no bias; CT2 fills its part of the fused bias with zeros. (A nonzero key bias would not
matter anyway: it adds the same number to every score of a query, which softmax cancels.) CT2 does not fold
the 1/sqrt(head_dim) query scaling into the weights for Whisper (``queries_scale`` stays unset): both apply
it at run time, so weights map unchanged.

**.en or multilingual**: both vocabularies hold the language tokens <|en|> ... <|su|>, so their presence
says nothing; as in OpenAI's ``Whisper.is_multilingual``, a model is multilingual when its vocabulary has
>= 51865 entries (one more text token, so <|endoftext|> is 50257, not 50256). large-v3 has 51866 and 128 mels.

**The HF folder**: ``model.safetensors`` (float32), ``config.json`` (a ``WhisperConfig`` read off the shapes and
the ``num_heads`` scalars), ``generation_config.json`` (special ids from the tokenizer; suppress lists and
alignment heads from CT2's ``config.json``; ``lang_to_id``/``task_to_id`` if multilingual), and a
``WhisperProcessor``: the tokenizer from ``tokenizer.json`` with Whisper's <|...|> tokens special and the
timestamp tokens <|0.00|> ... <|30.00|> it lacks appended, and a ``WhisperFeatureExtractor`` for the mel bins.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

BINARY_VERSIONS = range(1, 7)
WHISPER_REVISIONS = range(1, 4)
DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_NUMPY = {"float32": np.float32, "int8": np.int8, "int16": np.int16, "int32": np.int32, "float16": np.float16,
          "bfloat16": np.uint16}  # bfloat16 is read as its bits and widened below
_BY_ITEM_SIZE = {4: "float32", 2: "int16", 1: "int8"}  # binary version < 4
MULTILINGUAL_VOCAB = 51865
TIMESTAMP = re.compile(r"<\|\d+\.\d+\|>")


@dataclass
class Ct2Model:
    """A parsed ``model.bin``: float32 weights by CT2 name (dequantized, aliases resolved) and the settings."""

    path: Path
    binary_version: int
    spec: str
    revision: int
    weights: dict[str, np.ndarray]
    scalars: dict[str, int | float]
    aliases: dict[str, str]
    stored: dict[str, tuple[str, tuple[int, ...]]]  # every variable in the file: name -> (dtype, shape)


class _Stream:
    """Reads ``model.bin`` front to back; every short read names the byte offset and the field."""

    def __init__(self, f, path: Path):
        self.f, self.path = f, path

    def take(self, n: int, what: str) -> bytes:
        pos = self.f.tell()
        data = self.f.read(n)
        if len(data) < n:
            raise ValueError(f"{self.path}: truncated at byte {pos + len(data)} while reading {what} "
                             f"({n} bytes needed, {len(data)} left); the file is incomplete, copy it again")
        return data

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.uint("H", what)
        raw = self.take(n, what)
        if n == 0 or raw[-1] != 0:
            raise ValueError(f"{self.path}: not a CTranslate2 model: {what} is not a NUL-terminated string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: not a CTranslate2 model: {what} is not UTF-8 text") from None


def _read_variable(s: _Stream, version: int) -> tuple[str, np.ndarray, str]:
    """(name, value, stored dtype); bfloat16 comes back as float32 (its bits are the top half of one)."""
    name = s.string("a variable name")
    what = f"variable {name!r}"
    shape = tuple(s.uint("I", what) for _ in range(s.uint("B", what)))
    if version >= 4:
        type_id = s.uint("B", what)
        if type_id not in DTYPES:
            raise ValueError(f"{s.path}: {what} has unknown dtype id {type_id} "
                             f"(known: {', '.join(f'{k} {v}' for k, v in DTYPES.items())})")
        dtype, n_bytes = DTYPES[type_id], s.uint("I", what)
    else:
        item_size = s.uint("B", what)
        if item_size not in _BY_ITEM_SIZE:
            raise ValueError(f"{s.path}: {what} has unknown item size {item_size} (known: 4, 2, 1)")
        dtype, n_bytes = _BY_ITEM_SIZE[item_size], s.uint("I", what) * item_size
    np_dtype = np.dtype(_NUMPY[dtype])
    if n_bytes != int(np.prod(shape)) * np_dtype.itemsize:
        raise ValueError(f"{s.path}: {what} holds {n_bytes} bytes, but shape {shape} of {dtype} needs "
                         f"{int(np.prod(shape)) * np_dtype.itemsize}")
    value = np.frombuffer(s.take(n_bytes, what), dtype=np_dtype).reshape(shape)
    if dtype == "bfloat16":
        value = (value.astype(np.uint32) << 16).view(np.float32)
    return name, value, dtype


def _dequantize(raw: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """Float32 values; ``w`` with ``w_scale`` becomes ``w / scale`` (per output row for int8)."""
    if any(n.endswith("_zero") for n in raw):
        raise ValueError(f"{path}: AWQ-quantized weights (*_zero variables) are not supported; convert the "
                         "original checkpoint instead")
    out = {}
    for name, value in raw.items():
        if name.endswith("_scale") and name[: -len("_scale")] in raw:
            continue
        if value.dtype.kind == "f" or value.ndim == 0:
            out[name] = value.astype(np.float32) if value.ndim else value
            continue
        scale = raw.get(name + "_scale")
        if scale is None:
            raise ValueError(f"{path}: variable {name!r} is {value.dtype} but has no {name + '_scale'!r}")
        scale = scale.astype(np.float32)
        rows = value.astype(np.float32).reshape(value.shape[0], -1)
        out[name] = (rows / (scale.reshape(-1, 1) if scale.ndim else scale)).reshape(value.shape)
    return out


def read_ct2(path: str | os.PathLike) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` (or the folder holding it) of a Whisper model."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a CTranslate2 model folder holds model.bin)")
    with open(path, "rb") as f:
        s = _Stream(f, path)
        version = s.uint("I", "the binary version")
        if version not in BINARY_VERSIONS:
            raise ValueError(f"{path}: not a CTranslate2 model (binary version field is {version}; "
                             f"CTranslate2 writes {BINARY_VERSIONS.start}-{BINARY_VERSIONS.stop - 1})")
        if version < 2:
            raise ValueError(f"{path}: CTranslate2 binary version 1 has no spec name and predates Whisper")
        spec = s.string("the spec name")
        revision = s.uint("I", "the spec revision")
        if spec != "WhisperSpec":
            raise ValueError(f"{path}: a CTranslate2 {spec!r} model, not a Whisper model (WhisperSpec)")
        if revision not in WHISPER_REVISIONS:
            raise ValueError(f"{path}: WhisperSpec revision {revision} is not one this reader knows "
                             f"({WHISPER_REVISIONS.start}-{WHISPER_REVISIONS.stop - 1})")
        raw, stored = {}, {}
        for _ in range(s.uint("I", "the variable count")):
            name, value, dtype = _read_variable(s, version)
            raw[name], stored[name] = value, (dtype, value.shape)
        aliases = {}
        if version >= 3:
            for _ in range(s.uint("I", "the alias count")):
                alias = s.string("an alias name")
                aliases[alias] = s.string(f"the target of alias {alias!r}")
    values = _dequantize(raw, path)
    for alias, target in aliases.items():
        if target not in values:
            raise ValueError(f"{path}: alias {alias!r} points to missing variable {target!r}")
        values[alias] = values[target]
    scalars = {n: v.item() for n, v in values.items() if v.ndim == 0}
    weights = {n: v for n, v in values.items() if v.ndim}
    return Ct2Model(path, version, spec, revision, weights, scalars, aliases, stored)


# ------------------------------------------------------------------------------------------- name map


def _layer_map(side: str, i: int) -> list[tuple[str, str, int, int]]:
    """(CT2 name, HF name, part, parts) for one layer; a fused CT2 weight is cut in ``parts`` along rows."""
    c, h = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
    rows = []

    def linear(ct2, hf, part=0, parts=1, bias=True):
        rows.append((f"{c}/{ct2}/weight", f"{h}.{hf}.weight", part, parts))
        if bias:
            rows.append((f"{c}/{ct2}/bias", f"{h}.{hf}.bias", part, parts))

    def norm(ct2, hf):
        rows.extend([(f"{c}/{ct2}/gamma", f"{h}.{hf}.weight", 0, 1), (f"{c}/{ct2}/beta", f"{h}.{hf}.bias", 0, 1)])

    for part, proj in enumerate("qkv"):
        linear("self_attention/linear_0", f"self_attn.{proj}_proj", part, 3, bias=proj != "k")
    linear("self_attention/linear_1", "self_attn.out_proj")
    norm("self_attention/layer_norm", "self_attn_layer_norm")
    if side == "decoder":
        linear("attention/linear_0", "encoder_attn.q_proj")
        linear("attention/linear_1", "encoder_attn.k_proj", 0, 2, bias=False)
        linear("attention/linear_1", "encoder_attn.v_proj", 1, 2)
        linear("attention/linear_2", "encoder_attn.out_proj")
        norm("attention/layer_norm", "encoder_attn_layer_norm")
    linear("ffn/linear_0", "fc1")
    linear("ffn/linear_1", "fc2")
    norm("ffn/layer_norm", "final_layer_norm")
    return rows


def name_map(encoder_layers: int, decoder_layers: int) -> list[tuple[str, str, int, int]]:
    """Every (CT2 name, HF name, part, parts) of a Whisper with these layer counts (proj_out excluded)."""
    rows = [(f"encoder/{conv}/{p}", f"model.encoder.{conv}.{p}", 0, 1) for conv in ("conv1", "conv2")
            for p in ("weight", "bias")]
    rows.append(("decoder/embeddings/weight", "model.decoder.embed_tokens.weight", 0, 1))
    for side, n in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        rows.append((f"{side}/position_encodings/encodings", f"model.{side}.embed_positions.weight", 0, 1))
        rows += [(f"{side}/layer_norm/gamma", f"model.{side}.layer_norm.weight", 0, 1),
                 (f"{side}/layer_norm/beta", f"model.{side}.layer_norm.bias", 0, 1)]
        for i in range(n):
            rows += _layer_map(side, i)
    return rows


def _num_layers(m: Ct2Model, side: str) -> int:
    layer = re.compile(rf"{side}/layer_(\d+)/")
    return 1 + max((int(hit[1]) for n in m.weights if (hit := layer.match(n))), default=-1)


def hf_state_dict(m: Ct2Model) -> tuple[dict[str, torch.Tensor], bool]:
    """The ``WhisperForConditionalGeneration`` state dict, and whether ``proj_out`` is tied to the embeddings."""
    rows = name_map(max(1, _num_layers(m, "encoder")), max(1, _num_layers(m, "decoder")))  # layer 0 at least
    missing = sorted({c for c, *_ in rows if c not in m.weights})
    if missing:
        raise ValueError(f"{m.path}: missing variables {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                         f"({len(missing)} of a WhisperSpec's)")
    state = {}
    for ct2, hf, part, parts in rows:
        value = m.weights[ct2]
        n = value.shape[0] // parts
        state[hf] = torch.from_numpy(value[part * n:(part + 1) * n])
    used = {c for c, *_ in rows} | {"decoder/projection/weight"}
    extra = sorted(set(m.weights) - used)
    if extra:
        raise ValueError(f"{m.path}: variables a Hugging Face Whisper has no place for: {extra[:8]}")
    projection = m.weights.get("decoder/projection/weight")
    tied = projection is None or np.array_equal(projection, m.weights["decoder/embeddings/weight"])
    if not tied:
        state["proj_out.weight"] = torch.from_numpy(projection)
    return state, tied


# ------------------------------------------------------------------------------------------- the folder


def whisper_config(m: Ct2Model, ids: dict[str, int], ct2_config: dict, tied: bool):
    """A ``WhisperConfig`` read off the shapes; heads come from the ``num_heads`` scalars."""
    from transformers import WhisperConfig

    w = m.weights
    for side in ("encoder", "decoder"):
        if f"{side}/num_heads" not in m.scalars:
            raise ValueError(f"{m.path}: missing variable '{side}/num_heads'")
    vocab_size, d_model = w["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=int(vocab_size), d_model=int(d_model), num_mel_bins=int(w["encoder/conv1/weight"].shape[1]),
        encoder_layers=_num_layers(m, "encoder"), decoder_layers=_num_layers(m, "decoder"),
        encoder_attention_heads=int(m.scalars["encoder/num_heads"]),
        decoder_attention_heads=int(m.scalars["decoder/num_heads"]),
        encoder_ffn_dim=int(w["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(w["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(w["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(w["decoder/position_encodings/encodings"].shape[0]),
        pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|startoftranscript|>"], decoder_start_token_id=ids["<|startoftranscript|>"],
        suppress_tokens=ct2_config.get("suppress_ids"), begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        tie_word_embeddings=tied)


SPECIAL = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startofprev|>",
           "<|notimestamps|>")


def whisper_tokenizer(src: Path, vocab_size: int):
    """``WhisperTokenizerFast`` from ``tokenizer.json``, its <|...|> tokens special, timestamps added up to
    ``vocab_size`` (names from ``vocabulary.txt``/``.json`` when present), pad = <|endoftext|>."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizerFast

    path = src / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the converted folder needs the tokenizer)")
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])
    specials = [a["content"] for a in added if a.get("special") and a["content"] != "<|endoftext|>"
                and not TIMESTAMP.fullmatch(a["content"])]  # HF finds timestamps after the last special id
    tok = WhisperTokenizerFast(tokenizer_file=str(path), pad_token="<|endoftext|>", extra_special_tokens=specials)
    vocab = tok.get_vocab()
    lacking = [t for t in SPECIAL if t not in vocab]
    if lacking:
        raise ValueError(f"{path}: not a Whisper tokenizer, it lacks {lacking}")
    names = _vocabulary(src, vocab_size)
    first = tok.convert_tokens_to_ids("<|notimestamps|>") + 1
    if len(tok) > vocab_size or len(tok) < first:
        raise ValueError(f"{path}: {len(tok)} tokens do not fit a model with a {vocab_size}-token vocabulary")
    tok.add_tokens([AddedToken(names[i] if names else f"<|{(i - first) * 0.02:.2f}|>", lstrip=False,
                               rstrip=False, normalized=False, special=False) for i in range(len(tok), vocab_size)])
    return tok


def _vocabulary(src: Path, vocab_size: int) -> list[str] | None:
    """CT2's own token list (a JSON list, or one token a line); the multilingual one holds an empty token."""
    for name in ("vocabulary.json", "vocabulary.txt"):
        if (src / name).is_file():
            text = (src / name).read_text(encoding="utf-8")
            tokens = json.loads(text) if name.endswith(".json") else text.split("\n")
            if name.endswith(".txt") and tokens[-1] == "":
                tokens.pop()
            if len(tokens) != vocab_size:
                raise ValueError(f"{src / name}: {len(tokens)} tokens, but the model has {vocab_size}")
            return tokens
    return None


def generation_config(config, tok, ids: dict[str, int], ct2_config: dict):
    """Whisper's generation settings: special ids, suppression lists, alignment heads, languages and tasks."""
    from transformers import GenerationConfig

    multilingual = config.vocab_size >= MULTILINGUAL_VOCAB
    gen = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        suppress_tokens=ct2_config.get("suppress_ids"), begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        alignment_heads=ct2_config.get("alignment_heads"), max_length=config.max_target_positions,
        max_initial_timestamp_index=50, return_timestamps=False, is_multilingual=multilingual)
    if multilingual:
        gen.lang_to_id = {tok.convert_ids_to_tokens(i): i
                          for i in range(ids["<|startoftranscript|>"] + 1, ids["<|translate|>"])}
        gen.task_to_id = {"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]}
    return gen


def convert(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the CTranslate2 Whisper folder ``src_dir`` as a Hugging Face Whisper folder ``out_dir``.

    ``out_dir`` then loads with ``WhisperForConditionalGeneration.from_pretrained`` and
    ``WhisperProcessor.from_pretrained``. The folder is built beside ``out_dir`` and renamed into place; an
    existing ``out_dir`` is replaced only once the new one is complete.
    """
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    src, out = Path(src_dir), Path(out_dir)
    if src.resolve() == out.resolve():
        raise ValueError(f"{out}: the output folder must differ from the CTranslate2 folder")
    m = read_ct2(src / "model.bin")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src / 'config.json'}: no such file (CTranslate2 writes it beside model.bin)")
    ct2_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    state, tied = hf_state_dict(m)
    tok = whisper_tokenizer(src, int(m.weights["decoder/embeddings/weight"].shape[0]))
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    config = whisper_config(m, ids, ct2_config, tied)
    if (src / "preprocessor_config.json").is_file():
        features = WhisperFeatureExtractor.from_pretrained(src)
        if features.feature_size != config.num_mel_bins:
            raise ValueError(f"{src / 'preprocessor_config.json'}: feature_size {features.feature_size}, but the "
                             f"model takes {config.num_mel_bins} mel bins")
    else:
        features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)

    tmp = _beside(out, "tmp")
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(tmp)
        generation_config(config, tok, ids, ct2_config).save_pretrained(tmp)
        WhisperProcessor(feature_extractor=features, tokenizer=tok).save_pretrained(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_dir(new: Path, target: Path) -> None:
    """Move the complete folder ``new`` onto ``target``; an old ``target`` is set aside first, removed last."""
    old = None
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise FileExistsError(f"{target}: exists and is not a folder")
        old = _beside(target, "old")
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old)


def _beside(path: Path, kind: str) -> Path:
    """A hidden sibling of ``path`` owned by this process (a stale one from a killed run is removed)."""
    sibling = path.parent / f".{path.name}.{os.getpid()}.{kind}"
    shutil.rmtree(sibling, ignore_errors=True)
    return sibling
