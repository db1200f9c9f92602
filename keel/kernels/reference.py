"""Pure-JAX attention: the reference every attention kernel is tested against.

Grouped-query attention over packed sequences: a query attends to keys that are (a) not in its future,
(b) in the same document (segment id), and (c) when `window` > 0, fewer than `window` tokens back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(segment_ids_BL: jax.Array, window: jax.Array | int = 0) -> jax.Array:
    """Boolean mask_B1LL (broadcast over heads): True where query l may attend to key m."""
    L = segment_ids_BL.shape[1]
    q_idx = jnp.arange(L)[:, None]
    k_idx = jnp.arange(L)[None, :]
    allowed_LL = k_idx <= q_idx
    window = jnp.asarray(window)
    allowed_LL &= (window <= 0) | (q_idx - k_idx < window)
    same_doc_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    return (allowed_LL[None] & same_doc_BLL)[:, None]


def attention(
    q_BLHD: jax.Array,
    k_BLKD: jax.Array,
    v_BLKD: jax.Array,
    segment_ids_BL: jax.Array,
    window: jax.Array | int = 0,
    softcap: float = 0.0,
    scale: float | None = None,
) -> jax.Array:
    """Masked softmax attention with H query heads sharing K key/value heads (H % K == 0). Returns o_BLHD.
    Scores are q.k times `scale` (default head_dim ** -0.5), then capped to `softcap * tanh(s / softcap)` if
    `softcap` > 0."""
    return masked_attention(q_BLHD, k_BLKD, v_BLKD, attention_mask(segment_ids_BL, window), softcap, scale)


def masked_attention(
    q_BLHD: jax.Array,
    k_BMKD: jax.Array,
    v_BMKD: jax.Array,
    mask_B1LM: jax.Array,
    softcap: float = 0.0,
    scale: float | None = None,
) -> jax.Array:
    """`attention` with an explicit mask: query l attends to key m where mask_B1LM[b, 0, l, m]. The KV-cache
    decoder (keel/model/generate.py) calls it with its cache as the M keys."""
    B, L, H, D = q_BLHD.shape
    K = k_BMKD.shape[2]
    q_BLKGD = q_BLHD.reshape(B, L, K, H // K, D)
    scores_BKGLM = jnp.einsum("blkgd,bmkd->bkglm", q_BLKGD, k_BMKD, preferred_element_type=jnp.float32)
    scores_BKGLM = scores_BKGLM * (D**-0.5 if scale is None else scale)
    if softcap > 0:
        scores_BKGLM = softcap * jnp.tanh(scores_BKGLM / softcap)
    scores_BKGLM = jnp.where(mask_B1LM[:, :, None], scores_BKGLM, MASKED)
    probs_BKGLM = jax.nn.softmax(scores_BKGLM, axis=-1).astype(v_BMKD.dtype)
    o_BLKGD = jnp.einsum("bkglm,bmkd->blkgd", probs_BKGLM, v_BMKD)
    return o_BLKGD.reshape(B, L, H, D)
