"""The Mosaic TPU version of the flash kernels (keel/kernels/flash_tpu.py), without a TPU: numerics in Pallas'
TPU interpret mode against the float32 reference (the harness of test_flash.py), the blocks it computes (and
the Triton kernels' too), and the lowering of all three kernels to Mosaic for the TPU platform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keel.kernels import flash, flash_tpu
from keel.kernels.flash import FlashConfig, _key_block_range, flash_attention
from tests.test_flash import Program, check_program, lowered_forward_backward, random_program

M = "mosaic"


@pytest.fixture(autouse=True)
def tpu_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pallas' TPU interpreter: simulated VMEM whose fresh buffers hold NaN, so a kernel that reads scratch
    before writing it fails the finiteness check."""
    monkeypatch.setattr(flash_tpu, "INTERPRETER", "tpu")
PROGRAMS = [
    # GQA, packed documents, windows, backward blocks unlike the forward's, L not a multiple of the block
    Program(B=2, L=300, H=4, K=2, D=64, block_q=128, block_k=256, backward_blocks=(256, 128), backend=M),
    # MQA, head dim 80 (taken whole), softcap, custom scale, bf16
    Program(B=1, L=256, H=3, K=1, D=80, dtype="bfloat16", softcap=4.0, scale=0.3, block_q=128, block_k=128,
            backend=M),
    # bidirectional local window, no documents (in the slow suite, as the random programs below)
    Program(B=1, L=384, H=2, K=2, D=128, causal=False, window_right=70, segments=False, block_q=128,
            block_k=128, backend=M),
]


@pytest.mark.parametrize("p", [pytest.param(p, id=f"L{p.L}H{p.H}K{p.K}D{p.D}-{p.dtype}",
                                            marks=pytest.mark.slow if p is PROGRAMS[-1] else ()) for p in PROGRAMS])
def test_tpu_kernels_match_reference_forward_and_gradients(p: Program):
    check_program(p, range(2))


@pytest.mark.slow
@pytest.mark.parametrize("program_seed", range(8))
def test_random_tpu_programs_match_reference(program_seed: int):
    check_program(random_program(np.random.default_rng(2000 + program_seed), M), range(3))


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Count the calls of module.<name> as the kernels run (a debug callback: interpret mode runs it only
    where `pl.when` / `lax.cond` lets the tile run)."""
    calls: list[int] = []
    fn = getattr(module, name)

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        jax.debug.callback(lambda: calls.append(1))
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.mark.parametrize(("backend", "seed"), [(M, 0), ("triton", 0), *(pytest.param(b, n, marks=pytest.mark.slow)
                                                                  for b, n in ((M, 1), (M, 2), ("triton", 1)))])
def test_kernels_compute_exactly_the_block_pairs_their_mask_can_reach(backend: str, seed: int, monkeypatch):
    """Block skipping, for the Mosaic and the Triton kernels: the forward, dq and dk/dv kernels each compute
    the (query block, key block) pairs inside the causal/window range whose segment-id ranges meet, per head,
    and no other; of those, only the tiles that hold a masked pair build the element-wise mask (every score
    tile calls `_scores` once, every masked one `_allowed` (Mosaic) or `_mask` (Triton) once)."""
    rng = np.random.default_rng(seed)
    block = 128 if backend == M else 32
    B, L, H, K, D, bq, bk = 1, 8 * block, 2, 1, 64, block, block
    window = int(rng.choice([0, int(rng.integers(bq + bk, 0.7 * L))]))  # >= bq + bk: some tiles need no mask
    starts = np.zeros((B, L), bool)  # packed, as keel.data makes them: 1-3 documents of a few blocks per row
    for row in starts:
        row[rng.choice(np.arange(1, L), int(rng.integers(0, 3)), replace=False)] = True
    seg = np.cumsum(starts, axis=1).astype(np.int32)
    cfg = FlashConfig(causal=True, window_right=None, softcap=0.0, scale=1.0, block_q=bq, block_k=bk, group=H // K,
                      has_segments=True, interpret=True, precision=None)
    nq, nk = L // bq, L // bk
    blocks = seg.reshape(B, nq, bq)
    lo_q, hi_q = blocks.min(axis=2), blocks.max(axis=2)
    computed = np.zeros((B, nq, nk), bool)
    for i in range(nq):
        lo, hi = (int(x) for x in _key_block_range(jnp.int32(i), jnp.int32(window), nk, cfg))
        for j in range(lo, hi):
            computed[:, i, j] = (lo_q[:, i] <= hi_q[:, j]) & (lo_q[:, j] <= hi_q[:, i])
    diff = np.arange(L)[:, None] - np.arange(L)[None, :]
    allowed = (diff >= 0) & ((window <= 0) | (diff < window)) & (seg[:, :, None] == seg[:, None, :])
    tiles = allowed.reshape(B, nq, bq, nk, bk)
    assert not (tiles.any(axis=(2, 4)) & ~computed).any()  # sound: every tile with a visible pair is computed
    masked = computed & ~tiles.all(axis=(2, 4))
    module = flash_tpu if backend == M else flash
    scores = _count_calls(monkeypatch, module, "_scores")
    masks = _count_calls(monkeypatch, module, "_allowed" if backend == M else "_mask")
    x = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32)
    kv = x[:, :, :K]
    o, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, jnp.asarray(seg), window, backend=backend,
                                                     block_q=bq, block_k=bk), x, kv, kv)
    jax.block_until_ready(o)
    assert len(scores) == H * computed.sum() < B * H * nq * nk
    assert len(masks) == H * masked.sum() < len(scores)
    jax.block_until_ready(vjp(o))
    assert (len(scores), len(masks)) == (3 * H * computed.sum(), 3 * H * masked.sum())  # dq and dk/dv: the same


@pytest.mark.parametrize("case", [
    (1, 1000, 4, 1, 128, "bfloat16", 0.0, True, None, True),  # padded L, MQA, documents
    (2, 512, 8, 8, 256, "bfloat16", 20.0, False, 7, False),  # D 256, softcap, bidirectional window
    (1, 384, 4, 2, 64, "float32", 0.0, True, None, True),  # float32 at HIGHEST precision, D 64, GQA
])
def test_tpu_kernels_lower_to_mosaic(case: tuple):
    """Without a TPU: the forward and both backward kernels go through Pallas' Mosaic lowering for the TPU
    platform (scalar prefetch, clamped index maps, lane/sublane-replicated rows, `pl.when` skips), one Mosaic
    call each. Mosaic's own compilation (layouts, VMEM) needs libtpu, which the suite does not install:
    benchmarks/tpu_compile.py does it, deviceless."""
    hlo = lowered_forward_backward(case, "tpu", backend=M)
    assert hlo.count("tpu_custom_call") == 3


def test_mosaic_blocks_are_multiples_of_the_lane_width():
    q = jnp.zeros((1, 256, 2, 64))
    with pytest.raises(ValueError, match="powers of two >= 128"):
        flash_attention(q, q, q, backend=M, block_q=64)
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, q, q, backend="cuda")
