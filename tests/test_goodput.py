"""Goodput accounting on synthetic event logs with hand-computed answers, and `keel goodput` on a real run."""

import json
import struct
from itertools import pairwise

import pytest

from keel.goodput.account import BUCKETS, Restart, Straggler, account, young_daly


def _ev(kind, t, attempt=1, host=0, **fields):
    return {"kind": kind, "t_wall": float(t), "t_mono": float(t), "host": host, "pid": attempt, "attempt": attempt,
            **fields}


def _sums_to_wall(b):
    assert sum(b.buckets.values()) == pytest.approx(b.wall_s, rel=1e-9)
    assert all(v >= -1e-12 for v in b.buckets.values()), b.buckets


def _expect(b, **seconds):
    """Every bucket as given (0 where not), `other` included."""
    for k in BUCKETS:
        assert b.buckets[k] == pytest.approx(seconds.get(k, 0.0), abs=1e-9), k
    _sums_to_wall(b)


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
    assert b.wall_s == 8.5 and b.attempts == 1 and b.steps == 4 and b.hosts == [0]
    _expect(b, productive=3.6, data_stall=0.4, startup_data=1.0, startup_init=0.5, startup_compile=2.0,
            checkpoint=0.2, eval=0.3, other=0.5)  # the eval is 7.7-8.0; the end at 8.5
    assert b.goodput == pytest.approx(3.6 / 8.5)
    assert b.restarts == [] and b.stragglers == {} and b.incidents.failures == {}
    assert b.median_step_s == 1.0 and b.median_save_s == pytest.approx(0.2)


def test_a_killed_attempt_wastes_the_steps_after_its_checkpoint_and_the_gap_is_recovery():
    first = _attempt_one(end=False)  # killed after 7.7 (its last event: step 4)
    second = [_ev("start", 20, 2), _ev("restart", 20, 2, previous_attempt=1, previous_ending="killed"),
              _ev("data_prepare", 20.5, 2, duration_s=0.5), _ev("checkpoint_restore", 21, 2, step=2, duration_s=0.5),
              _ev("compile", 22, 2, duration_s=1.0)]
    second += [_ev("step", 23 + i, 2, step=i + 3, duration_s=1.0, data_wait_s=0.0) for i in range(2)]
    second += [_ev("end", 24.5, 2, step=4)]
    b = account(first + second)
    assert b.attempts == 2 and b.steps == 4 and b.wall_s == 24.5
    _expect(b, productive=2 * 0.9 + 2 * 1.0, data_stall=0.2, wasted=2.0,  # attempt 1's steps 3, 4: recomputed
            startup_data=1.5, startup_init=0.5, startup_restore=0.5, startup_compile=3.0, checkpoint=0.2,
            recovery=20 - 7.7, other=0.5)
    assert b.restarts == [Restart(2, "killed", pytest.approx(12.3), pytest.approx(23 - 7.7))]
    assert b.median_recovery_s == pytest.approx(15.3) and b.incidents.failures == {"killed": 1}
    # a log written twice (every line duplicated) is the same run, not a restart
    assert account(first + first + second + second).buckets == b.buckets


def test_slow_steps_are_degraded_time_not_goodput():
    ev = [_ev("start", 0)] + [_ev("step", 1 + i, step=i + 1, duration_s=1.0) for i in range(8)]
    ev += [_ev("step", 13, step=9, duration_s=5.0), _ev("end", 13)]
    _expect(account(ev), productive=9.0, degraded=4.0, other=0.0)  # 5 s against the 1 s median


