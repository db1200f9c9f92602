"""Device mesh and the one table that maps logical axis names to mesh axes (design invariant 3).

Every parameter and activation dimension carries a logical name. `LOGICAL_RULES` says which mesh axes each
name is split over; changing the parallelism of a run is changing this table or the mesh sizes, never the
model. A dimension whose size does not divide the mesh axes it maps to is replicated instead (and reported by
`describe`), so small models run unchanged on big meshes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from keel.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

LogicalAxes = tuple[str | None, ...]

LOGICAL_RULES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "batch": ("data", "fsdp"),
    "seq": (),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "vocab": ("tensor",),
    "layers": (),
})


def check_rules(rules: Mapping[str, tuple[str, ...]]) -> None:
    for name, axes in rules.items():
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ConfigError(f"sharding rule {name!r} -> {axes}: unknown mesh axes {bad}; known: {MESH_AXES}")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if n_devices % fixed:
            raise ConfigError(f"mesh {sizes}: {n_devices} devices are not divisible by the fixed axes ({fixed})")
        sizes = {k: (n_devices // fixed if v == -1 else v) for k, v in sizes.items()}
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices but {n_devices} are available; "
            "set one of mesh.data/mesh.fsdp/mesh.tensor to -1 to fill"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(cfg, len(devices))
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)


@dataclass(frozen=True)
class Sharder:
    """Turns logical axis names into shardings on one mesh."""

    mesh: Mesh
    rules: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: LOGICAL_RULES)

    def spec(self, logical: LogicalAxes, shape: Sequence[int] | None = None) -> PartitionSpec:
        used: set[str] = set()
        parts: list[str | tuple[str, ...] | None] = []
        for i, name in enumerate(logical):
            if name is None:
                parts.append(None)
                continue
            if name not in self.rules:
                raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(self.rules)}")
            # A mesh axis may shard only one dim of an array; and size-1 mesh axes are left out.
            axes = tuple(a for a in self.rules[name] if a not in used and self.mesh.shape[a] > 1)
            if shape is not None and axes and shape[i] % math.prod(self.mesh.shape[a] for a in axes):
                axes = ()
            used.update(axes)
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*parts)

    def sharding(self, logical: LogicalAxes, shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape))

    def constrain(self, x: jax.Array, logical: LogicalAxes) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(logical, x.shape))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def tree(self, abstract: object, logical: object) -> object:
        """Shardings for a tree of ShapeDtypeStructs given the matching tree of logical axes."""
        return jax.tree.map(lambda a, names: self.sharding(names, a.shape), abstract, logical,
                            is_leaf=lambda x: isinstance(x, tuple))


def shard_like(abstract_tree: object, param_shardings: object, fallback: NamedSharding) -> object:
    """Shardings for optimizer state: a leaf whose path ends with a parameter's path and has its shape
    (Adam moments, momentum buffers) is sharded like that parameter; everything else gets `fallback`."""
    by_path = {
        tuple(str(k) for k in path): s
        for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    }
    depth = {len(p) for p in by_path}

    def pick(path, leaf):
        keys = tuple(str(k) for k in path)
        for n in depth:
            s = by_path.get(keys[-n:]) if len(keys) >= n else None
            if s is not None and len(leaf.shape) == len(s.spec):
                return s
        return fallback

    return jax.tree_util.tree_map_with_path(pick, abstract_tree)
