"""Training data behind one interface: `DataSource.global_batch(step)`.

The batch at step N is a pure function of (data config, seed, N) — see `keel.data.order` for the math:
a mixture of sources (token stores), exact rows per source in every batch, a keyed O(1)-memory shuffle of each
source's sequences per epoch, and the rows of sources shuffled inside the batch. Restarts, prefetch depth and
host count never change it; host h of H takes rows [h B/H, (h+1) B/H).

A host batch is {"tokens": (rows, seq_len + 1) uint16/uint32, "first_position": (rows,) int32}; the train step
expands it into inputs, targets, segment ids, positions and loss mask (`keel.data.pack.expand`).
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from keel.config import Config, ConfigError
from keel.data.corpus import stdlib_files
from keel.data.order import MixturePlan, Rows, SampleOrder
from keel.data.pack import Batch
from keel.data.store import BuildSpec, DataError, Split, TokenSpace, TokenStore, build_store
from keel.data.tokenizer import load_tokenizer, tokenizer_hash
from keel.train.plan import SkipList

ORDER_VERSION = 2


@dataclass(frozen=True)
class Source:
    name: str
    store: TokenStore
    weight: float
    max_epochs: float

    @property
    def train(self) -> Split:
        return self.store.split("train")


def corpus_store(cfg: Config, run_dir: Path, log=print, progress: bool = False, builder: bool = True,
                 wait_s: float = 7200.0) -> TokenStore:
    """The store of `data.corpus` (built by `keel data build` on first use), cached under `data.cache_dir`
    (default run_dir/data/) by a key of its content.

    In a multi-host run only the builder (host 0) builds; the others wait for its manifest on the shared
    run directory."""
    d = cfg.data
    files = [glob.escape(str(f)) for f in stdlib_files()[1]] if d.corpus == "stdlib" else [d.corpus]
    paths = sorted({p for f in files for p in glob.glob(f, recursive=True) if os.path.isfile(p)})
    if not paths:
        raise ConfigError(f"data.corpus={d.corpus!r} matches no files")
    listing = [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    tok_key = tokenizer_hash(load_tokenizer(d.tokenizer)) if d.tokenizer else f"bpe-{cfg.model.vocab_size}"
    key = hashlib.sha256(json.dumps([listing, tok_key, d.heldout_fraction, d.text_field]).encode()).hexdigest()[:16]
    out = Path(d.cache_dir or run_dir / "data") / key
    spec = BuildSpec(inputs=tuple(files), out=str(out), tokenizer=d.tokenizer, vocab_size=cfg.model.vocab_size,
                     text_field=d.text_field, heldout_fraction=d.heldout_fraction)
    t0 = time.perf_counter()
    if not (out / "manifest.json").exists() and builder:
        jobs = 1 if len(paths) < 200 else min(8, os.cpu_count() or 1)
        build_store(spec, jobs=jobs, progress=progress, log=lambda s: log(s.replace("data build: ", "data: ")))
        log(f"data: built the token store for data.corpus={d.corpus!r} in {time.perf_counter() - t0:.1f}s")
    while not (out / "manifest.json").exists():
        if time.perf_counter() - t0 > wait_s:
            raise ConfigError(f"waited {wait_s:.0f}s for host 0 to build the token store {out}; is run_dir on a "
                              f"filesystem every host shares?")
        time.sleep(0.5)
    return TokenStore(out)


class DataSource:
    """The run's sources, sample order, skip list and held-out set."""

    def __init__(self, cfg: Config, run_dir: Path, log=print, progress: bool = False, host: int = 0):
        d = cfg.data
        self.cfg = cfg
        self.seq_len = d.seq_len
        self.batch_size = cfg.train.batch_size
        try:
            if d.sources:
                self.sources = [Source(s.name, TokenStore(s.path), s.weight, s.max_epochs) for s in d.sources]
            else:
                store = corpus_store(cfg, run_dir, log, progress, builder=host == 0)
                self.sources = [Source("corpus", store, 1.0, 0.0)]
        except DataError as e:
            raise ConfigError(str(e)) from None
        first = self.sources[0].store
        for s in self.sources[1:]:
            if s.store.manifest["tokenizer"]["sha256"] != first.manifest["tokenizer"]["sha256"]:
                raise ConfigError(f"data.sources: {s.name!r} ({s.store.path}) and {self.sources[0].name!r} "
                                  f"({first.path}) were built with different tokenizers")
        self.tokenizer: Tokenizer = first.tokenizer
        if d.tokenizer and tokenizer_hash(load_tokenizer(d.tokenizer)) != first.manifest["tokenizer"]["sha256"]:
            raise ConfigError(f"data.tokenizer={d.tokenizer!r} is not the tokenizer the stores were built with "
                              f"({first.path}/tokenizer.json)")
        vocab = self.tokenizer.get_vocab_size()
        if vocab > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({vocab}); set model.vocab_size={vocab} or larger")
        self.pad_id, self.bos_id, self.eos_id = first.pad_id, first.bos_id, first.eos_id
        self.heldout = [s.store.split("heldout") if "heldout" in s.store.splits else None for s in self.sources]
        n_seq = [s.train.windows(self.seq_len) for s in self.sources]
        for s, n, h in zip(self.sources, n_seq, self.heldout, strict=True):
            if n < 1 or h is None or h.windows(self.seq_len) < 1:
                raise ConfigError(
                    f"data source {s.name!r} ({s.store.path}) has {n} training sequences and "
                    f"{h.windows(self.seq_len) if h else 0} held-out ones of data.seq_len={self.seq_len}; "
                    f"it needs at least one of each (a held-out split: keel data build --heldout-fraction)")
        names = [s.name for s in self.sources]
        changes = [(c.step, [c.weights.get(n, 0.0) for n in names]) for c in d.mixture_schedule]
        try:
            self.plan = MixturePlan([s.weight for s in self.sources], self.batch_size, changes)
        except ValueError as e:
            raise ConfigError(f"data mixture: {e}") from None
        self.order = SampleOrder(self.plan, n_seq, d.seed, names)
        self.space = TokenSpace([s.train for s in self.sources], self.seq_len + 1)
        self.skip = SkipList(d.skip_steps)
        self.description = {
            "order_version": ORDER_VERSION, "seq_len": self.seq_len, "batch_size": self.batch_size, "seed": d.seed,
            "sources": {s.name: {"store": s.store.fingerprint, "weight": s.weight} for s in self.sources},
            "mixture_schedule": [[c.step, dict(sorted(c.weights.items()))] for c in d.mixture_schedule],
        }
        self.fingerprint = hashlib.sha256(json.dumps(self.description, sort_keys=True).encode()).hexdigest()[:16]
        for s, split, h in zip(self.sources, (s.train for s in self.sources), self.heldout, strict=True):
            log(f"data: source {s.name!r} weight {s.weight:g}: {split.n_documents:,} documents, "
                f"{split.n_tokens:,} tokens, {split.windows(self.seq_len):,} sequences; held-out "
                f"{h.n_tokens:,} tokens ({s.store.path}, store {s.store.fingerprint})")
        log(f"data: vocab {vocab}, order fingerprint {self.fingerprint}")

    # ------------------------------------------------------------------------------------------ batches

    def rows(self, steps: np.ndarray | Sequence[int] | int) -> Rows:
        """The rows of the global batches at `steps`, (K, B) arrays (see `SampleOrder.rows`)."""
        return self.order.rows(steps)

    def _gather(self, rows: Rows, sel: slice) -> tuple[np.ndarray, np.ndarray]:
        """tokens (K, n, seq_len + 1) and first positions (K, n) of rows `sel` of K steps: one gather."""
        source, sequence = rows.source[:, sel], rows.sequence[:, sel]
        return self.space.gather([sequence[source == s] for s in range(len(self.sources))], self.seq_len, source)

    def _check_epochs(self, rows: Rows, steps: np.ndarray) -> None:
        for i, s in enumerate(self.sources):
            if not s.max_epochs:
                continue
            over = (rows.source == i) & (rows.sample >= s.max_epochs * self.order.n_sequences[i])
            if over.any():
                raise DataError(
                    f"data source {s.name!r} reached its repetition limit max_epochs={s.max_epochs:g} "
                    f"({self.order.n_sequences[i]:,} sequences per epoch) at step {int(steps[over.any(1).argmax()])}; "
                    f"raise data.sources[{i}].max_epochs, lower its weight or add data")

    def host_batches(self, steps: Iterable[int], host: int = 0, n_hosts: int = 1,
                     block: int = 64) -> Iterator[tuple[int, Batch]]:
        """(step, host batch) for the given steps. The order and the reads are done for up to `block` steps at
        once (at most ~32 MiB of tokens), which amortises numpy's per-call cost."""
        if self.batch_size % n_hosts:
            raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by {n_hosts} hosts")
        per = self.batch_size // n_hosts
        sel = slice(host * per, (host + 1) * per)
        step_bytes = per * (self.seq_len + 1) * self.sources[0].store.dtype.itemsize
        block = max(1, min(block, (32 << 20) // step_bytes))
        it = iter(steps)
        while chunk := list(itertools.islice(it, block)):
            chunk = np.array(chunk, dtype=np.int64)
            rows = self.rows(chunk)
            self._check_epochs(rows, chunk)
            tokens, first = self._gather(rows, sel)
            for k, step in enumerate(chunk):
                yield int(step), {"tokens": tokens[k], "first_position": first[k]}

    def host_batch(self, step: int, host: int, n_hosts: int) -> Batch:
        """Host `host` of `n_hosts` takes its contiguous rows of the global batch."""
        return next(self.host_batches([step], host, n_hosts))[1]

    def global_batch(self, step: int) -> Batch:
        return self.host_batch(step, 0, 1)

    def eval_sets(self, n: int) -> dict[str, list[Batch]]:
        """A fixed held-out set per source: n batches of its held-out windows in store order (wrapping if
        short). The run's held-out loss is their mean weighted by the initial mixture."""
        out = {}
        for s, h in zip(self.sources, self.heldout, strict=True):
            ids = np.arange(n * self.batch_size) % h.windows(self.seq_len)
            out[s.name] = [dict(zip(("tokens", "first_position"), h.gather(chunk, self.seq_len), strict=True))
                           for chunk in np.split(ids, n)]
        return out

    @property
    def eval_weights(self) -> dict[str, float]:
        return {s.name: float(w) for s, w in zip(self.sources, self.plan.segments[0].weights, strict=True)}

    # ------------------------------------------------------------------------------------------ accounting

    def epochs(self, step: int) -> dict[str, float]:
        """Epochs of each source consumed by the batches before `step`."""
        return {s.name: float(e) for s, e in zip(self.sources, self.order.epochs(step), strict=True)}

    def check_budget(self, stop: int) -> None:
        """A ConfigError now, rather than a crash later, if a source's max_epochs would stop the run before `stop`."""
        used = self.order.epochs(stop)
        for i, s in enumerate(self.sources):
            if s.max_epochs and used[i] > s.max_epochs:
                raise ConfigError(
                    f"data source {s.name!r} would be repeated {used[i]:.2f} times by step {stop} but "
                    f"data.sources[{i}].max_epochs={s.max_epochs:g}; lower train.steps or the source's weight, "
                    f"raise max_epochs, or add data")

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the mixture's unigram token distribution: the loss of the best context-free model."""
        p = sum(self.eval_weights[s.name] * s.train.unigram / max(1, s.train.unigram.sum()) for s in self.sources)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    def stats(self, step: int) -> list[dict]:
        """Per source: its size, and what the batches before `step` consumed of it."""
        consumed = self.plan.cumulative(np.array([step]))[0]
        out = []
        for i, s in enumerate(self.sources):
            n = int(self.order.n_sequences[i])
            out.append({"source": s.name, "store": str(s.store.path), "weight": s.weight,
                        "documents": s.train.n_documents, "tokens": s.train.n_tokens, "sequences": n,
                        "sequences_consumed": int(consumed[i]), "tokens_consumed": int(consumed[i]) * self.seq_len,
                        "epochs_consumed": consumed[i] / n, "max_epochs": s.max_epochs})
        return out

    def inspect(self, step: int, host: int = 0, n_hosts: int = 1, text_chars: int = 200) -> list[dict]:
        """Every row of the global batch at `step` (or of one host's rows): source, documents, decoded text."""
        rows = self.rows(step)
        per = self.batch_size // n_hosts
        out = []
        for r in range(host * per, (host + 1) * per):
            s = int(rows.source[0, r])
            split = self.sources[s].train
            seq = int(rows.sequence[0, r])
            start = seq * self.seq_len
            tokens = split.tokens(start, start + self.seq_len + 1)
            text = self.tokenizer.decode(tokens.tolist(), skip_special_tokens=False)
            out.append({"row": r, "source": self.sources[s].name, "sequence": seq, "epoch": int(rows.epoch[0, r]),
                        "tokens": [start, start + self.seq_len + 1],
                        "documents": [{"id": d, "start": a, "end": b}
                                      for d, a, b in split.documents_in(start, start + self.seq_len + 1)],
                        "text": text if len(text) <= text_chars else text[:text_chars] + "…"})
        return out


class Prefetcher:
    """Prepares host batches for the next steps on a background thread; records how long the loop waited."""

    def __init__(self, source: DataSource, steps: Sequence[int], host: int = 0, n_hosts: int = 1, depth: int = 4):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.last_wait_s = 0.0

        def work() -> None:
            try:
                for step, batch in source.host_batches(steps, host, n_hosts, block=min(64, 4 * depth)):
                    while not self._stop.is_set():
                        try:
                            self._q.put((step, batch), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
                self._q.put((None, None))
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
            raise batch if batch is not None else StopIteration
        return step, batch

    def close(self) -> None:
        self._stop.set()

