"""Optimizers by name. Each builder takes the run config and returns (optax transformation, schedule).

Weight decay applies to matrices only (ndim >= 2); norm scales and other vectors are not decayed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from keel.config import Config
from keel.optim.schedules import wsd


def decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = cfg.optim
    schedule = wsd(o.lr, cfg.train.steps, o.warmup_steps, o.decay_fraction, o.min_lr_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask),
    )
    return tx, schedule


OPTIMIZERS: dict[str, Callable[[Config], tuple[optax.GradientTransformation, optax.Schedule]]] = {
    "adamw": adamw,
}


def build_optimizer(cfg: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    return OPTIMIZERS[cfg.optim.name](cfg)
