"""The flash attention kernels of `flash.py` for TPUs: the same masks, block skipping and numerics, laid out for
Pallas' Mosaic TPU lowering. Entry point: `flash.flash_attention(..., backend="mosaic")` (the default on a TPU).

What differs from the Triton version, and why:
- Layout (B, H, L, D): Mosaic tiles the last two dims of every block in (8, 128) units (or takes them whole),
  so a head's (block, D) tile must be the trailing pair; `flash_attention` transposes q, k, v around the call.
- The key loop is a grid axis, not a `fori_loop` over a whole-sequence K/V in VMEM: grid (B, H, L/bq, L/bk) with
  the last axis "arbitrary" (sequential), running statistics and the accumulator in VMEM scratch, initialised
  at the first key block and written out at the last. Only one (bk, D) K/V tile is resident, so the sequence
  length is not bounded by VMEM, and Pallas' pipeline fetches the next tile while this one computes.
- Block skipping: the window scalar and the per-block segment-id ranges are scalar-prefetched into SMEM. A key
  block outside the causal/window range is not computed (`pl.when`) and not fetched: its index map repeats the
  nearest block in range, which the pipeline already holds. A block whose segment-id range cannot meet the
  query block's is not computed (its tile is still fetched: the ranges are known per block, not per pair).
- Row statistics (running max, sum, lse, delta) and query-side segment ids are lane-replicated (rows x 128),
  key-side segment ids and the backward's per-query rows sublane-replicated (8 x columns): the shapes Mosaic
  broadcasts without relayouts, so no (n,) <-> (n, 1) transposes happen in a kernel.
- dK/dV: grid (B, K, L/bk, group, L/bq) computes transposed tiles (keys x queries), so every matmul is a plain
  or a B-transposed one, and sums the GQA group inside the kernel (its axis is sequential): no per-query-head
  float32 partials, unlike the Triton version.
- Blocks are multiples of 128 (the lane width); head dims are taken whole (not padded).

On CPU the kernels run in Pallas interpret mode (`INTERPRETER`; the kernel tests use Pallas' TPU interpreter,
whose fresh VMEM holds NaN, so a read before a write shows). `jax.jit(...).trace(...).lower(lowering_platforms=
("tpu",))` lowers them to Mosaic without a TPU (tests/test_flash_tpu.py); benchmarks/tpu_compile.py compiles
them for v4-v6e through libtpu without a TPU (Mosaic's compiler and VMEM allocation, not a run).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from keel.kernels.flash import (
    MASKED,
    FlashConfig,
    _allowed,
    _dot_nn,
    _dot_nt,
    _key_block_range,
    _probs_and_dscores,
    _query_block_range,
    _scores,
    _segments_meet,
    _tile_is_full,
    differentiable,
)

LANES, SUBLANES = 128, 8
MIN_BLOCK = LANES  # blocks tile the lane dimension of the score matrix and of the replicated rows
# Off a TPU: "generic" runs the kernels through Pallas' HLO interpreter; "tpu" through its TPU interpreter, which
# simulates VMEM and fills fresh buffers with NaN (a read before a write shows). The TPU interpreter joins the
# devices of a shard_map at a barrier, which XLA:CPU's fake devices can deadlock on, so it is the kernel tests'
# choice (tests/test_flash_tpu.py), not the default.
INTERPRETER = "generic"

# ------------------------------------------------------------------------------------------------- plumbing


@dataclasses.dataclass(frozen=True)
class _Segments:
    """Segment ids in the two replicated layouts (the per-block id ranges are `_ranges`)."""

    lanes_BLN: jax.Array  # (B, L, 128): row l holds id l in every lane
    rows_BSL: jax.Array  # (B, 8, L): every sublane holds the ids

    @staticmethod
    def of(seg_BL: jax.Array) -> _Segments:
        B, L = seg_BL.shape
        return _Segments(lax.broadcast_in_dim(seg_BL, (B, L, LANES), (0, 1)),
                         lax.broadcast_in_dim(seg_BL, (B, SUBLANES, L), (0, 2)))


def _ranges(seg_BL: jax.Array | None, block: int) -> list[jax.Array]:
    """[min, max] of the segment ids of each block, flattened to (B * L/block,) for SMEM; [] without segments."""
    if seg_BL is None:
        return []
    B, L = seg_BL.shape
    blocks = seg_BL.reshape(B, L // block, block)
    return [blocks.min(axis=2).reshape(-1), blocks.max(axis=2).reshape(-1)]


def default_block(head_dim: int, dtype: jnp.dtype) -> int:
    """block_q = block_k when not given: 512 for 16-bit inputs with head dims up to 128, else 256, halved on
    chips with 16 MiB of VMEM (v2-v4). A (512, 512) float32 tile is 1 MiB and the backward keeps about six
    alive besides its double-buffered inputs; these sizes are a starting point for tuning
    (benchmarks/attention.py), not measured yet."""
    block = 512 if jnp.dtype(dtype).itemsize <= 2 and head_dim <= 128 else 256
    capacity = _vmem_capacity()
    return block // 2 if capacity is not None and capacity < 32 * 2**20 else block


def _vmem_capacity() -> int | None:
    """VMEM bytes per TensorCore of this process's TPU, None off a TPU (or where Pallas does not know the chip)."""
    if jax.default_backend() != "tpu":
        return None
    try:
        return int(pltpu.get_tpu_info().vmem_capacity_bytes)
    except (AttributeError, ValueError):
        return None


