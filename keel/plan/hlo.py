"""What a compiled XLA program does, read from its HLO text: matmul FLOPs and collectives, each counted as many
times as it runs.

XLA's own `cost_analysis()` counts the body of a `while` loop once, whatever its trip count; keel runs its
layers with `jax.lax.scan`, so most of a train step sits inside two loops (forward and backward). Here every
instruction is weighted by the trip counts of the loops around it, so the totals are the step's: the
`known_trip_count` of the loop's backend config (XLA:CPU, GPU), else read off the loop itself as JAX emits
`scan` and `fori_loop` (XLA:TPU keeps no such config): the condition `i < n` on tuple element 0 with constant
n, and i's constant start in the loop's initial tuple (through copies).

A collective's `buffer_bytes` is the size of the whole buffer it works on, per device: an all-gather's result,
a reduce-scatter's operand, an all-reduce's or all-to-all's operand. Its `group` is the number of devices that
take part, and `axes` the mesh axes its groups span (given the mesh's shape; devices are numbered row-major over
the mesh, as `keel.parallel.sharding.make_mesh` lays them out).
"""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_CALLEE = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclass(frozen=True)
class Shape:
    dtype: str
    dims: tuple[int, ...]

    @property
    def bytes(self) -> float:
        return DTYPE_BYTES.get(self.dtype, 0) * math.prod(self.dims)


@dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    shapes: tuple[Shape, ...]  # the result: one shape, or a tuple's elements
    operands: tuple[str, ...]
    attrs: str
    literal: str = ""  # a constant's value or a parameter's number as written, e.g. "4"

    @property
    def result_bytes(self) -> float:
        return sum(s.bytes for s in self.shapes)


@dataclass(frozen=True)
class Collective:
    """One collective of the program, `count` times per run of the program."""

    kind: str
    buffer_bytes: float
    group: int
    axes: tuple[str, ...]
    count: int
    where: str  # the jax op it came from (metadata op_name), for reading


@dataclass
class Program:
    computations: dict[str, list[Instruction]]
    entry: str
    runs: dict[str, int]  # computation -> times it runs per run of the program (loop trip counts multiplied)

    def instructions(self) -> list[tuple[Instruction, int, str]]:
        return [(i, self.runs[c], c) for c, body in self.computations.items() if self.runs.get(c) for i in body]


def _split_type(text: str) -> tuple[str, str]:
    """(type, rest) of `TYPE opcode(...)...`: a tuple type runs to its matching parenthesis."""
    if text.startswith("("):
        depth = 0
        for i, ch in enumerate(text):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return text[: i + 1], text[i + 1 :].lstrip()
    head, _, rest = text.partition(" ")
    return head, rest


