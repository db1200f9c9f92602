"""Silent data corruption during training (`train.sdc_every`): the same step computed on two device orders.

Every `sdc_every` steps, before the step runs, its loss and a hash of every bit of its gradients are computed
twice on the same parameters and batch: on the run's mesh and on the same mesh with each process's devices
rotated by one, so every shard lands on another device. The program and its reduction order are the same, so
healthy devices give identical bits (the hash sums integers, exact in any order); a mismatch means a device
computed or stored something wrong. Then keel records an `sdc` event naming both device orders, and stops with
exit code 7 (no restart: run `keel burnin` on the node first). With one device per process the two computations
share the device and only catch transient faults. The check's time is a `badput` span ("sdc_check").
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from keel.data.pack import Batch
from keel.errors import SilentDataCorruption
from keel.train.events import EventLog
from keel.train.faults import Faults
from keel.train.run import Run


def rotated(mesh: Mesh) -> Mesh:
    """`mesh` with each process's devices rotated by one place among that process's positions."""
    flat = list(mesh.devices.flat)
    out = list(flat)
    for proc in {d.process_index for d in flat}:
        where = [i for i, d in enumerate(flat) if d.process_index == proc]
        for i, j in zip(where, where[1:] + where[:1], strict=True):
            out[i] = flat[j]
    return Mesh(np.array(out, dtype=object).reshape(mesh.devices.shape), mesh.axis_names)


class SDCCheck:
    def __init__(self, run: Run, every: int, events: EventLog, faults: Faults):
        self.run, self.every, self.events, self.faults = run, every, events, faults
        self.meshes = (run.mesh, rotated(run.mesh))
        self.probes = [run.gradient_probe(m) for m in self.meshes] if every else []
        self.warm = False  # whether the probes are compiled (the first check compiles them)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def check(self, step: int, params: Any, batch: Batch) -> None:
        """Compute step `step` (0-based) on both device orders and compare; raises SilentDataCorruption."""
        with self.events.span("badput", label="sdc_check", step=step) as ev:
            results = []
            for k, (fn, p_sh, b_sh) in enumerate(self.probes):
                p = jax.device_put(params, p_sh)
                if k == 1 and self.faults.fire("sdc", step):
                    p = _corrupt_first_leaf(p)
                b = {name: jax.make_array_from_process_local_data(b_sh[name], v) for name, v in batch.items()}
                loss, h = fn(p, b)
                results.append((np.asarray(loss).view(np.uint32).item(), int(h), float(loss)))
            ev["ok"] = ok = results[0][:2] == results[1][:2]
        self.warm = True
        if ok:
            return
        orders = [[d.id for d in m.devices.flat] for m in self.meshes]
        self.events.emit("sdc", step=step, devices=orders[0], devices_rotated=orders[1],
                         loss=[r[2] for r in results], gradient_hash=[r[1] for r in results])
        raise SilentDataCorruption(
            f"step {step} computed twice gave different bits (loss {results[0][2]!r} vs {results[1][2]!r}, gradient "
            f"hash {results[0][1]:#010x} vs {results[1][1]:#010x}) on devices {orders[0]} and their rotation "
            f"{orders[1]}: a device computes wrong; run `keel burnin` on this node before training on it again")


def _corrupt_first_leaf(params: Any) -> Any:
    """One flipped bit in the first parameter array (the injected fault of `sdc@N`)."""
    leaves, tree = jax.tree.flatten(params)
    first = leaves[0]
    host = np.array(first)
    raw = host.reshape(-1).view(np.uint8)
    raw[host.dtype.itemsize - 1] ^= np.uint8(1 << 3)  # a high exponent bit of element 0 (little-endian)
    leaves[0] = jax.device_put(host, first.sharding)
    return jax.tree.unflatten(tree, leaves)
