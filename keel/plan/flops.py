"""Matmul FLOPs one device runs per train step (docs/parallel.md, "Planner").

Per layer, with n = tokens per device and w = the layer's matrix elements per device (the `tensor` split kept,
the FSDP split gathered back): forward 2·n·w, backward 4·n·w. keel's attention (the pure-JAX reference)
computes every (query, key) pair and masks afterwards, so its two einsums cost 2·2·b·h·T·T·d_head forward
whatever the causal mask or sliding window, and twice that backward. Rematerialisation adds forward work in the
backward pass: `full` the whole layer, `dots_no_batch` the attention einsums (its saved set has no batch-dim
dots), `dots` and `none` nothing. The tied output projection costs 2·n·D·V forward and twice that backward.
The optimizer's elementwise update adds `OPTIMIZER_FLOPS_PER_PARAM` per parameter a device holds.
Muon's Newton–Schulz (5 iterations of 4·m²·n + 2·m³ per m x n matrix, m <= n) counts at the busiest device
of the optimizer's own layer-sharding plan (keel/plan/muon.py).

`model_flops_per_token` (keel/model/transformer.py) is the *model* FLOPs MFU divides by; this module counts
the *hardware* FLOPs the step executes, which the step time is made of.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from keel.plan.layout import Layout
from keel.plan.muon import newton_schulz_per_device

# XLA's count of AdamW's elementwise update per parameter (moments, bias correction, clip scale, weight decay):
# the slope of `cost_analysis()` flops in the parameter count, on any mesh.
OPTIMIZER_FLOPS_PER_PARAM = 20
# The attention einsums each remat policy recomputes in the backward pass, as a fraction of the forward.
ATTENTION_RECOMPUTE = {"none": 0.0, "full": 1.0, "dots": 0.0, "dots_no_batch": 1.0}
# The projections (x @ w) each policy recomputes.
PROJECTION_RECOMPUTE = {"none": 0.0, "full": 1.0, "dots": 0.0, "dots_no_batch": 0.0}


@dataclass(frozen=True)
class Flops:
    """Per device per step. `layer_*` are one layer's; the step runs `layers` of them."""

    layers: int
    layer_forward: float
    layer_backward: float
    layer_recompute: float
    head: float
    newton_schulz: float
    optimizer_elementwise: float

    @property
    def layer(self) -> float:
        return self.layer_forward + self.layer_backward + self.layer_recompute

    @property
    def matmul_total(self) -> float:
        return self.layers * self.layer + self.head + self.newton_schulz

    @property
    def total(self) -> float:
        return self.matmul_total + self.optimizer_elementwise

    @property
    def xla_convention(self) -> float:
        """What XLA's `cost_analysis()` counts of these: the body of a `while` loop once, whatever its trip count
        (keel scans its layers: one forward loop, one backward loop)."""
        return self.total - (self.layers - 1) * self.layer

    def to_json(self) -> dict[str, float]:
        return {**asdict(self), "matmul_total": self.matmul_total, "total": self.total}


def step_flops(layout: Layout) -> Flops:
    m = layout.cfg.model
    n, T = layout.tokens, layout.seq_len
    projections = 2 * n * layout.layer_matmul_weights()
    attention = 2 * 2 * layout.rows * layout.heads * T * T * m.head_dim
    forward = projections + attention
    policy = m.remat
    recompute = PROJECTION_RECOMPUTE[policy] * projections + ATTENTION_RECOMPUTE[policy] * attention
    head = 6 * n * m.d_model * layout.vocab
    params = sum(p.stored for p in layout.params)
    return Flops(m.n_layers, forward, 2 * forward, recompute, head, newton_schulz_per_device(layout),
                 OPTIMIZER_FLOPS_PER_PARAM * params)
