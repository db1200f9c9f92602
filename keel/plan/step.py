"""Step time, MFU and tokens/s of a config on a mesh of an accelerator, and the search over meshes and remat
policies that `keel plan` prints (docs/parallel.md, "Planner").

    compute   = hardware FLOPs per device / (peak bf16 FLOP/s x efficiency)
    a collective's time = its wire bytes per device / the bandwidth of the links its group spans
    exposed   = tensor-parallel + Muon + embedding re-layout traffic (on the critical path)
                + per layer, FSDP/data-parallel traffic beyond that layer's compute (the rest hides behind it)
    step      = compute + exposed
    MFU       = model FLOPs per token x tokens per step / (step x devices x peak)

Devices are numbered row-major over (data, fsdp, tensor), as `keel.parallel.sharding.make_mesh` lays out
`jax.devices()`: `tensor` neighbours are adjacent, so a group whose devices all lie in one fast domain (an
8-GPU node, a TPU slice) uses its links (`node_gbps`), any other the network between domains (`network_gbps`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from keel.config import Config
from keel.diag.specs import AcceleratorSpec
from keel.model.transformer import model_flops_per_token
from keel.parallel.sharding import MESH_AXES
from keel.plan.comms import Traffic, step_traffic
from keel.plan.flops import Flops, step_flops
from keel.plan.layout import Layout, mesh_label
from keel.plan.memory import MemoryEstimate, estimate

DEFAULT_EFFICIENCY = 0.6
"""The fraction of the bf16 dense peak the step's matmuls sustain. Large bf16 matmuls reach ~80 % of the data
sheet on H100/H200 (e.g. ~790 of 989 TFLOP/s); a whole step adds smaller matmuls, the attention einsums,
elementwise work and kernel launch gaps. Not yet measured for keel on an accelerator: `--efficiency` sets it."""
DEFAULT_RESERVE = 0.1
"""The fraction of HBM left to the runtime (see `MemoryEstimate.fits`)."""
REMAT_POLICIES = ("full", "dots_no_batch", "dots", "none")


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    fsdp_s: float  # FSDP all-gathers and reduce-scatters, data-parallel all-reduces: wire time
    tensor_s: float
    muon_s: float
    other_s: float  # the embedding's re-layout
    exposed_s: float
    overlapped_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.exposed_s

    def to_json(self) -> dict[str, float]:
        return {"compute_s": self.compute_s, "fsdp_s": self.fsdp_s, "tensor_s": self.tensor_s,
                "muon_s": self.muon_s, "other_s": self.other_s, "exposed_s": self.exposed_s,
                "overlapped_s": self.overlapped_s, "total_s": self.total_s}


@dataclass
class PlanRow:
    mesh: dict[str, int]
    remat: str
    memory: MemoryEstimate
    flops: Flops
    time: StepTime
    tokens_per_s: float
    mfu: float
    feasible: bool
    why_not: str = ""
    best: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return mesh_label(self.mesh)

    def to_json(self) -> dict[str, Any]:
        return {"mesh": self.mesh, "remat": self.remat, "memory": self.memory.to_json(),
                "flops": self.flops.to_json(), "time": self.time.to_json(), "tokens_per_s": self.tokens_per_s,
                "mfu": self.mfu, "feasible": self.feasible, "why_not": self.why_not, "best": self.best,
                "notes": self.notes}


def strides(mesh: dict[str, int]) -> dict[str, int]:
    """Device-id stride of each mesh axis (row-major over data, fsdp, tensor)."""
    out, s = {}, 1
    for a in reversed(MESH_AXES):
        out[a] = s
        s *= mesh[a]
    return out


def bandwidth_gbps(mesh: dict[str, int], axes: Sequence[str], spec: AcceleratorSpec) -> float:
    """One direction, per device: the fast domain's links if the group of `axes` lies inside one, else the
    network's."""
    st = strides(mesh)
    extent = max((st[a] * mesh[a] for a in axes), default=1)
    inside = extent <= spec.node_size and spec.node_size % extent == 0
    return spec.node_gbps if inside else spec.network_gbps


def traffic_seconds(x: Traffic, mesh: dict[str, int], spec: AcceleratorSpec) -> float:
    return x.wire_bytes(mesh) / (bandwidth_gbps(mesh, x.axes, spec) * 1e9)


def step_time(layout: Layout, flops: Flops, traffic: list[Traffic], spec: AcceleratorSpec,
              efficiency: float) -> StepTime:
    rate = spec.bf16_tflops * 1e12 * efficiency
    L = layout.cfg.model.n_layers
    seconds = {id(x): traffic_seconds(x, layout.mesh, spec) for x in traffic}

    def total(pred) -> float:
        return sum(seconds[id(x)] for x in traffic if pred(x))

    fsdp = total(lambda x: x.overlap)
    tensor = total(lambda x: x.axes == ("tensor",))
    muon = total(lambda x: "Muon" in x.what)
    other = total(lambda x: not x.overlap and x.axes != ("tensor",) and "Muon" not in x.what)
    # Per layer, the FSDP/data-parallel traffic of a pass hides behind that pass's compute of the layer.
    per_layer = {"forward": flops.layer_forward / rate,
                 "backward": (flops.layer_backward + flops.layer_recompute) / rate}
    exposed_fsdp = 0.0
    for phase, compute in per_layer.items():
        comm = total(lambda x, p=phase: x.overlap and x.phase == p) / L
        exposed_fsdp += L * max(0.0, comm - compute)
    step_level = total(lambda x: x.overlap and x.phase == "step")
    exposed_fsdp += max(0.0, step_level - flops.head / rate)
    exposed = exposed_fsdp + tensor + muon + other
    return StepTime(flops.total / rate, fsdp, tensor, muon, other, exposed, fsdp - exposed_fsdp)


