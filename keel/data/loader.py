"""Training data behind one interface: `DataSource.global_batch(step)`.

The batch at step N is a pure function of (data config, tokenizer, seed, N): the token stream is cut into
windows of seq_len + 1 tokens (neighbours overlap by one token so no transition is lost), each epoch visits
the windows in a fresh seeded permutation, and global sample g = step * batch + row is window
perm(g // W)[g % W]. Restarts, prefetch depth and host count never change it; a host takes its rows.

Documents are packed: every document is `<bos> text <eos>`, segment ids and positions restart at each
document, and the loss mask drops the one target per boundary that would cross into the next document.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from keel.config import Config, ConfigError
from keel.data.corpus import Document, load_corpus
from keel.data.tokenizer import load_tokenizer, special_ids, tokenizer_hash, train_bpe
from keel.io import atomic_write

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class TokenStream:
    tokens: np.ndarray  # uint16 or uint32, all documents concatenated
    doc_starts: np.ndarray  # int64, start offset of each document in `tokens`

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def windows(self, seq_len: int) -> int:
        return max(0, (self.n_tokens - 1) // seq_len)

    def gather(self, window_ids: np.ndarray, seq_len: int) -> Batch:
        """The packed rows for the given windows: inputs/targets/segment_ids/positions/loss_mask, each (B, S)."""
        idx_BT = window_ids[:, None].astype(np.int64) * seq_len + np.arange(seq_len + 1)
        tok_BT = self.tokens[idx_BT].astype(np.int32)
        doc_BT = np.searchsorted(self.doc_starts, idx_BT, side="right") - 1
        inputs_doc = doc_BT[:, :-1]
        return {
            "inputs": tok_BT[:, :-1],
            "targets": tok_BT[:, 1:],
            "segment_ids": (inputs_doc - inputs_doc[:, :1] + 1).astype(np.int32),
            "positions": (idx_BT[:, :-1] - self.doc_starts[inputs_doc]).astype(np.int32),
            "loss_mask": (inputs_doc == doc_BT[:, 1:]).astype(np.int32),
        }

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the corpus's unigram token distribution: the loss of the best context-free model."""
        counts = np.bincount(self.tokens)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def tokenize(tok: Tokenizer, docs: list[Document], bos: int, eos: int) -> TokenStream:
    encoded = tok.encode_batch([d.text for d in docs], add_special_tokens=False)
    lengths = np.array([len(e.ids) + 2 for e in encoded], dtype=np.int64)
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for start, e, n in zip(starts, encoded, lengths, strict=True):
        tokens[start] = bos
        tokens[start + 1 : start + n - 1] = e.ids
        tokens[start + n - 1] = eos
    return TokenStream(tokens, starts)


