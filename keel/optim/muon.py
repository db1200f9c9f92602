"""Muon with layer sharding.

Muon orthogonalises each hidden matrix's momentum with a quintic Newton–Schulz iteration, which needs whole
matrices. keel stacks a layer's matrices as (layers, in, out), sharded over the mesh by the rules table (FSDP
on `embed`, tensor parallelism on `heads`/`mlp`, copies over `data`). `layer_sharded` orthogonalises every
matrix once, whole, on one device: the matrices of all stacks are bin-packed over the mesh by FLOPs, moved
there and back with all-to-all over the axes that split them, and all-gathered over the axes that hold copies
(`keel/optim/layer_sharding.py`). `gathered` replicates each stack and runs every layer on every device: the
reference for tests and benchmarks.

The momentum and Nesterov form, the Frobenius pre-scaling, the iteration and the two update scalings follow
`optax.contrib.muon`, so the two agree on the same inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from keel.config import MuonScaling, MuonStrategy, check_registry
from keel.optim.layer_sharding import layer_sharded_newton_schulz

DEFAULT_NS_COEFFS = (3.4445, -4.7750, 2.0315)


@dataclass(frozen=True)
class MatrixView:
    """How a stacked parameter (layers, *in_dims, *out_dims) is seen as a batch of (in, out) matrices."""

    n_in: int  # how many dims after the leading layer axis form the matrix's input side (`ParamSpec.n_in`)
    sharding: NamedSharding | None = None  # the parameter's own sharding, restored after orthogonalising

    def as_matrices(self, x: jax.Array) -> jax.Array:
        fan_in = math.prod(x.shape[1 : 1 + self.n_in])
        return x.reshape(x.shape[0], fan_in, -1)

    def fans(self, shape: tuple[int, ...]) -> tuple[int, int]:
        fan_in = math.prod(shape[1 : 1 + self.n_in])
        return fan_in, math.prod(shape[1:]) // fan_in


def newton_schulz(x_LMN: jax.Array, coeffs: tuple[float, float, float] = DEFAULT_NS_COEFFS, steps: int = 5,
                  eps: float = 1e-8) -> jax.Array:
    """Approximately orthogonalise each matrix of a batch (U S V^T -> U V^T) with the quintic iteration
    X <- a X + (b A + c A^2) X, A = X X^T, after scaling each matrix to unit Frobenius norm.

    One matrix at a time (`lax.map`), fenced by optimization barriers: XLA's dots and norms over a batch can
    sum in an order that depends on the batch size and on what is fused into them, and a device of a
    layer-sharded update gets another number of matrices, assembled by transposes, than one device running the
    whole stack; so fenced, every matrix's result is bitwise the same wherever it runs.
    For large matrices the loop costs nothing (each dot fills the device); the tiny ones of test models lose
    a little batching."""

    def one(x_MN: jax.Array) -> jax.Array:
        # The barriers keep XLA from fusing the producer of the matrix (a layer-sharded device assembles it
        # from pieces with a transpose) into the norm and the first dot, or the consumer into the last: that
        # would change their summation order, and one device has no such producer.
        x_MN = jax.lax.optimization_barrier(x_MN)
        return jax.lax.optimization_barrier(_newton_schulz_matrix(x_MN, coeffs, steps, eps))

    return jax.lax.map(one, x_LMN)


def _newton_schulz_matrix(x_MN: jax.Array, coeffs: tuple[float, float, float], steps: int,
                          eps: float) -> jax.Array:
    """Tall matrices (M > N) iterate on the smaller Gram matrix from the right, X <- a X + X (b A + c A^2) with
    A = X^T X: the same as transposing, iterating and transposing back, without moving the matrix."""
    x = x_MN / (jnp.linalg.norm(x_MN) + eps)
    a, b, c = coeffs
    tall = x.shape[0] > x.shape[1]
    for _ in range(steps):
        if tall:
            gram = x.T @ x
            x = a * x + x @ (b * gram + c * gram @ gram)
        else:
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
    return x


NewtonSchulz = Callable[[jax.Array], jax.Array]
Orthogonaliser = Callable[[dict[str, jax.Array], dict[str, MatrixView], Mesh | None, NewtonSchulz],
                          dict[str, jax.Array]]
"""(stacks keyed like `views`, each (layers, *in_dims, *out_dims); views; mesh; Newton–Schulz on a batch of
matrices) -> the orthogonalised stacks, same shapes."""


def gathered(stacks: dict[str, jax.Array], views: dict[str, MatrixView], mesh: Mesh | None,
             ns: NewtonSchulz) -> dict[str, jax.Array]:
    """Every device runs Newton–Schulz on every whole (replicated) stack. The result is pinned replicated too:
    otherwise the partitioner is free to split the iteration by rows (with an all-gather every step)."""
    out = {}
    for key, x in stacks.items():
        x_LMN = views[key].as_matrices(x)
        if mesh is None:
            out[key] = ns(x_LMN).reshape(x.shape)
            continue
        replicated = NamedSharding(mesh, PartitionSpec())
        o = jax.lax.with_sharding_constraint(ns(jax.lax.with_sharding_constraint(x_LMN, replicated)), replicated)
        out[key] = o.reshape(x.shape)
    return out


def layer_sharded(stacks: dict[str, jax.Array], views: dict[str, MatrixView], mesh: Mesh | None,
                  ns: NewtonSchulz) -> dict[str, jax.Array]:
    """Each matrix of every stack is orthogonalised once, on the device the FLOP-balanced plan gives it."""
    if mesh is None or mesh.size == 1:
        return {key: ns(views[key].as_matrices(x)).reshape(x.shape) for key, x in stacks.items()}
    specs = {key: views[key].sharding.spec if views[key].sharding is not None else PartitionSpec()
             for key in stacks}
    return layer_sharded_newton_schulz(stacks, {key: views[key].n_in for key in stacks}, specs, mesh, ns)


STRATEGIES: dict[str, Orthogonaliser] = {"layer_sharded": layer_sharded, "gathered": gathered}

SCALINGS: dict[str, Callable[[int, int], float]] = {
    # Keller Jordan's width transfer: sqrt(max(1, out/in)).
    "shape": lambda fan_in, fan_out: math.sqrt(max(1.0, fan_out / fan_in)),
    # Moonlight's: update RMS matches AdamW's (~0.2), so AdamW's learning rate and weight decay carry over.
    "adamw_rms": lambda fan_in, fan_out: 0.2 * math.sqrt(max(fan_in, fan_out)),
}
check_registry("STRATEGIES", STRATEGIES, MuonStrategy)
check_registry("SCALINGS", SCALINGS, MuonScaling)


class MuonState(NamedTuple):
    count: jax.Array
    mu: Any


def scale_by_muon(
    views: dict[str, MatrixView],
    *,
    beta: float = 0.95,
    ns_steps: int = 5,
    ns_coeffs: tuple[float, float, float] = DEFAULT_NS_COEFFS,
    eps: float = 1e-8,
    nesterov: bool = True,
    scaling: MuonScaling = "adamw_rms",
    strategy: MuonStrategy = "layer_sharded",
    mesh: Mesh | None = None,
) -> optax.GradientTransformation:
    """Momentum, Newton–Schulz orthogonalisation and shape scaling for the stacked matrices in `views`
    (keyed by `jax.tree_util.keystr` of the parameter path); use it under `optax.multi_transform` or on a
    tree whose every leaf has a view."""
    orthogonalise = STRATEGIES[strategy]
    scale_of = SCALINGS[scaling]

    def ns(x):
        return newton_schulz(x, ns_coeffs, ns_steps, eps)

    def init(params):
        return MuonState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda g, m: (1 - beta) * g + beta * m, updates, state.mu)
        if nesterov:
            c_mu, c_g = 1 - beta ** (count + 1).astype(jnp.float32), 1 - beta ** count.astype(jnp.float32)
            mu_hat = jax.tree.map(lambda m, g: beta * (m / c_mu) + (1 - beta) * (g / c_g), mu, updates)
        else:
            c = 1 - beta ** count.astype(jnp.float32)
            mu_hat = jax.tree.map(lambda m: m / c, mu)

        flat, treedef = jax.tree_util.tree_flatten_with_path(mu_hat)
        keys = [jax.tree_util.keystr(path) for path, _ in flat]
        done = orthogonalise(dict(zip(keys, (m for _, m in flat), strict=True)), views, mesh, ns)

        def scaled(key: str) -> jax.Array:
            view, o = views[key], done[key]
            if view.sharding is not None:
                o = jax.lax.with_sharding_constraint(o, view.sharding)
            return o * scale_of(*view.fans(o.shape))

        return jax.tree_util.tree_unflatten(treedef, [scaled(k) for k in keys]), MuonState(count, mu)

    return optax.GradientTransformation(init, update)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    views: dict[str, MatrixView],
    *,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """Muon with decoupled weight decay (multiplied by the learning rate, as in AdamW and optax)."""
    return optax.chain(
        scale_by_muon(views, **kwargs),
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )
