"""Fit before you start: the predicted bytes per device of a run against the memory of its devices.

The prediction is `keel plan`'s (keel/plan/memory.py: parameters, optimizer state, gradients, activations under
the remat policy, FSDP and optimizer transients; checked against XLA's compiled step within ~15 %). The capacity
is the device's own limit (`memory_stats()["bytes_limit"]` on GPUs and TPUs), or on a CPU the host memory
available now shared by this process's devices. A run predicted above its capacity stops before anything is
allocated, with the estimate and what to change; one above 90 % of it is started with a warning.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax

from keel.config import Config
from keel.errors import ConfigError
from keel.parallel.sharding import mesh_shape

WARN_FRACTION = 0.9


def device_capacity(devices: Sequence[jax.Device]) -> tuple[int, str]:
    """(bytes one device can hold, where the number comes from)."""
    stats = None
    try:
        stats = devices[0].memory_stats()
    except Exception:  # noqa: BLE001 (some backends do not implement it)
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{devices[0].device_kind} memory limit"
    local = max(1, sum(d.process_index == jax.process_index() for d in devices))
    return _host_available() // local, f"host memory available, shared by {local} CPU device(s)"


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def fit_report(cfg: Config, devices: Sequence[jax.Device] | None = None) -> tuple[bool, str]:
    """(whether `cfg` fits its devices (default: all), the estimate in one message)."""
    from keel.plan.memory import per_device_bytes

    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg.mesh, len(devices))
    est = per_device_bytes(cfg, shape, accelerator=devices[0].platform != "cpu")
    capacity, source = device_capacity(devices)
    parts = (f"parameters {_gb(est.parameters)}, optimizer state {_gb(est.optimizer)}, gradients "
             f"{_gb(est.gradients)}, activations {_gb(est.activations)}")
    if est.total > capacity:
        return False, (
            f"the run does not fit: about {_gb(est.total)} per device predicted ({parts}; mesh {shape}) against "
            f"{_gb(capacity)} ({source}). Spread the state over more devices (mesh.fsdp), recompute more "
            f"(model.remat=full), shorten train.batch_size or data.seq_len, use model.param_dtype=bfloat16, or a "
            f"smaller model; `keel plan` compares meshes and policies")
    line = f"memory: about {_gb(est.total)} per device predicted ({parts}) of {_gb(capacity)} ({source})"
    return True, line + ("; close to the limit" if est.total > WARN_FRACTION * capacity else "")


def check_fit(cfg: Config, devices: Sequence[jax.Device] | None = None,
              log: Callable[[str], None] = print) -> None:
    """Raise ConfigError when `cfg` cannot fit its devices (default: all); log the estimate otherwise."""
    fits, message = fit_report(cfg, devices)
    if not fits:
        raise ConfigError(message)
    log(message)
