"""Hugging Face Gemma-3 interop: `keel import` against logits `transformers` computed (committed golden files,
tests/data/hf_gemma3/make_golden.py; no torch here), export -> import bitwise, the config mapping both ways."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from keel import cli
from keel.config import ModelConfig, YarnConfig, load_saved_config
from keel.errors import ConfigError
from keel.interop import hf
from keel.model.transformer import forward
from keel.train.checkpoint import load_params
from tests.conftest import TINY

GOLDEN = Path(__file__).parent / "data" / "hf_gemma3"
# float32 on both sides; measured 3e-7 (sliding) and 2.5e-6 (yarn, positions near 3000) of the largest logit
REL_TOL = 1e-4


def _import(hf_dir: Path, run_dir: Path, *extra: str) -> int:
    return cli.main(["import", str(hf_dir), "--run-dir", str(run_dir), *extra])


def _params(run_dir: Path):
    cfg = load_saved_config(run_dir / "config.yaml")
    return cfg, load_params(run_dir, cfg)[0]


@pytest.mark.parametrize("case", ["sliding", "yarn"])
def test_import_reproduces_the_logits_transformers_computed(case, tmp_path):
    assert _import(GOLDEN / case, tmp_path / "run") == 0
    cfg, params = _params(tmp_path / "run")
    golden = np.load(GOLDEN / case / "golden.npz")
    ids = jnp.asarray(golden["input_ids"], jnp.int32)
    logits = np.asarray(forward(params, ids, jnp.ones_like(ids), jnp.asarray(golden["position_ids"], jnp.int32),
                                cfg.model))
    ref = golden["logits"]
    assert logits.shape == ref.shape
    err = np.abs(logits - ref).max() / np.abs(ref).max()
    assert err <= REL_TOL, f"{case}: max |keel - transformers| is {err:.2e} of the largest logit"
    # the weights themselves arrive untouched: one matrix read straight from the file
    with safe_open(str(GOLDEN / case / "model.safetensors"), framework="numpy") as f:
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
    D, H, Dh = cfg.model.d_model, cfg.model.n_heads, cfg.model.head_dim
    np.testing.assert_array_equal(params["layers"]["wq"][1], q.T.reshape(D, H, Dh))


def test_the_golden_cases_cover_what_they_claim():
    """A golden file that stopped exercising YaRN, the window or the untied head would still pass above."""
    sliding = hf.from_hf_config(json.loads((GOLDEN / "sliding" / "config.json").read_text()))
    yarn = hf.from_hf_config(json.loads((GOLDEN / "yarn" / "config.json").read_text()))
    assert sliding.sliding_window == 8 and sliding.global_every == 3 and sliding.rope_local_theta == 10_000
    assert yarn.yarn.factor == 4 and yarn.final_logit_softcap == 8 and not yarn.tie_embeddings
    assert yarn.query_pre_attn_scalar == 24 and yarn.attn_logit_softcap == 0  # transformers ignores its field
    versions = json.loads((GOLDEN / "VERSIONS.json").read_text())
    assert versions["transformers"] and versions["torch"]


# ------------------------------------------------------------------------------------------ export, import

KNOBS = ["model.sliding_window=8", "model.global_every=2", "model.rope_local_theta=1000", "model.rope_theta=50000",
         "model.yarn.factor=4", "model.yarn.original_max_position_embeddings=256", "model.final_logit_softcap=20",
         "model.query_pre_attn_scalar=12", "model.tie_embeddings=false"]


@pytest.fixture(scope="module")
def knob_run(small_corpus, store_cache, tmp_path_factory):
    """A tiny run trained 4 steps with every architecture option an export must carry."""
    run_dir = tmp_path_factory.mktemp("knobs") / "run"
    args = [*TINY, *KNOBS, f"data.corpus={small_corpus}", f"data.cache_dir={store_cache}", f"run_dir={run_dir}",
            "train.steps=4", "train.eval_every=4", "checkpoint.every=4"]
    assert cli.main(["train", "--no-progress", *args]) == 0
    return run_dir


def _leaves_equal(a, b) -> None:
    import jax

    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_export_then_import_is_bitwise(knob_run, tmp_path):
    out = tmp_path / "hf"
    assert cli.main(["export", str(knob_run), "--hf", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                            "tokenizer.json", "tokenizer_config.json"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    assert config["rope_parameters"]["full_attention"]["rope_type"] == "yarn"
    assert _import(out, tmp_path / "back") == 0
    cfg, params = _params(tmp_path / "back")
    saved = load_saved_config(knob_run / "config.yaml")
    assert cfg.model == saved.model
    _leaves_equal(params, load_params(knob_run, saved)[0])


def test_a_sharded_export_has_an_index_and_imports_bitwise(knob_run, tmp_path):
    out = tmp_path / "hf"
    assert cli.main(["export", str(knob_run), "--hf", str(out), "--max-shard-size", "40KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    for shard in shards:  # every shard within the limit unless it holds a single larger tensor
        with safe_open(str(out / shard), framework="numpy") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]  # noqa: SIM118
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    assert index["metadata"]["total_size"] == sum(
        np.prod(a.shape) * 4 for a in __import__("jax").tree.leaves(_params(knob_run)[1]))
    assert _import(out, tmp_path / "back") == 0
    _leaves_equal(_params(tmp_path / "back")[1], _params(knob_run)[1])


def test_a_bfloat16_export_holds_the_rounded_weights(knob_run, tmp_path):
    out = tmp_path / "hf"
    assert cli.main(["export", str(knob_run), "--hf", str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, params = _params(knob_run)
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(embed, params["embed"].astype(ml_dtypes.bfloat16))
    assert _import(out, tmp_path / "back") == 0
    back = _params(tmp_path / "back")[1]
    np.testing.assert_array_equal(back["layers"]["w_up"],
                                  params["layers"]["w_up"].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_the_exported_tokenizer_starts_texts_with_bos(knob_run, tmp_path):
    from tokenizers import Tokenizer

    out = tmp_path / "hf"
    assert cli.main(["export", str(knob_run), "--hf", str(out)]) == 0
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    config = json.loads((out / "config.json").read_text())
    ids = tok.encode("def f(x):\n    return x").ids
    assert ids[0] == config["bos_token_id"] and config["bos_token_id"] not in ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == "def f(x):\n    return x"
    special = json.loads((out / "tokenizer_config.json").read_text())
    assert tok.token_to_id(special["eos_token"]) == config["eos_token_id"]
    assert tok.token_to_id(special["pad_token"]) == config["pad_token_id"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] and generation["do_sample"]


# ------------------------------------------------------------------------------------------- config mapping

model_configs = st.builds(
    lambda layers, heads, groups, dh, window, every, local, yarn, qpas, caps, tie: ModelConfig(
        vocab_size=257, d_model=heads * 8, n_layers=layers, n_heads=heads, n_kv_heads=heads // groups, head_dim=dh,
        mlp_dim=48, rope_theta=10_000.0, rope_local_theta=local if window else 0.0, sliding_window=window,
        global_every=every if window else 1, yarn=yarn, query_pre_attn_scalar=qpas, final_logit_softcap=caps,
        tie_embeddings=tie),
    st.integers(1, 7), st.sampled_from([2, 4, 8]), st.sampled_from([1, 2]), st.sampled_from([8, 16, 32]),
    st.sampled_from([0, 4, 128]), st.integers(1, 8), st.sampled_from([0.0, 1000.0, 10_000.5]),
    st.one_of(st.just(YarnConfig()), st.builds(
        lambda f, o, af, t: YarnConfig(factor=f, original_max_position_embeddings=o, attention_factor=af, truncate=t),
        st.sampled_from([2.0, 4.0, 8.0]), st.sampled_from([256, 8192]), st.sampled_from([0.0, 1.2]), st.booleans())),
    st.sampled_from([0.0, 24.0, 168.0]), st.sampled_from([0.0, 30.0]), st.booleans())


def _exported(m: ModelConfig) -> dict:
    return json.loads(json.dumps(hf.to_hf_config(m, max_position_embeddings=128, pad_id=0, bos_id=1, eos_id=2,
                                                 dtype="float32")))


@settings(max_examples=150, deadline=None)
@given(model_configs)
def test_config_round_trip_over_random_models(m):
    expected = replace(m, rope_local_theta=0.0 if m.rope_local_theta in (0.0, m.rope_theta) else m.rope_local_theta,
                       query_pre_attn_scalar=0.0 if m.query_pre_attn_scalar == m.head_dim else m.query_pre_attn_scalar)
    if m.sliding_window and m.global_every > m.n_layers:  # no global layer: every value above n_layers means it
        expected = replace(expected, global_every=m.n_layers + 1)
    if m.sliding_window and m.global_every == 1:  # no local layer: the window and its RoPE base do nothing
        expected = replace(expected, sliding_window=0, global_every=1, rope_local_theta=0.0)
    config = _exported(m)
    if m.yarn.factor > 1:  # transformers 4.x reads the factor from these two: they must agree with it
        assert config["max_position_embeddings"] == m.yarn.factor * m.yarn.original_max_position_embeddings
    assert hf.from_hf_config(config) == expected
    # transformers 4.x read the legacy keys: the same model from them alone
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
    assert hf.from_hf_config(legacy) == expected


def test_fields_left_out_mean_transformers_defaults():
    m = hf.from_hf_config({"model_type": "gemma3_text", "num_hidden_layers": 12})
    assert (m.vocab_size, m.d_model, m.head_dim, m.n_heads, m.n_kv_heads) == (262_208, 2304, 256, 8, 4)
    assert (m.sliding_window, m.global_every, m.rope_theta, m.rope_local_theta) == (4096, 6, 1e6, 1e4)
    assert m.query_pre_attn_scalar == 0 and m.tie_embeddings  # 256 = head_dim


def test_a_multimodal_config_imports_its_text_model():
    text = _exported(ModelConfig(sliding_window=16, global_every=2))
    m = hf.from_hf_config({"model_type": "gemma3", "text_config": {**text, "model_type": "gemma3_text"}})
    assert m == ModelConfig(sliding_window=16, global_every=2)


@pytest.mark.parametrize("change, message", [
    ({"hidden_activation": "gelu"}, "gelu_pytorch_tanh"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "llama"}, "gemma3_text"),
    ({"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]},
     "not periodic"),
    ({"layer_types": ["full_attention"] * 3}, "3 layer_types for 4 layers"),
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "'linear'"),
])
def test_what_keel_cannot_compute_is_refused_by_name(change, message):
    config = {**_exported(ModelConfig(sliding_window=8, global_every=2)), **change}
    with pytest.raises(ConfigError, match=message):
        hf.from_hf_config(config)


@pytest.mark.parametrize("change, message", [
    ({"num_hidden_layers": None}, "num_hidden_layers must be a whole number"),
    ({"num_hidden_layers": "many"}, "num_hidden_layers must be a whole number"),
    ({"num_hidden_layers": 3.5}, "num_hidden_layers must be a whole number"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps must be a number"),
    ({"query_pre_attn_scalar": 0}, "must be > 0"),
    ({"layer_types": None, "sliding_window_pattern": 0}, "wrong type"),
    ({"num_attention_heads": 3}, "n_kv_heads"),
    ({"head_dim": 7}, "head_dim"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be an object"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "per-layer-type"),
])
def test_a_malformed_config_is_a_config_error_naming_the_file(change, message):
    config = {**_exported(ModelConfig(sliding_window=8, global_every=2)), **change}
    with pytest.raises(ConfigError, match=message) as e:
        hf.from_hf_config(config, "some/config.json")
    assert str(e.value).startswith("some/config.json: ")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        hf.from_hf_config([config], "some/config.json")


def test_yarn_fields_left_out_default_as_in_transformers_5():
    config = _exported(ModelConfig())
    config["rope_parameters"]["full_attention"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    config["max_position_embeddings"] = 8192
    assert hf.from_hf_config(config).yarn.original_max_position_embeddings == 8192  # max_position_embeddings
    legacy = {k: v for k, v in _exported(ModelConfig()).items() if k != "rope_parameters"}
    legacy["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    assert hf.from_hf_config(legacy).yarn.factor == 4.0


@pytest.mark.parametrize("model, message", [
    (ModelConfig(attn_logit_softcap=50.0), "does not apply attn_logit_softcapping"),
    (ModelConfig(yarn=YarnConfig(factor=1.5, original_max_position_embeddings=1001)), "whole number"),
    (ModelConfig(qk_norm=False), "qk_norm"),
    (ModelConfig(d_model=100, n_heads=8), "multiple"),
    (ModelConfig(query_pre_attn_scalar=24.5), "whole number"),
])
def test_export_refuses_what_transformers_would_compute_differently(model, message):
    with pytest.raises(ConfigError, match=message):
        hf.to_hf_config(model, max_position_embeddings=128, pad_id=0, bos_id=1, eos_id=2, dtype="float32")


# ------------------------------------------------------------------------------------- bad checkpoints


def _copy_case(tmp_path: Path, case: str = "sliding") -> Path:
    return Path(shutil.copytree(GOLDEN / case, tmp_path / case))


def _rewrite_tensors(hf_dir: Path, edit) -> None:
    from safetensors.numpy import save_file

    with safe_open(str(hf_dir / "model.safetensors"), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.int32)}), "is int32"),
    (lambda t: t.pop("model.layers.2.mlp.up_proj.weight"), "model.layers.2.mlp.up_proj.weight is missing"),
    (lambda t: t.update({"model.norm.weight": np.zeros(7, np.float32)}), r"model.norm.weight has shape \[7\]"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}), "no place for"),
])
def test_import_refuses_a_checkpoint_that_does_not_match_its_config(tmp_path, capsys, edit, message):
    hf_dir = _copy_case(tmp_path)
    _rewrite_tensors(hf_dir, edit)
    assert _import(hf_dir, tmp_path / "run") == 2
    assert message.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
    assert not (tmp_path / "run").exists()  # nothing written


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["model"]["vocab"].update({"<s>": t["model"]["vocab"].pop("<bos>")}), "has no <bos> token"),
    (lambda t: t["model"]["vocab"].update({"<eos>": 2, "<bos>": 1}), "<bos> is id 1, but config.json's bos_token_id"),
    (lambda t: t["model"]["vocab"].update({f"x{i}": 128 + i for i in range(9)}), "more than the model's vocab"),
])
def test_a_tokenizer_that_does_not_match_the_model_is_refused(tmp_path, capsys, edit, message):
    """keel finds <pad>/<bos>/<eos> by name: a tokenizer naming them otherwise, or at other ids than config.json
    says, or with more tokens than the embedding has rows, would feed the model ids it never learned."""
    hf_dir = _copy_case(tmp_path)
    _edit_json(hf_dir / "tokenizer.json", edit)
    assert _import(hf_dir, tmp_path / "run") == 2
    assert message in capsys.readouterr().err
    assert cli.main(["generate", str(hf_dir), "--prompt", "w1"]) == 2
    assert message in capsys.readouterr().err


def test_a_bad_index_is_refused(tmp_path, capsys):
    hf_dir = _copy_case(tmp_path)
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    assert _import(hf_dir, tmp_path / "a") == 2
    assert "weight_map must map tensor names to file names" in capsys.readouterr().err
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../sliding/model.safetensors"}}))
    assert _import(hf_dir, tmp_path / "b") == 2
    assert "shard names must be files of" in capsys.readouterr().err


def test_export_and_import_say_what_is_wrong_with_their_arguments(knob_run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert _import(GOLDEN / "sliding", tmp_path / "file" / "run") == 2
    assert "cannot create a directory there" in capsys.readouterr().err
    assert _import(GOLDEN / "sliding", tmp_path / "file") == 2
    assert "is a file" in capsys.readouterr().err
    assert cli.main(["export", str(knob_run), "--hf", str(tmp_path / "o"), "--step", "3"]) == 3
    assert "has no checkpoint of step 3; it has 4" in capsys.readouterr().err
    assert cli.main(["export", str(knob_run), "--hf", str(tmp_path / "o"), "--max-shard-size", "0"]) == 2
    assert "positive size" in capsys.readouterr().err
    assert cli.main(["export", str(GOLDEN / "sliding"), "--hf", str(tmp_path / "o")]) == 2
    assert "already a Hugging Face model directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_failed_import_leaves_no_run_directory(tmp_path, monkeypatch, capsys):
    from keel.train import checkpoint

    def broken(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.Checkpointer, "save", broken)
    assert _import(GOLDEN / "sliding", tmp_path / "run") == 3
    assert "No space left on device); nothing was left there" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the run nor its .partial
    monkeypatch.undo()
    assert _import(GOLDEN / "sliding", tmp_path / "run") == 0  # and the same command works afterwards


def test_import_refuses_pickles_a_used_run_dir_and_model_overrides(tmp_path, capsys):
    hf_dir = _copy_case(tmp_path)
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    assert _import(hf_dir, tmp_path / "a") == 2
    assert "never pickles" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.yaml").write_text("{}")
    assert _import(GOLDEN / "sliding", tmp_path / "b") == 2
    assert "not empty" in capsys.readouterr().err
    assert _import(GOLDEN / "sliding", tmp_path / "c", "model.d_model=64") == 2
    assert "model.d_model=64" in capsys.readouterr().err
    assert _import(GOLDEN / "sliding", tmp_path / "c", "data.tokenizer=/x/tokenizer.json") == 2
    assert "keel import sets data.tokenizer" in capsys.readouterr().err
    assert cli.main(["export", str(GOLDEN), "--hf", str(tmp_path / "d")]) == 2  # not a run
    assert "neither a keel run directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- using what came in


@pytest.mark.slow  # two tiny trainings from an imported checkpoint (~12 s)
def test_an_imported_run_trains_from_the_imported_weights(small_corpus, store_cache, tmp_path, capsys):
    run = tmp_path / "run"
    train_args = [a for a in TINY if not a.startswith("model.")] + [
        f"data.corpus={small_corpus}", f"data.cache_dir={store_cache}", "train.steps=4", "train.eval_every=2",
        "checkpoint.every=2"]
    assert _import(GOLDEN / "sliding", run, *train_args) == 0
    imported = load_params(run, load_saved_config(run / "config.yaml"))[0]
    # before its first step, the training settings may still change; the model and tokenizer may not
    assert cli.main(["train", "--no-progress", "--config", str(run / "config.yaml"), "train.steps=6",
                     "model.rope_theta=5"]) == 2
    assert "model.rope_theta" in capsys.readouterr().err
    assert cli.main(["train", "--no-progress", "--config", str(run / "config.yaml"), "train.steps=6",
                     "optim.name=adamw"]) == 2  # the step-0 checkpoint holds the imported optimizer's state
    assert "optim.name" in capsys.readouterr().err
    assert cli.main(["train", "--no-progress", "--config", str(run / "config.yaml"), "train.steps=6"]) == 0
    assert "resumed from checkpoint at step 0" in capsys.readouterr().out
    cfg = load_saved_config(run / "config.yaml")
    trained, step = load_params(run, cfg)
    assert step == 6 and cfg.train.steps == 6
    moved = np.abs(trained["layers"]["wq"] - imported["layers"]["wq"]).max()
    assert 0 < moved < 0.1  # six small steps from the imported weights, not from a fresh init
    # trained now: its checkpoints deleted by hand, it does not quietly start over from the imported step 0
    for step in ("2", "4", "6"):
        shutil.rmtree(run / "checkpoints" / step)
    assert cli.main(["train", "--no-progress", "--config", str(run / "config.yaml")]) == 3
    assert "committed checkpoints" in capsys.readouterr().err


def test_generate_and_eval_read_a_hugging_face_directory(tmp_path, capsys):
    assert cli.main(["generate", str(GOLDEN / "yarn"), "--prompt", "w5 w6 w7", "--max-new-tokens", "4",
                     "--temperature", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["outputs"][0].startswith("w5 w6 w7") and out["decode_tokens_per_s"] > 0
    (tmp_path / "doc.txt").write_text("w1 w2 w3 w4 w5")
    assert cli.main(["eval", str(GOLDEN / "yarn"), "--text", str(tmp_path / "doc.txt"), "--json"]) == 0
    overall = json.loads(capsys.readouterr().out)["overall"]
    assert overall["tokens"] == 6  # five words and <eos>, after <bos>
    assert cli.main(["eval", str(GOLDEN / "yarn")]) == 2
    assert "--text" in capsys.readouterr().err
