"""What one device holds and computes for a config on a mesh of any size, from keel's own sharding table.

The mesh need not exist: `Sharder` runs on a `jax.sharding.AbstractMesh`, so planning 1,024 chips on a laptop
uses the same `LOGICAL_RULES` (and the same replicate-if-not-divisible fallback) as a run on them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec

from keel.config import Config
from keel.model.transformer import ParamSpec, named_specs
from keel.parallel.sharding import MESH_AXES, Sharder

MeshShape = Mapping[str, int]


def mesh_dict(mesh_shape: MeshShape | Sequence[int]) -> dict[str, int]:
    """{"data": d, "fsdp": f, "tensor": t} from such a mapping (missing axes are 1) or a (d, f, t) sequence."""
    if isinstance(mesh_shape, Mapping):
        unknown = set(mesh_shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
        sizes = {a: int(mesh_shape.get(a, 1)) for a in MESH_AXES}
    else:
        if len(mesh_shape) != len(MESH_AXES):
            raise ValueError(f"a mesh shape is (data, fsdp, tensor); got {tuple(mesh_shape)}")
        sizes = dict(zip(MESH_AXES, (int(s) for s in mesh_shape), strict=True))
    if any(s < 1 for s in sizes.values()):
        raise ValueError(f"mesh axes must be >= 1; got {sizes}")
    return sizes


def mesh_label(mesh: MeshShape) -> str:
    return "x".join(str(mesh[a]) for a in MESH_AXES)


def _split(spec: PartitionSpec, mesh: MeshShape, axes: Sequence[str] = MESH_AXES) -> list[int]:
    """For each dim of an array with this spec: how many ways the given mesh axes split it."""
    out = []
    for part in spec:
        names = () if part is None else (part,) if isinstance(part, str) else tuple(part)
        out.append(math.prod(mesh[a] for a in names if a in axes))
    return out


@dataclass(frozen=True)
class Param:
    """One parameter on the mesh: `stored` elements per device (its shard), `computed` elements per device as a
    matmul operand (FSDP gathers the `fsdp` split back; the `tensor` split stays), whether FSDP gathers it."""

    name: str
    spec: ParamSpec
    stored: int
    computed: int
    fsdp_gathered: bool
    per_layer: bool


@dataclass(frozen=True)
class Layout:
    """A config on a mesh: the per-device sizes the planner's equations use (docs/parallel.md, "Planner")."""

    cfg: Config
    mesh: dict[str, int]

    @classmethod
    def of(cls, cfg: Config, mesh_shape: MeshShape | Sequence[int]) -> Layout:
        return cls(cfg, mesh_dict(mesh_shape))

    @cached_property
    def sharder(self) -> Sharder:
        return Sharder(AbstractMesh(tuple(self.mesh[a] for a in MESH_AXES), MESH_AXES))

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @cached_property
    def params(self) -> list[Param]:
        out = []
        for name, spec in named_specs(self.cfg.model).items():
            p = self.sharder.spec(spec.logical, spec.shape)
            n = math.prod(spec.shape)
            stored = n // math.prod(_split(p, self.mesh))
            computed = n // math.prod(_split(p, self.mesh, ("tensor",)))
            out.append(Param(name, spec, stored, computed, "fsdp" in str(p), spec.logical[0] == "layers"))
        return out

    @cached_property
    def notes(self) -> list[str]:
        """Dims the sharding table would split but cannot (replicated), as `Sharder` words them."""
        notes: list[str] = []
        for name, spec in named_specs(self.cfg.model).items():
            notes += self.sharder.replicated_dims(spec.logical, spec.shape, f"params{name}")
        notes += self.sharder.replicated_dims(("batch", None), (self.cfg.train.batch_size, self.seq_len),
                                              "batch/tokens")
        return notes

    # ---- the batch
    @property
    def seq_len(self) -> int:
        return self.cfg.data.seq_len

    @cached_property
    def rows(self) -> int:
        """Sequences per device (the batch is split over `data` x `fsdp`, or replicated if they do not divide it)."""
        B = self.cfg.train.batch_size
        return B // math.prod(_split(self.sharder.spec(("batch",), (B,)), self.mesh))

    @property
    def tokens(self) -> int:
        """Tokens each device runs through the model per step."""
        return self.rows * self.seq_len

    @property
    def batch_divides(self) -> bool:
        return self.cfg.train.batch_size % (self.mesh["data"] * self.mesh["fsdp"]) == 0

    # ---- per-device widths of the model's activations (a dim the `tensor` axis cannot split stays whole)
    def _width(self, logical: str, size: int) -> int:
        return size // math.prod(_split(self.sharder.spec((logical,), (size,)), self.mesh, ("tensor",)))

    @property
    def heads(self) -> int:
        return self._width("heads", self.cfg.model.n_heads)

    @property
    def kv_heads(self) -> int:
        return self._width("kv_heads", self.cfg.model.n_kv_heads)

    @property
    def mlp(self) -> int:
        return self._width("mlp", self.cfg.model.mlp_dim)

    @property
    def vocab(self) -> int:
        return self._width("vocab", self.cfg.model.vocab_size)

    @property
    def q_width(self) -> int:
        return self.heads * self.cfg.model.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.cfg.model.head_dim

    # ---- dtypes
    @property
    def param_bytes(self) -> int:
        return jnp.dtype(self.cfg.model.param_dtype).itemsize

    def compute_bytes(self, accelerator: bool) -> int:
        """`model.compute_dtype`, with "auto" resolved as keel resolves it on the target: bfloat16 on an
        accelerator, float32 on a CPU."""
        name = self.cfg.model.compute_dtype
        if name == "auto":
            return 2 if accelerator else 4
        return jnp.dtype(name).itemsize

    # ---- sums over the parameter table
    def layer_params(self, which: str = "computed") -> int:
        """Elements of one layer's parameters per device: `computed` (as matmul operands, after the FSDP gather)
        or `stored` (the shard)."""
        L = self.cfg.model.n_layers
        return sum(getattr(p, which) for p in self.params if p.per_layer) // L

    def layer_matmul_weights(self) -> int:
        """Elements of one layer's matrices per device, as matmul operands (norm scales left out)."""
        L = self.cfg.model.n_layers
        return sum(p.computed for p in self.params if p.per_layer and p.spec.n_in) // L

    def gathered_layer_params(self) -> int:
        """Elements of one layer's parameters that FSDP all-gathers, per device, after the gather."""
        L = self.cfg.model.n_layers
        return sum(p.computed for p in self.params if p.per_layer and p.fsdp_gathered) // L

    def embedding(self, which: str = "computed") -> int:
        return sum(getattr(p, which) for p in self.params if p.name in ("['embed']", "['unembed']"))
