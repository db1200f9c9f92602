"""Flash attention in Pallas: forward and backward (dQ, dK, dV) behind the signature of `reference.attention`.

Features, combinable: causal; segment ids (document masking); a sliding window to the left (`window`, the same
convention as the reference: query l sees key m when l - m < window; 0 = unbounded, may be a traced scalar so a
`lax.scan` over layers can give each layer its own window) and optionally to the right (`window_right`: l sees m
when m - l <= window_right); logit softcap; GQA/MQA (H query heads share K key/value heads; the K/V BlockSpec
index map reads KV head h // (H // K), so repeated K/V is never materialised).

Layout and schedule (the FlashAttention-2 split, the same one as JAX's bundled Pallas GPU kernel):
- forward: grid (B, H, L / block_q); each program holds one query block in registers and loops over the key
  blocks that its mask can reach, keeping an online softmax (running max m, running sum l) in float32. It also
  writes lse = m + log(l) (float32, B x H x L), the only residual besides the output.
- backward, dQ: grid (B, H, L / block_q), the same key-block loop, recomputing probabilities from lse.
- backward, dK/dV: grid (B, H, L / block_k); each program holds one key block and loops over the query blocks
  that can see it. With GQA each query head writes its own float32 partial dK/dV (B x L x H x D) and the wrapper
  sums the group: the FlashAttention-2 choice, which keeps H-way parallelism for MQA.

Block skipping: the loop bounds come from causality and the window (blocks before the window or after the
diagonal are never visited), and with segment ids a block whose query and key segment-id ranges do not overlap
is skipped by a `lax.cond` (sound for any segment ids; tight for the packed, non-decreasing ids of keel.data).

Sequence lengths that are not a multiple of the block are padded with a segment of their own; head dims that are
not a power of two >= 16 are zero-padded (Triton's dots need such tiles); both are sliced off again.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import Mesh, PartitionSpec

# Finite, so that a block row with every key masked gives exp(MASKED - MASKED) = 1 rather than NaN; such
# probabilities are zeroed explicitly, and the running max recovers as soon as a visible key arrives.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
MIN_BLOCK = 16  # smallest tile a GPU tensor-core dot accepts
Carry = TypeVar("Carry")


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Everything static about one kernel instance (hashable: it is a custom_vjp non-differentiable argument)."""

    causal: bool
    window_right: int | None
    softcap: float
    scale: float
    block_q: int
    block_k: int
    group: int  # query heads per KV head
    has_segments: bool
    interpret: bool
    precision: lax.Precision | None
    num_warps: int | None = None  # Triton launch parameters (GPU only; None = Pallas' default)
    num_stages: int | None = None
    backward_blocks: tuple[int, int] | None = None  # (block_q, block_k) of the backward; None = the forward's
    backend: str = "triton"  # "triton" (GPU, and CPU interpret) or "mosaic" (TPU, flash_tpu.py)

    def backward_config(self) -> FlashConfig:
        """This configuration with the backward's block sizes."""
        if self.backward_blocks is None:
            return self
        return dataclasses.replace(self, block_q=self.backward_blocks[0], block_k=self.backward_blocks[1])

    @property
    def right(self) -> int | None:
        """Largest m - l a query may look ahead (None = unbounded)."""
        bounds = ([0] if self.causal else []) + ([self.window_right] if self.window_right is not None else [])
        return min(bounds) if bounds else None


# ---------------------------------------------------------------------------------------------- shared pieces


def _compiler_params(cfg: FlashConfig) -> pl.CompilerParams | None:
    """Triton's parameters whenever compiled: they also select the Triton lowering, as this JAX's default GPU
    lowering for a pallas_call without parameters is Mosaic GPU (`jax_pallas_use_mosaic_gpu`)."""
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _dot_nt(a_MK: jax.Array, b_NK: jax.Array, cfg: FlashConfig) -> jax.Array:
    """a @ b.T in float32."""
    return lax.dot_general(a_MK, b_NK, (((1,), (1,)), ((), ())), precision=cfg.precision,
                           preferred_element_type=jnp.float32)


