"""Muon's Newton–Schulz step on 8 fake CPU devices: gathered (every device does every layer) vs layer-sharded
(each device does L/8 layers), on an FSDP-sharded stack. Prints step times, their ratio, per-device FLOPs from
XLA's cost analysis, and the measured overhead against the 5·d/B rule.

    python benchmarks/muon.py [--layers 16 --rows 512 --cols 2048 --tokens 65536 --reps 5]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from keel.config import MeshConfig  # noqa: E402
from keel.optim.muon import MatrixView, scale_by_muon  # noqa: E402
from keel.parallel.sharding import make_mesh  # noqa: E402


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rows", type=int, default=512, help="d: the matrix's input dim (model width)")
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=65536, help="B: tokens per batch, for the 5·d/B rule")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()

    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    shard = NamedSharding(mesh, P(None, "fsdp", None))
    grads = {"w": jax.device_put(np.random.default_rng(0).standard_normal((a.layers, a.rows, a.cols), np.float32),
                                 shard)}
    rows = {}
    outs = {}
    for strategy in ("gathered", "layer_sharded"):
        tx = scale_by_muon({"['w']": MatrixView(1, shard)}, strategy=strategy, mesh=mesh)
        state = jax.jit(tx.init)(grads)
        compiled = jax.jit(tx.update).lower(grads, state).compile()
        out, _ = compiled(grads, state)
        jax.block_until_ready(out)
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(grads, state)[0])
            times.append(time.perf_counter() - t0)
        rows[strategy] = (min(times), flops_of(compiled))
        outs[strategy] = np.asarray(out["w"])

    m, n = sorted((a.rows, a.cols))
    ns_flops = a.layers * 5 * (4 * m * m * n + 2 * m**3)  # per step: X X^T, A A, B X
    model_flops = 6 * a.layers * a.rows * a.cols * a.tokens  # these matrices' share of a training step
    rule = 5 * a.rows / a.tokens
    t_g, f_g = rows["gathered"]
    t_l, f_l = rows["layer_sharded"]
    print(f"stack ({a.layers}, {a.rows}, {a.cols}) float32, FSDP over 8 fake CPU devices, best of {a.reps}")
    print(f"{'strategy':<15}{'step s':>10}{'XLA FLOPs/device':>20}{'NS FLOPs all devices':>24}")
    print(f"{'gathered':<15}{t_g:>10.3f}{f_g:>20.3e}{8 * f_g:>24.3e}")
    print(f"{'layer_sharded':<15}{t_l:>10.3f}{f_l:>20.3e}{8 * f_l:>24.3e}")
    print(f"speed-up layer_sharded / gathered: {t_g / t_l:.1f}x   results bitwise equal: "
          f"{np.array_equal(outs['gathered'], outs['layer_sharded'])}   max |diff| "
          f"{np.abs(outs['gathered'] - outs['layer_sharded']).max():.2e}")
    print(f"Newton-Schulz FLOPs (analytic, once per layer): {ns_flops:.3e}; "
          f"layer-sharded total {8 * f_l / ns_flops:.2f}x of that, gathered {8 * f_g / ns_flops:.2f}x")
    print(f"overhead vs model FLOPs at B={a.tokens} tokens: layer_sharded {8 * f_l / model_flops:.4f}, "
          f"gathered {8 * f_g / model_flops:.4f}; the 5·d/B rule says {rule:.4f}")


if __name__ == "__main__":
    main()
