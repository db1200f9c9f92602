"""Layer-sharded Newton–Schulz: each Muon matrix is orthogonalised once, whole, on one device, and the matrices
of all stacks are spread over the whole mesh at once, balanced by FLOPs.

A Muon stack (layers, *in_dims, *out_dims) arrives sharded however the rules table placed it: some dims split
over mesh axes (the stack's *shard axes*, e.g. `fsdp` on `embed` and `tensor` on `heads`), the rest of the mesh
holding copies (its *replica axes*, e.g. `data`). The plan, made once per trace from shapes and shardings only:

1. **Groups.** Stacks with the same matrix shape, dtype and sharding (`wk` and `wv`, `w_gate` and `w_up`) are
   one group: their local blocks are concatenated on the layer axis.
2. **Bin-packing.** Every matrix of every group is a job costing its Newton–Schulz FLOPs. The jobs go, largest
   first, to the device whose load stays lowest (LPT bin-packing; as in a layer-wise distributed optimizer,
   Megatron's, each whole matrix belongs to one device); a group's matrices may go to any device of the mesh
   (its *pool*: shard axes x replica axes). The busiest device's load approaches max(total / devices, largest
   matrix). The packing decides how many matrices of each group a device gets; which ones is free (they cost
   the same), so each device takes a contiguous run of layers.
3. **Slots.** In each group every device has `k` slots (the most matrices of that group any device got);
   the unfilled ones are padding that is moved as zeros but never computed (the device loops over its own
   count of filled slots).

Execution is one `shard_map` over the mesh. Groups with the same shard axes, replica axes and dtype move
together (a *bundle*; in keel's model usually all of them): each device gathers from its local blocks the
pieces of the matrices each peer on its shard axes will orthogonalise (a static table, indexed by the device's
replica coordinate), one `all_to_all` over the shard axes delivers whole matrices, Newton–Schulz runs locally,
one `all_to_all` sends the pieces back, and, when the stacks have replica axes, one `all_gather` over them gives
every copy the matrices its replicas computed. Nothing else communicates: no all-reduce, no reduce-scatter, no
rematerialisation by the partitioner. The all-gather is the least a replicated result allows: a copy must
receive every matrix it did not compute itself, the only alternative being to compute every matrix on every
copy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

MeshShape = tuple[tuple[str, int], ...]
"""Mesh axes and their sizes, in mesh order: `tuple(mesh.shape.items())`."""


def newton_schulz_flops(fan_in: int, fan_out: int, steps: int = 5) -> int:
    """FLOPs of `steps` quintic Newton–Schulz iterations on one (fan_in, fan_out) matrix: per step the Gram
    matrix (2·a²·b), its square (2·a³) and the product with X (2·a²·b), a the smaller side, b the larger."""
    a, b = sorted((fan_in, fan_out))
    return steps * (4 * a * a * b + 2 * a**3)


@dataclass(frozen=True)
class StackShape:
    """A Muon stack as the plan sees it: global shape (layers, *in_dims, *out_dims), how many dims after the
    layer axis are the matrix's input side, and, per dim, the mesh axes (of size > 1) that split it."""

    key: str
    shape: tuple[int, ...]
    n_in: int
    axes: tuple[tuple[str, ...], ...]
    dtype: str

    @property
    def fans(self) -> tuple[int, int]:
        fan_in = math.prod(self.shape[1 : 1 + self.n_in])
        return fan_in, math.prod(self.shape[1:]) // fan_in


def stack_shape(key: str, shape: Sequence[int], n_in: int, spec: PartitionSpec, mesh_shape: MeshShape,
                dtype: str = "float32") -> StackShape:
    """Normalise a stack's PartitionSpec: one tuple of mesh axes per dim, size-1 axes left out."""
    sizes = dict(mesh_shape)
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    axes = []
    for entry in entries:
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        axes.append(tuple(a for a in names if sizes[a] > 1))
    return StackShape(key, tuple(shape), n_in, tuple(axes), str(dtype))


