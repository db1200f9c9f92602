"""Learning-rate schedules."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def wsd(peak_lr: float, total_steps: int, warmup_steps: int, decay_fraction: float,
        min_lr_ratio: float = 0.0) -> optax.Schedule:
    """Warmup-stable-decay: linear warmup to `peak_lr`, constant, then a linear decay over the last
    `decay_fraction` of `total_steps` to `min_lr_ratio * peak_lr`. Stable-phase checkpoints can be branched
    into a decay at any point, which is what makes WSD the schedule for long runs of unknown length."""
    decay_steps = int(decay_fraction * total_steps)
    decay_start = total_steps - decay_steps
    floor = min_lr_ratio * peak_lr

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * jnp.minimum(1.0, (step + 1) / max(warmup_steps, 1))
        frac = jnp.clip((step - decay_start) / max(decay_steps, 1), 0.0, 1.0)
        decayed = peak_lr + (floor - peak_lr) * frac
        return jnp.where(step < warmup_steps, warm, jnp.where(step < decay_start, peak_lr, decayed))

    return schedule