def _vmem_limit() -> int | None:
    """Three quarters of VMEM for a kernel's scoped allocations (Mosaic's default limit is lower than the large
    tiles need), leaving the rest to the compiler; None keeps Mosaic's default."""
    capacity = _vmem_capacity()
    return None if capacity is None else capacity * 3 // 4


def _clamp(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """x moved into [lo, hi) (hi > lo is not required: an empty range gives lo). For index maps: a grid step
    outside the range re-reads the nearest block in it, which the pipeline already holds (no DMA)."""
    return jnp.minimum(jnp.maximum(x, lo), jnp.maximum(hi - 1, lo))


def _widen(rows_QN: jax.Array, width: int) -> jax.Array:
    """A lane-replicated (rows, 128) array as (rows, width)."""
    return jnp.tile(rows_QN, (1, pl.cdiv(width, LANES)))[:, :width]


def _row_sum(x_QK: jax.Array) -> jax.Array:
    """Row sums, lane-replicated: (rows, 128)."""
    return lax.broadcast_in_dim(jnp.sum(x_QK, axis=1), (x_QK.shape[0], LANES), (0,))


def _row_max(x_QK: jax.Array) -> jax.Array:
    return lax.broadcast_in_dim(jnp.max(x_QK, axis=1), (x_QK.shape[0], LANES), (0,))


def _segment_bounds(ranges: tuple, a: jax.Array, b: jax.Array) -> tuple[jax.Array, ...] | None:
    """(min, max) of block a from the first pair of SMEM range tables and of block b from the second (None
    without segments): the arguments of `flash._tile_is_full`, and of the overlap test (both symmetric)."""
    if not ranges:
        return None
    a_min, a_max, b_min, b_max = ranges
    return a_min[a], a_max[a], b_min[b], b_max[b]


def _unpack(refs: tuple, cfg: FlashConfig, n_in: int) -> tuple[tuple, tuple, tuple, tuple]:
    """A kernel's refs after the window: (the SMEM range tables, the `n_in` data inputs, the two segment-id
    refs or Nones, the outputs and scratch), as `_call` orders them (tables and segment ids only with
    segments)."""
    n_ranges = 4 if cfg.has_segments else 0
    ranges, refs = refs[:n_ranges], refs[n_ranges:]
    inputs, refs = refs[:n_in], refs[n_in:]
    return (ranges, inputs, *((refs[:2], refs[2:]) if cfg.has_segments else ((None, None), refs)))


def _masked_and_full(visible: jax.Array | bool, full: jax.Array, step: Callable[[bool], None]) -> None:
    """Run step(True) on a visible tile that needs the element-wise mask, step(False) on a full one."""
    pl.when(visible & jnp.logical_not(full))(functools.partial(step, True))
    pl.when(visible & full)(functools.partial(step, False))


def _call(kernel: Callable, cfg: FlashConfig, *, grid: tuple[int, ...], prefetch: list[jax.Array],
          in_specs: list[pl.BlockSpec], out_specs: list[pl.BlockSpec], out_shape: list[jax.ShapeDtypeStruct],
          scratch: list, semantics: tuple[str, ...], name: str) -> Callable:
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(prefetch), grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics,
                                             vmem_limit_bytes=None if cfg.interpret else _vmem_limit()),
        interpret=(pltpu.InterpretParams() if INTERPRETER == "tpu" else True) if cfg.interpret else False,
        name=name,
    )


