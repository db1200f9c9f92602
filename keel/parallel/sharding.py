"""Device mesh and the one table that maps logical axis names to mesh axes (docs/design.md, invariant 3).

Every parameter and activation dimension carries a logical name. `LOGICAL_RULES` says which mesh axes each
name is split over; changing the parallelism of a run is changing this table or the mesh sizes, never the
model. A dimension whose size does not divide the mesh axes it maps to is replicated instead, so small models
run unchanged on big meshes; `Sharder.tree` records each such dimension in `Sharder.notes`.
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


def check_rules(rules: Mapping[str, tuple[str, ...]], mesh_axes: Sequence[str] = MESH_AXES) -> None:
    """A rules table names only mesh axes that exist, and each at most once per rule."""
    for name, axes in rules.items():
        bad = [a for a in axes if a not in mesh_axes]
        if bad:
            raise ValueError(f"sharding rule {name!r} -> {axes}: unknown mesh axes {bad}; known: {tuple(mesh_axes)}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"sharding rule {name!r} -> {axes}: a mesh axis appears twice")


check_rules(LOGICAL_RULES)


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
    notes: list[str] = field(default_factory=list, compare=False, repr=False)
    """One line per dimension that `tree` (or `sharding` given `where`) replicated because its size does not
    divide its mesh axes, each once, in the order found; see `replicated_dims`."""

    def __post_init__(self) -> None:
        check_rules(self.rules, self.mesh.axis_names)

    def _place(self, logical: LogicalAxes, shape: Sequence[int] | None
               ) -> tuple[PartitionSpec, list[tuple[int, tuple[str, ...]]]]:
        """The spec, and the dims (with the mesh axes they would have had) replicated for divisibility."""
        used: set[str] = set()
        parts: list[str | tuple[str, ...] | None] = []
        undivided: list[tuple[int, tuple[str, ...]]] = []
        for i, name in enumerate(logical):
            if name is None:
                parts.append(None)
                continue
            if name not in self.rules:
                raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(self.rules)}")
            # A mesh axis may shard only one dim of an array; and size-1 mesh axes are left out.
            axes = tuple(a for a in self.rules[name] if a not in used and self.mesh.shape[a] > 1)
            if shape is not None and axes and shape[i] % math.prod(self.mesh.shape[a] for a in axes):
                undivided.append((i, axes))
                axes = ()
            used.update(axes)
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*parts), undivided

    def spec(self, logical: LogicalAxes, shape: Sequence[int] | None = None) -> PartitionSpec:
        return self._place(logical, shape)[0]

    def replicated_dims(self, logical: LogicalAxes, shape: Sequence[int], where: str) -> list[str]:
        """A note for each dim of the array `where` that its rule would shard but that is replicated because
        the mesh axes do not divide it, e.g. "params/layers/w_up dim 2 (mlp=768) is not divisible by
        tensor=5: replicated"."""
        notes = []
        for i, axes in self._place(logical, shape)[1]:
            sizes = [self.mesh.shape[a] for a in axes]
            by = "*".join(axes) + "=" + "*".join(map(str, sizes)) + (f"={math.prod(sizes)}" if len(sizes) > 1 else "")
            notes.append(f"{where} dim {i} ({logical[i]}={shape[i]}) is not divisible by {by}: replicated")
        return notes

    def _record(self, notes: list[str]) -> None:
        self.notes.extend(n for n in notes if n not in self.notes)

    def sharding(self, logical: LogicalAxes, shape: Sequence[int] | None = None,
                 where: str | None = None) -> NamedSharding:
        """`where` (a name for the array, e.g. "batch/tokens"): record replicated dims in `notes`."""
        if where is not None and shape is not None:
            self._record(self.replicated_dims(logical, shape, where))
        return NamedSharding(self.mesh, self.spec(logical, shape))

    def constrain(self, x: jax.Array, logical: LogicalAxes) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(logical, x.shape))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def tree(self, abstract: object, logical: object, root: str = "params") -> object:
        """Shardings for a tree of ShapeDtypeStructs given the matching tree of logical axes. Replicated dims
        are recorded in `notes`, named by their path under `root` ("params/layers/wk")."""

        def one(path: tuple, a: jax.ShapeDtypeStruct, names: LogicalAxes) -> NamedSharding:
            return self.sharding(names, a.shape, where="/".join([root, *map(_key_name, path)]))

        return jax.tree_util.tree_map_with_path(one, abstract, logical, is_leaf=lambda x: isinstance(x, tuple))


def _key_name(key: object) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


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