def _hung_then_supervised_restart():
    """Attempt 1: compile 0-2, steps at 3, 4, save (step 2) 4-4.5, step 3 at 5.5, then no progress: the watchdog's
    `hang` at 15.5, `failure` 15.6, the supervisor's `child_exit` at 16 and 2 s backoff. Attempt 2: restore step 2
    18-19, compile 19-20, steps 3 and 4 at 21, 22, end at 22.5."""
    ev = [_ev("start", 0), _ev("compile", 2, duration_s=2.0), _ev("step", 3, step=1, duration_s=1.0),
          _ev("step", 4, step=2, duration_s=1.0), _ev("checkpoint_save", 4.5, step=2, duration_s=0.5),
          _ev("step", 5.5, step=3, duration_s=1.0),
          _ev("hang", 15.5, step=3, timeout_s=10.0, since_s=10.0, stacks="run/hang-host0000-attempt1.txt"),
          _ev("failure", 15.6, reason="hang", error="no step completed for 10.0 s"),
          _ev("child_exit", 16, returncode=6, ending="hang", restartable=True, backoff_s=2.0)]
    ev += [_ev("start", 18, 2), _ev("restart", 18, 2, previous_attempt=1, previous_ending="hang"),
           _ev("checkpoint_restore", 19, 2, step=2, duration_s=1.0, skipped=[]), _ev("compile", 20, 2, duration_s=1.0),
           _ev("step", 21, 2, step=3, duration_s=1.0), _ev("step", 22, 2, step=4, duration_s=1.0),
           _ev("end", 22.5, 2, step=4)]
    return ev


def test_a_hang_from_the_last_progress_to_the_watchdog_and_the_supervisors_backoff_is_recovery():
    b = account(_hung_then_supervised_restart())
    assert b.wall_s == 22.5
    # other: 15.5-16 (the stack dump and exit, until the child_exit) and 22-22.5
    _expect(b, productive=4.0, wasted=1.0, startup_compile=3.0, startup_restore=1.0, checkpoint=0.5, hang=10.0,
            recovery=2.0, other=1.0)
    assert b.restarts == [Restart(2, "hang", 2.0, 5.0)]  # child_exit at 16 -> the first new step at 21
    assert b.incidents.failures == {"hang": 1}
    assert [h["since_s"] for h in b.incidents.hangs] == [10.0]
    assert b.incidents.child_exits[0]["returncode"] == 6


def _slow_host(host, slow=()):
    """Compile ending at 1 (host 1: at 1.2), six 1 s steps one after the other (2 s for the steps in `slow`),
    end 0.5 s after the last."""
    t = 1.2 if host == 1 else 1.0
    ev = [_ev("start", 0, host=host), _ev("compile", t, host=host, duration_s=t)]
    for s in range(1, 7):
        d = 2.0 if s in slow else 1.0
        t += d
        ev.append(_ev("step", t, host=host, step=s, duration_s=d))
    return ev + [_ev("end", t + 0.5, host=host, step=6)]


def test_the_slowest_host_sets_each_step_of_the_run():
    hosts = {0: _slow_host(0), 1: _slow_host(1, slow=(3, 5)), 2: _slow_host(2)}
    b = account([e for ev in hosts.values() for e in ev])
    assert b.hosts == [0, 1, 2] and b.wall_s == pytest.approx(9.7)  # first start to host 1's end
    # the run's steps are host 1's (1, 1, 2, 1, 2, 1): 2 s above the 1 s median; compile is the slowest host's
    _expect(b, productive=6.0, degraded=2.0, startup_compile=1.2, other=0.5)
    assert b.stragglers == {0: Straggler(6, 0, 0.0), 1: Straggler(6, 2, 2.0), 2: Straggler(6, 0, 0.0)}
    alone = account(hosts[0])
    assert alone.wall_s == 7.5 and alone.buckets["degraded"] == 0 and alone.stragglers == {}
    assert account(hosts[1]).buckets["degraded"] == pytest.approx(2.0)


def test_jitter_between_hosts_in_lockstep_is_not_summed_as_time():
    """Two hosts finish each step within 0.1 s of each other, the later one alternating: the longest duration of
    each step would sum to 3.3 s for 3 s of training; from the last host's start to its end they sum to 3."""
    ends = {0: [1.0, 2.1, 3.0, 4.1], 1: [1.1, 2.0, 3.1, 4.0]}
    ev = []
    for h, ts in ends.items():
        ev += [_ev("start", 0, host=h), _ev("compile", 0.5, host=h, duration_s=0.5)]
        ev += [_ev("step", t, host=h, step=i + 1, duration_s=t - p) for i, (p, t) in enumerate(pairwise([0.5, *ts]))]
    b = account(ev)
    assert sum(t.duration_s for t in b.step_times) == pytest.approx(4.1 - 0.5)
    _sums_to_wall(b)


