"""Layer-sharded Muon on every mesh: the compiled update moves matrices with all-to-all (and all-gather over
axes that hold copies) only, equals one device, and the plan packs the matrices of all stacks by FLOPs."""

import math
import re
from collections import Counter

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from keel.config import load_config
from keel.model import transformer
from keel.optim.layer_sharding import newton_schulz_flops, plan_layer_sharding, stack_shape
from keel.optim.muon import MatrixView, scale_by_muon
from keel.optim.optimizers import describe_partition, layer_sharding_plan, muon_views
from keel.parallel.sharding import Sharder, make_mesh

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "collective-permute", "reduce-scatter")

# 3 layers (not a multiple of any mesh axis), 2 KV heads (replicated on tensor=4), wo and w_down split on
# their input side by `tensor` and on their output side by `fsdp`
MODEL = ["model.d_model=64", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
         "model.mlp_dim=128", "model.vocab_size=256"]
MESHES = {
    "dp": (["tiny", "dp"], []),
    "fsdp": (["tiny", "fsdp"], []),
    "fsdp_tp": (["tiny", "fsdp_tp"], []),  # fsdp 4 x tensor 2
    "fsdp2xtp4": (["tiny"], ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"]),
    "dp2xfsdp4": (["tiny"], ["mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1"]),
    "dp2xfsdp2xtp2": (["tiny"], ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
}
STEPS = 2


def _collectives(text: str) -> Counter:
    return Counter(re.findall(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", text))


def _result_bytes(text: str, op: str) -> int:
    """Bytes of the results of every `op` in compiled HLO text (a tuple of chunks or one array)."""
    total = 0
    for line in text.splitlines():
        m = re.search(r"= (\(.*?\)|\S+) " + op + r"(?:-start)?\(", line)
        if m:
            for dtype, dims in re.findall(r"(f32|bf16|f16)\[([\d,]*)\]", m.group(1)):
                size = math.prod(int(d) for d in dims.split(",") if d)
                total += size * {"f32": 4, "bf16": 2, "f16": 2}[dtype]
    return total


def _grads(model, seed: int) -> dict:
    shapes = transformer.abstract_params(model)["layers"]
    rng = np.random.default_rng(seed)
    return {"layers": {n: rng.standard_normal(shapes[n].shape, np.float32)
                       for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}}


def _updates(tx, grads_per_step, place=lambda g: g):
    """The updates of STEPS steps from one ahead-of-time compiled update (returned too, for its HLO)."""
    first = place(grads_per_step[0])
    state = jax.jit(tx.init)(first)
    update = jax.jit(tx.update).lower(first, state).compile()
    out = []
    for g in grads_per_step:
        u, state = update(place(g), state)
        out.append(jax.device_get(u))
    return out, update


@pytest.fixture(scope="module")
def reference():
    """Muon's updates on one device (no mesh) for STEPS gradients of the test model."""
    model = load_config("tiny", MODEL).model
    grads = [_grads(model, seed) for seed in range(STEPS)]
    views = {k: MatrixView(v.n_in) for k, v in muon_views(model).items()}
    return grads, _updates(scale_by_muon(views), grads)[0]


def _assert_bitwise_equal(got, want):
    """Newton–Schulz runs one matrix at a time, so a matrix's result does not depend on how many matrices its
    device got: layer-sharded updates are bitwise those of one device."""
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    for path, w in jax.tree_util.tree_flatten_with_path(want)[0]:
        g = np.asarray(flat_got[path])
        assert np.array_equal(g, w), (jax.tree_util.keystr(path), np.linalg.norm(g - w) / np.linalg.norm(w))


@pytest.mark.parametrize("mesh_name", MESHES)
def test_layer_sharded_on_every_mesh(mesh_name, reference):
    presets, overrides = MESHES[mesh_name]
    cfg = load_config(presets, [*MODEL, *overrides])
    mesh = make_mesh(cfg.mesh)
    shardings = Sharder(mesh).tree(transformer.abstract_params(cfg.model), transformer.logical_axes(cfg.model))
    views = muon_views(cfg.model, shardings)
    tx = scale_by_muon(views, mesh=mesh)
    layer_sh = shardings["layers"]
    grads, want = reference

    def place(g):
        return {"layers": {k: jax.device_put(v, layer_sh[k]) for k, v in g["layers"].items()}}

    got, compiled = _updates(tx, grads, place)
    for g, w in zip(got, want, strict=True):
        _assert_bitwise_equal(g, w)

    out_sh = compiled.output_shardings[0]["layers"]
    assert all(out_sh[k].is_equivalent_to(layer_sh[k], 4) for k in out_sh)

    plan = layer_sharding_plan(cfg.model, mesh)
    bundles = plan.bundles()
    text = compiled.as_text()
    found = _collectives(text)
    moved = sum(1 for b in bundles if b[0].shard_axes)
    copied = sum(1 for b in bundles if b[0].replica_axes)
    expected = +Counter({"all-to-all": 2 * moved, "all-gather": copied})  # unary + drops the zero counts
    assert found == expected, (mesh_name, found)
    traffic = plan.traffic()
    assert _result_bytes(text, "all-to-all") == traffic["all_to_all"]
    assert _result_bytes(text, "all-gather") == traffic["all_gather"]


def test_stacks_split_on_the_layer_axis_or_not_split():
    """Custom shardings: a stack whose layer dim is split over `data` (each data coordinate orthogonalises its
    own layers), one split over both axes on one dim, and one fully replicated."""
    cfg = load_config("tiny", ["mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1"])
    mesh = make_mesh(cfg.mesh)
    specs = {"a": P("data", "fsdp", None), "b": P(None, None, ("fsdp", "data")), "c": P()}
    shapes = {"a": (6, 32, 48), "b": (5, 24, 16), "c": (3, 8, 12)}
    sh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    views = {f"['{k}']": MatrixView(1, sh[k]) for k in specs}
    rng = np.random.default_rng(0)
    grads = [{k: rng.standard_normal(s, np.float32) for k, s in shapes.items()}]
    want, _ = _updates(scale_by_muon({k: MatrixView(1) for k in views}), grads)
    got, update = _updates(scale_by_muon(views, mesh=mesh), grads,
                           lambda g: {k: jax.device_put(v, sh[k]) for k, v in g.items()})
    _assert_bitwise_equal(got[0], want[0])
    found = _collectives(update.as_text())
    assert set(found) <= {"all-to-all", "all-gather"}, found


def _plan(model_name: str, sizes: dict[str, int]):
    return layer_sharding_plan(load_config(model_name).model, AbstractMesh(tuple(sizes.values()), tuple(sizes)))


@pytest.mark.parametrize("sizes", [{"data": 1, "fsdp": 256, "tensor": 1}, {"data": 1, "fsdp": 32, "tensor": 8},
                                   {"data": 4, "fsdp": 64, "tensor": 1}])
def test_rnj1_on_256_devices_packs_all_stacks_in_one_round(sizes):
    plan = _plan("rnj1-8b", sizes)
    assert plan.n_matrices == 7 * 32 and plan.rounds == 1 and plan.stack_at_a_time()[0] == 7
    largest = newton_schulz_flops(4096, 16384)
    # 224 matrices on 256 devices: the busiest device does one matrix, the largest; nothing does better
    assert plan.device_flops.max() == largest == plan.lower_bound
    assert plan.stack_at_a_time()[1] / plan.device_flops.max() > 3.5
    assert "rounds 1 (one stack at a time: 7)" in plan.describe()


@pytest.mark.parametrize("model_name, sizes", [("rnj1-8b", {"data": 1, "fsdp": 64, "tensor": 1}),
                                               ("rnj1-8b", {"data": 2, "fsdp": 4, "tensor": 2}),
                                               ("1b", {"data": 1, "fsdp": 8, "tensor": 1}),
                                               ("tiny", {"data": 1, "fsdp": 8, "tensor": 1})])
def test_plan_assigns_every_matrix_once_and_balances_flops(model_name, sizes):
    plan = _plan(model_name, sizes)
    for g in plan.groups:
        filled = np.sort(g.table[g.table != g.padding])
        np.testing.assert_array_equal(filled, np.arange(sum(g.layers_local)))  # each matrix exactly once
        assert g.counts.max() == g.slots  # no slot that nobody uses
    assert plan.device_matrices.sum() == plan.n_matrices
    assert plan.device_flops.sum() == pytest.approx(plan.total_flops)
    # LPT is within 4/3 of the best possible assignment, and beats spreading one stack at a time
    assert plan.device_flops.max() <= 4 / 3 * plan.lower_bound
    assert plan.device_flops.max() <= plan.stack_at_a_time()[1]


def test_plan_when_stacks_differ_only_in_sharding():
    """Same shape, different shardings: separate groups (their pieces are laid out differently), one pool."""
    mesh_shape = (("data", 2), ("fsdp", 4))
    stacks = (stack_shape("a", (4, 64, 64), 1, P(None, "fsdp", None), mesh_shape),
              stack_shape("b", (4, 64, 64), 1, P(None, None, "fsdp"), mesh_shape),
              stack_shape("c", (4, 64, 64), 1, P(None, "fsdp", None), mesh_shape))
    plan = plan_layer_sharding(stacks, mesh_shape)
    assert [[s.key for s in g.stacks] for g in plan.groups] == [["a", "c"], ["b"]]
    assert plan.rounds == 2 and plan.device_matrices.min() == 1  # 12 matrices on 8 devices
    assert all(g.replica_axes == ("data",) for g in plan.groups) and len(plan.bundles()) == 1


def test_partition_printed_at_start_shows_rounds_and_balance():
    cfg = load_config(["tiny", "fsdp_tp"])
    text = describe_partition(cfg.model, make_mesh(cfg.mesh))
    assert "muon  (7)" in text and "over 8 devices (data 1 x fsdp 4 x tensor 2)" in text
    assert re.search(r"rounds \d+ \(one stack at a time: 7\)", text) and "balance (mean/busiest) 99%" in text
    assert describe_partition(cfg.model) == describe_partition(cfg.model, None)  # no mesh: the partition only
    one = make_mesh(load_config(["tiny"], ["mesh.data=1"]).mesh, jax.devices()[:1])
    assert describe_partition(cfg.model, one) == describe_partition(cfg.model)  # one device: nothing to spread
