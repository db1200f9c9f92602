"""Hugging Face `gemma3_text` checkpoints: keel's model as `Gemma3ForCausalLM` and back.

keel's decoder is Gemma-3's (RMSNorm as `1 + w`, embedding x sqrt(d), pre and post norms, QK-norm, tanh-GeLU
gate, tied embeddings), so a checkpoint converts by naming and by reshaping, both exact:

- names: `HF_NAMES` below, one line per keel parameter;
- shapes: a keel matrix is applied as `x @ w` with its first `n_in` dims the input side (`ParamSpec.n_in`); a
  `torch.nn.Linear` weight is (out, in). So the HF weight is `w.reshape(prod(in), prod(out)).T` and back, for
  every matrix alike (the attention output `wo` (H, Dh, D) has n_in 2). Norm scales and the embedding table are
  the same array on both sides.

The config maps field by field (`to_hf_config` / `from_hf_config`); every field of the export is written
explicitly, in both the `rope_parameters` layout of `transformers` 5 and the `rope_theta` /
`rope_local_base_freq` / `rope_scaling` keys of 4.x. What keel cannot represent (another activation, biases,
linear RoPE scaling, a local/global layer pattern that is not periodic) is refused by name, never guessed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from keel.config import ModelConfig, YarnConfig
from keel.errors import ConfigError
from keel.model.transformer import ParamSpec, param_specs

LAYER_NAMES = {
    "attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj", "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm",
    "post_attn_norm": "post_attention_layernorm", "mlp_norm": "pre_feedforward_layernorm",
    "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj",
    "post_mlp_norm": "post_feedforward_layernorm",
}
TOP_NAMES = {"embed": "model.embed_tokens", "final_norm": "model.norm", "unembed": "lm_head"}
# (prefix of "model.*", prefix of "lm_head.*"): Gemma3ForCausalLM, then where the multimodal
# Gemma3ForConditionalGeneration keeps its text model (transformers 5, then 4.x).
LAYOUTS = (("model.", "lm_head."), ("model.language_model.", "lm_head."),
           ("language_model.model.", "language_model.lm_head."))

# transformers' Gemma3TextConfig defaults: a config.json field left out means this.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "sliding_window_pattern": 6, "final_logit_softcapping": None, "attn_logit_softcapping": None,
    "attention_bias": False, "use_bidirectional_attention": False, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    "max_position_embeddings": 131_072,
}


# transformers' Gemma3 (4.5x and 5.x) reads `attn_logit_softcapping` into its config but never applies it (Gemma-2
# does); the published Gemma-3 configs leave it null. keel imports such a config as what transformers computes
# (no cap), and refuses to export a model that has one.
IGNORED_BY_TRANSFORMERS = "transformers' Gemma3 does not apply attn_logit_softcapping"


def import_notes(hf: Mapping[str, Any]) -> list[str]:
    """What `from_hf_config` reads differently from the config's face value, to tell the user."""
    text = hf.get("text_config", hf) if hf.get("model_type") == "gemma3" else hf
    cap = text.get("attn_logit_softcapping") if isinstance(text, Mapping) else None
    return [f"attn_logit_softcapping={cap} is ignored: {IGNORED_BY_TRANSFORMERS}, and keel imports what "
            f"transformers computes (no cap)"] if cap else []


def hf_name(path: tuple[str, ...], layer: int | None = None) -> str:
    """The HF tensor name of keel parameter `path` (("embed",) or ("layers", "wq")) in layer `layer`."""
    if path[0] == "layers":
        return f"model.layers.{layer}.{LAYER_NAMES[path[1]]}.weight"
    return f"{TOP_NAMES[path[0]]}.weight"


def _specs(cfg: ModelConfig) -> Iterator[tuple[tuple[str, ...], ParamSpec]]:
    """(("embed",), spec), ..., (("layers", "wq"), spec), ...: every parameter's path in the tree."""
    for name, spec in param_specs(cfg).items():
        if name == "layers":
            yield from ((("layers", key), layer_spec) for key, layer_spec in spec.items())
        else:
            yield (name,), spec


