"""Compile keel's Mosaic flash kernels for TPUs without a TPU: deviceless ahead-of-time compilation through
libtpu, which runs Mosaic's own compiler (layout inference, VMEM allocation) exactly as on the chip.

For each chip (v4, v5e, v5p, v6e) a grid of cases (head dims 64-256 incl. 80 and 192, bf16 and f32, documents,
windows, softcap, GQA/MQA, bidirectional, L 2k-32k, default and explicit blocks) is compiled forward+backward
with the chip's VMEM size given to keel (so its default blocks and VMEM limit are the chip's), then the model's
forward+backward with `model.attention=pallas` on a 2x2 data x tensor mesh of the chip. Nothing runs: this
checks that Mosaic accepts what keel emits and that it fits VMEM, not numerics or speed.

libtpu is not a keel dependency (it is large and makes JAX probe for TPUs at start-up); use a venv of its own:

    python3 -m venv /tmp/tpuvenv && /tmp/tpuvenv/bin/pip install -c constraints.txt 'jax[tpu]' -e .
    TPU_ACCELERATOR_TYPE=v5litepod-4 TPU_WORKER_HOSTNAMES=localhost JAX_PLATFORMS=cpu \\
        /tmp/tpuvenv/bin/python benchmarks/tpu_compile.py [--chips v5e v6e] [--out DIR]

Writes DIR/tpu_compile.{json,md}; exit status 1 if any case fails to compile.

`--plan TOPOLOGY PRESET [OVERRIDES...]` instead runs `keel plan --check`'s comparison for a TPU topology: keel's
whole train step (as `keel train` builds it) compiled deviceless, XLA:TPU's peak memory, FLOPs and collective
bytes beside the planner's, e.g. `--plan v5p:2x2x1 tiny mesh.fsdp=4 model.compute_dtype=bfloat16` (state the
dtype: `auto` resolves by this process's backend, the CPU; the 1b preset takes ~9 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from keel.kernels import flash, flash_tpu  # noqa: E402

CHIPS = {  # name: (a small topology of it, Pallas' chip version)
    "v4": ("v4:2x2x1", "TPU_V4"),
    "v5e": ("v5e:2x2", "TPU_V5E"),
    "v5p": ("v5p:2x2x1", "TPU_V5P"),
    "v6e": ("v6e:2x2", "TPU_V6E"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    L: int
    H: int
    K: int
    D: int
    dtype: str = "bfloat16"
    documents: bool = True
    window: int = 0
    softcap: float = 0.0
    causal: bool = True
    window_right: int | None = None
    blocks: int | None = None  # None: keel's default for the chip
    backward_blocks: tuple[int, int] | None = None
    fits_16mib: bool = True  # False: expected not to fit 16 MiB of VMEM (v4), where that failure is the result


CASES = [
    Case(8192, 16, 8, 128),  # the benchmark's shape: GQA, documents
    Case(8192, 16, 8, 128, window=1024, softcap=50.0),  # Gemma-style local layer
    Case(8192, 8, 4, 256),  # Gemma-3 head dim
    Case(2048, 8, 1, 64, documents=False),  # MQA, small head dim
    Case(2000, 4, 2, 80),  # padded L, head dim not a lane multiple
    Case(2048, 4, 2, 192),
    Case(2048, 4, 2, 128, dtype="float32", softcap=30.0),  # float32 at HIGHEST precision
    Case(2048, 4, 2, 256, dtype="float32"),  # the largest tiles in VMEM
    Case(32768, 8, 4, 128, window=4096),  # long sequence, window
    Case(2048, 4, 4, 128, documents=False, causal=False, window_right=128, window=128),  # bidirectional local
    Case(8192, 8, 4, 128, blocks=1024, fits_16mib=False),
    Case(8192, 8, 4, 128, blocks=256, backward_blocks=(256, 512)),
]


def with_chip_vmem(chip: str) -> None:
    """keel sizes blocks and its VMEM limit from the local TPU; deviceless there is none, so tell it the chip's."""
    info = pltpu.get_tpu_info_for_chip(getattr(pltpu.ChipVersion, CHIPS[chip][1]), 1)
    flash_tpu._vmem_capacity = lambda: int(info.vmem_capacity_bytes)  # noqa: SLF001


