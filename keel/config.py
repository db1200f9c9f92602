"""Typed, frozen run configuration.

A run is described by one `Config`: dataclass defaults (which are the tiny CPU model), then a YAML preset,
then `key.sub=value` overrides. Every layer is checked before any work starts: an unknown key, a wrong type,
a value outside its `Literal` set or an inconsistent combination raises `ConfigError` naming the key.

Each field is documented by the string right after it; `describe_fields` reads those strings, and
`docs/config.md`'s key reference is generated from them (`tests/test_docs.py` keeps the two equal).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import json
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from keel.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"

# The allowed values of the choice fields. Each list of names is written once, here; the registries that act
# on them (`REMAT_POLICIES`, `OPTIMIZERS`, Muon's `STRATEGIES` and `SCALINGS`) are checked against these at
# import by `check_registry`.
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
AttentionImpl = Literal["xla", "pallas", "cudnn", "auto"]
ParamDtype = Literal["float32", "bfloat16"]
ComputeDtype = Literal["auto", "float32", "bfloat16"]
OptimizerName = Literal["adamw", "muon"]
MuonScaling = Literal["adamw_rms", "shape"]
MuonStrategy = Literal["layer_sharded", "gathered"]
SpikePolicy = Literal["off", "warn", "skip_update", "rewind"]


def check_registry(registry_name: str, registry: Mapping[str, Any], names: Any) -> None:
    """Raise at import when a registry's keys and the `Literal` type that names them differ."""
    allowed = typing.get_args(names)
    missing = [n for n in allowed if n not in registry]
    extra = [k for k in registry if k not in allowed]
    if missing or extra:
        raise TypeError(f"{registry_name} does not match its Literal{list(allowed)}: "
                        f"missing {missing}, not in the Literal {extra}")


@dataclass(frozen=True)
class YarnConfig:
    factor: float = 1.0
    """YaRN context extension of the global layers' RoPE (arXiv 2309.00071, as `transformers` computes it):
    positions reach `factor` x `original_max_position_embeddings`; 1: off (plain RoPE)."""
    original_max_position_embeddings: int = 0
    """The context length the model was pretrained at (Rnj-1: 8192); required when `factor` > 1."""
    beta_fast: float = 32.0
    """Dims that rotate more than `beta_fast` times over the original context keep their frequency
    (extrapolation)."""
    beta_slow: float = 1.0
    """Dims that rotate fewer than `beta_slow` times are divided by `factor` (interpolation); the ones between
    are blended by a linear ramp."""
    attention_factor: float = 0.0
    """RoPE's cos and sin are multiplied by this (so attention scores by its square); 0: the paper's
    0.1 ln(factor) + 1."""
    truncate: bool = True
    """Round the ramp's ends to whole dims (floor, ceil), as `transformers` does by default."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    """Token ids the embedding covers; a trained tokenizer gets this many entries."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Transformer blocks, stacked on the `layers` axis."""
    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int = 2
    """Key/value heads, shared by groups of query heads (grouped-query attention); divides `n_heads`."""
    head_dim: int = 64
    """Width of one attention head; even (RoPE rotates pairs)."""
    mlp_dim: int = 768
    """Hidden width of the GeGLU MLP."""
    rope_theta: float = 10_000.0
    """RoPE base frequency (of the global layers when `rope_local_theta` is set)."""
    rope_local_theta: float = 0.0
    """RoPE base frequency of the local (sliding-window) layers; 0: `rope_theta`. Gemma-3: 10000 local, with
    `rope_theta` 1000000 global."""
    yarn: YarnConfig = field(default_factory=YarnConfig)
    """YaRN scaling of the global layers' RoPE (see the `model.yarn.*` keys)."""
    sliding_window: int = 0
    """Gemma-3 interleaves local and global layers: with `sliding_window` > 0 the local layers see only the
    last `sliding_window` tokens; 0: every layer is global."""
    global_every: int = 1
    """With a sliding window, every `global_every`-th layer (1-based) is global."""
    qk_norm: bool = True
    """RMSNorm on queries and keys before RoPE."""
    final_logit_softcap: float = 0.0
    """Logits become `c * tanh(logits / c)` with this `c`; 0: no cap."""
    attn_logit_softcap: float = 0.0
    """Attention scores (after scaling) become `c * tanh(scores / c)` with this `c`; 0: no cap (Gemma-2: 50)."""
    query_pre_attn_scalar: float = 0.0
    """Attention scores are scaled by `query_pre_attn_scalar ** -0.5`; 0: `head_dim` (the usual
    `head_dim ** -0.5`). Gemma-3 27B: d_model / n_heads = 168 with head_dim 128."""
    attention: AttentionImpl = "xla"
    """Attention implementation: `xla` (the pure-JAX reference, keel/kernels/reference.py), `pallas` (keel's
    flash kernels: Triton on GPUs, keel/kernels/flash.py, Mosaic on TPUs, flash_tpu.py; Pallas interpret mode
    on CPU, slow, for tests), `cudnn` (`jax.nn.dot_product_attention` on cuDNN with the document and window
    mask as an explicit L x L mask; NVIDIA GPUs; no attention softcap), `auto` (the fastest of those that run
    correctly here, measured once per device kind and shape and cached: keel/kernels/autotune.py; `xla` on
    CPU)."""
    tie_embeddings: bool = True
    """The output matrix is the transposed input embedding; false adds a separate `unembed` matrix."""
    norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    remat: RematPolicy = "none"
    """Rematerialisation policy of a layer in the backward pass: `none`, `full` (save nothing), `dots`, or
    `dots_no_batch` (save matmul results without batch dims)."""
    param_dtype: ParamDtype = "float32"
    """Storage type of the parameters (and so of the optimizer state)."""
    compute_dtype: ComputeDtype = "auto"
    """Type of the layer computations; logits and softmax stay float32. `auto`: bfloat16 on accelerators,
    float32 on CPU."""


