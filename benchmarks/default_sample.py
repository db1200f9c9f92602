"""Does the default run's closing sample read like Python? (run by hand: it trains the default run, minutes)

    python benchmarks/default_sample.py [--run-dir runs/tiny] [--seeds 8]

Trains the default run if RUN_DIR has no finished run, then samples the closing sample's prompt with the
closing sample's settings (temperature 0.7, top-p 0.95) for several seeds and checks the criterion of
`keel.model.sampling.sample_quality`: no piece of text with a letter repeated more than 3 times back to back, and
at least 80 % of the non-empty lines read by Python's `tokenize` without an error token. Greedy decoding is shown
beside it for comparison. Exit 0 if every seed passes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/tiny")
    p.add_argument("--seeds", type=int, default=8)
    a = p.parse_args()
    from keel.cli import main as keel
    from keel.evaluate.run import open_run
    from keel.model.sampling import greedy_sample, readable_sample, sample_quality

    run_dir = Path(a.run_dir)
    if not (run_dir / "summary.json").exists():
        assert keel(["train", "--no-progress", f"run_dir={run_dir}", "train.max_restarts=0"]) == 0
    run = open_run(run_dir)
    prompt_text = run.cfg.train.sample_prompt
    prompt = run.encode_prompt(prompt_text)
    n = run.cfg.train.sample_tokens
    ok = True
    for seed in range(a.seeds):
        text = prompt_text + run.tokenizer.decode(readable_sample(run.params, prompt, n, run.cfg.model, run.eos_id,
                                                                  seed=seed))
        q = sample_quality(text)
        ok &= q.reads_like_python()
        print(f"seed {seed}: {'ok ' if q.reads_like_python() else 'BAD'} {q}\n  | " + "\n  | ".join(text.splitlines()))
    greedy = prompt_text + run.tokenizer.decode(greedy_sample(run.params, prompt, n, run.cfg.model, run.eos_id))
    print(f"greedy: {sample_quality(greedy)}\n  | " + "\n  | ".join(greedy.splitlines()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