def _shapes(type_text: str) -> tuple[Shape, ...]:
    return tuple(Shape(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE.findall(type_text)
                 if d in DTYPE_BYTES)


def _operands(rest: str) -> tuple[str, tuple[str, ...], str, str]:
    """(opcode, operand names, attributes, the text inside the parentheses) from `opcode(%a, %b), attr=...`."""
    opcode, _, tail = rest.partition("(")
    depth, end = 1, len(tail)
    for i, ch in enumerate(tail):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return opcode.strip(), tuple(re.findall(r"%([\w.\-]+)", tail[:end])), tail[end + 1 :], tail[:end]


def parse(hlo_text: str) -> Program:
    computations: dict[str, list[Instruction]] = {}
    entry = ""
    current: list[Instruction] | None = None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and line.rstrip().endswith("{"):
            current = computations.setdefault(header.group(1), [])
            if line.startswith("ENTRY"):
                entry = header.group(1)
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTRUCTION.match(line) if current is not None else None
        if m:
            type_text, rest = _split_type(m.group(2))
            opcode, operands, attrs, inside = _operands(rest)
            literal = inside.strip() if opcode in ("constant", "parameter") else ""
            current.append(Instruction(m.group(1), opcode, _shapes(type_text), operands, attrs, literal))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return Program(computations, entry, _runs(computations, entry))


def _integer(name: str, by_name: Mapping[str, Instruction]) -> int | None:
    """The value of a scalar integer constant, looked up through copies and conversions; None if it is not one."""
    ins = by_name.get(name)
    for _ in range(8):
        if ins is None or ins.opcode not in ("copy", "convert", "bitcast"):
            break
        ins = by_name.get(ins.operands[0]) if ins.operands else None
    if ins is not None and ins.opcode == "constant" and re.fullmatch(r"-?\d+", ins.literal):
        return int(ins.literal)
    return None


def _bound(ins: Instruction, in_condition: Mapping[str, Instruction],
           computations: Mapping[str, list[Instruction]]) -> tuple[str, int] | None:
    """(the name of a, n) when `ins` computes a < n with n a constant: a compare, or a fusion around one."""
    if ins.opcode == "compare" and "direction=LT" in ins.attrs and len(ins.operands) == 2:
        stop = _integer(ins.operands[1], in_condition)
        return None if stop is None else (ins.operands[0], stop)
    if ins.opcode != "fusion":
        return None
    fused = computations.get(dict(_CALLEE.findall(ins.attrs)).get("calls", ""), [])
    in_fused = {i.name: i for i in fused}
    number = {i.name: int(i.literal) for i in fused if i.opcode == "parameter" and i.literal.isdigit()}
    for f in fused:
        if f.opcode != "compare" or "direction=LT" not in f.attrs or len(f.operands) != 2:
            continue
        a, b = f.operands
        if a not in number or number[a] >= len(ins.operands):
            continue
        stop = (_integer(ins.operands[number[b]], in_condition) if b in number and number[b] < len(ins.operands)
                else _integer(b, in_fused))
        if stop is not None:
            return ins.operands[number[a]], stop
    return None


def _counted_loop_trips(loop: Instruction, caller: Sequence[Instruction],
                        computations: Mapping[str, list[Instruction]]) -> int | None:
    """n - i0 for a `while` whose condition is `get-tuple-element(param, index=0) < n` (n constant; the compare
    may sit in a fusion) and whose initial tuple starts with the constant i0: how JAX's scan and fori_loop count.
    None for any other loop."""
    callees = dict(_CALLEE.findall(loop.attrs))
    condition = computations.get(callees.get("condition", ""), [])
    in_condition = {i.name: i for i in condition}
    in_caller = {i.name: i for i in caller}
    init = in_caller.get(loop.operands[0]) if loop.operands else None
    start = _integer(init.operands[0], in_caller) if init is not None and init.opcode == "tuple" else None
    for ins in condition:
        bound = _bound(ins, in_condition, computations)
        if bound is None:
            continue
        counter = in_condition.get(bound[0])
        if counter is None or counter.opcode != "get-tuple-element" or not re.search(r"\bindex=0\b", counter.attrs):
            continue
        if start is not None and bound[1] >= start:
            return bound[1] - start
    return None


def _runs(computations: dict[str, list[Instruction]], entry: str) -> dict[str, int]:
    """How often each computation runs when the entry runs once. Reducers (`to_apply`) and loop conditions are
    left out: they hold no dots or collectives of interest."""
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, body in computations.items():
        for ins in body:
            for kind, callee in _CALLEE.findall(ins.attrs):
                if kind == "body":
                    trip = _TRIP.search(ins.attrs)
                    n = int(trip.group(1)) if trip else _counted_loop_trips(ins, body, computations)
                    if n is None:
                        raise ValueError(f"while loop {ins.name} has no known trip count")
                    calls[name].append((callee, n))
                elif kind in ("calls", "true_computation", "false_computation"):
                    calls[name].append((callee, 1))
            for group in _BRANCHES.findall(ins.attrs):
                calls[name] += [(c, 1) for c in re.findall(r"%([\w.\-]+)", group)]
    runs: dict[str, int] = defaultdict(int)

    def visit(name: str, times: int) -> None:
        runs[name] += times
        for callee, n in calls.get(name, ()):
            visit(callee, times * n)

    visit(entry, 1)
    return dict(runs)


def _dims(attrs: str, key: str) -> tuple[int, ...]:
    m = re.search(rf"\b{key}=\{{([0-9,]*)\}}", attrs)
    return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


def _window(attrs: str, n: int) -> dict[str, list[int]]:
    """A convolution's `window={size=3x3 stride=2x2 pad=1_1x0_2 lhs_dilate=... rhs_dilate=...}` per spatial dim,
    with XLA's defaults for what it leaves out (stride and dilations 1, no padding); of a pad, the low side."""
    m = re.search(r"\bwindow=\{([^}]*)\}", attrs)
    fields = dict(f.split("=", 1) for f in m.group(1).split()) if m else {}
    return {key: [int(x.split("_")[0]) for x in fields[key].split("x")] if key in fields else [default] * n
            for key, default in (("size", 1), ("stride", 1), ("pad", 0), ("lhs_dilate", 1), ("rhs_dilate", 1))}


def _taps(n_in: int, n_out: int, size: int, stride: int, pad_lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, window tap) pairs of one spatial dim that land on an input element, not on padding or
    a hole of the base dilation: the multiply-adds the dim contributes per (batch, feature) pair."""
    o = np.arange(n_out)
    total = 0
    for t in range(size):
        pos = o * stride + t * rhs_dilate - pad_lo
        total += int(np.count_nonzero((pos >= 0) & (pos <= (n_in - 1) * lhs_dilate) & (pos % lhs_dilate == 0)))
    return total


def _convolution_flops(ins: Instruction, shapes: Mapping[str, tuple[Shape, ...]]) -> float:
    """2 x multiply-adds of a convolution, e.g. XLA:TPU's form of a dot (`dim_labels=0bf_io0->0bf`, batch dims
    moved into spatial ones, base-dilated windows for batched dots): per (batch, output feature, valid tap)
    one multiply-add for each input feature of its group (the kernel's `i` dim)."""
    m = re.search(r"\bdim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if m is None:
        raise ValueError(f"convolution {ins.name} has no dim_labels")
    lhs_l, rhs_l, out_l = m.groups()
    lhs, rhs, out = shapes[ins.operands[0]][0].dims, shapes[ins.operands[1]][0].dims, ins.shapes[0].dims
    spatial = sorted(c for c in out_l if c.isdigit())
    w = _window(ins.attrs, len(spatial))
    macs = out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")]
    for k, c in enumerate(spatial):
        macs *= _taps(lhs[lhs_l.index(c)], out[out_l.index(c)], w["size"][k], w["stride"][k], w["pad"][k],
                      w["lhs_dilate"][k], w["rhs_dilate"][k])
    return 2.0 * macs


def dot_flops(program: Program) -> float:
    """Matmul FLOPs, times the runs of each computation: 2 x (result elements) x (contracted size) for every dot,
    and the same count for every convolution (XLA:TPU writes its matmuls as convolutions)."""
    total = 0.0
    for name, body in program.computations.items():
        times = program.runs.get(name, 0)
        if not times:
            continue
        shapes = {i.name: i.shapes for i in body}
        for ins in body:
            if ins.opcode == "convolution":
                total += times * _convolution_flops(ins, shapes)
            elif ins.opcode == "dot":
                lhs = shapes[ins.operands[0]][0].dims
                contracted = math.prod(lhs[d] for d in _dims(ins.attrs, "lhs_contracting_dims"))
                total += times * 2 * math.prod(ins.shapes[0].dims) * contracted
    return total


def replica_groups(attrs: str, n_devices: int) -> list[list[int]]:
    """The device groups of a collective, in any of the three notations XLA prints."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        chosen = set(re.findall(r"'([^']+)'", m.group(2)))
        ids = list(range(math.prod(sizes)))
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i in ids:
            coord = _unravel(i, sizes)
            groups[tuple(c for c, a in zip(coord, names, strict=True) if a not in chosen)].append(i)
        return list(groups.values())
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
    if m:
        n_groups, size = int(m.group(1)), int(m.group(2))
        dims = [int(x) for x in m.group(3).split(",")]
        ids = _iota(dims, [int(x) for x in m.group(4).split(",")] if m.group(4) else list(range(len(dims))))
        return [ids[g * size : (g + 1) * size] for g in range(n_groups)]
    m = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", attrs)
    if m and m.group(1):
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
    m = re.search(r"source_target_pairs=\{((?:\{[0-9,]*\},?)*)\}", attrs)
    if m:
        pairs = [[int(x) for x in g.split(",")] for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
        return pairs
    return [list(range(n_devices))]


def _unravel(i: int, sizes: Sequence[int]) -> tuple[int, ...]:
    coord = []
    for s in reversed(sizes):
        coord.append(i % s)
        i //= s
    return tuple(reversed(coord))


def _iota(dims: list[int], perm: list[int]) -> list[int]:
    """Device ids of iota(dims) transposed by perm, flattened (XLA's `[G,S]<=[dims]T(perm)`)."""
    out_dims = [dims[p] for p in perm]
    ids = []
    for coord in itertools.product(*(range(d) for d in out_dims)):
        src = [0] * len(dims)
        for k, p in enumerate(perm):
            src[p] = coord[k]
        idx = 0
        for d, c in zip(dims, src, strict=True):
            idx = idx * d + c
        ids.append(idx)
    return ids


def group_axes(groups: list[list[int]], mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes along which the members of a collective's groups differ."""
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    varying: set[str] = set()
    for g in groups:
        coords = [_unravel(i, sizes) for i in g]
        varying |= {n for k, n in enumerate(names) if len({c[k] for c in coords}) > 1}
    return tuple(n for n in names if n in varying)


def _op_name(attrs: str) -> str:
    m = re.search(r'op_name="([^"]*)"', attrs)
    return m.group(1) if m else ""


def collectives(program: Program, mesh_shape: Mapping[str, int]) -> list[Collective]:
    """Every collective of the program (async `-start`/`-done` pairs counted once, at the start)."""
    n = math.prod(mesh_shape.values())
    out = []
    for ins, times, _ in program.instructions():
        kind = ins.opcode.removesuffix("-start")
        if kind not in COLLECTIVES:
            continue
        # An async all-gather's result is (operand, output); the others' results are their buffers' size
        # (a reduce-scatter's is a 1/group share of its operand, scaled up below).
        async_gather = kind == "all-gather" and ins.opcode.endswith("-start")
        size = ins.shapes[-1].bytes if async_gather else ins.result_bytes
        groups = replica_groups(ins.attrs, n)
        group = max(len(g) for g in groups)
        if kind == "reduce-scatter":
            size *= group
        out.append(Collective(kind, size, group, group_axes(groups, mesh_shape), times, _op_name(ins.attrs)))
    return out
