"""Optimizers by name. Each builder takes the run config (and, on a mesh, the parameter shardings) and returns
(optax transformation, learning-rate schedule).

Weight decay applies to matrices only (ndim >= 2); norm scales and other vectors are not decayed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import AbstractMesh, Mesh

from keel.config import Config, ModelConfig, OptimizerName, check_registry
from keel.model import transformer
from keel.model.transformer import ParamSpec, named_specs, param_specs
from keel.optim.layer_sharding import LayerShardingPlan, plan_layer_sharding, stack_shape
from keel.optim.muon import MatrixView, muon
from keel.optim.schedules import wsd
from keel.parallel.sharding import Sharder

Builder = Callable[[Config, Any, Mesh | None], tuple[optax.GradientTransformation, optax.Schedule]]


def decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _schedule(cfg: Config) -> optax.Schedule:
    o = cfg.optim
    return wsd(o.lr, cfg.train.steps, o.warmup_steps, o.decay_fraction, o.min_lr_ratio)


def _adamw(cfg: Config, schedule: optax.Schedule) -> optax.GradientTransformation:
    o = cfg.optim
    return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)


def _clipped(cfg: Config, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    clip = cfg.optim.grad_clip
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


def adamw(cfg: Config, shardings: Any = None, mesh: Mesh | None = None):
    schedule = _schedule(cfg)
    return _clipped(cfg, _adamw(cfg, schedule)), schedule


def muon_views(model: ModelConfig, shardings: Any = None) -> dict[str, MatrixView]:
    """The Muon side of the partition: every per-layer stacked matrix (leading `layers` axis, `n_in` > 0),
    keyed by parameter path, seen as (layers, in, out) by its spec's `n_in`. Embeddings (and a tied output),
    norms and vectors are not in it."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0] if shardings is not None else []
    sharding_of = {jax.tree_util.keystr(p): s for p, s in flat}
    return {key: MatrixView(spec.n_in, sharding_of.get(key)) for key, spec in named_specs(model).items()
            if spec.logical[0] == "layers" and spec.n_in > 0}


def muon_labels(model: ModelConfig) -> Any:
    views = muon_views(model)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "muon" if jax.tree_util.keystr(p) in views else "adamw",
        param_specs(model), is_leaf=lambda x: isinstance(x, ParamSpec))


def describe_partition(model: ModelConfig, mesh: Mesh | AbstractMesh | None = None, ns_steps: int = 5) -> str:
    """The Muon / AdamW partition of the parameters and, given the mesh, the layer-sharded Newton–Schulz plan
    on it (groups, rounds, balance, traffic), with each stack sharded as the rules table places it."""
    views = muon_views(model)
    rows: dict[str, list[str]] = {"muon": [], "adamw": []}
    for key, spec in named_specs(model).items():
        rows["muon" if key in views else "adamw"].append(f"{key}{list(spec.shape)}")
    text = "\n".join(f"  {name:5s} ({len(r)}): {', '.join(r)}" for name, r in rows.items())
    if mesh is None or not views or math.prod(mesh.shape.values()) == 1:  # one device: nothing to spread
        return text
    return text + "\n" + layer_sharding_plan(model, mesh, ns_steps).describe()


def layer_sharding_plan(model: ModelConfig, mesh: Mesh | AbstractMesh, ns_steps: int = 5) -> LayerShardingPlan:
    """Which device orthogonalises which Muon matrix of `model` on `mesh` (an `AbstractMesh` will do: the plan
    needs only shapes and shardings, so it can be made for meshes larger than the machine)."""
    shardings = Sharder(mesh).tree(transformer.abstract_params(model), transformer.logical_axes(model))
    specs = named_specs(model)
    mesh_shape = tuple(mesh.shape.items())
    stacks = tuple(stack_shape(key, specs[key].shape, view.n_in, view.sharding.spec, mesh_shape,
                               model.param_dtype)
                   for key, view in muon_views(model, shardings).items())
    return plan_layer_sharding(stacks, mesh_shape, ns_steps)


def muon_with_adamw(cfg: Config, shardings: Any = None, mesh: Mesh | None = None):
    o = cfg.optim
    schedule = _schedule(cfg)
    muon_tx = muon(
        schedule, muon_views(cfg.model, shardings), weight_decay=o.weight_decay, beta=o.muon_beta,
        ns_steps=o.muon_ns_steps, ns_coeffs=o.muon_ns_coeffs, nesterov=o.muon_nesterov,
        scaling=o.muon_scaling, strategy=o.muon_strategy, mesh=mesh,
    )
    tx = optax.multi_transform({"muon": muon_tx, "adamw": _adamw(cfg, schedule)}, muon_labels(cfg.model))
    return _clipped(cfg, tx), schedule


OPTIMIZERS: dict[str, Builder] = {"adamw": adamw, "muon": muon_with_adamw}
check_registry("OPTIMIZERS", OPTIMIZERS, OptimizerName)


def build_optimizer(cfg: Config, shardings: Any = None,
                    mesh: Mesh | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`shardings`: the parameters' shardings on `mesh` (None off a mesh, e.g. for abstract shapes)."""
    return OPTIMIZERS[cfg.optim.name](cfg, shardings, mesh)