def plan_row(cfg: Config, mesh: dict[str, int], spec: AcceleratorSpec, efficiency: float = DEFAULT_EFFICIENCY,
             reserve: float = DEFAULT_RESERVE, abstract: Any = None) -> PlanRow:
    layout = Layout(cfg, dict(mesh))
    memory = estimate(layout, accelerator=True, abstract=abstract)
    flops = step_flops(layout)
    time = step_time(layout, flops, step_traffic(layout, accelerator=True), spec, efficiency)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    step_s = time.total_s
    mfu = model_flops_per_token(cfg.model, cfg.data.seq_len) * tokens / (
        step_s * layout.devices * spec.bf16_tflops * 1e12)
    why = []
    if not layout.batch_divides:
        why.append(f"batch {cfg.train.batch_size} not divisible by data x fsdp = {mesh['data'] * mesh['fsdp']}")
    if not memory.fits(spec.hbm_bytes, reserve):
        why.append(f"needs {memory.total / 1e9:.1f} GB of {spec.hbm_gb * (1 - reserve):.1f} GB usable")
    return PlanRow(dict(mesh), cfg.model.remat, memory, flops, time, tokens / step_s, mfu, not why,
                   "; ".join(why), notes=layout.notes)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_meshes(chips: int, batch_rows: int, max_tensor: int) -> Iterator[dict[str, int]]:
    """(data, fsdp, tensor) shapes of `chips` whose data x fsdp divides the batch; tensor a power of two up to
    `max_tensor` (tensor parallelism beyond a fast domain is never worth its all-reduces)."""
    t = 1
    while t <= min(max_tensor, chips):
        if chips % t == 0:
            for d in _divisors(chips // t):
                f = chips // t // d
                if batch_rows % (d * f) == 0:
                    yield {"data": d, "fsdp": f, "tensor": t}
        t *= 2


def with_remat(cfg: Config, remat: str) -> Config:
    return replace(cfg, model=replace(cfg.model, remat=remat))


def plan(cfg: Config, spec: AcceleratorSpec, chips: int, remat: Sequence[str] = REMAT_POLICIES,
         efficiency: float = DEFAULT_EFFICIENCY, reserve: float = DEFAULT_RESERVE,
         max_tensor: int | None = None) -> list[PlanRow]:
    """Every candidate mesh x remat policy, best first: feasible rows by tokens/s (within 0.5 % the leaner in
    memory first), then the rest by memory. The best feasible row has `best` set."""
    from keel.train.state import abstract_state

    abstract = abstract_state(cfg)  # the state's shapes depend on neither the mesh nor the remat policy
    max_tensor = max_tensor or min(spec.node_size, 16)
    rows = [plan_row(with_remat(cfg, r), mesh, spec, efficiency, reserve, abstract)
            for mesh in candidate_meshes(chips, cfg.train.batch_size, max_tensor) for r in remat]
    fastest = max((r.tokens_per_s for r in rows if r.feasible), default=1.0)

    def order(r: PlanRow) -> tuple:
        # Feasible rows by tokens/s in bins of 0.5 % (closer is noise of the model), then by memory.
        if r.feasible:
            return (0, -round(200 * r.tokens_per_s / fastest), r.memory.total)
        return (1, 0, r.memory.total)

    rows.sort(key=order)
    if rows and rows[0].feasible:
        rows[0].best = True
    return rows


def parse_batch(text: str, seq_len: int) -> int:
    """Sequences per step from "512", "512-seqs", "4M-tokens" (K and M binary: 4M = 4 x 2^20), "4194304-tokens"."""
    t = text.strip().lower().replace("_", "")
    unit = "seqs"
    for suffix in ("-tokens", "tokens", "-seqs", "seqs", "-sequences", "sequences"):
        if t.endswith(suffix):
            unit, t = ("tokens" if "token" in suffix else "seqs"), t[: -len(suffix)]
            break
    scale = {"k": 2**10, "m": 2**20, "g": 2**30}.get(t[-1:], 1)
    if scale > 1:
        t = t[:-1]
    try:
        value = float(t) * scale
    except ValueError:
        raise ValueError(f"global batch {text!r}: want e.g. 512, 512-seqs or 4M-tokens") from None
    if unit == "tokens":
        value /= seq_len
    if value < 1 or not math.isclose(value, round(value)):
        raise ValueError(f"global batch {text!r} is not a whole number of {seq_len}-token sequences")
    return round(value)
