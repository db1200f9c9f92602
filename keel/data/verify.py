"""Store integrity: every file of a token store checked against the sha256 its manifest records.

What is checked: each shard's tokens (`SPLIT/shard-N.tok`, a sha256 in every manifest), in stores built since
keel recorded them each split's `offsets.bin` and `unigram.bin` (`splits.SPLIT.index`), and `tokenizer.json`
(the manifest's `tokenizer.sha256` is a hash of the loaded tokenizer, not of the file's bytes).

When: `prepare_data` verifies every store a run opens before the run is built on it, so a mismatch stops
`keel train` (and `keel data inspect | stats`) before step 0 with a DataError (exit 4) naming the file and both
hashes. `keel data verify STORE` re-reads every file on demand, whatever was verified before.

Bounded cost: a file is hashed once per content. A verified file is recorded in a small JSON file,
`<data.cache_dir or run_dir/data>/verified/<key of the store's path>.json`, with its size, mtime, ctime, inode
and hash; next time (a restart, another run sharing the cache dir) a file whose four stat values and manifest
hash are unchanged is not read again. The record lives beside the run's data cache, never inside the store
(which may be read-only or shared). ctime and inode make it stricter than size + mtime: a write that restores
the mtime still changes the ctime, and a copy of the store (`cp -a`, `rsync`) has new inodes, so a copied store
is verified again: copies are where bits get lost. sha256 runs at ~1.4-2 GB/s per core (SHA-NI) and files are
hashed by `jobs` threads, so the first check of a 100 GB store takes about a minute on 8 cores, or what the
disk needs to read it.

What this cannot catch: bits that rot on the medium after a file was verified, without any write through the
filesystem (no stat value changes): run `keel data verify` (which ignores the record) after a disk incident or
on a schedule; and corruption after the check (in the page cache or memory while training).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keel.data.tokenizer import load_tokenizer, tokenizer_hash
from keel.errors import DataError

RECORD_VERSION = 1
INVALID = "not a valid tokenizer.json"


@dataclass(frozen=True)
class Expected:
    """One file of a store as its manifest describes it."""

    split: str  # "" for a file of the whole store
    file: str  # relative to the store root, e.g. "train/shard-00000.tok"
    sha256: str
    size: int  # -1: the manifest does not say


@dataclass(frozen=True)
class FileCheck:
    """The result of checking one file: `actual` is "" for a missing file; `cached`: not re-read, its record
    (same stat values, same expected hash) says it matched."""

    expected: Expected
    actual: str
    size: int  # bytes on disk, -1 if missing
    cached: bool = False
    stat_key: tuple[int, ...] = ()  # (size, mtime_ns, ctime_ns, inode) before the read: what the record keeps
    note: str = ""  # why a file could not be hashed (a tokenizer.json that does not load)

    @property
    def ok(self) -> bool:
        return self.actual == self.expected.sha256

    @property
    def status(self) -> str:
        if self.ok:
            return "ok (unchanged since verified)" if self.cached else "ok"
        if self.size < 0:
            return "MISSING"
        if self.expected.size >= 0 and self.size != self.expected.size:
            return f"SIZE {self.size:,} bytes, manifest {self.expected.size:,}"
        return f"SHA256 {self.actual[:16]}…" if self.actual != INVALID else "NOT A VALID TOKENIZER"


def expected_files(manifest: dict) -> list[Expected]:
    """Every file of the store that its manifest holds a sha256 for, splits and shards in manifest order."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    out = [Expected("", manifest["tokenizer"]["file"], manifest["tokenizer"]["sha256"], -1)]
    for split, meta in manifest["splits"].items():
        for s in meta["shards"]:
            out.append(Expected(split, f"{split}/{s['name']}.tok", s["sha256"], s["tokens"] * itemsize))
        sizes = {"offsets.bin": 8 * (meta["documents"] + 1), "unigram.bin": 8 * manifest["vocab_size"]}
        for name, digest in meta.get("index", {}).items():
            out.append(Expected(split, f"{split}/{name}", digest, sizes[name]))
    return out


def unhashed_files(manifest: dict) -> list[str]:
    """Index files this store's manifest has no hash for (a store built before keel recorded them)."""
    return [f"{split}/{name}" for split, meta in manifest["splits"].items() if "index" not in meta
            for name in ("offsets.bin", "unigram.bin")]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tokenizer_digest(path: Path) -> tuple[str, str]:
    """(the tokenizer's hash, "") or (INVALID, why)."""
    try:
        return tokenizer_hash(load_tokenizer(path, what="store tokenizer", error=DataError)), ""
    except DataError as e:
        return INVALID, str(e)


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def record_path(cache_dir: Path, store: Path) -> Path:
    """Where the verification record of the store at `store` lives under `cache_dir`."""
    key = hashlib.sha256(str(store.resolve()).encode()).hexdigest()[:16]
    return cache_dir / "verified" / f"{key}.json"