def _hf_shape(spec_shape: tuple[int, ...], n_in: int) -> tuple[int, ...]:
    """The shape of one keel array of `spec_shape` in HF layout: a matrix as (out, in), anything else as is."""
    return spec_shape if n_in == 0 else (math.prod(spec_shape[n_in:]), math.prod(spec_shape[:n_in]))


def _to_hf(w: np.ndarray, spec_shape: tuple[int, ...], n_in: int) -> np.ndarray:
    if n_in == 0:
        return w
    return np.ascontiguousarray(w.reshape(math.prod(spec_shape[:n_in]), -1).T)


def _from_hf(w: np.ndarray, spec_shape: tuple[int, ...], n_in: int) -> np.ndarray:
    return w.reshape(spec_shape) if n_in == 0 else np.ascontiguousarray(w.T).reshape(spec_shape)


def to_hf_tensors(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Every parameter under its HF name, in HF layout (the stacked layers split into one tensor per layer)."""
    out: dict[str, np.ndarray] = {}
    for path, spec in _specs(cfg):
        value = np.asarray(params[path[0]] if len(path) == 1 else params[path[0]][path[1]])
        if path[0] == "layers":
            for i in range(cfg.n_layers):
                out[hf_name(path, i)] = _to_hf(value[i], spec.shape[1:], spec.n_in)
        else:
            out[hf_name(path)] = _to_hf(value, spec.shape, spec.n_in)
    return out


def from_hf_tensors(get: Any, names: set[str], cfg: ModelConfig, dtype: np.dtype, where: str) -> dict[str, Any]:
    """keel's parameter tree from HF tensors: `get(name)` reads one (as numpy), `names` are those present.

    A missing tensor or one of the wrong shape is a ConfigError naming it; tensors keel has no place for are
    refused too (they would be silently dropped)."""
    prefix, head = next(((p, h) for p, h in LAYOUTS if f"{p}embed_tokens.weight" in names), LAYOUTS[0])

    def source(name: str) -> str:  # "model.layers.0..." / "lm_head.weight" as this checkpoint names it
        return head + name[len("lm_head."):] if name.startswith("lm_head.") else prefix + name[len("model."):]

    params: dict[str, Any] = {"layers": {}}
    used: set[str] = set()
    for path, spec in _specs(cfg):
        per_layer = path[0] == "layers"
        shape = spec.shape[1:] if per_layer else spec.shape
        arrays = []
        for i in range(cfg.n_layers) if per_layer else [None]:
            name = source(hf_name(path, i))
            if name not in names:
                raise ConfigError(f"{where}: tensor {name} is missing (keel's {'.'.join(path)})")
            w = np.asarray(get(name))
            if not jnp.issubdtype(w.dtype, jnp.floating):
                raise ConfigError(f"{where}: tensor {name} is {w.dtype}; weights are floating point")
            want = _hf_shape(shape, spec.n_in)
            if w.shape != want:
                raise ConfigError(f"{where}: tensor {name} has shape {list(w.shape)}, the config says {list(want)}")
            arrays.append(_from_hf(w, shape, spec.n_in).astype(dtype))
            used.add(name)
        if per_layer:
            params["layers"][path[1]] = np.stack(arrays)
        else:
            params[path[0]] = arrays[0]
    text_model = {n for n in names if n.startswith((prefix, head))}
    unused = sorted(text_model - used - ({source("lm_head.weight")} if cfg.tie_embeddings else set()))
    if unused:
        raise ConfigError(f"{where}: tensors keel's model has no place for: {', '.join(unused[:5])}"
                          + (f" and {len(unused) - 5} more" if len(unused) > 5 else ""))
    return params


# ------------------------------------------------------------------------------------------------- config


def layer_types(cfg: ModelConfig) -> list[str]:
    """Gemma-3's `layer_types`: keel's layer i is global when there is no window or (i + 1) % global_every == 0."""
    return ["full_attention" if cfg.sliding_window == 0 or (i + 1) % cfg.global_every == 0 else "sliding_attention"
            for i in range(cfg.n_layers)]


def _yarn_fields(y: YarnConfig) -> dict[str, Any]:
    fields = {"rope_type": "yarn", "factor": y.factor,
              "original_max_position_embeddings": y.original_max_position_embeddings,
              "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "truncate": y.truncate}
    if y.attention_factor > 0:
        fields["attention_factor"] = y.attention_factor
    return fields


def check_exportable(cfg: ModelConfig) -> None:
    """What `Gemma3ForCausalLM` cannot express, refused before anything is written."""
    if cfg.attn_logit_softcap > 0:
        raise ConfigError(f"model.attn_logit_softcap={cfg.attn_logit_softcap:g}: {IGNORED_BY_TRANSFORMERS}; the "
                          f"exported model would compute something else than this run's")
    if not float(cfg.query_pre_attn_scalar).is_integer():
        raise ConfigError(f"model.query_pre_attn_scalar={cfg.query_pre_attn_scalar:g}: transformers' Gemma3TextConfig "
                          f"takes a whole number")
    if not cfg.qk_norm:
        raise ConfigError("model.qk_norm=false has no Gemma-3 equivalent (Gemma-3 always norms queries and keys)")
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(f"transformers' Gemma3TextConfig requires d_model ({cfg.d_model}) to be a multiple of "
                          f"n_heads ({cfg.n_heads})")


def to_hf_config(cfg: ModelConfig, *, max_position_embeddings: int, pad_id: int, bos_id: int, eos_id: int,
                 dtype: str) -> dict[str, Any]:
    """config.json of a `Gemma3ForCausalLM` computing what keel's model computes."""
    check_exportable(cfg)
    local_theta = cfg.rope_local_theta or cfg.rope_theta
    global_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.yarn.factor > 1:
        global_rope = {**_yarn_fields(cfg.yarn), "rope_theta": cfg.rope_theta}
        # transformers 4.x takes YaRN's factor as max_position_embeddings / original_max_position_embeddings
        # whenever the latter is given: the two must say the same factor
        extended = cfg.yarn.factor * cfg.yarn.original_max_position_embeddings
        if not float(extended).is_integer():
            raise ConfigError(f"model.yarn.factor={cfg.yarn.factor:g} x original_max_position_embeddings="
                              f"{cfg.yarn.original_max_position_embeddings} is not a whole number of positions: "
                              f"transformers 4.x would read another factor from max_position_embeddings")
        max_position_embeddings = int(extended)
    types = layer_types(cfg)
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "query_pre_attn_scalar": int(cfg.query_pre_attn_scalar or cfg.head_dim),
        # transformers builds the sliding mask even when no layer uses it: it needs a number here
        "sliding_window": cfg.sliding_window or max_position_embeddings,
        "layer_types": types,
        "sliding_window_pattern": cfg.global_every if cfg.sliding_window else 1,
        "final_logit_softcapping": cfg.final_logit_softcap or None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        # transformers >= 5 reads rope_parameters; 4.x reads the three keys after it
        "rope_parameters": {"full_attention": global_rope,
                            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        "rope_theta": cfg.rope_theta,
        "rope_local_base_freq": local_theta,
        "rope_scaling": _yarn_fields(cfg.yarn) if cfg.yarn.factor > 1 else None,
        "pad_token_id": pad_id,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def _field(hf: Mapping[str, Any], key: str, *aliases: str) -> Any:
    for k in (key, *aliases):
        if k in hf:
            return hf[k]
    return HF_DEFAULTS[key]


def _whole(hf: Mapping[str, Any], key: str, where: str) -> int:
    """A field that must be a whole number (3, or 3.0; not 3.5, "3", true or null)."""
    value = _field(hf, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise ConfigError(f"{where}: {key} must be a whole number, not {value!r}")
    return int(value)


def _real(hf: Mapping[str, Any], key: str, where: str, *, none_is: float | None = None) -> float:
    value = _field(hf, key)
    if value is None and none_is is not None:
        return none_is
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: {key} must be a number, not {value!r}")
    return float(value)


def _rope(hf: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global, local) rope parameters, from either config layout."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, Mapping):
        raise ConfigError(f"{where}: rope_scaling must be an object or null, not {scaling!r}")
    if isinstance(params, Mapping) and ("full_attention" in params or "sliding_attention" in params):
        glob = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        glob.update(scaling or {})  # as transformers 5: rope_scaling lands on the full-attention layers
    elif params is not None:
        raise ConfigError(f"{where}: rope_parameters must hold per-layer-type entries (full_attention, "
                          f"sliding_attention) for a Gemma-3 config, not {params!r}")
    else:
        glob = dict(scaling or {})
        local = {}
    glob.setdefault("rope_theta", _field(hf, "rope_theta"))
    local.setdefault("rope_theta", _field(hf, "rope_local_base_freq"))
    for name, rope in (("global (full_attention)", glob), ("local (sliding_attention)", local)):
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "yarn") or (kind == "yarn" and rope is local):
            raise ConfigError(f"{where}: RoPE type {kind!r} on the {name} layers is not supported by keel "
                              f"(plain RoPE everywhere, YaRN on the global layers)")
        rope["rope_type"] = kind
    return glob, local


def _window_pattern(types: list[str], window: int | None, where: str) -> tuple[int, int]:
    """(sliding_window, global_every) of a `layer_types` list, if it is keel's periodic pattern."""
    n = len(types)
    if all(t == "full_attention" for t in types):
        return 0, 1
    bad = sorted(set(types) - {"full_attention", "sliding_attention"})
    if bad:
        raise ConfigError(f"{where}: layer type(s) {bad} are not supported (full_attention, sliding_attention)")
    if not window:
        raise ConfigError(f"{where}: sliding_attention layers without a sliding_window")
    globals_ = [i for i, t in enumerate(types) if t == "full_attention"]
    every = globals_[0] + 1 if globals_ else n + 1
    expected = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    if types != expected:
        raise ConfigError(f"{where}: layer_types {types} is not periodic (keel: every k-th layer global, "
                          f"k = global_every)")
    return int(window), every


def from_hf_config(hf: Any, where: str = "config.json") -> ModelConfig:
    """keel's ModelConfig of a `gemma3_text` config.json (a multimodal `gemma3` one: its text_config). Anything
    malformed or that keel cannot compute is a ConfigError naming `where`; the model is validated as keel's
    own configs are."""
    from keel.config import Config, validate

    if not isinstance(hf, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    try:
        model = _from_hf_config(hf, where)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise ConfigError(f"{where}: a field is missing or of the wrong type ({type(e).__name__}: {e})") from None
    try:
        validate(Config(model=model))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e} (as keel reads this config)") from None
    return model


def _from_hf_config(hf: Mapping[str, Any], where: str) -> ModelConfig:
    if hf.get("model_type") == "gemma3" and isinstance(hf.get("text_config"), Mapping):
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
    if hf.get("model_type", "gemma3_text") != "gemma3_text":
        raise ConfigError(f"{where}: model_type {hf.get('model_type')!r}; keel reads gemma3_text checkpoints")
    activation = _field(hf, "hidden_activation", "hidden_act")
    if activation != "gelu_pytorch_tanh":
        raise ConfigError(f"{where}: hidden_activation {activation!r}; keel's GeGLU uses gelu_pytorch_tanh")
    for flag in ("attention_bias", "use_bidirectional_attention"):
        if _field(hf, flag):
            raise ConfigError(f"{where}: {flag}=true is not supported by keel")
    n_layers, head_dim = _whole(hf, "num_hidden_layers", where), _whole(hf, "head_dim", where)
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % _whole(hf, "sliding_window_pattern", where) else "full_attention"
        for i in range(n_layers)]
    if len(types) != n_layers:
        raise ConfigError(f"{where}: {len(types)} layer_types for {n_layers} layers")
    window, every = _window_pattern(list(types), _field(hf, "sliding_window"), where)
    glob, local = _rope(hf, where)
    yarn = YarnConfig()
    if glob["rope_type"] == "yarn":
        if glob.get("mscale") or glob.get("mscale_all_dim"):
            raise ConfigError(f"{where}: YaRN mscale / mscale_all_dim are not supported by keel")
        # as transformers 5: the original context defaults to max_position_embeddings, the factor to their ratio
        original = glob.get("original_max_position_embeddings") or _field(hf, "max_position_embeddings")
        factor = glob.get("factor") or (_field(hf, "max_position_embeddings") / original)
        yarn = YarnConfig(factor=float(factor), original_max_position_embeddings=int(original),
                          beta_fast=float(glob.get("beta_fast") or 32.0), beta_slow=float(glob.get("beta_slow") or 1.0),
                          attention_factor=float(glob.get("attention_factor") or 0.0),
                          truncate=bool(glob.get("truncate", True)))
    theta, local_theta = float(glob["rope_theta"]), float(local["rope_theta"])
    qpas = _real(hf, "query_pre_attn_scalar", where)
    if qpas <= 0:
        raise ConfigError(f"{where}: query_pre_attn_scalar must be > 0 (the scale is its inverse square root)")
    return ModelConfig(
        vocab_size=_whole(hf, "vocab_size", where), d_model=_whole(hf, "hidden_size", where), n_layers=n_layers,
        n_heads=_whole(hf, "num_attention_heads", where), n_kv_heads=_whole(hf, "num_key_value_heads", where),
        head_dim=head_dim, mlp_dim=_whole(hf, "intermediate_size", where), rope_theta=theta,
        rope_local_theta=0.0 if window == 0 or local_theta == theta else local_theta, yarn=yarn,
        sliding_window=window, global_every=every if window else 1, qk_norm=True,
        final_logit_softcap=_real(hf, "final_logit_softcapping", where, none_is=0.0),
        attn_logit_softcap=0.0,  # see IGNORED_BY_TRANSFORMERS
        query_pre_attn_scalar=0.0 if qpas == head_dim else qpas,
        tie_embeddings=bool(_field(hf, "tie_word_embeddings")), norm_eps=_real(hf, "rms_norm_eps", where))


def with_model(base: ModelConfig, imported: ModelConfig) -> ModelConfig:
    """The imported architecture, keeping `base`'s choices of how to run it (remat, dtypes, attention kernel)."""
    return replace(imported, remat=base.remat, param_dtype=base.param_dtype, compute_dtype=base.compute_dtype,
                   attention=base.attention)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found ({what})") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable as JSON ({what}): {e}") from None


