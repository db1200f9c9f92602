"""The default run itself (`keel train` with no arguments, minutes on 2 cores): its closing sample reads like
Python. Its own file, so that the test runner gives it a worker of its own while the other tests run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # a whole default run: ~4 minutes of one core
def test_the_default_runs_closing_sample_reads_like_python(tmp_path):
    """The criterion of `SampleQuality.reads_like_python` (no piece of text with a letter repeated more than 3
    times back to back; at least 80 % of the non-empty lines read by Python's `tokenize`), on the sample the run
    printed and on seven more seeds of the same sampling (docs/models.md). `python benchmarks/default_sample.py`
    shows the texts, and greedy decoding beside them, which loops."""
    from keel.evaluate.run import open_run
    from keel.model.sampling import readable_sample, sample_quality

    # as a user runs it: `keel train` in a fresh directory, one CPU device (not the session's 8 fake ones)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "keel", "train", "--no-progress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["heldout_loss"] < 4.0, summary
    printed = sample_quality(summary["sample"])
    assert printed.reads_like_python(), (printed, summary["sample"])
    run = open_run(tmp_path / "runs" / "tiny")
    prompt_text, n = run.cfg.train.sample_prompt, run.cfg.train.sample_tokens
    prompt = run.encode_prompt(prompt_text)
    for seed in range(1, 8):
        text = prompt_text + run.tokenizer.decode(readable_sample(run.params, prompt, n, run.cfg.model, run.eos_id,
                                                                  seed=seed))
        assert sample_quality(text).reads_like_python(), (seed, sample_quality(text), text)
