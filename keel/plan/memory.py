"""Bytes per device of a train step, for any config on any mesh: the fit check before booking a machine.

    from keel.plan.memory import per_device_bytes
    est = per_device_bytes(cfg, {"data": 2, "fsdp": 64, "tensor": 8})   # or (2, 64, 8)
    est.total                      # predicted peak bytes per device of the compiled train step
    est.fits(141e9)                # with the runtime's reserve (see `fits`)

The equations (docs/parallel.md, "Planner"), per device, n = tokens per device, c = compute-dtype bytes:

    state     = parameters + optimizer state + batch               (the step's donated arguments)
    backward  = gradients + L x saved(policy) + working(policy) + FSDP buffers
    update    = gradients + optimizer transients (+ Muon's)
    peak      = state + max(backward, update)

`saved(policy)` is what the forward keeps per layer for the backward (checkpoint policies in
keel/model/transformer.py; each layer's input x is kept under every policy, as the scan's carry):

    full            x                                               n·D·c
    dots_no_batch   x + q k v + attention out + gate up + MLP out   n·c·(3D + q + 2kv + 2F)
    dots            dots_no_batch + scores (f32) + probs·v          + n·(h·T·4 + q·c)
    none            every residual of the layer (see `NONE`)

with the widths of one device (q = heads·head_dim, kv, F, V split by `tensor` where it divides them, h heads).
`working(policy)` is one layer's backward in flight plus the loss head:

    working   = 4·n·h·T·4 + n·V·4 + V·D·c + n·D·c·(6 + 2·[tensor > 1] + 4·[remat full])

(the attention backward's float32 (T x T) buffers, the float32 logits, the gathered embedding, residual-stream
rows; see `WORKING`), and the FSDP buffers are one layer's gathered parameters and unreduced gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import jax

from keel.config import Config
from keel.plan.layout import Layout, MeshShape
from keel.plan.muon import muon_transient

# Per token of one layer under `none`, in compute-dtype elements: the residuals JAX's autodiff keeps for keel's
# layer (norm inputs and outputs, the GeGLU's tanh terms, QK-norm and RoPE inputs and outputs ...), counted from
# `jax.ad_checkpoint.print_saved_residuals` of the layer; XLA keeps about 10 % less (it merges duplicates).
NONE = {"D": 13, "F": 8, "q": 4, "kv": 4, "scores_f32": 2, "mask": 1}
# One layer's backward in flight, per token: (h·T)-sized float32 buffers of the attention backward (scores,
# probabilities, their gradients), and D-wide rows (the residual stream and its gradient, norm inputs and
# outputs, partial sums); tensor parallelism adds the partial input gradients XLA all-reduces one by one, and
# `full` remat the recomputed forward's rows. Small integers read off XLA:CPU's buffer assignment of keel's step
# (95 compiled cases: 7 model shapes, 8 meshes, 4 policies; docs/parallel.md, "Checked against the compiler").
WORKING = {"scores_f32": 4, "D": 6, "D_tensor": 2, "D_full": 4}


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes per device of keel's compiled train step (see the module doc for the equations).

    `total` is the peak; `parameters`, `optimizer`, `gradients`, `activations` (the saved stack plus one
    layer's backward working set and the loss head), `fsdp_buffers` (one layer's gathered parameters and its
    gradients before the reduce-scatter), `update` (optimizer transients) and `muon` (Layer-sharded Muon's
    resharded momentum and Newton–Schulz temporaries) are its parts; `phase` says whether the backward pass or
    the optimizer update sets the peak."""

    parameters: float
    optimizer: float
    gradients: float
    activations: float
    fsdp_buffers: float
    update: float
    muon: float
    batch: float
    saved_per_layer: float
    working: float
    total: float
    phase: str

    def fits(self, capacity_bytes: float, reserve: float = 0.1) -> bool:
        """Whether the peak fits `capacity_bytes` of HBM with a fraction `reserve` of it left to the runtime (CUDA
        context, collective buffers, allocator fragmentation; JAX on GPU preallocates 75 % unless
        XLA_PYTHON_CLIENT_MEM_FRACTION says more)."""
        return self.total <= capacity_bytes * (1 - reserve)

    def to_json(self) -> dict[str, float | str]:
        return asdict(self)


