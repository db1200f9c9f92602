"""Packed sequences: from a window of seq_len + 1 tokens to what the model consumes.

A host delivers, per row, the window's tokens (uint16/uint32) and `first_position`, the offset of the window's
first token inside its document. Every document in a store is `<bos> text <eos>`, so document boundaries are the
`<bos>` tokens and the rest follows on the device, where it is nearly free:

    inputs       tokens[:, :-1]                  targets      tokens[:, 1:]
    segment_ids  1 + number of <bos> seen so far (the partial first document is segment 1)
    positions    offset from the last <bos> (or first_position + column before the first one)
    loss_mask    0 where the target is a <bos> (the next document cannot be predicted) or <pad>

`expand` is written once for numpy and jax.numpy (`xp`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

Batch = dict[str, Any]


def _cummax(xp: Any, x: Any) -> Any:
    if xp is np:
        return np.maximum.accumulate(x, axis=1)
    import jax

    return jax.lax.cummax(x, axis=1)


def expand(tokens: Any, first_position: Any, bos: int, pad: int, xp: Any = np) -> Batch:
    """inputs, targets, segment_ids, positions, loss_mask (each (B, S) int32) from a host batch."""
    tok = tokens.astype(xp.int32)
    inputs, targets = tok[:, :-1], tok[:, 1:]
    seq = inputs.shape[1]
    starts = inputs == bos
    col = xp.arange(seq, dtype=xp.int32)[None, :]
    segment_ids = 1 + xp.cumsum(starts, axis=1, dtype=xp.int32) - starts[:, :1].astype(xp.int32)
    last_start = _cummax(xp, xp.where(starts, col, -1))
    positions = xp.where(last_start >= 0, col - last_start, col + first_position.astype(xp.int32)[:, None])
    loss_mask = ((targets != bos) & (targets != pad)).astype(xp.int32)
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids, "positions": positions.astype(xp.int32),
            "loss_mask": loss_mask}
