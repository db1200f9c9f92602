"""The collectives of one train step, per device (docs/parallel.md, "Planner").

Each is a buffer of `buffer_bytes` (an all-gather's result, a reduce-scatter's or all-reduce's or all-to-all's
operand) moved over the mesh `axes`, `count` times per step. They are the collectives XLA's SPMD partitioner puts
into keel's train step for the sharding table, checked against the compiled HLO on 8 fake devices
(tests/test_planner.py):

- FSDP (`fsdp` > 1): each layer's parameters are all-gathered before the forward and again in the backward
  (layer count x 2), in the compute dtype (the cast precedes the gather); the gradients are reduce-scattered (XLA
  on CPU writes the reduce-scatter as an all-reduce and a slice: same buffer); the embedding is gathered once
  (the backward reuses it) and its gradient reduce-scattered.
- Data parallel (`data` > 1): the gradient shard each device keeps after the FSDP reduce-scatter is all-reduced
  over `data`.
- Tensor parallel (`tensor` > 1): the outputs of `wo` and `w_down` (partial sums over heads / MLP) are
  all-reduced in the forward (2 per layer); in the backward the input gradients of `wq`, `wk`, `wv`, `w_gate`
  and `w_up`: on GPUs and TPUs 2 per layer (XLA:TPU reassociates `add(all-reduce(a), all-reduce(b))` into
  `all-reduce(add(a, b))`, so the attention's three and the MLP's two partial gradients are summed before one
  reduction each; measured on deviceless TPU compiles. XLA:GPU runs the same pass, `AllReduceReassociate`; not
  yet measured on a GPU), on CPUs 5 (XLA:CPU reduces each projection's partial gradient);
  `full` remat repeats the forward's 2. A matrix kind whose split dim the tensor axis does not divide is
  replicated and reduces nothing, except K and V when the query heads are split: their gradients are partial
  sums over the device's query heads, all-reduced (2 per layer, n·kv wide). The embedding lookup from the
  vocab-sharded table and the output projection's input gradient are all-reduced once each per step.
- The embedding lookup re-lays the looked-up rows from `embed`-sharded to `batch`-sharded (an all-to-all over
  `fsdp`, forward and backward).
- Muon: the optimizer's layer-sharding plan's all-to-alls (there and back, over each group's shard axes) and
  all-gathers (over its replica axes), see keel/plan/muon.py.

`overlap`: FSDP and data-parallel traffic can hide behind the layer's compute (XLA's async collectives and
latency-hiding scheduler prefetch the next layer's gather); tensor-parallel all-reduces sit on the critical
path between a matmul and the next, and Muon's all-to-alls between the backward pass and the update.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from keel.plan.layout import Layout

REDUCE = ("all-reduce", "reduce-scatter")


@dataclass(frozen=True)
class Traffic:
    what: str
    kind: str  # all-gather, reduce-scatter, all-reduce, all-to-all
    axes: tuple[str, ...]
    buffer_bytes: float
    count: int
    phase: str  # "forward" / "backward": once per layer in that pass (count = layers); "step": once per step
    overlap: bool

    @property
    def total_bytes(self) -> float:
        return self.buffer_bytes * self.count

    def group(self, mesh: dict[str, int]) -> int:
        g = 1
        for a in self.axes:
            g *= mesh[a]
        return g

    def wire_bytes(self, mesh: dict[str, int]) -> float:
        """Bytes each device sends (and receives) for all `count` of them, on a ring (all-gather, reduce-scatter:
        (g-1)/g of the buffer; all-reduce: twice that) or directly (all-to-all: (g-1)/g)."""
        g = self.group(mesh)
        factor = (g - 1) / g * (2 if self.kind == "all-reduce" else 1)
        return self.total_bytes * factor

    def to_json(self) -> dict:
        return asdict(self)


def family(kind: str) -> str:
    """Collectives compared as one: a reduce-scatter and an all-reduce of the same buffer (XLA:CPU writes the
    first as the second)."""
    return "reduce" if kind in REDUCE else kind


def step_traffic(layout: Layout, accelerator: bool = True) -> list[Traffic]:
    cfg, mesh = layout.cfg, layout.mesh
    m = cfg.model
    L = m.n_layers
    c = layout.compute_bytes(accelerator)
    d, f, t = mesh["data"], mesh["fsdp"], mesh["tensor"]
    n, D = layout.tokens, m.d_model
    out: list[Traffic] = []

    def add(what: str, kind: str, axes: tuple[str, ...], size: float, count: int, phase: str, overlap: bool) -> None:
        if size > 0 and count > 0:
            out.append(Traffic(what, kind, axes, float(size), count, phase, overlap))

    gathered = layout.gathered_layer_params()
    embed = layout.embedding()
    if f > 1:
        add("FSDP all-gather of each layer's parameters (forward)", "all-gather", ("fsdp",), gathered * c, L,
            "forward", True)
        add("FSDP all-gather of each layer's parameters (backward)", "all-gather", ("fsdp",), gathered * c, L,
            "backward", True)
        add("FSDP all-gather of the embedding (once: the backward reuses it)", "all-gather", ("fsdp",), embed * c,
            1, "step", True)
        add("FSDP reduce-scatter of each layer's gradients", "reduce-scatter", ("fsdp",), gathered * c, L,
            "backward", True)
        add("FSDP reduce-scatter of the embedding gradient", "reduce-scatter", ("fsdp",), embed * c, 1, "step",
            True)
        add("embedding rows re-laid from embed- to batch-sharded (forward and backward)", "all-to-all",
            ("fsdp",), n * D * c, 2, "step", False)
    if d > 1:
        kind = "all-reduce"
        add("data-parallel all-reduce of each layer's gradient shard", kind, ("data",),
            layout.layer_params("computed") / f * c, L, "backward", True)
        add("data-parallel all-reduce of the embedding gradient shard", kind, ("data",), embed / f * c, 1, "step",
            True)
    if t > 1:
        # A matmul split by `tensor` on its contracted side leaves partial sums: the outputs of wo (heads) and
        # w_down (mlp) in the forward, the input gradients of wq (heads), wk and wv (kv heads), w_gate and w_up
        # (mlp) in the backward. A dim the tensor axis does not divide is replicated: no partial sums there.
        h, k, f_ = (layout.heads < m.n_heads), (layout.kv_heads < m.n_kv_heads), (layout.mlp < m.mlp_dim)
        forward = h + f_
        # the partial input gradients that meet in one sum (q, k, v; gate, up) share one reduction on GPU/TPU
        backward = (h or k) + f_ if accelerator else h + 2 * k + 2 * f_
        recompute = forward if m.remat == "full" else 0
        add("tensor-parallel all-reduce of the wo and w_down outputs", "all-reduce", ("tensor",), n * D * c,
            forward * L, "forward", False)
        add("tensor-parallel all-reduce of the input gradients of wq, wk, wv, w_gate, w_up (summed on GPU/TPU)",
            "all-reduce", ("tensor",), n * D * c, backward * L, "backward", False)
        if h and not k:
            # K and V are replicated over `tensor` but the query heads that read them are split: each device
            # holds a partial sum of their gradients, reduced before the replicated projections' backward
            add("tensor-parallel all-reduce of the replicated K and V gradients (partial over query heads)",
                "all-reduce", ("tensor",), n * layout.kv_width * c, 2 * L, "backward", False)
        add("tensor-parallel all-reduce of the wo and w_down outputs, recomputed (remat full)", "all-reduce",
            ("tensor",), n * D * c, recompute * L, "backward", False)
        if layout.vocab < m.vocab_size:
            add("tensor-parallel all-reduce of the embedding lookup and the output projection's input gradient",
                "all-reduce", ("tensor",), n * D * c, 2, "step", False)
    from keel.plan.muon import muon_traffic  # it builds on `Traffic`

    return out + muon_traffic(layout)


def axes_class(axes: tuple[str, ...]) -> str:
    """"tensor" for a collective within tensor groups, "batch" for any over data and/or fsdp (XLA may reduce over
    data and fsdp in one step or two, and fold the tensor axis into a batch-axis reduction of a small buffer)."""
    return "tensor" if tuple(axes) == ("tensor",) else "batch" if axes else "none"


def totals_by_family(traffic: list[Traffic]) -> dict[str, float]:
    """Bytes per step by "family over class", e.g. "reduce over batch", "all-gather over batch"."""
    out: dict[str, float] = {}
    for x in traffic:
        key = f"{family(x.kind)} over {axes_class(x.axes)}"
        out[key] = out.get(key, 0.0) + x.total_bytes
    return out
