"""The files of a Hugging Face model directory: safetensors (one file, or shards with an index), the tokenizer
files and generation_config.json. Safetensors only: nothing here reads or writes a pickle."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer, processors

from keel.config import ModelConfig
from keel.errors import ConfigError
from keel.interop import hf
from keel.io import atomic_write

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (HF's convention: GB is 10^9, GiB 2^30); a bare number is bytes."""
    m = _SIZE.match(text)
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]) if m else 0
    if size <= 0:
        raise ConfigError(f"--max-shard-size {text!r}: expected a positive size such as 5GB, 500MB or 2GiB")
    return size


def shard_plan(tensors: dict[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most `max_bytes` each, in order (a tensor larger than the limit
    gets a shard of its own, as transformers does)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += t.nbytes
    return shards


def write_safetensors(out: Path, tensors: dict[str, np.ndarray], max_bytes: int) -> list[str]:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json` when
    the tensors exceed `max_bytes`. Returns the file names written."""
    shards = shard_plan(tensors, max_bytes)
    metadata = {"format": "pt"}  # transformers reads safetensors files whose metadata says "pt"
    if len(shards) == 1:
        save_file(tensors, str(out / SINGLE), metadata=metadata)
        return [SINGLE]
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(out / name), metadata=metadata)
        files.append(name)
        weight_map |= dict.fromkeys(names, name)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    atomic_write(out / INDEX, json.dumps(index, indent=2) + "\n")
    return [*files, INDEX]


@contextmanager
def open_safetensors(hf_dir: Path) -> Iterator[tuple[Callable[[str], np.ndarray], set[str]]]:
    """(get(name) -> numpy array, names) over the directory's safetensors, sharded or not."""
    index_path, single = hf_dir / INDEX, hf_dir / SINGLE
    if index_path.exists():
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{index_path}: not a safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ConfigError(f"{index_path}: weight_map must map tensor names to file names")
        outside = sorted({f for f in weight_map.values() if Path(f).name != f or f in ("", ".", "..")})
        if outside:
            raise ConfigError(f"{index_path}: shard names must be files of {hf_dir} itself, not {outside[:3]}")
        files = sorted(set(weight_map.values()))
    elif single.exists():
        weight_map, files = {}, [SINGLE]
    else:
        pickles = [p.name for p in hf_dir.glob("*.bin")] + [p.name for p in hf_dir.glob("*.pt*")]
        raise ConfigError(f"{hf_dir}: no {SINGLE} or {INDEX}" + (
            f" (only {', '.join(pickles)}: keel reads safetensors, never pickles; convert them first)"
            if pickles else ""))
    with ExitStack() as stack:
        handles = {}
        for f in files:
            try:
                handles[f] = stack.enter_context(safe_open(str(hf_dir / f), framework="numpy"))
            except Exception as e:  # safetensors raises its own error types for truncated or invalid files
                raise ConfigError(f"{hf_dir / f}: not a readable safetensors file ({e})") from None
        if not weight_map:
            weight_map = {k: f for f, h in handles.items() for k in h.keys()}  # noqa: SIM118 (not a dict)

        def get(name: str) -> np.ndarray:
            try:
                return handles[weight_map[name]].get_tensor(name)
            except Exception as e:  # safetensors' own error types: a tensor the index names but the file lacks
                raise ConfigError(f"{hf_dir / weight_map[name]}: cannot read tensor {name} ({e})") from None

        yield get, set(weight_map)


# ---------------------------------------------------------------------------------------------- tokenizer


def write_tokenizer(out: Path, tok: Tokenizer, *, pad: str, bos: str, eos: str, max_length: int) -> None:
    """tokenizer.json (with a post-processor that starts every text with <bos>, as keel's documents start),
    tokenizer_config.json and special_tokens_map.json, for `AutoTokenizer.from_pretrained`."""
    tok = Tokenizer.from_str(tok.to_str())
    bos_id = tok.token_to_id(bos)
    template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)])
    tok.post_processor = processors.Sequence([tok.post_processor, template]) if tok.post_processor else template
    atomic_write(out / "tokenizer.json", tok.to_str(pretty=True))
    special = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True,
              "add_eos_token": False, "model_max_length": max_length, "clean_up_tokenization_spaces": False}
    atomic_write(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write(out / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")


def generation_config(*, bos_id: int, pad_id: int, eos_id: int, temperature: float, top_p: float,
                      max_length: int) -> dict[str, Any]:
    """generation_config.json: keel's sampling defaults (`keel generate`), so HF's `generate` samples alike."""
    return {"bos_token_id": bos_id, "pad_token_id": pad_id, "eos_token_id": eos_id, "do_sample": temperature > 0,
            "temperature": temperature, "top_p": top_p, "top_k": 0, "max_length": max_length}


# ------------------------------------------------------------------------------------------ a checkpoint


def read_model(hf_dir: Path) -> tuple[dict[str, Any], ModelConfig]:
    """config.json of a Hugging Face directory and keel's model of it (`hf.from_hf_config`)."""
    config = hf.read_json(hf_dir / "config.json", "the model's config")
    return config, hf.from_hf_config(config, str(hf_dir / "config.json"))


def read_weights(hf_dir: Path, config: dict[str, Any], model: ModelConfig, dtype: Any
                 ) -> tuple[Tokenizer, dict[str, Any]]:
    """The directory's tokenizer (checked against config.json and the model: `hf.check_tokenizer`) and its
    weights as keel's parameter tree of `model`, in `dtype`."""
    from keel.data.tokenizer import load_tokenizer

    hf.check_tokenizer(hf_dir / "tokenizer.json", config, model.vocab_size)
    tok = load_tokenizer(hf_dir / "tokenizer.json", what=f"the tokenizer of {hf_dir}")
    with open_safetensors(hf_dir) as (get, names):
        params = hf.from_hf_tensors(get, names, model, np.dtype(dtype), str(hf_dir))
    return tok, params
