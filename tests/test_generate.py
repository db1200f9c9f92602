"""The KV-cache decoder computes what the full forward computes (global and local layers, YaRN, softcap,
query_pre_attn_scalar); sampling is reproducible under a seed; the sample-quality criterion. `keel generate` and
the end-of-run sample on a trained run are in tests/test_eval.py (which trains one tiny run for both)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keel.config import ModelConfig, YarnConfig
from keel.model import generate as G
from keel.model import transformer as T
from keel.model.sampling import greedy_sample, longest_loop, sample_quality

BASE = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
                   compute_dtype="float32")
YARN = YarnConfig(factor=4.0, original_max_position_embeddings=8)
CASES = {
    "global": dataclasses.replace(BASE, query_pre_attn_scalar=12.0, attn_logit_softcap=3.0),
    # a local layer (a ring of 4 slots, which the 7-token prompt overflows) then a global one, YaRN-scaled with
    # base 10^6 while the local one rotates plainly with base 10^4
    "mixed_yarn": dataclasses.replace(BASE, sliding_window=4, global_every=2, rope_theta=1e6, rope_local_theta=1e4,
                                      yarn=YARN),
}


def _params(cfg, seed=1):
    p = T.init_params(cfg, jax.random.key(seed))  # norm scales start at 0: perturb them so they act
    return jax.tree.map(lambda w: w + 0.1 * jax.random.normal(jax.random.key(seed + 1), w.shape), p)


@pytest.mark.parametrize("name", list(CASES))
def test_cached_decode_gives_the_full_forward_logits(name):
    """Two prompts of different lengths (7 and 3 tokens, longer and shorter than the window of 4), then six
    cached decode steps each; every step's logits equal the full forward's at that position."""
    cfg = CASES[name]
    params = _params(cfg)
    B, N, P = 2, 14, 7
    seqs = np.asarray(jax.random.randint(jax.random.key(3), (B, N), 0, cfg.vocab_size), np.int32)
    lengths = np.array([7, 3], np.int32)
    full = T.forward(params, seqs, jnp.ones((B, N), jnp.int32), jnp.broadcast_to(jnp.arange(N), (B, N)), cfg)
    rows = np.arange(B)
    cache = G.init_cache(cfg, B, N)
    logits, cache = jax.jit(G.prefill, static_argnums=4)(params, seqs[:, :P], lengths, cache, cfg)
    np.testing.assert_allclose(logits, full[rows, lengths - 1], atol=2e-5, rtol=2e-5)
    step = jax.jit(G.decode_step, static_argnums=4, donate_argnums=3)
    pos = lengths.copy()
    for _ in range(6):
        logits, cache = step(params, seqs[rows, pos], pos, cache, cfg)
        np.testing.assert_allclose(logits, full[rows, pos], atol=2e-5, rtol=2e-5)
        pos = pos + 1
    if cfg.sliding_window:
        assert cache.k_local.shape[2] == cfg.sliding_window  # a ring of the window, not the whole length


def test_yarn_frequencies_keep_fast_dims_and_stretch_slow_ones():
    """With head_dim 64, theta 10^4, 8K -> 32K: the fastest dims turn > beta_fast times over 8K and keep their
    frequency, the slowest turn < beta_slow times and are divided by the factor; cos and sin are scaled by
    0.1 ln 4 + 1."""
    y = YarnConfig(factor=4.0, original_max_position_embeddings=8192)
    plain = np.asarray(T.default_inv_freq(1e4, 64))
    inv = T.yarn_inv_freq(1e4, 64, y)
    assert inv.dtype == np.float32 and inv.shape == (32,)
    np.testing.assert_allclose(inv[:8], plain[:8], rtol=1e-6)
    np.testing.assert_allclose(inv[-6:], plain[-6:] / 4, rtol=1e-6)
    assert np.all((inv <= plain * (1 + 1e-6)) & (inv >= plain / 4 * (1 - 1e-6)))
    assert T.yarn_attention_factor(y) == pytest.approx(0.1 * np.log(4) + 1)
    assert T.yarn_attention_factor(dataclasses.replace(y, attention_factor=1.5)) == 1.5


def test_the_default_model_has_every_knob_off():
    cfg = ModelConfig()
    assert not T.local_rope_differs(cfg) and T.attention_scale(cfg) is None and cfg.yarn.factor == 1.0
    assert cfg.attn_logit_softcap == 0.0


def test_sampling_is_reproducible_under_a_seed_greedy_at_temperature_0_and_stops_at_the_stop_token():
    cfg = CASES["mixed_yarn"]
    params = _params(cfg)
    prompts = [[1, 5, 7, 9, 11], [2, 8]]
    s = G.Sampling(temperature=1.0, top_k=20, top_p=0.9)
    a = G.generate(params, prompts, cfg, 10, s, seed=7).tokens
    assert a == G.generate(params, prompts, cfg, 10, s, seed=7).tokens
    assert a != G.generate(params, prompts, cfg, 10, s, seed=8).tokens
    greedy = G.generate(params, prompts[:1], cfg, 10, G.Sampling(temperature=0.0)).tokens[0]
    assert greedy == greedy_sample(params, prompts[0], 10, cfg)
    stop = a[0][3]
    cut = G.generate(params, prompts, cfg, 10, s, seed=7, stop_id=stop).tokens
    assert cut[0] == a[0][:a[0].index(stop)]
    assert cut[1] == (a[1][:a[1].index(stop)] if stop in a[1] else a[1])


def test_top_k_and_top_p_sample_only_from_the_head():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    k2 = G.sample_logits(logits, jax.random.key(0), G.Sampling(top_k=2))
    assert set(np.asarray(k2).tolist()) == {0, 1}
    p = np.asarray(G.sample_logits(logits, jax.random.key(1), G.Sampling(top_p=0.7)))
    assert set(p.tolist()) == {0, 1}  # 0.5 < 0.7 needs the second; 0.8 >= 0.7 stops there
    assert abs((p == 0).mean() - 0.5 / 0.8) < 0.03


def test_sample_quality_catches_loops_and_non_python():
    assert longest_loop("class FooSubSubSubSub") == 4 and longest_loop("x = '-' * 40  # ------") == 1
    good = sample_quality("class Foo(object):\n    def __init__(self, x):\n        self.x = x\n")
    assert good.longest_loop <= 2 and good.tokenizable == 1.0 and good.reads_like_python()
    assert not sample_quality("class FooSubSubSubSubSub").reads_like_python()
    assert not sample_quality("$$ ? `x`\n!! ?? $\n").reads_like_python()
