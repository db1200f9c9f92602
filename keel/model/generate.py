"""Generation with a KV cache: one jitted prefill of the prompts, then one jitted decode step per token.

Shapes are static: a batch of B prompts, right-padded to P tokens, generates into a cache preallocated for
T = P + max_new_tokens positions, and the cache is donated to every step (updated in place). A global layer
keeps every position (slot = position); a local (sliding-window) layer keeps only its last W = min(window, T)
positions in a ring buffer (slot = position mod W), with the position each slot holds in `local_pos_BW`, so
its memory is W, not T. Each sequence has its own position: a shorter prompt starts decoding earlier, and the
padding it leaves in the global cache is overwritten before any query could see it (a query sees slots
<= its position only).

The layers are unrolled (not scanned as in training) because local and global layers hold caches of different
lengths. The cached decode computes what `transformer.forward` computes over the same tokens
(tests/test_generate.py checks the logits, for global and local layers and with YaRN).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from keel.config import ModelConfig
from keel.kernels.reference import attention, masked_attention
from keel.model.transformer import (
    Params,
    attention_inputs,
    attention_scale,
    compute_dtype,
    embed,
    layer_output,
    local_rope_differs,
    output_logits,
    rope_frequencies,
    rope_table,
)


class KVCache(NamedTuple):
    """Keys and values of every layer, grouped by kind: global layers (G, B, T, K, Dh) indexed by position,
    local layers (Lw, B, W, K, Dh) as ring buffers, and the position each ring slot holds (-1: empty)."""

    k_global: jax.Array
    v_global: jax.Array
    k_local: jax.Array
    v_local: jax.Array
    local_pos_BW: jax.Array


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits: temperature 0 is greedy; otherwise the logits are divided
    by `temperature`, cut to the `top_k` most likely tokens (0: all) and to the smallest set whose probability
    reaches `top_p` (1: all), and one token is drawn."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and self.top_k >= 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling settings out of range: temperature {self.temperature} (>= 0), top_k "
                             f"{self.top_k} (>= 0), top_p {self.top_p} (in (0, 1])")


def sample_logits(logits_BV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """Token ids_B drawn from logits_BV (float32) under `s`."""
    if s.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / s.temperature
    if 0 < s.top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, s.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if s.top_p < 1:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # probability of the more likely tokens
        threshold_B1 = jnp.min(jnp.where(before_BV < s.top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def layer_kinds(cfg: ModelConfig) -> list[tuple[int, int]]:
    """Per layer: (window, index among the layers of its kind): window 0 is global."""
    counts = {True: 0, False: 0}
    out = []
    windows = [0 if cfg.sliding_window == 0 or (i + 1) % cfg.global_every == 0 else cfg.sliding_window
               for i in range(cfg.n_layers)]  # `transformer.layer_windows`, as static Python ints
    for w in windows:
        out.append((w, counts[w > 0]))
        counts[w > 0] += 1
    return out


def ring_size(cfg: ModelConfig, max_len: int) -> int:
    return min(cfg.sliding_window, max_len) if cfg.sliding_window > 0 else 0


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    """An empty cache for `batch` sequences of at most `max_len` positions, in the compute dtype."""
    kinds = [w for w, _ in layer_kinds(cfg)]
    n_local = sum(w > 0 for w in kinds)
    W = ring_size(cfg, max_len)
    dtype = compute_dtype(cfg)
    K, Dh = cfg.n_kv_heads, cfg.head_dim
    glob = jnp.zeros((len(kinds) - n_local, batch, max_len, K, Dh), dtype)
    local = jnp.zeros((n_local, batch, W, K, Dh), dtype)
    return KVCache(glob, glob, local, local, jnp.full((batch, W), -1, jnp.int32))


def _layer_params(params: Params, i: int, cfg: ModelConfig) -> Params:
    return jax.tree.map(lambda w: w[i].astype(compute_dtype(cfg)), params["layers"])


def _tables(positions_BL: jax.Array, cfg: ModelConfig) -> dict[bool, Any]:
    """RoPE table per layer kind (True: local)."""
    glob = rope_table(positions_BL, *rope_frequencies(cfg, local=False))
    local = rope_table(positions_BL, *rope_frequencies(cfg, local=True)) if local_rope_differs(cfg) else glob
    return {False: glob, True: local}


def prefill(params: Params, tokens_BP: jax.Array, lengths_B: jax.Array, cache: KVCache,
            cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    """Run the prompts (right-padded to P; sequence b has lengths_B[b] >= 1 tokens) and fill the cache.
    Returns the logits_BV after each prompt's last token and the cache."""
    B, P = tokens_BP.shape
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    segment_ids_BP = jnp.ones((B, P), jnp.int32)  # the padding is in every prompt's future: never seen
    tables = _tables(positions_BP, cfg)
    scale = attention_scale(cfg)
    W = cache.local_pos_BW.shape[1]
    if W:
        # Ring slot j holds the latest prompt position q < length with q = j (mod W), or nothing (-1).
        j_W = jnp.arange(W, dtype=jnp.int32)
        last_B1 = lengths_B[:, None].astype(jnp.int32) - 1
        ring_pos_BW = last_B1 - jnp.mod(last_B1 - j_W[None], W)
        cache = cache._replace(local_pos_BW=jnp.where(ring_pos_BW >= 0, ring_pos_BW, -1))
        ring_index = jnp.clip(ring_pos_BW, 0, P - 1)[:, :, None, None]
    x_BPD = embed(params, tokens_BP, cfg)
    kg, vg, kl, vl = cache.k_global, cache.v_global, cache.k_local, cache.v_local
    for i, (window, j) in enumerate(layer_kinds(cfg)):
        p = _layer_params(params, i, cfg)
        q, k, v = attention_inputs(p, x_BPD, tables[window > 0], cfg)
        o = attention(q, k, v, segment_ids_BP, window, cfg.attn_logit_softcap, scale)
        x_BPD = layer_output(p, x_BPD, o, cfg)
        if window > 0:
            kl = kl.at[j].set(jnp.take_along_axis(k, ring_index, axis=1).astype(kl.dtype))
            vl = vl.at[j].set(jnp.take_along_axis(v, ring_index, axis=1).astype(vl.dtype))
        else:
            kg = kg.at[j, :, :P].set(k.astype(kg.dtype))
            vg = vg.at[j, :, :P].set(v.astype(vg.dtype))
    last_B11 = (lengths_B - 1).astype(jnp.int32)[:, None, None]
    x_B1D = jnp.take_along_axis(x_BPD, last_B11, axis=1)
    logits_BV = output_logits(params, x_B1D, cfg)[:, 0]
    return logits_BV, cache._replace(k_global=kg, v_global=vg, k_local=kl, v_local=vl)