@dataclass(frozen=True)
class SourceConfig:
    name: str = ""
    """Unique name of the source (in logs, held-out losses and `mixture_schedule`)."""
    path: str = ""
    """A token store written by `keel data build` (a directory with manifest.json)."""
    weight: float = 1.0
    """Share of the batch rows drawn from this source (weights are normalised)."""
    max_epochs: float = 0.0
    """Stop with a clear error before a batch would start this source's epoch number max_epochs + 1;
    0: no limit."""


@dataclass(frozen=True)
class MixtureChange:
    step: int = 0
    """From this step on the sources have the weights below."""
    weights: dict[str, float] = field(default_factory=dict)
    """Source name -> weight; unnamed sources get 0."""


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "stdlib"
    """Without `sources`: one source built by `keel data build` from this corpus: `stdlib` (the running
    interpreter's standard library sources) or globs of .txt/.jsonl(.gz/.zst)/.parquet files."""
    tokenizer: str = ""
    """Path to a HF tokenizer.json; empty: train a byte-level BPE of `model.vocab_size` on the corpus."""
    text_field: str = "text"
    """The field (JSONL) or column (Parquet) that holds a document's text."""
    seq_len: int = 128
    """Tokens per training sequence (documents are packed into sequences)."""
    heldout_fraction: float = 0.02
    """Fraction of the corpus's documents kept out of training for the held-out loss."""
    cache_dir: str = ""
    """Where the store built from `corpus` is cached, under a key of its content (files, sizes, mtimes,
    tokenizer, settings), so that runs on the same corpus share it, with the records of which store files were
    verified against their manifest (`verified/`); empty: `<run_dir>/data`."""
    sources: tuple[SourceConfig, ...] = ()
    """A mixture of prebuilt stores (each with a held-out split); replaces `corpus`."""
    mixture_schedule: tuple[MixtureChange, ...] = ()
    """Changes of the source weights at given steps (steps increasing)."""
    skip_steps: tuple[str, ...] = ()
    """Steps not trained on, e.g. ["1200-1250", 1300]: their batches are skipped, all other batches
    unchanged."""
    seed: int = 0
    """Seed of the data order (which sample lands in which batch)."""
    prefetch: int = 4
    """Host batches prepared ahead of the train step by a background thread."""