def _positions(i: jax.Array, j: jax.Array, shape: tuple[int, int], row_block: int, col_block: int,
               transposed: bool) -> jax.Array:
    """l - m over a tile whose rows are block i of `row_block` and columns block j of `col_block` (queries x
    keys), or, transposed, rows are keys and columns queries."""
    rows = i * row_block + lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = j * col_block + lax.broadcasted_iota(jnp.int32, shape, 1)
    return cols - rows if transposed else rows - cols


def _query_major_specs(cfg: FlashConfig, L: int, D: int) -> dict[str, pl.BlockSpec]:
    """BlockSpecs over grid (b, h, i, j) (query block i, key block j) with the window and the block ranges
    prefetched: key-side blocks clamped into the key range of query block i."""
    bq, bk = cfg.block_q, cfg.block_k

    def key_block(i: jax.Array, j: jax.Array, window_ref) -> jax.Array:  # noqa: ANN001
        return _clamp(j, *_key_block_range(i, window_ref[0], L // bk, cfg))

    return {
        "q": pl.BlockSpec((None, None, bq, D), lambda b, h, i, j, w, *r: (b, h, i, 0)),
        "kv": pl.BlockSpec((None, None, bk, D),
                           lambda b, h, i, j, w, *r: (b, lax.div(h, cfg.group), key_block(i, j, w), 0)),
        "rows": pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, w, *r: (b, h, i, 0)),
        "q_seg": pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, w, *r: (b, i, 0)),
        "k_seg": pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j, w, *r: (b, 0, key_block(i, j, w))),
    }


# ---------------------------------------------------------------------------------------------------- forward


