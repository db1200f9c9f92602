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
complete; rerunning skips the units already done. The result does not depend on the number of workers.
`write_store` writes a store from token arrays (tests, benchmarks) through the same manifest writer.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models
from tqdm import tqdm

from keel.data.order import mix64
from keel.data.store import FORMAT, VERSION, TokenStore
from keel.data.tokenizer import BOS, EOS, PAD, load_tokenizer, special_ids, tokenizer_hash, train_bpe
from keel.errors import ConfigError, DataError
from keel.io import atomic_write

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
BAD_KINDS = ("malformed_json", "missing_field", "not_utf8", "empty")
DEFAULT_SHARD_TOKENS = 1 << 28


# ------------------------------------------------------------------------------------------------- inputs


@dataclass
class FileReport:
    """What one input file gave: documents, and bad input counted per kind with the first few places."""

    documents: int = 0
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_KINDS, 0))
    examples: list[str] = field(default_factory=list)

    def flag(self, kind: str, where: str, strict: bool) -> None:
        if strict:
            raise DataError(f"{where}: {kind.replace('_', ' ')} (--strict)")
        self.bad[kind] += 1
        if len(self.examples) < 3:
            self.examples.append(f"{where}: {kind}")


def _open_lines(path: Path) -> Iterator[bytes]:
    name = path.name
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield from f
    elif name.endswith(".zst"):
        import zstandard

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
            yield from io.BufferedReader(f)
    else:
        with open(path, "rb") as f:
            yield from f


