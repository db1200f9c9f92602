"""Checkpoint integrity and recovery: checksums written after each commit and verified at restore; a latest
checkpoint that is incomplete, truncated, corrupt or unrestorable is set aside (never deleted) and the run resumes
from the one before; a save that fails is reported at once and spares every earlier checkpoint."""

import contextlib
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from keel.cli import main
from keel.config import load_config
from keel.errors import EXIT_CHECKPOINT, CheckpointError
from keel.train.checkpoint import MANIFEST, Checkpointer
from keel.train.events import EventLog, read_events
from keel.train.state import abstract_state
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
RUN = [*TINY, "train.max_restarts=0"]  # 6 steps, checkpoints at 2, 4, 6 (keep 3)


# ------------------------------------------------------------------------------------ the Checkpointer by itself

@pytest.fixture(scope="module")
def abstract():
    return abstract_state(load_config("tiny", TINY))


def _state(abstract, seed: int):
    """A training state of the tiny model's shapes with random contents (incompressible, unlike zeros)."""
    leaves, tree = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def fill(key, a):
        if jnp.issubdtype(a.dtype, jnp.floating):
            return jax.random.normal(key, a.shape, a.dtype)
        return jnp.full(a.shape, seed, a.dtype)

    return jax.tree.unflatten(tree, [fill(k, a) for k, a in zip(keys, leaves, strict=True)])


def _target(abstract):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract)


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _events(path: Path, kind: str) -> list[dict]:
    return [e for e in read_events(path) if e["kind"] == kind]


def _data_file(step_dir: Path) -> Path:
    """The largest array file of a checkpoint."""
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in p.as_posix()),
               key=lambda p: p.stat().st_size)


def _saved(root: Path, abstract, steps=(2, 4), keep: int = 3) -> tuple[Checkpointer, EventLog, dict]:
    events = EventLog(root / "events.jsonl")
    ckpt = Checkpointer(root / "checkpoints", keep=keep, every=2, events=events)
    states = {s: _state(abstract, s) for s in steps}
    for s in steps:
        ckpt.maybe_save(s, states[s], {"step": s})
    ckpt.wait()
    return ckpt, events, states


