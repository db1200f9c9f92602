"""What a run executes on the mesh: shardings, optimizer, the jitted train and eval steps (`build_run`).

Nothing here reads the host's clock or writes files except the compile event; the loop decides when to call
what, and each call here is asynchronous (jax dispatch): no device -> host transfer on the step path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from keel.config import Config
from keel.data.pack import Batch, expand
from keel.model import transformer
from keel.optim.optimizers import build_optimizer, describe_partition
from keel.parallel.sharding import Sharder, make_mesh, shard_like
from keel.train import spikes
from keel.train.events import EventLog
from keel.train.state import TrainState, abstract_state, init_state_fn

Metrics = dict[str, jax.Array]


@dataclass
class Run:
    """A run's compiled pieces on one mesh. `step` and `eval_loss` return device arrays (no host sync)."""

    cfg: Config
    mesh: Mesh
    sharder: Sharder
    tx: optax.GradientTransformation
    abstract: TrainState
    state_shardings: TrainState
    batch_sharding: dict[str, NamedSharding]
    replicated: NamedSharding
    train_step: Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, Metrics]]
    eval_loss: Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]
    expand: Callable[[dict[str, jax.Array]], dict[str, jax.Array]]  # packed batch -> model inputs and targets
    notes: list[str] = field(default_factory=list)

    def init(self) -> TrainState:
        init = jax.jit(init_state_fn(self.cfg, self.tx), out_shardings=self.state_shardings)
        return init(jax.random.key(self.cfg.train.seed))

    def restore_target(self) -> TrainState:
        """The abstract state with the run's shardings: what a checkpoint is restored onto."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract, self.state_shardings)

    def to_device(self, batch: Batch) -> dict[str, jax.Array]:
        """This host's rows of the global batch, as global arrays on the mesh."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding[k], v) for k, v in batch.items()}

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        return self.train_step(state, self.to_device(batch))

    def set_step(self, state: TrainState, step: int) -> TrainState:
        """Move the step counter (skipped steps get no update, but the schedule moves past them)."""
        return state.at_step(jax.device_put(jnp.asarray(step, jnp.int32), self.replicated))

    def gradient_probe(self, mesh: Mesh) -> tuple[Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]],
                                                  Any, dict[str, NamedSharding]]:
        """The step's loss and a hash of its gradients, jitted on `mesh` (a permutation of the run's devices, for
        the silent-data-corruption check), with the parameter and batch shardings it takes there."""
        sharder = Sharder(mesh)

        def moved(s: NamedSharding) -> NamedSharding:
            return NamedSharding(mesh, s.spec)

        params = jax.tree.map(moved, self.state_shardings.params)
        batch = {k: moved(s) for k, s in self.batch_sharding.items()}

        def probe(p: Any, b: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
            def loss(q: Any) -> tuple[jax.Array, jax.Array]:
                return transformer.loss_fn(q, self.expand(b), self.cfg.model, sharder)

            (value, _), grads = jax.value_and_grad(loss, has_aux=True)(p)
            return value, tree_hash(grads)

        fn = jax.jit(probe, in_shardings=(params, batch), out_shardings=NamedSharding(mesh, jax.P()))
        return fn, params, batch

    def compile(self, state: TrainState, batch: Batch, events: EventLog) -> float:
        """Compile the train step ahead of time for these shapes; emits the `compile` event. Seconds taken."""
        with events.span("compile") as ev:
            t0 = time.perf_counter()
            self.train_step = self.train_step.lower(state, self.to_device(batch)).compile()
            ev["seconds"] = time.perf_counter() - t0
            params = self.train_step.output_shardings[0].params
            ev["param_shardings"] = {jax.tree_util.keystr(p): str(s.spec)
                                     for p, s in jax.tree_util.tree_flatten_with_path(params)[0]}
            if self.notes:
                ev["sharding_notes"] = self.notes
        return ev["seconds"]


def build_run(cfg: Config, bos: int, pad: int, devices: Sequence[jax.Device] | None = None,
              log: Callable[[str], None] = print) -> Run:
    """The mesh, shardings, optimizer and jitted step functions of `cfg` (`devices`: default all)."""
    mesh = make_mesh(cfg.mesh, devices)
    sharder = Sharder(mesh)
    param_shardings = sharder.tree(transformer.abstract_params(cfg.model), transformer.logical_axes(cfg.model))
    tx, schedule = build_optimizer(cfg, param_shardings, mesh)
    if cfg.optim.name == "muon":
        partition = describe_partition(cfg.model, mesh, cfg.optim.muon_ns_steps)
        log(f"optimizer partition (Muon strategy {cfg.optim.muon_strategy}):\n{partition}")
    abstract = abstract_state(cfg, tx)
    replicated = sharder.replicated()
    state_shardings = TrainState(param_shardings, shard_like(abstract.opt_state, param_shardings, replicated),
                                 replicated, jax.tree.map(lambda _: replicated, abstract.monitor))
    B, T = cfg.train.batch_size, cfg.data.seq_len
    batch_sharding = {"tokens": sharder.sharding(("batch", None), (B, T + 1), where="batch/tokens"),
                      "first_position": sharder.sharding(("batch",), (B,), where="batch/first_position")}

    def expanded(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return expand(batch["tokens"], batch["first_position"], bos, pad, jnp)

    def eval_loss(params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return transformer.loss_fn(params, expanded(batch), cfg.model, sharder)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, Metrics]:
        full = expanded(batch)

        def loss(params):
            return transformer.loss_fn(params, full, cfg.model, sharder)

        (loss_value, n_targets), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        spike, monitor, spike_metrics = spikes.detect(state.monitor, loss_value, grad_norm, cfg.spike)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if cfg.spike.policy == "skip_update":
            params, opt_state = spikes.keep_if_spike(spike, (state.params, state.opt_state), (params, opt_state))
        metrics = {"loss": loss_value, "grad_norm": grad_norm, "lr": schedule(state.step), "n_targets": n_targets,
                   **spike_metrics}
        return TrainState(params, opt_state, state.step + 1, monitor), metrics

    step_fn = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                      out_shardings=(state_shardings, replicated), donate_argnums=0)
    eval_fn = jax.jit(eval_loss, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)
    return Run(cfg, mesh, sharder, tx, abstract, state_shardings, batch_sharding, replicated, step_fn, eval_fn,
               expanded, list(sharder.notes))


def tree_hash(tree: Any) -> jax.Array:
    """A uint32 hash of every bit of a tree of arrays: each element's bits times a position weight, summed with
    wrap-around. Integer sums are exact in any order, so the hash of a sharded array does not depend on how the
    reduction is split over devices; a single flipped bit changes it."""
    h = jnp.uint32(0)
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[leaf.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(leaf, width).astype(jnp.uint32)
        # odd weights: multiplying by an odd number is a bijection mod 2^32, so no flipped bit can vanish
        weight = (jnp.arange(leaf.size, dtype=jnp.uint32).reshape(leaf.shape) * jnp.uint32(2654435761)
                  + jnp.uint32(2 * i)) | jnp.uint32(1)
        h = h * jnp.uint32(1000003) + jnp.sum(bits * weight, dtype=jnp.uint32)
    return h
