"""Recovery without a person: the spike detector and its policies, the hang watchdog, the supervisor, the
silent-data-corruption check, and the compilation cache — each on the real `keel train` entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keel.cli import main
from keel.config import SpikeConfig, load_config
from keel.errors import EXIT_HANG, EXIT_SDC, EXIT_SPIKES, restartable
from keel.train.checkpoint import load_params
from keel.train.events import read_events
from keel.train.faults import Faults
from keel.train.plan import read_decisions
from keel.train.spikes import detect, init_monitor
from keel.train.supervise import supervise


def _run_dir(args):
    return Path(next(a.split("=", 1)[1] for a in args if a.startswith("run_dir=")))


def _with_run_dir(args, path):
    return [a for a in args if not a.startswith("run_dir=")] + [f"run_dir={path}"]


def _train(args, *extra):
    return main(["train", "--no-progress", *args, *extra])


def _events(run):
    return read_events(run / "events" / "host0000.jsonl")


def _cli(args, *extra, env=None, timeout=240, own_cache=False):
    """The real console entry point in a fresh process. It shares the session's XLA compilation cache (set in
    the environment by tests/conftest.py) unless `own_cache`: then the run keeps its own, as a user's run does."""
    env = {**os.environ, **(env or {})}
    if own_cache:
        for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
            env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "keel", "train", "--no-progress", *args, *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


# ------------------------------------------------------------------------------------------- spike detector


def _reference(history, loss, norm, cfg):
    """The detector's rule in numpy: above the median by more than threshold x 1.4826 MAD and the minimum rise
    (a fraction of the median), after min_history accepted steps; a non-finite value is always a spike."""
    if not (np.isfinite(loss) and np.isfinite(norm)):
        return True
    if len(history) < cfg.min_history:
        return False
    recent = np.array(history[-cfg.window:], dtype=np.float32)
    for col, x, rise in ((recent[:, 0], loss, cfg.loss_min_rise), (recent[:, 1], norm, cfg.grad_norm_min_rise)):
        med = np.nanmedian(col)
        sigma = 1.4826 * np.nanmedian(np.abs(col - med))
        if x - med > max(cfg.threshold * sigma, rise * abs(med)):
            return True
    return False


@pytest.mark.parametrize("seed", range(6))
def test_spike_detector_matches_its_rule_on_random_streams(seed):
    rng = np.random.default_rng(seed)
    policy = ("skip_update", "rewind", "warn")[seed % 3]
    cfg = SpikeConfig(policy=policy, window=int(rng.integers(8, 40)), threshold=float(rng.uniform(2, 8)),
                      min_history=int(rng.integers(3, 8)), loss_min_rise=float(rng.uniform(0, 0.2)),
                      grad_norm_min_rise=float(rng.uniform(0, 2)))
    step = jax.jit(lambda m, loss, norm: detect(m, loss, norm, cfg))
    monitor, history, streak, flagged = init_monitor(cfg), [], 0, 0
    for i in range(120):
        loss = np.float32(3.0 - 0.01 * i + rng.normal(0, 0.05))
        norm = np.float32(abs(rng.normal(1.0, 0.1)))
        r = rng.random()
        if r < 0.08:
            loss = np.float32(loss + rng.uniform(0.1, 3.0))  # spikes of every size, some below the threshold
        elif r < 0.12:
            norm = np.float32(norm * rng.uniform(1.5, 30))
        elif r < 0.13:
            loss = np.float32(np.nan)
        expect = _reference(history, loss, norm, cfg)
        spike, monitor, metrics = step(monitor, jnp.float32(loss), jnp.float32(norm))
        assert bool(spike) == expect, (i, loss, norm)
        streak = streak + 1 if expect else 0
        assert int(metrics["spike_streak"]) == streak
        if not expect or policy == "warn":
            history.append((loss, norm))  # a spike stays out of the baseline, unless its update was applied
        flagged += expect
    assert int(monitor["count"]) == len(history) and flagged >= 3


def test_spike_policy_off_never_flags():
    cfg = SpikeConfig(policy="off", window=8, min_history=3)
    monitor = init_monitor(cfg)
    for x in (1.0, 1.0, 1.0, 1.0, 50.0, float("nan")):
        spike, monitor, _ = detect(monitor, jnp.float32(x), jnp.float32(1.0), cfg)
        assert not bool(spike)


SPIKY = ["spike.window=16", "spike.min_history=4", "spike.threshold=6", "train.steps=12", "checkpoint.every=4",
         "train.eval_every=12", "optim.warmup_steps=2"]


