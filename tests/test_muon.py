"""Muon: orthogonalisation, agreement with optax.contrib.muon, the Muon/AdamW partition. Layer sharding on
every mesh: tests/test_muon_sharding.py."""


import jax
import numpy as np
import optax
import optax.contrib
import pytest
from jax.sharding import PartitionSpec as P

from keel.config import load_config
from keel.model.transformer import named_specs
from keel.optim.muon import MatrixView, muon, newton_schulz
from keel.optim.optimizers import muon_labels, muon_views
from keel.parallel.sharding import make_mesh


def test_newton_schulz_keeps_singular_vectors_and_flattens_singular_values():
    for shape in [(3, 16, 48), (2, 40, 24)]:
        g = np.random.default_rng(0).standard_normal(shape, np.float32)
        o = jax.jit(newton_schulz)(g)
        for gi, oi in zip(g, o, strict=True):
            u, s, vt = np.linalg.svd(np.asarray(gi), full_matrices=False)
            core = u.T @ np.asarray(oi) @ vt.T  # diagonal if the singular vectors are kept
            assert np.abs(core - np.diag(np.diag(core))).max() < 1e-3
            # the quintic iteration maps every singular value into roughly [0.68, 1.13]
            assert np.diag(core).min() > 0.6 and np.diag(core).max() < 1.2


def _stacks(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {f"w{i}": rng.standard_normal(s, np.float32) for i, s in enumerate(shapes)}


@pytest.mark.parametrize("scaling, consistent_rms, nesterov", [("shape", None, True), ("adamw_rms", 0.2, False)])
def test_matches_optax_contrib_muon(scaling, consistent_rms, nesterov):
    shapes = [(3, 16, 32), (2, 48, 24), (2, 4, 8, 16)]
    params = _stacks(shapes, seed=3)
    optax_dims = {
        "w0": optax.contrib.MuonDimensionNumbers(1, 2),
        "w1": optax.contrib.MuonDimensionNumbers(1, 2),
        "w2": optax.contrib.MuonDimensionNumbers((1, 2), 3),
    }
    views = {"['w0']": MatrixView(1), "['w1']": MatrixView(1), "['w2']": MatrixView(2)}
    ours = muon(0.02, views, weight_decay=0.1, scaling=scaling, nesterov=nesterov)
    ref = optax.contrib.muon(0.02, weight_decay=0.1, nesterov=nesterov, consistent_rms=consistent_rms,
                             muon_weight_dimension_numbers=optax_dims)
    s_ours, s_ref = ours.init(params), ref.init(params)
    update_ours, update_ref = jax.jit(ours.update), jax.jit(ref.update)
    p_ours = p_ref = params
    for step in range(3):
        g = _stacks(shapes, seed=10 + step)
        u_ours, s_ours = update_ours(g, s_ours, p_ours)
        u_ref, s_ref = update_ref(g, s_ref, p_ref)
        for k in params:
            np.testing.assert_allclose(u_ours[k], u_ref[k], rtol=2e-5, atol=1e-6)
        p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)


def test_model_partition():
    model = load_config("tiny").model
    views = muon_views(model)
    assert sorted(views) == sorted(f"['layers']['{k}']" for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up",
                                                                  "w_down"))
    assert views["['layers']['wo']"].n_in == 2 and views["['layers']['wq']"].n_in == 1
    # Muon's (in, out) view of each matrix is the one its ParamSpec declares (and initialises by)
    specs = named_specs(model)
    for key, view in views.items():
        assert view.n_in == specs[key].n_in and view.fans(specs[key].shape)[0] == specs[key].fan_in
    labels = muon_labels(model)
    assert labels["embed"] == "adamw" and labels["final_norm"] == "adamw"
    assert labels["layers"]["attn_norm"] == "adamw" and labels["layers"]["w_up"] == "muon"


def test_muon_state_is_sharded_like_the_parameters():
    from keel.model import transformer
    from keel.optim.optimizers import build_optimizer
    from keel.parallel.sharding import Sharder, shard_like

    cfg = load_config("tiny", ["optim.name=muon", "mesh.data=1", "mesh.fsdp=-1"])
    sharder = Sharder(make_mesh(cfg.mesh))
    param_sh = sharder.tree(transformer.abstract_params(cfg.model), transformer.logical_axes(cfg.model))
    tx, _ = build_optimizer(cfg, param_sh, sharder.mesh)
    abstract = jax.eval_shape(tx.init, transformer.abstract_params(cfg.model))
    state_sh = shard_like(abstract, param_sh, sharder.replicated())
    specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(state_sh)[0]}
    mu_wq = [v for k, v in specs.items() if k.endswith("mu['layers']['wq']")]
    assert mu_wq and all(s == P(None, "fsdp", None, None) for s in mu_wq)
