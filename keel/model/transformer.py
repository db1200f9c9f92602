"""The Gemma-3-family decoder: RMSNorm (pre and post), RoPE, grouped-query attention with QK-norm and optional
sliding window, GeGLU MLP, tied embeddings, optional final-logit softcap.

Parameters are a plain dict pytree. Every array is declared once in `param_specs` with its shape, its logical
axis names, its initialiser and, for a matrix, which dims are its input side; everything else (abstract shapes,
shardings, init, parameter counts, Muon's matrix views) derives from that table. Layers are stacked on a
leading `layers` axis and run with `jax.lax.scan`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from keel.config import ConfigError, ModelConfig, RematPolicy, YarnConfig, check_registry
from keel.kernels.reference import attention, attention_mask
from keel.parallel.sharding import LogicalAxes, Sharder

Params = dict[str, Any]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter array. A matrix is applied as `x @ w` (see `dense`): after the leading `layers` axis, if
    any, its first `n_in` dims are the input side (contracted with x) and the rest the output side."""

    shape: tuple[int, ...]
    logical: LogicalAxes
    init: Literal["normal", "embedding", "zeros"]
    """normal: std 1/sqrt(fan_in); embedding: std 1/sqrt(last dim); zeros: norm scales, applied as 1 + w."""
    n_in: int = 0
    """Input-side dims of a matrix (Muon orthogonalises it as (in, out)); 0: not a matrix."""

    @property
    def in_dims(self) -> tuple[int, ...]:
        start = 1 if self.logical[:1] == ("layers",) else 0
        return self.shape[start : start + self.n_in]

    @property
    def fan_in(self) -> int:
        return self.shape[-1] if self.init == "embedding" else math.prod(self.in_dims)


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    L, D, H, K, Dh, F, V = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                            cfg.mlp_dim, cfg.vocab_size)

    def norm(*dims: tuple[int, str]) -> ParamSpec:
        return ParamSpec(tuple(d for d, _ in dims), tuple(n for _, n in dims), "zeros")

    layers = {
        "attn_norm": norm((L, "layers"), (D, "embed")),
        "wq": ParamSpec((L, D, H, Dh), ("layers", "embed", "heads", "head_dim"), "normal", n_in=1),
        "wk": ParamSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal", n_in=1),
        "wv": ParamSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal", n_in=1),
        "wo": ParamSpec((L, H, Dh, D), ("layers", "heads", "head_dim", "embed"), "normal", n_in=2),
        "post_attn_norm": norm((L, "layers"), (D, "embed")),
        "mlp_norm": norm((L, "layers"), (D, "embed")),
        "w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal", n_in=1),
        "w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal", n_in=1),
        "w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal", n_in=1),
        "post_mlp_norm": norm((L, "layers"), (D, "embed")),
    }
    if cfg.qk_norm:
        layers["q_norm"] = norm((L, "layers"), (Dh, "head_dim"))
        layers["k_norm"] = norm((L, "layers"), (Dh, "head_dim"))
    # The embedding has std 1/sqrt(D): scaled by sqrt(D) on input it has unit variance, and as the tied
    # output matrix it gives unit-variance logits from a normalised final state. It is a lookup table, not a
    # matrix applied as x @ w (n_in 0): the tied output uses its transpose.
    specs: dict[str, Any] = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "embedding"),
        "final_norm": norm((D, "embed")),
        "layers": layers,
    }
    if not cfg.tie_embeddings:
        specs["unembed"] = ParamSpec((D, V), ("embed", "vocab"), "normal", n_in=1)
    return specs


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def named_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Every parameter's spec keyed by its path as `jax.tree_util.keystr` writes it (e.g. "['layers']['wq']")."""
    flat = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=_is_spec)[0]
    return {jax.tree_util.keystr(path): spec for path, spec in flat}


