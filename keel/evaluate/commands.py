"""`keel generate RUN_DIR` (sample continuations with the KV-cache decoder) and `keel eval RUN_DIR` (loss,
perplexity and bits per byte per source)."""

from __future__ import annotations

import argparse
import glob
import json
import math
from pathlib import Path

from keel.errors import ConfigError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="continue prompts with a trained run's model (KV cache, sampling)",
                       description="Continue prompts with the latest (or --step) checkpoint of a run: one jitted "
                                   "prefill, then one jitted decode step per token over a preallocated KV cache. "
                                   "Prints each continuation, then prefill and decode tokens/s.")
    g.add_argument("run_dir", help="a keel run directory, or a Hugging Face Gemma-3 model directory")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", metavar="FILE", help="a file of prompts, one per line")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    g.add_argument("--temperature", type=float, default=0.7, help="0: greedy (default 0.7)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0: all (default)")
    g.add_argument("--top-p", type=float, default=0.95,
                   help="sample among the most likely tokens holding this probability (default 0.95)")
    g.add_argument("--seed", type=int, default=0, help="the same seed, prompts and settings give the same text")
    g.add_argument("--batch", type=int, default=8, help="prompts decoded together (default 8)")
    g.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    g.add_argument("--json", action="store_true", help="print one JSON object")

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a run, per source",
                       description="Token-weighted loss, perplexity and bits per byte (tokenizer-independent) of "
                                   "a run's checkpoint, per source and overall. Default: the run's own sources' "
                                   "held-out splits.")
    e.add_argument("run_dir", help="a keel run directory, or a Hugging Face Gemma-3 model directory (with --text "
                                   "or --store)")
    what = e.add_mutually_exclusive_group()
    what.add_argument("--store", nargs="+", metavar="S", help="token stores (built with the run's tokenizer)")
    what.add_argument("--text", nargs="+", metavar="FILES", help="text files or globs; each argument is a source, "
                                                                  "each file a document")
    e.add_argument("--split", default="heldout", help="split of the stores (default heldout)")
    e.add_argument("--max-tokens", type=int, default=0, help="score at most this many tokens per source; 0: all")
    e.add_argument("--batch", type=int, default=8, help="sequences per forward pass (default 8)")
    e.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    e.add_argument("--json", action="store_true", help="print one JSON object")


def run_generate(args: argparse.Namespace) -> int:
    from keel.evaluate.run import open_run
    from keel.model.generate import Sampling, generate

    if args.prompt is not None:
        texts = [args.prompt]
    else:
        try:
            texts = [line for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as e:
            raise ConfigError(f"--prompts {args.prompts}: {e.strerror or e}") from None
        if not texts:
            raise ConfigError(f"--prompts {args.prompts}: no prompts in the file")
    if args.max_new_tokens < 1 or args.batch < 1:
        raise ConfigError("--max-new-tokens and --batch must be >= 1")
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    run = open_run(args.run_dir, args.step)
    result = generate(run.params, [run.encode_prompt(t) for t in texts], run.cfg.model, args.max_new_tokens,
                      sampling, args.seed, run.eos_id, min(args.batch, len(texts)))
    outputs = [t + run.tokenizer.decode(ids) for t, ids in zip(texts, result.tokens, strict=True)]
    speeds = {"prefill_tokens_per_s": result.prefill_tokens_per_s, "decode_tokens_per_s": result.decode_tokens_per_s,
              "compile_s": result.compile_s}
    if args.json:
        print(json.dumps({"step": run.step, "outputs": outputs, **speeds}, indent=1))
        return 0
    for i, text in enumerate(outputs):
        if len(outputs) > 1:
            print(f"--- {i}")
        print(text)
    print(f"\n({run.label}; prefill {result.prefill_tokens_per_s:,.0f} tokens/s, decode "
          f"{result.decode_tokens_per_s:,.0f} tokens/s, compile {result.compile_s:.1f}s)")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from keel.data.store import TokenStore
    from keel.data.tokenizer import tokenizer_hash
    from keel.evaluate.bpb import Score, documents_stream, score_stream, token_bytes
    from keel.evaluate.run import open_run

    run = open_run(args.run_dir, args.step)
    cfg = run.cfg
    seq_len = cfg.data.seq_len
    limit = args.max_tokens if args.max_tokens > 0 else None
    streams: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if args.text:
        for pattern in args.text:
            files = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not files:
                raise ConfigError(f"--text {pattern}: matches no files")
            docs = [[run.bos_id, *run.tokenizer.encode(Path(f).read_text(encoding="utf-8", errors="replace"),
                                                       add_special_tokens=False).ids, run.eos_id] for f in files]
            streams[pattern] = documents_stream(docs)
    else:
        if args.store:
            stores = [(Path(s).name or s, TokenStore(s)) for s in args.store]
        else:
            if run.step < 0:
                raise ConfigError(f"{run.run_dir} is a Hugging Face checkpoint, with no data of its own: "
                                  f"give --text FILES or --store S")
            from keel.data.prepare import open_sources

            stores = [(s.name, s.store) for s in open_sources(cfg, run.run_dir, log=lambda line: None)]
        want = tokenizer_hash(run.tokenizer)
        for name, store in stores:
            if store.manifest["tokenizer"]["sha256"] != want:
                raise ConfigError(f"store {store.path} was built with another tokenizer than the run's "
                                  f"({run.run_dir}/tokenizer.json)")
            split = store.split(args.split)
            n = min(split.n_tokens, limit or split.n_tokens)
            streams[name] = (split.tokens(0, n), np.asarray(split.offsets[:-1]))
    bytes_V = token_bytes(run.tokenizer, cfg.model.vocab_size)
    scores = {}
    for name, (tokens, starts) in streams.items():
        tokens = tokens[:limit] if limit else tokens
        scores[name] = score_stream(run.params, cfg.model, tokens, starts, bytes_V, run.bos_id, run.pad_id,
                                    seq_len, args.batch)
    overall = sum(scores.values(), Score())
    if args.json:
        print(json.dumps({"step": run.step, "sources": {k: v.to_json() for k, v in scores.items()},
                          "overall": overall.to_json()}, indent=1))
        return 0
    width = max(len("overall"), *(len(k) for k in scores))
    print(f"{'source':<{width}}  {'tokens':>10}  {'bytes':>11}  {'loss':>7}  {'ppl':>9}  {'bits/byte':>9}")
    for name, s in [*scores.items(), ("overall", overall)]:
        ppl = f"{s.perplexity:9.3f}" if math.isfinite(s.perplexity) else f"{'-':>9}"
        print(f"{name:<{width}}  {s.tokens:>10,}  {s.bytes:>11,}  {s.loss:7.4f}  {ppl}  {s.bits_per_byte:9.4f}")
    print(f"({run.label}; loss in nats per token; overall is token-weighted)")
    return 0