def test_every_commit_gets_a_manifest_that_orbax_does_not_see(tmp_path, abstract):
    ckpt, events, _ = _saved(tmp_path, abstract, steps=(2, 4, 6), keep=2)
    ckpt.close()
    events.close()
    commits = _events(tmp_path / "events.jsonl", "checkpoint_commit")
    assert [e["step"] for e in commits] == [2, 4, 6]
    assert all(e["background_s"] >= 0 and e["files"] > 3 and e["bytes"] > 100_000 for e in commits)
    assert not (tmp_path / "checkpoints" / "2").exists()  # Orbax removed it, manifest and all (keep=2)
    for step in (4, 6):
        step_dir = tmp_path / "checkpoints" / str(step)
        listed = json.loads((step_dir / MANIFEST).read_text())["files"]
        on_disk = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                         if p.is_file() and p.name != MANIFEST)
        assert [f["path"] for f in listed] == on_disk  # every file, and nothing written after the commit
        for f in listed:
            data = (step_dir / f["path"]).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (f["size"], f["sha256"])
    # Orbax's own listing (a fresh manager reads the directory) sees the steps, not the manifests
    assert list(ocp.CheckpointManager(tmp_path / "checkpoints").all_steps()) == [4, 6]


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def _truncate(step_dir: Path) -> None:
    f = _data_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_bit(step_dir: Path) -> None:
    f = _data_file(step_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x04
    f.write_bytes(bytes(data))


def _delete_file(step_dir: Path) -> None:
    _data_file(step_dir).unlink()


def _uncommit(step_dir: Path) -> None:  # a crash before Orbax renamed the temporary directory
    step_dir.rename(step_dir.with_name(step_dir.name + ocp.path.step.TMP_DIR_SUFFIX))


def _mismatch_manifest(step_dir: Path) -> None:
    manifest = json.loads((step_dir / MANIFEST).read_text())
    manifest["files"][0]["sha256"] = "0" * 64
    (step_dir / MANIFEST).write_text(json.dumps(manifest))


def _truncate_without_manifest(step_dir: Path) -> None:  # nothing to verify against: Orbax itself fails
    (step_dir / MANIFEST).unlink()
    _truncate(step_dir)


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "truncated"), (_flip_bit, "corrupt"), (_delete_file, "incomplete"), (_uncommit, "uncommitted"),
    (_mismatch_manifest, "corrupt"), (_truncate_without_manifest, "unrestorable"),
])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_one_before_restored(tmp_path, abstract, damage, reason):
    ckpt, events, states = _saved(tmp_path, abstract)
    ckpt.close()
    damage(tmp_path / "checkpoints" / "4")
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3, events=events)
    restored = ckpt.restore_latest(_target(abstract))
    assert (restored.step, restored.skipped, restored.verified) == (2, [4], True)
    assert _equal(restored.state, states[2]) and restored.meta == {"step": 2}
    assert ckpt.all_steps() == [2]  # Orbax's manager forgot the step set aside
    ckpt.close()
    events.close()
    aside = tmp_path / "checkpoints_aside" / f"4-{reason}"
    assert aside.is_dir() and any(aside.rglob("*"))  # kept, not deleted
    [fallback] = _events(tmp_path / "events.jsonl", "checkpoint_fallback")
    assert (fallback["step"], fallback["reason"], fallback["moved_to"]) == (4, reason, str(aside))
    assert fallback["error"] and "\n" not in fallback["error"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [n for n in before if n.startswith("2")]
    assert list(ocp.CheckpointManager(tmp_path / "checkpoints").all_steps()) == [2]


def test_a_checkpoint_without_manifest_is_restored_with_a_note(tmp_path, abstract):
    """A crash between Orbax's commit and keel's manifest: usable if Orbax restores it, and said to be unverified."""
    ckpt, events, states = _saved(tmp_path, abstract)
    ckpt.close()
    (tmp_path / "checkpoints" / "4" / MANIFEST).unlink()
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3, events=events)
    restored = ckpt.restore_latest(_target(abstract))
    ckpt.close()
    assert (restored.step, restored.skipped, restored.verified) == (4, [], False)
    assert _equal(restored.state, states[4]) and "without verification" in restored.notes[0]


def test_nothing_usable_is_an_error_naming_each_checkpoint_and_deleting_none(tmp_path, abstract):
    ckpt, events, _ = _saved(tmp_path, abstract)
    ckpt.close()
    for step in (2, 4):
        _flip_bit(tmp_path / "checkpoints" / str(step))
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3, events=events)
    with pytest.raises(CheckpointError) as err:
        ckpt.restore_latest(_target(abstract))
    ckpt.close()
    for step in (4, 2):
        assert f"step {step}: corrupt" in str(err.value)
        assert str(tmp_path / "checkpoints_aside" / f"{step}-corrupt") in str(err.value)
    assert "nothing was deleted" in str(err.value) and "new run_dir" in str(err.value)


def test_checkpoints_that_restore_onto_no_target_are_left_in_place(tmp_path, abstract):
    """When no checkpoint restores (here: a model of another width), the run differs, not the checkpoints."""
    ckpt, events, _ = _saved(tmp_path, abstract)
    ckpt.close()
    other = abstract_state(load_config("tiny", [*TINY, "model.d_model=16"]))
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3, events=events)
    with pytest.raises(CheckpointError, match="can be restored onto this run") as err:
        ckpt.restore_latest(_target(other))
    ckpt.close()
    assert "step 4: cannot be restored onto this run" in str(err.value) and "left in place" in str(err.value)
    assert ckpt.all_steps() == [2, 4] and not (tmp_path / "checkpoints_aside").exists()