@dataclass(frozen=True)
class OptimConfig:
    name: OptimizerName = "muon"
    """`muon` (Muon for each layer's hidden matrices, AdamW for the rest: embeddings, norms), or `adamw` for
    everything. Muon is the default: on the default run it ends 0.08 nats lower (docs/benchmarks.md)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.0
    """The decay ends at `min_lr_ratio * lr`."""
    warmup_steps: int = 25
    """Linear warmup from 0 to `lr`."""
    decay_fraction: float = 0.3
    """Warmup-stable-decay: the last `decay_fraction` of the steps decay linearly to `min_lr_ratio * lr`."""
    b1: float = 0.9
    """AdamW first-moment decay."""
    b2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (times the learning rate) of the matrices; vectors are not decayed."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0: no clipping."""
    muon_beta: float = 0.95
    """Muon momentum (name=muon; the rest of the parameters get AdamW with the keys above)."""
    muon_nesterov: bool = True
    """Nesterov form of the Muon momentum."""
    muon_ns_steps: int = 5
    """Newton–Schulz iterations per update."""
    muon_ns_coeffs: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    """Coefficients (a, b, c) of the quintic Newton–Schulz iteration."""
    muon_scaling: MuonScaling = "adamw_rms"
    """`adamw_rms`: 0.2 * sqrt(max(in, out)), so `lr` and `weight_decay` carry over from AdamW;
    `shape`: sqrt(max(1, out / in)), which wants a larger lr (~0.02)."""
    muon_strategy: MuonStrategy = "layer_sharded"
    """`layer_sharded`: each device orthogonalises whole matrices of some layers; `gathered`: every device
    runs every layer (the reference)."""


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    """Devices on the `data` axis (batch split, parameters replicated); -1: all remaining devices."""
    fsdp: int = 1
    """Devices on the `fsdp` axis (batch and parameters split); -1: all remaining devices."""
    tensor: int = 1
    """Devices on the `tensor` axis (heads, MLP and vocab split); -1: all remaining devices."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    """Length of the run; the learning-rate schedule spans it."""
    batch_size: int = 16
    """Sequences per step (global, over all hosts)."""
    seed: int = 0
    """Seed of the parameter initialisation."""
    log_every: int = 10
    """Steps between metric lines."""
    eval_every: int = 100
    """Steps between held-out evaluations (and one at the end)."""
    eval_batches: int = 4
    """Batches per held-out evaluation, per source."""
    stop_at: int = 0
    """Stop cleanly (with a checkpoint) after this step although the schedule runs to `steps`: a time slice
    on a preemptible allocation. 0: run to the end."""
    sample_tokens: int = 64
    """Tokens sampled from `sample_prompt` at the end of the run (temperature 0.7, top-p 0.95, KV-cached decode;
    shown in the summary); 0: no sample."""
    sample_prompt: str = "class Foo"
    """Prompt of that sample. No trailing space: byte-level BPE attaches spaces to the following word."""
    max_restarts: int = 3
    """`keel train` trains in a child process and restarts it, from the latest good checkpoint, after a crash,
    a hang or a non-finite loss, at most this many times (docs/goodput.md). 0: train in the `keel train`
    process itself, without a supervisor."""
    restart_backoff_s: float = 1.0
    """Wait before a restart; doubled for each further restart in a row whose process trained no step (at most
    60 s)."""
    hang_factor: float = 20.0
    """Hang watchdog: a hang is no step completing within max(`hang_factor` x the median step time,
    `hang_floor_s`); keel then writes every thread's stack to the run directory and exits (code 6)."""
    hang_floor_s: float = 300.0
    """The watchdog's shortest timeout, in seconds; it also bounds evaluation and checkpoint waits. 0: no
    watchdog."""
    compile_cache: str = ""
    """JAX's persistent compilation cache, so a restart does not recompile: a directory, "" for
    `run_dir/compile_cache`, or "off". A cache the process already has configured is left as it is."""
    sdc_every: int = 0
    """Every this many steps, recompute the step's loss and gradients twice, on the mesh's devices and on a
    permutation of them, and compare them bitwise: a mismatch is silent data corruption (an `sdc` event, exit
    7: run `keel burnin`). 0: off."""


