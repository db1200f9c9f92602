"""Greedy decoding (full forward per token; for the end-of-run sample, not for serving)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from keel.config import ModelConfig
from keel.model.transformer import Params, forward


def _greedy(params: Params, tokens_1T: jax.Array, cfg: ModelConfig, n_prompt: int) -> jax.Array:
    T = tokens_1T.shape[1]
    segment_ids_1T = jnp.ones_like(tokens_1T)
    positions_1T = jnp.arange(T, dtype=jnp.int32)[None]

    def body(t, tokens_1T):
        # Causal masking makes the not-yet-written tail invisible to position t - 1.
        logits_1TV = forward(params, tokens_1T, segment_ids_1T, positions_1T, cfg)
        return tokens_1T.at[0, t].set(jnp.argmax(logits_1TV[0, t - 1]).astype(tokens_1T.dtype))

    return jax.lax.fori_loop(n_prompt, T, body, tokens_1T)


def greedy_sample(params: Params, prompt_ids: list[int], n_new: int, cfg: ModelConfig,
                  stop_id: int | None = None, out_sharding: jax.sharding.Sharding | None = None) -> list[int]:
    """The prompt's greedy continuation of `n_new` tokens, cut at `stop_id`. On a multi-host mesh pass a
    replicated `out_sharding`, so that every process can read the result."""
    tokens = np.zeros((1, len(prompt_ids) + n_new), np.int32)
    tokens[0, : len(prompt_ids)] = prompt_ids
    run = jax.jit(partial(_greedy, cfg=cfg, n_prompt=len(prompt_ids)), out_shardings=out_sharding)
    out = np.asarray(run(params, tokens))[0, len(prompt_ids):].tolist()
    if stop_id is not None and stop_id in out:
        out = out[: out.index(stop_id)]
    return out
