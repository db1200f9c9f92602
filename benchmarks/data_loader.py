"""keel's data loader against Grain's MapDataset, in one run on one machine (seq 2048 x batch 64, one process).

    python benchmarks/data_loader.py [--tokens 2**27] [--batches 300] [--big]

1. Writes one uint16 token file of random documents, and three token stores that split its documents.
2. Throughput: Grain `MapDataset.range(n).shuffle().map(window).batch(64)` delivering plain token windows from
   the one file, against keel's `DataSource.host_batches` delivering what the train step needs from the host
   (tokens + first positions) for a 3-source mixture; plus keel with the host-side expansion to inputs/targets/
   segment ids/positions/loss mask, and a plain numpy gather of random windows as the ceiling.
3. Resume at step 100k: time to the first batch from a freshly opened loader (Grain and keel).
4. Memory of the sample order at 2^20 and 2^28 sequences (keel, tracemalloc), against a materialised numpy
   permutation (`--big` runs the 2^28 one: ~2 GiB, ~10 s).

Prints a table; paste it into docs/benchmarks.md with the date.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

SEQ, BATCH = 2048, 64


def write_token_file(path: Path, n_tokens: int, vocab: int, rng) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.geometric(1 / 1500, size=n_tokens // 700 + 10) + 2
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n_tokens)]
    tokens = rng.integers(3, vocab, int(lengths.sum()), dtype=np.uint16)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens[starts] = 1  # <bos>
    tokens[starts + lengths - 1] = 2  # <eos>
    tokens.tofile(path)
    return tokens, lengths


def rate(fn, batches: int) -> float:
    """Tokens per second of fn(i) over `batches` batches (after one warm-up call)."""
    fn(0)
    t0 = time.perf_counter()
    for i in range(batches):
        fn(i + 1)
    return batches * BATCH * SEQ / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=lambda s: int(eval(s)), default=2**27)  # noqa: S307 - "2**27" on the CLI
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--big", action="store_true", help="also materialise a numpy permutation of 2^28")
    args = ap.parse_args()

    import grain

    from keel.config import load_config
    from keel.data.build import write_store
    from keel.data.loader import DataSource
    from keel.data.order import MixturePlan, SampleOrder
    from keel.data.pack import expand
    from keel.data.prepare import prepare_data

    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    vocab = 32_000
    tokens, lengths = write_token_file(tmp / "tokens.u16", args.tokens, vocab, rng)
    mm = np.memmap(tmp / "tokens.u16", dtype=np.uint16, mode="r")
    n_windows = (len(mm) - 1) // SEQ
    docs = np.split(tokens, np.cumsum(lengths)[:-1])
    stores = {}
    for k, name in enumerate(("web", "code", "math")):
        part = docs[k::3]
        stores[name] = write_store(tmp / name, {"train": part[:-20], "heldout": part[-20:]}, vocab_size=vocab).path
    del tokens, docs
    gc.collect()
    srcs = ", ".join(f"{{name: {n}, path: '{p}', weight: {w}}}" for (n, p), w in zip(stores.items(), (0.6, 0.25, 0.15),
                                                                                   strict=True))
    cfg = load_config("tiny", [f"data.sources=[{srcs}]", f"data.seq_len={SEQ}", f"train.batch_size={BATCH}",
                               f"model.vocab_size={vocab}", f"run_dir={tmp / 'run'}"])

    def open_keel() -> DataSource:
        return prepare_data(cfg, tmp / "run", log=lambda s: None)

    def open_grain():
        return (grain.MapDataset.range(n_windows).shuffle(seed=0)
                .map(lambda i: np.asarray(mm[i * SEQ : i * SEQ + SEQ + 1])).batch(BATCH))

    print(f"token file: {len(mm):,} tokens ({len(mm) * 2 / 2**20:.0f} MiB uint16), {n_windows:,} windows of "
          f"{SEQ + 1}; 3 stores of its documents; batch {BATCH} x seq {SEQ}")
    results = {}

    g = open_grain()
    results["grain MapDataset, plain windows, 1 source"] = rate(lambda i: g[i], args.batches)

    data = open_keel()
    it = data.host_batches(range(10**9))
    results["keel host batches (tokens + first_position), 3-source mixture"] = rate(lambda i: next(it), args.batches)
    it2 = data.host_batches(range(10**9))

    def expanded(i):
        b = next(it2)[1]
        return expand(b["tokens"], b["first_position"], data.bos_id, data.pad_id)

    results["keel + numpy expand on the host (5 int32 arrays)"] = rate(expanded, max(20, args.batches // 5))
    view = np.lib.stride_tricks.sliding_window_view(mm, SEQ + 1)
    idx = rng.integers(0, n_windows, (args.batches + 1, BATCH)) * SEQ
    results["numpy gather of random windows (ceiling)"] = rate(lambda i: view[idx[i]], args.batches)

    base = results["grain MapDataset, plain windows, 1 source"]
    print(f"\n{'throughput (one process)':<68} {'G tokens/s':>10} {'vs Grain':>9}")
    for name, r in results.items():
        print(f"{name:<68} {r / 1e9:>10.3f} {r / base:>8.1f}x")

    step = 100_000
    t0 = time.perf_counter()
    g2 = open_grain()
    _ = g2[step]
    t_grain = time.perf_counter() - t0
    t0 = time.perf_counter()
    d2 = open_keel()
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    d2.global_batch(step)
    t_keel = time.perf_counter() - t0
    print(f"\nresume at step {step:,}: grain {1e3 * t_grain:.2f} ms (build + batch); keel {1e3 * t_keel:.2f} ms "
          f"first batch on a fresh loader (+ {1e3 * t_open:.1f} ms to open 3 stores and the tokenizer)")

    print(f"\n{'sample order memory':<40} {'2^20 sequences':>16} {'2^28 sequences':>16}")
    row = []
    for n in (2**20, 2**28):
        tracemalloc.start()
        order = SampleOrder(MixturePlan([0.6, 0.25, 0.15], BATCH), [n, n // 3, n // 7], 0, ["a", "b", "c"])
        order.rows(np.arange(step, step + 64))
        row.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    print(f"{'keel (3-source order, 64 steps)':<40} {row[0] / 2**10:>13.1f} KiB {row[1] / 2**10:>13.1f} KiB")
    sizes = (2**20, 2**28) if args.big else (2**20,)
    out = []
    for n in sizes:
        tracemalloc.start()
        t0 = time.perf_counter()
        np.random.default_rng(0).permutation(n)
        out.append((tracemalloc.get_traced_memory()[1], time.perf_counter() - t0))
        tracemalloc.stop()
    cells = [f"{m / 2**20:>9.1f} MiB {t:>4.1f}s" for m, t in out] + ([] if args.big else ["(--big)".rjust(16)])
    print(f"{'numpy permutation (materialised)':<40} {cells[0]:>16} {cells[1]:>16}")


if __name__ == "__main__":
    main()