def logical_axes(cfg: ModelConfig) -> dict[str, Any]:
    return jax.tree.map(lambda s: s.logical, param_specs(cfg), is_leaf=_is_spec)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)

    def make(spec: ParamSpec, k: jax.Array) -> jax.Array:
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        return (jax.random.normal(k, spec.shape, jnp.float32) / math.sqrt(spec.fan_in)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys, strict=True)])


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes and dtypes of the parameters, computed without allocating (docs/design.md, invariant 4)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def count_params(cfg: ModelConfig) -> int:
    return sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_params(cfg)))


def _layer_windows_np(cfg: ModelConfig) -> np.ndarray:
    """Per-layer windows in numpy (for decisions made while a step is traced: jnp would be staged into it)."""
    if cfg.sliding_window == 0:
        return np.zeros(cfg.n_layers, np.int32)
    return np.where((np.arange(cfg.n_layers) + 1) % cfg.global_every == 0, 0, cfg.sliding_window).astype(np.int32)


def layer_windows(cfg: ModelConfig) -> jax.Array:
    """Per-layer attention window (0 = global): every `global_every`-th layer is global."""
    return jnp.asarray(_layer_windows_np(cfg))


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 per matmul weight, plus attention
    scores and values (2 matmuls of seq x head_dim per head, halved by the causal mask)."""
    D, H, K, Dh, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    matmul_weights = cfg.n_layers * (D * (H + 2 * K) * Dh + H * Dh * D + 3 * D * F) + D * V
    windows = [min(w, seq_len) if w else seq_len for w in layer_windows(cfg).tolist()]
    attn = sum(2 * 2 * H * Dh * (w / 2 if w == seq_len else w) for w in windows)
    return 6 * matmul_weights + 3 * attn


# ---------------------------------------------------------------------------------------------- forward

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
check_registry("REMAT_POLICIES", REMAT_POLICIES, RematPolicy)


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    if cfg.compute_dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(cfg.compute_dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


# RoPE. Global layers rotate with `rope_theta` (YaRN-scaled when model.yarn.factor > 1), local (sliding-window)
# layers with `rope_local_theta`, unscaled, as Gemma-3 does. Both halves of head_dim are rotated as pairs
# (i, i + head_dim / 2), the "rotate half" layout of Gemma and `transformers`.


def default_inv_freq(theta: float, head_dim: int) -> jax.Array:
    """Inverse frequencies_F (F = head_dim / 2) of plain RoPE."""
    return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def yarn_attention_factor(y: YarnConfig) -> float:
    """The factor YaRN multiplies cos and sin by: `attention_factor`, or the paper's 0.1 ln(factor) + 1."""
    if y.attention_factor > 0:
        return y.attention_factor
    return 0.1 * math.log(y.factor) + 1.0 if y.factor > 1 else 1.0