@dataclass(frozen=True)
class SpikeConfig:
    policy: SpikePolicy = "warn"
    """What a loss spike does: "warn" records a `spike` event; "skip_update" also leaves the step's update
    unapplied (the step counter moves on); "rewind" restores the checkpoint before the spike, adds the
    offending steps to the run's skip list (run_dir/skip_decisions.jsonl) and continues; "off": no detector."""
    window: int = 128
    """Steps of loss and gradient-norm history the baseline is computed over (their median and MAD)."""
    threshold: float = 6.0
    """A spike: the loss or the gradient norm above the window's median by more than this many robust
    standard deviations (1.4826 x MAD) and by more than its minimum rise below. A non-finite loss is always one."""
    loss_min_rise: float = 0.05
    """The least rise of the loss above the window's median that counts, as a fraction of the median (a
    steady late-training loss has a tiny MAD)."""
    grad_norm_min_rise: float = 1.0
    """The least rise of the gradient norm above the window's median that counts, as a fraction of the median
    (gradient norms are heavy-tailed: 1.0 means at least twice the median)."""
    min_history: int = 32
    """Steps of history before the detector judges anything (early training moves too fast for a baseline)."""
    max_consecutive: int = 8
    """Under "skip_update": this many spikes in a row stop the run (exit 8): the baseline has moved, or the
    data is bad over a range; "rewind" is the tool for that."""
    rewind_skip: int = 1
    """Under "rewind": steps skipped after the rewind, ending at the spike's step (never before the restored
    checkpoint)."""
    max_rewinds: int = 3
    """Under "rewind": rewinds one process makes before it stops (exit 8)."""


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    """Steps between checkpoints (and one at the end or at a stop)."""
    keep: int = 3
    """Checkpoints kept; older ones are deleted."""
    async_save: bool = True
    """Write checkpoints in the background while training continues."""


@dataclass(frozen=True)
class Config:
    run_dir: str = "runs/tiny"
    """Where everything of the run lives: config.yaml, checkpoints, metrics, events."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)


# Keys that may differ when a run resumes: they change how the run is observed, not what it computes.
# (data.skip_steps is checked separately: only the part of it before the checkpoint's step must agree.)
RESUMABLE_KEYS = frozenset({
    "run_dir", "data.cache_dir", "data.skip_steps", "data.prefetch", "train.log_every", "train.stop_at",
    "train.sample_tokens", "train.sample_prompt", "checkpoint.every", "checkpoint.keep", "checkpoint.async_save",
    "train.max_restarts", "train.restart_backoff_s", "train.hang_factor", "train.hang_floor_s", "train.compile_cache",
    "train.sdc_every", "spike.policy", "spike.threshold", "spike.loss_min_rise", "spike.grad_norm_min_rise",
    "spike.min_history", "spike.max_consecutive", "spike.rewind_skip", "spike.max_rewinds",
})


@dataclass(frozen=True)
class Bounds:
    """The values a float key allows. Every float key must also be finite: nan or inf in a config can only
    fail later (or, worse, train on quietly), so `validate` refuses them before any work starts."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def admits(self, x: float) -> bool:
        return (math.isfinite(x) and (x > self.low if self.low_open else x >= self.low)
                and (x < self.high if self.high_open else x <= self.high))

    def describe(self, value: float) -> str:
        """What `value` must be instead: `> 0`, `in [0, 1)`, `a finite number >= 0`."""
        if math.isinf(self.high):
            if math.isinf(self.low):
                return "a finite number"
            rule = f"{'>' if self.low_open else '>='} {self.low:g}"
            return rule if math.isfinite(value) else f"a finite number {rule}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE, NON_NEGATIVE = Bounds(0.0, low_open=True), Bounds(0.0)
FRACTION, DECAY = Bounds(0.0, 1.0), Bounds(0.0, 1.0, high_open=True)

