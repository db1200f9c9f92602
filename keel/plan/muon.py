"""Muon's share of a step, read off the optimizer's own plan: `keel.optim.optimizers.layer_sharding_plan` decides,
from shapes and shardings alone, which device orthogonalises which matrix, so the same plan that runs on 8
devices prices 1,024 (docs/parallel.md, "Layer-sharded Newton–Schulz on any mesh").

- FLOPs: the busiest device's Newton–Schulz work (`device_flops.max()`), or every matrix on every device for
  `optim.muon_strategy=gathered`;
- traffic: per group, an all-to-all of its slots there and back over the shard axes and an all-gather over the
  replica axes (`Group`'s buffers, as `LayerShardingPlan.traffic` sums them); `gathered` all-gathers each stack;
- memory: those buffers in flight, and one matrix's Newton–Schulz temporaries (X, X·Xᵀ, its square and the
  polynomial: 2·m·n + 3·m² floats for m <= n; the matrices of a device run one at a time).
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import numpy as np
from jax.sharding import AbstractMesh

from keel.config import ModelConfig
from keel.optim.layer_sharding import LayerShardingPlan
from keel.plan.comms import Traffic
from keel.plan.layout import Layout


@functools.lru_cache(maxsize=256)
def _plan(model: ModelConfig, mesh_shape: tuple[tuple[str, int], ...], ns_steps: int) -> LayerShardingPlan:
    from keel.optim.optimizers import layer_sharding_plan

    names, sizes = zip(*mesh_shape, strict=True)
    return layer_sharding_plan(model, AbstractMesh(sizes, names), ns_steps)


def muon_plan(layout: Layout) -> LayerShardingPlan | None:
    """The layer-sharding plan of `layout`'s Muon stacks on its mesh; None without Muon."""
    cfg = layout.cfg
    if cfg.optim.name != "muon":
        return None
    # The plan depends on shapes and shardings only: one per model shape and mesh, whatever the remat policy.
    model = replace(cfg.model, remat="none")
    return _plan(model, tuple(layout.mesh.items()), cfg.optim.muon_ns_steps)


def _gathered(layout: Layout) -> bool:
    return layout.cfg.optim.muon_strategy == "gathered"


def newton_schulz_per_device(layout: Layout) -> float:
    plan = muon_plan(layout)
    if plan is None:
        return 0.0
    if _gathered(layout):
        return plan.total_flops
    return float(plan.device_flops.max(initial=0.0))


def _buffer(group) -> float:
    return group.n_shard * group.slots * group.piece_size * np.dtype(group.stacks[0].dtype).itemsize


def muon_traffic(layout: Layout) -> list[Traffic]:
    plan = muon_plan(layout)
    if plan is None or layout.devices == 1:
        return []
    out = []
    for g in plan.groups:
        if _gathered(layout):
            if g.shard_axes:
                size = sum(math.prod(s.shape) for s in g.stacks) * np.dtype(g.stacks[0].dtype).itemsize
                out.append(Traffic(f"Muon (gathered): all-gather of {g.name}", "all-gather", g.shard_axes, size, 1,
                                   "step", False))
            continue
        if g.shard_axes:
            out.append(Traffic(f"layer-sharded Muon: {g.name} to whole matrices and back", "all-to-all",
                               g.shard_axes, _buffer(g), 2, "step", False))
        if g.replica_axes:
            out.append(Traffic(f"layer-sharded Muon: {g.name} results shared between copies", "all-gather",
                               g.replica_axes, g.n_replica * _buffer(g), 1, "step", False))
    return out


def muon_transient(layout: Layout) -> float:
    plan = muon_plan(layout)
    if plan is None:
        return 0.0
    itemsize = {g: np.dtype(g.stacks[0].dtype).itemsize for g in plan.groups}
    if _gathered(layout):
        whole = sum(math.prod(s.shape) * itemsize[g] for g in plan.groups for s in g.stacks)
        temps = max(sum(s.shape[0] for s in g.stacks) * _temporaries(*g.fans) for g in plan.groups)
        return whole + temps
    buffers = sum(2 * _buffer(g) + g.n_replica * _buffer(g) * bool(g.replica_axes) for g in plan.groups)
    return buffers + max((_temporaries(*g.fans) for g in plan.groups), default=0.0)


def _temporaries(fan_in: int, fan_out: int) -> float:
    m, n = sorted((fan_in, fan_out))
    return (2 * m * n + 3 * m * m) * 4