def yarn_inv_freq(theta: float, head_dim: int, y: YarnConfig) -> np.ndarray:
    """Inverse frequencies_F of YaRN-scaled RoPE, computed as `transformers`' `_compute_yarn_parameters` does,
    operation for operation in float32: a dim that turns more than `beta_fast` times over the original context
    keeps its frequency, one that turns fewer than `beta_slow` times is divided by `factor`, and a linear ramp
    over the dims (its ends rounded outwards when `truncate`) blends the two in between."""
    f32 = np.float32

    def dim_of(rotations: float) -> float:  # the dim that turns `rotations` times over the original context
        return head_dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) \
            / (2 * math.log(theta))

    low, high = dim_of(y.beta_fast), dim_of(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp_F = np.clip((np.arange(head_dim // 2, dtype=f32) - f32(low)) / f32(high - low), f32(0), f32(1))
    keep_F = f32(1) - ramp_F  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    pos_freqs_F = f32(theta) ** (np.arange(0, head_dim, 2).astype(f32) / f32(head_dim))
    extrapolated_F = f32(1) / pos_freqs_F
    interpolated_F = f32(1) / (f32(y.factor) * pos_freqs_F)
    return (interpolated_F * (f32(1) - keep_F) + extrapolated_F * keep_F).astype(f32)


def rope_frequencies(cfg: ModelConfig, local: bool) -> tuple[jax.Array, float]:
    """(inverse frequencies_F, factor on cos and sin) of the local or the global layers."""
    if local:
        return default_inv_freq(cfg.rope_local_theta or cfg.rope_theta, cfg.head_dim), 1.0
    if cfg.yarn.factor > 1:
        return jnp.asarray(yarn_inv_freq(cfg.rope_theta, cfg.head_dim, cfg.yarn)), yarn_attention_factor(cfg.yarn)
    return default_inv_freq(cfg.rope_theta, cfg.head_dim), 1.0


def local_rope_differs(cfg: ModelConfig) -> bool:
    """Whether local layers rotate differently from global ones (else one table serves every layer)."""
    return cfg.sliding_window > 0 and (cfg.rope_local_theta not in (0.0, cfg.rope_theta) or cfg.yarn.factor > 1)


RopeTable = tuple[jax.Array, jax.Array]
"""(cos_BL1F, sin_BL1F) at a batch of positions, broadcast over heads."""


def rope_table(positions_BL: jax.Array, inv_freq_F: jax.Array, factor: float = 1.0) -> RopeTable:
    angles_BLF = positions_BL[..., None].astype(jnp.float32) * inv_freq_F
    sin, cos = jnp.sin(angles_BLF)[:, :, None], jnp.cos(angles_BLF)[:, :, None]
    if factor != 1.0:
        sin, cos = sin * factor, cos * factor
    return cos, sin


def rope_tables(positions_BL: jax.Array, cfg: ModelConfig) -> tuple[RopeTable, RopeTable | None]:
    """The global layers' table and the local layers' one (None when they are the same)."""
    glob = rope_table(positions_BL, *rope_frequencies(cfg, local=False))
    return glob, rope_table(positions_BL, *rope_frequencies(cfg, local=True)) if local_rope_differs(cfg) else None


def layer_rope(tables: tuple[RopeTable, RopeTable | None], window: jax.Array) -> RopeTable:
    """The table of a layer with attention window `window` (0: global; traced inside the layer scan)."""
    glob, local = tables
    if local is None:
        return glob
    is_local = window > 0
    return jnp.where(is_local, local[0], glob[0]), jnp.where(is_local, local[1], glob[1])


def apply_rope(x_BLHD: jax.Array, table: RopeTable) -> jax.Array:
    cos, sin = table
    x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLHD.dtype)


def rope(x_BLHD: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
    """Plain RoPE with base `theta`."""
    return apply_rope(x_BLHD, rope_table(positions_BL, default_inv_freq(theta, x_BLHD.shape[-1])))


def attention_scale(cfg: ModelConfig) -> float | None:
    """`query_pre_attn_scalar ** -0.5`; None: the attention's default, head_dim ** -0.5."""
    return cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar > 0 else None


# Attention implementations behind the reference's signature (q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, window,
# softcap, scale) -> o_BLHD; `model.attention` names one (docs/kernels.md).

AttentionFn = Callable[..., jax.Array]


def cudnn_attention(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array, segment_ids_BL: jax.Array,
                    window: jax.Array | int = 0, softcap: float = 0.0, scale: float | None = None,
                    implementation: str | None = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` with keel's mask (causal, documents, the layer's window, which may be traced)
    given as an explicit mask_B1LL; cuDNN has no softcap."""
    if softcap > 0:
        raise ValueError("cuDNN attention has no logit softcap")
    dtype = q_BLHD.dtype
    return jax.nn.dot_product_attention(q_BLHD, k_BLKD.astype(dtype), v_BLKD.astype(dtype),
                                        mask=attention_mask(segment_ids_BL, window), scale=scale,
                                        implementation=implementation)


def attention_implementations() -> dict[str, AttentionFn]:
    """`model.attention`'s names and their functions (unsharded; `attention_fn` wraps them for a mesh)."""
    from keel.kernels import flash  # Pallas loads only for a model that uses it

    return {"xla": attention, "pallas": flash.flash_attention, "cudnn": cudnn_attention}


def attention_fn(cfg: ModelConfig, sharder: Sharder | None, q_shape: tuple[int, ...], k_shape: tuple[int, ...]
                 ) -> AttentionFn:
    """The attention `cfg.attention` selects (`auto`: measured, `keel.kernels.autotune`). A Pallas or cuDNN call
    is opaque to XLA's partitioner, so under a mesh it runs per shard (`flash.shard_mapped`): batch and heads as
    the activations are sharded; when the query and KV heads would split differently (KV heads not divisible by
    the tensor axis), heads are not split."""
    q_spec = kv_spec = None
    if sharder is not None:
        q_spec = sharder.spec(("batch", "seq", "heads", "head_dim"), q_shape)
        kv_spec = sharder.spec(("batch", "seq", "kv_heads", "head_dim"), k_shape)
        if q_spec[2:3] != kv_spec[2:3]:
            q_spec = jax.P(*q_spec[:2], None, *q_spec[3:])
            kv_spec = jax.P(*kv_spec[:2], None, *kv_spec[3:])
    impl = cfg.attention
    if impl == "auto":
        from keel.kernels import autotune

        windows = _layer_windows_np(cfg)
        case = autotune.Case(
            q_shape=q_shape if sharder is None else jax.NamedSharding(sharder.mesh, q_spec).shard_shape(q_shape),
            k_shape=k_shape if sharder is None else jax.NamedSharding(sharder.mesh, kv_spec).shard_shape(k_shape),
            dtype=compute_dtype(cfg).name, softcap=cfg.attn_logit_softcap, scale=attention_scale(cfg),
            windows=tuple((int(w), int((windows == w).sum())) for w in np.unique(windows)))
        impl = autotune.choose(case, attention_implementations())
    if impl == "xla":
        return attention
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"model.attention=cudnn needs an NVIDIA GPU; this process's devices are "
                          f"{jax.default_backend()} (use xla, pallas or auto)")
    fn = attention_implementations()[impl]
    if sharder is None:
        return fn
    from keel.kernels import flash

    return flash.shard_mapped(fn, sharder.mesh, q_spec, kv_spec, jax.P(*q_spec[:2]))


def dense(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """Contract the last `n_in` dims of x_BL... with the first `n_in` dims of w as one 2-D matmul over all
    B*L tokens. Same result as the einsum; XLA:CPU runs the backward of the batched 3-D form about 2x slower."""
    lead, feat_in = x.shape[:-n_in], math.prod(x.shape[-n_in:])
    y = x.reshape(math.prod(lead), feat_in) @ w.reshape(feat_in, -1)
    return y.reshape(*lead, *w.shape[n_in:])


def _no_constraint(x: jax.Array, logical: LogicalAxes) -> jax.Array:
    return x


def embed(params: Params, tokens_BL: jax.Array, cfg: ModelConfig) -> jax.Array:
    """x_BLD: the token embeddings times sqrt(d_model), in the compute dtype."""
    dtype = compute_dtype(cfg)
    return jnp.take(params["embed"], tokens_BL, axis=0).astype(dtype) * jnp.asarray(math.sqrt(cfg.d_model), dtype)


def attention_inputs(p: Params, x_BLD: jax.Array, table: RopeTable, cfg: ModelConfig,
                     constrain: Callable = _no_constraint) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q_BLHD, k_BLKD (normed and rotated) and v_BLKD of one layer (`p`: its parameters in the compute dtype)."""
    eps = cfg.norm_eps
    h_BLD = rms_norm(x_BLD, p["attn_norm"], eps)
    q_BLHD = dense(h_BLD, p["wq"])
    k_BLKD = dense(h_BLD, p["wk"])
    v_BLKD = dense(h_BLD, p["wv"])
    if cfg.qk_norm:
        q_BLHD = rms_norm(q_BLHD, p["q_norm"], eps)
        k_BLKD = rms_norm(k_BLKD, p["k_norm"], eps)
    q_BLHD = constrain(apply_rope(q_BLHD, table), ("batch", "seq", "heads", "head_dim"))
    k_BLKD = constrain(apply_rope(k_BLKD, table), ("batch", "seq", "kv_heads", "head_dim"))
    return q_BLHD, k_BLKD, v_BLKD


def layer_output(p: Params, x_BLD: jax.Array, o_BLHD: jax.Array, cfg: ModelConfig,
                 constrain: Callable = _no_constraint) -> jax.Array:
    """The residual stream after one layer: attention output projected and normed, then the GeGLU MLP."""
    eps = cfg.norm_eps
    attn_BLD = dense(o_BLHD, p["wo"], n_in=2)
    x_BLD = x_BLD + rms_norm(attn_BLD, p["post_attn_norm"], eps)
    h_BLD = rms_norm(x_BLD, p["mlp_norm"], eps)
    gate_BLF = jax.nn.gelu(dense(h_BLD, p["w_gate"]), approximate=True)
    up_BLF = dense(h_BLD, p["w_up"])
    hidden_BLF = constrain(gate_BLF * up_BLF, ("batch", "seq", "mlp"))
    mlp_BLD = dense(hidden_BLF, p["w_down"])
    x_BLD = x_BLD + rms_norm(mlp_BLD, p["post_mlp_norm"], eps)
    return constrain(x_BLD, ("batch", "seq", "embed"))


def output_logits(params: Params, x_BLD: jax.Array, cfg: ModelConfig) -> jax.Array:
    """logits_BLV (float32) from the last layer's residual stream: final norm, tied (or own) output matrix,
    optional softcap."""
    x_BLD = rms_norm(x_BLD, params["final_norm"], cfg.norm_eps)
    unembed_DV = params.get("unembed", params["embed"].T)
    logits_BLV = dense(x_BLD, unembed_DV.astype(compute_dtype(cfg))).astype(jnp.float32)
    if cfg.final_logit_softcap > 0:
        c = cfg.final_logit_softcap
        logits_BLV = c * jnp.tanh(logits_BLV / c)
    return logits_BLV


def forward(
    params: Params,
    tokens_BL: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
    cfg: ModelConfig,
    sharder: Sharder | None = None,
) -> jax.Array:
    """Logits_BLV (float32) for packed sequences; attention never crosses a segment (document) boundary."""
    constrain = sharder.constrain if sharder is not None else _no_constraint
    dtype = compute_dtype(cfg)
    x_BLD = constrain(embed(params, tokens_BL, cfg), ("batch", "seq", "embed"))
    tables = rope_tables(positions_BL, cfg)
    scale = attention_scale(cfg)

    def layer(x_BLD: jax.Array, xs: tuple[Params, jax.Array]) -> tuple[jax.Array, None]:
        p, window = xs
        p = jax.tree.map(lambda w: w.astype(dtype), p)
        q_BLHD, k_BLKD, v_BLKD = attention_inputs(p, x_BLD, layer_rope(tables, window), cfg, constrain)
        attend = attention_fn(cfg, sharder, q_BLHD.shape, k_BLKD.shape)
        o_BLHD = attend(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, window, cfg.attn_logit_softcap, scale)
        return layer_output(p, x_BLD, o_BLHD, cfg, constrain), None

    policy = REMAT_POLICIES[cfg.remat]
    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
    x_BLD, _ = jax.lax.scan(layer, x_BLD, (params["layers"], layer_windows(cfg)))
    return constrain(output_logits(params, x_BLD, cfg), ("batch", "seq", "vocab"))


def loss_fn(
    params: Params, batch: dict[str, jax.Array], cfg: ModelConfig, sharder: Sharder | None = None
) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy (nats) over targets with loss_mask = 1; returns (loss, n_targets)."""
    logits_BLV = forward(params, batch["inputs"], batch["segment_ids"], batch["positions"], cfg, sharder)
    logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, batch["targets"][..., None], axis=-1)[..., 0]
    mask_BL = batch["loss_mask"].astype(jnp.float32)
    n = jnp.maximum(mask_BL.sum(), 1.0)
    return ((logz_BL - target_logit_BL) * mask_BL).sum() / n, n