@pytest.mark.slow  # keeps the fast suite under its 4-minute budget
def test_skip_update_leaves_the_spiking_step_without_an_update(tiny_args, monkeypatch):
    """A batch of random tokens at step 6 spikes the loss: under skip_update the parameters after step 6 are
    those after step 5 (bitwise), the step is marked, and the run goes on."""
    monkeypatch.setenv("KEEL_INJECT", "spike@6")
    assert _train(tiny_args, *SPIKY, "spike.policy=skip_update", "train.stop_at=7", "checkpoint.every=6") == 0
    run = _run_dir(tiny_args)
    cfg = load_config("tiny", [*tiny_args, *SPIKY])
    spikes = [e for e in _events(run) if e["kind"] == "spike"]
    assert [(e["step"], e["action"]) for e in spikes] == [(7, "skip_update")]
    assert spikes[0]["grad_norm"] > 3 * spikes[0]["grad_norm_baseline"]  # the bad batch's gradient stands out
    before, _ = load_params(run, cfg, step=6)
    after, _ = load_params(run, cfg, step=7)
    jax.tree.map(np.testing.assert_array_equal, before, after)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("update_skipped")] == [7]


@pytest.mark.slow  # three tiny runs (~12 s); tests/test_chaos.py rewinds too
def test_rewind_skips_the_spike_and_equals_a_run_that_skipped_it(tiny_args, tmp_path, monkeypatch):
    """Under rewind, a spike at step 9 sets aside the checkpoint holding it, records the decision, restores
    step 8 and goes on without step 9's batch: bitwise the run that was told to skip step 9."""
    monkeypatch.setenv("KEEL_INJECT", "spike@9")
    assert _train(tiny_args, *SPIKY, "spike.policy=rewind") == 0
    run = _run_dir(tiny_args)
    assert [(d["steps"], d["spike_step"], d["rewound_to"]) for d in read_decisions(run)] == [("8-9", 9, 8)] or \
        [(d["steps"], d["spike_step"]) for d in read_decisions(run)] == [("9-9", 9)]
    events = _events(run)
    rewind = next(e for e in events if e["kind"] == "rewind")
    assert rewind["spike_step"] == 9 and rewind["to_step"] == 8
    assert [e["step"] for e in events if e["kind"] == "checkpoint_restore"] == [8]
    assert [e["attempt"] for e in events if e["kind"] == "start"] == [1, 2]
    monkeypatch.delenv("KEEL_INJECT")
    plain = _with_run_dir(tiny_args, tmp_path / "plain")
    assert _train(plain, *SPIKY, "spike.policy=rewind", "data.skip_steps=[9]") == 0
    cfg = load_config("tiny", [*tiny_args, *SPIKY])
    a, step_a = load_params(run, cfg)
    b, step_b = load_params(tmp_path / "plain", cfg)
    assert step_a == step_b == 12
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # the decision is part of the run: a data inspect of step 9 says it was skipped, and why
    out = subprocess.run([sys.executable, "-m", "keel", "data", "inspect", "--step", "9", *tiny_args],
                         capture_output=True, text=True, timeout=120)
    assert "skipped by the run (spike at step 9)" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow  # keeps the fast suite under its 4-minute budget; the detector's rule is tested above
def test_skip_update_stops_after_too_many_spikes_in_a_row(tiny_args, monkeypatch):
    monkeypatch.setenv("KEEL_INJECT", "spike@6,spike@7")
    code = _train(tiny_args, *SPIKY, "spike.policy=skip_update", "spike.max_consecutive=2")
    assert code == EXIT_SPIKES
    failure = [e for e in _events(_run_dir(tiny_args)) if e["kind"] == "failure"][-1]
    assert failure["reason"] == "spike"


def test_injected_machine_faults_fire_once_and_bad_data_at_every_replay(tmp_path):
    """A restarted process (a new Faults on the same run directory) does not meet the hang or the flipped bit
    again, but it does meet the bad batch: a kill between the spike and its detection must not lose the spike."""
    batch = {"tokens": np.arange(12, dtype=np.int32).reshape(3, 4)}
    fired = []
    for _process in range(3):
        faults = Faults("hang@5,spike@7,sdc@8", tmp_path)
        fired.append(sorted(k for k, s in (("hang", 5), ("sdc", 8)) if faults.fire(k, s)))
        for step in (6, 7, 7):
            got = faults.before_step(step, batch, vocab_size=100)["tokens"]
            assert (got == 99).all() if step == 7 else got is batch["tokens"]
    assert fired == [["hang", "sdc"], [], []]
    records = [json.loads(x) for x in (tmp_path / "injected_faults.jsonl").read_text().splitlines()]
    assert sorted(r["kind"] for r in records) == ["hang", "sdc"] + ["spike"] * 6
    with pytest.raises(ValueError, match="kind@step"):
        Faults("spike:7", tmp_path)


