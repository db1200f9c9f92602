"""The sharder: the rules table is checked, and every dim it replicates for divisibility is reported."""

import pytest
from jax.sharding import PartitionSpec as P

from keel.config import MeshConfig, ModelConfig
from keel.model import transformer as T
from keel.parallel.sharding import LOGICAL_RULES, Sharder, check_rules, make_mesh

# 97 (vocab) and 1 (kv_heads) do not divide tensor=2; every other sharded dim divides its mesh axes.
CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=8, mlp_dim=48)


def test_tree_reports_each_non_divisible_dim_and_no_divisible_one():
    sharder = Sharder(make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)))
    shardings = sharder.tree(T.abstract_params(CFG), T.logical_axes(CFG))
    assert sharder.notes == [
        "params/embed dim 0 (vocab=97) is not divisible by tensor=2: replicated",
        "params/layers/wk dim 2 (kv_heads=1) is not divisible by tensor=2: replicated",
        "params/layers/wv dim 2 (kv_heads=1) is not divisible by tensor=2: replicated",
    ]
    # the notes say what the shardings do: those dims are replicated, the divisible ones are split
    assert shardings["embed"].spec == P(None, "fsdp")
    assert shardings["layers"]["wk"].spec == P(None, "fsdp", None, None)
    assert shardings["layers"]["wq"].spec == P(None, "fsdp", "tensor", None)
    # asking again records nothing new
    sharder.tree(T.abstract_params(CFG), T.logical_axes(CFG))
    assert len(sharder.notes) == 3


def test_a_dim_over_several_mesh_axes_names_them_all():
    sharder = Sharder(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    assert sharder.replicated_dims(("batch", None), (8, 5), "batch/tokens") == []
    assert sharder.replicated_dims(("batch", None), (6, 5), "batch/tokens") == [
        "batch/tokens dim 0 (batch=6) is not divisible by data*fsdp=2*2=4: replicated"]
    assert sharder.sharding(("batch", None), (6, 5), where="batch/tokens").spec == P(None, None)
    assert sharder.notes == ["batch/tokens dim 0 (batch=6) is not divisible by data*fsdp=2*2=4: replicated"]
    sharder.sharding(("batch", None), (6, 5))  # without `where`: not recorded (activations inside the step)
    assert len(sharder.notes) == 1


def test_size_one_mesh_axes_replicate_without_a_note():
    sharder = Sharder(make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1)))
    sharder.tree(T.abstract_params(CFG), T.logical_axes(CFG))
    assert sharder.notes == []


def test_rules_name_only_known_mesh_axes_once():
    check_rules(LOGICAL_RULES)
    with pytest.raises(ValueError, match="unknown mesh axes \\['fsdpp'\\]"):
        check_rules({"embed": ("fsdpp",)})
    with pytest.raises(ValueError, match="appears twice"):
        check_rules({"batch": ("data", "data")})
    with pytest.raises(ValueError, match="'tensor'"):
        Sharder(make_mesh(MeshConfig(data=-1)), rules={"mlp": ("model",)})
