import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keel.config import ModelConfig, YarnConfig, load_config
from keel.kernels.reference import attention
from keel.model import transformer as T

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
                  compute_dtype="float32")


def _inputs(B, L, seed=0, vocab=97):
    tokens = jax.random.randint(jax.random.key(seed), (B, L), 0, vocab)
    return tokens, jnp.ones((B, L), jnp.int32), jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))


@pytest.fixture(scope="module")
def params():
    # Norm scales start at zero (applied as 1 + w); perturb them so the tests see them act.
    p = T.init_params(CFG, jax.random.key(1))
    return jax.tree.map(lambda w: w + 0.1 * jax.random.normal(jax.random.key(2), w.shape), p)


def test_shapes_and_logical_axes_cover_every_dim(params):
    tokens, seg, pos = _inputs(3, 10)
    assert T.forward(params, tokens, seg, pos, CFG).shape == (3, 10, 97)
    axes = T.logical_axes(CFG)
    for p, names in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                        strict=True):
        assert len(names) == p.ndim and all(isinstance(n, str) for n in names)
    assert all(names[0] == "layers" for names in jax.tree.leaves(
        axes["layers"], is_leaf=lambda x: isinstance(x, tuple)))


@pytest.mark.parametrize("t", [0, 5, 11, 15])
def test_changing_a_future_token_never_changes_past_logits(params, t):
    tokens, seg, pos = _inputs(2, 16)
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 97)
    a = T.forward(params, tokens, seg, pos, CFG)
    b = T.forward(params, changed, seg, pos, CFG)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


def test_packed_documents_equal_separate_documents(params):
    tokens, _, _ = _inputs(1, 20)
    seg = jnp.array([[1] * 8 + [2] * 12], jnp.int32)
    pos = jnp.array([list(range(8)) + list(range(12))], jnp.int32)
    packed = T.forward(params, tokens, seg, pos, CFG)
    first = T.forward(params, tokens[:, :8], *_inputs(1, 8)[1:], CFG)
    second = T.forward(params, tokens[:, 8:], *_inputs(1, 12)[1:], CFG)
    np.testing.assert_allclose(packed[:, :8], first, atol=1e-5)
    np.testing.assert_allclose(packed[:, 8:], second, atol=1e-5)


def test_sliding_window_hides_tokens_beyond_the_window(params):
    cfg = dataclasses.replace(CFG, sliding_window=3, global_every=100)  # all layers local
    tokens, seg, pos = _inputs(1, 16)
    base = T.forward(params, tokens, seg, pos, cfg)
    changed = T.forward(params, tokens.at[0, 2].set((tokens[0, 2] + 1) % 97), seg, pos, cfg)
    # Two local layers of window 3 reach back 2 * (3 - 1) = 4 positions: 2 is seen from 2..6, not from 7 on.
    np.testing.assert_array_equal(base[0, 7:], changed[0, 7:])
    assert not np.allclose(base[0, 2:7], changed[0, 2:7])
    glob = dataclasses.replace(cfg, global_every=2)
    assert T.layer_windows(glob).tolist() == [3, 0]


def _numpy_attention(q, k, v, seg, window=0):
    """Multi-head attention written out per head and query, kv head h * K // H shared by its group."""
    B, L, H, D = q.shape
    K = k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kh = h // (H // K)
            for i in range(L):
                js = [j for j in range(i + 1) if seg[b, j] == seg[b, i] and (window == 0 or i - j < window)]
                s = np.array([q[b, i, h] @ k[b, j, kh] for j in js]) / np.sqrt(D)
                w = np.exp(s - s.max())
                w /= w.sum()
                out[b, i, h] = sum(wj * v[b, j, kh] for wj, j in zip(w, js, strict=True))
    return out


@pytest.mark.parametrize("H, K, window", [(4, 4, 0), (4, 2, 0), (6, 1, 0), (4, 2, 3)])
def test_gqa_equals_repeated_kv_reference(H, K, window):
    B, L, D = 2, 9, 8
    ks = jax.random.split(jax.random.key(H * 10 + K), 3)
    q = jax.random.normal(ks[0], (B, L, H, D))
    k = jax.random.normal(ks[1], (B, L, K, D))
    v = jax.random.normal(ks[2], (B, L, K, D))
    seg = jnp.array([[1] * 4 + [2] * 5, [1] * 9], jnp.int32)
    got = attention(q, k, v, seg, window)
    want = _numpy_attention(*map(np.asarray, (q, k, v, seg)), window)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # and GQA is exactly MHA with each KV head repeated for its group of query heads
    rep = attention(q, jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2), seg, window)
    np.testing.assert_allclose(got, rep, atol=1e-6)


def test_rnj1_parameter_count_without_allocating():
    m = load_config("rnj1-8b").model
    L, D, H, K, Dh, F, V = 32, 4096, 32, 8, 128, 16384, 131072
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size) == (
        L, D, H, K, Dh, F, V)
    per_layer = D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F + 4 * D + 2 * Dh
    expected = L * per_layer + V * D + D  # tied embeddings: no separate output matrix
    abstract = T.abstract_params(m)
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(abstract))
    assert T.count_params(m) == expected
    assert 8.2e9 < expected < 8.4e9