@dataclass(frozen=True, eq=False)
class Group:
    """Stacks orthogonalised together: same (in, out) dims, dtype and sharding; their layers concatenated.

    `table[p, j]`: which local layer of the group the device at pool position p orthogonalises in its slot j
    (`padding` for an empty slot). A pool position is (replica coordinate, shard coordinate), replica-major,
    each coordinate the row-major index over its axes in mesh order; devices that differ only in the axes that
    split the layer dim (if any) share a position and do the same work on their own layers."""

    stacks: tuple[StackShape, ...]
    layer_axes: tuple[str, ...]
    shard_axes: tuple[str, ...]
    replica_axes: tuple[str, ...]
    sizes: Mapping[str, int]
    table: np.ndarray = field(repr=False)

    @property
    def dims(self) -> tuple[int, ...]:
        return self.stacks[0].shape[1:]

    @property
    def dim_axes(self) -> tuple[tuple[str, ...], ...]:
        return self.stacks[0].axes[1:]

    @property
    def pieces(self) -> tuple[int, ...]:
        """The local block's dims (after the layer axis)."""
        return tuple(d // math.prod(self.sizes[a] for a in ax) for d, ax in zip(self.dims, self.dim_axes,
                                                                                   strict=True))

    @property
    def piece_size(self) -> int:
        return math.prod(self.pieces)

    @property
    def fans(self) -> tuple[int, int]:
        return self.stacks[0].fans

    @property
    def layers_local(self) -> tuple[int, ...]:
        """Layers of each stack on one device (all of them unless the layer dim is split)."""
        split = math.prod(self.sizes[a] for a in self.layer_axes)
        return tuple(s.shape[0] // split for s in self.stacks)

    @property
    def n_shard(self) -> int:
        return math.prod(self.sizes[a] for a in self.shard_axes)

    @property
    def n_replica(self) -> int:
        return math.prod(self.sizes[a] for a in self.replica_axes)

    @property
    def slots(self) -> int:
        return self.table.shape[1]

    @property
    def padding(self) -> int:
        return sum(self.layers_local)

    @property
    def counts(self) -> np.ndarray:
        """Matrices each pool position orthogonalises."""
        return (self.table != self.padding).sum(axis=1)

    @property
    def name(self) -> str:
        return " ".join(s.key for s in self.stacks)

    def assemble(self, recv: jax.Array) -> jax.Array:
        """(shard sources, slots, piece) -> (slots, fan_in, fan_out): pieces from every device on the shard
        axes put back in place along the dims those axes split."""
        n_a = len(self.shard_axes)
        x = recv.reshape(*(self.sizes[a] for a in self.shard_axes), self.slots, *self.pieces)
        perm = [n_a]
        for i, ax in enumerate(self.dim_axes):
            perm += [self.shard_axes.index(a) for a in ax] + [n_a + 1 + i]
        return x.transpose(perm).reshape(self.slots, *self.fans)

    def disassemble(self, mats: jax.Array) -> jax.Array:
        """(slots, fan_in, fan_out) -> (shard destinations, slots, piece): the inverse of `assemble`."""
        expanded, where = [self.slots], {}
        for i, ax in enumerate(self.dim_axes):
            for a in ax:
                where[a] = len(expanded)
                expanded.append(self.sizes[a])
            where[i] = len(expanded)
            expanded.append(self.pieces[i])
        perm = [where[a] for a in self.shard_axes] + [0] + [where[i] for i in range(len(self.dims))]
        return mats.reshape(expanded).transpose(perm).reshape(self.n_shard, self.slots, self.piece_size)


@dataclass(frozen=True, eq=False)
class LayerShardingPlan:
    """Which device orthogonalises which matrix, for a set of Muon stacks on a mesh."""

    mesh_shape: MeshShape
    groups: tuple[Group, ...]
    device_flops: np.ndarray = field(repr=False)
    """Newton–Schulz FLOPs of each device (row-major over the mesh) per update."""
    device_matrices: np.ndarray = field(repr=False)
    ns_steps: int = 5

    @property
    def n_devices(self) -> int:
        return math.prod(s for _, s in self.mesh_shape)

    @property
    def n_matrices(self) -> int:
        return sum(s.shape[0] for g in self.groups for s in g.stacks)

    @property
    def rounds(self) -> int:
        """Matrices the busiest device orthogonalises one after another (in batches, one per group)."""
        return int(self.device_matrices.max(initial=0))

    @property
    def total_flops(self) -> float:
        return float(sum(newton_schulz_flops(*s.fans, self.ns_steps) * s.shape[0]
                         for g in self.groups for s in g.stacks))

    @property
    def lower_bound(self) -> float:
        """No assignment of whole matrices does better than this on the busiest device: max(total / devices,
        the largest matrix)."""
        largest = max((newton_schulz_flops(*g.fans, self.ns_steps) for g in self.groups), default=0)
        return max(self.total_flops / self.n_devices, float(largest))

    @property
    def balance(self) -> float:
        """Mean over busiest device FLOPs: 1.0 when Newton–Schulz time is total work / devices."""
        busiest = float(self.device_flops.max(initial=0.0))
        return self.total_flops / self.n_devices / busiest if busiest else 1.0

    def bundles(self) -> list[list[Group]]:
        """Groups that move together (same shard axes, replica axes and dtype): one all-to-all each way and
        one all-gather per bundle, whatever the number of stacks."""
        out: dict[tuple, list[Group]] = {}
        for g in self.groups:
            out.setdefault((g.shard_axes, g.replica_axes, g.stacks[0].dtype), []).append(g)
        return list(out.values())

    def stack_at_a_time(self) -> tuple[int, float]:
        """Rounds and busiest-device FLOPs if each stack were spread over all devices on its own (padded to a
        multiple of the device count, padding computed): the layout before stacks were packed together."""
        rounds = flops = 0
        for g in self.groups:
            for s in g.stacks:
                r = -(-s.shape[0] // self.n_devices)
                rounds += r
                flops += r * newton_schulz_flops(*s.fans, self.ns_steps)
        return rounds, float(flops)

    def traffic(self) -> dict[str, int]:
        """Bytes of the collectives' results on each device per update, as the compiled HLO shows them: the
        all-to-alls there and back, and the all-gather. Of an all-to-all over n devices (n-1)/n crosses links,
        of an all-gather over r copies (r-1)/r."""
        a2a = gather = 0
        for g in self.groups:
            buffer = g.n_shard * g.slots * g.piece_size * np.dtype(g.stacks[0].dtype).itemsize
            if g.shard_axes:
                a2a += 2 * buffer
            if g.replica_axes:
                gather += g.n_replica * buffer
        return {"all_to_all": a2a, "all_gather": gather}

    def describe(self) -> str:
        """The lines printed at start: the groups, rounds, balance and traffic."""
        mesh = " x ".join(f"{a} {s}" for a, s in self.mesh_shape)
        lines = [f"  layer-sharded Newton-Schulz: {self.n_matrices} matrices in {len(self.groups)} groups over "
                 f"{self.n_devices} devices ({mesh})"]
        for g in self.groups:
            counts = g.counts
            split = ", ".join(f"{'x'.join(ax)} on dim {i + 1}" for i, ax in enumerate(g.dim_axes) if ax)
            where = (f"split {split}" if split else "whole") + (
                f", copies over {'x'.join(g.replica_axes)}" if g.replica_axes else "")
            lines.append(f"    {g.name}: {sum(g.layers_local)} x {g.fans[0]}x{g.fans[1]} {g.stacks[0].dtype}, "
                         f"{where}; {g.slots} slot(s) per device, {int(counts.min())}-{int(counts.max())} used")
        busiest = float(self.device_flops.max(initial=0.0))
        old_rounds, old_flops = self.stack_at_a_time()
        mean = self.total_flops / self.n_devices
        t = self.traffic()
        lines.append(f"  rounds {self.rounds} (one stack at a time: {old_rounds}); busiest device "
                     f"{busiest / 1e9:.4g} GFLOP per update = {busiest / self.lower_bound:.2f}x the bound "
                     f"max(total/devices, largest matrix), balance (mean/busiest) {self.balance:.0%}; one stack "
                     f"at a time: {old_flops / 1e9:.4g} GFLOP, balance {mean / old_flops:.0%}")
        lines.append(f"  collectives per device and update: all-to-all {t['all_to_all'] / 2**20:.4g} MiB (there and "
                     f"back), all-gather {t['all_gather'] / 2**20:.4g} MiB")
        return "\n".join(lines)


@functools.lru_cache(maxsize=64)
def plan_layer_sharding(stacks: tuple[StackShape, ...], mesh_shape: MeshShape,
                        ns_steps: int = 5) -> LayerShardingPlan:
    """Group the stacks, bin-pack their matrices over the devices by Newton–Schulz FLOPs, and lay out slots."""
    sizes = dict(mesh_shape)
    order = [a for a, _ in mesh_shape]
    kinds: dict[tuple, list[StackShape]] = {}
    for s in stacks:
        kinds.setdefault((s.shape[1:], s.n_in, s.axes, s.dtype), []).append(s)

    ids = np.arange(math.prod(sizes.values())).reshape([sizes[a] for a in order])
    loads = np.zeros(ids.size)
    n_mats = np.zeros(ids.size, np.int64)
    layouts, pools, jobs = [], [], []
    for gi, members in enumerate(kinds.values()):
        layer_axes = members[0].axes[0]
        split_dims = {a for ax in members[0].axes[1:] for a in ax}
        shard_axes = tuple(a for a in order if a in split_dims)
        replica_axes = tuple(a for a in order if sizes[a] > 1 and a not in split_dims and a not in layer_axes)
        rest = [a for a in order if a not in shard_axes and a not in replica_axes]
        # pool[p]: the devices at pool position p (they differ only in layer-splitting or size-1 axes)
        pool = ids.transpose([order.index(a) for a in (*replica_axes, *shard_axes, *rest)])
        pools.append(pool.reshape(math.prod(sizes[a] for a in (*replica_axes, *shard_axes)), -1))
        layouts.append((layer_axes, shard_axes, replica_axes))
        n_local = sum(s.shape[0] for s in members) // math.prod(sizes[a] for a in layer_axes)
        cost = newton_schulz_flops(*members[0].fans, ns_steps)
        jobs += [(cost, gi)] * n_local

    # LPT: largest first, each to the pool position whose devices stay least loaded; among equals, one whose
    # slot count in this group is below the group's most (fewer padding slots to move), then the lowest.
    counts = [np.zeros(len(pool), np.int64) for pool in pools]
    for cost, gi in sorted(jobs, key=lambda j: (-j[0], j[1])):
        devices = pools[gi]
        after = loads[devices].max(axis=1) + cost
        full = counts[gi] >= counts[gi].max()
        p = int(np.lexsort((np.arange(len(after)), full, after))[0])
        counts[gi][p] += 1
        loads[devices[p]] += cost
        n_mats[devices[p]] += 1

    # A group's matrices all cost the same, so only the counts matter: give each position a contiguous run of
    # layers, in position order. When every position has the same count, the results gathered back are then
    # already in layer order (no copy to reorder them).
    groups = []
    for members, (layer_axes, shard_axes, replica_axes), count in zip(kinds.values(), layouts, counts,
                                                                      strict=True):
        n_local = int(count.sum())
        table = np.full((len(count), int(count.max())), n_local, np.int32)
        starts = np.cumsum(np.concatenate([[0], count]))
        for p, (lo, hi) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
            table[p, : hi - lo] = np.arange(lo, hi)
        groups.append(Group(tuple(members), layer_axes, shard_axes, replica_axes, sizes, table))
    return LayerShardingPlan(tuple(mesh_shape), tuple(groups), loads, n_mats, ns_steps)


def _linear_index(axes: tuple[str, ...]) -> jax.Array | int:
    return jax.lax.axis_index(axes) if axes else 0


def _orthogonalise_slots(g: Group, mats: jax.Array, position: jax.Array | int,
                         ns: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Newton–Schulz on this device's filled slots only (they come first; empty slots stay zero): a loop over
    the most loaded device's count, in which a device skips (`lax.cond`) the slots it does not fill, so padding
    costs no FLOPs. The trip count is static, so XLA and `keel plan --check` know it (a loop bound read from the
    device's own count would be dynamic)."""
    counts = g.counts
    if counts.min() == counts.max():
        return ns(mats)
    n = jnp.asarray(counts, jnp.int32)[position]

    def one(j: jax.Array, out: jax.Array) -> jax.Array:
        def fill(out: jax.Array) -> jax.Array:
            return jax.lax.dynamic_update_index_in_dim(out, ns(jax.lax.dynamic_slice_in_dim(mats, j, 1)), j, 0)

        return jax.lax.cond(j < n, fill, lambda out: out, out)

    return jax.lax.fori_loop(0, int(counts.max()), one, jnp.zeros_like(mats))


def _run_bundle(groups: Sequence[Group], blocks: Sequence[list[jax.Array]],
                ns: Callable[[jax.Array], jax.Array]) -> list[list[jax.Array]]:
    """Inside shard_map: this device's local blocks of the stacks of groups that share their shard and replica
    axes and dtype in, orthogonalised blocks out, with one all-to-all there, one back and (given replica axes)
    one all-gather for all of them."""
    g0 = groups[0]
    r = _linear_index(g0.replica_axes)
    a = _linear_index(g0.shard_axes)
    sends = []
    for g, bl in zip(groups, blocks, strict=True):
        x = bl[0] if len(bl) == 1 else jnp.concatenate(bl)
        by_replica = g.table.reshape(g.n_replica, g.n_shard * g.slots)
        rows = jnp.asarray(by_replica)[r] if g.replica_axes else by_replica[0]
        taken = jnp.take(x.reshape(x.shape[0], g.piece_size), rows, axis=0, mode="fill", fill_value=0)
        sends.append(taken.reshape(g.n_shard, g.slots * g.piece_size))
    widths = np.cumsum([0] + [g.slots * g.piece_size for g in groups])
    send = jnp.concatenate(sends, axis=1) if len(sends) > 1 else sends[0]
    recv = jax.lax.all_to_all(send, g0.shard_axes, 0, 0, tiled=True) if g0.shard_axes else send
    done = []
    for g, lo, hi in zip(groups, widths[:-1], widths[1:], strict=True):
        mats = g.assemble(recv[:, lo:hi].reshape(g.n_shard, g.slots, g.piece_size))
        done.append(g.disassemble(_orthogonalise_slots(g, mats, r * g.n_shard + a, ns)).reshape(g.n_shard, -1))
    back = jnp.concatenate(done, axis=1) if len(done) > 1 else done[0]
    back = jax.lax.all_to_all(back, g0.shard_axes, 0, 0, tiled=True) if g0.shard_axes else back
    if g0.replica_axes:
        back = jax.lax.all_gather(back, g0.replica_axes, axis=0, tiled=True)
    # back[p, lo + j * piece : ...]: the piece of the matrix in slot j of pool position p, for every p
    out = []
    for g, bl, lo, hi in zip(groups, blocks, widths[:-1], widths[1:], strict=True):
        where = np.empty(g.padding, np.int32)
        filled = g.table != g.padding
        where[g.table[filled]] = np.flatnonzero(filled)
        pieces = back[:, lo:hi].reshape(-1, g.piece_size)
        in_order = np.array_equal(where, np.arange(g.padding))
        layers = pieces[: g.padding] if in_order else jnp.take(pieces, where, axis=0)
        starts = np.cumsum((0, *g.layers_local))
        out.append([layers[i:j].reshape(b.shape) for i, j, b in zip(starts[:-1], starts[1:], bl, strict=True)])
    return out


def layer_sharded_newton_schulz(stacks: Mapping[str, jax.Array], n_in: Mapping[str, int],
                                specs: Mapping[str, PartitionSpec], mesh: Mesh,
                                ns: Callable[[jax.Array], jax.Array], ns_steps: int = 5) -> dict[str, jax.Array]:
    """Orthogonalise every matrix of every stack (layers, *in_dims, *out_dims), each once on one device, as
    `plan_layer_sharding` assigns them; results come back in each stack's own sharding `specs[key]`."""
    keys = list(stacks)
    if not keys:
        return {}
    mesh_shape = tuple(mesh.shape.items())
    shapes = tuple(stack_shape(k, stacks[k].shape, n_in[k], specs[k], mesh_shape, stacks[k].dtype.name)
                   for k in keys)
    plan = plan_layer_sharding(shapes, mesh_shape, ns_steps)

    def body(*blocks: jax.Array) -> tuple[jax.Array, ...]:
        local = dict(zip(keys, blocks, strict=True))
        out: dict[str, jax.Array] = {}
        for bundle in plan.bundles():
            members = [[s.key for s in g.stacks] for g in bundle]
            done = _run_bundle(bundle, [[local[k] for k in m] for m in members], ns)
            for m, d in zip(members, done, strict=True):
                out.update(zip(m, d, strict=True))
        return tuple(out[k] for k in keys)

    in_specs = tuple(specs[k] for k in keys)
    run = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=in_specs, check_vma=False)
    return dict(zip(keys, run(*(stacks[k] for k in keys)), strict=True))
