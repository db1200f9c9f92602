"""`model.attention=auto`: the fastest correct attention for this device, per-device shape and mask, measured.

Candidates by platform: on GPUs keel's Pallas kernels (Triton), cuDNN (not with a logit softcap or float32
compute) and XLA; on TPUs keel's Pallas kernels (Mosaic) and XLA; on the CPU only XLA (Pallas runs interpreted
there, for tests, and never wins). Each candidate runs forward and backward once on random inputs of the shape
one device sees, with packed documents (8 per row) and each distinct layer window of the model:

- it is *correct* when its output and its gradients agree with the float32 reference on the same rounded inputs
  (max |x - ref| <= tol * max(1, max |ref|); tol 2e-2 for 16-bit compute, 1e-3 for float32), checked on one row
  of at most 1024 tokens (the dense reference must fit); a candidate that fails to compile, raises or disagrees
  is dropped, and the reason is printed;
- its *time* is the median of `reps` forward+backward calls per window, weighted by the layers that use it.

The fastest correct candidate wins; XLA is always a candidate and the fallback. Decisions are cached in the
process and on disk (`$KEEL_CACHE_DIR/attention.json`, default `~/.cache/keel`), keyed by device kind, jax
version and the case, so a restarted run on the same machine makes the same choice without measuring. In a
multi-process run process 0 decides and broadcasts its choice, so every process compiles the same program.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from keel.kernels.reference import attention

AttentionFn = Callable[..., jax.Array]
TOLERANCE = {2: 2e-2, 4: 1e-3}  # by the compute dtype's bytes
DOCUMENTS = 8  # per row of the measured batch


@dataclasses.dataclass(frozen=True)
class Case:
    """What the choice depends on: per-device shapes, compute dtype and the attention's static arguments."""

    q_shape: tuple[int, int, int, int]  # B, L, H, D on one device
    k_shape: tuple[int, int, int, int]
    dtype: str
    softcap: float
    scale: float | None
    windows: tuple[tuple[int, int], ...]  # (window, layers using it); window 0 = global

    def for_check(self, max_len: int = 1024) -> Case:
        """The same attention on one row of at most `max_len` tokens: enough for correctness, and small enough
        that the dense float32 reference fits beside any shape training uses."""
        (_, L, H, D), (_, _, K, _) = self.q_shape, self.k_shape
        n = min(L, max_len)
        return dataclasses.replace(self, q_shape=(1, n, H, D), k_shape=(1, n, K, D))

    def key(self, device_kind: str) -> str:
        return json.dumps({"device": device_kind, "jax": jax.__version__, **dataclasses.asdict(self)},
                          sort_keys=True)


def candidates(platform: str, case: Case) -> list[str]:
    """The implementations worth measuring on `platform` for `case`, most specialised first."""
    if platform == "gpu":
        cudnn = case.softcap <= 0 and jnp.dtype(case.dtype).itemsize == 2
        return ["pallas", *(["cudnn"] if cudnn else []), "xla"]
    if platform == "tpu":
        return ["pallas", "xla"]
    return ["xla"]


def _inputs(case: Case, seed: int = 0) -> dict[str, jax.Array]:
    B, L, H, D = case.q_shape
    keys = jax.random.split(jax.random.key(seed), 4)
    dtype = jnp.dtype(case.dtype)
    rng = np.random.default_rng(seed)
    starts = np.zeros((B, L), bool)
    starts[:, 0] = True
    for row in starts:
        row[rng.choice(np.arange(1, L), min(DOCUMENTS - 1, L - 1), replace=False)] = True
    return {"q": jax.random.normal(keys[0], case.q_shape, dtype), "k": jax.random.normal(keys[1], case.k_shape, dtype),
            "v": jax.random.normal(keys[2], case.k_shape, dtype), "do": jax.random.normal(keys[3], case.q_shape, dtype),
            "seg": jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)}


def _forward_backward(fn: AttentionFn, case: Case) -> Callable[..., tuple[jax.Array, ...]]:
    def run(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, window: jax.Array,
            do: jax.Array) -> tuple[jax.Array, ...]:
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg, window, case.softcap, case.scale), q, k, v)
        return (o, *vjp(do))

    return jax.jit(run)


