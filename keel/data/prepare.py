"""Preparing a run's data: resolve the config's sources, build the corpus store on first use, open the stores,
verify their files against their manifests (`keel.data.verify`: hashed once per content, recorded under
`data.cache_dir` or run_dir/data), check the tokenizer against the config, and hand back a `DataSource` that
only serves batches.

Errors keep their kind: a setting that points at nothing or does not fit (a corpus glob matching no files, a
tokenizer larger than the model's vocabulary) is a ConfigError (exit 2); a store that is damaged or incomplete
is a DataError (exit 4), whoever opens it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer

from keel.config import Config
from keel.data.build import BuildSpec, build_store
from keel.data.corpus import stdlib_files
from keel.data.loader import DataSource, Source
from keel.data.store import TokenStore
from keel.data.tokenizer import load_tokenizer, tokenizer_hash
from keel.data.verify import check_store
from keel.errors import ConfigError


def prepare_data(cfg: Config, run_dir: Path, *, log: Callable[[str], None] = print, progress: bool = False,
                 host: int = 0) -> DataSource:
    """The run's `DataSource`. Without data.sources, host 0 builds the corpus store if it is not cached yet
    (the other hosts wait for it); a given data.tokenizer is checked before any build starts. Every store's
    files are verified against its manifest (every host checks what it reads): a mismatch is a DataError."""
    d = cfg.data
    wanted = load_tokenizer(d.tokenizer) if d.tokenizer else None
    if wanted is not None:
        _check_vocab(cfg, wanted, f"data.tokenizer={d.tokenizer!r}")
    sources = open_sources(cfg, Path(run_dir), log=log, progress=progress, builder=host == 0)
    for store in {s.store.path: s.store for s in sources}.values():  # before anything is trained on them
        check_store(store.path, store.manifest, Path(d.cache_dir or Path(run_dir) / "data"), log=log)
    first = sources[0].store
    if wanted is not None and tokenizer_hash(wanted) != first.manifest["tokenizer"]["sha256"]:
        raise ConfigError(f"data.tokenizer={d.tokenizer!r} is not the tokenizer the stores were built with "
                          f"({first.path}/tokenizer.json)")
    _check_vocab(cfg, first.tokenizer, f"the tokenizer of {first.path}")
    data = DataSource(cfg, sources)
    for s, h in zip(data.sources, data.heldout, strict=True):
        log(f"data: source {s.name!r} weight {s.weight:g}: {s.train.n_documents:,} documents, "
            f"{s.train.n_tokens:,} tokens, {s.train.windows(data.seq_len):,} sequences; held-out "
            f"{h.n_tokens:,} tokens ({s.store.path}, store {s.store.fingerprint})")
    log(f"data: vocab {data.tokenizer.get_vocab_size()}, order fingerprint {data.fingerprint}")
    return data


def _check_vocab(cfg: Config, tok: Tokenizer, what: str) -> None:
    vocab = tok.get_vocab_size()
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of {what} "
                          f"({vocab}); set model.vocab_size={vocab} or larger")


def open_sources(cfg: Config, run_dir: Path, *, log: Callable[[str], None] = print, progress: bool = False,
                 builder: bool = True) -> list[Source]:
    """data.sources opened as they are, or the one source built from data.corpus."""
    d = cfg.data
    if not d.sources:
        return [Source("corpus", corpus_store(cfg, run_dir, log, progress, builder), 1.0, 0.0)]
    sources = []
    for i, s in enumerate(d.sources):
        if not Path(s.path).exists():  # nothing there: the setting is wrong; something there: the store is
            raise ConfigError(f"data.sources[{i}].path={s.path!r} ({s.name}) does not exist; build a store there "
                              f"with keel data build")
        sources.append(Source(s.name, TokenStore(s.path), s.weight, s.max_epochs))
    return sources


def corpus_store(cfg: Config, run_dir: Path, log: Callable[[str], None] = print, progress: bool = False,
                 builder: bool = True, wait_s: float = 7200.0) -> TokenStore:
    """The store of `data.corpus` (built by `keel data build` on first use), cached under `data.cache_dir`
    (default run_dir/data/) by a key of its content: files, sizes, mtimes, tokenizer and build settings, so
    every run (and every test) on the same corpus shares one build.

    In a multi-host run only the builder (host 0) builds; the others wait for its manifest on the shared
    directory."""
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
            raise ConfigError(f"waited {wait_s:.0f}s for host 0 to build the token store {out}; is "
                              f"{'data.cache_dir' if d.cache_dir else 'run_dir'} on a filesystem every host shares?")
        time.sleep(0.5)
    return TokenStore(out)