# ------------------------------------------------------------------------------- hangs, restarts, caches


@pytest.mark.slow  # two training processes and a watchdog timeout: ~35 s
def test_a_hang_dumps_stacks_and_the_supervisor_restarts_to_the_same_result(tiny_args, tmp_path):
    """The real console entry point: step 5 hangs; the watchdog writes every thread's stack, records the hang
    and exits 6; the supervisor restarts the training from the checkpoint at 4, and the final parameters are
    bitwise those of an uninterrupted run. The restart loads the compiled programs from the run's persistent
    compilation cache instead of compiling them again."""
    args = [*tiny_args, "train.steps=10", "train.eval_every=10", "checkpoint.every=4", "train.hang_floor_s=8",
            "train.max_restarts=2", "train.restart_backoff_s=0.1"]
    run = _run_dir(tiny_args)
    done = _cli(args, env={"KEEL_INJECT": "hang@5"}, own_cache=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ended with exit 6 (a hang); restart 1 of 2" in done.stderr
    stacks = (run / "hang-host0000-attempt1.txt").read_text()
    assert "no progress for" in stacks and "before_step" in stacks  # where the main thread was stuck
    events = _events(run)
    kinds = [(e["attempt"], e["kind"]) for e in events if e["kind"] not in ("step", "eval")]
    assert (1, "hang") in kinds and (1, "failure") in kinds
    child_exit = next(e for e in events if e["kind"] == "child_exit")
    assert (child_exit["returncode"], child_exit["ending"], child_exit["attempt"]) == (EXIT_HANG, "hang", 1)
    restart = next(e for e in events if e["kind"] == "restart")
    assert restart["previous_ending"] == "hang"
    assert [e["step"] for e in events if e["kind"] == "checkpoint_restore"] == [4]
    compiles = [e for e in events if e["kind"] == "compile"]
    assert len(compiles) == 2
    cache = run / "compile_cache"
    assert cache.is_dir() and any(cache.iterdir())
    whole = _with_run_dir(args, tmp_path / "whole")
    assert _train(whole) == 0
    cfg = load_config("tiny", args)
    a, _ = load_params(run, cfg)
    b, _ = load_params(tmp_path / "whole", cfg)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_supervisor_restarts_only_what_a_restart_can_cure(tmp_path):
    """A child that fails with each exit code in turn: restartable ones are restarted with doubling backoff up
    to max_restarts, the others end the job with their code."""
    script = tmp_path / "child.py"
    counter = tmp_path / "n"
    script.write_text("import sys, pathlib\np = pathlib.Path(sys.argv[1]); n = int(p.read_text() or 0) "
                      "if p.exists() else 0\np.write_text(str(n + 1))\ncodes = [int(c) for c in sys.argv[2:]]\n"
                      "sys.exit(codes[min(n, len(codes) - 1)])\n")
    lines = []

    def run(codes, max_restarts):
        counter.unlink(missing_ok=True)
        rc = supervise([], tmp_path, max_restarts, 0.01, log=lines.append,
                       command=[sys.executable, str(script), str(counter), *map(str, codes)])
        return rc, int(counter.read_text())

    assert run([1, 5, 6, 0], 3) == (0, 4)  # crash, non-finite loss, hang: restarted; then done
    assert run([1, 1, 1, 1], 2) == (1, 3)  # out of restarts
    for code in (2, 3, 4, 7, 8, 143):
        assert run([code, 0], 3) == (code, 1)  # a person must act: no restart
    assert restartable(-9) and restartable(137) and not restartable(-15) and not restartable(143)
    assert any("restart 2 of 3" in line for line in lines)


@pytest.mark.slow  # keeps the fast suite under its 4-minute budget
def test_sdc_check_passes_on_healthy_devices_and_catches_a_flipped_bit(tiny_args, monkeypatch, capsys):
    """Every 2 steps the step is recomputed on the 8 devices and on a rotation of them: healthy devices agree
    bitwise (the run finishes, each check a `badput` span); one flipped bit in a parameter on the rotated mesh
    at step 4 is silent data corruption: an `sdc` event naming the devices, exit 7."""
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.sdc_every=2"]
    assert _train(tiny_args, *mesh) == 0
    run = _run_dir(tiny_args)
    checks = [e for e in _events(run) if e.get("label") == "sdc_check"]
    assert [e["step"] for e in checks] == [0, 2, 4] and all(e["ok"] for e in checks)
    monkeypatch.setenv("KEEL_INJECT", "sdc@4")
    bad = _with_run_dir(tiny_args, run.parent / "bad")
    assert _train(bad, *mesh) == EXIT_SDC
    assert "run `keel burnin`" in capsys.readouterr().err
    sdc = next(e for e in _events(run.parent / "bad") if e["kind"] == "sdc")
    assert sdc["step"] == 4 and sorted(sdc["devices"]) == list(range(8))
    assert sdc["devices"] != sdc["devices_rotated"] and sdc["gradient_hash"][0] != sdc["gradient_hash"][1]


def test_supervisor_forwards_sigterm_and_does_not_restart(tmp_path):
    """A preemption: SIGTERM to the supervisor reaches the child, which checkpoints and exits 143; no restart."""
    import signal
    import threading

    script = tmp_path / "child.py"
    marker = tmp_path / "started"
    script.write_text("import signal, sys, time, pathlib\n"
                      "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
                      f"pathlib.Path({str(marker)!r}).write_text('x')\n"
                      "time.sleep(60)\nsys.exit(1)\n")

    def preempt():
        while not marker.exists():
            threading.Event().wait(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    starts = []
    rc = supervise([], tmp_path, 5, 0.01, log=starts.append, command=[sys.executable, str(script)])
    assert rc == 143 and not starts  # no "restart" line: a preemption is the launcher's to restart


# ------------------------------------------------------------------------------------ a run remembers


def _metric_steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if "loss" in json.loads(line)]


def test_metrics_never_hold_a_step_twice(tiny_args):
    """Steps computed after the checkpoint a resume restores move to metrics.superseded.jsonl."""
    import shutil

    run, quick = _run_dir(tiny_args), [*tiny_args, "train.eval_every=6"]
    assert _train(quick, "train.stop_at=5") == 0
    shutil.rmtree(run / "checkpoints" / "5")  # the last save lost (as if the process died before it)
    assert _train(quick) == 0
    assert _metric_steps(run / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert _metric_steps(run / "metrics.superseded.jsonl") == [5]


def test_a_run_whose_checkpoints_are_gone_does_not_start_over(tiny_args, capsys):
    import shutil

    run = _run_dir(tiny_args)
    assert _train(tiny_args, "train.stop_at=4") == 0
    shutil.rmtree(run / "checkpoints")
    assert _train(tiny_args) == 3
    err = capsys.readouterr().err
    assert "committed checkpoints (the last at step 4)" in err and "--restart-from-scratch" in err
    assert _metric_steps(run / "metrics.jsonl") == [1, 2, 3, 4]  # untouched
    assert _train(tiny_args, "--restart-from-scratch") == 0
    assert _metric_steps(run / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert _metric_steps(run / "metrics.superseded.jsonl") == [1, 2, 3, 4]
    assert any(e["kind"] == "restart_from_scratch" for e in _events(run))


def test_gradient_hash_sees_every_single_bit_flip():
    from keel.train.run import tree_hash

    rng = np.random.default_rng(0)
    leaves = {"a": rng.normal(size=(4, 8)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
    base = int(tree_hash(leaves))
    for name, leaf in leaves.items():
        raw = leaf.reshape(-1).view(np.uint32)
        for i in range(raw.size):
            for bit in range(32):
                flipped = raw.copy()
                flipped[i] ^= np.uint32(1 << bit)
                h = int(tree_hash({**leaves, name: flipped.view(np.float32).reshape(leaf.shape)}))
                assert h != base, (name, i, bit)


def test_a_repeated_sigterm_is_the_same_preemption_and_sigint_escalates():
    import signal

    from keel.train.observe import Stopper
    from keel.train.plan import SkipList, StepPlan

    stopper = Stopper(StepPlan(10, 10, SkipList()))
    stopper._handle(signal.SIGTERM, None)
    stopper._handle(signal.SIGTERM, None)  # the launcher and the supervisor both sent it
    assert stopper.check(3) == "signal"
    with pytest.raises(KeyboardInterrupt):
        stopper._handle(signal.SIGINT, None)


def test_supervisor_leaves_another_process_s_events_alone(tmp_path):
    """A child refused before its first event (e.g. the run directory is in use) must not get a `child_exit`
    appended under the other process's attempt."""
    path = tmp_path / "events" / "host0000.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"kind": "step", "step": 7, "attempt": 1, "pid": 1, "t_wall": 1.0}) + "\n")
    before = path.read_text()
    rc = supervise([], tmp_path, 2, 0.01, log=lambda s: None, command=[sys.executable, "-c", "raise SystemExit(2)"])
    assert rc == 2 and path.read_text() == before


def test_a_resumed_finished_run_records_its_final_heldout_loss_once(tiny_args):
    run = _run_dir(tiny_args)
    assert _train(tiny_args) == 0
    assert _train(tiny_args) == 0  # resumes at the last step: nothing to train, the same final evaluation
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "heldout_loss" in r] == [3, 6]
