"""Burn-in: find slow, wrong and flaky accelerators with the same JAX programs on NVIDIA, AMD, TPU and CPU.

Every check measures something per device (or per link), and two verdicts judge it:
- an absolute floor from the accelerator's spec (`keel.diag.specs`): e.g. bf16 matmul below 70 % of the data
  sheet is slow whatever the neighbours do (CPUs have no spec and skip it);
- a robust fleet-relative score across the devices measured together: slow if the value is below
  median x (1 - tolerance) and more than `z` robust standard deviations (1.4826 MAD) under the median.
Correctness is never relative to a tolerance: results are compared bitwise against a known answer or the
majority of the devices, and across repeats.

Verdicts per device: pass, slow, wrong, could_not_run. `keel burnin` exits 0 only when every device passes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import platform
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from keel.config import check_registry
from keel.diag.inject import Faults
from keel.diag.specs import AcceleratorSpec, match
from keel.diag.verdicts import (
    CHECK_NAMES,
    EXIT_CODES,
    NOT_RUN,
    PASS,
    SCHEMA,
    SEVERITY,
    SKIPPED,
    SLOW,
    WRONG,
    CheckName,
    robust_low,
)

# ------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """Sizes, repeats and thresholds. `for_platform` picks them for the devices at hand and --quick."""

    matmul_n: int = 8192
    copy_bytes: int = 1 << 30
    transfer_bytes: int = 1 << 28
    collective_bytes: int = 1 << 26
    repeats: int = 5
    sustained_s: float = 60.0
    windows: int = 10
    probe_batch: int = 8
    matmul_floor: float = 0.70  # of the spec's dense peak
    memory_floor: float = 0.75  # of the spec's HBM bandwidth
    tolerance: float = 0.10  # fleet-relative: this far below the median ...
    z: float = 4.0  # ... and this many robust sigmas
    drift: float = 0.90  # sustained: last windows / first windows below this is throttling
    drift_needs_peers: bool = False  # ... and (CPU) a fleet-relative outlier among the devices' drifts

    @classmethod
    def for_platform(cls, platform_name: str, quick: bool) -> Settings:
        if platform_name == "cpu":  # development and tests: small, and generous to timing noise
            return cls(matmul_n=256, copy_bytes=1 << 22, transfer_bytes=1 << 22, collective_bytes=1 << 18,
                       repeats=7, sustained_s=0.6 if quick else 3.0, windows=6, probe_batch=2,
                       tolerance=0.5, z=3.0, drift=0.5, drift_needs_peers=True)
        if quick:
            return cls(matmul_n=4096, copy_bytes=1 << 28, transfer_bytes=1 << 26, collective_bytes=1 << 24,
                       repeats=3, sustained_s=10.0, windows=5)
        return cls()


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Measurement:
    check: str
    metric: str
    value: float | str
    unit: str
    verdict: str
    device: int | None = None  # jax device id
    link: tuple[int, int] | None = None  # (src, dst) device ids
    threshold: str = ""
    note: str = ""


@dataclass
class Context:
    devices: list[jax.Device]
    settings: Settings
    faults: Faults
    spec: AcceleratorSpec | None
    log: Callable[[str], None] = print

    @property
    def ids(self) -> list[int]:
        return [d.id for d in self.devices]


def judge(check: str, metric: str, unit: str, values: dict[int, float], ctx: Context,
          floor: float | None = None, links: bool = False) -> list[Measurement]:
    """Throughput measurements per device (or link) with both verdicts."""
    s = ctx.settings
    slow = robust_low(values, s.tolerance, s.z)
    out = []
    for key, v in values.items():
        verdict, why = PASS, []
        if floor is not None and v < floor:
            verdict = SLOW
            why.append(f"below the spec floor {floor:.4g}")
        if key in slow:
            verdict = SLOW
            why.append(slow[key])
        thr = (f">= {floor:.4g}; " if floor is not None else "") + f">= {1 - s.tolerance:.2f}x median"
        out.append(Measurement(check, metric, float(v), unit, verdict, device=None if links else key,
                               link=key if links else None, threshold=thr, note="; ".join(why)))
    return out


def _best_times(fns: dict[Any, Callable[[], Any]], repeats: int) -> dict[Any, float]:
    """Best wall time per device of `repeats` calls, the devices taking turns: a burst of noise from elsewhere
    on the machine hits every device a little instead of one device a lot."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def _hash(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def _mesh(ctx: Context) -> Mesh:
    return Mesh(np.array(ctx.devices), ("d",))


