"""Held-out loss, perplexity and bits per byte of a model on token streams.

Bits per byte divide the loss (in bits) by the UTF-8 bytes of the text the scored tokens stand for, so it does
not depend on the tokenizer: runs with different tokenizers compare. A token's bytes come from the tokenizer
(`token_bytes`): exact for byte-level BPE (keel's own tokenizer: each character of a token stands for one
byte), the UTF-8 length of the token's text otherwise; special tokens stand for 0 bytes.

What is scored: every target of a document after its <bos>, its <eos> included (the model must predict where a
document ends; those bits count, over the document's bytes). A stream is cut into windows of seq_len + 1
tokens that overlap by one, so every target is scored exactly once; a window starts without the context before
it (as in training), so the numbers are those of the held-out loss the training loop reports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from keel.config import ModelConfig
from keel.data.pack import expand
from keel.model import transformer


def token_bytes(tok: Tokenizer, vocab_size: int) -> np.ndarray:
    """bytes_V: the UTF-8 bytes of text each token id stands for (0 for special tokens and unused ids)."""
    table = np.zeros(vocab_size, np.int64)
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    byte_level = any(d.get("type") == "ByteLevel" for d in decoders)
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    for piece, i in tok.get_vocab().items():
        if i >= vocab_size or i in special:
            continue
        if byte_level:
            table[i] = len(piece)  # the byte-to-character table maps each byte to one character
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            table[i] = 1  # a SentencePiece byte-fallback token
        else:
            table[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return table


@dataclass
class Score:
    """Summed over a source's scored targets: nats, targets and the bytes they stand for."""

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0

    def __add__(self, other: Score) -> Score:
        return Score(self.nats + other.nats, self.tokens + other.tokens, self.bytes + other.bytes)

    @property
    def loss(self) -> float:
        """Mean nats per token."""
        return self.nats / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes if self.bytes else math.nan

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes}


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    """A mean loss (nats per token) over `tokens` targets that stand for `n_bytes` bytes, in bits per byte."""
    return loss_nats * tokens / math.log(2) / n_bytes if n_bytes else math.nan


def windows(tokens_N: np.ndarray, doc_starts: np.ndarray, seq_len: int, pad: int
            ) -> Iterator[tuple[np.ndarray, int]]:
    """(window of seq_len + 1 tokens, offset of its first token in its document) covering every target of the
    stream once; the last window is padded with `pad` (never scored)."""
    n = len(tokens_N)
    for start in range(0, max(n - 1, 0), seq_len):
        w = np.full(seq_len + 1, pad, tokens_N.dtype)
        chunk = tokens_N[start:start + seq_len + 1]
        w[:len(chunk)] = chunk
        doc = int(np.searchsorted(doc_starts, start, side="right")) - 1
        yield w, start - int(doc_starts[max(doc, 0)])


def _batch_score(params: Any, tokens: jax.Array, first: jax.Array, bytes_V: jax.Array, cfg: ModelConfig,
                 bos: int, pad: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    batch = expand(tokens, first, bos, pad, jnp)
    loss, _ = transformer.loss_fn(params, batch, cfg)
    mask = batch["loss_mask"]
    n = mask.sum()
    return loss * jnp.maximum(n, 1).astype(jnp.float32), n, (bytes_V[batch["targets"]] * mask).sum()


def score_stream(params: Any, cfg: ModelConfig, tokens_N: np.ndarray, doc_starts: np.ndarray, bytes_V: np.ndarray,
                 bos: int, pad: int, seq_len: int, batch_size: int = 8) -> Score:
    """The model's summed loss over every target of a token stream of documents (`<bos> text <eos>` each,
    starting at `doc_starts`)."""
    fn = jax.jit(partial(_batch_score, cfg=cfg, bos=bos, pad=pad))
    table = jnp.asarray(bytes_V.astype(np.int32))
    total = Score()
    rows: list[tuple[np.ndarray, int]] = []

    def flush() -> Score:
        toks = np.full((batch_size, seq_len + 1), pad, np.int32)
        first = np.zeros(batch_size, np.int32)
        for i, (w, f) in enumerate(rows):
            toks[i], first[i] = w, f
        nats, n, b = fn(params, toks, first, table)
        rows.clear()
        return Score(float(nats), int(n), int(b))

    for row in windows(tokens_N, doc_starts, seq_len, pad):
        rows.append(row)
        if len(rows) == batch_size:
            total += flush()
    if rows:
        total += flush()
    return total


def documents_stream(token_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Documents (each already `<bos> text <eos>`) as one stream and its document starts."""
    lengths = np.array([len(t) for t in token_lists], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = np.array([i for t in token_lists for i in t], np.int64)
    return flat, starts


def eval_set_bytes(batches: list[dict[str, np.ndarray]], bytes_V: np.ndarray, bos: int, pad: int
                   ) -> tuple[int, int]:
    """(scored targets, bytes they stand for) of host batches ({"tokens", "first_position"}), e.g. a source's
    fixed held-out set `DataSource.eval_sets(n)[name]`."""
    tokens = n_bytes = 0
    for b in batches:
        e = expand(b["tokens"], b["first_position"], bos, pad)
        mask = e["loss_mask"].astype(bool)
        tokens += int(mask.sum())
        n_bytes += int(bytes_V[e["targets"][mask]].sum())
    return tokens, n_bytes


def heldout_bits_per_byte(data: Any, by_source: dict[str, float], eval_batches: int) -> tuple[float, dict[str, float]]:
    """Bits per byte of the training loop's held-out losses (`Evaluator.at(step, params)` returns them per
    source): overall weighted by the initial mixture, as the held-out loss is. `data` is the run's
    `DataSource`; `eval_batches` is train.eval_batches."""
    bytes_V = token_bytes(data.tokenizer, data.cfg.model.vocab_size)
    sets = data.eval_sets(eval_batches)
    out = {}
    for name, loss in by_source.items():
        tokens, n_bytes = eval_set_bytes(sets[name], bytes_V, data.bos_id, data.pad_id)
        out[name] = bits_per_byte(loss, tokens, n_bytes)
    return sum(data.eval_weights[k] * v for k, v in out.items()), out