def _spikes_rewind_and_custom_badput():
    """Attempt 1: compile 0-1, steps 1-4 at 2..5 (step 2's update skipped for a spike), save (step 4) 5-5.5, an SDC
    check 5.5-6, steps 5, 6 at 7, 8; a spike at step 6 under `rewind` ends it at 8.2 (back to checkpoint 4).
    Attempt 2 (same process) starts at 8.3: restore 8.3-8.8, compile 8.8-9.3, step 5 at 10.3, end at 10.5."""
    ev = [_ev("start", 0), _ev("compile", 1, duration_s=1.0)]
    ev += [_ev("step", 2 + i, step=i + 1, duration_s=1.0) for i in range(4)]
    ev += [_ev("spike", 3.01, step=2, loss=9.0, grad_norm=40.0, action="skip_update"),
           _ev("checkpoint_save", 5.5, step=4, duration_s=0.5), _ev("badput", 6, label="sdc_check", step=4,
                                                                    duration_s=0.5, ok=True),
           _ev("step", 7, step=5, duration_s=1.0), _ev("step", 8, step=6, duration_s=1.0),
           _ev("spike", 8.01, step=6, loss="nan", grad_norm="inf", action="rewind"),
           _ev("rewind", 8.2, spike_step=5, to_step=4, skip="5-5", set_aside=[])]
    ev += [_ev("start", 8.3, 2), _ev("restart", 8.3, 2, previous_attempt=1, previous_ending="rewind"),
           _ev("checkpoint_restore", 8.8, 2, step=4, duration_s=0.5), _ev("compile", 9.3, 2, duration_s=0.5),
           _ev("step", 10.3, 2, step=5, duration_s=1.0), _ev("data_skip", 10.3, 2, start=5, stop=6),
           _ev("end", 10.5, 2, step=6)]
    return ev


def test_skipped_updates_rewinds_and_custom_badput():
    b = account(_spikes_rewind_and_custom_badput())
    _expect(b, productive=4.0, spike=1.0, wasted=2.0, startup_compile=1.5, startup_restore=0.5, checkpoint=0.5,
            custom=0.5, recovery=0.1, other=0.2 + 0.2)
    assert b.custom == {"sdc_check": 0.5} and b.steps == 5
    assert b.incidents.spikes == {"skip_update": 1, "rewind": 1} and b.incidents.failures == {"rewind": 1}
    assert b.incidents.rewinds[0]["to_step"] == 4 and b.restarts == [Restart(2, "rewind", pytest.approx(0.1),
                                                                             pytest.approx(2.1))]
    assert [t.kind for t in b.step_times] == ["productive", "spike", "productive", "productive", "wasted", "wasted",
                                              "productive"]


def test_checkpoint_incidents_failures_by_reason_and_unknown_kinds_or_fields():
    ev = [_ev("start", 0), _ev("step", 1, step=1, duration_s=1.0), _ev("checkpoint_save", 1.2, step=1, duration_s=0.2),
          _ev("step", 2.2, step=2, duration_s=1.0), _ev("checkpoint_commit", 2.3, step=1, background_s=1.5),
          _ev("checkpoint_save", 2.4, step=2, duration_s=0.2), _ev("checkpoint_commit", 4.0, step=2, background_s=2.5),
          _ev("a_kind_from_the_future", 4.1, payload=[1, 2]), {"kind": "step", "note": "no time"},
          _ev("step", 4.2, step=None, duration_s=None), _ev("eval", 4.3, duration_s="n/a"), _ev("spike", 4.4),
          _ev("rewind", 4.4, spike_step=[3]), _ev("checkpoint_commit", 4.4, attempt=None, background_s=None),
          _ev("checkpoint_failure", 4.5, step=3, error="OSError: [Errno 28] No space left on device"),
          _ev("sdc", 5, step=3, devices=[0, 1]), _ev("failure", 5.1, reason="sdc", error="SilentDataCorruption")]
    ev += [_ev("start", 7, 2), _ev("checkpoint_fallback", 7.5, 2, step=2, reason="checksum mismatch",
                                   moved_to="checkpoints/2.corrupt"),
           _ev("checkpoint_restore", 8, 2, step=1, duration_s=0.5, skipped=[2]), _ev("end", 8.5, 2, step=1)]
    b = account(ev)
    _expect(b, productive=1.0, wasted=1.0, checkpoint=0.4, startup_restore=0.5, recovery=7 - 5.1, other=8.5 - 4.8)
    inc = b.incidents.to_json()
    assert inc["failures"] == {"sdc": 1} and inc["sdc"][0]["step"] == 3
    assert inc["checkpoint_background"] == {"saves": 3, "total_s": 4.0, "median_s": 1.5}
    assert [f["moved_to"] for f in inc["checkpoint_fallbacks"]] == ["checkpoints/2.corrupt"]
    assert inc["restore_skipped"] == 1 and inc["checkpoint_failures"][0]["step"] == 3
    table = b.table()
    assert "failures: sdc 1" in table and "checkpoint background (overlaps steps): 4.00 s in 3 save(s)" in table


