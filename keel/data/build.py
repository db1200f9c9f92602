"""`keel data build`: text, jsonl and parquet files in, a token store out (format: docs/data-format.md;
`keel.data.store` reads it).

A build has three stages, each deterministic and restartable, each parallel over its own units:

1. tokenize: every input file -> a chunk (its documents as `<bos> ids <eos>` token runs + offsets + a report
   of bad input). Unit: one input file; worker w of N takes files w, w + N, ...
2. shard: every document gets a 64-bit key from (its file's content hash, its index in the file); the key
   decides its split (train / held-out), its output shard and its place inside the shard (sorted by key), so
   neighbours in the store are unrelated documents. Unit: one output shard.
3. merge: global document offsets per split, unigram counts, the manifest. The manifest is written last and
   atomically: a store without one is incomplete, and rerunning the build finishes it.

Every file is written to a temporary name and renamed, so an interrupted build never leaves a file that looks
complete; rerunning skips the units already done, and only those: a chunk remembers its file's content hash,
path, tokenizer and text field, a shard what it was made from, so a unit left by an interrupted build of other
inputs is redone, never reused. The result does not depend on the number of workers.

Building into a complete store compares the command with its manifest (`store_difference`: settings, a given
tokenizer, and the input files, which the manifest lists with size, mtime and sha256). The same inputs are a
no-op that says so (a file whose mtime alone changed is re-hashed, never re-tokenized); others are refused with
the difference (DataError, exit 4), or with `force` built in a sibling directory and swapped in by one
rename (`swap_directories`).

Bad input never ends a build: it is counted per file and kind (`BAD_KINDS`) in the manifest, a damaged file
(a truncated .gz/.zst, a zero-byte or broken .parquet) once, as `unreadable`, keeping the documents read before
the break; under --strict the first one is a DataError naming FILE:LINE (or FILE:row N, or FILE).
`write_store` writes a store from token arrays (tests, benchmarks) through the same manifest writer.
"""

from __future__ import annotations

import ctypes
import glob
import gzip
import hashlib
import json
import math
import os
import shutil
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models
from tqdm import tqdm

from keel.data.order import mix64
from keel.data.store import FORMAT, SPLITS, VERSION, TokenStore, read_manifest
from keel.data.tokenizer import BOS, EOS, PAD, load_tokenizer, special_ids, tokenizer_hash, train_bpe
from keel.errors import ConfigError, DataError
from keel.io import atomic_write

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
# unreadable: the file could not be read to its end (a truncated or corrupt .gz/.zst, a zero-byte or broken
# .parquet): counted once per file, the documents read before the break are kept. unencodable: a JSON string with
# a lone surrogate ("\ud800"), which no UTF-8 tokenizer can take.
BAD_KINDS = ("malformed_json", "missing_field", "not_utf8", "empty", "unreadable", "unencodable")
DEFAULT_SHARD_TOKENS = 1 << 28


# ------------------------------------------------------------------------------------------------- inputs


@dataclass
class FileReport:
    """What one input file gave: documents, and bad input counted per kind with the first few places."""

    documents: int = 0
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_KINDS, 0))
    examples: list[str] = field(default_factory=list)

    def flag(self, kind: str, where: str, strict: bool, detail: str = "") -> None:
        said = f"{kind.replace('_', ' ')}" + (f" ({detail})" if detail else "")
        if strict:
            raise DataError(f"{where}: {said} (--strict)")
        self.bad[kind] += 1
        if len(self.examples) < 3:
            self.examples.append(f"{where}: {said}")