def compile_case(case: Case, device_sharding: NamedSharding) -> dict:
    def sds(shape: tuple[int, ...], dtype: jnp.dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=device_sharding)

    dt = jnp.dtype(case.dtype)
    q, kv = sds((1, case.L, case.H, case.D), dt), sds((1, case.L, case.K, case.D), dt)
    seg = sds((1, case.L), jnp.int32) if case.documents else None
    kw = {} if case.blocks is None else {"block_q": case.blocks, "block_k": case.blocks}

    def fwd_bwd(q, k, v, seg, window, do):  # noqa: ANN001, ANN202
        o, vjp = jax.vjp(lambda q, k, v: flash.flash_attention(
            q, k, v, seg, window, case.softcap, causal=case.causal, window_right=case.window_right,
            backward_blocks=case.backward_blocks, backend="mosaic", interpret=False, **kw), q, k, v)
        return o, vjp(do)

    t = time.perf_counter()
    jax.jit(fwd_bwd).trace(q, kv, kv, seg, sds((), jnp.int32), q).lower().compile()
    return {"compile_s": round(time.perf_counter() - t, 2),
            "default_block": flash_tpu.default_block(case.D, dt) if case.blocks is None else case.blocks,
            "vmem_limit_mib": flash_tpu._vmem_limit() // 2**20}  # noqa: SLF001


def compile_model(devices: list) -> dict:
    """The tiny config's forward+backward, `model.attention=pallas`, on a data 2 x tensor 2 mesh of the chip."""
    from keel.config import ModelConfig
    from keel.model import transformer as T
    from keel.parallel.sharding import Sharder

    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=128, mlp_dim=512,
                      sliding_window=256, global_every=2, attn_logit_softcap=30.0, compute_dtype="bfloat16",
                      attention="pallas")
    mesh = Mesh(np.array(devices[:4]).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
    sharder = Sharder(mesh)
    params = jax.eval_shape(lambda: T.init_params(cfg, jax.random.key(0)))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())), params)
    batch = jax.ShapeDtypeStruct((4, 1024), jnp.int32, sharding=NamedSharding(mesh, P("data")))

    def loss(p, tokens, segments, positions):  # noqa: ANN001, ANN202
        logits = T.forward(p, tokens, segments, positions, cfg, sharder)
        return jnp.mean(logits.astype(jnp.float32) ** 2)

    t = time.perf_counter()
    text = jax.jit(jax.grad(loss)).trace(params, batch, batch, batch).lower().compile().as_text()
    return {"compile_s": round(time.perf_counter() - t, 2), "mosaic_calls": text.count("tpu_custom_call")}


def plan_check(topology_name: str, preset: str, overrides: list[str]) -> dict:
    """`keel plan --check` for a TPU topology: keel's train step compiled deviceless, its memory, FLOPs and
    collective bytes beside the planner's (`keel.plan.check.compare`)."""
    from keel.config import load_config
    from keel.plan.check import compare

    devices = list(topologies.get_topology_desc(topology_name=topology_name, platform="tpu").devices)
    t = time.perf_counter()
    result = compare(load_config(preset, overrides), devices)
    print(result.table())
    return {"topology": topology_name, "preset": preset, "overrides": overrides,
            "compile_s": round(time.perf_counter() - t, 1), **result.to_json()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chips", nargs="+", default=list(CHIPS), choices=list(CHIPS))
    ap.add_argument("--out", default="tpu_compile_out")
    ap.add_argument("--plan", nargs="+", metavar="ARG", help="TOPOLOGY PRESET [OVERRIDES...]: planner vs XLA:TPU")
    args = ap.parse_args()
    if args.plan:
        print(json.dumps(plan_check(args.plan[0], args.plan[1], args.plan[2:])))
        return
    # Pallas picks the kernels' backend from the default platform, which is the CPU here.
    flash.flash_attention = functools.partial(flash.flash_attention, backend="mosaic", interpret=False)
    rows = []
    for chip in args.chips:
        topology = topologies.get_topology_desc(topology_name=CHIPS[chip][0], platform="tpu")
        with_chip_vmem(chip)
        one = NamedSharding(Mesh(np.array(topology.devices[:1]), ("x",)), P())
        for case in CASES:
            row = {"chip": chip, **dataclasses.asdict(case)}
            try:
                row |= {"ok": True, **compile_case(case, one)}
            except Exception as e:  # noqa: BLE001 (a failure is the result)
                small = flash_tpu._vmem_capacity() < 32 * 2**20  # noqa: SLF001
                expected = not case.fits_16mib and small and "vmem" in str(e)
                error = f"{type(e).__name__}: {e}"[:1500]
                row |= {"ok": expected, "error": ("expected: " if expected else "") + error}
            done = f"{row['compile_s']} s, blocks {row['default_block']}" if "compile_s" in row else row["error"][:300]
            print(f"{chip:4s} {'ok  ' if row['ok'] else 'FAIL'} {case} {done}", flush=True)
            rows.append(row)
        row = {"chip": chip, "case": "model (data 2 x tensor 2, attention=pallas)"}
        try:
            row |= {"ok": True, **compile_model(list(topology.devices))}
        except Exception as e:  # noqa: BLE001
            row |= {"ok": False, "error": f"{type(e).__name__}: {e}"[:1500]}
            traceback.print_exc()
        print(f"{chip:4s} {'ok  ' if row['ok'] else 'FAIL'} {row['case']} "
              + (f"{row['compile_s']} s, {row['mosaic_calls']} Mosaic calls" if row["ok"] else row["error"][:300]),
              flush=True)
        rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"jax": jax.__version__, "libtpu": _libtpu_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                        time.gmtime())}
    (out / "tpu_compile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    ok = sum(r["ok"] for r in rows)
    lines = [f"# keel Mosaic kernels, deviceless compile ({meta['date']}, jax {meta['jax']}, libtpu {meta['libtpu']})",
             "", f"{ok} of {len(rows)} compiled.", "", "| chip | case | result |", "|---|---|---|"]
    for r in rows:
        name = r.get("case") or ", ".join(f"{k}={r[k]}" for k in ("L", "H", "K", "D", "dtype", "documents", "window",
                                                                 "softcap", "causal", "window_right", "blocks",
                                                                 "backward_blocks"))
        result = (f"ok, {r['compile_s']} s" + (f", blocks {r['default_block']}" if "default_block" in r else "")
                  if "compile_s" in r else ("" if r["ok"] else "FAIL: ")
                  + r["error"][:200].replace("|", "/").replace("\n", " "))
        lines.append(f"| {r['chip']} | {name} | {result} |")
    (out / "tpu_compile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if ok == len(rows) else 1)


def _libtpu_version() -> str:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    main()