# The range of each float key (as `describe_fields` names it: items of a list as `[]`, the values of a mapping
# under the mapping's key). A float key not listed must still be finite; tests/test_config.py checks that every
# key listed here is a float key.
FLOAT_BOUNDS: dict[str, Bounds] = {
    "model.rope_theta": POSITIVE, "model.final_logit_softcap": NON_NEGATIVE, "model.norm_eps": POSITIVE,
    "model.rope_local_theta": NON_NEGATIVE, "model.attn_logit_softcap": NON_NEGATIVE,
    "model.query_pre_attn_scalar": NON_NEGATIVE, "model.yarn.factor": Bounds(1.0),
    "model.yarn.beta_fast": POSITIVE, "model.yarn.beta_slow": POSITIVE, "model.yarn.attention_factor": NON_NEGATIVE,
    "data.heldout_fraction": Bounds(0.0, 1.0, low_open=True, high_open=True),
    "data.sources[].weight": NON_NEGATIVE, "data.sources[].max_epochs": NON_NEGATIVE,
    "data.mixture_schedule[].weights": NON_NEGATIVE,
    "optim.lr": NON_NEGATIVE, "optim.min_lr_ratio": FRACTION, "optim.decay_fraction": FRACTION,
    "optim.b1": DECAY, "optim.b2": DECAY, "optim.eps": POSITIVE, "optim.weight_decay": NON_NEGATIVE,
    "optim.grad_clip": NON_NEGATIVE, "optim.muon_beta": DECAY,
    "train.restart_backoff_s": NON_NEGATIVE, "train.hang_factor": POSITIVE, "train.hang_floor_s": NON_NEGATIVE,
    "spike.threshold": POSITIVE, "spike.loss_min_rise": POSITIVE, "spike.grad_norm_min_rise": POSITIVE,
}


# ---------------------------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


class RawValue(str):
    """An override's text, read once the target field's type is known: as-is for str fields, else as YAML."""


def _coerce(key: str, value: Any, tp: Any) -> Any:
    literal = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
    text_like = tp is str or (literal is not None and all(isinstance(v, str) for v in literal))
    if isinstance(value, RawValue):
        if text_like:
            value = str(value)
        else:
            value = _load_yaml(value, f"override {key}={value}", one_line=True) if value.strip() else ""
    if literal is not None:
        if value not in literal:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, literal))}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: an integer of {len(str(value))} digits must be a finite number") from None
    if tp is str and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if typing.get_origin(tp) is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(f"{key}", k, kt): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if value in ("", None):
                value = []
            if not isinstance(value, list | tuple):
                value = [value]
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, args, strict=True)))
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        where = prefix or "config"
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s} in {where}; allowed keys: {', '.join(sorted(names))}"
        )
    return cls(**{name: _coerce(f"{prefix}{name}", value, hints[name]) for name, value in data.items()})


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
    data = load_yaml_file(path) or {}
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


def load_saved_config(path: str | Path) -> Config:
    """The config a run directory recorded (its `config.yaml`), validated; any fault is a ConfigError naming
    the file."""
    data = load_yaml_file(path)
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------- YAML


class _ConfigLoader(yaml.SafeLoader):
    """`yaml.safe_load` (no Python tags: configs are data, invariant 7 of docs/design.md) that also refuses a
    key given twice in one mapping, which YAML would resolve silently by keeping the last."""