def _per_device(stacked: jax.Array) -> dict[int, np.ndarray]:
    """The shards of a (n_devices, ...) array sharded over the device axis, by device id."""
    return {s.device.id: np.asarray(s.data)[0] for s in stacked.addressable_shards}


# ------------------------------------------------------------------------------------------------- checks

_matmul = jax.jit(lambda a, b: a @ b)
_increment = jax.jit(lambda x: x + 1.0)
_matmul_f32_out = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))


@functools.lru_cache(maxsize=8)
def _fp8_works(device: jax.Device) -> bool:
    """Whether this backend compiles and runs an fp8 matmul (H100/H200/B200/MI300X do; older parts do not)."""
    try:
        a = jax.device_put(jnp.ones((256, 256), jnp.float32).astype(jnp.float8_e4m3fn), device)
        jax.block_until_ready(_matmul_f32_out(a, a))
        return True
    except Exception:  # noqa: BLE001 - any failure means: not supported here
        return False


def _dtypes(ctx: Context) -> list[tuple[str, Any]]:
    out = [("bf16", jnp.bfloat16), ("fp32", jnp.float32)]
    if ctx.spec is not None and ctx.spec.fp8_tflops and _fp8_works(ctx.devices[0]):
        out.append(("fp8", jnp.float8_e4m3fn))
    return out


def check_matmul(ctx: Context) -> list[Measurement]:
    """Dense matmul throughput per dtype and device, against the spec and against the other devices."""
    n = ctx.settings.matmul_n
    out = []
    for name, dtype in _dtypes(ctx):
        fn = _matmul_f32_out if name == "fp8" else _matmul
        inputs = {d.id: jax.device_put(jnp.ones((n, n), dtype) * 0.5, d) for d in ctx.devices}
        times = _best_times({d: (lambda a=a, fn=fn: fn(a, a)) for d, a in inputs.items()}, ctx.settings.repeats)
        rate = {d: 2 * n**3 / ctx.faults.duration(d, t) / 1e12 for d, t in times.items()}
        peak = None if ctx.spec is None else {"bf16": ctx.spec.bf16_tflops, "fp8": ctx.spec.fp8_tflops}.get(name)
        out += judge("matmul", f"{name} TFLOP/s", "TFLOP/s", rate, ctx,
                     floor=None if not peak else ctx.settings.matmul_floor * peak)
    if ctx.spec is not None and ctx.spec.fp8_tflops and "fp8" not in dict(_dtypes(ctx)):
        out.append(Measurement("matmul", "fp8 TFLOP/s", "not run", "", SKIPPED,
                               note=f"{ctx.spec.name} has fp8 but this backend did not compile an fp8 matmul"))
    return out


def check_known_answer(ctx: Context) -> list[Measurement]:
    """Matmuls of small integers (exact in every dtype, accumulated exactly in fp32) compared bitwise."""
    n = 256
    rng = np.random.default_rng(1234)
    a_i, b_i = rng.integers(-3, 4, (n, n)), rng.integers(-3, 4, (n, n))
    expect = (a_i @ b_i).astype(np.float32)
    out = []
    for name, dtype in _dtypes(ctx):
        for dev in ctx.devices:
            a, b = (jax.device_put(jnp.asarray(x, jnp.float32).astype(dtype), dev) for x in (a_i, b_i))
            got = ctx.faults.result(dev.id, np.asarray(_matmul_f32_out(a, b)))
            bad = int((got.view(np.uint32) != expect.view(np.uint32)).sum())
            out.append(Measurement("known_answer", f"{name} wrong elements", bad, "elements", WRONG if bad else PASS,
                                   device=dev.id, threshold="== 0", note=f"of {n * n}" if bad else ""))
    return out


