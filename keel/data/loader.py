"""Serving training data: `DataSource.global_batch(step)` and a host's rows of it, from opened token stores.

The batch at step N is a pure function of (data config, seed, N) (docs/design.md, invariant 1); the math is in
`keel.data.order`: a mixture of sources (token stores), exact rows per source in every batch, a keyed
O(1)-memory shuffle of each source's sequences per epoch, and the rows of sources shuffled inside the batch.
Restarts, prefetch depth and host count never change it; host h of H takes rows [h B/H, (h+1) B/H).

A host batch is {"tokens": (rows, seq_len + 1) uint16/uint32, "first_position": (rows,) int32}; the train step
expands it into inputs, targets, segment ids, positions and loss mask (`keel.data.pack.expand`).
Opening or building the stores is `keel.data.prepare.prepare_data`; looking at the data is `keel.data.inspect`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from keel.config import Config
from keel.data.order import MixturePlan, Rows, SampleOrder
from keel.data.pack import Batch
from keel.data.store import Split, TokenSpace, TokenStore
from keel.errors import ConfigError, DataError

ORDER_VERSION = 2


@dataclass(frozen=True)
class Source:
    """One opened source of the mixture: its store and its share of the batch."""

    name: str
    store: TokenStore
    weight: float
    max_epochs: float

    @property
    def train(self) -> Split:
        return self.store.split("train")


class DataSource:
    """The run's sample order over opened sources: batches by step, held-out sets, and what a step consumed.

    Construction reads no token and builds nothing (`prepare_data` does that); it checks that the sources fit
    the config (one tokenizer, at least one sequence of data.seq_len per split, a valid mixture)."""

    def __init__(self, cfg: Config, sources: Sequence[Source]):
        d = cfg.data
        self.cfg = cfg
        self.seq_len = d.seq_len
        self.batch_size = cfg.train.batch_size
        self.sources = list(sources)
        first = self.sources[0].store
        for s in self.sources[1:]:  # special ids and decoding come from the first store: they must be everyone's
            if s.store.manifest["tokenizer"]["sha256"] != first.manifest["tokenizer"]["sha256"]:
                raise ConfigError(f"data.sources: {s.name!r} ({s.store.path}) and {self.sources[0].name!r} "
                                  f"({first.path}) were built with different tokenizers")
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
        self.space = TokenSpace([s.train for s in self.sources], self.seq_len)
        self.description = {
            "order_version": ORDER_VERSION, "seq_len": self.seq_len, "batch_size": self.batch_size, "seed": d.seed,
            "sources": {s.name: {"store": s.store.fingerprint, "weight": s.weight} for s in self.sources},
            "mixture_schedule": [[c.step, dict(sorted(c.weights.items()))] for c in d.mixture_schedule],
        }
        self.fingerprint = hashlib.sha256(json.dumps(self.description, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer every source was built with (loaded, and checked against the manifest, on first use)."""
        return self.sources[0].store.tokenizer

    # ------------------------------------------------------------------------------------------ batches

    def rows(self, steps: np.ndarray | Sequence[int] | int) -> Rows:
        """The rows of the global batches at `steps`, (K, B) arrays (see `SampleOrder.rows`)."""
        return self.order.rows(steps)

    def _gather(self, rows: Rows, sel: slice) -> tuple[np.ndarray, np.ndarray]:
        """tokens (K, n, seq_len + 1) and first positions (K, n) of rows `sel` of K steps: one gather."""
        source, sequence = rows.source[:, sel], rows.sequence[:, sel]
        return self.space.gather([sequence[source == s] for s in range(len(self.sources))], source)

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

