"""The planner against the compiler: compile keel's own train step (`keel.train.run.build_run`, the program
training runs) for a config on the local devices, and set XLA's memory, FLOPs and collectives beside the
prediction (`keel plan --check`; tests/test_planner.py on 8 fake CPU devices).

- memory: `memory_analysis()`'s peak, arguments + outputs - aliased + temporaries, against `MemoryEstimate.total`;
- FLOPs: `cost_analysis()["flops"]` against `Flops.xla_convention` (XLA counts a loop body once, and also counts
  elementwise work the planner leaves out), and the matmul FLOPs of the HLO weighted by loop trip counts
  (`keel.plan.hlo.dot_flops`) against the planner's total less the optimizer's elementwise part;
- collectives: bytes per step by (family, mesh axes) against `keel.plan.comms.step_traffic`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from keel.config import Config
from keel.parallel.sharding import mesh_shape
from keel.plan import hlo
from keel.plan.comms import axes_class, family, step_traffic, totals_by_family
from keel.plan.flops import step_flops
from keel.plan.layout import Layout, mesh_label
from keel.plan.memory import estimate


@dataclass
class CompiledStep:
    mesh: dict[str, int]
    argument_bytes: float
    output_bytes: float
    alias_bytes: float
    temp_bytes: float
    flops: float
    dot_flops: float
    collectives: list[hlo.Collective]
    heap_bytes: float | None = None
    """XLA:TPU's `peak_memory_in_bytes`: the arguments plus the temporaries of its buffer assignment, which its
    `temp_size_in_bytes` exceeds (docs/parallel.md, "Against XLA:TPU"); None on other backends."""

    @property
    def peak_bytes(self) -> float:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def compile_train_step(cfg: Config, devices: Sequence[jax.Device] | None = None) -> CompiledStep:
    """Compile `cfg`'s train step ahead of time, as `keel train` does, from abstract state and batch."""
    from keel.train.run import build_run

    run = build_run(cfg, bos=1, pad=0, devices=devices, log=lambda _: None)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    token = jnp.uint16 if cfg.model.vocab_size <= 2**16 else jnp.uint32
    batch = {"tokens": jax.ShapeDtypeStruct((B, T + 1), token, sharding=run.batch_sharding["tokens"]),
             "first_position": jax.ShapeDtypeStruct((B,), jnp.int32, sharding=run.batch_sharding["first_position"])}
    compiled = run.train_step.lower(run.restore_target(), batch).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mesh = dict(run.mesh.shape)
    program = hlo.parse(compiled.as_text())
    # meaningful on XLA:TPU (checked against its buffer-assignment dumps); XLA:CPU's is not the step's peak
    heap = getattr(mem, "peak_memory_in_bytes", None) if run.mesh.devices.flat[0].platform == "tpu" else None
    return CompiledStep(mesh, mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                        mem.temp_size_in_bytes, float(cost["flops"]), hlo.dot_flops(program),
                        hlo.collectives(program, mesh), float(heap) if heap else None)


@dataclass
class Comparison:
    mesh: dict[str, int]
    remat: str
    memory: tuple[float, float]  # (predicted, XLA)
    flops: tuple[float, float]  # XLA's convention: loop bodies once
    matmul_flops: tuple[float, float]  # the whole step's dots
    collectives: dict[str, tuple[float, float]] = field(default_factory=dict)  # "family over axes" -> bytes
    heap: tuple[float, float] | None = None  # (predicted, XLA:TPU's peak_memory_in_bytes) on TPUs

    @staticmethod
    def error(pair: tuple[float, float]) -> float:
        predicted, xla = pair
        return predicted / xla - 1 if xla else (0.0 if not predicted else math.inf)

    def significant_collectives(self, share: float = 0.02) -> dict[str, tuple[float, float]]:
        """The collective families that carry at least `share` of the step's bytes, predicted or compiled."""
        pred = sum(p for p, _ in self.collectives.values()) or 1.0
        xla = sum(x for _, x in self.collectives.values()) or 1.0
        return {k: v for k, v in self.collectives.items() if v[0] >= share * pred or v[1] >= share * xla}

    def table(self) -> str:
        rows = [("peak memory / device", *self.memory)]
        rows += [("peak memory / device (XLA's heap peak)", *self.heap)] if self.heap else []
        rows += [("FLOPs (XLA convention)", *self.flops), ("matmul FLOPs", *self.matmul_flops)]
        rows += [(f"{k} bytes", p, x) for k, (p, x) in sorted(self.collectives.items())]
        out = [f"mesh {mesh_label(self.mesh)} (data x fsdp x tensor), remat {self.remat}",
               f"{'':44s} {'predicted':>12s} {'XLA':>12s} {'error':>8s}"]
        for name, p, x in rows:
            err = self.error((p, x))
            out.append(f"{name:44s} {p:12.4g} {x:12.4g} {100 * err:+7.1f}%")
        return "\n".join(out)

    def to_json(self) -> dict:
        return {"mesh": self.mesh, "remat": self.remat, "memory": self.memory, "heap": self.heap,
                "flops": self.flops, "matmul_flops": self.matmul_flops, "collectives": self.collectives}


def compare(cfg: Config, devices: Sequence[jax.Device] | None = None) -> Comparison:
    """Predict and compile `cfg` on `devices` (default: all local devices) and set the two side by side."""
    devices = list(devices if devices is not None else jax.devices())
    mesh = mesh_shape(cfg.mesh, len(devices))
    layout = Layout(cfg, mesh)
    accelerator = devices[0].platform != "cpu"
    compiled = compile_train_step(cfg, devices)
    memory = estimate(layout, accelerator)
    flops = step_flops(layout)
    predicted = totals_by_family(step_traffic(layout, accelerator))
    actual = compiled_totals(compiled.collectives)
    keys = sorted(set(predicted) | set(actual))
    heap = (memory.total, compiled.heap_bytes) if compiled.heap_bytes else None
    return Comparison(mesh, cfg.model.remat, (memory.total, compiled.peak_bytes),
                      (flops.xla_convention, compiled.flops), (flops.matmul_total, compiled.dot_flops),
                      {k: (predicted.get(k, 0.0), actual.get(k, 0.0)) for k in keys}, heap)


def compiled_totals(collectives: Sequence[hlo.Collective]) -> dict[str, float]:
    """Bytes per step of compiled collectives by "family over class", as `totals_by_family` keys predictions."""
    out: dict[str, float] = {}
    for c in collectives:
        key = f"{family(c.kind)} over {axes_class(c.axes)}"
        out[key] = out.get(key, 0.0) + c.buffer_bytes * c.count
    return out