def _agreement(check: str, metric: str, hashes: dict[int, list[str]], local: list[int]) -> list[Measurement]:
    """Identical across repeats (else flaky) and across devices (else the minority is wrong). `hashes` may hold
    other hosts' devices too; measurements are made for the local ones."""
    firsts = [h[0] for h in hashes.values()]
    majority = max(set(firsts), key=firsts.count)
    out = []
    for dev in local:
        hs = hashes[dev]
        if len(set(hs)) > 1:
            verdict, note = WRONG, f"nondeterministic: {len(set(hs))} different results in {len(hs)} repeats"
        elif hs[0] != majority and firsts.count(majority) > 1:
            verdict, note = WRONG, f"differs from {firsts.count(majority)} of {len(firsts)} devices"
        else:
            verdict, note = PASS, f"agrees with {firsts.count(hs[0])} of {len(firsts)} devices"
        out.append(Measurement(check, metric, hs[0], "sha256", verdict, device=dev,
                               threshold="same on every device and repeat", note=note))
    return out


@functools.lru_cache(maxsize=32)
def _replicated(fn: Callable, devices: tuple[jax.Device, ...], n_args: int) -> Callable:
    mesh = Mesh(np.array(devices), ("d",))

    def body(*xs):
        return jax.tree.map(lambda y: y[None], fn(*xs))

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(PartitionSpec() for _ in range(n_args)),
                                 out_specs=PartitionSpec("d")))


def _replicated_run(ctx: Context, fn: Callable, *args: Any) -> Callable[[], dict[int, np.ndarray]]:
    """fn(*args) on every device at once: one compiled program (cached per function and devices), the same
    inputs, one result per device."""
    run = _replicated(fn, tuple(ctx.devices), len(args))
    placed = [jax.device_put(a, NamedSharding(_mesh(ctx), PartitionSpec())) for a in args]
    return lambda: _per_device(run(*placed))


def _sdc_program(x: jax.Array, w: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ w)
    return (h @ w.T).astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)


def check_sdc(ctx: Context) -> list[Measurement]:
    """The same program and inputs on every device, several times: result hashes must all agree."""
    rng = np.random.default_rng(7)
    n = min(ctx.settings.matmul_n, 1024)
    x, w = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32) / np.sqrt(n)
    run = _replicated_run(ctx, _sdc_program, x, w)
    hashes: dict[int, list[str]] = {d: [] for d in ctx.ids}
    for r in range(ctx.settings.repeats):
        for dev, res in run().items():
            hashes[dev].append(_hash(ctx.faults.result(dev, res, r)))
    return _agreement("sdc", "result hash", _across_hosts(hashes), ctx.ids)


def _across_hosts(hashes: dict[int, list[str]]) -> dict[int, list[str]]:
    """Under jax.distributed, every host's devices' hashes (each host runs the same program)."""
    if jax.process_count() == 1:
        return hashes
    from jax.experimental import multihost_utils

    local = json.dumps(hashes).encode().ljust(1 << 16, b" ")
    allb = multihost_utils.process_allgather(np.frombuffer(local, np.uint8))
    merged: dict[int, list[str]] = {}
    for row in np.asarray(allb).reshape(jax.process_count(), -1):
        merged.update({int(k): v for k, v in json.loads(bytes(row).decode().strip()).items()})
    return merged


