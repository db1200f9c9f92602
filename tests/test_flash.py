"""The Pallas flash attention kernel (interpret mode on CPU) against the float32 pure-JAX reference: the output
and all three gradients, over random shapes, documents, windows, softcaps, GQA ratios and dtypes.

Interpret mode compiles slowly and runs fast, so each static configuration ("program") is compiled once and fed
several random draws: windows and segment ids are traced arguments of the kernel, as in the model's layer scan.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keel.kernels import flash
from keel.kernels.flash import flash_attention
from keel.kernels.reference import attention

# max |kernel - reference| <= TOL * max(1, max |reference|), per dtype; the reference always runs in float32 on
# the same (rounded) inputs. bfloat16 rounds the probabilities and dS before the matmuls (as every flash kernel
# does), which is what its tolerance is for.
TOL = {"float32": {"o": 2e-5, "grad": 1e-4}, "bfloat16": {"o": 1e-2, "grad": 2e-2}}


@dataclasses.dataclass(frozen=True)
class Program:
    """The static part of one kernel instance; everything else is drawn per case."""

    B: int
    L: int
    H: int
    K: int
    D: int
    dtype: str = "float32"
    softcap: float = 0.0
    scale: float | None = None
    causal: bool = True
    window_right: int | None = None
    segments: bool = True
    block_q: int = 16
    block_k: int = 16
    backward_blocks: tuple[int, int] | None = None
    backend: str = "triton"


def dense_attention(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array, seg_BL: jax.Array | None,
                    window: jax.Array, p: Program) -> jax.Array:
    """The oracle: reference.attention when it covers the program (causal, no right window); else the same
    math with the mask written out (checked against the reference in the causal case below)."""
    B, L, H, D = q_BLHD.shape
    seg_BL = jnp.zeros((B, L), jnp.int32) if seg_BL is None else seg_BL
    if p.causal and p.window_right is None:
        return attention(q_BLHD, k_BLKD, v_BLKD, seg_BL, window, p.softcap, p.scale)
    return _explicit_mask_attention(q_BLHD, k_BLKD, v_BLKD, seg_BL, window, p)


def _explicit_mask_attention(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array, seg_BL: jax.Array,
                             window: jax.Array, p: Program) -> jax.Array:
    B, L, H, D = q_BLHD.shape
    k_BLHD = jnp.repeat(k_BLKD, H // k_BLKD.shape[2], axis=2)
    v_BLHD = jnp.repeat(v_BLKD, H // v_BLKD.shape[2], axis=2)
    s_BHLM = jnp.einsum("blhd,bmhd->bhlm", q_BLHD, k_BLHD) * (D**-0.5 if p.scale is None else p.scale)
    if p.softcap > 0:
        s_BHLM = p.softcap * jnp.tanh(s_BHLM / p.softcap)
    diff_LM = jnp.arange(L)[:, None] - jnp.arange(L)[None, :]
    allowed_LM = (window <= 0) | (diff_LM < window)
    if p.causal:
        allowed_LM &= diff_LM >= 0
    if p.window_right is not None:
        allowed_LM &= -diff_LM <= p.window_right
    allowed_BLM = allowed_LM[None] & (seg_BL[:, :, None] == seg_BL[:, None, :])
    s_BHLM = jnp.where(allowed_BLM[:, None], s_BHLM, flash.MASKED)
    return jnp.einsum("bhlm,bmhd->blhd", jax.nn.softmax(s_BHLM, axis=-1), v_BLHD)


def _segment_ids(rng: np.random.Generator, B: int, L: int) -> np.ndarray:
    """Packed documents as keel.data makes them (1 + number of starts so far), sometimes with trailing padding
    (id 0), sometimes unsorted ids (the block skip must stay sound for any ids)."""
    kind = rng.choice(["packed", "padded", "unsorted"], p=[0.6, 0.2, 0.2])
    if kind == "unsorted":
        return rng.integers(0, 3, (B, L)).astype(np.int32)
    starts = rng.random((B, L)) < rng.choice([0.02, 0.1, 0.3])
    starts[:, 0] = True
    seg = np.cumsum(starts, axis=1).astype(np.int32)
    if kind == "padded":
        seg[:, L - rng.integers(1, L // 2 + 1):] = 0
    return seg


def _draw(rng: np.random.Generator, p: Program) -> dict:
    q = rng.standard_normal((p.B, p.L, p.H, p.D))
    k = rng.standard_normal((p.B, p.L, p.K, p.D))
    if p.softcap:  # large logits, so the cap bends them
        q, k = 2.0 * q, 2.0 * k
    window = int(rng.choice([0, int(rng.integers(1, p.L + 1))]))
    dtype = jnp.dtype(p.dtype)
    return {
        "q": jnp.asarray(q, dtype), "k": jnp.asarray(k, dtype),
        "v": jnp.asarray(rng.standard_normal((p.B, p.L, p.K, p.D)), dtype),
        "do": jnp.asarray(rng.standard_normal((p.B, p.L, p.H, p.D)), dtype),
        "seg": jnp.asarray(_segment_ids(rng, p.B, p.L)) if p.segments else None,
        "window": jnp.int32(window),
    }


def _kernel_and_grads(p: Program):  # noqa: ANN202 (returns a jitted function)
    def run(q, k, v, seg, window, do):  # noqa: ANN001, ANN202
        o, vjp = jax.vjp(lambda q, k, v: flash_attention(
            q, k, v, seg, window, p.softcap, p.scale, causal=p.causal, window_right=p.window_right,
            block_q=p.block_q, block_k=p.block_k, backward_blocks=p.backward_blocks, interpret=True,
            backend=p.backend), q, k, v)
        return (o, *vjp(do))
    return jax.jit(run)


def _oracle_and_grads(q, k, v, seg, window, do, p: Program):  # noqa: ANN001, ANN202
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    o, vjp = jax.vjp(lambda q, k, v: dense_attention(q, k, v, seg, window, p), *f32[:3])
    return (o, *vjp(f32[3]))


def check_program(p: Program, seeds: range) -> list[dict[str, float]]:
    """Compile once, compare every draw; returns the relative errors seen (for the record)."""
    kernel = _kernel_and_grads(p)
    oracle = jax.jit(lambda q, k, v, seg, window, do: _oracle_and_grads(q, k, v, seg, window, do, p))
    tol = TOL[p.dtype]
    errors = []
    for seed in seeds:
        d = _draw(np.random.default_rng(seed), p)
        got = kernel(d["q"], d["k"], d["v"], d["seg"], d["window"], d["do"])
        want = oracle(d["q"], d["k"], d["v"], d["seg"], d["window"], d["do"])
        err = {}
        for name, g, w in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
            assert g.shape == w.shape and g.dtype == jnp.dtype(p.dtype), (name, g.shape, g.dtype)
            g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
            assert np.isfinite(g).all(), (name, p, seed)
            err[name] = float(np.abs(g - w).max() / max(1.0, np.abs(w).max()))
            limit = tol["o" if name == "o" else "grad"]
            assert err[name] <= limit, f"{name}: relative error {err[name]:.2e} > {limit} for {p}, seed {seed}"
        errors.append(err)
    return errors


# A few programs that together touch every feature; each sees several random windows and documents.
PROGRAMS = [
    Program(B=2, L=64, H=4, K=2, D=64, block_k=32, backward_blocks=(32, 16)),  # GQA, packed documents, windows
    Program(B=1, L=40, H=4, K=1, D=80, softcap=4.0, scale=0.3),  # MQA, padded L and D, softcap, custom scale
    Program(B=1, L=64, H=2, K=2, D=128, dtype="bfloat16", block_q=32),  # bf16, MHA
    Program(B=1, L=48, H=3, K=1, D=64, causal=False, window_right=5, segments=False),  # bidirectional local
]


@pytest.mark.parametrize("p", PROGRAMS, ids=lambda p: f"L{p.L}H{p.H}K{p.K}D{p.D}-{p.dtype}")
def test_kernel_matches_reference_forward_and_gradients(p: Program):
    check_program(p, range(3))


RANDOM_GRID = {  # per backend: sequence lengths, block sizes, head dims (Mosaic's blocks are >= 128)
    "triton": ([16, 33, 64, 96, 128], [16, 32, 64], [64, 96, 128, 256]),
    "mosaic": ([128, 200, 384, 512], [128, 256], [64, 128, 192, 256]),
}


def random_program(rng: np.random.Generator, backend: str = "triton") -> Program:
    """A random static configuration: shapes (L not always a multiple of the blocks), GQA/MQA, dtype, softcap,
    causal or bidirectional with a right window, documents or not, forward and backward blocks."""
    lengths, blocks, head_dims = RANDOM_GRID[backend]
    K = int(rng.choice([1, 2]))
    causal = bool(rng.random() < 0.75)
    L = int(rng.choice(lengths))
    return Program(
        B=int(rng.integers(1, 3)), L=L, H=K * int(rng.choice([1, 2, 4])), K=K, D=int(rng.choice(head_dims)),
        dtype=str(rng.choice(["float32", "bfloat16"])), softcap=float(rng.choice([0.0, 2.5, 30.0])), causal=causal,
        window_right=None if causal and rng.random() < 0.8 else int(rng.integers(0, max(20, L // 2))),
        segments=bool(rng.random() < 0.8), block_q=int(rng.choice(blocks)), block_k=int(rng.choice(blocks[:2])),
        backward_blocks=None if rng.random() < 0.5 else (int(rng.choice(blocks[:2])), int(rng.choice(blocks))),
        backend=backend,
    )


@pytest.mark.slow
@pytest.mark.parametrize("program_seed", range(4))
def test_random_programs_match_reference(program_seed: int):
    check_program(random_program(np.random.default_rng(1000 + program_seed)), range(4))


def test_explicit_mask_oracle_is_the_reference_when_causal():
    p = Program(B=2, L=24, H=4, K=2, D=8, softcap=3.0)
    d = _draw(np.random.default_rng(0), p)

    @jax.jit
    def both(window: jax.Array) -> tuple[jax.Array, jax.Array]:
        return (attention(d["q"], d["k"], d["v"], d["seg"], window, p.softcap),
                _explicit_mask_attention(d["q"], d["k"], d["v"], d["seg"], window, p))

    for window in (0, 5):
        want, got = both(jnp.int32(window))
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("seed", range(40))
def test_block_ranges_skip_only_empty_blocks_and_keep_the_boundary_ones(seed: int):
    """The loop bounds are sound (no skipped block holds a visible pair) and tight (the first and last visited
    blocks each hold one), for causal and bidirectional masks with left and right windows."""
    rng = np.random.default_rng(seed)
    bq, bk = int(rng.choice([16, 32])), int(rng.choice([16, 32]))
    L = max(bq, bk) * int(rng.integers(1, 6))
    causal = bool(rng.random() < 0.6)
    window_right = None if rng.random() < 0.4 else int(rng.integers(0, L))
    window = int(rng.choice([0, int(rng.integers(1, L + 1))]))
    cfg = flash.FlashConfig(causal=causal, window_right=window_right, softcap=0.0, scale=1.0, block_q=bq,
                            block_k=bk, group=1, has_segments=False, interpret=True, precision=None)
    diff = np.arange(L)[:, None] - np.arange(L)[None, :]
    allowed = (window <= 0) | (diff < window)
    if cfg.right is not None:
        allowed &= -diff <= cfg.right
    visible = allowed.reshape(L // bq, bq, L // bk, bk).any(axis=(1, 3))  # (query block, key block)
    for i in range(L // bq):
        lo, hi = (int(x) for x in flash._key_block_range(jnp.int32(i), jnp.int32(window), L // bk, cfg))
        assert list(np.flatnonzero(visible[i])) == list(range(lo, hi)), (i, lo, hi)
    for j in range(L // bk):
        lo, hi = (int(x) for x in flash._query_block_range(jnp.int32(j), jnp.int32(window), L // bq, cfg))
        assert list(np.flatnonzero(visible[:, j])) == list(range(lo, hi)), (j, lo, hi)


def test_rejects_bad_shapes_and_blocks():
    q = jnp.zeros((1, 16, 3, 64))
    kv = jnp.zeros((1, 16, 2, 64))
    with pytest.raises(ValueError, match="multiple"):
        flash_attention(q, kv, kv)
    with pytest.raises(ValueError, match="powers of two"):
        flash_attention(q, q, q, block_q=24)


@pytest.mark.slow  # about 15 s of CPU: two model compiles, one with three interpret-mode kernels inside the scan
def test_model_trains_with_the_kernel_to_the_reference_losses():
    """`model.attention=pallas` against `xla`: the tiny Gemma-style model on packed documents, local and global
    layers and a logit softcap, three SGD steps give the same losses."""
    from keel.config import ModelConfig
    from keel.data.pack import expand
    from keel.model import transformer as T

    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=48,
                      sliding_window=8, global_every=2, attn_logit_softcap=20.0, compute_dtype="float32")
    tokens = np.random.default_rng(0).integers(2, 97, (2, 33))
    tokens[:, [0, 11, 19]] = 1  # <bos>: three documents per row
    batch = {k: jnp.asarray(v) for k, v in expand(tokens, np.zeros(2), bos=1, pad=0).items()}

    def losses(cfg: ModelConfig) -> list[float]:
        step = jax.jit(jax.value_and_grad(lambda p: T.loss_fn(p, batch, cfg)[0]))
        params, out = T.init_params(cfg, jax.random.key(0)), []
        for _ in range(3):
            loss, grads = step(params)
            params = jax.tree.map(lambda w, g: w - 0.5 * g, params, grads)
            out.append(float(loss))
        return out

    want = losses(cfg)
    got = losses(dataclasses.replace(cfg, attention="pallas"))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert want[2] < want[0]


@pytest.mark.parametrize("case", [
    (1, 1000, 4, 1, 80, "float32", 0.0, True, None, True),  # padded L and D, MQA, documents
    (2, 256, 8, 8, 256, "bfloat16", 20.0, False, 7, False),  # D 256, softcap, bidirectional window
    (1, 192, 4, 2, 8, "bfloat16", 0.0, True, None, True),  # sequence blocks not a power of two, D 8 -> 16
])
def test_kernels_lower_to_triton_for_gpu(case: tuple):
    """Without a GPU: the forward and both backward kernels go through Pallas' Triton lowering rules for CUDA
    (scalar window load, lax.cond block skip, transposed dots), one Triton call each. Compiling the Triton IR
    to PTX and running it still needs the GPU (benchmarks/attention.py)."""
    hlo = lowered_forward_backward(case, "cuda", block_q=128, block_k=64, backward_blocks=(32, 64))
    assert hlo.count("__gpu$xla.gpu.triton") == 3


def lowered_forward_backward(case: tuple, platform: str, **kernel_args) -> str:
    """The forward and backward of the (B, L, H, K, D, dtype, softcap, causal, window_right, segments) case,
    lowered (not compiled) for `platform` without its hardware: the HLO text."""
    B, L, H, K, D, dtype, softcap, causal, window_right, segments = case
    q = jax.ShapeDtypeStruct((B, L, H, D), jnp.dtype(dtype))
    kv = jax.ShapeDtypeStruct((B, L, K, D), jnp.dtype(dtype))
    seg = jax.ShapeDtypeStruct((B, L), jnp.int32) if segments else None

    def fwd_bwd(q, k, v, seg, window, do):  # noqa: ANN001, ANN202
        o, vjp = jax.vjp(lambda q, k, v: flash_attention(
            q, k, v, seg, window, softcap, causal=causal, window_right=window_right, interpret=False,
            **kernel_args), q, k, v)
        return o, vjp(do)

    lowered = jax.jit(fwd_bwd).trace(q, kv, kv, seg, jax.ShapeDtypeStruct((), jnp.int32), q)
    return lowered.lower(lowering_platforms=(platform,)).as_text()


def test_shard_mapped_kernel_on_a_mesh_equals_the_unsharded_reference():
    """On the suite's 8 fake devices, batch over (data, fsdp) and heads over tensor, as keel's sharding rules
    place them: each shard runs the kernel on its own rows and head groups, and the result is the reference's."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    q_spec, kv_spec, seg_spec = P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp"), None, "tensor"), \
        P(("data", "fsdp"))
    attn = flash.shard_mapped(functools.partial(flash_attention, interpret=True, block_q=16, block_k=16), mesh,
                              q_spec, kv_spec, seg_spec)
    p = Program(B=4, L=32, H=4, K=2, D=64)
    d = _draw(np.random.default_rng(7), p)
    put = {name: NamedSharding(mesh, s) for name, s in (("q", q_spec), ("k", kv_spec), ("seg", seg_spec))}
    q, k, v = (jax.device_put(d[n], put["q" if n == "q" else "k"]) for n in ("q", "k", "v"))
    seg = jax.device_put(d["seg"], put["seg"])

    def loss(fn, q, k, v):  # noqa: ANN001, ANN202
        return jnp.sum(fn(q, k, v, seg, 9, 10.0) * d["do"])

    got = jax.jit(jax.value_and_grad(functools.partial(loss, attn), argnums=(0, 1, 2)))(q, k, v)
    want = jax.value_and_grad(functools.partial(loss, attention), argnums=(0, 1, 2))(d["q"], d["k"], d["v"])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="same mesh axes"):
        flash.shard_mapped(flash_attention, mesh, q_spec, P(("data", "fsdp")), seg_spec)
