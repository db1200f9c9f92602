"""A trained run, opened for inference: its saved config, a checkpoint's parameters and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from keel.config import Config, DataConfig, load_saved_config
from keel.data.tokenizer import load_tokenizer, special_ids
from keel.errors import ConfigError


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: Config
    params: Any
    step: int
    tokenizer: Tokenizer
    pad_id: int
    bos_id: int
    eos_id: int

    def encode_prompt(self, text: str) -> list[int]:
        """<bos> and the text's tokens, as the run's documents begin (no trailing <eos>)."""
        return [self.bos_id] + self.tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def label(self) -> str:
        """What the parameters are, for a report: "step N" of a run, or "Hugging Face checkpoint"."""
        return "Hugging Face checkpoint" if self.step < 0 else f"step {self.step}"


def open_run(run_dir: str | Path, step: int | None = None) -> TrainedRun:
    """The run's config.yaml, the parameters of its latest (or `step`'s) checkpoint, and its tokenizer.json; or a
    Hugging Face Gemma-3 directory's config.json, safetensors and tokenizer.json (step -1)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists() and (run_dir / "config.json").exists():
        if step is not None:
            raise ConfigError(f"{run_dir} is a Hugging Face checkpoint: it has no steps (--step)")
        return open_hf(run_dir)
    from keel.train.checkpoint import load_params  # loads orbax: only once a run is really opened

    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} is neither a keel run directory (config.yaml) nor a Hugging Face model "
                          f"directory (config.json)")
    cfg = load_saved_config(run_dir / "config.yaml")
    tok = load_tokenizer(run_dir / "tokenizer.json", what=f"the tokenizer of {run_dir}")
    pad, bos, eos = special_ids(tok)
    params, step = load_params(run_dir, cfg, step)
    return TrainedRun(run_dir, cfg, params, step, tok, pad, bos, eos)


def open_hf(hf_dir: Path) -> TrainedRun:
    """A Hugging Face gemma3_text directory as a run: the model from config.json, float32 parameters from its
    safetensors, its tokenizer.json; data.seq_len (the window `keel eval` scores in) is its context, at most 2048."""
    from keel.interop import files

    hf_config, model = files.read_model(hf_dir)
    tok, params = files.read_weights(hf_dir, hf_config, model, "float32")
    context = int(hf_config.get("max_position_embeddings") or 2048)
    cfg = Config(run_dir=str(hf_dir), model=model, data=DataConfig(seq_len=min(context, 2048)))
    pad, bos, eos = special_ids(tok)
    return TrainedRun(hf_dir, cfg, params, -1, tok, pad, bos, eos)
