"""Typed, frozen run configuration.

A run is described by one `Config`: dataclass defaults (which are the tiny CPU model), then a YAML preset,
then `key.sub=value` overrides. Every layer is checked before any work starts: an unknown key, a wrong type,
a value outside its allowed set or an inconsistent combination raises `ConfigError` naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from keel.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"


def choices(*allowed: str, default: str) -> Any:
    return field(default=default, metadata={"choices": allowed})


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    mlp_dim: int = 768
    rope_theta: float = 10_000.0
    # Gemma-3 interleaves local (sliding-window) and global layers: with sliding_window > 0, every
    # `global_every`-th layer (1-based) is global and the others see only the last `sliding_window` tokens.
    sliding_window: int = 0
    global_every: int = 1
    qk_norm: bool = True
    final_logit_softcap: float = 0.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    remat: str = choices("none", "full", "dots", "dots_no_batch", default="none")
    param_dtype: str = choices("float32", "bfloat16", default="float32")
    # "auto": bfloat16 on accelerators, float32 on CPU.
    compute_dtype: str = choices("auto", "float32", "bfloat16", default="auto")


@dataclass(frozen=True)
class SourceConfig:
    name: str = ""
    # A token store written by `keel data build` (a directory with manifest.json).
    path: str = ""
    weight: float = 1.0
    # Stop with a clear error before a batch would start this source's epoch number max_epochs + 1; 0: no limit.
    max_epochs: float = 0.0


@dataclass(frozen=True)
class MixtureChange:
    # From this step on, the sources have these weights (by name; unnamed sources get 0).
    step: int = 0
    weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    # Without `sources`: one source built by `keel data build` into the run directory from this corpus:
    # "stdlib" (the running interpreter's standard library sources) or globs of .txt/.jsonl(.gz/.zst)/.parquet.
    corpus: str = "stdlib"
    # Path to a HF tokenizer.json; empty: train a byte-level BPE of model.vocab_size on the corpus.
    tokenizer: str = ""
    text_field: str = "text"
    seq_len: int = 128
    heldout_fraction: float = 0.02
    # Where the store built from `corpus` is cached, under a key of its content (files, sizes, mtimes, tokenizer,
    # settings), so runs on the same corpus share it; empty: <run_dir>/data.
    cache_dir: str = ""
    # A mixture of prebuilt stores (each with a held-out split); replaces `corpus`.
    sources: tuple[SourceConfig, ...] = ()
    mixture_schedule: tuple[MixtureChange, ...] = ()
    # Steps not trained on, e.g. ["1200-1250", 1300]: their batches are skipped, all other batches unchanged.
    skip_steps: tuple[str, ...] = ()
    seed: int = 0
    # Host batches prepared ahead of the train step by a background thread.
    prefetch: int = 4


@dataclass(frozen=True)
class OptimConfig:
    name: str = choices("adamw", "muon", default="adamw")
    lr: float = 3e-3
    min_lr_ratio: float = 0.0
    warmup_steps: int = 25
    # Warmup-stable-decay: the last `decay_fraction` of the steps decay linearly to min_lr_ratio * lr.
    decay_fraction: float = 0.3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Muon, for the hidden matrices of each layer when name=muon (the rest gets AdamW with the keys above).
    muon_beta: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_ns_coeffs: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    # "adamw_rms": 0.2 * sqrt(max(in, out)), so optim.lr and weight_decay carry over from AdamW;
    # "shape": sqrt(max(1, out / in)), which wants a larger lr (~0.02).
    muon_scaling: str = choices("adamw_rms", "shape", default="adamw_rms")
    muon_strategy: str = choices("layer_sharded", "gathered", default="layer_sharded")


@dataclass(frozen=True)
class MeshConfig:
    # Sizes of the device mesh axes; one of them may be -1 to take all remaining devices.
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    batch_size: int = 16
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    # Stop cleanly (with a checkpoint) after this step although the schedule runs to `steps`:
    # a time slice on a preemptible allocation. 0: run to the end.
    stop_at: int = 0
    sample_tokens: int = 64
    # No trailing space: byte-level BPE attaches spaces to the following word.
    sample_prompt: str = "class Foo"


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class Config:
    run_dir: str = "runs/tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# Keys that may differ when a run resumes: they change how the run is observed, not what it computes.
# (data.skip_steps is checked separately: only the part of it before the checkpoint's step must agree.)
RESUMABLE_KEYS = frozenset({
    "run_dir", "data.cache_dir", "data.skip_steps", "data.prefetch", "train.log_every", "train.stop_at",
    "train.sample_tokens", "train.sample_prompt", "checkpoint.every", "checkpoint.keep", "checkpoint.async_save",
})


# ---------------------------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


class RawValue(str):
    """An override's text, read once the target field's type is known: as-is for str fields, else as YAML."""


def _coerce(key: str, value: Any, tp: Any, meta: dict) -> Any:
    if isinstance(value, RawValue):
        value = str(value) if tp is str else yaml.safe_load(value) if value.strip() else ""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is str and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if typing.get_origin(tp) is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(f"{key}", k, kt, {}): _coerce(f"{key}.{k}", v, vt, {}) for k, v in value.items()}
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if value in ("", None):
                value = []
            if not isinstance(value, list | tuple):
                value = [value]
            return tuple(_coerce(f"{key}[{i}]", v, args[0], {}) for i, v in enumerate(value))
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, t, {}) for i, (v, t) in enumerate(zip(value, args, strict=True)))
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    allowed = meta.get("choices")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix or "config"
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s} in {where}; allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        kwargs[name] = _coerce(f"{prefix}{name}", value, tp, dict(fields[name].metadata))
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML/JSON-safe data: tuples become lists."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return [plain(v) for v in x] if isinstance(x, list | tuple) else x

    return plain(dataclasses.asdict(cfg))


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`model.d_model=512` -> {"model": {"d_model": RawValue("512")}}; see `RawValue`."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    value = RawValue(raw)
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"config {name_or_path!r} not found; presets: {', '.join(preset_names())}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at top level")
    return data


def load_config(preset: str | typing.Sequence[str] = "tiny", overrides: typing.Sequence[str] = ()) -> Config:
    """Presets (later ones override earlier ones, e.g. ["tiny", "fsdp"]), then `key=value` overrides."""
    data: dict[str, Any] = {}
    for name in [preset] if isinstance(preset, str) else preset:
        data = _merge(data, load_preset(name))
    for o in overrides:
        data = _merge(data, parse_override(o))
    return validate(_build(Config, data, ""))


def from_dict(data: dict[str, Any]) -> Config:
    return validate(_build(Config, data, ""))


def validate(cfg: Config) -> Config:
    m, d, o, t, c = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.checkpoint
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads, "model.head_dim": m.head_dim,
        "model.mlp_dim": m.mlp_dim, "model.global_every": m.global_every, "data.seq_len": d.seq_len,
        "train.steps": t.steps, "train.batch_size": t.batch_size, "train.log_every": t.log_every,
        "train.eval_every": t.eval_every, "train.eval_batches": t.eval_batches, "optim.muon_ns_steps": o.muon_ns_steps,
        "checkpoint.every": c.every, "checkpoint.keep": c.keep,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads} "
            f"(allowed n_kv_heads: {', '.join(str(k) for k in range(1, m.n_heads + 1) if m.n_heads % k == 0)})"
        )
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim={m.head_dim} must be even (RoPE rotates pairs)")
    for key, value in {"model.sliding_window": m.sliding_window, "train.stop_at": t.stop_at,
                       "optim.warmup_steps": o.warmup_steps, "train.sample_tokens": t.sample_tokens}.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    for key, value in {"model.final_logit_softcap": m.final_logit_softcap, "optim.lr": o.lr,
                       "optim.weight_decay": o.weight_decay, "optim.grad_clip": o.grad_clip}.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    for key, value in {"data.heldout_fraction": d.heldout_fraction, "optim.decay_fraction": o.decay_fraction,
                       "optim.min_lr_ratio": o.min_lr_ratio, "optim.b1": o.b1, "optim.b2": o.b2,
                       "optim.muon_beta": o.muon_beta}.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}={value} must be in [0, 1]")
    if not 0.0 < d.heldout_fraction < 1.0:
        raise ConfigError(f"data.heldout_fraction={d.heldout_fraction} must be strictly between 0 and 1")
    if o.warmup_steps + int(o.decay_fraction * t.steps) > t.steps:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} plus the decay phase "
            f"(optim.decay_fraction={o.decay_fraction} of train.steps={t.steps}) exceeds train.steps"
        )
    _validate_data(d)
    if t.stop_at > t.steps:
        raise ConfigError(f"train.stop_at={t.stop_at} must be <= train.steps={t.steps}")
    sizes = {"mesh.data": cfg.mesh.data, "mesh.fsdp": cfg.mesh.fsdp, "mesh.tensor": cfg.mesh.tensor}
    if sum(v == -1 for v in sizes.values()) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ConfigError(f"mesh sizes {sizes}: each must be >= 1, and at most one may be -1 (fill)")
    return cfg


def _validate_data(d: DataConfig) -> None:
    names = [src.name for src in d.sources]
    for i, src in enumerate(d.sources):
        if not src.name or not src.path:
            raise ConfigError(f"data.sources[{i}]: needs a name and a path (a store from keel data build)")
        if src.weight < 0 or src.max_epochs < 0:
            raise ConfigError(f"data.sources[{i}] ({src.name}): weight and max_epochs must be >= 0")
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources: names must be unique, got {names}")
    if d.sources and sum(src.weight for src in d.sources) <= 0:
        raise ConfigError("data.sources: the weights must have a positive sum")
    if d.mixture_schedule and not d.sources:
        raise ConfigError("data.mixture_schedule needs data.sources")
    last = 0
    for i, ch in enumerate(d.mixture_schedule):
        if ch.step <= last:
            raise ConfigError(f"data.mixture_schedule[{i}].step={ch.step}: steps must increase and be > 0")
        last = ch.step
        unknown = sorted(set(ch.weights) - set(names))
        if unknown:
            raise ConfigError(f"data.mixture_schedule[{i}].weights: unknown source {unknown[0]!r}; sources: {names}")
        if any(w < 0 for w in ch.weights.values()) or sum(ch.weights.values()) <= 0:
            raise ConfigError(f"data.mixture_schedule[{i}].weights must be >= 0 with a positive sum")
    from keel.train.plan import SkipList

    try:
        SkipList(d.skip_steps)
    except ValueError as e:
        raise ConfigError(f"data.skip_steps: {e}") from None
    if d.prefetch < 1:
        raise ConfigError(f"data.prefetch={d.prefetch} must be >= 1")


def fingerprint(cfg: Any) -> str:
    """A short stable hash of a config (or sub-config)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out[f"{prefix}{k}#"] = len(v)
            for i, x in enumerate(v):
                out.update(flatten(x, f"{prefix}{k}[{i}]."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_differences(saved: Config, current: Config) -> list[str]:
    """Keys whose change would make a resumed run compute something else than the saved run."""
    a, b = flatten(to_dict(saved)), flatten(to_dict(current))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in RESUMABLE_KEYS and a.get(k) != b.get(k)]


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

