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


def _run(small_corpus, tmp_path, name, presets, extra=(), devices=None) -> Path:
    run_dir = tmp_path / name
    cfg = load_config(presets, [*TINY, *STEPS, f"data.corpus={small_corpus}", f"run_dir={run_dir}", *extra])
    train(cfg, log=lambda s: None, progress=False, devices=devices)
    return run_dir


@pytest.fixture(scope="module")
def one_device(small_corpus, tmp_path_factory):
    return _losses(_run(small_corpus, tmp_path_factory.mktemp("one"), "one", ["tiny", "dp"],
                        devices=jax.devices()[:1]))


@pytest.mark.parametrize("preset", ["dp", "fsdp", "fsdp_tp"])
def test_mesh_presets_match_one_device(preset, one_device, small_corpus, tmp_path):
    run_dir = _run(small_corpus, tmp_path, preset, ["tiny", preset])
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


def test_muon_trains_layer_sharded_like_gathered(small_corpus, tmp_path):
    runs = {}
    for strategy in ("layer_sharded", "gathered"):
        extra = ["optim.name=muon", f"optim.muon_strategy={strategy}", "optim.lr=0.02", "train.steps=8",
                 "train.eval_every=8", "checkpoint.every=8"]
        runs[strategy] = _losses(_run(small_corpus, tmp_path, strategy, ["tiny", "fsdp"], extra))
    np.testing.assert_allclose(runs["layer_sharded"], runs["gathered"], rtol=1e-4)
    assert np.mean(runs["layer_sharded"][-3:]) < runs["layer_sharded"][0] - 0.3