def saved_per_layer(layout: Layout, c: int) -> float:
    m, n = layout.cfg.model, layout.tokens
    D, F, q, kv, h, T = m.d_model, layout.mlp, layout.q_width, layout.kv_width, layout.heads, layout.seq_len
    x = n * D * c
    dots_no_batch = x + n * c * (2 * D + q + 2 * kv + 2 * F)
    policy = m.remat
    if policy == "full":
        return x
    if policy == "dots_no_batch":
        return dots_no_batch
    if policy == "dots":
        return dots_no_batch + n * (h * T * 4 + q * c)
    k = NONE
    return n * (c * (k["D"] * D + k["F"] * F + k["q"] * q + k["kv"] * kv) + h * T * (4 * k["scores_f32"] + k["mask"]))


def working_set(layout: Layout, c: int) -> float:
    """One layer's backward in flight and the loss head (see the module doc)."""
    m, n = layout.cfg.model, layout.tokens
    rows = WORKING["D"] + WORKING["D_tensor"] * (layout.mesh["tensor"] > 1) + WORKING["D_full"] * (m.remat == "full")
    attention = WORKING["scores_f32"] * n * layout.heads * layout.seq_len * 4
    head = n * layout.vocab * 4 + layout.embedding() * c
    return attention + head + rows * n * m.d_model * c


def layer_buffers(layout: Layout, c: int) -> float:
    """One layer's parameters as the matmuls take them (FSDP-gathered) and its gradients before they are reduced
    over the batch axes (a reduce-scatter's, an all-reduce's input)."""
    split = layout.mesh["fsdp"] > 1 or layout.mesh["data"] > 1
    return (2 if split else 1) * layout.layer_params("computed") * c


def _tree_bytes(tree: object, shardings: object | None = None) -> float:
    leaves = jax.tree.leaves(tree)
    if shardings is None:
        return float(sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves))
    return float(sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                     for a, s in zip(leaves, jax.tree.leaves(shardings), strict=True)))


def per_device_bytes(cfg: Config, mesh_shape: MeshShape | Sequence[int], accelerator: bool = True) -> MemoryEstimate:
    """Predicted peak bytes per device of `cfg`'s train step on a (data, fsdp, tensor) mesh of any size (the mesh
    need not exist; `cfg.mesh` is ignored). `accelerator`: resolve `compute_dtype: auto` as on a GPU/TPU
    (bfloat16); False as on a CPU (float32)."""
    return estimate(Layout.of(cfg, mesh_shape), accelerator)


def estimate(layout: Layout, accelerator: bool = True, abstract: Any = None) -> MemoryEstimate:
    """`per_device_bytes` of a `Layout`; `abstract`: `keel.train.state.abstract_state(cfg)` if already at hand
    (it depends on neither the mesh nor the remat policy)."""
    from keel.model.transformer import logical_axes
    from keel.parallel.sharding import shard_like
    from keel.train.state import abstract_state

    cfg = layout.cfg
    c = layout.compute_bytes(accelerator)
    L = cfg.model.n_layers
    abstract = abstract if abstract is not None else abstract_state(cfg)
    param_shardings = layout.sharder.tree(abstract.params, logical_axes(cfg.model))
    opt_shardings = shard_like(abstract.opt_state, param_shardings, layout.sharder.replicated())
    parameters = _tree_bytes(abstract.params, param_shardings)
    optimizer = _tree_bytes(abstract.opt_state, opt_shardings)
    small = _tree_bytes(abstract.monitor) + 4  # the spike detector's window and the step counter: replicated
    token_bytes = 2 if cfg.model.vocab_size <= 2**16 else 4
    batch = layout.rows * ((layout.seq_len + 1) * token_bytes + 4) + small
    gradients = parameters
    fsdp = layer_buffers(layout, c)
    saved = saved_per_layer(layout, c)
    working = working_set(layout, c)
    activations = L * saved + working
    update = parameters  # the optimizer's new values beside the old before the donated buffers take them
    muon = muon_transient(layout)
    backward = gradients + activations + fsdp
    after = gradients + update + muon
    total = parameters + optimizer + batch + max(backward, after)
    parts = (parameters, optimizer, gradients, activations, fsdp, update, muon, batch, saved, working, total)
    return MemoryEstimate(*map(float, parts), phase="backward" if backward >= after else "update")
