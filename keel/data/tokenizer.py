"""Tokenizers: any HF `tokenizer.json` (with keel's <pad>/<bos>/<eos> added), or a byte-level BPE trained on the
corpus; a tokenizer's hash is what stores and runs compare."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from keel.errors import ConfigError, KeelError

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | Path, what: str = "data.tokenizer",
                   error: type[KeelError] = ConfigError) -> Tokenizer:
    """A tokenizer.json, with keel's <pad>/<bos>/<eos> added if it lacks them (so its hash is stable).

    A missing or invalid file raises `error` naming `what`, the setting that gave the path: the config key,
    a command-line flag (both config errors), or "store tokenizer" for a store's own copy (a data error)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what}={str(path)!r}: file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise error(f"{what}={str(path)!r} is not a valid tokenizer.json: {e}") from e
    special_ids(tok)
    return tok


def tokenizer_hash(tok: Tokenizer) -> str:
    """16 hex digits of the sha256 of the tokenizer's JSON: stores, runs and checkpoints compare these."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def special_ids(tok: Tokenizer) -> tuple[int, int, int]:
    """(pad, bos, eos) ids; tokenizers without them get them as added special tokens."""
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return tuple(tok.token_to_id(t) for t in SPECIAL_TOKENS)  # type: ignore[return-value]
