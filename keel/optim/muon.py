"""Muon with layer sharding.

Muon orthogonalises each hidden matrix's momentum with a quintic Newton–Schulz iteration, which needs whole
matrices. keel stacks a layer's matrices as (layers, in, out); under FSDP each device holds a slice of every
layer. `layer_sharded` reshards the stack so each device holds whole matrices of L/N layers (an all-to-all),
runs Newton–Schulz locally, and reshards back (another all-to-all): the extra work is spread over the devices
instead of repeated on each. A stack whose layer count does not divide the device count is padded with zero
matrices (which stay zero). `gathered` replicates the stack and runs every layer on every device: the
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

    Tall matrices (M > N) iterate on the smaller Gram matrix from the right, X <- a X + X (b A + c A^2) with
    A = X^T X: the same as transposing, iterating and transposing back, but without the transposes, so the
    dots have one layout whatever the number of matrices per device (layer-sharded results stay bitwise equal
    to single-device ones)."""
    x = x_LMN / (jnp.linalg.norm(x_LMN, axis=(-2, -1), keepdims=True) + eps)
    a, b, c = coeffs
    tall = x.shape[-2] > x.shape[-1]
    for _ in range(steps):
        if tall:
            gram = jnp.swapaxes(x, -1, -2) @ x
            x = a * x + x @ (b * gram + c * gram @ gram)
        else:
            gram = x @ jnp.swapaxes(x, -1, -2)
            x = a * x + (b * gram + c * gram @ gram) @ x
    return x


Orthogonaliser = Callable[[jax.Array, Mesh | None, Callable[[jax.Array], jax.Array]], jax.Array]


def gathered(x_LMN: jax.Array, mesh: Mesh | None, ns: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Every device runs Newton–Schulz on the whole (replicated) stack. The result is pinned replicated too:
    otherwise the partitioner is free to split the iteration by rows (with an all-gather every step)."""
    if mesh is None:
        return ns(x_LMN)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.lax.with_sharding_constraint(ns(jax.lax.with_sharding_constraint(x_LMN, replicated)), replicated)


def layer_sharded(x_LMN: jax.Array, mesh: Mesh | None, ns: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Each of the N devices runs Newton–Schulz on whole matrices of L/N layers (padded to a multiple of N)."""
    if mesh is None or mesh.size == 1:
        return ns(x_LMN)
    L = x_LMN.shape[0]
    padded = jnp.pad(x_LMN, ((0, (-L) % mesh.size), (0, 0), (0, 0)))
    by_layer = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names), None, None))
    return ns(jax.lax.with_sharding_constraint(padded, by_layer))[:L]


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

        def orthogonal_update(path, m):
            view = views[jax.tree_util.keystr(path)]
            o = orthogonalise(view.as_matrices(m), mesh, ns).reshape(m.shape)
            if view.sharding is not None:
                o = jax.lax.with_sharding_constraint(o, view.sharding)
            return o * scale_of(*view.fans(m.shape))

        return jax.tree_util.tree_map_with_path(orthogonal_update, mu_hat), MuonState(count, mu)

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