def _zstd_blocks(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a .zst file, frame after frame. A file that ends inside a frame raises EOFError
    (the zstandard stream reader returns the truncated data without a word)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    frame, inside = dctx.decompressobj(), False
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            while block:
                if data := frame.decompress(block):
                    yield data
                inside = not frame.eof
                block = frame.unused_data if frame.eof else b""
                if frame.eof:
                    frame = dctx.decompressobj()
    if inside:
        raise EOFError("the zstd stream ended inside a frame (a truncated file)")


def _split_lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for block in blocks:
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _open_lines(path: Path) -> Iterator[bytes]:
    """The lines of a (compressed) JSONL file. A truncated or corrupt compressed file raises EOFError, OSError,
    zlib.error or zstandard.ZstdError after its last complete line (never a partial line)."""
    name = path.name
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield from f
    elif name.endswith(".zst"):
        yield from _split_lines(_zstd_blocks(path))
    else:
        with open(path, "rb") as f:
            yield from f


def _read_errors(path: Path) -> tuple[type[BaseException], ...]:
    """What reading a damaged input file raises; counted as `unreadable` (or, under --strict, a DataError)."""
    errors: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
    if path.name.endswith(".zst"):
        import zstandard

        errors += (zstandard.ZstdError,)
    if path.name.endswith(".parquet"):
        import pyarrow as pa

        errors += (pa.ArrowException,)
    return errors


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def read_documents(path: Path, text_field: str, report: FileReport, strict: bool) -> Iterator[str]:
    """The documents of one input file: a .jsonl(.gz/.zst) line, a .parquet row, or a whole text file. Bad
    input is flagged in `report` (under `strict`: a DataError naming FILE:LINE); it never ends the build."""
    name = path.name
    if name.endswith(JSONL_SUFFIXES):
        lineno = 0
        try:
            for lineno, raw in enumerate(_open_lines(path), 1):
                if (text := _json_document(raw, f"{path}:{lineno}", text_field, report, strict)) is not None:
                    yield text
        except _read_errors(path) as e:
            report.flag("unreadable", f"{path}:{lineno + 1}", strict, _why(e))
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        row = 0
        try:
            pf = pq.ParquetFile(path)
            if text_field not in pf.schema_arrow.names:
                report.flag("missing_field", f"{path} (no column {text_field!r}; columns: {pf.schema_arrow.names})",
                            strict)
                return
            for batch in pf.iter_batches(columns=[text_field]):
                for text in batch.column(0).to_pylist():
                    row += 1
                    where = f"{path}:row {row}"
                    if not isinstance(text, str):
                        report.flag("missing_field", where, strict)
                    elif not text.strip():
                        report.flag("empty", where, strict)
                    else:
                        yield text
        except _read_errors(path) as e:
            report.flag("unreadable", f"{path}:row {row + 1}" if row else str(path), strict, _why(e))
    else:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            report.flag("not_utf8", f"{path}: byte {e.start}", strict)
            return
        if not text.strip():
            report.flag("empty", str(path), strict)
        else:
            yield text


def _json_document(raw: bytes, where: str, text_field: str, report: FileReport, strict: bool) -> str | None:
    """The text of one JSONL line, or None (a blank line, or bad input flagged in `report`)."""
    if not raw.strip():
        return None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        report.flag("not_utf8", where, strict)
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        report.flag("malformed_json", where, strict)
        return None
    text = obj.get(text_field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        report.flag("missing_field", f"{where} (field {text_field!r})", strict)
        return None
    if not text.strip():
        report.flag("empty", where, strict)
        return None
    if b"\\u" in raw:  # only a \uXXXX escape can give a lone surrogate: valid UTF-8 bytes never decode to one
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            report.flag("unencodable", where, strict, f"lone surrogate {text[e.start]!r} at character {e.start}")
            return None
    return text


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files matching the globs (recursive `**`), sorted and unique: the build's file order."""
    files: set[str] = set()
    for p in patterns:
        matched = [m for m in glob.glob(p, recursive=True) if os.path.isfile(m)]
        if not matched:
            raise ConfigError(f"input {p!r} matches no files")
        files.update(os.path.abspath(m) for m in matched)
    return [Path(f) for f in sorted(files)]


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes: it seeds the file's document keys, so a renamed or moved file keeps them."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def document_keys(content_hash: str, n: int) -> np.ndarray:
    """64-bit keys of a file's documents: they decide split, shard and order, independent of file paths."""
    base = np.uint64(int(content_hash[:16], 16))
    return mix64(mix64(np.arange(n, dtype=np.uint64) + base))


def heldout_mask(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents are held out: the top 53 bits of the key as a uniform number in [0, 1) below `fraction`."""
    return (keys >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


# ------------------------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BuildSpec:
    inputs: tuple[str, ...]
    out: str
    tokenizer: str = ""  # a tokenizer.json; empty: train a byte-level BPE of `vocab_size` on the train split
    vocab_size: int = 4096
    text_field: str = "text"
    heldout_fraction: float = 0.0
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    strict: bool = False


def _dtype_for(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.uint32)


def _save_array(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, np.ascontiguousarray(arr).tobytes())


def _chunk_dir(out: Path) -> Path:
    return out / "build" / "chunks"


_TOKENIZER_CACHE: dict[str, Tokenizer] = {}


def _tokenizer_in_worker(path: str) -> Tokenizer:
    tok = _TOKENIZER_CACHE.get(path)
    if tok is None:
        tok = _TOKENIZER_CACHE[path] = load_tokenizer(path, what="store tokenizer", error=DataError)
        tok.encode_special_tokens = True  # "<bos>" written in a document is text, not a document boundary
    return tok


def _tokenize_file(index: int, path: str, spec: BuildSpec, tokenizer_path: str, tok_hash: str) -> dict:
    """Stage 1 for one file: chunk tokens, document offsets and a report; returns the report."""
    chunks = _chunk_dir(Path(spec.out))
    report_path = chunks / f"{index:07d}.json"
    st = os.stat(path)  # before hashing: a file changed meanwhile then looks changed to the next rebuild's check
    digest = file_hash(Path(path))
    if report_path.exists():
        done = json.loads(report_path.read_text())
        # reused only if made from this file, with these settings (a chunk that skipped bad input is redone
        # under --strict, which must stop at it)
        if (done["sha256"] == digest and done["tokenizer"] == tok_hash and done["input"] == path
                and done.get("text_field") == spec.text_field and not (spec.strict and any(done["bad"].values()))):
            if (done.get("bytes"), done.get("mtime_ns")) != (st.st_size, st.st_mtime_ns):
                done |= {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
                atomic_write(report_path, json.dumps(done))
            return done
    tok = _tokenizer_in_worker(tokenizer_path)
    _, bos, eos = special_ids(tok)
    report = FileReport()
    dtype = _dtype_for(tok.get_vocab_size())
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    texts = list(read_documents(Path(path), spec.text_field, report, spec.strict))
    for start in range(0, len(texts), 1024):
        for enc in tok.encode_batch(texts[start : start + 1024], add_special_tokens=False):
            ids = np.empty(len(enc.ids) + 2, dtype=dtype)
            ids[0], ids[1:-1], ids[-1] = bos, enc.ids, eos
            pieces.append(ids)
            lengths.append(len(ids))
    report.documents = len(lengths)
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    _save_array(chunks / f"{index:07d}.tok", tokens)
    _save_array(chunks / f"{index:07d}.idx", offsets)
    result = {"index": index, "input": path, "sha256": digest, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
              "tokenizer": tok_hash, "text_field": spec.text_field, "documents": report.documents,
              "tokens": int(tokens.size), "bad": report.bad, "examples": report.examples}
    atomic_write(report_path, json.dumps(result))
    return result


@dataclass(frozen=True)
class _Chunk:
    index: int
    sha256: str
    documents: int
    tokens: int
    tokenizer: str = ""


def _plan_shards(chunks: list[_Chunk], spec: BuildSpec) -> dict[str, int]:
    """Output shards per split, from token totals alone (known before any document key is computed)."""
    total = sum(c.tokens for c in chunks)
    held = total * spec.heldout_fraction
    return {"train": max(1, math.ceil((total - held) / spec.shard_tokens)),
            "heldout": max(1, math.ceil(held / spec.shard_tokens)) if spec.heldout_fraction > 0 else 0}


def _shard_of(keys: np.ndarray, n_shards: int) -> np.ndarray:
    return (mix64(keys ^ np.uint64(0x5EED)) % np.uint64(n_shards)).astype(np.int64)


def _write_shard(split: str, shard: int, n_shards: int, chunks: list[_Chunk], spec: BuildSpec,
                 vocab: int, made_from: str) -> dict:
    """Stage 2 for one output shard: gather its documents from every chunk, in key order."""
    out = Path(spec.out) / split
    name = f"shard-{shard:05d}"
    meta_path = out / f"{name}.json"
    if meta_path.exists():  # done, unless by an interrupted build of other inputs or settings
        meta = json.loads(meta_path.read_text())
        if meta.get("made_from") == made_from:
            return meta
    dtype = _dtype_for(vocab)
    picked = []  # (keys, chunk index, doc starts, doc ends)
    for c in chunks:
        if not c.documents:
            continue
        keys = document_keys(c.sha256, c.documents)
        held = heldout_mask(keys, spec.heldout_fraction)
        sel = (held if split == "heldout" else ~held) & (_shard_of(keys, n_shards) == shard)
        if sel.any():
            offsets = np.fromfile(_chunk_dir(Path(spec.out)) / f"{c.index:07d}.idx", dtype=np.int64)
            picked.append((keys[sel], np.full(int(sel.sum()), c.index), offsets[:-1][sel], offsets[1:][sel]))
    if picked:
        keys, which, starts, ends = (np.concatenate(x) for x in zip(*picked, strict=True))
    else:
        keys = which = starts = ends = np.empty(0, np.int64)
    order = np.lexsort((which, keys))  # by key; identical files (same keys) by file order
    lengths = (ends - starts)[order]
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    at = 0
    maps: dict[int, np.ndarray] = {}
    for i in order:
        c = int(which[i])
        if c not in maps:
            maps[c] = np.memmap(_chunk_dir(Path(spec.out)) / f"{c:07d}.tok", dtype=dtype, mode="r")
        n = int(ends[i] - starts[i])
        tokens[at : at + n] = maps[c][starts[i] : ends[i]]
        at += n
    out.mkdir(parents=True, exist_ok=True)
    _save_array(out / f"{name}.tok", tokens)
    _save_array(out / f"{name}.len", lengths.astype(np.int64))
    _save_array(out / f"{name}.unigram", np.bincount(tokens, minlength=vocab).astype(np.int64))
    meta = {"name": name, "documents": int(lengths.size), "tokens": int(tokens.size),
            "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(), "made_from": made_from}
    atomic_write(meta_path, json.dumps(meta))
    return meta


def _shard_source(chunks: list[_Chunk], spec: BuildSpec, n_shards: int, vocab: int) -> str:
    """What a shard is made from (every chunk's content and tokenizer, the split settings): a shard written by
    an interrupted build of other inputs is redone, never reused."""
    record = [[(c.index, c.sha256, c.documents, c.tokens, c.tokenizer) for c in chunks],
              spec.heldout_fraction, n_shards, vocab]
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:16]


def _run(fn: Callable, jobs: list[tuple], n_procs: int, desc: str, progress: bool) -> list:
    """fn(*args) for every job, in order, in `n_procs` spawned processes (spawn: no forked JAX or threads)."""
    bar = tqdm(total=len(jobs), desc=desc, unit="file" if "tokenize" in desc else "shard",
               disable=not progress, dynamic_ncols=True)
    results = []
    try:
        if n_procs <= 1 or len(jobs) <= 1:
            for args in jobs:
                results.append(fn(*args))
                bar.update(1)
        else:
            with ProcessPoolExecutor(n_procs, mp_context=get_context("spawn")) as pool:
                for r in pool.map(fn, *zip(*jobs, strict=True), chunksize=max(1, len(jobs) // (8 * n_procs))):
                    results.append(r)
                    bar.update(1)
    finally:
        bar.close()
    return results


def _prepare_tokenizer(spec: BuildSpec, files: list[Path], log: Callable[[str], None]) -> Path:
    """The store's tokenizer.json: a copy of the given one, or a BPE trained on the train-split documents."""
    out = Path(spec.out)
    target = out / "tokenizer.json"
    if spec.tokenizer:
        text = load_tokenizer(spec.tokenizer, what="--tokenizer").to_str()
        if not target.exists() or target.read_text() != text:
            atomic_write(target, text)
        return target
    if target.exists():
        return target
    texts = []
    for path in files:
        docs = list(read_documents(path, spec.text_field, FileReport(), strict=spec.strict))
        held = heldout_mask(document_keys(file_hash(path), len(docs)), spec.heldout_fraction)
        texts.extend(d for d, h in zip(docs, held, strict=True) if not h)
    tok = train_bpe(texts, spec.vocab_size)
    log(f"data build: trained a byte-level BPE of {tok.get_vocab_size()} tokens on {len(texts):,} documents")
    atomic_write(target, tok.to_str())
    return target


def build_store(spec: BuildSpec, *, stage: str = "all", worker: int = 0, workers: int = 1, jobs: int = 1,
                progress: bool = True, log: Callable[[str], None] = print, force: bool = False) -> Path:
    """Build (or finish building) the store `spec.out`; see the module docstring for the stages.

    Into a complete store: the same inputs and settings are a no-op that says so; others are refused with the
    difference (DataError, exit 4), or with `force` built next to it and swapped in."""
    out = Path(spec.out)
    if force and out.exists():
        return _rebuild_and_swap(spec, stage=stage, workers=workers, jobs=jobs, progress=progress, log=log)
    if (out / "manifest.json").exists():
        files = expand_inputs(spec.inputs)
        difference, touched = store_difference(spec, read_manifest(out), files)
        if difference:
            raise DataError(f"{out} already holds a store built from other inputs or settings:\n  "
                            + "\n  ".join(difference)
                            + "\nrebuild it with --force (built next to it, then swapped in), or use another --out")
        log(f"data build: {out} is up to date: the same {len(files)} input files"
            + (f" ({touched} touched, re-hashed: same content)" if touched else "")
            + " and settings as its manifest; nothing to do (--force rebuilds it)")
        return out
    # Mistakes in the command line are config errors (exit 2) naming the flag; problems of the data, exit 4.
    if not 0 <= worker < workers:
        raise ConfigError(f"--worker {worker} must be in [0, --workers {workers})")
    if not 0.0 <= spec.heldout_fraction < 1.0:
        raise ConfigError(f"--heldout-fraction {spec.heldout_fraction} must be in [0, 1)")
    if not spec.tokenizer and (stage != "all" or workers > 1) and not (out / "tokenizer.json").exists():
        raise ConfigError("a multi-worker or staged build needs --tokenizer (training a BPE needs every "
                          "document on one machine)")
    files = expand_inputs(spec.inputs)
    tokenizer_path = _prepare_tokenizer(spec, files, log)
    tok = load_tokenizer(tokenizer_path, what="store tokenizer", error=DataError)
    tok_hash = tokenizer_hash(tok)
    _chunk_dir(out).mkdir(parents=True, exist_ok=True)
    if stage in ("tokenize", "all"):
        mine = [(i, str(f), spec, str(tokenizer_path), tok_hash) for i, f in enumerate(files) if i % workers == worker]
        _run(_tokenize_file, mine, jobs, "tokenize", progress)
        if stage == "tokenize":
            return out
    reports = _chunk_reports(out, files, spec, tok_hash)
    chunks = [_Chunk(r["index"], r["sha256"], r["documents"], r["tokens"], r["tokenizer"]) for r in reports]
    vocab = tok.get_vocab_size()
    plan = _plan_shards(chunks, spec)
    made_from = {split: _shard_source(chunks, spec, n, vocab) for split, n in plan.items()}
    if stage in ("shard", "all"):
        units = [(split, s, n, chunks, spec, vocab, made_from[split]) for split, n in plan.items() for s in range(n)]
        _run(_write_shard, [u for i, u in enumerate(units) if i % workers == worker], jobs, "shard", progress)
        if stage == "shard":
            return out
    _merge(out, spec, reports, plan, made_from, tok, log)
    return out


# ------------------------------------------------------------------------------------- rebuilding a store


def store_difference(spec: BuildSpec, manifest: dict, files: list[Path]) -> tuple[list[str], int]:
    """How building `spec` from `files` differs from the store of `manifest`: (lines naming each difference, empty
    when there is none; how many files had to be re-hashed). An input whose size and mtime match the manifest's
    record is taken as unchanged without reading it; one whose mtime alone changed is re-hashed (and counted
    in the second value when its content is the same)."""
    lines = []
    old_build, new_build = manifest.get("build", {}), _spec_record(spec)
    for key in sorted(set(old_build) | set(new_build)):
        if old_build.get(key) != new_build.get(key):
            lines.append(f"setting {key}: {_setting(key, old_build.get(key))} -> {_setting(key, new_build.get(key))}")
    if spec.tokenizer:
        wanted = tokenizer_hash(load_tokenizer(spec.tokenizer, what="--tokenizer"))
        if wanted != manifest["tokenizer"]["sha256"]:
            lines.append(f"tokenizer: {manifest['tokenizer']['sha256']} -> {wanted} ({spec.tokenizer})")
    recorded = manifest.get("inputs", {}).get("by_file")
    if recorded is None:
        lines.append("inputs: the manifest does not list its input files (a store written before keel recorded "
                     "them, or by write_store), so keel cannot tell whether they are the same")
        return lines, 0
    now = {str(f): f for f in files}
    added = sorted(set(now) - set(recorded))
    removed = sorted(set(recorded) - set(now))
    changed, touched = [], 0
    for name in sorted(set(now) & set(recorded)):
        old, st = recorded[name], now[name].stat()
        if old.get("bytes") != st.st_size:
            changed.append(name)
        elif old.get("mtime_ns") != st.st_mtime_ns:
            if file_hash(now[name]) != old["sha256"]:
                changed.append(name)
            else:
                touched += 1
    for what, names in (("added", added), ("removed", removed), ("changed", changed)):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            lines.append(f"{what} {len(names)} input file{'s' if len(names) > 1 else ''}: {shown}")
    return lines, touched


def _setting(key: str, value: object) -> str:
    return "(a given --tokenizer)" if key == "vocab_size" and value is None else repr(value)


def _rebuild_and_swap(spec: BuildSpec, *, stage: str, workers: int, jobs: int, progress: bool,
                      log: Callable[[str], None]) -> Path:
    """--force: build the store in a fresh sibling directory, then exchange it with the old one in one step and
    delete the old one. Until the exchange, readers see the old store; after it, the new one (a process that
    has the old shards mapped keeps reading them)."""
    out = Path(spec.out)
    if stage != "all" or workers != 1:
        raise ConfigError("--force rebuilds on one machine (--stage all, --workers 1); for a multi-machine build, "
                          "build into a new --out and switch your configs to it")
    staging = out.with_name(f".{out.name}.rebuild")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        build_store(replace(spec, out=str(staging)), jobs=jobs, progress=progress, log=log)
    except BaseException:  # the old store stays as it was, and nothing is left beside it
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_directories(staging, out)
    shutil.rmtree(staging, ignore_errors=True)  # now the old store
    log(f"data build: {out}: rebuilt (--force) in {staging} and swapped in; the previous store is deleted")
    return out


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def swap_directories(a: Path, b: Path) -> None:
    """Exchange the names of two directories on one filesystem. Linux renameat2(RENAME_EXCHANGE) does it in one
    atomic step; where the C library or the filesystem lacks it (macOS, NFS), three renames leave `b` missing
    for a moment."""
    rename2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename2 is not None:
        rename2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        if rename2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
    aside = b.with_name(f".{b.name}.swap")
    shutil.rmtree(aside, ignore_errors=True)
    b.rename(aside)
    a.rename(b)
    aside.rename(a)


def _chunk_reports(out: Path, files: list[Path], spec: BuildSpec, tok_hash: str) -> list[dict]:
    """Every input file's chunk report; one missing, or made from another file, tokenizer or text field (an
    interrupted build of other inputs), is a DataError."""
    reports, missing = [], []
    for i, f in enumerate(files):
        p = _chunk_dir(out) / f"{i:07d}.json"
        r = json.loads(p.read_text()) if p.exists() else {}
        if (r.get("input"), r.get("tokenizer"), r.get("text_field")) == (str(f), tok_hash, spec.text_field):
            reports.append(r)
        else:
            missing.append(i)
    if missing:
        raise DataError(f"{out}: {len(missing)} of {len(files)} input files are not tokenized yet for these "
                        f"inputs (e.g. file #{missing[0]}: {files[missing[0]]}); run the tokenize stage for "
                        f"every worker first")
    return reports


def _merge(out: Path, spec: BuildSpec, reports: list[dict], plan: dict[str, int], made_from: dict[str, str],
           tok: Tokenizer, log: Callable[[str], None]) -> None:
    splits = {}
    for split, n in plan.items():
        if not n:
            continue
        metas = []
        for s in range(n):
            p = out / split / f"shard-{s:05d}.json"
            meta = json.loads(p.read_text()) if p.exists() else {}
            if meta.get("made_from") != made_from[split]:
                raise DataError(f"{out}: {split} shard {s} is not written yet for these inputs; run the shard stage "
                                f"for every worker")
            metas.append(meta)
        lengths = np.concatenate([np.fromfile(out / split / f"{m['name']}.len", np.int64) for m in metas])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        unigram = sum(np.fromfile(out / split / f"{m['name']}.unigram", np.int64) for m in metas)
        splits[split] = {"documents": int(lengths.size), "tokens": int(lengths.sum()),
                         "shards": [{k: m[k] for k in ("name", "documents", "tokens", "sha256")} for m in metas],
                         "index": _save_index(out / split, offsets, unigram)}
    bad = {r["input"]: {k: v for k, v in r["bad"].items() if v} for r in reports if any(r["bad"].values())}
    inputs = {"files": len(reports), "documents": sum(r["documents"] for r in reports),
              "bad": {k: sum(r["bad"].get(k, 0) for r in reports) for k in BAD_KINDS}, "bad_by_file": bad,
              "by_file": {r["input"]: {"sha256": r["sha256"], "bytes": r.get("bytes"), "mtime_ns": r.get("mtime_ns"),
                                       "documents": r["documents"]} for r in reports}}
    manifest = _write_manifest(out, tok, splits, inputs, _spec_record(spec))
    content = manifest["fingerprint"]
    shutil.rmtree(out / "build", ignore_errors=True)
    for split in SPLITS:  # the stage files, and shards an interrupted build of other inputs left beyond the plan
        kept = {m["name"] for m in splits[split]["shards"]} if split in splits else set()
        for p in (out / split).glob("shard-*"):
            if p.suffix in (".len", ".unigram") or p.name.split(".")[0] not in kept:
                p.unlink()
    total_bad = sum(manifest["inputs"]["bad"].values())
    log(f"data build: {out}: {manifest['inputs']['documents']:,} documents from {len(reports)} files, "
        + ", ".join(f"{k} {v['tokens']:,} tokens in {len(v['shards'])} shard(s)" for k, v in splits.items())
        + f"; fingerprint {content}")
    if total_bad:
        log(f"data build: skipped {total_bad:,} bad inputs in {len(bad)} file(s): "
            + ", ".join(f"{k} {v}" for k, v in manifest["inputs"]["bad"].items() if v)
            + f" (per file: {out / 'manifest.json'}, inputs.bad_by_file)")
        for ex in [ex for r in reports for ex in r["examples"]][:3]:
            log(f"  e.g. {ex}")


# ----------------------------------------------------------------------------------------------- manifest


def _save_index(root: Path, offsets: np.ndarray, unigram: np.ndarray) -> dict[str, str]:
    """A split's offsets.bin and unigram.bin, and their sha256 for the manifest (`keel data verify` checks them;
    the store's fingerprint stays the tokenizer and the shards, which determine them)."""
    hashes = {}
    for name, arr in (("offsets.bin", offsets), ("unigram.bin", unigram)):
        _save_array(root / name, arr)
        hashes[name] = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
    return hashes


def _spec_record(spec: BuildSpec) -> dict:
    return {"text_field": spec.text_field, "heldout_fraction": spec.heldout_fraction,
            "shard_tokens": spec.shard_tokens, "vocab_size": spec.vocab_size if not spec.tokenizer else None}


def _write_manifest(out: Path, tok: Tokenizer, splits: dict[str, dict], inputs: dict, build: dict) -> dict:
    """manifest.json, written last: the store is complete once it exists. The fingerprint covers the tokenizer
    and every shard's content."""
    pad, bos, eos = special_ids(tok)
    vocab = tok.get_vocab_size()
    shard_hashes = {k: [s["sha256"] for s in v["shards"]] for k, v in splits.items()}
    content = hashlib.sha256(json.dumps({"tokenizer": tokenizer_hash(tok), "splits": shard_hashes},
                                        sort_keys=True).encode()).hexdigest()[:16]
    manifest = {
        "format": FORMAT, "version": VERSION, "fingerprint": content,
        "dtype": _dtype_for(vocab).name, "vocab_size": vocab,
        "tokenizer": {"file": "tokenizer.json", "sha256": tokenizer_hash(tok), "pad": pad, "bos": bos, "eos": eos},
        "inputs": inputs, "splits": splits, "build": build,
    }
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def write_store(out: str | Path, documents: dict[str, Sequence[np.ndarray]], *, vocab_size: int,
                pad: int = 0, bos: int = 1, eos: int = 2, tokenizer: Tokenizer | None = None) -> TokenStore:
    """A store from documents that are already token arrays (benchmarks, tests): one shard per split."""
    out = Path(out)
    dtype = _dtype_for(vocab_size)
    splits = {}
    for split, docs in documents.items():
        root = out / split
        root.mkdir(parents=True, exist_ok=True)
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        tokens = np.concatenate(docs).astype(dtype) if len(docs) else np.empty(0, dtype)
        _save_array(root / "shard-00000.tok", tokens)
        index = _save_index(root, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                            np.bincount(tokens, minlength=vocab_size).astype(np.int64))
        splits[split] = {"documents": len(docs), "tokens": int(tokens.size), "shards": [
            {"name": "shard-00000", "documents": len(docs), "tokens": int(tokens.size),
             "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}], "index": index}
    if tokenizer is None:
        names = {i: f"t{i}" for i in range(vocab_size)} | {pad: PAD, bos: BOS, eos: EOS}
        tokenizer = Tokenizer(models.WordLevel({v: k for k, v in names.items()}, unk_token=PAD))
    atomic_write(out / "tokenizer.json", tokenizer.to_str())
    _write_manifest(out, load_tokenizer(out / "tokenizer.json"), splits, inputs={}, build={})
    return TokenStore(out)
