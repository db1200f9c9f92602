"""The one GPU (or TPU) check for keel's Pallas flash attention: correctness first, then timing, in one short lease.

1. Correctness (compiled for the GPU, not interpreted): random shapes and feature combinations (documents,
   windows, softcap, GQA/MQA, bf16 and f32, head dims 64-256) against the float32 pure-JAX reference, forward
   and dQ/dK/dV, as ||x - ref|| / ||ref|| and max |x - ref| / max |ref|.
2. Timing, causal bf16, head dim 128, seq 2k/8k/32k (B * L = 32k tokens), three masks: plain causal; documents
   (several per sequence); sliding window. Forward and forward+backward, median of several runs, against
   `jax.nn.dot_product_attention` (cudnn and xla), JAX's bundled Pallas Triton attention (causal + segment ids,
   no window; K/V repeated to all heads as it has no GQA) and keel's reference. A baseline that cannot express
   a mask is marked n/a; one that would need more memory than --max-score-gib for its dense scores is skipped.
   TFLOP/s counts the matmul FLOPs of the visible (query, key) pairs only (4 D per pair forward, 2.5x that
   backward), so every implementation is credited with the same useful work, and skipping work pays.
   On a TPU (or with --kernel-backend mosaic) keel's kernels are the Mosaic version (flash_tpu.py) and the
   baselines are JAX's splash attention (segment ids, causal/local masks; K/V repeated to all heads; q scaled
   beforehand, as it takes no scale) and XLA; the x columns compare against splash instead of cuDNN.

Writes $OUT/attention.json (everything) and $OUT/attention.md (the tables), and prints the tables last.
A global time budget (--budget-s) skips the remaining timing rows rather than overrun a lease.

    PYTHONPATH=. python3 benchmarks/attention.py --quick        # on the GPU machine, < 5 min
    PYTHONPATH=. python3 benchmarks/attention.py --cpu-smoke    # here: tiny shapes, interpret mode, flow only
    PYTHONPATH=. python3 benchmarks/attention.py --cpu-smoke --kernel-backend mosaic   # the TPU flow, here
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from keel.kernels.flash import flash_attention  # noqa: E402
from keel.kernels.reference import MASKED, attention  # noqa: E402

Attention = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None, int], jax.Array]
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------- correctness


def general_reference(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None, window: int,
                      softcap: float, causal: bool, window_right: int | None) -> jax.Array:
    """float32 oracle: reference.attention when causal; else the same math with the mask written out."""
    B, L, H, D = q.shape
    seg = jnp.zeros((B, L), jnp.int32) if seg is None else seg
    if causal and window_right is None:
        return attention(q, k, v, seg, window, softcap)
    kr, vr = (jnp.repeat(x, H // k.shape[2], axis=2) for x in (k, v))
    s = jnp.einsum("blhd,bmhd->bhlm", q, kr) * D**-0.5
    if softcap > 0:
        s = softcap * jnp.tanh(s / softcap)
    diff = jnp.arange(L)[:, None] - jnp.arange(L)[None, :]
    ok = (window <= 0) | (diff < window)
    if causal:
        ok &= diff >= 0
    if window_right is not None:
        ok &= -diff <= window_right
    ok = ok[None] & (seg[:, :, None] == seg[:, None, :])
    return jnp.einsum("bhlm,bmhd->blhd", jax.nn.softmax(jnp.where(ok[:, None], s, MASKED), axis=-1), vr)


def packed_segments(rng: np.random.Generator, B: int, L: int, docs: int) -> np.ndarray:
    """About `docs` documents per row at random boundaries, ids 1, 2, ... as keel.data.pack makes them."""
    starts = np.zeros((B, L), bool)
    starts[:, 0] = True
    for b in range(B):
        starts[b, rng.choice(np.arange(1, L), size=max(docs - 1, 0), replace=False)] = True
    return np.cumsum(starts, axis=1).astype(np.int32)


CORRECTNESS_CASES = [  # B, L, H, K, D, dtype, softcap, causal, window_right, segments, window
    (2, 512, 8, 2, 128, "bfloat16", 0.0, True, None, True, 0),
    (2, 512, 8, 2, 128, "bfloat16", 0.0, True, None, True, 100),
    (1, 1000, 4, 1, 64, "bfloat16", 50.0, True, None, True, 257),  # padded L, MQA, softcap
    (1, 384, 4, 4, 256, "bfloat16", 0.0, True, None, False, 0),
    (1, 256, 4, 2, 96, "float32", 20.0, True, None, True, 64),  # padded head dim, f32
    (1, 512, 4, 2, 192, "bfloat16", 0.0, True, None, True, 300),  # head dim 192 (Mosaic: not a lane multiple)
    (1, 512, 4, 2, 128, "float32", 0.0, False, 32, True, 48),  # bidirectional local
    (2, 2048, 16, 8, 128, "bfloat16", 0.0, True, None, True, 1024),
]


CASE_FIELDS = ("B", "L", "H", "K", "D", "dtype", "softcap", "causal", "window_right", "segments", "window")


def check_case(case: tuple, seed: int, interpret: bool, backend: str) -> dict:
    """One correctness case: kernel (in its dtype) vs the float32 oracle on the same rounded inputs."""
    B, L, H, K, D, dtype, softcap, causal, window_right, segments, window = case
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    q, k, v, do = (jnp.asarray(rng.standard_normal(s), dt) for s in
                   ((B, L, H, D), (B, L, K, D), (B, L, K, D), (B, L, H, D)))
    seg = jnp.asarray(packed_segments(rng, B, L, 4)) if segments else None
    row: dict = {"case": dict(zip(CASE_FIELDS, case, strict=True))}

    def kernel(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array) -> tuple[jax.Array, ...]:
        o, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, seg, window, softcap, causal=causal,
                                                          window_right=window_right, interpret=interpret,
                                                          backend=backend), q, k, v)
        return (o, *vjp(do))

    def oracle(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array) -> tuple[jax.Array, ...]:
        f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
        o, vjp = jax.vjp(lambda q, k, v: general_reference(q, k, v, seg, window, softcap, causal, window_right),
                         *f32[:3])
        return (o, *vjp(f32[3]))

    try:
        got = [np.asarray(x, np.float32) for x in jax.jit(kernel)(q, k, v, do)]
        want = [np.asarray(x, np.float32) for x in jax.jit(oracle)(q, k, v, do)]
        for name, g, w in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
            row[name] = {"norm_rel": float(np.linalg.norm(g - w) / np.linalg.norm(w)),
                         "max_rel": float(np.abs(g - w).max() / np.abs(w).max()),
                         "finite": bool(np.isfinite(g).all())}
        limit = 2e-2 if dtype == "bfloat16" else 1e-4
        row["ok"] = all(row[n]["finite"] and row[n]["max_rel"] <= limit for n in ("o", "dq", "dk", "dv"))
    except Exception as e:  # noqa: BLE001 (a lowering failure is a result to record, not a crash)
        row["ok"] = False
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
    return row


def check_correctness(args: argparse.Namespace, interpret: bool) -> list[dict]:
    cases = CORRECTNESS_CASES if not args.cpu_smoke else [(1, 40, 4, 2, 64, "bfloat16", 5.0, True, None, True, 9),
                                                         (1, 32, 2, 1, 64, "float32", 0.0, False, 3, False, 0)]
    rows = []
    for seed, case in enumerate(cases):
        row = check_case(case, seed, interpret, args.kernel_backend)
        log(f"correctness {case}: {'ok' if row['ok'] else 'FAIL'} "
            + " ".join(f"{n}={row[n]['max_rel']:.1e}" for n in ("o", "dq", "dk", "dv") if n in row))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------ timing


def visible_pairs(seg: np.ndarray, window: int) -> int:
    """Causal (query, key) pairs in the same document and within the window, summed over the batch."""
    total = 0
    for row in seg:
        _, lengths = np.unique(row, return_counts=True)  # ids are contiguous runs
        for n in lengths:
            w = n if window <= 0 else min(window, n)
            total += w * (w + 1) // 2 + (n - w) * w  # the first w queries see 1..w keys, the rest see w
    return int(total)


def implementations(args: argparse.Namespace, interpret: bool) -> dict[str, Callable[..., jax.Array | None]]:
    """name -> f(q, k, v, seg, window) or None where it cannot express the mask."""

    def keel_pallas(q, k, v, seg, window):  # noqa: ANN001, ANN202
        bwd = None if args.bwd_block_q is None else (args.bwd_block_q, args.bwd_block_k)
        return flash_attention(q, k, v, seg, window, block_q=args.block_q, block_k=args.block_k,
                               backward_blocks=bwd, interpret=interpret, num_warps=args.num_warps,
                               num_stages=args.num_stages, backend=args.kernel_backend)

    def keel_reference(q, k, v, seg, window):  # noqa: ANN001, ANN202
        return attention(q, k, v, jnp.zeros(q.shape[:2], jnp.int32) if seg is None else seg, window)

    def dpa(impl: str):  # noqa: ANN202
        def f(q, k, v, seg, window):  # noqa: ANN001, ANN202
            if seg is not None:
                return None  # no segment ids in its public API (a dense B x L x L mask would defeat the point)
            local = None if window <= 0 else (window - 1, 0)
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                                implementation=impl)
        return f

    def jax_pallas_triton(q, k, v, seg, window):  # noqa: ANN001, ANN202
        if window > 0:
            return None  # no sliding window
        from jax.experimental.pallas.ops.gpu import attention as jax_attention

        G = q.shape[2] // k.shape[2]
        k, v = (jnp.repeat(x, G, axis=2) for x in (k, v))
        return jax_attention.mha(q, k, v, seg, sm_scale=q.shape[-1] ** -0.5, causal=True, interpret=interpret)

    def jax_splash(q, k, v, seg, window):  # noqa: ANN001, ANN202
        from jax.experimental.pallas.ops.tpu import splash_attention as sa

        B, L, H, D = q.shape
        k, v = (jnp.repeat(x, H // x.shape[2], axis=2) for x in (k, v))
        mask = sa.CausalMask((L, L)) if window <= 0 else sa.LocalMask((L, L), (window - 1, 0), 0)
        b = min(512, L)
        sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                              block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
        kernel = sa.make_splash_mha(sa.MultiHeadMask([mask] * H), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)

        def one(q_LHD, k_LHD, v_LHD, seg_L):  # noqa: ANN001, ANN202
            ids = None if seg_L is None else sa.SegmentIds(q=seg_L, kv=seg_L)
            o_HLD = kernel(*(x.transpose(1, 0, 2) for x in (q_LHD * D**-0.5, k_LHD, v_LHD)), segment_ids=ids)
            return o_HLD.transpose(1, 0, 2)

        return jax.vmap(one, in_axes=(0, 0, 0, None if seg is None else 0))(q, k, v, seg)

    if args.kernel_backend == "mosaic":
        impls = {"keel_pallas": keel_pallas, "jax_splash": jax_splash, "xla": dpa("xla"),
                 "keel_reference": keel_reference}
    else:
        impls = {"keel_pallas": keel_pallas, "cudnn": dpa("cudnn"), "xla": dpa("xla"),
                 "jax_pallas_triton": jax_pallas_triton, "keel_reference": keel_reference}
        if args.cpu_smoke:
            impls.pop("cudnn")
    return {n: f for n, f in impls.items() if n in args.impls}


def median_time(f: Callable[[], object], reps: int) -> float:
    jax.block_until_ready(f())  # warm-up (compile outside: the caller compiles first)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_one(fn: Callable[..., jax.Array | None], inputs: list[dict], seg: jax.Array | None, window: int,
             reps: int, only_fwd: bool = False) -> dict:
    """Forward and forward+backward median seconds, rotating over input sets so the L2 cache cannot help."""
    q0, k0, v0 = inputs[0]["q"], inputs[0]["k"], inputs[0]["v"]
    if jax.eval_shape(lambda q, k, v: fn(q, k, v, seg, window), q0, k0, v0) is None:
        return {"status": "n/a"}
    fwd = jax.jit(lambda q, k, v: fn(q, k, v, seg, window))

    def fwd_bwd(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array) -> tuple[jax.Array, ...]:
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg, window), q, k, v)
        return vjp(do)

    fwd_bwd_jit = jax.jit(fwd_bwd)
    out = {"status": "ok"}
    for name, f, argnames in (("fwd", fwd, "qkv"), ("fwd_bwd", fwd_bwd_jit, "qkvd"))[:1 if only_fwd else 2]:
        t = time.perf_counter()
        compiled = f.lower(*(inputs[0][a if a != "d" else "do"] for a in argnames)).compile()
        out[f"{name}_compile_s"] = time.perf_counter() - t
        i = iter(range(10**9))

        def call(compiled=compiled, argnames=argnames, i=i):  # noqa: ANN001, ANN202
            x = inputs[next(i) % len(inputs)]
            return compiled(*(x[a if a != "d" else "do"] for a in argnames))

        out[f"{name}_s"] = median_time(call, reps)
    return out


TUNING = {  # forward (block_q, block_k, num_warps), then backward (block_q, block_k) with the chosen warps
    "triton": (((64, 64, 4), (128, 64, 8), (128, 128, 8)), ((64, 64), (32, 64), (64, 32), (128, 64))),
    "mosaic": (((512, 512, None), (256, 512, None), (1024, 512, None)), ((512, 512), (256, 512), (512, 256))),
}


def tune_blocks(args: argparse.Namespace, interpret: bool) -> list[dict]:
    """Pick keel's block sizes on plain causal attention at --tune-seq: forward blocks and warps by forward time,
    then backward blocks by forward+backward time. Sets them on `args` for the table; returns every try."""
    L = args.tune_seq
    B = max(1, args.tokens // L)
    keys = iter(jax.random.split(jax.random.key(0), 4))
    inputs = [{name: jax.random.normal(next(keys), shape, jnp.bfloat16) for name, shape in
               (("q", (B, L, args.heads, 128)), ("k", (B, L, args.kv_heads, 128)), ("v", (B, L, args.kv_heads, 128)),
                ("do", (B, L, args.heads, 128)))}]
    tries = []

    def attempt(fwd: tuple[int, int, int], bwd: tuple[int, int], only_fwd: bool) -> float:
        def fn(q, k, v, seg, window):  # noqa: ANN001, ANN202
            return flash_attention(q, k, v, seg, window, block_q=fwd[0], block_k=fwd[1], num_warps=fwd[2],
                                   backward_blocks=bwd, interpret=interpret, num_stages=args.num_stages,
                                   backend=args.kernel_backend)
        try:
            r = time_one(fn, inputs, None, 0, args.reps, only_fwd=only_fwd)
            t = r["fwd_s"] if only_fwd else r["fwd_bwd_s"]
        except Exception as e:  # noqa: BLE001 (a config that does not compile is skipped)
            r, t = {"status": f"error: {type(e).__name__}: {str(e)[:200]}"}, float("inf")
        tries.append({"fwd": fwd, "bwd": bwd, "only_fwd": only_fwd, **r})
        log(f"tune L={L} fwd {fwd} bwd {bwd}: " + (f"{t * 1e3:.2f} ms" if t < float("inf") else r["status"]))
        return t

    fwd_tries, bwd_tries = TUNING[args.kernel_backend]
    if args.cpu_smoke:
        fwd_tries, bwd_tries = fwd_tries[:1], bwd_tries[:1]
    best_fwd = min(fwd_tries, key=lambda f: attempt(f, f[:2], only_fwd=True))
    best_bwd = min(bwd_tries, key=lambda b: attempt(best_fwd, b, only_fwd=False))
    args.block_q, args.block_k, args.num_warps = best_fwd
    args.bwd_block_q, args.bwd_block_k = best_bwd
    log(f"tuned: forward blocks {best_fwd[:2]}, {best_fwd[2]} warps; backward blocks {best_bwd}")
    return tries


PRIORITY = (("keel_pallas", "cudnn", "jax_splash"), ("jax_pallas_triton", "xla", "keel_reference"))  # in order


def run_timing(args: argparse.Namespace, interpret: bool) -> list[dict]:
    """Every (seq, mask) for keel and cuDNN first, then the other baselines, so a tight budget keeps the rows
    that matter most (the budget skips rows; it never stops one mid-way)."""
    rows = []
    H, K, D = args.heads, args.kv_heads, 128
    impls = implementations(args, interpret)
    scenarios = [("causal", 0, 0), ("documents", args.docs, 0), ("window", 0, args.window)]
    for group in PRIORITY:
        for L in args.seqs:
            if not any(name in impls for name in group):
                continue
            B = max(1, args.tokens // L)
            keys = iter(jax.random.split(jax.random.key(L), 4 * args.input_sets))
            inputs = [{name: jax.random.normal(next(keys), shape, jnp.bfloat16) for name, shape in
                       (("q", (B, L, H, D)), ("k", (B, L, K, D)), ("v", (B, L, K, D)), ("do", (B, L, H, D)))}
                      for _ in range(args.input_sets)]
            rng = np.random.default_rng(L)
            for scenario, docs, window in scenarios:
                seg_np = packed_segments(rng, B, L, docs) if docs else np.ones((B, L), np.int32)
                seg = jnp.asarray(seg_np) if docs else None
                fwd_flop = 4 * D * H * visible_pairs(seg_np, window)
                for name in group:
                    if name in impls:
                        rows.append(time_row(args, impls[name], name, inputs, seg, window, scenario, fwd_flop))
    return rows


def time_row(args: argparse.Namespace, fn: Callable[..., jax.Array | None], name: str, inputs: list[dict],
             seg: jax.Array | None, window: int, scenario: str, fwd_flop: float) -> dict:
    B, L, H, D = inputs[0]["q"].shape
    row = {"L": L, "B": B, "H": H, "K": inputs[0]["k"].shape[2], "D": D, "scenario": scenario,
           "docs": args.docs if seg is not None else 0, "window": window, "impl": name, "fwd_flop": fwd_flop}
    dense_score_gib = B * H * L * L * 4 / 2**30
    if name in ("xla", "keel_reference") and dense_score_gib > args.max_score_gib:
        row["status"] = f"skipped: dense scores {dense_score_gib:.0f} GiB"
    elif time.perf_counter() - T0 > args.budget_s:
        row["status"] = "skipped: time budget"
    else:
        try:
            row.update(time_one(fn, inputs, seg, window, args.reps))
        except Exception as e:  # noqa: BLE001 (record and go on: the lease is short)
            row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
    if row.get("status") == "ok":
        row["fwd_tflops"] = fwd_flop / row["fwd_s"] / 1e12
        row["fwd_bwd_tflops"] = 3.5 * fwd_flop / row["fwd_bwd_s"] / 1e12
    log(f"L={L} {scenario:9s} {name:18s} " + (
        f"fwd {row['fwd_s'] * 1e3:8.2f} ms {row['fwd_tflops']:6.1f} TF/s | fwd+bwd "
        f"{row['fwd_bwd_s'] * 1e3:8.2f} ms {row['fwd_bwd_tflops']:6.1f} TF/s"
        if row.get("status") == "ok" else row["status"]))
    return row


def tables(correct: list[dict], timing: list[dict], meta: dict) -> str:
    lines = [f"# keel flash attention on {meta['device']} ({meta['date']})", "",
             f"jax {meta['jax']}, jaxlib {meta['jaxlib']}, Python {meta['python']}; command: `{meta['command']}`", "",
             "## Correctness vs the float32 reference (max |x - ref| / max |ref|)", "",
             "| case | o | dq | dk | dv | ok |", "|---|---|---|---|---|---|"]
    for r in correct:
        c = r["case"]
        name = (f"B{c['B']} L{c['L']} H{c['H']}/K{c['K']} D{c['D']} {c['dtype']} softcap {c['softcap']} "
                f"{'causal' if c['causal'] else 'bidir'} w {c['window']}/{c['window_right']} seg {c['segments']}")
        errs = [f"{r[n]['max_rel']:.1e}" if n in r else "-" for n in ("o", "dq", "dk", "dv")]
        lines.append(f"| {name} | {' | '.join(errs)} | {'yes' if r['ok'] else 'NO ' + r.get('error', '')[:80]} |")
    peer = "jax_splash" if any(r["impl"] == "jax_splash" for r in timing) else "cudnn"
    lines += ["", f"## Timing, causal bf16, D 128 (ms; TFLOP/s on visible pairs; x = time of {peer} / time)", "",
              f"| L | mask | impl | fwd ms | fwd TF/s | fwd+bwd ms | fwd+bwd TF/s | fwd x {peer} | fwd+bwd x {peer} |",
              "|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["L"], r["scenario"], r["impl"]): r for r in timing}
    order = {"causal": 0, "documents": 1, "window": 2}
    for r in sorted(timing, key=lambda r: (r["L"], order[r["scenario"]])):
        if r.get("status") != "ok":
            lines.append(f"| {r['L']} | {r['scenario']} | {r['impl']} | {r['status']} | | | | | |")
            continue
        base = by_key.get((r["L"], r["scenario"], peer)) or by_key.get((r["L"], "causal", peer))
        ratio = ["-", "-"]
        if base and base.get("status") == "ok":
            ratio = [f"{base['fwd_s'] / r['fwd_s']:.2f}", f"{base['fwd_bwd_s'] / r['fwd_bwd_s']:.2f}"]
        lines.append(f"| {r['L']} | {r['scenario']} | {r['impl']} | {r['fwd_s'] * 1e3:.2f} | {r['fwd_tflops']:.1f} | "
                     f"{r['fwd_bwd_s'] * 1e3:.2f} | {r['fwd_bwd_tflops']:.1f} | {ratio[0]} | {ratio[1]} |")
    if peer == "cudnn":
        lines += ["", "For documents, the x columns compare against cudnn on plain causal (it cannot mask documents)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the lease-sized run (default sizes, 3 reps)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in interpret mode: checks the flow")
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--tokens", type=int, default=32768, help="B * L per timing row")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--docs", type=int, default=8, help="documents per sequence in the 'documents' rows")
    ap.add_argument("--window", type=int, default=1024, help="sliding window of the 'window' rows")
    ap.add_argument("--kernel-backend", choices=["triton", "mosaic"], default=None,
                    help="keel's kernels: Triton (GPU) or Mosaic (TPU); default by platform")
    ap.add_argument("--block-q", type=int, default=None, help="default: the kernel's (64 Triton, 512 Mosaic)")
    ap.add_argument("--block-k", type=int, default=None)
    ap.add_argument("--bwd-block-q", type=int, default=None)
    ap.add_argument("--bwd-block-k", type=int, default=None)
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--num-stages", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--input-sets", type=int, default=2)
    ap.add_argument("--max-score-gib", type=float, default=24.0)
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting timing rows after this")
    ap.add_argument("--impls", nargs="+",
                    default=["keel_pallas", "cudnn", "jax_splash", "jax_pallas_triton", "xla", "keel_reference"])
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--tune", action="store_true", help="pick keel's block sizes first (on by --quick)")
    ap.add_argument("--tune-seq", type=int, default=8192)
    ap.add_argument("--out", default=os.environ.get("OUT", "attention_out"))
    args = ap.parse_args()
    if args.quick:
        args.reps, args.tune = 3, True
    if args.kernel_backend is None:
        args.kernel_backend = "mosaic" if jax.default_backend() == "tpu" else "triton"
    if args.cpu_smoke:
        block = 16 if args.kernel_backend == "triton" else 128
        args.seqs, args.tokens, args.heads, args.kv_heads, args.docs = [4 * block], 4 * block, 2, 1, 3
        args.window, args.tune_seq = block, 2 * block
        args.block_q = args.block_k = args.bwd_block_q = args.bwd_block_k = block
        args.reps, args.input_sets = 1, 1
    interpret = jax.default_backend() == "cpu"
    meta = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "jax": jax.__version__,
            "jaxlib": __import__("jaxlib").__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
            "interpret": interpret, "args": vars(args)}
    log(f"{meta['device']} ({meta['backend']}), jax {meta['jax']}, jaxlib {meta['jaxlib']}, Python {meta['python']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    correct = [] if args.skip_correctness else check_correctness(args, interpret)
    (out / "attention.json").write_text(json.dumps({"meta": meta, "correctness": correct}, indent=1))
    tuning = tune_blocks(args, interpret) if args.tune else []
    timing = run_timing(args, interpret)
    (out / "attention.json").write_text(json.dumps({"meta": meta, "correctness": correct, "tuning": tuning,
                                                    "timing": timing, "blocks": {
                                                        "fwd": [args.block_q, args.block_k, args.num_warps],
                                                        "bwd": [args.bwd_block_q, args.bwd_block_k]}}, indent=1))
    text = tables(correct, timing, meta) + (
        f"\n\nkeel blocks: forward {args.block_q} x {args.block_k}, {args.num_warps} warps; backward "
        f"{args.bwd_block_q} x {args.bwd_block_k}" + (f" (tuned at L = {args.tune_seq})" if args.tune else ""))
    (out / "attention.md").write_text(text + "\n")
    print(text)
    if not all(r["ok"] for r in correct):
        sys.exit(1)


if __name__ == "__main__":
    main()