def decode_step(params: Params, tokens_B: jax.Array, positions_B: jax.Array, cache: KVCache,
                cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    """One token per sequence at its own position: write its keys and values into the cache, attend over the
    cache. Returns logits_BV and the cache."""
    B = tokens_B.shape[0]
    rows_B = jnp.arange(B)
    pos_B1 = positions_B.astype(jnp.int32)[:, None]
    tables = _tables(pos_B1, cfg)
    scale = attention_scale(cfg)
    T = cache.k_global.shape[2]
    W = cache.local_pos_BW.shape[1]
    global_mask_B11T = (jnp.arange(T, dtype=jnp.int32)[None] <= pos_B1)[:, None, None]
    local_pos_BW = cache.local_pos_BW
    if W:
        local_pos_BW = local_pos_BW.at[rows_B, positions_B % W].set(positions_B.astype(jnp.int32))
        local_mask_B11W = ((local_pos_BW >= 0) & (pos_B1 - local_pos_BW < cfg.sliding_window))[:, None, None]
    x_B1D = embed(params, tokens_B[:, None], cfg)
    kg, vg, kl, vl = cache.k_global, cache.v_global, cache.k_local, cache.v_local
    for i, (window, j) in enumerate(layer_kinds(cfg)):
        p = _layer_params(params, i, cfg)
        q, k, v = attention_inputs(p, x_B1D, tables[window > 0], cfg)
        if window > 0:
            slot_B = positions_B % W
            kl = kl.at[j, rows_B, slot_B].set(k[:, 0].astype(kl.dtype))
            vl = vl.at[j, rows_B, slot_B].set(v[:, 0].astype(vl.dtype))
            o = masked_attention(q, kl[j], vl[j], local_mask_B11W, cfg.attn_logit_softcap, scale)
        else:
            kg = kg.at[j, rows_B, positions_B].set(k[:, 0].astype(kg.dtype))
            vg = vg.at[j, rows_B, positions_B].set(v[:, 0].astype(vg.dtype))
            o = masked_attention(q, kg[j], vg[j], global_mask_B11T, cfg.attn_logit_softcap, scale)
        x_B1D = layer_output(p, x_B1D, o, cfg)
    logits_BV = output_logits(params, x_B1D, cfg)[:, 0]
    return logits_BV, KVCache(kg, vg, kl, vl, local_pos_BW)


class _Decoding(NamedTuple):
    """What a decode step carries from one token to the next besides the cache (all on the device)."""

    tokens_B: jax.Array  # the token each sequence feeds next
    positions_B: jax.Array  # its position
    done_B: jax.Array  # the sequence has produced its stop token


def _first(params: Params, tokens_BP: jax.Array, lengths_B: jax.Array, cache: KVCache, key: jax.Array,
           stop_id: jax.Array, cfg: ModelConfig, sampling: Sampling) -> tuple[KVCache, _Decoding]:
    logits_BV, cache = prefill(params, tokens_BP, lengths_B, cache, cfg)
    tok_B = sample_logits(logits_BV, jax.random.fold_in(key, 0), sampling)
    return cache, _Decoding(tok_B, lengths_B.astype(jnp.int32), tok_B == stop_id)


def _next(params: Params, cache: KVCache, state: _Decoding, key: jax.Array, step: jax.Array, stop_id: jax.Array,
          cfg: ModelConfig, sampling: Sampling) -> tuple[KVCache, _Decoding]:
    logits_BV, cache = decode_step(params, state.tokens_B, state.positions_B, cache, cfg)
    tok_B = sample_logits(logits_BV, jax.random.fold_in(key, step), sampling)
    tok_B = jnp.where(state.done_B, stop_id, tok_B)
    return cache, _Decoding(tok_B, state.positions_B + 1, state.done_B | (tok_B == stop_id))


@dataclass
class Generation:
    """Generated token ids per prompt (cut before the stop token) and the measured speeds."""

    tokens: list[list[int]]
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    compile_s: float


def generate(params: Params, prompts: list[list[int]], cfg: ModelConfig, max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0, stop_id: int = -1, batch_size: int = 0,
             out_sharding: jax.sharding.Sharding | None = None) -> Generation:
    """Continue each prompt (token ids, at least one each) by up to `max_new_tokens` tokens, stopping a sequence
    at `stop_id`. Prompts run in batches of `batch_size` (0: all at once); the same prompts, settings and
    `seed` give the same tokens. On a multi-host mesh pass a replicated `out_sharding`, so that every process
    can read the results."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. <bos>)")
    batch_size = batch_size or len(prompts)
    key = jax.random.key(seed)
    out: list[list[int]] = []
    prefill_s = decode_s = compile_s = 0.0
    n_prompt = n_decoded = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        res = _generate_batch(params, chunk, cfg, max_new_tokens, sampling, jax.random.fold_in(key, start),
                              stop_id, batch_size, out_sharding)
        out += res[0]
        prefill_s, decode_s, compile_s = prefill_s + res[1], decode_s + res[2], compile_s + res[3]
        n_prompt += sum(len(p) for p in chunk)
        n_decoded += res[4]
    return Generation(out, n_prompt / max(prefill_s, 1e-9), n_decoded / max(decode_s, 1e-9), compile_s)


def _generate_batch(params: Params, prompts: list[list[int]], cfg: ModelConfig, max_new: int, sampling: Sampling,
                    key: jax.Array, stop_id: int, batch: int, out_sharding: jax.sharding.Sharding | None
                    ) -> tuple[list[list[int]], float, float, float, int]:
    P = max(len(p) for p in prompts)
    tokens = np.zeros((batch, P), np.int32)
    lengths = np.ones((batch,), np.int32)  # rows beyond the prompts: one dummy token, discarded
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p
        lengths[b] = len(p)
    T = P + max(max_new, 1)
    static = (("cfg", cfg), ("sampling", sampling))
    stop = jnp.int32(stop_id)
    t0 = time.perf_counter()
    cache = _compiled(init_cache, (("cfg", cfg), ("batch", batch), ("max_len", T)), None, out_sharding)()
    first_c = _compiled(_first, static, 3, out_sharding, params, tokens, lengths, cache, key, stop)
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    cache, state = first_c(params, tokens, lengths, cache, key, stop)
    state.tokens_B.block_until_ready()
    prefill_s = time.perf_counter() - t0
    generated = [state.tokens_B]
    if max_new > 1:
        t0 = time.perf_counter()
        step_c = _compiled(_next, static, 1, out_sharding, params, cache, state, key, jnp.int32(1), stop)
        compile_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in range(1, max_new):
        if t % 16 == 0 and bool(np.all(np.asarray(state.done_B)[:len(prompts)])):  # padding rows never stop
            break
        cache, state = step_c(params, cache, state, key, jnp.int32(t), stop)
        generated.append(state.tokens_B)
    ids = np.stack([np.asarray(g) for g in generated], axis=1)  # (batch, steps)
    decode_s = time.perf_counter() - t0
    out = []
    for b in range(len(prompts)):
        row = ids[b].tolist()
        out.append(row[:row.index(stop_id)] if stop_id in row else row)
    return out, prefill_s, decode_s, compile_s, len(prompts) * (ids.shape[1] - 1)


_EXECUTABLES: dict[tuple, Any] = {}


def _compiled(fn: Any, static: tuple[tuple[str, Any], ...], donate: int | None,
              out_sharding: jax.sharding.Sharding | None, *args: Any) -> Any:
    """`fn` with its static keyword arguments, jitted and compiled for the shapes, dtypes and shardings of
    `args`, once per process: a second generation of the same shapes (the next batch, the next sample)
    compiles nothing."""
    sig = tuple((a.shape, a.dtype, getattr(a, "sharding", None)) for a in jax.tree.leaves(args))
    key = (fn.__name__, static, donate, out_sharding, sig)
    if key not in _EXECUTABLES:
        options: dict[str, Any] = {} if out_sharding is None else {"out_shardings": out_sharding}
        if donate is not None:
            options["donate_argnums"] = donate
        if len(_EXECUTABLES) > 64:
            _EXECUTABLES.clear()
        _EXECUTABLES[key] = jax.jit(partial(fn, **dict(static)), **options).lower(*args).compile()
    return _EXECUTABLES[key]
