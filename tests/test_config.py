import dataclasses
import math
import re
import typing

import pytest

from keel.cli import main
from keel.config import (
    FLOAT_BOUNDS,
    ComputeDtype,
    Config,
    ConfigError,
    MuonScaling,
    MuonStrategy,
    OptimizerName,
    RematPolicy,
    check_registry,
    flatten,
    from_dict,
    load_config,
    load_preset,
    load_saved_config,
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
        ("optim.b2=1.5", ["optim.b2", "[0, 1)"]),
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



# ---------------------------------------------------------------------------------------------- values and YAML
# Each of these reached training before: nan/inf learning rates and a negative norm eps or rope theta died at
# step 0-1 with a FloatingPointError traceback, optim.eps=-1 trained to the end, and a `!!python` tag or a YAML
# syntax error ended in a raw yaml traceback (exit 1).


def _keel_train(capsys, *args):
    """`keel train ARGS`: the exit code and stderr."""
    rc = main(["train", *args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("optim.lr=nan", "optim.lr=nan must be a finite number >= 0"),
    ("optim.lr=.nan", "optim.lr=nan must be a finite number >= 0"),
    ("optim.lr=inf", "optim.lr=inf must be a finite number >= 0"),
    ("optim.lr=1e400", "optim.lr=inf must be a finite number >= 0"),  # YAML and float() read it as inf
    ("optim.lr=-.inf", "optim.lr=-inf must be a finite number >= 0"),
    ("optim.lr=1" + "0" * 400, "optim.lr: an integer of 401 digits must be a finite number"),
    ("model.norm_eps=-1", "model.norm_eps=-1.0 must be > 0"),
    ("model.norm_eps=0", "model.norm_eps=0.0 must be > 0"),
    ("model.rope_theta=0", "model.rope_theta=0.0 must be > 0"),
    ("model.rope_theta=inf", "model.rope_theta=inf must be a finite number > 0"),
    ("optim.eps=-1", "optim.eps=-1.0 must be > 0"),
    ("optim.b1=1", "optim.b1=1.0 must be in [0, 1)"),
    ("optim.muon_beta=-0.1", "optim.muon_beta=-0.1 must be in [0, 1)"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("optim.grad_clip=nan", "optim.grad_clip=nan must be a finite number >= 0"),
    ("model.final_logit_softcap=-30", "model.final_logit_softcap=-30.0 must be >= 0"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio=1.5 must be in [0, 1]"),
    ("data.heldout_fraction=1", "data.heldout_fraction=1.0 must be in (0, 1)"),
    ("optim.muon_ns_coeffs=[3.4, nan, 2.0]", "optim.muon_ns_coeffs[1]=nan must be a finite number"),
    ("spike.threshold=inf", "spike.threshold=inf must be a finite number > 0"),
    ("train.restart_backoff_s=-1", "train.restart_backoff_s=-1.0 must be >= 0"),
    ("train.hang_factor=0", "train.hang_factor=0.0 must be > 0"),
    ("train.hang_floor_s=.inf", "train.hang_floor_s=inf must be a finite number >= 0"),
    ("train.seed=4294967296", "train.seed=4294967296 must be in [0, 2**32)"),  # jax keys alias it to seed 0
    ("train.steps=" + "9" * 20, "train.steps=" + "9" * 20 + " must fit in 64 bits"),
])
def test_a_value_that_can_only_fail_later_is_a_config_error(override, message, capsys):
    rc, err = _keel_train(capsys, "--dry-run", override)
    assert (rc, err) == (2, f"keel: config error: {message}\n")


def test_keel_train_refuses_a_bad_value_before_any_work(tmp_path, capsys):
    rc, err = _keel_train(capsys, f"run_dir={tmp_path / 'run'}", "optim.eps=-1")
    assert rc == 2 and "optim.eps=-1.0 must be > 0" in err
    assert not (tmp_path / "run").exists()


def test_values_on_the_edge_of_their_range_are_accepted():
    cfg = load_config("tiny", ["optim.lr=0", "optim.b1=0", "optim.b2=0.999999", "optim.weight_decay=0",
                               "optim.grad_clip=0", "model.final_logit_softcap=0", "optim.min_lr_ratio=1",
                               "train.restart_backoff_s=0", "train.hang_floor_s=0", "optim.eps=1e-30"])
    assert cfg.optim.b2 == 0.999999 and cfg.optim.eps == 1e-30


def _float_keys(cls: type, prefix: str = "") -> typing.Iterator[str]:
    """Every float key of a config class, from its type hints: items of a list as `[]` (`data.sources[].weight`,
    `optim.muon_ns_coeffs[]`), a mapping's values under the mapping's key."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            yield from _float_keys(tp, f"{key}.")
        elif args[1:] == (Ellipsis,) and dataclasses.is_dataclass(args[0]):
            yield from _float_keys(args[0], f"{key}[].")
        elif tp is float or (typing.get_origin(tp) is tuple and float in args):
            yield key if tp is float else f"{key}[]"
        elif typing.get_origin(tp) is dict and args[1] is float:
            yield key


def _float_leaves(node, path=()):
    """(path into the plain config data, key as a message names it) of every float in it."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _float_leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _float_leaves(v, (*path, i))
    elif isinstance(node, float):
        yield path, re.sub(r"\.(\d+)", r"[\1]", ".".join(map(str, path)))


def _with(data, path, value):
    """A copy of plain config data with the leaf at `path` replaced."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(data, list):
        return [_with(v, rest, value) if i == head else v for i, v in enumerate(data)]
    return {k: _with(v, rest, value) if k == head else v for k, v in data.items()}


# A config with one item in every list of mappings, so that every float key of the dataclasses has a value.
FULL = to_dict(load_config("tiny", ["data.sources=[{name: web, path: stores/web, weight: 2}]",
                                    "data.mixture_schedule=[{step: 10, weights: {web: 1}}]"]))
FLOAT_LEAVES = list(_float_leaves(FULL))


def test_the_full_config_reaches_every_float_key():
    patterns = {re.sub(r"\[\d+\]", "[]", re.sub(r"(mixture_schedule\[\d+\]\.weights)\..*", r"\1", key))
                for _, key in FLOAT_LEAVES}
    assert patterns == set(_float_keys(Config))
    assert set(FLOAT_BOUNDS) <= patterns, set(FLOAT_BOUNDS) - patterns


@pytest.mark.parametrize("path, key", FLOAT_LEAVES, ids=[key for _, key in FLOAT_LEAVES])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_key_refuses_non_finite_values(path, key, bad):
    from_dict(FULL)  # valid as it is
    with pytest.raises(ConfigError) as e:
        from_dict(_with(FULL, path, bad))
    assert str(e.value).startswith(f"{key}={bad} must be "), str(e.value)


def test_a_python_tag_in_a_yaml_file_is_refused_with_file_and_line(tmp_path, capsys):
    marker = tmp_path / "executed"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'train:\n  steps: 10\noptim:\n  lr: !!python/object/apply:os.system ["touch {marker}"]\n')
    rc, err = _keel_train(capsys, "--dry-run", "--config", str(bad))
    assert rc == 2 and not marker.exists()
    assert err == (f"keel: config error: {bad}:4:7: the tag !!python/object/apply:os.system is not allowed "
                   "(config files hold plain YAML data: no Python objects or other tags)\n")


def test_a_python_tag_in_an_override_is_refused(tmp_path, capsys):
    marker = tmp_path / "executed"
    override = f'optim.lr=!!python/object/apply:os.system ["touch {marker}"]'
    rc, err = _keel_train(capsys, "--dry-run", override)
    assert rc == 2 and not marker.exists()
    assert err.startswith(f"keel: config error: override {override} (column 1 of the value): "
                          "the tag !!python/object/apply:os.system is not allowed")


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 128\n  n_layers: [1, 2\n")
    rc, err = _keel_train(capsys, "--dry-run", "--config", str(bad))
    assert (rc, err) == (2, f"keel: config error: {bad}:4:1: expected ',' or ']', but got '<stream end>' "
                            "(while parsing a flow sequence at line 3, column 13)\n")
    bad.write_text("optim:\n  lr: 1e-3\n   b1: 0.9\n")
    rc, err = _keel_train(capsys, "--dry-run", "--config", str(bad))
    assert (rc, err) == (2, f"keel: config error: {bad}:3:6: mapping values are not allowed here\n")


def test_a_yaml_syntax_error_in_an_override_is_a_config_error(capsys):
    rc, err = _keel_train(capsys, "--dry-run", "optim.muon_ns_coeffs=[1, 2")
    assert rc == 2 and err.startswith("keel: config error: override optim.muon_ns_coeffs=[1, 2 "
                                      "(column 6 of the value): expected ',' or ']'")


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: 0.1\noptim:\n  b1: 0.5\n", ":3:1: key 'optim' is given twice"),  # YAML would drop lr
    ("model:\n  d_model: 64\n  d_model: 128\n", ":3:3: key 'd_model' is given twice"),
    ("a: 1\x01\n", ":1:5: character '\\x01' is not allowed in YAML"),
    ("1: 2\nfoo: 3\n", "unknown key 1 in config"),
])
def test_other_faults_of_a_yaml_file_are_config_errors(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(str(bad))


def test_an_unreadable_yaml_file_is_a_config_error(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=re.escape(f"{binary}: not UTF-8 text (byte 0)")):
        load_config(str(binary))
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match="dir.yaml: cannot read"):
        load_config(str(tmp_path / "dir.yaml"))


def test_a_saved_config_is_read_with_the_same_checks_naming_the_file(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text("optim:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=re.escape(f"{saved}: optim.lr=nan must be a finite number >= 0")):
        load_saved_config(saved)
    saved.write_text("optim: !!python/object/apply:os.system [true]\n")
    with pytest.raises(ConfigError, match=re.escape(f"{saved}:1:8: the tag !!python/object/apply:os.system")):
        load_saved_config(saved)
    saved.write_text("train:\n  steps: 70\n")
    assert load_saved_config(saved).train.steps == 70