def _read_record(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged record only costs a re-hash
    return record.get("files", {}) if isinstance(record, dict) and record.get("version") == RECORD_VERSION else {}


def _write_record(path: Path, store: Path, files: dict) -> None:
    """Atomically (a unique temporary name: hosts sharing the cache dir may write at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"version": RECORD_VERSION, "store": str(store.resolve()), "files": files}, f, indent=1)
    os.replace(tmp, path)


def verify_store(root: str | Path, manifest: dict, *, known: dict | None = None, jobs: int = 0) -> list[FileCheck]:
    """Check every file of `expected_files(manifest)` under `root`: hash it, unless `known` (the files of a
    verification record) holds it with the same stat values and the same expected hash. `jobs` threads hash
    (default: one per core, up to 8; hashlib releases the GIL)."""
    root = Path(root)
    known = known or {}
    expected = expected_files(manifest)

    def check(e: Expected) -> FileCheck:
        path = root / e.file
        try:
            st = path.stat()
        except FileNotFoundError:
            return FileCheck(e, "", -1)
        key = _stat_key(st)  # taken before the read: a write during the read leaves a key that no longer matches
        seen = known.get(e.file, {})
        if tuple(seen.get("stat", ())) == key and seen.get("sha256") == e.sha256:
            return FileCheck(e, e.sha256, st.st_size, cached=True, stat_key=key)
        digest, note = _tokenizer_digest(path) if e.file == manifest["tokenizer"]["file"] else (file_sha256(path), "")
        return FileCheck(e, digest, st.st_size, stat_key=key, note=note)

    workers = jobs or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, min(workers, len(expected)))) as pool:
        return list(pool.map(check, expected))


def mismatch_error(root: Path, checks: Sequence[FileCheck]) -> DataError | None:
    """A DataError naming every file that does not match the manifest (expected and actual hash), or None."""
    bad = [c for c in checks if not c.ok]
    if not bad:
        return None
    lines = []
    for c in bad:
        path = root / c.expected.file
        if c.size < 0:
            lines.append(f"{path} is missing (manifest sha256 {c.expected.sha256})")
        elif c.note:
            lines.append(c.note)
        else:
            lines.append(f"{path}: sha256 {c.actual}, the manifest says {c.expected.sha256}"
                         + (f" ({c.size:,} bytes, the manifest says {c.expected.size:,})"
                            if c.expected.size >= 0 and c.size != c.expected.size else ""))
    return DataError(f"store {root} is corrupt: {len(bad)} of {len(checks)} files do not match its manifest:\n  "
                     + "\n  ".join(lines)
                     + "\nrebuild the store (keel data build ... --force) or restore it from a good copy")


def check_store(root: Path, manifest: dict, cache_dir: Path | None, log: Callable[[str], None] = print,
                jobs: int = 0) -> list[FileCheck]:
    """Verify a store before a run trains on it (using and updating the record under `cache_dir`); a mismatch
    raises the DataError of `mismatch_error`. Logs one line: what was hashed, how fast, or that nothing changed."""
    record = record_path(cache_dir, root) if cache_dir is not None else None
    known = _read_record(record)
    t0 = time.perf_counter()
    checks = verify_store(root, manifest, known=known, jobs=jobs)
    good = {c.expected.file: {"stat": list(c.stat_key), "sha256": c.actual} for c in checks if c.ok}
    if record is not None and good != known:
        try:
            _write_record(record, root, good)
        except OSError as e:  # a read-only cache dir: verification still happens, every time
            log(f"data: cannot keep a verification record at {record} ({e}); every run will re-hash {root}")
    if (error := mismatch_error(root, checks)) is not None:
        raise error
    hashed = [c for c in checks if not c.cached]
    if hashed:
        mb = sum(c.size for c in hashed) / 1e6
        dt = time.perf_counter() - t0
        log(f"data: verified {len(hashed)} files ({mb:,.1f} MB) of {root} against its manifest in {dt:.2f}s"
            + (f" ({mb / dt:,.0f} MB/s)" if dt > 0 and mb > 1 else "")
            + (f"; {len(checks) - len(hashed)} unchanged since verified" if len(hashed) < len(checks) else ""))
    else:
        log(f"data: {root}: all {len(checks)} files unchanged since verified ({record})")
    return checks