def test_keel_goodput_reads_every_host_and_plots(tmp_path, capsys):
    from keel.cli import main

    # host 1: the slow host of the test above, but hung after its last step (9.2) instead of ending
    hung = [_ev("hang", 11.2, host=1, step=6, timeout_s=2.0, since_s=2.0, stacks="hang-host0001-attempt1.txt"),
            _ev("failure", 11.3, host=1, reason="hang"), _ev("child_exit", 11.5, host=1, returncode=6, ending="hang")]
    events = {0: _slow_host(0), 1: _slow_host(1, slow=(3, 5))[:-1] + hung}
    (tmp_path / "events").mkdir()
    for h, ev in events.items():
        (tmp_path / "events" / f"host{h:04d}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ev))
    png = tmp_path / "run.png"
    assert main(["goodput", str(tmp_path), "--json", "--plot", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["hosts"]) == {"0", "1"} and report["run"]["hosts"] == [0, 1]
    assert report["run"]["stragglers"]["1"]["slowest"] == 2
    run = report["run"]["buckets"]
    assert sum(run.values()) == pytest.approx(report["run"]["wall_s"], rel=1e-9) and report["run"]["wall_s"] == 11.5
    assert run["hang"] == pytest.approx(2.0) and report["run"]["incidents"]["failures"] == {"hang": 1}
    assert report["hosts"]["0"]["buckets"]["hang"] == 0 and report["hosts"]["0"]["incidents"]["failures"] == {}
    head = png.read_bytes()
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width >= 800 and 150 <= height <= 2000 and png.stat().st_size > 10_000
    assert main(["goodput", str(tmp_path), "--hosts"]) == 0
    out = capsys.readouterr().out
    assert "host 1: goodput" in out and "slowest" in out and "hang: host 1" in out


def test_young_daly_interval():
    tau, overhead = young_daly(5.0, 3 * 3600)  # the example: 5 s blocking save, 3 h MTBF
    assert tau / 60 == pytest.approx(5.48, abs=0.01) and overhead == pytest.approx(0.0304, abs=1e-3)


def test_keel_goodput_on_a_resumed_run(tiny_args, capsys):
    from keel.cli import main

    run = next(a.split("=", 1)[1] for a in tiny_args if a.startswith("run_dir="))
    args = [*tiny_args, "train.max_restarts=0"]  # in this process: no supervisor
    assert main(["train", "--no-progress", *args, "train.stop_at=3"]) == 0
    assert main(["train", "--no-progress", *args]) == 0
    capsys.readouterr()
    assert main(["goodput", run, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    host = report["run"]
    assert report["hosts"]["0"] == host and host["attempts"] == 2 and host["steps"] == 6
    assert sum(host["buckets"].values()) == pytest.approx(host["wall_s"], rel=1e-9)
    assert host["buckets"]["recovery"] > 0 and host["buckets"]["wasted"] == 0  # stop_at saved its last step
    assert 0 < host["goodput"] < 1 and all(v >= 0 for v in host["buckets"].values())
    assert [r["after"] for r in host["restarts"]] == ["stop_at"] and host["incidents"]["failures"] == {}
    assert report["checkpoint_interval"]["optimal_interval_s"] > 0
