"""Short samples for people to read: the end-of-run sample and greedy continuations, on the KV-cache decoder
(keel/model/generate.py), and the test of whether a sample reads like Python (`sample_quality`)."""

from __future__ import annotations

import io
import re
import tokenize
from dataclasses import dataclass

import jax

from keel.config import ModelConfig
from keel.model.generate import Sampling, generate
from keel.model.transformer import Params

# The end-of-run sample's settings. Greedy decoding of a small model falls into a loop within a few dozen
# tokens (`class FooSubSubSub...`); sampling at a moderate temperature from the nucleus of the distribution
# does not, and stays close enough to the mode to read like code (docs/models.md has the measurements).
READABLE = Sampling(temperature=0.7, top_p=0.95)


def readable_sample(params: Params, prompt_ids: list[int], n_new: int, cfg: ModelConfig,
                    stop_id: int | None = None, out_sharding: jax.sharding.Sharding | None = None,
                    seed: int = 0) -> list[int]:
    """The prompt's continuation of up to `n_new` tokens under `READABLE`, cut at `stop_id`; reproducible with
    `seed`. Same arguments as `greedy_sample` (on a multi-host mesh pass a replicated `out_sharding`)."""
    stop = -1 if stop_id is None else stop_id
    return generate(params, [prompt_ids], cfg, n_new, READABLE, seed, stop, out_sharding=out_sharding).tokens[0]


def greedy_sample(params: Params, prompt_ids: list[int], n_new: int, cfg: ModelConfig,
                  stop_id: int | None = None, out_sharding: jax.sharding.Sharding | None = None) -> list[int]:
    """The prompt's greedy continuation of `n_new` tokens, cut at `stop_id`. On a multi-host mesh pass a
    replicated `out_sharding`, so that every process can read the result."""
    stop = -1 if stop_id is None else stop_id
    return generate(params, [prompt_ids], cfg, n_new, Sampling(temperature=0.0), 0, stop,
                    out_sharding=out_sharding).tokens[0]


@dataclass(frozen=True)
class SampleQuality:
    """What makes a sample read like Python, measured.

    longest_loop: the most times any piece of 1 to 60 characters with a letter in it repeats back to back
    (`SubSubSubSub` is 4; a rule of `-----` or `0x0000` is no loop).
    tokenizable: the fraction of the non-empty lines that Python's `tokenize` reads without an error token
    (a line left inside an open bracket or string counts as read)."""

    longest_loop: int
    tokenizable: float

    def reads_like_python(self, max_loop: int = 3, min_tokenizable: float = 0.8) -> bool:
        return self.longest_loop <= max_loop and self.tokenizable >= min_tokenizable


_LOOP = re.compile(r"(.{1,60}?)\1+", re.DOTALL)


def longest_loop(text: str) -> int:
    """The most back-to-back repeats of any piece of 1-60 characters that holds a letter."""
    best = 1
    for start in range(len(text)):
        m = _LOOP.match(text, start)
        if m and re.search(r"[A-Za-z]", m.group(1)):
            best = max(best, len(m.group(0)) // len(m.group(1)))
    return best


def _line_tokenizes(line: str) -> bool:
    try:
        for t in tokenize.generate_tokens(io.StringIO(line + "\n").readline):
            if t.type == tokenize.ERRORTOKEN and t.string.strip():
                return False
    except tokenize.TokenError:  # EOF inside a bracket or a string: the line goes on in the next one
        return True
    return True


def sample_quality(text: str) -> SampleQuality:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    ok = sum(_line_tokenizes(line) for line in lines)
    return SampleQuality(longest_loop(text), ok / len(lines) if lines else 1.0)
