"""A trained run, opened for inference: its saved config, a checkpoint's parameters and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from keel.config import Config, load_saved_config
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


def open_run(run_dir: str | Path, step: int | None = None) -> TrainedRun:
    """The run's config.yaml, the parameters of its latest (or `step`'s) checkpoint, and its tokenizer.json."""
    from keel.train.checkpoint import load_params  # loads orbax: only once a run is really opened

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} is not a keel run directory (no config.yaml)")
    cfg = load_saved_config(run_dir / "config.yaml")
    tok = load_tokenizer(run_dir / "tokenizer.json", what=f"the tokenizer of {run_dir}")
    pad, bos, eos = special_ids(tok)
    params, step = load_params(run_dir, cfg, step)
    return TrainedRun(run_dir, cfg, params, step, tok, pad, bos, eos)