def _construct_unique_mapping(loader: _ConfigLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        with contextlib.suppress(TypeError):  # an unhashable key: construct_mapping reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _yaml_message(e: yaml.YAMLError, text: str, where: str, one_line: bool) -> str:
    """One line: `where:LINE:COLUMN: problem (context)`, 1-based as editors count; for an override (one line)
    `where (column N of the value): problem`."""

    def at(line: int, column: int) -> str:
        return f" (column {column + 1} of the value)" if one_line else f":{line + 1}:{column + 1}"

    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow, e.g. a control character
        line = text.count("\n", 0, e.position)
        column = e.position - (text.rfind("\n", 0, e.position) + 1)
        return f"{where}{at(line, column)}: character {chr(e.character)!r} is not allowed in YAML"
    if not isinstance(e, yaml.MarkedYAMLError):
        return f"{where}: {' '.join(str(e).split())}"
    problem = e.problem or e.context or "invalid YAML"
    tag = re.search(r"constructor for the tag '([^']*)'", problem)
    if tag:
        problem = (f"the tag {tag.group(1).replace('tag:yaml.org,2002:', '!!')} is not allowed "
                   "(config files hold plain YAML data: no Python objects or other tags)")
    mark = e.problem_mark or e.context_mark
    out = f"{where}{at(mark.line, mark.column) if mark is not None else ''}: {problem}"
    if e.problem and e.context and e.context_mark is not None and e.context_mark is not mark:
        c = e.context_mark
        out += f" ({e.context} at {'column ' if one_line else f'line {c.line + 1}, column '}{c.column + 1})"
    return out


def _load_yaml(text: str, where: str, one_line: bool = False) -> Any:
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_message(e, text, where, one_line)) from None


def load_yaml_file(path: str | Path) -> Any:
    """A YAML file of config data. A syntax error, a Python (or other unknown) tag, a duplicate key, an
    unreadable or non-UTF-8 file is a ConfigError naming `path:LINE:COLUMN`, never a traceback."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    return _load_yaml(text, str(path))


# ---------------------------------------------------------------------------------------------- validation


def leaf_values(node: Any, key: str = "", pattern: str = "") -> typing.Iterator[tuple[str, str, Any]]:
    """Every scalar of a config as (key, pattern, value): `data.sources[1].weight`, `data.sources[].weight`.
    A mapping's values share its pattern (`data.mixture_schedule[].weights`), as in `describe_fields`."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            dot = "." if key else ""
            yield from leaf_values(getattr(node, f.name), f"{key}{dot}{f.name}", f"{pattern}{dot}{f.name}")
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from leaf_values(v, f"{key}.{k}", pattern)
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            yield from leaf_values(v, f"{key}[{i}]", f"{pattern}[]")
    else:
        yield key, pattern, node


def _validate_numbers(cfg: Config) -> None:
    for key, pattern, value in leaf_values(cfg):
        if isinstance(value, float):
            bounds = FLOAT_BOUNDS.get(pattern, Bounds())
            if not bounds.admits(value):
                raise ConfigError(f"{key}={value} must be {bounds.describe(value)}")
        elif isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ConfigError(f"{key}={value} must fit in 64 bits")


