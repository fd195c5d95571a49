"""Stage `tokenizer`: BPE on training text only (lm.txt train side and the SLURP train split).

Output: ``tokenizer.out_dir/tokenizer.json`` (loads as a PreTrainedTokenizerFast); metrics
``results/base/tokenizer.json`` (vocabulary, tokens per word on the dev sentences).
"""

from __future__ import annotations

from pathlib import Path

from asrlab.params import checked
from asrlab.io import read_jsonl, write_json
from asrlab.tokenizer import encode, load_tokenizer, save_tokenizer, train_tokenizer


SCHEMA = {"tokenizer": {"vocab_size": int, "min_frequency?": int, "out_dir": str, "stats": str}}


def run(params: dict) -> dict:
    p = checked(params, "tokenizer", SCHEMA)
    prepared = Path(params["prepare"]["out_dir"])
    rows = read_jsonl(prepared / "lm.jsonl") + read_jsonl(prepared / "slurp.jsonl")
    texts = [r["text"] for r in rows if r["split"] == "train"]
    dev = [r["text"] for r in rows if r["split"] == "dev"]
    path = save_tokenizer(train_tokenizer(texts, p["vocab_size"], p.get("min_frequency", 2)), Path(p["out_dir"]))
    tok = load_tokenizer(path)
    n_tokens = sum(len(encode(tok, t)) for t in dev)
    n_words = sum(len(t.split()) for t in dev)
    stats = {"vocab_size": len(tok), "train_sentences": len(texts),
             "dev_tokens_per_word": round(n_tokens / max(n_words, 1), 3),
             "dev_unk_tokens": sum(encode(tok, t).count(tok.unk_token_id) for t in dev)}
    write_json(p["stats"], stats)
    print(f"[tokenizer] vocabulary {stats['vocab_size']}, {stats['dev_tokens_per_word']} tokens/word on dev")
    return stats