def test_untied_embeddings_add_an_output_matrix():
    untied = dataclasses.replace(CFG, tie_embeddings=False)
    assert T.count_params(untied) - T.count_params(CFG) == CFG.d_model * CFG.vocab_size


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_change_memory_not_math(params, policy):
    tokens, seg, pos = _inputs(2, 12)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "segment_ids": seg, "positions": pos,
             "loss_mask": jnp.ones_like(tokens)}

    def grads(cfg):
        return jax.jit(jax.grad(lambda p: T.loss_fn(p, batch, cfg)[0]))(params)

    want = grads(CFG)
    got = grads(dataclasses.replace(CFG, remat=policy))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_final_logit_softcap_is_c_tanh_of_the_uncapped_logits(params):
    tokens, seg, pos = _inputs(2, 8)
    c = 0.5
    z = np.asarray(T.forward(params, tokens, seg, pos, CFG), np.float64)
    capped = T.forward(params, tokens, seg, pos, dataclasses.replace(CFG, final_logit_softcap=c))
    assert (np.abs(z) > c).mean() > 0.1 and (np.abs(z) < c).any()  # the cap bends some logits, not all
    np.testing.assert_allclose(capped, c * np.tanh(z / c), rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(capped).max()) <= c


def test_param_specs_say_each_matrix_input_side():
    specs = T.named_specs(dataclasses.replace(CFG, tie_embeddings=False))
    inputs = {k: s.logical[1 if s.logical[0] == "layers" else 0:][: s.n_in] for k, s in specs.items() if s.n_in}
    # the dims `forward` contracts each matrix over (dense(x, w, n_in))
    assert inputs == {
        "['layers']['wq']": ("embed",), "['layers']['wk']": ("embed",), "['layers']['wv']": ("embed",),
        "['layers']['wo']": ("heads", "head_dim"), "['layers']['w_gate']": ("embed",),
        "['layers']['w_up']": ("embed",), "['layers']['w_down']": ("mlp",), "['unembed']": ("embed",),
    }
    assert specs["['layers']['wo']"].fan_in == CFG.n_heads * CFG.head_dim
    assert specs["['embed']"].n_in == 0 and specs["['embed']"].fan_in == CFG.d_model


def test_loss_mask_excludes_targets(params):
    tokens, seg, pos = _inputs(1, 8)
    batch = {"inputs": tokens, "targets": tokens, "segment_ids": seg, "positions": pos,
             "loss_mask": jnp.array([[1, 1, 1, 1, 0, 0, 0, 0]])}
    loss, n = T.loss_fn(params, batch, CFG)
    other = dict(batch, targets=batch["targets"].at[0, 5].set(3))
    assert float(n) == 4 and float(T.loss_fn(params, other, CFG)[0]) == float(loss)


def test_bfloat16_compute_stays_close_to_float32(params):
    tokens, seg, pos = _inputs(2, 8)
    f32 = T.forward(params, tokens, seg, pos, CFG)
    bf16 = T.forward(params, tokens, seg, pos, dataclasses.replace(CFG, compute_dtype="bfloat16"))
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, atol=0.15)


def test_attention_scale_and_softcap_match_the_written_out_reference():
    """query_pre_attn_scalar sets the scale to s ** -0.5; the softcap is c * tanh(scores / c) before the mask."""
    B, L, H, K, D = 1, 6, 4, 2, 8
    ks = jax.random.split(jax.random.key(5), 3)
    q, k, v = (jax.random.normal(kk, (B, L, n, D)) * 3 for kk, n in zip(ks, (H, K, K), strict=True))
    seg = jnp.ones((B, L), jnp.int32)
    got = attention(q, k, v, seg, 0, softcap=2.0, scale=12.0 ** -0.5)
    qn, kn, vn = map(np.asarray, (q, k, v))
    want = np.zeros_like(qn)
    for h in range(H):
        for i in range(L):
            s = np.array([qn[0, i, h] @ kn[0, j, h // 2] for j in range(i + 1)]) * 12.0 ** -0.5
            s = 2.0 * np.tanh(s / 2.0)
            w = np.exp(s - s.max())
            want[0, i, h] = (w / w.sum()) @ vn[0, : i + 1, h // 2]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_model_knobs_change_the_logits_only_where_they_apply(params):
    """Each knob changes the model; the local RoPE base acts on local layers only (all-global: no change),
    and YaRN (on global layers) leaves an all-local model alone."""
    tokens, seg, pos = _inputs(1, 12)
    base = T.forward(params, tokens, seg, pos, CFG)
    yarn = YarnConfig(factor=4.0, original_max_position_embeddings=4)
    for knob in ({"query_pre_attn_scalar": 20.0}, {"attn_logit_softcap": 0.5}, {"yarn": yarn}):
        assert not np.allclose(T.forward(params, tokens, seg, pos, dataclasses.replace(CFG, **knob)), base)
    np.testing.assert_array_equal(T.forward(params, tokens, seg, pos, dataclasses.replace(CFG, rope_local_theta=99.0)),
                                  base)  # no local layers
    local = dataclasses.replace(CFG, sliding_window=5, global_every=100)
    local_base = T.forward(params, tokens, seg, pos, local)
    np.testing.assert_array_equal(T.forward(params, tokens, seg, pos, dataclasses.replace(local, yarn=yarn)),
                                  local_base)
    assert not np.allclose(T.forward(params, tokens, seg, pos, dataclasses.replace(local, rope_local_theta=99.0)),
                           local_base)


@pytest.mark.parametrize("override, words", [
    ("model.yarn.factor=0.5", ">= 1"), ("model.yarn.factor=4", "original_max_position_embeddings"),
    ("model.yarn.beta_slow=40", "beta_slow"), ("model.query_pre_attn_scalar=-1", ">= 0"),
    ("model.attn_logit_softcap=-2", ">= 0"), ("model.rope_local_theta=-1", ">= 0"),
])
def test_model_knob_ranges_are_checked(override, words):
    from keel.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        load_config("tiny", [override])