def check_tokenizer(path: Path, hf_config: Mapping[str, Any], vocab_size: int) -> None:
    """The checkpoint's tokenizer.json as keel will use it: <pad>, <bos> and <eos> present, at the ids config.json
    gives (keel finds them by name; a tokenizer naming them otherwise would get new ids the model never
    learned), and no more tokens than the embedding has rows."""
    from tokenizers import Tokenizer

    from keel.data.tokenizer import SPECIAL_TOKENS

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ConfigError(f"{path}: not a valid tokenizer.json ({e})") from None
    text = hf_config.get("text_config", hf_config) if hf_config.get("model_type") == "gemma3" else hf_config
    for token, key in zip(SPECIAL_TOKENS, ("pad_token_id", "bos_token_id", "eos_token_id"), strict=True):
        have, want = tok.token_to_id(token), text.get(key, HF_DEFAULTS[key])
        want = want[0] if isinstance(want, list) and want else want
        if have is None:
            raise ConfigError(f"{path}: has no {token} token; keel marks documents with {', '.join(SPECIAL_TOKENS)}")
        if want is not None and have != want:
            raise ConfigError(f"{path}: {token} is id {have}, but config.json's {key} is {want}")
    if tok.get_vocab_size() > vocab_size:
        raise ConfigError(f"{path} has {tok.get_vocab_size()} tokens, more than the model's vocab_size {vocab_size}")
