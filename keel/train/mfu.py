"""Peak FLOP/s for MFU: the spec table for accelerators, a measured matmul peak for CPUs."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from keel.diag.specs import match


def measured_matmul_flops(device: jax.Device, n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a float32 n x n matmul on `device` (best of `reps`)."""
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops_per_device(device: jax.Device) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from)."""
    spec = match(device.device_kind)
    if spec is not None:
        return spec.bf16_tflops * 1e12, f"{spec.name} spec, bf16 dense"
    return measured_matmul_flops(device), f"measured f32 matmul on {device.device_kind}"
