"""Goodput accounting on synthetic event logs with hand-computed answers, and `keel goodput` on a real run."""

import json

import pytest

from keel.goodput.account import BUCKETS, account, young_daly


def _ev(kind, t, attempt=1, **fields):
    return {"kind": kind, "t_wall": float(t), "t_mono": float(t), "host": 0, "pid": attempt, "attempt": attempt,
            **fields}


def _attempt_one(end=True):
    """start 0; data 0-1; init 1-1.5; compile 1.5-3.5; four 1 s steps (0.1 s data wait each) 3.5-7.5;
    a 0.2 s save, a 0.3 s eval; end at 8.5 (or killed after step 4, its last checkpoint at step 2)."""
    ev = [_ev("start", 0), _ev("data_prepare", 1, duration_s=1.0), _ev("init", 1.5, duration_s=0.5),
          _ev("compile", 3.5, duration_s=2.0)]
    ev += [_ev("step", 4.5 + i, step=i + 1, duration_s=1.0, data_wait_s=0.1) for i in range(2)]
    ev += [_ev("checkpoint_save", 5.7, step=2, duration_s=0.2)]
    ev += [_ev("step", 6.7 + i, step=i + 3, duration_s=1.0, data_wait_s=0.1) for i in range(2)]
    if end:
        ev += [_ev("eval", 8.0, duration_s=0.3), _ev("end", 8.5, step=4)]
    return ev


def test_one_clean_attempt_every_second_in_its_bucket():
    b = account(_attempt_one())
    assert b.wall_s == 8.5
    expect = {"productive": 3.6, "data_stall": 0.4, "startup_data": 1.0, "startup_init": 0.5, "startup_compile": 2.0,
              "checkpoint": 0.2, "eval": 0.3}
    for k in BUCKETS:
        assert b.buckets[k] == pytest.approx(expect.get(k, 0.0) if k != "other" else 8.5 - sum(expect.values())), k
    assert sum(b.buckets.values()) == pytest.approx(b.wall_s, abs=1e-12)
    assert b.goodput == pytest.approx(3.6 / 8.5)


def test_a_killed_attempt_wastes_the_steps_after_its_checkpoint_and_the_gap_is_recovery():
    first = _attempt_one(end=False)  # killed at 8.2 (last event: step 4 at 7.7)
    second = [_ev("start", 20, 2), _ev("restart", 20, 2, previous_attempt=1, previous_ending="killed"),
              _ev("data_prepare", 20.5, 2, duration_s=0.5), _ev("checkpoint_restore", 21, 2, step=2, duration_s=0.5),
              _ev("compile", 22, 2, duration_s=1.0)]
    second += [_ev("step", 23 + i, 2, step=i + 3, duration_s=1.0, data_wait_s=0.0) for i in range(2)]
    second += [_ev("end", 24.5, 2, step=4)]
    b = account(first + second)
    assert b.attempts == 2 and b.steps == 4
    assert b.buckets["wasted"] == pytest.approx(2.0)  # attempt 1's steps 3 and 4, recomputed by attempt 2
    assert b.buckets["recovery"] == pytest.approx(20 - 7.7)
    assert b.buckets["productive"] == pytest.approx(2 * 0.9 + 2 * 1.0)
    assert b.buckets["startup_restore"] == pytest.approx(0.5)
    assert sum(b.buckets.values()) == pytest.approx(b.wall_s) and b.wall_s == 24.5
    # a log written twice (every line duplicated) is the same run, not a restart
    assert account(first + first + second + second).buckets == b.buckets


def test_slow_steps_are_degraded_time_not_goodput():
    ev = [_ev("start", 0)] + [_ev("step", 1 + i, step=i + 1, duration_s=1.0) for i in range(8)]
    ev += [_ev("step", 14, step=9, duration_s=5.0), _ev("end", 14)]
    b = account(ev)
    assert b.buckets["degraded"] == pytest.approx(4.0)  # 5 s against the 1 s median
    assert b.buckets["productive"] == pytest.approx(9.0)


def test_young_daly_interval():
    tau, overhead = young_daly(5.0, 3 * 3600)  # the example: 5 s blocking save, 3 h MTBF
    assert tau / 60 == pytest.approx(5.48, abs=0.01) and overhead == pytest.approx(0.0304, abs=1e-3)


def test_keel_goodput_on_a_resumed_run(tiny_args, capsys):
    from keel.cli import main

    run = next(a.split("=", 1)[1] for a in tiny_args if a.startswith("run_dir="))
    assert main(["train", "--no-progress", *tiny_args, "train.stop_at=3"]) == 0
    assert main(["train", "--no-progress", *tiny_args]) == 0
    capsys.readouterr()
    assert main(["goodput", run, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    host = report["hosts"]["0"]
    assert host["attempts"] == 2 and host["steps"] == 6
    assert sum(host["buckets"].values()) == pytest.approx(host["wall_s"], rel=1e-9)
    assert host["buckets"]["recovery"] > 0 and host["buckets"]["wasted"] == 0  # stop_at saved its last step
    assert 0 < host["goodput"] < 1 and all(v >= 0 for v in host["buckets"].values())
    assert report["checkpoint_interval"]["optimal_interval_s"] > 0
