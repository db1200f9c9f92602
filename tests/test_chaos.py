"""The fault-injection acceptance run (slow): a real supervised `keel train` under 20 random SIGKILLs (during
start-up, between steps and while checkpoints are written), one hang, one corrupted latest checkpoint and one
loss spike finishes without a person, loses no committed checkpoint, ends bitwise where an uninterrupted run
with the same skip decision ends, and `keel goodput` accounts for every second."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from keel.config import load_config
from keel.goodput.account import account
from keel.goodput.attempts import host_events
from keel.train.chaos import check_chaos, reference_args, run_chaos
from keel.train.checkpoint import load_params


@pytest.mark.slow
def test_twenty_kills_a_hang_a_corrupt_checkpoint_and_a_spike(tiny_args, tmp_path, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the training processes see one CPU device
    steps = 400
    args = [a for a in tiny_args if not a.startswith("run_dir=")] + [
        f"run_dir={tmp_path / 'chaos'}", f"train.steps={steps}", "checkpoint.every=5", "checkpoint.keep=4",
        "train.eval_every=200", "train.log_every=50", "train.hang_floor_s=6", "spike.policy=rewind",
        "spike.window=32", "spike.min_history=8", "spike.grad_norm_min_rise=4", "optim.warmup_steps=5"]
    # (a 35k-parameter model on 8 x 32 tokens has gradient norms 2-3x their median now and then: only the
    # injected batch, ~10x, is to count as a spike here)
    report = run_chaos(args, tmp_path / "chaos", kills=20, steps=steps, seed=1, hang_at=37, spike_at=171,
                       corrupt_at_kill=6)
    assert report.returncode == 0, report.log[-4000:]
    assert len(report.kills) == 20 and {k["kind"] for k in report.kills} == {"startup", "step", "save"}
    check = check_chaos(tmp_path / "chaos", report)
    assert not check.lost, check.lost
    assert report.corrupted is not None and any(n.startswith(f"{report.corrupted}-") for n in check.set_aside)
    assert any(d["spike_step"] == 171 for d in check.decisions)
    assert "keel: hang: no progress" in report.log
    ref = reference_args(args, tmp_path / "reference", check.decisions)
    # in a process like the chaos run's (one CPU device: the test process has 8, and another device count sums
    # gradients in another order)
    done = subprocess.run([sys.executable, "-m", "keel", "train", "--no-progress", *ref], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = load_config("tiny", args)
    a, step_a = load_params(tmp_path / "chaos", cfg)
    b, step_b = load_params(tmp_path / "reference", cfg)
    assert step_a == step_b == steps
    jax.tree.map(np.testing.assert_array_equal, a, b)
    events = [e for host in host_events(tmp_path / "chaos").values() for e in host]
    breakdown = account(events)
    assert abs(sum(breakdown.buckets.values()) - breakdown.wall_s) <= 1e-3 * breakdown.wall_s
    assert breakdown.buckets["hang"] > 0 and breakdown.buckets["wasted"] > 0 and breakdown.buckets["recovery"] > 0
    assert len(check.recovery_s) >= 15  # kill -> next productive step, measured (benchmarks report it)