def _dot_nn(a_MK: jax.Array, b_KN: jax.Array, cfg: FlashConfig) -> jax.Array:
    """a @ b in float32."""
    return lax.dot_general(a_MK, b_KN, (((1,), (0,)), ((), ())), precision=cfg.precision,
                           preferred_element_type=jnp.float32)


def _dot_tn(a_KM: jax.Array, b_KN: jax.Array, cfg: FlashConfig) -> jax.Array:
    """a.T @ b in float32."""
    return lax.dot_general(a_KM, b_KN, (((0,), (0,)), ((), ())), precision=cfg.precision,
                           preferred_element_type=jnp.float32)


def _scores(q_QD: jax.Array, k_KD: jax.Array, cfg: FlashConfig) -> tuple[jax.Array, jax.Array | None]:
    """Softcapped, scaled logits s_QK (float32) and tanh_QK (for the softcap's derivative; None without it)."""
    s_QK = _dot_nt(q_QD, k_KD, cfg) * cfg.scale
    if cfg.softcap > 0:
        tanh_QK = jnp.tanh(s_QK * (1.0 / cfg.softcap))  # a multiply per element, not a divide
        return cfg.softcap * tanh_QK, tanh_QK
    return s_QK, None


def _allowed(diff: jax.Array, same_segment: jax.Array | None, window: jax.Array, cfg: FlashConfig) -> jax.Array:
    """Which (query l, key m) pairs may attend, from diff = l - m and whether their segments are equal (None =
    no segments): the rule of reference.attention_mask, plus the optional right window. Any shape."""
    allowed = diff < jnp.where(window > 0, window, jnp.iinfo(jnp.int32).max)  # one compare per element
    if cfg.right is not None:
        allowed &= -diff <= cfg.right
    if same_segment is not None:
        allowed &= same_segment
    return allowed


def _mask(q_pos_Q: jax.Array, k_pos_K: jax.Array, q_seg_Q: jax.Array | None, k_seg_K: jax.Array | None,
          window: jax.Array, cfg: FlashConfig) -> jax.Array:
    """allowed_QK from the positions and segment ids of a query block and a key block."""
    same_QK = None if q_seg_Q is None or k_seg_K is None else q_seg_Q[:, None] == k_seg_K[None, :]
    return _allowed(q_pos_Q[:, None] - k_pos_K[None, :], same_QK, window, cfg)


def _cdiv(a: jax.Array, b: int) -> jax.Array:
    """Ceil division of a non-negative traced int (lax.div: `//` does not lower for program ids on Triton)."""
    return lax.div(a + (b - 1), b)


def _key_block_range(i: jax.Array, window: jax.Array, num_k: int, cfg: FlashConfig) -> tuple[jax.Array, jax.Array]:
    """[lo, hi): the key blocks that query block i can see (causal/right bound and left window)."""
    q_first = i * cfg.block_q
    q_last = q_first + cfg.block_q - 1
    lo = jnp.where(window > 0, lax.div(jnp.maximum(q_first - window + 1, 0), cfg.block_k), 0)
    hi = num_k if cfg.right is None else jnp.minimum(_cdiv(q_last + cfg.right + 1, cfg.block_k), num_k)
    return lo, jnp.maximum(hi, lo)


def _query_block_range(j: jax.Array, window: jax.Array, num_q: int,
                       cfg: FlashConfig) -> tuple[jax.Array, jax.Array]:
    """[lo, hi): the query blocks that can see key block j."""
    k_first = j * cfg.block_k
    k_last = k_first + cfg.block_k - 1
    lo = 0 if cfg.right is None else lax.div(jnp.maximum(k_first - cfg.right, 0), cfg.block_q)
    hi = jnp.where(window > 0, jnp.minimum(_cdiv(k_last + window, cfg.block_q), num_q), num_q)
    return jnp.asarray(lo, jnp.int32), jnp.maximum(hi, lo)


