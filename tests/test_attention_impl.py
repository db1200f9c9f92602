"""`model.attention`: the implementations behind the reference's signature, in the model and on every mesh."""

from __future__ import annotations

import functools
import json
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keel import cli
from keel.config import ConfigError, MeshConfig, ModelConfig, load_config
from keel.kernels.reference import attention
from keel.model import transformer as T
from keel.parallel.sharding import Sharder, make_mesh

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                  sliding_window=8, global_every=2, attn_logit_softcap=5.0, compute_dtype="float32")


def _batch(B: int = 8, L: int = 32):
    tokens = jax.random.randint(jax.random.key(1), (B, L), 0, 64)
    segments = jnp.cumsum(jax.random.bernoulli(jax.random.key(2), 0.1, (B, L)), axis=1)  # packed documents
    return tokens, segments, jnp.broadcast_to(jnp.arange(L), (B, L))


MESHES = {"data8": MeshConfig(), "2x2x2": MeshConfig(data=2, fsdp=2, tensor=2),
          "tensor4-kv2": MeshConfig(data=2, fsdp=1, tensor=4), "fsdp8": MeshConfig(data=1, fsdp=8, tensor=1)}
FAST = {("triton", "2x2x2"), ("triton", "tensor4-kv2"), ("mosaic", "2x2x2")}  # the rest in the slow suite


@pytest.mark.parametrize(("backend", "mesh"), [
    pytest.param(b, m, id=f"{b}-{name}", marks=() if (b, name) in FAST else pytest.mark.slow)
    for b in ("triton", "mosaic") for name, m in MESHES.items()])
def test_pallas_in_the_model_equals_xla_on_every_mesh(mesh, backend, monkeypatch):
    """Forward and parameter gradients, with the kernels' Triton (GPU) and Mosaic (TPU) versions, both in
    interpret mode. tensor=4 with 2 KV heads: the KV heads cannot split four ways, so the kernel runs with whole
    heads per shard."""
    from keel.kernels import flash

    monkeypatch.setattr(flash, "flash_attention", functools.partial(flash.flash_attention, backend=backend))
    params = T.init_params(CFG, jax.random.key(0))
    tokens, segments, positions = _batch()
    sharder = Sharder(make_mesh(mesh))

    def loss(p, cfg, sharder):  # noqa: ANN001, ANN202
        return jnp.mean(T.forward(p, tokens, segments, positions, cfg, sharder) ** 2)

    want = jax.value_and_grad(loss)(params, CFG, None)
    pallas = jax.value_and_grad(functools.partial(loss, cfg=replace(CFG, attention="pallas"), sharder=sharder))
    assert "pallas_call" in str(jax.make_jaxpr(pallas)(params))  # the kernel really runs, under shard_map
    got = jax.jit(pallas)(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6)


def test_the_cudnn_path_builds_the_reference_mask():
    """What `cudnn` hands `jax.nn.dot_product_attention` (run here with its XLA implementation): documents, a
    traced window, GQA and a scale give the reference's output."""
    tokens, segments, _ = _batch(4, 24)
    q = jax.random.normal(jax.random.key(3), (4, 24, 4, 8))
    k, v = (jax.random.normal(jax.random.key(s), (4, 24, 2, 8)) for s in (4, 5))
    xla_cudnn = functools.partial(T.cudnn_attention, implementation="xla")
    for window in (0, 5):
        got = jax.jit(lambda q, k, v, s, w: xla_cudnn(q, k, v, s, w, 0.0, 0.3))(q, k, v, segments, jnp.int32(window))
        np.testing.assert_allclose(got, attention(q, k, v, segments, window, 0.0, 0.3), atol=2e-6)


def test_cudnn_is_refused_where_it_cannot_run_or_cap():
    with pytest.raises(ConfigError, match="no softcap"):
        load_config("tiny", ["model.attention=cudnn", "model.attn_logit_softcap=30"])
    with pytest.raises(ConfigError, match="needs bfloat16 compute"):
        load_config("tiny", ["model.attention=cudnn", "model.compute_dtype=float32"])
    if jax.default_backend() != "gpu":
        tokens, segments, positions = _batch(2, 8)
        with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
            T.forward(T.init_params(CFG, jax.random.key(0)), tokens, segments, positions,
                      replace(CFG, attention="cudnn", attn_logit_softcap=0.0))


def test_pallas_on_a_tpu_runs_the_mosaic_kernels(monkeypatch):
    """On a TPU, `pallas` is the kernels' Mosaic version (here in Pallas' TPU interpret mode)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    fn = functools.partial(T.attention_fn(replace(CFG, attention="pallas"), None, (2, 32, 4, 8), (2, 32, 2, 8)),
                           interpret=True)
    q = jax.random.normal(jax.random.key(3), (2, 32, 4, 8))
    k, v = q[:, :, :2], q[:, :, 2:]
    _, segments, _ = _batch(2, 32)
    run = functools.partial(fn, segment_ids_BL=segments, window=5, softcap=3.0)
    assert "keel_flash_forward_tpu" in str(jax.make_jaxpr(run)(q, k, v))
    np.testing.assert_allclose(run(q, k, v), attention(q, k, v, segments, 5, 3.0), atol=1e-5)


@pytest.mark.slow  # two tiny trainings, one with interpret-mode kernels on 8 fake devices (~40 s)
def test_keel_train_with_pallas_gives_the_xla_losses(tiny_args, tmp_path):
    """The real entry point on packed documents (the data pipeline's segment ids), local and global layers."""
    losses = {}
    for impl in ("xla", "pallas"):
        run_dir = tmp_path / impl
        args = [*tiny_args, f"run_dir={run_dir}", f"model.attention={impl}", "model.sliding_window=8",
                "model.global_every=2", "train.steps=4", "train.eval_every=4", "checkpoint.every=4"]
        assert cli.main(["train", "--no-progress", *args]) == 0
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[impl] = [x["loss"] for x in lines if "loss" in x]
    assert len(losses["xla"]) == 4
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-4)