def check(fn: AttentionFn, case: Case) -> str | None:
    """None when `fn` gives the float32 reference's output and gradients within tolerance for every window of
    the case (on `case.for_check()`: one row of at most 1024 tokens); else why not."""
    case = case.for_check()
    x = _inputs(case, seed=1)
    got_fn = _forward_backward(fn, case)
    want_fn = _forward_backward(attention, dataclasses.replace(case, dtype="float32"))
    tol = TOLERANCE[jnp.dtype(case.dtype).itemsize]
    f32 = {n: x[n].astype(jnp.float32) for n in ("q", "k", "v", "do")}
    for window, _ in case.windows:
        w = jnp.int32(window)
        got = got_fn(x["q"], x["k"], x["v"], x["seg"], w, x["do"])
        want = want_fn(f32["q"], f32["k"], f32["v"], x["seg"], w, f32["do"])
        for name, g, r in zip(("output", "dq", "dk", "dv"), got, want, strict=True):
            g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
            err = float(np.abs(g - r).max() / max(1.0, float(np.abs(r).max())))
            if not np.isfinite(g).all() or err > tol:
                return f"{name} differs from the reference by {err:.2e} (tolerance {tol:g}) at window {window}"
    return None


def measure(fn: AttentionFn, case: Case, reps: int = 3) -> float:
    """Seconds of one forward+backward of every layer of the case: median of `reps` calls per window, weighted
    by the layers that use it (after a warm-up call that compiles)."""
    x = _inputs(case)
    run = _forward_backward(fn, case)
    total = 0.0
    for window, layers in case.windows:
        args = (x["q"], x["k"], x["v"], x["seg"], jnp.int32(window), x["do"])
        jax.block_until_ready(run(*args))
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(run(*args))
            times.append(time.perf_counter() - t)
        total += layers * statistics.median(times)
    return total


def _cache_path() -> Path:
    return Path(os.environ.get("KEEL_CACHE_DIR", Path.home() / ".cache" / "keel")) / "attention.json"


def _read_cache() -> dict[str, str]:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, name: str) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache() | {key: name}
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:  # a read-only home costs a re-measurement next time, nothing else
        _say(f"could not write {path}: {e}")


def _say(msg: str) -> None:
    print(f"model.attention=auto: {msg}", file=sys.stderr, flush=True)


_CHOSEN: dict[str, str] = {}


def decide(case: Case, implementations: Mapping[str, AttentionFn], platform: str | None = None,
           reps: int = 3) -> tuple[str, dict[str, str]]:
    """(the fastest correct candidate's name, what each candidate measured), without caches or broadcast."""
    platform = platform or jax.default_backend()
    best, best_s, report = "xla", float("inf"), {}
    for name in candidates(platform, case):
        try:
            problem = check(implementations[name], case)
            if problem is not None:
                report[name] = f"wrong: {problem}"
                continue
            seconds = measure(implementations[name], case, reps)
        except Exception as e:  # noqa: BLE001 (a candidate that cannot run here is dropped, not fatal)
            report[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        report[name] = f"{seconds * 1e3:.2f} ms"
        if seconds < best_s:
            best, best_s = name, seconds
    return best, report


def choose(case: Case, implementations: Mapping[str, AttentionFn]) -> str:
    """The implementation `model.attention=auto` runs for `case` (see the module docstring)."""
    device_kind = jax.local_devices()[0].device_kind
    key = case.key(device_kind)
    if key not in _CHOSEN:
        names = candidates(jax.default_backend(), case)
        name = _read_cache().get(key) if len(names) > 1 else "xla"
        if name not in names and jax.process_index() == 0:
            # In a thread of its own: JAX's tracing state is per thread, so the candidates run now, on concrete
            # arrays, even when the train step that asked is being traced (and outside its mesh).
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                name, report = pool.submit(decide, case, implementations).result()
            _say(f"{name} for per-device q {case.q_shape}, k/v {case.k_shape}, {case.dtype} on {device_kind} ("
                 + "; ".join(f"{n}: {r}" for n, r in report.items()) + ")")
            _write_cache(key, name)
        if jax.process_count() > 1 and len(names) > 1:  # every process compiles what process 0 chose
            from jax.experimental import multihost_utils

            index = names.index(name) if name in names else -1
            name = names[int(multihost_utils.broadcast_one_to_all(np.int32(index)))]
        _CHOSEN[key] = name
    return _CHOSEN[key]


__all__ = ["Case", "candidates", "check", "choose", "decide", "measure"]
