"""Training on a mesh of 8 fake CPU devices gives what one device gives; shardings follow the rules table."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from keel.config import load_config
from keel.model import transformer
from keel.parallel.sharding import Sharder, make_mesh
from keel.train.events import read_events
from keel.train.loop import train
from tests.conftest import TINY

STEPS = ["train.steps=4", "train.eval_every=4", "optim.warmup_steps=1", "checkpoint.every=4"]


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def data_args(small_corpus, store_cache) -> list[str]:
    """The small corpus, its token store built once for the session."""
    return [f"data.corpus={small_corpus}", f"data.cache_dir={store_cache}"]


def _run(data_args, run_dir: Path, presets, extra=(), devices=None) -> Path:
    cfg = load_config(presets, [*TINY, *STEPS, *data_args, f"run_dir={run_dir}", *extra])
    train(cfg, log=lambda s: None, progress=False, devices=devices)
    return run_dir


@pytest.fixture(scope="module")
def one_device(data_args, tmp_path_factory):
    """The reference every mesh preset is held to: the same run on one device."""
    return _losses(_run(data_args, tmp_path_factory.mktemp("one") / "run", ["tiny", "dp"],
                        devices=jax.devices()[:1]))


@pytest.mark.parametrize("preset", [pytest.param("dp", marks=pytest.mark.slow), "fsdp", "fsdp_tp"])  # tiny runs are dp
def test_mesh_presets_match_one_device(preset, one_device, data_args, tmp_path):
    run_dir = _run(data_args, tmp_path / preset, ["tiny", preset])
    np.testing.assert_allclose(_losses(run_dir), one_device, rtol=2e-5)
    # the compiled step's parameter shardings are the ones the logical-axis table asks for
    cfg = load_config(["tiny", preset], [*TINY])
    sharder = Sharder(make_mesh(cfg.mesh))
    abstract = transformer.abstract_params(cfg.model)
    want = {jax.tree_util.keystr(p): s.spec for p, s in
            jax.tree_util.tree_flatten_with_path(sharder.tree(abstract, transformer.logical_axes(cfg.model)))[0]}
    compiled = next(e for e in read_events(run_dir / "events" / "host0000.jsonl") if e["kind"] == "compile")
    got = compiled["param_shardings"]
    assert set(got) == set(want)
    for path, spec in want.items():
        assert got[path] == str(spec), (path, got[path], spec)
    if preset != "dp":
        assert any("fsdp" in s for s in got.values())
    if preset == "fsdp_tp":
        assert "tensor" in got["['layers']['w_up']"] and "fsdp" in got["['layers']['w_up']"]
        assert make_mesh(cfg.mesh).shape["tensor"] == 2


MUON = ["optim.name=muon", "optim.lr=0.02", "train.steps=8", "train.eval_every=8", "checkpoint.every=8"]


@pytest.fixture(scope="module")
def muon_layer_sharded(data_args, tmp_path_factory) -> list[float]:
    return _losses(_run(data_args, tmp_path_factory.mktemp("muon") / "layer_sharded", ["tiny", "fsdp"],
                        [*MUON, "optim.muon_strategy=layer_sharded"]))


def test_muon_layer_sharded_trains(muon_layer_sharded):
    assert np.mean(muon_layer_sharded[-3:]) < muon_layer_sharded[0] - 0.3


@pytest.mark.slow  # a second run; tests/test_muon.py checks the two strategies' updates against each other
def test_muon_trains_layer_sharded_like_gathered(muon_layer_sharded, data_args, tmp_path):
    gathered = _losses(_run(data_args, tmp_path / "gathered", ["tiny", "fsdp"],
                            [*MUON, "optim.muon_strategy=gathered"]))
    np.testing.assert_allclose(muon_layer_sharded, gathered, rtol=1e-4)