def check_memory(ctx: Context) -> list[Measurement]:
    """Device copy bandwidth (read + write of a large array) and host<->device transfer bandwidth."""
    s = ctx.settings
    host = np.ones(s.transfer_bytes // 4, np.float32)
    xs = {d.id: jax.device_put(jnp.zeros(s.copy_bytes // 4, jnp.float32), d) for d in ctx.devices}
    ys = {d.id: jax.device_put(host, d) for d in ctx.devices}
    by_id = {d.id: d for d in ctx.devices}

    def rates(fns: dict[int, Callable[[], Any]], nbytes: int) -> dict[int, float]:
        times = _best_times(fns, s.repeats)
        return {d: nbytes / ctx.faults.duration(d, t) / 1e9 for d, t in times.items()}

    bw = rates({d: (lambda x=x: _increment(x)) for d, x in xs.items()}, 2 * s.copy_bytes)
    h2d = rates({d: (lambda d=d: jax.device_put(host, by_id[d])) for d in xs}, s.transfer_bytes)
    # a fresh device array per read: jax keeps the host copy of an array once it has been read
    d2h = rates({d: (lambda y=y: np.asarray(_increment(y))) for d, y in ys.items()}, s.transfer_bytes)
    floor = None if ctx.spec is None else s.memory_floor * ctx.spec.hbm_tbps * 1e3
    return (judge("memory", "device copy GB/s", "GB/s", bw, ctx, floor=floor)
            + judge("memory", "host->device GB/s", "GB/s", h2d, ctx)
            + judge("memory", "device->host GB/s", "GB/s", d2h, ctx))


# collective name -> (body on one device's block, bus bandwidth factor for n devices, expected result)
def _collectives(n: int) -> dict[str, tuple[Callable, float, Callable[[np.ndarray], np.ndarray]]]:
    ring = tuple((i, (i + 1) % n) for i in range(n))
    return {
        "all_reduce": (lambda x: jax.lax.psum(x, "d"), 2 * (n - 1) / n,
                       lambda full: np.broadcast_to(full.sum(0, keepdims=True), full.shape)),
        "all_gather": (lambda x: jax.lax.all_gather(x, "d", tiled=True)[None], (n - 1) / n,
                       lambda full: np.broadcast_to(full[None], (n, *full.shape))),
        "reduce_scatter": (lambda x: jax.lax.psum_scatter(x, "d", scatter_dimension=1, tiled=True), (n - 1) / n,
                           lambda full: full.sum(0).reshape(n, -1)),
        "all_to_all": (lambda x: jax.lax.all_to_all(x, "d", 1, 1, tiled=True), (n - 1) / n,
                       lambda full: full.reshape(n, n, -1).transpose(1, 0, 2).reshape(n, -1)),
        "ppermute_ring": (lambda x: jax.lax.ppermute(x, "d", ring), 1.0,
                          lambda full: np.roll(full, 1, axis=0)),
    }


@functools.lru_cache(maxsize=64)
def _collective_fn(name: str, devices: tuple[jax.Device, ...], pair: tuple[int, int] | None = None) -> Callable:
    """The jitted collective over `devices` (cached: burn-in runs again and again compile once); `pair`: a
    ppermute of that one link only."""
    body = _collectives(len(devices))[name][0] if pair is None else (
        lambda v: jax.lax.ppermute(v, "d", [pair]))
    mesh = Mesh(np.array(devices), ("d",))
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec("d"), out_specs=PartitionSpec("d")))


def check_collectives(ctx: Context) -> list[Measurement]:
    """Each collective over all devices: exact result on every device, algorithmic and bus bandwidth; then every
    ring link alone (a ppermute of one pair), so one slow link stands out."""
    n = len(ctx.devices)
    if n < 2:
        return [Measurement("collectives", "all", "one device", "", SKIPPED, note="needs >= 2 devices")]
    s = ctx.settings
    mesh = _mesh(ctx)
    per = max(n, (s.collective_bytes // 4) // n * n)
    # small integers: every sum is exact in float32, so results compare bitwise
    full = (np.arange(n * per, dtype=np.int64).reshape(n, per) % 7 + np.arange(n)[:, None]).astype(np.float32)
    x = jax.device_put(full, NamedSharding(mesh, PartitionSpec("d")))
    out = []
    for name, (_, factor, expected) in _collectives(n).items():
        fn = _collective_fn(name, tuple(ctx.devices))
        t = _best_times({0: lambda fn=fn: fn(x)}, s.repeats)[0]
        want = expected(full)
        for sh in fn(x).addressable_shards:
            dev = sh.device.id
            got = ctx.faults.collective(dev, np.asarray(sh.data))
            bad = int((got.view(np.uint32) != np.ascontiguousarray(want[sh.index]).view(np.uint32)).sum())
            out.append(Measurement("collectives", f"{name} wrong elements", bad, "elements", WRONG if bad else PASS,
                                   device=dev, threshold="== 0"))
        algbw = full.nbytes / n / t / 1e9
        out.append(Measurement("collectives", f"{name} bus GB/s", algbw * factor, "GB/s", PASS,
                               note=f"algorithmic {algbw:.3g} GB/s over {n} devices, {full.nbytes // n:,} B each"))
    pairs = {(ctx.devices[i].id, ctx.devices[(i + 1) % n].id):
             _collective_fn("ppermute_pair", tuple(ctx.devices), (i, (i + 1) % n)) for i in range(n)}
    fns = {k: (lambda fn=fn: fn(x)) for k, fn in pairs.items()}
    links = {k: full.nbytes / n / ctx.faults.link(*k, t) / 1e9 for k, t in _best_times(fns, s.repeats).items()}
    out += judge("collectives", "ring link GB/s", "GB/s", links, ctx, links=True)
    return out


def window_drift(rates: Sequence[float]) -> float:
    """Throughput at the end of a sustained run over its start: the median of the last third of the windows'
    rates over the median of the first third (one window each for fewer than 6)."""
    k = max(1, len(rates) // 3)
    return float(np.median(rates[-k:]) / np.median(rates[:k]))


def throttled(drifts: dict[int, float], s: Settings) -> set[int]:
    """The devices whose drift is below `s.drift`. On CPUs (`drift_needs_peers`) the machine's other work moves
    every fake device's drift: there a device must also stand out among the devices' drifts."""
    peers = robust_low(drifts, s.tolerance, s.z) if s.drift_needs_peers else drifts
    return {d for d, v in drifts.items() if v < s.drift and d in peers}


def check_sustained(ctx: Context) -> list[Measurement]:
    """Matmuls for a fixed time on every device at once (a thread per device, so the node is under full load);
    throughput per window must not drift down (throttling). Clocks, power, temperature and ECC counters are
    read near the end of the load where the platform exposes them."""
    s = ctx.settings
    n = s.matmul_n
    xs = {d.id: jax.device_put(jnp.ones((n, n), jnp.bfloat16) * 0.5, d) for d in ctx.devices}
    jax.block_until_ready([_matmul(x, x) for x in xs.values()])
    window = s.sustained_s / s.windows
    # per window and device, the best call: robust to bursts of other work, still sees a clock that drops
    best = {d: [float("inf")] * s.windows for d in xs}
    t_start = time.perf_counter()

    def load(pairs: list[tuple[int, jax.Array]]) -> None:
        while (now := time.perf_counter() - t_start) < s.sustained_s:
            w = min(int(now / window), s.windows - 1)
            for d, x in pairs:
                t0 = time.perf_counter()
                _matmul(x, x).block_until_ready()
                dt = ctx.faults.duration(d, time.perf_counter() - t0, progress=(w + 0.5) / s.windows)
                best[d][w] = min(best[d][w], dt)

    # A thread per accelerator keeps them all busy at once. Fake CPU devices share the same cores: there one
    # thread takes turns, so a device's timings are not another device's contention.
    groups = [list(xs.items())] if ctx.devices[0].platform == "cpu" else [[item] for item in xs.items()]
    threads = [threading.Thread(target=load, args=(g,), daemon=True) for g in groups]
    for t in threads:
        t.start()
    time.sleep(max(0.0, 0.9 * s.sustained_s - (time.perf_counter() - t_start)))
    telemetry = _telemetry(ctx)
    for t in threads:
        t.join()
    rates = {d: [2 * n**3 / b / 1e12 for b in bs if b < float("inf")] for d, bs in best.items()}
    out = []
    drifts = {}
    for d, r in rates.items():
        if len(r) < 2:
            out.append(Measurement("sustained", "throughput drift (last/first)", "too few calls", "", NOT_RUN,
                                   device=d, note=f"{len(r)} windows with a finished matmul; raise the duration"))
            continue
        drifts[d] = window_drift(r)
    throttling = throttled(drifts, s)
    for d, drift in drifts.items():
        slow = d in throttling
        out.append(Measurement("sustained", "throughput drift (last/first)", drift, "ratio", SLOW if slow else PASS,
                               device=d, threshold=f">= {s.drift}" + (" or like the peers" if s.drift_needs_peers
                                                                      else ""),
                               note="throttling" if slow else ""))
    out += judge("sustained", "bf16 TFLOP/s sustained", "TFLOP/s",
                 {d: float(np.median(r)) for d, r in rates.items() if r}, ctx)
    return out + telemetry


def _telemetry(ctx: Context) -> list[Measurement]:
    platform_name, kind = ctx.devices[0].platform, ctx.devices[0].device_kind
    if platform_name != "gpu" or "nvidia" not in kind.lower():
        return [Measurement("sustained", "telemetry", "not read", "", SKIPPED,
                            note=f"keel reads clocks, power, temperature and ECC through NVML only ({kind})")]
    try:
        import pynvml
    except ImportError:
        return [Measurement("sustained", "telemetry", "NVML not installed", "", SKIPPED,
                            note="pip install nvidia-ml-py for clocks, power, temperature and ECC counters")]
    pynvml.nvmlInit()
    out = []
    try:
        for dev in ctx.devices:
            h = pynvml.nvmlDeviceGetHandleByIndex(dev.local_hardware_id or 0)
            vals = {"sm clock MHz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                    "power W": pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
                    "temperature C": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)}
            with contextlib.suppress(pynvml.NVMLError):  # no ECC on this board
                vals["ecc uncorrected"] = pynvml.nvmlDeviceGetTotalEccErrors(
                    h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
            for k, v in vals.items():
                bad = k == "ecc uncorrected" and v > 0
                out.append(Measurement("sustained", k, float(v), k.split()[-1], WRONG if bad else PASS,
                                       device=dev.id, threshold="== 0" if k.startswith("ecc") else ""))
    finally:
        pynvml.nvmlShutdown()
    return out


@functools.lru_cache(maxsize=4)
def _model_step(cfg: Any) -> Callable:
    """Loss and all gradients of the keel model, flattened into one vector (cached per model config)."""
    from keel.model import transformer

    def step(p, tok):
        b, seq = tok.shape[0], tok.shape[1] - 1
        batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": jnp.ones((b, seq), jnp.int32),
                 "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (b, seq)),
                 "loss_mask": jnp.ones((b, seq), jnp.int32)}
        (loss, _), g = jax.value_and_grad(lambda q: transformer.loss_fn(q, batch, cfg), has_aux=True)(p)
        return jnp.concatenate([loss[None]] + [x.reshape(-1).astype(jnp.float32) for x in jax.tree.leaves(g)])

    return step


def check_model(ctx: Context) -> list[Measurement]:
    """Forward + backward of the keel model on fixed synthetic data, on every device: loss and gradient hashes
    must agree across devices and repeats."""
    from keel.config import ModelConfig
    from keel.model import transformer

    cpu = ctx.devices[0].platform == "cpu"
    cfg = ModelConfig(vocab_size=512, d_model=64 if cpu else 512, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16 if cpu else 128, mlp_dim=128 if cpu else 2048,
                      compute_dtype="float32" if cpu else "bfloat16")
    params = jax.tree.map(np.asarray, transformer.init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, cfg.vocab_size, (ctx.settings.probe_batch, 65 if cpu else 1025)).astype(np.int32)
    run = _replicated_run(ctx, _model_step(cfg), params, tokens)
    hashes: dict[int, list[str]] = {d: [] for d in ctx.ids}
    losses = {}
    for r in range(max(2, ctx.settings.repeats // 2)):
        for dev, res in run().items():
            res = ctx.faults.result(dev, res, r)
            losses[dev] = float(res[0])
            hashes[dev].append(_hash(res))
    out = _agreement("model_step", "loss+grad hash", _across_hosts(hashes), ctx.ids)
    for m in out:
        m.note = (m.note + "; " if m.note else "") + f"loss {losses[m.device]:.6f}" if m.device in losses else m.note
    return out


CHECKS: dict[str, Callable[[Context], list[Measurement]]] = {
    "matmul": check_matmul,
    "known_answer": check_known_answer,
    "sdc": check_sdc,
    "memory": check_memory,
    "collectives": check_collectives,
    "sustained": check_sustained,
    "model": check_model,
}
check_registry("CHECKS", CHECKS, CheckName)


# ------------------------------------------------------------------------------------------------ report


@dataclass
class Report:
    host: str
    platform: dict[str, str]
    devices: list[dict[str, Any]]
    settings: dict[str, Any]
    measurements: list[Measurement] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def device_verdicts(self) -> dict[int, str]:
        out = {d["id"]: PASS for d in self.devices}
        for m in self.measurements:
            ids = [m.device] if m.device is not None else list(m.link or [])
            for i in ids:
                if i in out and SEVERITY[m.verdict] > SEVERITY[out[i]]:
                    out[i] = m.verdict
        if self.errors:  # a check that could not run leaves every device unproven
            for i in out:
                if SEVERITY[NOT_RUN] > SEVERITY[out[i]]:
                    out[i] = NOT_RUN
        return out

    def verdict(self) -> str:
        return max(self.device_verdicts().values(), key=SEVERITY.__getitem__, default=PASS)

    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict()]

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "host": self.host, "platform": self.platform, "devices": self.devices,
                "settings": self.settings, "verdict": self.verdict(),
                "device_verdicts": {str(k): v for k, v in self.device_verdicts().items()},
                "errors": self.errors, "seconds": self.seconds,
                "measurements": [asdict(m) for m in self.measurements]}

    def table(self) -> str:
        lines = [f"burn-in on {self.host}: {len(self.devices)} x {self.devices[0]['kind']} "
                 f"({self.platform['backend']}, jax {self.platform['jax']})", ""]
        head = ("check", "metric", "device", "value", "threshold", "verdict", "note")
        rows = [head]
        for m in self.measurements:
            where = str(m.device) if m.device is not None else f"{m.link[0]}->{m.link[1]}" if m.link else "all"
            value = f"{m.value:.4g}" if isinstance(m.value, float) else str(m.value)
            rows.append((m.check, m.metric, where, value, m.threshold, m.verdict, m.note))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1])
        lines.append("")
        for check, err in self.errors.items():
            lines.append(f"{check}: could not run: {err.splitlines()[-1]}")
        verdicts = self.device_verdicts()
        lines.append("devices: " + ", ".join(f"{i}={v}" for i, v in verdicts.items()))
        lines.append(f"verdict: {self.verdict().upper()}  (" + ", ".join(
            f"{c} {self.seconds[c]:.1f}s" for c in self.seconds) + ")")
        return "\n".join(lines)


def platform_info(devices: Sequence[jax.Device]) -> dict[str, str]:
    dev = devices[0]
    info = {"backend": dev.platform, "device_kind": dev.device_kind, "jax": jax.__version__,
            "jaxlib": getattr(jax.lib, "__version__", jax.__version__), "python": platform.python_version(),
            "os": platform.platform()}
    try:
        info["runtime"] = str(dev.client.platform_version)
    except Exception:  # noqa: BLE001 - not every backend reports one
        info["runtime"] = "unknown"
    return info


def run_burnin(checks: Sequence[str] = CHECK_NAMES, *, quick: bool = False,
               devices: Sequence[jax.Device] | None = None, faults: Faults | None = None,
               settings: Settings | None = None, log: Callable[[str], None] = print,
               progress: bool = True) -> Report:
    devices = list(devices or jax.local_devices())
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown burn-in check {unknown[0]!r}; checks: {', '.join(CHECK_NAMES)}")
    settings = settings or Settings.for_platform(devices[0].platform, quick)
    ctx = Context(devices, settings, faults or Faults(), match(devices[0].device_kind), log)
    report = Report(
        host=socket.gethostname(), platform=platform_info(devices),
        devices=[{"id": d.id, "kind": d.device_kind, "platform": d.platform, "process": d.process_index,
                  "local_id": getattr(d, "local_hardware_id", None)} for d in devices],
        settings=asdict(settings) | {"quick": quick, "spec": ctx.spec.name if ctx.spec else None},
    )
    from tqdm import tqdm

    bar = tqdm(checks, desc="burn-in", unit="check", disable=not progress, dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        try:
            report.measurements += CHECKS[name](ctx)
        except Exception as e:  # noqa: BLE001 - a check that crashes is a finding, not a crash of burn-in
            report.errors[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        report.seconds[name] = time.perf_counter() - t0
    return report