def validate(cfg: Config) -> Config:
    m, d, o, t, c = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.checkpoint
    _validate_numbers(cfg)  # first: nan passes every comparison below
    if not 0 <= t.seed < 2**32:  # jax.random.key keeps 32 bits: a larger seed would alias a smaller one
        raise ConfigError(f"train.seed={t.seed} must be in [0, 2**32)")
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads, "model.head_dim": m.head_dim,
        "model.mlp_dim": m.mlp_dim, "model.global_every": m.global_every, "data.seq_len": d.seq_len,
        "train.steps": t.steps, "train.batch_size": t.batch_size, "train.log_every": t.log_every,
        "train.eval_every": t.eval_every, "train.eval_batches": t.eval_batches, "optim.muon_ns_steps": o.muon_ns_steps,
        "checkpoint.every": c.every, "checkpoint.keep": c.keep, "spike.window": cfg.spike.window,
        "spike.max_consecutive": cfg.spike.max_consecutive, "spike.rewind_skip": cfg.spike.rewind_skip,
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
    if m.yarn.factor > 1 and m.yarn.original_max_position_embeddings <= 0:
        raise ConfigError(f"model.yarn.factor={m.yarn.factor} needs model.yarn.original_max_position_embeddings > 0 "
                          "(the pretraining context length)")
    if m.yarn.original_max_position_embeddings < 0:
        raise ConfigError(f"model.yarn.original_max_position_embeddings={m.yarn.original_max_position_embeddings} "
                          "must be >= 0")
    if m.attention == "cudnn" and m.compute_dtype == "float32":
        raise ConfigError("model.attention=cudnn needs bfloat16 compute (cuDNN's attention takes fp16/bf16): set "
                          "model.compute_dtype=bfloat16 or auto, or use pallas or xla")
    if m.attention == "cudnn" and m.attn_logit_softcap > 0:
        raise ConfigError(f"model.attention=cudnn cannot apply model.attn_logit_softcap={m.attn_logit_softcap:g} "
                          f"(cuDNN's attention has no softcap): use pallas or xla")
    if m.yarn.beta_slow >= m.yarn.beta_fast:
        raise ConfigError(f"model.yarn.beta_slow={m.yarn.beta_slow} must be < model.yarn.beta_fast={m.yarn.beta_fast}")
    for key, value in {"model.sliding_window": m.sliding_window, "train.stop_at": t.stop_at,
                       "optim.warmup_steps": o.warmup_steps, "train.sample_tokens": t.sample_tokens,
                       "train.max_restarts": t.max_restarts, "train.sdc_every": t.sdc_every,
                       "spike.min_history": cfg.spike.min_history, "spike.max_rewinds": cfg.spike.max_rewinds,
                       }.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if o.warmup_steps + int(o.decay_fraction * t.steps) > t.steps:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} plus the decay phase "
            f"(optim.decay_fraction={o.decay_fraction} of train.steps={t.steps}) exceeds train.steps"
        )
    _validate_data(d)
    if not 3 <= cfg.spike.min_history <= cfg.spike.window:
        raise ConfigError(f"spike.min_history={cfg.spike.min_history} must be in [3, spike.window="
                          f"{cfg.spike.window}]")
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
        if sum(ch.weights.values()) <= 0:
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



# ---------------------------------------------------------------------------------------------- documentation


@dataclass(frozen=True)
class FieldDoc:
    key: str
    """As written in an override (`model.remat`); items of a list field as `data.sources[].name`."""
    type: str
    default: str
    doc: str


def _field_docstrings(cls: type) -> dict[str, str]:
    """The string literal right after each field of a dataclass in this module (the attribute-docstring
    convention), as one line."""
    source = Path(__file__).read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    out = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            out[stmt.target.id] = " ".join(after.value.value.split())
    return out


def _list_item_class(tp: Any) -> type | None:
    """SourceConfig for tuple[SourceConfig, ...]; None for other types."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _describe_type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if _list_item_class(tp) is not None:
        return "list of mappings"
    if origin is tuple:
        return f"list of {_type_name(args[0])}" if args[1:] == (Ellipsis,) else f"[{', '.join(map(_type_name, args))}]"
    if origin is dict:
        return f"mapping {_type_name(args[0])} → {_type_name(args[1])}"
    return _type_name(tp)


def _describe_default(value: Any) -> str:
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    plain = to_dict(value) if dataclasses.is_dataclass(value) else value
    return f"`{json.dumps(list(plain) if isinstance(plain, tuple) else plain)}`"


def describe_fields(cls: type = Config, prefix: str = "") -> list[FieldDoc]:
    """Every key of `cls`, depth first in declaration order, with its type, default and docstring."""
    hints = typing.get_type_hints(cls)
    docs = _field_docstrings(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += describe_fields(tp, f"{key}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(FieldDoc(key, _describe_type(tp), _describe_default(default), docs.get(f.name, "")))
        item = _list_item_class(tp)
        if item is not None:
            out += describe_fields(item, f"{key}[].")
    return out


def _escape_pipes(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """The key reference of docs/config.md: one table per section, generated from the field docstrings."""
    sections: dict[str, list[FieldDoc]] = {}
    for d in describe_fields():
        sections.setdefault(d.key.split(".")[0] if "." in d.key else "", []).append(d)
    lines = []
    for section, docs in sections.items():
        lines += [f"### `{section}`" if section else "### Top level", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{d.key}` | {d.type} | {d.default} | {_escape_pipes(d.doc)} |" for d in docs]
        lines.append("")
    return "\n".join(lines)
