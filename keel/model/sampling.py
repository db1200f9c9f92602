"""Greedy decoding (full forward per token; for the end-of-run sample, not for serving)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from keel.config import ModelConfig
from keel.model.transformer import Params, forward


@partial(jax.jit, static_argnames=("cfg", "n_prompt"))
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
                  stop_id: int | None = None) -> list[int]:
    """The prompt's greedy continuation of `n_new` tokens, cut at `stop_id`."""
    tokens = jnp.zeros((1, len(prompt_ids) + n_new), jnp.int32).at[0, : len(prompt_ids)].set(
        jnp.asarray(prompt_ids, jnp.int32))
    out = jax.device_get(_greedy(params, tokens, cfg, len(prompt_ids)))[0, len(prompt_ids):].tolist()
    if stop_id is not None and stop_id in out:
        out = out[: out.index(stop_id)]
    return out
