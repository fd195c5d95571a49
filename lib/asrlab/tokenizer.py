"""BPE tokenizer for transcripts, trained with `tokenizers` on training text only.

Every text passes through :func:`asrlab.text.normalize_text` before training and before encoding, so the
model's targets live in the same space as the references it is scored against. The same normalisation is
also written into ``tokenizer.json`` as a `tokenizers` normalizer (:func:`_normalizer`), so that a caller
who uses the loaded tokenizer directly (``tok("Hello!")``) gets the same tokens; a test checks that both
agree. After normalisation only ``[a-z0-9' ]`` remain, and the whole alphabet is seeded into the BPE
vocabulary, so nothing maps to ``<unk>`` in practice; ``<unk>`` stays as the model's fallback rather than
an error.

Special tokens have fixed ids (models rely on them being inside the vocabulary):
``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3. No special tokens are added on encoding: each model
adds its own bos/eos where its recipe needs them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from asrlab.text import normalize_text

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3 in this order
ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789'")
_WORD_START = "\u2581"  # "▁": SentencePiece's word-boundary marker, so decoding restores spaces exactly


def _normalizer() -> normalizers.Normalizer:
    """`normalize_text` written as a `tokenizers` normalizer (same steps, same order; see asrlab.text)."""
    return normalizers.Sequence([
        normalizers.Replace(Regex("[\u2019\u2018`\u00b4]"), "'"),
        normalizers.NFKD(),
        normalizers.Replace(Regex(r"[^\x00-\x7F]"), ""),  # no ASCII form: dropped, as fold_ascii does
        normalizers.Lowercase(),
        normalizers.Replace(Regex("[^a-z0-9' ]+"), " "),
        normalizers.Replace(Regex("(?<![a-z0-9])'|'(?![a-z0-9])"), " "),
        normalizers.Replace(Regex(" +"), " "),
        normalizers.Strip(),
    ])


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a BPE tokenizer on ``texts`` (normalised first) with at most ``vocab_size`` entries.

    The vocabulary may come out smaller than ``vocab_size`` on a small corpus; use ``len(tokenizer)``
    of the loaded tokenizer as the models' vocabulary size.
    """
    if vocab_size < len(SPECIAL_TOKENS) + len(ALPHABET) + 1:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the special tokens + alphabet "
                         f"({len(SPECIAL_TOKENS) + len(ALPHABET) + 1})")
    normalised = [t for t in (normalize_text(str(x)) for x in texts) if t]
    if not normalised:
        raise ValueError("no training text left after normalisation")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_WORD_START, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=_WORD_START, prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=ALPHABET + [_WORD_START], show_progress=False)
    tok.train_from_iterator(normalised, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write ``tokenizer.json``; ``path`` is the file or a directory to hold it. Returns the file."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load ``tokenizer.json`` (the file or its directory) with pad/bos/eos/unk set."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer; train one with asrlab.tokenizer.train_tokenizer")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, unk_token=UNK)


WHISPER_START = "<|startoftranscript|>"


def is_whisper(tokenizer) -> bool:
    """A Whisper tokenizer (byte-level BPE whose words carry a leading space)."""
    return tokenizer.convert_tokens_to_ids(WHISPER_START) not in (None, tokenizer.unk_token_id)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``normalize_text(text)``, without bos/eos or prompt (models add their own).

    A Whisper tokenizer gets the leading space its training text had (``" wake me up"``), so the first word
    is the same token as in the middle of a sentence.
    """
    text = normalize_text(text)
    return tokenizer.encode(" " + text if is_whisper(tokenizer) else text, add_special_tokens=False)


def decode(tokenizer, ids: Iterable[int]) -> str:
    """Text of ``ids`` with special tokens dropped, as the model wrote it (cased, punctuated, digits for a
    pretrained Whisper); scoring normalises reference and hypothesis alike (:func:`asrlab.text.normalize_for_scoring`)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()
