"""BPE tokenizer: special ids, normalisation consistent with asrlab.text, unknown characters, save/load."""

from __future__ import annotations

import pytest

from asrlab.text import normalize_text
from asrlab.tokenizer import (SPECIAL_TOKENS, decode, encode, load_tokenizer, save_tokenizer,
                              train_tokenizer)

TRAIN = [
    "Wake me up at five AM this week!", "What's the weather like in Paris today?",
    "Play some jazz music, please.", "Set an alarm for tomorrow morning", "remove the alarm at seven",
    "Tell me a joke about cats", "how's the traffic on my way to work", "turn the lights off in the kitchen",
    "order a pizza from the nearest restaurant", "what time is it in New York",
] * 5

TRICKY = [
    "Hello, World!", "café naïve  \u2019tis rock'n'roll", "a\u65e5\u672cb 5am", "\u00df \u212a \t\nX",
    "''quoted'' it's", "\U0001F600", "", "  SPACES   everywhere  ", "don't-stop", "O\u2018Brien's",
    "50% off @ 3pm", "naïve\u0301", "Ça va? Ñandú", "tab\tand\rreturn",
]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return save_tokenizer(train_tokenizer(TRAIN, vocab_size=120), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_path):
    return load_tokenizer(tok_path)


def test_special_tokens_have_fixed_ids(tok):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")


def test_vocabulary_size_is_bounded_by_the_argument(tok):
    assert 4 + 37 < len(tok) <= 120


def test_too_small_vocabulary_or_no_text_raise():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TRAIN, vocab_size=10)
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer(["!!!", "\u65e5\u672c"], vocab_size=100)


@pytest.mark.parametrize("text", TRICKY)
def test_embedded_normalizer_matches_normalize_text(tok, text):
    assert tok.backend_tokenizer.normalizer.normalize_str(text) == normalize_text(text)


@pytest.mark.parametrize("text", TRAIN[:10] + TRICKY + ["zebra quux 1234567890 x'y"])
def test_round_trip_gives_the_normalised_text(tok, text):
    ids = encode(tok, text)
    assert decode(tok, ids) == normalize_text(text)
    assert tok.unk_token_id not in ids  # the whole alphabet is in the vocabulary
    # Calling the tokenizer directly normalises the same way (the normaliser lives in tokenizer.json).
    assert tok(text, add_special_tokens=True)["input_ids"] == ids  # and adds no bos/eos


def test_unknown_characters_are_removed_or_map_to_unk(tok):
    assert encode(tok, "\u65e5\u672c \U0001F600") == []  # removed by normalisation, no crash
    assert encode(tok, "a \u65e5 b") == encode(tok, "a b")
    # Below the normaliser, a symbol outside the alphabet is <unk>, not an error.
    assert [t.id for t in tok.backend_tokenizer.model.tokenize("#")] == [tok.unk_token_id]


def test_load_from_file_or_directory_and_missing(tok_path, tmp_path):
    assert load_tokenizer(tok_path).get_vocab() == load_tokenizer(tok_path.parent).get_vocab()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_training_is_deterministic(tok):
    again = train_tokenizer(TRAIN, vocab_size=120)
    assert again.get_vocab() == tok.get_vocab()


def test_a_model_folder_gives_back_the_project_bpe_unchanged_beside_a_qwen2_config(tmp_path):
    """AutoTokenizer next to a Qwen2 config.json rebuilds the file as a byte-level Qwen2 tokenizer (other ids,
    no spaces on decoding); store.tokenizer must return the project BPE exactly as trained."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from asrlab.models import store
    from asrlab.tokenizer import decode, encode, load_tokenizer, save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(["wake me up at five am", "turn off the lights please"] * 20, 60, 1), tmp_path / "bpe")
    bpe = load_tokenizer(tmp_path / "bpe")
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(bpe), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=32, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2))
    store.save(lm, "lm", tmp_path / "lm", tok=bpe)
    back = store.tokenizer(tmp_path / "lm")
    text = "wake me up at five am"
    assert encode(back, text) == encode(bpe, text)
    assert decode(back, encode(back, text)) == text
    assert (back.pad_token_id, back.bos_token_id, back.eos_token_id) == (0, 1, 2)