class DataSource:
    """Train and held-out token streams for a run, built once and cached in the run directory."""

    def __init__(self, cfg: Config, run_dir: Path, log=print):
        self.cfg = cfg
        self.seq_len = cfg.data.seq_len
        self.batch_size = cfg.train.batch_size
        self.seed = cfg.train.seed
        corpus = load_corpus(cfg.data.corpus)
        if corpus.skipped:
            log(f"data: skipped {len(corpus.skipped)} of {len(corpus.documents) + len(corpus.skipped)} files "
                f"(e.g. {next(iter(corpus.skipped.items()))})")
        train_docs, heldout_docs = corpus.split(cfg.data.heldout_fraction)
        self.tokenizer = self._tokenizer(cfg, run_dir, train_docs, log)
        vocab = self.tokenizer.get_vocab_size()
        if vocab > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({vocab}); set model.vocab_size={vocab} or larger")
        self.pad_id, self.bos_id, self.eos_id = special_ids(self.tokenizer)
        key = {"corpus": corpus.content_hash, "tokenizer": tokenizer_hash(self.tokenizer),
               "heldout_fraction": cfg.data.heldout_fraction, "format": 1}
        self.fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        cache = run_dir / "data" / self.fingerprint
        self.train = self._stream(cache / "train", train_docs)
        self.heldout = self._stream(cache / "heldout", heldout_docs)
        self.n_windows = self.train.windows(self.seq_len)
        if self.n_windows < self.batch_size or self.heldout.windows(self.seq_len) < 1:
            raise ConfigError(
                f"data.corpus={cfg.data.corpus!r} has {self.n_windows} training windows of data.seq_len="
                f"{self.seq_len} and {self.heldout.windows(self.seq_len)} held-out ones; need at least "
                f"train.batch_size={self.batch_size} and 1"
            )
        log(f"data: {len(train_docs)} train / {len(heldout_docs)} held-out documents, "
            f"{self.train.n_tokens:,} / {self.heldout.n_tokens:,} tokens, vocab {vocab}, "
            f"fingerprint {self.fingerprint}")

    @staticmethod
    def _tokenizer(cfg: Config, run_dir: Path, train_docs: list[Document], log) -> Tokenizer:
        saved = run_dir / "tokenizer.json"
        if cfg.data.tokenizer:
            tok = load_tokenizer(cfg.data.tokenizer)
        elif saved.exists():
            tok = load_tokenizer(saved)
        else:
            t0 = time.perf_counter()
            tok = train_bpe([d.text for d in train_docs], cfg.model.vocab_size)
            log(f"data: trained a byte-level BPE of {tok.get_vocab_size()} tokens in {time.perf_counter() - t0:.1f}s")
        special_ids(tok)
        if not saved.exists():
            atomic_write(saved, tok.to_str(pretty=True))
        return tok

    def _stream(self, prefix: Path, docs: list[Document]) -> TokenStream:
        tok_path, start_path = prefix.with_suffix(".tokens.npy"), prefix.with_suffix(".starts.npy")
        if tok_path.exists() and start_path.exists():
            return TokenStream(np.load(tok_path, mmap_mode="r"), np.load(start_path))
        stream = tokenize(self.tokenizer, docs, self.bos_id, self.eos_id)
        for path, arr in ((tok_path, stream.tokens), (start_path, stream.doc_starts)):
            buf = io.BytesIO()
            np.save(buf, arr)
            atomic_write(path, buf.getvalue())  # a half-written cache never looks complete
        return stream

    @functools.lru_cache(maxsize=4)  # noqa: B019 - one DataSource per run; epochs are few
    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def window_ids(self, step: int) -> np.ndarray:
        g = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(g, self.n_windows)
        out = np.empty_like(g)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._epoch_order(int(e))[offsets[sel]]
        return out

    def global_batch(self, step: int) -> Batch:
        return self.train.gather(self.window_ids(step), self.seq_len)

    def host_batch(self, step: int, host: int, n_hosts: int) -> Batch:
        """Host `host` of `n_hosts` takes its contiguous rows of the global batch."""
        if self.batch_size % n_hosts:
            raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by {n_hosts} hosts")
        rows = self.batch_size // n_hosts
        ids = self.window_ids(step)[host * rows : (host + 1) * rows]
        return self.train.gather(ids, self.seq_len)

    def eval_batches(self, n: int) -> list[Batch]:
        """A fixed held-out set: the first n * batch windows of the held-out stream (wrapping if short)."""
        w = self.heldout.windows(self.seq_len)
        ids = np.arange(n * self.batch_size) % w
        return [self.heldout.gather(chunk, self.seq_len) for chunk in np.split(ids, n)]

    def epoch(self, step: int) -> float:
        return step * self.batch_size / self.n_windows


class Prefetcher:
    """Prepares host batches for the next steps on a background thread; records how long the loop waited."""

    def __init__(self, source: DataSource, start: int, stop: int, host: int = 0, n_hosts: int = 1,
                 depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.last_wait_s = 0.0

        def work() -> None:
            try:
                for step in range(start, stop):
                    batch = source.host_batch(step, host, n_hosts)
                    while not self._stop.is_set():
                        try:
                            self._q.put((step, batch), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
            except BaseException as e:  # surfaced in the training loop, never swallowed
                self._q.put((None, e))

        self._thread = threading.Thread(target=work, name="keel-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        return self

    def __next__(self) -> tuple[int, Batch]:
        t0 = time.perf_counter()
        step, batch = self._q.get()
        self.last_wait_s = time.perf_counter() - t0
        if step is None:
            raise batch
        return step, batch

    def close(self) -> None:
        self._stop.set()
