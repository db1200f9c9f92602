import dataclasses
import typing

import pytest

from keel.config import (
    ComputeDtype,
    Config,
    ConfigError,
    MuonScaling,
    MuonStrategy,
    OptimizerName,
    RematPolicy,
    check_registry,
    flatten,
    load_config,
    load_preset,
    parse_override,
    preset_names,
    resume_differences,
    to_dict,
)
from keel.diag.verdicts import CHECK_NAMES, CheckName
from keel.model.transformer import REMAT_POLICIES
from keel.optim.muon import SCALINGS, STRATEGIES
from keel.optim.optimizers import OPTIMIZERS


@pytest.mark.parametrize("name", preset_names())
def test_a_preset_sets_existing_keys_and_only_those(name):
    defaults = flatten(to_dict(Config()))
    preset = flatten(load_preset(name))
    assert preset and set(preset) <= set(defaults), set(preset) - set(defaults)
    got = flatten(to_dict(load_config(name)))
    changed = {k for k in defaults if got[k] != defaults[k]}
    assert changed <= set(preset)
    assert all(got[k] == v for k, v in preset.items())


def test_tiny_preset_is_the_defaults():
    # keel/configs/tiny.yaml promises that its values are the dataclass defaults (it names the run directory)
    assert all(v == flatten(to_dict(Config()))[k] for k, v in flatten(load_preset("tiny")).items())
    assert load_config("tiny") == Config()


def test_presets_layer_in_order_and_overrides_come_last():
    one_b = load_config("1b")
    layered = load_config(["1b", "fsdp"])
    assert layered.model == one_b.model and layered.train == one_b.train
    assert (layered.mesh.data, layered.mesh.fsdp) == (1, -1)
    assert load_config(["fsdp", "dp"]).mesh == load_config("dp").mesh
    assert load_config(["1b", "fsdp"], ["mesh.fsdp=2", "mesh.data=-1"]).mesh.fsdp == 2


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_validates(name):
    assert isinstance(load_config(name), Config)


def test_overrides_apply_and_parse_yaml_scalars():
    cfg = load_config("tiny", ["model.d_model=512", "optim.lr=1e-3", "model.qk_norm=false", "data.corpus=a b"])
    assert cfg.model.d_model == 512 and cfg.optim.lr == 1e-3 and cfg.model.qk_norm is False
    assert cfg.data.corpus == "a b"
    assert parse_override("train.steps=7") == {"train": {"steps": "7"}}
    # a str field takes the text as written, even where YAML would read a bool or a number
    assert load_config("tiny", ["train.sample_prompt=yes", "data.tokenizer=1.5"]).data.tokenizer == "1.5"


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.foo=1", ["model.foo", "allowed keys", "d_model"]),
        ("bogus=1", ["bogus", "allowed keys", "model"]),
        ("train.steps=abc", ["train.steps", "expected int", "'abc'"]),
        ("train.steps=1.5", ["train.steps", "expected int"]),
        ("train.steps=true", ["train.steps", "expected int"]),
        ("model.qk_norm=3", ["model.qk_norm", "expected bool"]),
        ("model.remat=yes", ["model.remat", "'none'", "'full'", "'dots'"]),
        ("model.compute_dtype=fp16", ["model.compute_dtype", "'bfloat16'"]),
        ("optim.name=sgd", ["optim.name", "'sgd'", "'adamw'", "'muon'"]),
        ("optim.muon_strategy=1", ["optim.muon_strategy", "'1'", "'layer_sharded'", "'gathered'"]),
        ("model.param_dtype=[float32]", ["model.param_dtype", "'[float32]'", "'bfloat16'"]),
        ("model.n_heads=5", ["model.n_heads=5", "model.n_kv_heads=2", "allowed n_kv_heads: 1, 5"]),
        ("model.n_kv_heads=3", ["model.n_heads=4", "model.n_kv_heads=3", "1, 2, 4"]),
        ("model.head_dim=63", ["model.head_dim=63", "even"]),
        ("model.d_model=0", ["model.d_model=0", "> 0"]),
        ("optim.lr=-1", ["optim.lr", ">= 0"]),
        ("optim.b2=1.5", ["optim.b2", "[0, 1]"]),
        ("data.heldout_fraction=0", ["data.heldout_fraction"]),
        ("optim.warmup_steps=450", ["optim.warmup_steps=450", "train.steps=500"]),
        ("train.stop_at=501", ["train.stop_at=501", "train.steps=500"]),
        ("mesh.fsdp=-1", ["mesh", "-1"]),
        ("model", ["key.sub=value"]),
        ("model=3", ["model", "expected a mapping"]),
    ],
)
def test_bad_config_names_key_and_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="presets: .*tiny"):
        load_config("nope")


def test_yaml_file_with_unknown_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  d_modle: 3\n")
    with pytest.raises(ConfigError, match="model.d_modle"):
        load_config(str(p))


def test_resume_differences_ignore_observation_keys():
    a = load_config("tiny")
    b = dataclasses.replace(a, run_dir="elsewhere", train=dataclasses.replace(a.train, log_every=1, stop_at=3))
    assert resume_differences(a, b) == []
    c = dataclasses.replace(a, model=dataclasses.replace(a.model, d_model=128))
    assert resume_differences(a, c) == ["model.d_model: 256 -> 128"]


def test_choice_fields_take_their_literal_values():
    for remat in typing.get_args(RematPolicy):
        assert load_config("tiny", [f"model.remat={remat}"]).model.remat == remat
    for dtype in typing.get_args(ComputeDtype):
        assert load_config("tiny", [f"model.compute_dtype={dtype}"]).model.compute_dtype == dtype


def test_choice_from_a_yaml_file_is_checked(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  remat: 3\n")
    with pytest.raises(ConfigError, match="model.remat: 3 is not one of 'none'"):
        load_config(str(p))


@pytest.mark.parametrize("registry, names", [
    (REMAT_POLICIES, RematPolicy), (OPTIMIZERS, OptimizerName), (STRATEGIES, MuonStrategy),
    (SCALINGS, MuonScaling),
])
def test_registries_match_their_literal(registry, names):
    assert set(registry) == set(typing.get_args(names))


def test_burnin_check_names_are_one_list():
    from keel.diag.burnin import CHECKS

    assert tuple(CHECKS) == CHECK_NAMES == typing.get_args(CheckName)


def test_a_registry_that_drifts_from_its_literal_fails_naming_the_names():
    check_registry("OPTIMIZERS", {"adamw": None, "muon": None}, OptimizerName)
    with pytest.raises(TypeError, match=r"OPTIMIZERS .*missing \['muon'\], not in the Literal \['sgd'\]"):
        check_registry("OPTIMIZERS", {"adamw": None, "sgd": None}, OptimizerName)