def test_set_aside_waits_for_the_save_in_flight_and_never_overwrites(tmp_path, abstract):
    events = EventLog(tmp_path / "events.jsonl")
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3, events=events)
    ckpt.save(2, _state(abstract, 2), {})
    ckpt.save(4, _state(abstract, 4), {})  # in flight
    moved = ckpt.set_aside(4, "rewind")
    assert moved == tmp_path / "checkpoints_aside" / "4-rewind" and (moved / MANIFEST).exists()
    assert (ckpt.all_steps(), ckpt.latest_step()) == ([2], 2)
    ckpt.save(4, _state(abstract, 5), {})  # the step again, after the rewind
    assert ckpt.set_aside(4, "rewind") == tmp_path / "checkpoints_aside" / "4-rewind-2"
    with pytest.raises(CheckpointError, match="no checkpoint of step 6"):
        ckpt.set_aside(6, "rewind")
    ckpt.close()
    events.close()
    assert [e["moved_to"] for e in _events(tmp_path / "events.jsonl", "checkpoint_set_aside")] == [
        str(moved), str(moved) + "-2"]


@contextlib.contextmanager
def _file_size_limit(nbytes: int):
    """Writes beyond `nbytes` fail with EFBIG ("File too large"), as a full disk or a quota fails them; root too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_failed_save_is_reported_at_the_next_poll_and_spares_earlier_checkpoints(tmp_path, abstract):
    # keep=1: the save of step 4 would remove step 2 once committed; it never commits, so step 2 stays
    ckpt, events, states = _saved(tmp_path, abstract, steps=(2,), keep=1)
    state_4 = _state(abstract, 4)
    t0 = time.monotonic()
    with _file_size_limit(32 << 10), pytest.raises(CheckpointError) as err:
        ckpt.save(4, state_4, {"step": 4})  # the write of its ~400 KB of arrays fails in the background
        while time.monotonic() < t0 + 60:
            ckpt.poll()  # what every maybe_save does
            time.sleep(0.01)
    message = str(err.value)
    assert "saving the checkpoint of step 4" in message and "File too large" in message
    assert f"earlier checkpoints are intact: step 2 in {tmp_path / 'checkpoints'}" in message
    ckpt.close()
    [failure] = _events(tmp_path / "events.jsonl", "checkpoint_failure")
    assert failure["step"] == 4 and "File too large" in failure["error"] and "\n" not in failure["error"]
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=1, events=events)
    restored = ckpt.restore_latest(_target(abstract))
    ckpt.close()
    events.close()
    assert (restored.step, restored.skipped) == (2, [4]) and _equal(restored.state, states[2])
    assert (tmp_path / "checkpoints_aside" / "4-uncommitted").is_dir()


def test_a_directory_that_cannot_be_written_is_refused_at_creation(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot be written"):
        Checkpointer(tmp_path / "a_file" / "checkpoints", keep=3)


# ------------------------------------------------------------------------------------ the real `keel train`

def _args(base: Path, small_corpus: str, store_cache: str, name: str) -> list[str]:
    return [*RUN, f"data.corpus={small_corpus}", f"data.cache_dir={store_cache}", f"run_dir={base / name}"]


def _train(args, *extra) -> int:
    return main(["train", "--no-progress", *args, *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus, store_cache):
    """An uninterrupted run of 6 steps (the reference) and the same run stopped at step 4 (checkpoints 2, 4),
    which each test copies, damages and extends."""
    base = tmp_path_factory.mktemp("runs")
    assert _train(_args(base, small_corpus, store_cache, "whole")) == 0
    assert _train(_args(base, small_corpus, store_cache, "short"), "train.stop_at=4") == 0
    return base


def _copy(runs: Path, tmp_path: Path, small_corpus: str, store_cache: str) -> tuple[Path, list[str]]:
    run = tmp_path / "run"
    shutil.copytree(runs / "short", run)
    return run, _args(tmp_path, small_corpus, store_cache, "run")


def _assert_final_params_equal_the_uninterrupted_run(run: Path, runs: Path) -> None:
    from keel.train.checkpoint import load_params

    cfg = load_config("tiny", RUN)
    (a, step_a), (b, step_b) = load_params(run, cfg), load_params(runs / "whole", cfg)
    assert step_a == step_b == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_corrupt_latest_checkpoint_resumes_from_the_one_before_bitwise(runs, tmp_path, small_corpus,
                                                                          store_cache, capsys):
    run, args = _copy(runs, tmp_path, small_corpus, store_cache)
    _flip_bit(run / "checkpoints" / "4")
    capsys.readouterr()
    assert _train(args) == 0  # extends the run to its 6 steps
    out = capsys.readouterr().out
    aside = run / "checkpoints_aside" / "4-corrupt"
    assert aside.is_dir() and f"moved it to {aside}" in out and "resumed from checkpoint at step 2" in out
    events = read_events(run / "events" / "host0000.jsonl")
    restores = [(e["step"], e["skipped"]) for e in events if e["kind"] == "checkpoint_restore"]
    assert restores == [(2, [4])]
    assert [(e["step"], e["reason"]) for e in events if e["kind"] == "checkpoint_fallback"] == [(4, "corrupt")]
    _assert_final_params_equal_the_uninterrupted_run(run, runs)


def test_no_usable_checkpoint_exits_3_and_says_where_each_went(runs, tmp_path, small_corpus, store_cache, capsys):
    run, args = _copy(runs, tmp_path, small_corpus, store_cache)
    before = {d.name: _files(d) for d in (run / "checkpoints").iterdir() if d.name.isdigit()}
    for step in (2, 4):
        _truncate(run / "checkpoints" / str(step))
    capsys.readouterr()
    assert _train(args) == EXIT_CHECKPOINT
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "to start over, use a new run_dir" in err
    for step in (2, 4):
        assert f"{run / 'checkpoints_aside' / f'{step}-truncated'}" in err
    aside = run / "checkpoints_aside"
    assert sorted(p.name for p in aside.iterdir()) == ["2-truncated", "4-truncated"]
    assert {d.name.split("-")[0]: _files(d) for d in aside.iterdir()} == before  # every file kept
    failure = read_events(run / "events" / "host0000.jsonl")[-1]
    assert (failure["kind"], failure["reason"]) == ("failure", "checkpoint_error")


def _subprocess_env() -> dict[str, str]:
    """The test session's compilation cache, so that the child loads the programs instead of compiling them."""
    env = dict(os.environ)
    if jax.config.jax_compilation_cache_dir:
        env |= {"JAX_COMPILATION_CACHE_DIR": str(jax.config.jax_compilation_cache_dir),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return env


def _keel_train(args: list[str], prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    """`keel train` in a child process (after `prefix`): its exit code and stderr. A hang at exit (the issue's
    20 minutes) is a TimeoutExpired."""
    out = subprocess.run([*prefix, sys.executable, "-m", "keel.cli", "train", "--no-progress", *args], cwd=ROOT,
                         env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    return out.returncode, out.stderr


def _file_size_limited(nbytes: int) -> tuple[str, ...]:
    """A prefix that runs a command with writes beyond `nbytes` failing (EFBIG), as a full disk fails them."""
    limit = "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); " \
            "os.execv(sys.argv[2], sys.argv[2:])"
    return (sys.executable, "-c", limit, str(nbytes))


def test_a_failed_save_exits_3_promptly_and_the_earlier_checkpoints_resume_bitwise(runs, tmp_path, small_corpus,
                                                                                    store_cache):
    run, args = _copy(runs, tmp_path, small_corpus, store_cache)
    shutil.move(run / "checkpoints" / "4", tmp_path / "4")  # resume from 2: the save of step 4 comes mid-run
    # writes beyond 32 KiB fail: the checkpoint's ~400 KB of arrays lie in a few files, events and metrics are small
    code, err = _keel_train(args, prefix=_file_size_limited(32 << 10))
    assert code == EXIT_CHECKPOINT, err[-3000:]
    message = next(line for line in err.splitlines() if line.startswith("keel: checkpoint error"))
    assert "saving the checkpoint of step 4" in message and "File too large" in message
    assert f"earlier checkpoints are intact: step 2 in {run / 'checkpoints'}" in err
    assert "Traceback" not in err and len(err.splitlines()) < 40, err  # once, not hundreds of lines
    events = read_events(run / "events" / "host0000.jsonl")
    attempt = [e["kind"] for e in events if e["attempt"] == events[-1]["attempt"]]
    assert [e["step"] for e in events if e["kind"] == "checkpoint_failure"] == [4]
    assert "end" not in attempt and not (run / "checkpoints" / "6").exists()  # stopped at the next save
    # the same command, once the disk has room again, resumes from 2 and computes what the whole run computed
    assert _train(args) == 0
    assert (run / "checkpoints_aside" / "4-uncommitted").is_dir()
    _assert_final_params_equal_the_uninterrupted_run(run, runs)


def _without_root_override() -> tuple[str, ...]:
    """A prefix under which root is subject to file permissions (chmod does not stop root otherwise)."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a directory unwritable")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--")


def test_an_unwritable_checkpoint_directory_exits_3_at_once_instead_of_hanging(runs, tmp_path, small_corpus,
                                                                               store_cache):
    """The issue: a `failure` event, then a hang at exit (Orbax's threads waiting for a directory that was never
    created). Now: refused before training, exit 3, a message that says what to do."""
    run, args = _copy(runs, tmp_path, small_corpus, store_cache)
    prefix = _without_root_override()
    (run / "checkpoints").chmod(0o555)
    try:
        code, err = _keel_train(args, prefix=prefix)
    finally:
        (run / "checkpoints").chmod(0o755)
    assert code == EXIT_CHECKPOINT, err[-3000:]
    assert f"checkpoint directory {run / 'checkpoints'} cannot be written" in err and "make it writable" in err
    events = read_events(run / "events" / "host0000.jsonl")
    last = [e["kind"] for e in events if e["attempt"] == events[-1]["attempt"]]
    assert last[-1] == "failure" and "step" not in last


@pytest.mark.slow  # a configuration of its own: the child compiles its programs
def test_a_directory_turning_read_only_mid_run_stops_the_run_at_the_next_save(tmp_path, small_corpus, store_cache):
    """Orbax creates a step's directory in the save's blocking part: when it cannot, the save fails in the training
    thread and the process exits at once (with Orbax's default, its writer threads waited 20 minutes)."""
    prefix = _without_root_override()
    run = tmp_path / "run"
    args = [*_args(tmp_path, small_corpus, store_cache, "run"), "train.steps=1000", "train.eval_every=1000",
            "checkpoint.every=10", "train.log_every=100"]
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "keel.cli", "train", "--no-progress", *args], cwd=ROOT,
                            env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "10").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    (run / "checkpoints").chmod(0o555)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        (run / "checkpoints").chmod(0o755)
    assert proc.returncode == EXIT_CHECKPOINT, err[-3000:]
    assert time.monotonic() - t0 < 120  # not Orbax's 20 minutes
    message = next(line for line in err.splitlines() if line.startswith("keel: checkpoint error"))
    assert "Permission denied" in message and "earlier checkpoints are intact: step" in err
    from keel.train.checkpoint import load_params

    _, step = load_params(run, load_config("tiny", args))
    assert step >= 10


@pytest.mark.slow  # two processes that compile everything, twice
def test_two_processes_fall_back_together(small_corpus, store_cache, tmp_path):
    """Process 0 verifies and moves; both restore the same earlier checkpoint and record the same decision."""
    from tests.test_multihost import _free_port

    args = [*_args(tmp_path, small_corpus, store_cache, "run"), "train.eval_every=6"]
    run = tmp_path / "run"

    def both(*extra: str) -> None:
        env = _subprocess_env() | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                   "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "JAX_NUM_PROCESSES": "2",
                                   "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
                                   "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        procs = [subprocess.Popen([sys.executable, "-m", "keel", "train", "--no-progress", *args, *extra], cwd=ROOT,
                                  env=env | {"JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        for p, out in zip(procs, outs, strict=True):
            assert p.returncode == 0, out[-3000:]

    both("train.stop_at=4")
    _flip_bit(run / "checkpoints" / "4")
    both()
    assert [p.name for p in (run / "checkpoints_aside").iterdir()] == ["4-corrupt"]
    for host in ("host0000", "host0001"):
        events = read_events(run / "events" / f"{host}.jsonl")
        assert [(e["step"], e["skipped"]) for e in events if e["kind"] == "checkpoint_restore"] == [(2, [4])]
        assert [e["moved_to"] for e in events if e["kind"] == "checkpoint_fallback"] == [
            str(run / "checkpoints_aside" / "4-corrupt")]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4", "6"]