def _forward_kernel(window_ref, *refs, cfg: FlashConfig) -> None:  # noqa: ANN001
    """Grid (b, h, i, j): query block i against key block j, online softmax across j."""
    ranges, (q_ref, k_ref, v_ref), (q_seg_ref, k_seg_ref), (o_ref, lse_ref, m_ref, l_ref, acc_ref) = _unpack(
        refs, cfg, 3)
    bq, bk = cfg.block_q, cfg.block_k
    b, i, j, num_q, num_k = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.num_programs(2), pl.num_programs(3)
    window = window_ref[0]

    @pl.when(j == 0)
    def _init() -> None:
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    lo, hi = _key_block_range(i, window, num_k, cfg)
    a, c = b * num_q + i, b * num_k + j

    def step(masked: bool) -> None:
        v_KD = v_ref[...]
        s_QK, _ = _scores(q_ref[...], k_ref[...], cfg)
        if masked:  # masked logits are finite: exp(MASKED - m) = 0 once the row has seen a visible key
            same_QK = None if q_seg_ref is None else _widen(q_seg_ref[...], bk) == k_seg_ref[:1, :]
            allowed_QK = _allowed(_positions(i, j, s_QK.shape, bq, bk, False), same_QK, window, cfg)
            s_QK = jnp.where(allowed_QK, s_QK, MASKED)
        m_QN = m_ref[...]
        m_new_QN = jnp.maximum(m_QN, _row_max(s_QK))
        p_QK = jnp.exp(s_QK - _widen(m_new_QN, bk))
        correction_QN = jnp.exp(m_QN - m_new_QN)
        m_ref[...] = m_new_QN
        l_ref[...] = l_ref[...] * correction_QN + _row_sum(p_QK)
        acc_ref[...] = (acc_ref[...] * _widen(correction_QN, acc_ref.shape[1])
                        + _dot_nn(p_QK.astype(v_KD.dtype), v_KD, cfg))

    bounds = _segment_bounds(ranges, a, c)
    _masked_and_full((lo <= j) & (j < hi) & _segments_meet(bounds), _tile_is_full(i * bq, j * bk, window, cfg, bounds),
                     step)

    @pl.when(j == num_k - 1)
    def _finish() -> None:
        l_QN = l_ref[...]
        visible_QN = l_QN > 0  # False only for a query that sees no key at all: output 0, lse MASKED
        l_QN = jnp.where(visible_QN, l_QN, 1.0)
        o_ref[...] = (acc_ref[...] / _widen(l_QN, acc_ref.shape[1])).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(visible_QN, m_ref[...] + jnp.log(l_QN), MASKED)