# ------------------------------------------------------------------------------------------- model.attention=auto


@pytest.fixture
def fresh_autotune(monkeypatch, tmp_path):
    """An empty decision cache (in the process and on disk, under tmp_path)."""
    from keel.kernels import autotune

    monkeypatch.setenv("KEEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_CHOSEN", {})
    return autotune


def _case(**kw):  # noqa: ANN003, ANN202
    from keel.kernels import autotune

    return autotune.Case(**{"q_shape": (2, 64, 4, 16), "k_shape": (2, 64, 2, 16), "dtype": "float32",
                            "softcap": 5.0, "scale": None, "windows": ((0, 1), (16, 3)), **kw})


def test_auto_keeps_the_fastest_correct_candidate(fresh_autotune, monkeypatch):
    """A wrong candidate and one that raises are dropped with the reason, whatever their speed; of the correct
    ones the fastest (by the layer-weighted time) wins; XLA is the fallback."""
    autotune = fresh_autotune
    impls = dict(T.attention_implementations(),
                 wrong=lambda q, k, v, *a: jnp.zeros_like(q),
                 raises=lambda q, k, v, *a: (_ for _ in ()).throw(RuntimeError("Mosaic said no")))
    monkeypatch.setattr(autotune, "candidates", lambda platform, case: ["wrong", "raises", "pallas", "xla"])
    times = {"wrong": 0.1, "pallas": 1.0, "xla": 2.0}
    monkeypatch.setattr(autotune, "measure", lambda fn, case, reps=3: times[next(n for n, f in impls.items()
                                                                                  if f is fn)])
    name, report = autotune.decide(_case(), impls)
    assert name == "pallas", report
    assert report["wrong"].startswith("wrong: output differs") and "RuntimeError: Mosaic said no" in report["raises"]
    times["pallas"] = 3.0
    assert autotune.decide(_case(), impls)[0] == "xla"


def test_auto_checks_candidates_against_the_reference_per_window():
    """`check` on the real implementations (Pallas interpreted): correct; a candidate that ignores the window is
    caught at the window where it matters."""
    from keel.kernels import autotune

    case = _case()
    assert autotune.check(T.attention_implementations()["pallas"], case) is None
    no_window = autotune.check(lambda q, k, v, seg, window, softcap, scale: attention(q, k, v, seg, 0, softcap, scale),
                               case)
    assert no_window is not None and "window 16" in no_window
    long = _case(q_shape=(8, 4096, 4, 16), k_shape=(8, 4096, 2, 16))
    assert long.for_check() == _case(q_shape=(1, 1024, 4, 16), k_shape=(1, 1024, 2, 16))  # the reference fits
    assert autotune.candidates("cpu", case) == ["xla"] and autotune.candidates("tpu", case) == ["pallas", "xla"]
    assert autotune.candidates("gpu", case) == ["pallas", "xla"]  # softcap: no cuDNN
    assert autotune.candidates("gpu", _case(softcap=0.0, dtype="bfloat16")) == ["pallas", "cudnn", "xla"]


def test_auto_in_a_traced_sharded_model_measures_once_and_caches(fresh_autotune, monkeypatch):
    """Inside `jax.jit` of the model on a 2x2x2 mesh: the case holds the per-device shapes and the model's
    windows, the choice runs (here pallas, made the faster) under shard_map like `pallas`, the forward equals
    XLA's, and the decision is measured once: a second trace and a fresh process (disk cache) reuse it."""
    autotune = fresh_autotune
    seen = []

    def fake_measure(fn, case, reps=3):  # noqa: ANN001, ANN202
        seen.append(case)
        return 1.0 if fn is T.attention_implementations()["pallas"] else 2.0

    monkeypatch.setattr(autotune, "candidates", lambda platform, case: ["pallas", "xla"])
    monkeypatch.setattr(autotune, "measure", fake_measure)
    params = T.init_params(CFG, jax.random.key(0))
    tokens, segments, positions = _batch()
    sharder = Sharder(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    auto = replace(CFG, attention="auto", compute_dtype="auto")  # float32 on this CPU

    def fwd(p):  # noqa: ANN001, ANN202
        return T.forward(p, tokens, segments, positions, auto, sharder)

    assert "pallas_call" in str(jax.make_jaxpr(fwd)(params))
    np.testing.assert_allclose(jax.jit(fwd)(params), T.forward(params, tokens, segments, positions, CFG),
                               rtol=2e-4, atol=2e-5)
    assert len(seen) == 2  # pallas and xla, once
    assert seen[0].q_shape == (2, 32, 2, 8) and seen[0].k_shape == (2, 32, 1, 8)  # batch / 4, heads / 2
    assert seen[0].windows == ((0, 1), (8, 1)) and seen[0].dtype == "float32"
    monkeypatch.setattr(autotune, "_CHOSEN", {})
    jax.make_jaxpr(fwd)(params)
    assert len(seen) == 2  # read back from $KEEL_CACHE_DIR/attention.json
