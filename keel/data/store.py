"""Reading a token store (format: docs/data-format.md; `keel.data.build` writes it): the manifest is checked,
the shards are memory-mapped, and a batch of windows from many sources and shards is one numpy gather.

Every read is bounds-checked against the manifest's sizes: a window index outside a split is an IndexError
naming the split and the window, never a read of memory outside the maps. Opening checks sizes, not contents:
`keel.data.verify` compares every file with the manifest's sha256 (`prepare_data` does before a run trains).
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from keel.data.tokenizer import load_tokenizer, tokenizer_hash
from keel.errors import DataError

FORMAT = "keel-token-store"
VERSION = 1
SPLITS = ("train", "heldout")


class Split:
    """One split of a store: shards memory-mapped as one virtual token stream plus global document offsets."""

    def __init__(self, root: Path, meta: dict, dtype: np.dtype):
        self.root = root
        self.shards = []
        for s in meta["shards"]:
            path = root / f"{s['name']}.tok"
            expect = s["tokens"] * dtype.itemsize
            size = path.stat().st_size if path.exists() else -1
            if size != expect:
                raise DataError(f"store shard {path} is {'missing' if size < 0 else f'{size:,} bytes'}, the "
                                f"manifest says {expect:,}: the store is damaged; rebuild it with keel data build")
            # plain ndarray views of the maps: numpy's memmap subclass costs microseconds per indexing call
            self.shards.append(np.asarray(np.memmap(path, dtype=dtype, mode="r")) if expect else np.empty(0, dtype))
        self.shard_starts = np.concatenate([[0], np.cumsum([len(t) for t in self.shards])]).astype(np.int64)
        self.n_tokens = int(self.shard_starts[-1])
        offsets_path = root / "offsets.bin"
        self.offsets = np.asarray(np.memmap(offsets_path, dtype=np.int64, mode="r"))
        if len(self.offsets) != meta["documents"] + 1 or self.offsets[-1] != self.n_tokens:
            raise DataError(f"store index {offsets_path} does not match the manifest; rebuild the store")
        self.n_documents = meta["documents"]

    def windows(self, seq_len: int) -> int:
        """Sequences of seq_len + 1 tokens: window w covers tokens [w seq_len, (w + 1) seq_len + 1)."""
        return max(0, (self.n_tokens - 1) // seq_len)

    @cached_property
    def unigram(self) -> np.ndarray:
        return np.fromfile(self.root / "unigram.bin", dtype=np.int64)

    def _check_tokens(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"tokens [{start}, {stop}) of split {self.root} are outside [0, {self.n_tokens})")

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the virtual stream (crossing shard boundaries if needed)."""
        self._check_tokens(start, stop)
        out = []
        while start < stop:
            s = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
            end = min(stop, int(self.shard_starts[s + 1]))
            out.append(self.shards[s][start - self.shard_starts[s] : end - self.shard_starts[s]])
            start = end
        return np.concatenate(out) if len(out) != 1 else np.array(out[0])

    def locate(self, window_ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each window: (shard, start inside the shard, first_position). shard = -1 for a window that
        crosses into the next shard (rare; `tokens` reads those). Raises IndexError for a window outside
        [0, windows(seq_len)): everything downstream trusts these indices to stay inside the maps."""
        ids = np.asarray(window_ids, dtype=np.int64)
        n = self.windows(seq_len)
        outside = (ids < 0) | (ids >= n)
        if outside.any():
            raise IndexError(f"window {int(ids[outside].flat[0])} of split {self.root} is outside [0, {n}) "
                             f"(windows of seq_len={seq_len})")
        starts = ids * seq_len
        shard = np.searchsorted(self.shard_starts, starts, side="right") - 1
        local = starts - self.shard_starts[shard]
        shard = np.where(local + seq_len + 1 <= self.shard_starts[shard + 1] - self.shard_starts[shard], shard, -1)
        doc = np.searchsorted(self.offsets, starts, side="right") - 1
        return shard, local, (starts - self.offsets[doc]).astype(np.int32)

    def gather(self, window_ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (B, seq_len + 1), first_position (B,)): the windows and each one's offset in its document."""
        return TokenSpace([self], seq_len).gather([np.asarray(window_ids)])

    def documents_in(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(document id, first offset inside it, last offset + 1) for the documents overlapping [start, stop)."""
        self._check_tokens(start, stop)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop - 1, side="right")) - 1
        return [(d, max(start, int(self.offsets[d])) - int(self.offsets[d]),
                 min(stop, int(self.offsets[d + 1])) - int(self.offsets[d])) for d in range(first, last + 1)]


class TokenSpace:
    """The shards of several splits as one strided view of the address space, so that a batch whose rows come
    from many sources and shards is a single numpy gather, written once, in row order.

    The view starts at the lowest shard address and spans to the end of the highest; row i is the
    seq_len + 1 tokens at element i. The view also spans the gaps between mappings, so it is indexed only at
    rows that lie inside one shard: `Split.locate` refuses windows outside a split and sends windows across
    a shard's end to `Split.tokens`, and the splits keep their maps alive.
    """

    def __init__(self, splits: Sequence[Split], seq_len: int):
        self.splits = list(splits)
        self.seq_len = seq_len
        self.width = seq_len + 1
        arrays = [t for sp in self.splits for t in sp.shards if len(t)]
        if not arrays:
            raise DataError("no tokens to read")
        self.dtype = arrays[0].dtype
        item = self.dtype.itemsize
        base = min(t.ctypes.data for t in arrays)
        end = max(t.ctypes.data + t.nbytes for t in arrays)
        flat = np.frombuffer((ctypes.c_char * (end - base)).from_address(base), dtype=self.dtype)
        flat.flags.writeable = False
        self._flat = flat
        self.view = np.lib.stride_tricks.sliding_window_view(flat, self.width) if len(flat) >= self.width else None
        # element offset of every shard of every split inside the view
        self.origin = [np.array([(t.ctypes.data - base) // item if len(t) else 0 for t in sp.shards], np.int64)
                       for sp in self.splits]

    def gather(self, window_ids: Sequence[np.ndarray],
               which: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Windows of several splits: `window_ids[k]` of split k; with `which` (split per output row, any
        shape), window_ids[k] lists split k's windows in the order of `which == k`. Returns (tokens
        which.shape + (seq_len + 1,), first_position which.shape)."""
        if len(window_ids) != len(self.splits):
            raise ValueError(f"{len(window_ids)} lists of window ids for {len(self.splits)} splits")
        which = np.zeros(len(window_ids[0]), np.int64) if which is None else np.asarray(which)
        if which.size and (which.min() < 0 or which.max() >= len(self.splits)):
            raise IndexError(f"split index outside [0, {len(self.splits)}) in `which`")
        index = np.zeros(which.shape, dtype=np.int64)
        first = np.empty(which.shape, dtype=np.int32)
        cross = []
        for k, ids in enumerate(window_ids):
            ids = np.asarray(ids, dtype=np.int64)
            at = which == k
            if int(at.sum()) != ids.size:
                raise ValueError(f"split {self.splits[k].root}: {ids.size} window ids for {int(at.sum())} rows")
            if not ids.size:
                continue
            shard, local, first[at] = self.splits[k].locate(ids, self.seq_len)
            index[at] = np.where(shard >= 0, self.origin[k][shard] + local, 0)
            if (shard < 0).any():
                cross.append((k, np.flatnonzero(at.ravel())[shard < 0], ids[shard < 0]))
        tokens = self.view[index] if self.view is not None else np.empty(which.shape + (self.width,), self.dtype)
        flat_tokens = tokens.reshape(-1, self.width)
        for k, rows, ids in cross:
            for r, w in zip(rows, ids, strict=True):
                flat_tokens[r] = self.splits[k].tokens(int(w) * self.seq_len, int(w) * self.seq_len + self.width)
        return tokens, first


def read_manifest(path: str | Path) -> dict:
    """The manifest of the store at `path`; a missing, unreadable or foreign one is a DataError saying why."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        hint = ("an interrupted build: rerun the same keel data build command to finish it"
                if (path / "build").exists() else "build one with keel data build")
        raise DataError(f"{path} is not a complete token store (no manifest.json): {hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{manifest_path} is not valid JSON ({e}); rebuild the store") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{manifest_path}: not a {FORMAT} v{VERSION} manifest")
    return manifest


class TokenStore:
    """An opened store: manifest, tokenizer and memory-mapped splits. Any mismatch with the manifest is a
    DataError naming the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.fingerprint: str = self.manifest["fingerprint"]
        self.dtype = np.dtype(self.manifest["dtype"])
        tk = self.manifest["tokenizer"]
        self.pad_id, self.bos_id, self.eos_id = tk["pad"], tk["bos"], tk["eos"]
        self.splits = {name: Split(self.path / name, meta, self.dtype)
                       for name, meta in self.manifest["splits"].items()}

    @cached_property
    def tokenizer(self) -> Tokenizer:
        tok = load_tokenizer(self.path / self.manifest["tokenizer"]["file"], what="store tokenizer", error=DataError)
        if tokenizer_hash(tok) != self.manifest["tokenizer"]["sha256"]:
            raise DataError(f"{self.path}/tokenizer.json does not match the manifest's tokenizer hash")
        return tok

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(f"store {self.path} has no {name!r} split (it has: {', '.join(self.splits)}); "
                            f"build it with --heldout-fraction > 0 for a held-out split")
        return self.splits[name]
