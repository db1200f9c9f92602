"""`keel data build | verify | inspect | stats`: the command line over `keel.data.build`, `verify`, `prepare` and
`inspect`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from keel.config import load_config, preset_names


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build token stores; inspect batches and what a run consumes",
                          description="Build token stores and see exactly what the model is fed.")
    dsub = data.add_subparsers(dest="data_command", required=True)

    b = dsub.add_parser("build", help="tokenize text/jsonl/parquet files into a token store",
                        description="Tokenize input files into a token store (docs/data-format.md). Rerunning the "
                                    "same command finishes an interrupted build, or says the store is up to date. "
                                    "Into a store of other inputs or settings: refused with the difference "
                                    "(exit 4) unless --force.")
    b.add_argument("inputs", nargs="+", help="globs of .txt (any other suffix: one document per file), "
                                             ".jsonl, .jsonl.gz, .jsonl.zst, .parquet")
    b.add_argument("--out", required=True, help="the store directory")
    b.add_argument("--tokenizer", default="", help="a HF tokenizer.json (default: train a byte-level BPE)")
    b.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary when training one (default 4096)")
    b.add_argument("--text-field", default="text", help="JSON key / parquet column of the text (default text)")
    b.add_argument("--heldout-fraction", type=float, default=0.01,
                   help="documents put in the held-out split, chosen by a hash of their content (default 0.01)")
    b.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per output shard (default 2^28)")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="local worker processes")
    b.add_argument("--worker", type=int, default=0, help="this machine's index for a multi-machine build")
    b.add_argument("--workers", type=int, default=1, help="machines in a multi-machine build")
    b.add_argument("--stage", choices=["all", "tokenize", "shard", "merge"], default="all",
                   help="multi-machine builds: tokenize (every worker), shard (every worker), merge (once)")
    b.add_argument("--strict", action="store_true", help="any bad input is an error naming the file and line")
    b.add_argument("--force", action="store_true",
                   help="--out holds a store of other inputs or settings: build the new one next to it and swap it "
                        "in (one rename); the old one is deleted")
    b.add_argument("--no-progress", action="store_true")

    v = dsub.add_parser("verify", help="check every file of a token store against its manifest's sha256",
                        description="Re-read every shard (and index file) of a token store and compare its sha256 "
                                    "with the manifest's, whatever was verified before. Exit 4 if any differs.")
    v.add_argument("store", help="the store directory")
    v.add_argument("--jobs", type=int, default=0, help="hashing threads (default: one per core, up to 8)")
    v.add_argument("--json", action="store_true", help="machine-readable output")

    for name, helptext in (("inspect", "print every row of the global batch at a step"),
                           ("stats", "per-source tokens, documents, sequences and epochs consumed by a step")):
        p = dsub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        p.add_argument("--config", action="append", help=f"preset ({', '.join(preset_names())}) or YAML file")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value")
        p.add_argument("--step", type=int, default=None,
                       help="the step (inspect: default 0; stats: default train.steps)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "inspect":
            p.add_argument("--hosts", type=int, default=1, help="number of hosts, to show one host's rows")
            p.add_argument("--host", type=int, default=0, help="the host whose rows to show")
            p.add_argument("--chars", type=int, default=120, help="decoded text per row (default 120)")


def run(args: argparse.Namespace) -> int:
    return {"build": _build, "verify": _verify, "inspect": _inspect, "stats": _stats}[args.data_command](args)


def _build(args: argparse.Namespace) -> int:
    from keel.data.build import BuildSpec, build_store

    spec = BuildSpec(inputs=tuple(args.inputs), out=args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                     text_field=args.text_field, heldout_fraction=args.heldout_fraction,
                     shard_tokens=args.shard_tokens, strict=args.strict)
    build_store(spec, stage=args.stage, worker=args.worker, workers=args.workers, jobs=args.jobs,
                progress=not args.no_progress, force=args.force)
    return 0


def _verify(args: argparse.Namespace) -> int:
    """A table of every file; a mismatch is then raised as the DataError naming each file (exit 4)."""
    import time

    from keel.data.store import read_manifest
    from keel.data.verify import mismatch_error, unhashed_files, verify_store

    root = Path(args.store)
    manifest = read_manifest(root)
    t0 = time.perf_counter()
    checks = verify_store(root, manifest, jobs=args.jobs)
    dt = time.perf_counter() - t0
    mb = sum(max(0, c.size) for c in checks) / 1e6
    unhashed = unhashed_files(manifest)
    if args.json:
        print(json.dumps({"store": str(root), "ok": all(c.ok for c in checks), "seconds": dt, "mb": mb,
                          "unhashed": unhashed,
                          "files": [{"file": c.expected.file, "split": c.expected.split, "bytes": c.size,
                                     "expected": c.expected.sha256, "actual": c.actual, "ok": c.ok} for c in checks]},
                         indent=1))
    else:
        head = ("split", "file", "bytes", "sha256 (manifest)", "status")
        table = [head] + [(c.expected.split, c.expected.file, f"{c.size:,}" if c.size >= 0 else "-",
                           c.expected.sha256[:16] + "…", c.status) for c in checks]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        for row in table:
            print("  ".join(c.rjust(w) if i == 2 else c.ljust(w)
                            for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if unhashed:
            print(f"not checked (the manifest has no hash for them: built before keel recorded them): "
                  f"{', '.join(unhashed)}")
        bad = sum(not c.ok for c in checks)
        print(f"{root}: {len(checks)} files, {mb:,.1f} MB in {dt:.2f}s"
              + (f" ({mb / dt:,.0f} MB/s)" if dt > 0 and mb > 1 else "") + ": "
              + (f"{bad} do not match the manifest" if bad else "all match the manifest"))
    if (error := mismatch_error(root, checks)) is not None:
        raise error
    return 0


def _source(args: argparse.Namespace, quiet: bool):
    from keel.data.prepare import prepare_data

    cfg = load_config(args.config or ["tiny"], args.overrides)
    return cfg, prepare_data(cfg, Path(cfg.run_dir), log=(lambda s: None) if quiet else print, progress=not quiet)


def _inspect(args: argparse.Namespace) -> int:
    from keel.data.inspect import inspect_batch
    from keel.errors import ConfigError
    from keel.train.plan import SkipList, read_decisions, run_skip_list

    cfg, data = _source(args, args.json)
    step = args.step or 0
    if not 0 <= args.host < args.hosts or cfg.train.batch_size % args.hosts:
        raise ConfigError(f"--host {args.host} of --hosts {args.hosts}: need 0 <= host < hosts and hosts dividing "
                          f"train.batch_size={cfg.train.batch_size}")
    rows = inspect_batch(data, step, args.host, args.hosts, args.chars)
    skipped = step in run_skip_list(cfg)
    why = next((f"skipped by the run ({d['reason']} at step {d.get('spike_step', '?')})"
                for d in read_decisions(cfg.run_dir) if step in SkipList([d["steps"]])), "in data.skip_steps")
    if args.json:
        print(json.dumps({"step": step, "host": args.host, "hosts": args.hosts, "skipped": skipped,
                          "skip_reason": why if skipped else None, "rows": rows}, indent=1))
        return 0
    print(f"step {step}" + (f" ({why}: not trained on)" if skipped else "")
          + f", rows {rows[0]['row']}..{rows[-1]['row']} of {cfg.train.batch_size}, seq_len {cfg.data.seq_len}")
    print(f"{'row':>4}  {'source':<12} {'sequence':>10} {'epoch':>5}  {'documents (id:start-end)':<28}  text")
    for r in rows:
        docs = " ".join(f"{d['id']}:{d['start']}-{d['end']}" for d in r["documents"])
        if len(docs) > 28:
            docs = docs[:27] + "…"
        text = r["text"].replace("\n", "⏎")
        print(f"{r['row']:>4}  {r['source']:<12} {r['sequence']:>10} {r['epoch']:>5}  {docs:<28}  {text}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from keel.data.inspect import source_stats
    from keel.train.plan import run_skip_list

    cfg, data = _source(args, args.json)
    step = cfg.train.steps if args.step is None else args.step
    rows = source_stats(data, step)
    skipped = run_skip_list(cfg).count(0, step)
    if args.json:
        print(json.dumps({"step": step, "skipped_steps": skipped, "sources": rows}, indent=1))
        return 0
    print(f"by step {step:,} ({step * cfg.train.batch_size:,} sequences of {cfg.data.seq_len + 1} tokens"
          + (f"; {skipped} of these steps are skipped" if skipped else "") + ")")
    head = ("source", "weight", "documents", "tokens", "sequences", "consumed", "epochs", "max_epochs")
    table = [head] + [(r["source"], f"{r['weight']:g}", f"{r['documents']:,}", f"{r['tokens']:,}",
                       f"{r['sequences']:,}", f"{r['sequences_consumed']:,}", f"{r['epochs_consumed']:.3f}",
                       f"{r['max_epochs']:g}" if r["max_epochs"] else "-") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return 0