def _tile_is_full(q_first: jax.Array, k_first: jax.Array, window: jax.Array, cfg: FlashConfig,
                  segments: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None) -> jax.Array:
    """Whether every (query, key) pair of the tile from query q_first and key k_first is visible, so the tile
    can skip the element-wise mask: inside the window and right bounds for all its pairs and, with segments
    (q_min, q_max, k_min, k_max), one and the same document on both sides. Most tiles of a causal mask are
    full; the diagonal, window-edge and document-boundary ones are not."""
    q_last, k_last = q_first + cfg.block_q - 1, k_first + cfg.block_k - 1
    full = (window <= 0) | (q_last - k_first < window)
    if cfg.right is not None:
        full &= k_last - q_first <= cfg.right
    if segments is not None:
        q_min, q_max, k_min, k_max = segments
        full &= (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
    return full


def _segments_meet(segments: tuple[jax.Array, ...] | None) -> jax.Array | bool:
    """Whether two blocks with segment-id ranges (a_min, a_max, b_min, b_max) can share an id (None: no
    segments, always)."""
    if segments is None:
        return True
    a_min, a_max, b_min, b_max = segments
    return (a_min <= b_max) & (b_min <= a_max)


def _visit(segments: tuple[jax.Array, ...] | None, full: jax.Array, compute: Callable[[bool, Carry], Carry],
           carry: Carry) -> Carry:
    """compute(masked, carry) on one tile: skipped when its segment ranges (q_min, q_max, k_min, k_max; None
    without segments) cannot meet, run without the element-wise mask when the tile is full."""

    def run(c: Carry) -> Carry:
        return lax.cond(full, functools.partial(compute, False), functools.partial(compute, True), c)

    if segments is None:
        return run(carry)
    return lax.cond(_segments_meet(segments), run, lambda c: c, carry)


# ---------------------------------------------------------------------------------------------------- forward


def _split_refs(refs: tuple, cfg: FlashConfig) -> tuple:
    """(query segment ids, key segment ids, the output refs) of a kernel's trailing refs: the segment-id refs
    come first when the call has them, else None."""
    return (refs[0], refs[1], refs[2:]) if cfg.has_segments else (None, None, refs)


def _block_segments(seg_ref, index=...) -> tuple:  # noqa: ANN001
    """A block's segment ids (seg_ref[index]) and their min and max (for the block-skip and full-tile tests),
    or Nones without segments."""
    if seg_ref is None:
        return None, None, None
    seg = seg_ref[index]
    return seg, jnp.min(seg), jnp.max(seg)


def _forward_kernel(window_ref, q_ref, k_ref, v_ref, *refs, cfg: FlashConfig) -> None:  # noqa: ANN001
    """One query block: q_ref (block_q, D), k_ref/v_ref (L, D) of its KV head; writes o (block_q, D), lse."""
    q_seg_ref, k_seg_ref, (o_ref, lse_ref) = _split_refs(refs, cfg)
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(2)
    window = window_ref[0]
    q_QD = q_ref[...]
    q_pos_Q = i * bq + jnp.arange(bq, dtype=jnp.int32)
    q_seg_Q, q_seg_min, q_seg_max = _block_segments(q_seg_ref)

    def body(j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
        keys = pl.ds(j * bk, bk)
        k_seg_K, k_seg_min, k_seg_max = _block_segments(k_seg_ref, keys)

        def compute(masked: bool, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
            acc_QD, m_Q, l_Q = carry
            s_QK, _ = _scores(q_QD, k_ref[keys, :], cfg)
            if masked:  # masked logits are finite: exp(MASKED - m) = 0 once the row has seen a visible key
                k_pos_K = j * bk + jnp.arange(bk, dtype=jnp.int32)
                s_QK = jnp.where(_mask(q_pos_Q, k_pos_K, q_seg_Q, k_seg_K, window, cfg), s_QK, MASKED)
            m_new_Q = jnp.maximum(m_Q, jnp.max(s_QK, axis=1))
            p_QK = jnp.exp(s_QK - m_new_Q[:, None])
            correction_Q = jnp.exp(m_Q - m_new_Q)
            v_KD = v_ref[keys, :]
            acc_QD = acc_QD * correction_Q[:, None] + _dot_nn(p_QK.astype(v_KD.dtype), v_KD, cfg)
            return acc_QD, m_new_Q, l_Q * correction_Q + jnp.sum(p_QK, axis=1)

        segments = None if q_seg_ref is None else (q_seg_min, q_seg_max, k_seg_min, k_seg_max)
        return _visit(segments, _tile_is_full(i * bq, j * bk, window, cfg, segments), compute, carry)

    lo, hi = _key_block_range(i, window, k_ref.shape[0] // bk, cfg)
    init = (jnp.zeros(q_QD.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc_QD, m_Q, l_Q = lax.fori_loop(lo, hi, body, init)
    visible_Q = l_Q > 0  # False only for a query that sees no key at all: output 0, lse MASKED
    l_Q = jnp.where(visible_Q, l_Q, 1.0)
    o_ref[...] = (acc_QD / l_Q[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(visible_Q, m_Q + jnp.log(l_Q), MASKED)


def _common_specs(cfg: FlashConfig, L: int, D: int) -> dict[str, pl.BlockSpec]:
    """BlockSpecs over grid (b, h, block): query-side blocks, the whole sequence of the KV head h // group."""
    g = cfg.group
    return {
        "window": pl.BlockSpec((1,), lambda b, h, i: (0,)),
        "q_block": pl.BlockSpec((None, cfg.block_q, None, D), lambda b, h, i: (b, i, h, 0)),
        "q_all": pl.BlockSpec((None, L, None, D), lambda b, h, j: (b, 0, h, 0)),
        "kv_all": pl.BlockSpec((None, L, None, D), lambda b, h, i: (b, 0, h // g, 0)),
        "kv_block": pl.BlockSpec((None, cfg.block_k, None, D), lambda b, h, j: (b, j, h // g, 0)),
        "kv_block_per_q_head": pl.BlockSpec((None, cfg.block_k, None, D), lambda b, h, j: (b, j, h, 0)),
        "row_q_block": pl.BlockSpec((None, None, cfg.block_q), lambda b, h, i: (b, h, i)),
        "row_all": pl.BlockSpec((None, None, L), lambda b, h, j: (b, h, 0)),
        "seg_q_block": pl.BlockSpec((None, cfg.block_q), lambda b, h, i: (b, i)),
        "seg_k_block": pl.BlockSpec((None, cfg.block_k), lambda b, h, j: (b, j)),
        "seg_all": pl.BlockSpec((None, L), lambda b, h, i: (b, 0)),
    }


def _forward(cfg: FlashConfig, q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array,
             seg_BL: jax.Array | None, window_1: jax.Array) -> tuple[jax.Array, jax.Array]:
    B, L, H, D = q_BLHD.shape
    specs = _common_specs(cfg, L, D)
    in_specs = [specs["window"], specs["q_block"], specs["kv_all"], specs["kv_all"]]
    args = [window_1, q_BLHD, k_BLKD, v_BLKD]
    if seg_BL is not None:
        in_specs += [specs["seg_q_block"], specs["seg_all"]]
        args += [seg_BL, seg_BL]
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=(B, H, L // cfg.block_q),
        in_specs=in_specs,
        out_specs=[specs["q_block"], specs["row_q_block"]],
        out_shape=[jax.ShapeDtypeStruct(q_BLHD.shape, q_BLHD.dtype), jax.ShapeDtypeStruct((B, H, L), jnp.float32)],
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
        name="keel_flash_forward",
    )(*args)


# --------------------------------------------------------------------------------------------------- backward


def _probs_and_dscores(s_QK: jax.Array, tanh_QK: jax.Array | None, dp_QK: jax.Array, lse_Q1: jax.Array,
                       delta_Q1: jax.Array, allowed_QK: jax.Array | None,
                       cfg: FlashConfig) -> tuple[jax.Array, jax.Array]:
    """p_QK = softmax probabilities, ds_QK = dLoss / d(q.k) (scale and softcap derivative folded in), from the
    logits and tanh of `_scores`, dp = dO.V^T, and lse and delta = rowsum(O * dO) broadcastable against s_QK
    (allowed_QK None: a tile whose every pair is visible). Elementwise: a kernel that works on transposed (key,
    query) tiles passes transposed operands."""
    p_QK = jnp.exp(s_QK - lse_Q1)
    if allowed_QK is not None:
        p_QK = jnp.where(allowed_QK, p_QK, 0.0)
    ds_QK = p_QK * (dp_QK - delta_Q1)
    if tanh_QK is not None:
        ds_QK = ds_QK * (1.0 - tanh_QK * tanh_QK)
    return p_QK, ds_QK * cfg.scale


def _dq_kernel(window_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: FlashConfig) -> None:  # noqa: ANN001
    """One query block: loops over the key blocks it sees, accumulating dq (block_q, D) in float32."""
    q_seg_ref, k_seg_ref, (dq_ref,) = _split_refs(refs, cfg)
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(2)
    window = window_ref[0]
    q_QD, do_QD, lse_Q, delta_Q = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_pos_Q = i * bq + jnp.arange(bq, dtype=jnp.int32)
    q_seg_Q, q_seg_min, q_seg_max = _block_segments(q_seg_ref)

    def body(j: jax.Array, dq_QD: jax.Array) -> jax.Array:
        keys = pl.ds(j * bk, bk)
        k_seg_K, k_seg_min, k_seg_max = _block_segments(k_seg_ref, keys)

        def compute(masked: bool, dq_QD: jax.Array) -> jax.Array:
            k_KD = k_ref[keys, :]
            allowed_QK = None
            if masked:
                k_pos_K = j * bk + jnp.arange(bk, dtype=jnp.int32)
                allowed_QK = _mask(q_pos_Q, k_pos_K, q_seg_Q, k_seg_K, window, cfg)
            _, ds_QK = _probs_and_dscores(*_scores(q_QD, k_KD, cfg), _dot_nt(do_QD, v_ref[keys, :], cfg),
                                          lse_Q[:, None], delta_Q[:, None], allowed_QK, cfg)
            return dq_QD + _dot_nn(ds_QK.astype(k_KD.dtype), k_KD, cfg)

        segments = None if q_seg_ref is None else (q_seg_min, q_seg_max, k_seg_min, k_seg_max)
        return _visit(segments, _tile_is_full(i * bq, j * bk, window, cfg, segments), compute, dq_QD)

    lo, hi = _key_block_range(i, window, k_ref.shape[0] // bk, cfg)
    dq_QD = lax.fori_loop(lo, hi, body, jnp.zeros(q_QD.shape, jnp.float32))
    dq_ref[...] = dq_QD.astype(dq_ref.dtype)


def _dkdv_kernel(window_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: FlashConfig) -> None:  # noqa: ANN001
    """One key block of one query head: loops over the query blocks that see it, accumulating dk, dv."""
    q_seg_ref, k_seg_ref, (dk_ref, dv_ref) = _split_refs(refs, cfg)
    bq, bk = cfg.block_q, cfg.block_k
    j = pl.program_id(2)
    window = window_ref[0]
    k_KD, v_KD = k_ref[...], v_ref[...]
    k_pos_K = j * bk + jnp.arange(bk, dtype=jnp.int32)
    k_seg_K, k_seg_min, k_seg_max = _block_segments(k_seg_ref)

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        queries = pl.ds(i * bq, bq)
        q_seg_Q, q_seg_min, q_seg_max = _block_segments(q_seg_ref, queries)

        def compute(masked: bool, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            dk_KD, dv_KD = carry
            q_QD, do_QD = q_ref[queries, :], do_ref[queries, :]
            allowed_QK = None
            if masked:
                q_pos_Q = i * bq + jnp.arange(bq, dtype=jnp.int32)
                allowed_QK = _mask(q_pos_Q, k_pos_K, q_seg_Q, k_seg_K, window, cfg)
            p_QK, ds_QK = _probs_and_dscores(*_scores(q_QD, k_KD, cfg), _dot_nt(do_QD, v_KD, cfg),
                                             lse_ref[queries][:, None], delta_ref[queries][:, None], allowed_QK, cfg)
            dv_KD = dv_KD + _dot_tn(p_QK.astype(do_QD.dtype), do_QD, cfg)
            dk_KD = dk_KD + _dot_tn(ds_QK.astype(q_QD.dtype), q_QD, cfg)
            return dk_KD, dv_KD

        segments = None if q_seg_ref is None else (q_seg_min, q_seg_max, k_seg_min, k_seg_max)
        return _visit(segments, _tile_is_full(i * bq, j * bk, window, cfg, segments), compute, carry)

    lo, hi = _query_block_range(j, window, q_ref.shape[0] // bq, cfg)
    zeros_KD = jnp.zeros(k_KD.shape, jnp.float32)
    dk_KD, dv_KD = lax.fori_loop(lo, hi, body, (zeros_KD, zeros_KD))
    dk_ref[...] = dk_KD.astype(dk_ref.dtype)
    dv_ref[...] = dv_KD.astype(dv_ref.dtype)


def _backward(cfg: FlashConfig, residuals: tuple[jax.Array | None, ...],
              do_BLHD: jax.Array) -> tuple[jax.Array | None, ...]:
    q_BLHD, k_BLKD, v_BLKD, seg_BL, window_1, o_BLHD, lse_BHL = residuals
    cfg = cfg.backward_config()
    B, L, H, D = q_BLHD.shape
    K = k_BLKD.shape[2]
    delta_BHL = jnp.einsum("blhd,blhd->bhl", o_BLHD.astype(jnp.float32), do_BLHD.astype(jnp.float32))
    specs = _common_specs(cfg, L, D)
    seg_args = [] if seg_BL is None else [seg_BL, seg_BL]

    dq_in = [specs["window"], specs["q_block"], specs["kv_all"], specs["kv_all"], specs["q_block"],
             specs["row_q_block"], specs["row_q_block"]]
    dq_BLHD = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(B, H, L // cfg.block_q),
        in_specs=dq_in + ([specs["seg_q_block"], specs["seg_all"]] if seg_args else []),
        out_specs=specs["q_block"],
        out_shape=jax.ShapeDtypeStruct(q_BLHD.shape, q_BLHD.dtype),
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
        name="keel_flash_dq",
    )(window_1, q_BLHD, k_BLKD, v_BLKD, do_BLHD, lse_BHL, delta_BHL, *seg_args)

    # Per query head; a group's partials are summed below in float32 (dtype of the input when group == 1).
    dkv_dtype = k_BLKD.dtype if cfg.group == 1 else jnp.float32
    dkdv_in = [specs["window"], specs["q_all"], specs["kv_block"], specs["kv_block"], specs["q_all"],
               specs["row_all"], specs["row_all"]]
    dk_BLHD, dv_BLHD = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid=(B, H, L // cfg.block_k),
        in_specs=dkdv_in + ([specs["seg_all"], specs["seg_k_block"]] if seg_args else []),
        out_specs=[specs["kv_block_per_q_head"], specs["kv_block_per_q_head"]],
        out_shape=[jax.ShapeDtypeStruct((B, L, H, D), dkv_dtype)] * 2,
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
        name="keel_flash_dkdv",
    )(window_1, q_BLHD, k_BLKD, v_BLKD, do_BLHD, lse_BHL, delta_BHL, *seg_args)
    dk_BLKD = dk_BLHD.reshape(B, L, K, cfg.group, D).sum(axis=3).astype(k_BLKD.dtype)
    dv_BLKD = dv_BLHD.reshape(B, L, K, cfg.group, D).sum(axis=3).astype(v_BLKD.dtype)
    return dq_BLHD, dk_BLKD, dv_BLKD, None, None


def differentiable(forward: Callable[..., tuple[jax.Array, jax.Array]], backward: Callable[..., tuple]) -> Callable:
    """f(cfg, q, k, v, segment ids, window_1) -> o with `backward` as its VJP, from forward(...) -> (o, lse):
    the residuals are the inputs, o and lse. The Triton and Mosaic kernels are wired alike."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def f(cfg: FlashConfig, q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None,
          window_1: jax.Array) -> jax.Array:
        return forward(cfg, q, k, v, seg, window_1)[0]

    def f_fwd(cfg: FlashConfig, q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None,
              window_1: jax.Array) -> tuple[jax.Array, tuple[jax.Array | None, ...]]:
        o, lse = forward(cfg, q, k, v, seg, window_1)
        return o, (q, k, v, seg, window_1, o, lse)

    f.defvjp(f_fwd, backward)
    return f


_flash = differentiable(_forward, _backward)


# ------------------------------------------------------------------------------------------------ entry point


BACKENDS = ("triton", "mosaic")
TRITON_BLOCK = 64  # block_q = block_k unless given (Mosaic: flash_tpu.default_block)


def _block(requested: int, length: int, smallest: int) -> int:
    if requested < smallest or requested & (requested - 1):
        raise ValueError(f"block sizes must be powers of two >= {smallest}, got {requested}")
    return min(requested, max(smallest, pl.next_power_of_2(length)))


def flash_attention(
    q_BLHD: jax.Array,
    k_BLKD: jax.Array,
    v_BLKD: jax.Array,
    segment_ids_BL: jax.Array | None = None,
    window: jax.Array | int = 0,
    softcap: float = 0.0,
    scale: float | None = None,
    *,
    causal: bool = True,
    window_right: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    backward_blocks: tuple[int, int] | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    backend: str | None = None,
) -> jax.Array:
    """Masked softmax attention, the semantics of `reference.attention` (which is always causal). Returns o_BLHD.

    q_BLHD attends with H heads to k_BLKD/v_BLKD with K heads (H % K == 0). `segment_ids_BL` (None = one
    document) keeps attention inside a document; `window` (int or traced int scalar, 0 = unbounded) keeps query
    l to keys m with l - m < window; `window_right` (None = unbounded, only meaningful with causal=False) keeps
    m - l <= window_right; logits are q.k times `scale` (None = D ** -0.5), then, if `softcap` > 0, capped to
    softcap * tanh(logit / softcap). Differentiable in q, k and v.

    `backend`: "triton" (GPUs) or "mosaic" (TPUs, `flash_tpu.py`); None = "mosaic" on a TPU, else "triton".
    `interpret` None = Pallas interpret mode (Mosaic's TPU interpreter for "mosaic") exactly when the default
    backend is the CPU. `block_q`/`block_k` (powers of two, >= 16 for Triton and >= 128 for Mosaic; default 64,
    and for Mosaic `flash_tpu.default_block`; shrunk to the sequence), `backward_blocks` and
    `num_warps`/`num_stages` (Triton only) tune the launch; they do not change the result beyond rounding.
    """
    B, L, H, D = q_BLHD.shape
    K = k_BLKD.shape[2]
    if k_BLKD.shape != (B, L, K, D) or v_BLKD.shape != k_BLKD.shape:
        raise ValueError(f"k/v must be (B, L, K, D) = {(B, L, K, D)}, got {k_BLKD.shape} and {v_BLKD.shape}")
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of key/value heads {K}")
    if segment_ids_BL is not None and segment_ids_BL.shape != (B, L):
        raise ValueError(f"segment ids must be (B, L) = {(B, L)}, got {segment_ids_BL.shape}")
    if window_right is not None and window_right < 0:
        raise ValueError(f"window_right must be >= 0, got {window_right}")
    if backend is None:
        backend = "mosaic" if jax.default_backend() == "tpu" else "triton"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    dtype = jnp.result_type(q_BLHD, k_BLKD, v_BLKD)
    if backend == "mosaic":
        from keel.kernels import flash_tpu

        smallest, default = flash_tpu.MIN_BLOCK, flash_tpu.default_block(D, dtype)
    else:
        smallest, default = MIN_BLOCK, TRITON_BLOCK
    bq, bk = _block(block_q or default, L, smallest), _block(block_k or default, L, smallest)
    bwd = None if backward_blocks is None else tuple(_block(b, L, smallest) for b in backward_blocks)
    multiple = max(bq, bk, *(bwd or ()))  # all powers of two: the largest is a multiple of the others
    L_pad = -(-L // multiple) * multiple
    # Triton's dots want power-of-two dims >= 16; Mosaic takes the head dim whole.
    D_pad = max(MIN_BLOCK, pl.next_power_of_2(D)) if backend == "triton" else D
    cfg = FlashConfig(
        causal=causal, window_right=window_right, softcap=float(softcap),
        scale=D**-0.5 if scale is None else float(scale), block_q=bq, block_k=bk,
        group=H // K, has_segments=segment_ids_BL is not None or L_pad != L, interpret=bool(interpret),
        precision=lax.Precision.HIGHEST if dtype == jnp.float32 else None, num_warps=num_warps,
        num_stages=num_stages, backward_blocks=bwd, backend=backend,
    )

    def pad(x: jax.Array) -> jax.Array:
        return jnp.pad(x.astype(dtype), ((0, 0), (0, L_pad - L), (0, 0), (0, D_pad - D)))

    seg_BL = None
    if cfg.has_segments:
        seg_BL = jnp.zeros((B, L), jnp.int32) if segment_ids_BL is None else segment_ids_BL.astype(jnp.int32)
        # Padding is a document of its own, so no real query sees it (and it sees at least itself).
        pad_id = jnp.min(seg_BL) - 1
        seg_BL = jnp.concatenate([seg_BL, jnp.broadcast_to(pad_id, (B, L_pad - L))], axis=1)
    window_1 = jnp.reshape(jnp.asarray(window, jnp.int32), (1,))
    if backend == "mosaic":
        def bhld(x: jax.Array) -> jax.Array:
            return pad(x).transpose(0, 2, 1, 3)

        o_BHLD = flash_tpu.flash_bhld(cfg, bhld(q_BLHD), bhld(k_BLKD), bhld(v_BLKD), seg_BL, window_1)
        return o_BHLD.transpose(0, 2, 1, 3)[:, :L]
    o_BLHD = _flash(cfg, pad(q_BLHD), pad(k_BLKD), pad(v_BLKD), seg_BL, window_1)
    return o_BLHD[:, :L, :, :D]


def shard_mapped(attention_fn: Callable[..., jax.Array], mesh: Mesh, q_spec: PartitionSpec, kv_spec: PartitionSpec,
                 segment_spec: PartitionSpec) -> Callable[..., jax.Array]:
    """`attention_fn` (the reference's signature) run on each shard with `jax.shard_map`.

    A Pallas call is opaque to XLA's partitioner, which would gather its operands onto every device; under a
    mesh the kernel must see its own shard. Batch and heads may be sharded (specs of q_BLHD, k_BLKD/v_BLKD and
    segment_ids_BL, e.g. from `Sharder.spec`); sequence and head dim may not. Query and KV heads must be split
    over the same mesh axes, so each shard keeps whole groups (query head h with KV head h // group).
    """
    q_parts, kv_parts, seg_parts = (tuple(s) + (None,) * (n - len(s))
                                    for s, n in ((q_spec, 4), (kv_spec, 4), (segment_spec, 2)))
    if q_parts[1] is not None or q_parts[3] is not None or kv_parts[1] is not None or kv_parts[3] is not None:
        raise ValueError(f"sequence and head dim must be unsharded, got q {q_spec}, k/v {kv_spec}")
    if not q_parts[0] == kv_parts[0] == seg_parts[0] or seg_parts[1] is not None:
        raise ValueError(f"q, k/v and segment ids must shard the batch alike: {q_spec}, {kv_spec}, {segment_spec}")
    if q_parts[2] != kv_parts[2]:
        raise ValueError(f"query and KV heads must be split over the same mesh axes: {q_spec} vs {kv_spec}")

    def run(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array, segment_ids_BL: jax.Array,
            window: jax.Array | int = 0, softcap: float = 0.0, scale: float | None = None) -> jax.Array:
        per_shard = jax.shard_map(
            lambda q, k, v, seg, w: attention_fn(q, k, v, seg, w, softcap, scale), mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, segment_spec, PartitionSpec()), out_specs=q_spec, check_vma=False)
        return per_shard(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, jnp.asarray(window, jnp.int32))

    return run


def flops(B: int, L: int, H: int, D: int, *, causal: bool = True) -> float:
    """Matmul FLOPs of one dense forward (4 B H L^2 D, halved when causal); backward is 2.5x that."""
    return 4 * B * H * L * L * D * (0.5 if causal else 1.0)


__all__ = ["BACKENDS", "MASKED", "FlashConfig", "flash_attention", "flops", "shard_mapped"]