def read_documents(path: Path, text_field: str, report: FileReport, strict: bool) -> Iterator[str]:
    """The documents of one input file: a .jsonl(.gz/.zst) line, a .parquet row, or a whole text file."""
    name = path.name
    if name.endswith(JSONL_SUFFIXES):
        for lineno, raw in enumerate(_open_lines(path), 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                report.flag("not_utf8", where, strict)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                report.flag("malformed_json", where, strict)
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                report.flag("missing_field", f"{where} (field {text_field!r})", strict)
            elif not text.strip():
                report.flag("empty", where, strict)
            else:
                yield text
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            report.flag("missing_field", f"{path} (no column {text_field!r}; columns: {pf.schema_arrow.names})",
                        strict)
            return
        row = 0
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
    digest = file_hash(Path(path))
    if report_path.exists():
        done = json.loads(report_path.read_text())
        if done["sha256"] == digest and done["tokenizer"] == tok_hash:
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
    result = {"index": index, "input": path, "sha256": digest, "tokenizer": tok_hash,
              "documents": report.documents, "tokens": int(tokens.size), "bad": report.bad,
              "examples": report.examples}
    atomic_write(report_path, json.dumps(result))
    return result


@dataclass(frozen=True)
class _Chunk:
    index: int
    sha256: str
    documents: int
    tokens: int


def _plan_shards(chunks: list[_Chunk], spec: BuildSpec) -> dict[str, int]:
    """Output shards per split, from token totals alone (known before any document key is computed)."""
    total = sum(c.tokens for c in chunks)
    held = total * spec.heldout_fraction
    return {"train": max(1, math.ceil((total - held) / spec.shard_tokens)),
            "heldout": max(1, math.ceil(held / spec.shard_tokens)) if spec.heldout_fraction > 0 else 0}


def _shard_of(keys: np.ndarray, n_shards: int) -> np.ndarray:
    return (mix64(keys ^ np.uint64(0x5EED)) % np.uint64(n_shards)).astype(np.int64)


def _write_shard(split: str, shard: int, n_shards: int, chunks: list[_Chunk], spec: BuildSpec,
                 vocab: int) -> dict:
    """Stage 2 for one output shard: gather its documents from every chunk, in key order."""
    out = Path(spec.out) / split
    name = f"shard-{shard:05d}"
    meta_path = out / f"{name}.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
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
            "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
    atomic_write(meta_path, json.dumps(meta))
    return meta


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
        docs = list(read_documents(path, spec.text_field, FileReport(), strict=False))
        held = heldout_mask(document_keys(file_hash(path), len(docs)), spec.heldout_fraction)
        texts.extend(d for d, h in zip(docs, held, strict=True) if not h)
    tok = train_bpe(texts, spec.vocab_size)
    log(f"data build: trained a byte-level BPE of {tok.get_vocab_size()} tokens on {len(texts):,} documents")
    atomic_write(target, tok.to_str())
    return target


def build_store(spec: BuildSpec, *, stage: str = "all", worker: int = 0, workers: int = 1, jobs: int = 1,
                progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Build (or finish building) the store `spec.out`; see the module docstring for the stages."""
    out = Path(spec.out)
    if (out / "manifest.json").exists():
        manifest = json.loads((out / "manifest.json").read_text())
        if manifest.get("build") != _spec_record(spec):
            raise DataError(f"{out} already holds a complete store built with different settings; "
                            f"use another --out or delete it")
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
    _chunk_dir(out).mkdir(parents=True, exist_ok=True)
    if stage in ("tokenize", "all"):
        tok_hash = tokenizer_hash(tok)
        mine = [(i, str(f), spec, str(tokenizer_path), tok_hash) for i, f in enumerate(files) if i % workers == worker]
        _run(_tokenize_file, mine, jobs, "tokenize", progress)
        if stage == "tokenize":
            return out
    reports = _chunk_reports(out, len(files))
    chunks = [_Chunk(r["index"], r["sha256"], r["documents"], r["tokens"]) for r in reports]
    vocab = tok.get_vocab_size()
    plan = _plan_shards(chunks, spec)
    if stage in ("shard", "all"):
        units = [(split, s, n, chunks, spec, vocab) for split, n in plan.items() for s in range(n)]
        _run(_write_shard, [u for i, u in enumerate(units) if i % workers == worker], jobs, "shard", progress)
        if stage == "shard":
            return out
    _merge(out, spec, reports, plan, tok, log)
    return out


def _chunk_reports(out: Path, n_files: int) -> list[dict]:
    reports, missing = [], []
    for i in range(n_files):
        p = _chunk_dir(out) / f"{i:07d}.json"
        if p.exists():
            reports.append(json.loads(p.read_text()))
        else:
            missing.append(i)
    if missing:
        raise DataError(f"{out}: {len(missing)} of {n_files} input files are not tokenized yet (e.g. file "
                        f"#{missing[0]}); run the tokenize stage for every worker first")
    return reports


def _merge(out: Path, spec: BuildSpec, reports: list[dict], plan: dict[str, int], tok: Tokenizer,
           log: Callable[[str], None]) -> None:
    splits = {}
    for split, n in plan.items():
        if not n:
            continue
        metas = []
        for s in range(n):
            p = out / split / f"shard-{s:05d}.json"
            if not p.exists():
                raise DataError(f"{out}: {split} shard {s} is not written yet; run the shard stage for every worker")
            metas.append(json.loads(p.read_text()))
        lengths = np.concatenate([np.fromfile(out / split / f"{m['name']}.len", np.int64) for m in metas])
        _save_array(out / split / "offsets.bin", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        unigram = sum(np.fromfile(out / split / f"{m['name']}.unigram", np.int64) for m in metas)
        _save_array(out / split / "unigram.bin", unigram)
        splits[split] = {"documents": int(lengths.size), "tokens": int(lengths.sum()),
                         "shards": [{k: m[k] for k in ("name", "documents", "tokens", "sha256")} for m in metas]}
    bad = {r["input"]: {k: v for k, v in r["bad"].items() if v} for r in reports if any(r["bad"].values())}
    inputs = {"files": len(reports), "documents": sum(r["documents"] for r in reports),
              "bad": {k: sum(r["bad"][k] for r in reports) for k in BAD_KINDS}, "bad_by_file": bad}
    manifest = _write_manifest(out, tok, splits, inputs, _spec_record(spec))
    content = manifest["fingerprint"]
    shutil.rmtree(out / "build", ignore_errors=True)
    for split in splits:
        for suffix in ("len", "unigram"):
            for p in (out / split).glob(f"shard-*.{suffix}"):
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
        _save_array(root / "offsets.bin", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        _save_array(root / "unigram.bin", np.bincount(tokens, minlength=vocab_size).astype(np.int64))
        splits[split] = {"documents": len(docs), "tokens": int(tokens.size), "shards": [
            {"name": "shard-00000", "documents": len(docs), "tokens": int(tokens.size),
             "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}]}
    if tokenizer is None:
        names = {i: f"t{i}" for i in range(vocab_size)} | {pad: PAD, bos: BOS, eos: EOS}
        tokenizer = Tokenizer(models.WordLevel({v: k for k, v in names.items()}, unk_token=PAD))
    atomic_write(out / "tokenizer.json", tokenizer.to_str())
    _write_manifest(out, load_tokenizer(out / "tokenizer.json"), splits, inputs={}, build={})
    return TokenStore(out)