def _forward(cfg: FlashConfig, q_BHLD: jax.Array, k_BKLD: jax.Array, v_BKLD: jax.Array, seg_BL: jax.Array | None,
             window_1: jax.Array) -> tuple[jax.Array, jax.Array]:
    B, H, L, D = q_BHLD.shape
    specs = _query_major_specs(cfg, L, D)
    in_specs, args = [specs["q"], specs["kv"], specs["kv"]], [q_BHLD, k_BKLD, v_BKLD]
    if seg_BL is not None:
        seg = _Segments.of(seg_BL)
        in_specs += [specs["q_seg"], specs["k_seg"]]
        args += [seg.lanes_BLN, seg.rows_BSL]
    prefetch = [window_1, *_ranges(seg_BL, cfg.block_q), *_ranges(seg_BL, cfg.block_k)]
    o_BHLD, lse_BHLN = _call(
        _forward_kernel, cfg, grid=(B, H, L // cfg.block_q, L // cfg.block_k), prefetch=prefetch,
        in_specs=in_specs, out_specs=[specs["q"], specs["rows"]],
        out_shape=[jax.ShapeDtypeStruct(q_BHLD.shape, q_BHLD.dtype),
                   jax.ShapeDtypeStruct((B, H, L, LANES), jnp.float32)],
        scratch=[pltpu.VMEM((cfg.block_q, LANES), jnp.float32), pltpu.VMEM((cfg.block_q, LANES), jnp.float32),
                 pltpu.VMEM((cfg.block_q, D), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary"), name="keel_flash_forward_tpu",
    )(*prefetch, *args)
    return o_BHLD, lse_BHLN[..., 0]


# --------------------------------------------------------------------------------------------------- backward


def _dq_kernel(window_ref, *refs, cfg: FlashConfig) -> None:  # noqa: ANN001
    """Grid (b, h, i, j): dq of query block i, accumulated over key blocks j."""
    ranges, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (q_seg_ref, k_seg_ref), (dq_ref, acc_ref) = _unpack(
        refs, cfg, 6)
    bq, bk = cfg.block_q, cfg.block_k
    b, i, j, num_q, num_k = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.num_programs(2), pl.num_programs(3)
    window = window_ref[0]

    @pl.when(j == 0)
    def _init() -> None:
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    lo, hi = _key_block_range(i, window, num_k, cfg)
    a, c = b * num_q + i, b * num_k + j

    def step(masked: bool) -> None:
        q_QD, k_KD = q_ref[...], k_ref[...]
        s_QK, tanh_QK = _scores(q_QD, k_KD, cfg)
        allowed_QK = None
        if masked:
            same_QK = None if q_seg_ref is None else _widen(q_seg_ref[...], bk) == k_seg_ref[:1, :]
            allowed_QK = _allowed(_positions(i, j, s_QK.shape, bq, bk, False), same_QK, window, cfg)
        _, ds_QK = _probs_and_dscores(s_QK, tanh_QK, _dot_nt(do_ref[...], v_ref[...], cfg),
                                      _widen(lse_ref[...], bk), _widen(delta_ref[...], bk), allowed_QK, cfg)
        acc_ref[...] += _dot_nn(ds_QK.astype(k_KD.dtype), k_KD, cfg)

    bounds = _segment_bounds(ranges, a, c)
    _masked_and_full((lo <= j) & (j < hi) & _segments_meet(bounds), _tile_is_full(i * bq, j * bk, window, cfg, bounds),
                     step)

    @pl.when(j == num_k - 1)
    def _finish() -> None:
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkdv_kernel(window_ref, *refs, cfg: FlashConfig) -> None:  # noqa: ANN001
    """Grid (b, kv head, j, g, i): dk, dv of key block j, accumulated over the group's query heads g and the
    query blocks i, on transposed (keys x queries) tiles."""
    ranges, (k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref), (k_seg_ref, q_seg_ref), outputs = _unpack(refs, cfg, 6)
    dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = outputs
    bq, bk = cfg.block_q, cfg.block_k
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    num_k, num_q = pl.num_programs(2), pl.num_programs(4)
    window = window_ref[0]

    @pl.when((g == 0) & (i == 0))
    def _init() -> None:
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    lo, hi = _query_block_range(j, window, num_q, cfg)
    c, a = b * num_k + j, b * num_q + i

    def step(masked: bool) -> None:
        q_QD, do_QD, v_KD = q_ref[...], do_ref[...], v_ref[...]
        s_KQ, tanh_KQ = _scores(k_ref[...], q_QD, cfg)  # q.k is symmetric in q and k: the transposed tile
        allowed_KQ = None
        if masked:
            same_KQ = None if k_seg_ref is None else _widen(k_seg_ref[...], bq) == q_seg_ref[:1, :]
            allowed_KQ = _allowed(_positions(j, i, s_KQ.shape, bk, bq, True), same_KQ, window, cfg)
        p_KQ, ds_KQ = _probs_and_dscores(s_KQ, tanh_KQ, _dot_nt(v_KD, do_QD, cfg), lse_ref[:1, :],
                                         delta_ref[:1, :], allowed_KQ, cfg)
        dv_acc_ref[...] += _dot_nn(p_KQ.astype(do_QD.dtype), do_QD, cfg)
        dk_acc_ref[...] += _dot_nn(ds_KQ.astype(q_QD.dtype), q_QD, cfg)

    bounds = _segment_bounds(ranges, c, a)
    _masked_and_full((lo <= i) & (i < hi) & _segments_meet(bounds), _tile_is_full(i * bq, j * bk, window, cfg, bounds),
                     step)

    @pl.when((g == cfg.group - 1) & (i == num_q - 1))
    def _finish() -> None:
        dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _backward(cfg: FlashConfig, residuals: tuple[jax.Array | None, ...],
              do_BHLD: jax.Array) -> tuple[jax.Array | None, ...]:
    q_BHLD, k_BKLD, v_BKLD, seg_BL, window_1, o_BHLD, lse_BHL = residuals
    cfg = cfg.backward_config()
    B, H, L, D = q_BHLD.shape
    K = k_BKLD.shape[1]
    bq, bk, group = cfg.block_q, cfg.block_k, cfg.group
    num_q, num_k = L // bq, L // bk
    delta_BHL = jnp.einsum("bhld,bhld->bhl", o_BHLD.astype(jnp.float32), do_BHLD.astype(jnp.float32))
    seg = None if seg_BL is None else _Segments.of(seg_BL)
    q_ranges, k_ranges = _ranges(seg_BL, bq), _ranges(seg_BL, bk)

    specs = _query_major_specs(cfg, L, D)
    lanes = functools.partial(lax.broadcast_in_dim, shape=(B, H, L, LANES), broadcast_dimensions=(0, 1, 2))
    in_specs = [specs["q"], specs["kv"], specs["kv"], specs["q"], specs["rows"], specs["rows"]]
    args = [q_BHLD, k_BKLD, v_BKLD, do_BHLD, lanes(lse_BHL), lanes(delta_BHL)]
    if seg is not None:
        in_specs += [specs["q_seg"], specs["k_seg"]]
        args += [seg.lanes_BLN, seg.rows_BSL]
    prefetch = [window_1, *q_ranges, *k_ranges]
    dq_BHLD = _call(
        _dq_kernel, cfg, grid=(B, H, num_q, num_k), prefetch=prefetch, in_specs=in_specs, out_specs=[specs["q"]],
        out_shape=[jax.ShapeDtypeStruct(q_BHLD.shape, q_BHLD.dtype)], scratch=[pltpu.VMEM((bq, D), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary"), name="keel_flash_dq_tpu",
    )(*prefetch, *args)[0]

    def query_block(j: jax.Array, i: jax.Array, window_ref) -> jax.Array:  # noqa: ANN001
        return _clamp(i, *_query_block_range(j, window_ref[0], num_q, cfg))

    def q_index(b, kh, j, g, i, w, *r):  # noqa: ANN001, ANN202
        return (b, kh * group + g, query_block(j, i, w), 0)

    def row_index(b, kh, j, g, i, w, *r):  # noqa: ANN001, ANN202
        return (b, kh * group + g, 0, query_block(j, i, w))

    k_spec = pl.BlockSpec((None, None, bk, D), lambda b, kh, j, g, i, w, *r: (b, kh, j, 0))
    q_spec = pl.BlockSpec((None, None, bq, D), q_index)
    row_spec = pl.BlockSpec((None, None, SUBLANES, bq), row_index)
    rows = functools.partial(lax.broadcast_in_dim, shape=(B, H, SUBLANES, L), broadcast_dimensions=(0, 1, 3))
    in_specs = [k_spec, k_spec, q_spec, q_spec, row_spec, row_spec]
    args = [k_BKLD, v_BKLD, q_BHLD, do_BHLD, rows(lse_BHL), rows(delta_BHL)]
    if seg is not None:
        in_specs += [pl.BlockSpec((None, bk, LANES), lambda b, kh, j, g, i, w, *r: (b, j, 0)),
                     pl.BlockSpec((None, SUBLANES, bq), lambda b, kh, j, g, i, w, *r: (b, 0, query_block(j, i, w)))]
        args += [seg.lanes_BLN, seg.rows_BSL]
    prefetch = [window_1, *k_ranges, *q_ranges]
    dk_BKLD, dv_BKLD = _call(
        _dkdv_kernel, cfg, grid=(B, K, num_k, group, num_q), prefetch=prefetch, in_specs=in_specs,
        out_specs=[k_spec, k_spec], out_shape=[jax.ShapeDtypeStruct(k_BKLD.shape, k_BKLD.dtype)] * 2,
        scratch=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary"), name="keel_flash_dkdv_tpu",
    )(*prefetch, *args)
    return dq_BHLD, dk_BKLD, dv_BKLD, None, None


flash_bhld = differentiable(_forward, _backward)
"""flash_bhld(cfg, q_BHLD, k_BKLD, v_BKLD, seg_BL, window_1): the kernels on (B, heads, L, D) operands already
padded to the blocks (see flash.flash_attention)."""

__all__ = ["LANES", "MIN_BLOCK", "default_block", "flash_bhld"]
