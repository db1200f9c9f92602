"""The training state, (params, optimizer state, step, spike monitor), and its abstract form (docs/design.md,
invariants 2, 4).

`abstract_state(cfg)` is the one description of the state's shapes and dtypes: the trainer places it on the
mesh, `keel train --dry-run` sizes it, and `load_params` restores onto it. On disk a checkpoint holds the
state as the plain mapping {"params", "opt_state", "step", "monitor"} (`as_dict` / `from_dict`); the monitor is
the loss-spike detector's window (keel/train/spikes.py), saved so that a resumed run judges spikes as the
uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import optax

from keel.config import Config
from keel.model import transformer
from keel.optim.optimizers import build_optimizer
from keel.train.spikes import init_monitor


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: the number of steps this state has trained or passed over
    monitor: Any  # the spike detector's window (keel/train/spikes.py)

    def as_dict(self) -> dict[str, Any]:
        return {"params": self.params, "opt_state": self.opt_state, "step": self.step, "monitor": self.monitor}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(params=d["params"], opt_state=d["opt_state"], step=d["step"], monitor=d["monitor"])

    def at_step(self, step: jax.Array) -> TrainState:
        return replace(self, step=step)


def init_state_fn(cfg: Config, tx: optax.GradientTransformation):
    """key -> a fresh TrainState: the parameters from `key`, the optimizer's initial state, step 0, no history."""

    def init_state(key: jax.Array) -> TrainState:
        params = transformer.init_params(cfg.model, key)
        return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), init_monitor(cfg.spike))

    return init_state


def abstract_state(cfg: Config, tx: optax.GradientTransformation | None = None) -> TrainState:
    """Shapes and dtypes of the whole training state, computed without allocating anything. `tx` defaults to
    the config's optimizer off a mesh (the state's shapes do not depend on the mesh)."""
    tx = tx if tx is not None else build_optimizer(cfg)[0]
    return jax.eval_shape(init_state_fn(cfg, tx), jax.random.key(0))


def state_bytes(state: TrainState) -> int:
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(state))
