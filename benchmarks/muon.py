"""Muon's Newton–Schulz step on 8 fake CPU devices: gathered (every device does every layer) vs layer-sharded
(the matrices of all stacks bin-packed over the devices), on 1-D and 2-D meshes and for a model's many stacks.

Each row times both strategies on the same inputs, the orthogonalisation alone (what they differ in) and the
whole Muon update, alternating all runs rep by rep so that a busy machine slows them alike, and prints the
ratios, the goal 0.8 x min(8, L), the same orthogonalisation on one device (the total work, which the 8 fake
devices do on the machine's shared cores), the collectives of the compiled layer-sharded update and whether its
result equals one device's (bitwise, else the largest norm-relative difference).

Inputs are donated, as the train step donates its state: every timed call gets a fresh copy (made outside the
timing) whose buffers the result may take. Without donation the CPU runtime maps fresh pages for every result
(a 64 MiB replicated result per fake device costs ~17 ms of page faults, ~4x the copy itself), a cost of the
host allocator that accelerators' pooled allocators do not have; the orthogonalisation is also timed so
("fresh results") for comparison.

    python benchmarks/muon.py [--layers 16 --rows 512 --cols 2048 --reps 3] [--only fsdp8,many]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from keel.config import MeshConfig, load_config  # noqa: E402
from keel.model import transformer  # noqa: E402
from keel.optim.muon import STRATEGIES, MatrixView, newton_schulz, scale_by_muon  # noqa: E402
from keel.optim.optimizers import layer_sharding_plan, muon_views  # noqa: E402
from keel.parallel.sharding import Sharder, make_mesh  # noqa: E402

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "collective-permute", "reduce-scatter")


@dataclass(frozen=True)
class Case:
    name: str
    mesh: tuple[int, int, int]  # data, fsdp, tensor
    spec: P | None  # one stack with this spec; None: the model's stacks, sharded by the rules table


CASES = [
    Case("fsdp8", (1, 8, 1), P(None, "fsdp", None)),
    Case("dp8", (8, 1, 1), P()),
    Case("fsdp2xtp4", (1, 2, 4), P(None, "fsdp", "tensor")),
    Case("fsdp4xtp2", (1, 4, 2), P(None, "fsdp", "tensor")),
    Case("dp2xfsdp4", (2, 4, 1), P(None, "fsdp", None)),
    Case("dp2xfsdp2xtp2", (2, 2, 2), P(None, "fsdp", "tensor")),
    Case("many", (1, 4, 2), None),
]


def collectives(text: str) -> str:
    found = Counter(re.findall(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", text))
    return " ".join(f"{k} {v}" for k, v in sorted(found.items())) or "none"


def inputs(case: Case, mesh: Mesh, a: argparse.Namespace) -> tuple[dict, dict, str]:
    """(gradients on the mesh, Muon views, a description of the stacks)."""
    rng = np.random.default_rng(0)
    if case.spec is not None:
        shard = NamedSharding(mesh, case.spec)
        g = rng.standard_normal((a.layers, a.rows, a.cols), np.float32)
        return ({"w": jax.device_put(g, shard)}, {"['w']": MatrixView(1, shard)},
                f"({a.layers}, {a.rows}, {a.cols}) {case.spec}")
    model = load_config("tiny", a.many).model
    shardings = Sharder(mesh).tree(transformer.abstract_params(model), transformer.logical_axes(model))
    views = muon_views(model, shardings)
    params = transformer.abstract_params(model)["layers"]
    grads = {"layers": {k: jax.device_put(rng.standard_normal(params[k].shape, np.float32), shardings["layers"][k])
                        for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}}
    plan = layer_sharding_plan(model, mesh)
    return grads, views, (f"{len(views)} stacks x {model.n_layers} layers, d {model.d_model}, mlp {model.mlp_dim}; "
                          f"rounds {plan.rounds} (stack at a time {plan.stack_at_a_time()[0]}), "
                          f"balance {plan.balance:.0%}")


def fresh_copy(run: jax.stages.Compiled, args: tuple) -> tuple:
    """A copy of every argument, in the sharding `run` was compiled for: the buffers a donating call may take."""
    return jax.tree.map(lambda x, s: jax.jit(jnp.copy, out_shardings=s)(x), args, run.input_shardings[0])


def in_place(orthogonalise: Callable, views: dict, mesh: Mesh | None) -> Callable:
    """A strategy whose results keep their inputs' shardings (as `scale_by_muon`'s update puts them back), so
    that either strategy's results can take the donated inputs' buffers."""

    def run(stacks: dict) -> dict:
        out = orthogonalise(stacks, views, mesh, newton_schulz)
        if mesh is None:
            return out
        return {k: jax.lax.with_sharding_constraint(o, views[k].sharding) for k, o in out.items()}

    return run


def run_case(case: Case, a: argparse.Namespace) -> dict:
    """Times, per strategy, the orthogonalisation alone (what the strategies differ in) and the whole update
    (momentum and scaling too: on `dp` every device updates the whole replicated momentum, whatever the
    strategy), all four alternated rep by rep."""
    data, fsdp, tensor = case.mesh
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    grads, views, what = inputs(case, mesh, a)
    stacks = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(grads)[0]}
    # runs[key] = (compiled function, its arguments, whether it takes them donated: then copied afresh per call)
    runs: dict[tuple[str, str], tuple[jax.stages.Compiled, tuple, bool]] = {}
    outs, text = {}, ""
    for strategy in ("gathered", "layer_sharded"):
        tx = scale_by_muon(views, strategy=strategy, mesh=mesh)
        state = jax.jit(tx.init)(grads)
        update = jax.jit(tx.update, donate_argnums=(0, 1)).lower(grads, state).compile()
        orthogonalise = in_place(STRATEGIES[strategy], views, mesh)
        runs[("update", strategy)] = (update, (grads, state), True)
        runs[("orthogonalise", strategy)] = (jax.jit(orthogonalise, donate_argnums=0).lower(stacks).compile(),
                                             (stacks,), True)
        runs[("fresh", strategy)] = (jax.jit(orthogonalise).lower(stacks).compile(), (stacks,), False)
        outs[strategy] = jax.block_until_ready(update(*fresh_copy(update, (grads, state)))[0])
        if strategy == "layer_sharded":
            text = update.as_text()
    # The same orthogonalisation on one device: the total work, which the 8 fake devices share 2 cores to do
    one_views = {k: MatrixView(v.n_in) for k, v in views.items()}
    host_stacks = jax.device_put(jax.device_get(stacks), jax.devices()[0])
    runs[("orthogonalise", "one device")] = (
        jax.jit(in_place(STRATEGIES["layer_sharded"], one_views, None), donate_argnums=0).lower(host_stacks).compile(),
        (host_stacks,), True)
    for key, (run, _, donated) in runs.items():  # a donated run's results take its arguments' buffers, all of them
        mem = run.memory_analysis()
        assert not donated or mem.alias_size_in_bytes == mem.argument_size_in_bytes, (key, mem)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    for _ in range(a.reps):
        for k, (run, args, donated) in runs.items():
            args = jax.block_until_ready(fresh_copy(run, args)) if donated else args
            t0 = time.perf_counter()
            jax.block_until_ready(run(*args))
            times[k].append(time.perf_counter() - t0)
    one = scale_by_muon(one_views)  # one device, no mesh
    host = jax.device_get(grads)
    ref = jax.tree.leaves(jax.jit(one.update)(host, one.init(host))[0])
    got = [np.asarray(x) for x in jax.tree.leaves(outs["layer_sharded"])]
    err = max(float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(got, ref, strict=True))
    same = all(np.array_equal(x, y) for x, y in zip(got, ref, strict=True))
    layers = a.layers if case.spec is not None else load_config("tiny", a.many).model.n_layers
    best = {k: min(v) for k, v in times.items()}
    return {"case": case.name, "mesh": f"{data}x{fsdp}x{tensor}", "what": what, "best": best,
            "goal": 0.8 * min(8, layers), "collectives": collectives(text),
            "vs_one": "bitwise" if same else f"{err:.1e}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rows", type=int, default=512, help="the matrix's input dim (model width)")
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--many", nargs="*", default=["model.d_model=512", "model.n_heads=8", "model.n_kv_heads=2",
                                                  "model.head_dim=64", "model.mlp_dim=2048", "model.n_layers=4"],
                    help="overrides of the tiny preset for the many-stacks case")
    ap.add_argument("--only", default="", help="comma-separated case names")
    a = ap.parse_args()
    chosen = [c for c in CASES if not a.only or c.name in a.only.split(",")]
    print(f"8 fake CPU devices, float32, best of {a.reps} (all runs alternated); mesh is data x fsdp x tensor; "
          "inputs donated but for 'fresh results'")
    print("| case | mesh | stacks | orthogonalise: gathered s | layer-sharded s | speed-up | goal | one device s | "
          "fresh results: gathered s | layer-sharded s | speed-up | whole update: gathered s | layer-sharded s | "
          "speed-up | collectives (layer-sharded update) | vs 1 device |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in chosen:
        r = run_case(case, a)
        b = r["best"]
        o_g, o_l = b[("orthogonalise", "gathered")], b[("orthogonalise", "layer_sharded")]
        u_g, u_l = b[("update", "gathered")], b[("update", "layer_sharded")]
        f_g, f_l = b[("fresh", "gathered")], b[("fresh", "layer_sharded")]
        one = b[("orthogonalise", "one device")]
        print(f"| {r['case']} | {r['mesh']} | {r['what']} | {o_g:.3f} | {o_l:.3f} | **{o_g / o_l:.1f}x** | "
              f"{r['goal']:.1f}x | {one:.3f} | {f_g:.3f} | {f_l:.3f} | {f_g / f_l:.1f}x | {u_g:.3f} | {u_l:.3f} | "
              f"{u_g / u_l:.1f}x | {r['collectives']} | {r['vs_one']} |", flush=True)

if __name__ == "__main__":
    main()
