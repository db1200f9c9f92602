"""Checkpoints with Orbax: asynchronous saves, checksums, keep-last-k, and a restore that falls back.

A checkpoint holds the training state (`TrainState.as_dict()`) and a small JSON record with the run and data
fingerprints, so a resume that would silently change the run is refused (keel/train/resume.py).

On disk (the run directory):

    checkpoints/<step>/                      a committed checkpoint: Orbax's step directory
    checkpoints/<step>/keel_manifest.json    keel's checksums of every other file in it (path, size, sha256)
    checkpoints/<step>.orbax-checkpoint-tmp  a save in progress, or the remains of one that failed or crashed
    checkpoints_aside/<step>-<reason>[-n]    checkpoints keel will not use (unusable, or set aside by a rewind)

Saving. The directory is probed when the Checkpointer is created (a small file written, fsynced, removed): one
that cannot take a checkpoint is a CheckpointError before training starts. `save` returns once Orbax has copied the
state off the devices (the blocking part, the `checkpoint_save` span); Orbax writes and commits (renames the
temporary directory) in the background. Step directories are created in the blocking part (Orbax's
`create_directories_asynchronously=False`): when they cannot be, the save fails at once, in the training thread;
with Orbax's default its writer threads waited 20 minutes for a "directory created" signal that never came, and
kept the process from exiting. Orbax deletes checkpoints beyond `keep` only after a newer save has committed: a
failed save leaves every earlier checkpoint as it was.

Commit and checksums. Each save gets a watcher thread that waits for Orbax's commit (the end of its finalize
thread, which includes removing checkpoints beyond `keep`), then, on process 0, hashes every file of the committed
step directory and writes the manifest (write, fsync, rename). Hashing runs in the background, off the step path
(about 0.3-0.5 s per GB on 2 CPU cores); the save's blocking part is unchanged. The training thread learns the
outcome without waiting at the next `poll` (which `maybe_save` calls every time, whether or not a save is due),
and waits for it at the next `save`, `wait`, `set_aside`, restore or `close`: a `checkpoint_commit` event {step,
background_s (end of the blocking part -> commit), manifest_s, files, bytes}, or a `checkpoint_failure` event
{step, error, traceback} and a CheckpointError naming the step, the directory, the error in one line and the
checkpoints still intact. A crash between a commit and its manifest leaves a checkpoint without one: it is
restored if Orbax can restore it, and the restore notes that it was not verified.

Restoring. `restore_latest` first sets aside the remains of uncommitted saves, then tries the committed
checkpoints, latest first: the manifest is verified (a missing file is "incomplete", a size that differs
"truncated", a checksum that differs or an unreadable manifest "corrupt"; about 0.6 s per GB), then Orbax restores
it. A checkpoint that fails its checksums is moved to checkpoints_aside/ at once (never deleted), Orbax's manager
forgets it (`reload`), a `checkpoint_fallback` event {step, reason, error, moved_to} is written, and the next
earlier one is tried. One that Orbax cannot restore (any exception) is set aside as "unrestorable" only once an
earlier one restores onto the same target; if none does, the run differs from the one that wrote them (a changed
model, too little memory, another Orbax version), nothing is moved, and the CheckpointError says so. When every
checkpoint is unusable, the CheckpointError lists each and where it went. Orbax's step listing only looks at the
names of `checkpoints/`'s entries (decimal step numbers, committed), so the manifest inside a step directory and
the aside directory next to `checkpoints/` are invisible to it.

Noise. Orbax logs a failing save from each of its threads with a full traceback, asyncio reports each failed task,
and TensorStore's late callbacks print "Event loop is closed" dozens of times: hundreds of lines around one error.
While keel reports the error once, Orbax's error records are cut to their first line and the rest is dropped
(`_condense_orbax_noise`, process-wide).

Multi-process runs (one shared filesystem): every process takes the same decisions because they are made
together. Process 0 verifies the manifest and broadcasts the verdict; every process restores its shards and the
processes agree (all-gather) that all of them succeeded, else the checkpoint is unusable everywhere; only process 0
moves directories, between two barriers, after which every process reloads its listing. The write probe at
creation and `poll` (a save that failed on any process stops every process at the same step) are agreed the same
way. A process that fails inside Orbax while the others wait at one of Orbax's barriers is released by Orbax's own
timeout (20 minutes by default): that limit is Orbax's.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from keel.config import Config
from keel.errors import CheckpointError
from keel.train.events import EventLog
from keel.train.state import TrainState, abstract_state

MANIFEST = "keel_manifest.json"
ASIDE_DIR = "checkpoints_aside"
UNCOMMITTED = re.compile(rf"^(\d+){re.escape(ocp.path.step.TMP_DIR_SUFFIX)}")
HASH_THREADS = min(8, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class ManifestSummary:
    files: int
    bytes: int
    seconds: float


def write_manifest(step_dir: Path) -> ManifestSummary:
    """Hash every file of a committed step directory and write `keel_manifest.json` in it atomically."""
    t0 = time.monotonic()
    paths = sorted(p for p in step_dir.rglob("*") if p.is_file() and not p.name.startswith((MANIFEST, f".{MANIFEST}")))
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        digests = list(pool.map(_sha256, paths))
    files = [{"path": p.relative_to(step_dir).as_posix(), "size": size, "sha256": digest}
             for p, (size, digest) in zip(paths, digests, strict=True)]
    _durable_write(step_dir / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1).encode())
    return ManifestSummary(len(files), sum(f["size"] for f in files), time.monotonic() - t0)


@dataclass(frozen=True)
class Verdict:
    """What the manifest says about a step directory: `reason` None when usable (`verified`: checksums matched;
    False: there was no manifest to check)."""

    reason: str | None
    detail: str = ""
    verified: bool = True


def verify_manifest(step_dir: Path) -> Verdict:
    """Check every file the manifest lists: present ("incomplete"), same size ("truncated"), same sha256
    ("corrupt"). Files it does not list are ignored."""
    path = step_dir / MANIFEST
    if not path.exists():
        return Verdict(None, "no checksums: restored without verification (a crash between its commit and its "
                             "manifest?)", verified=False)
    try:
        files = json.loads(path.read_bytes())["files"]
        entries = [(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in files]
    except (ValueError, KeyError, TypeError) as e:
        return Verdict("corrupt", f"{MANIFEST} is unreadable ({type(e).__name__}: {e})")
    missing = [rel for rel, _, _ in entries if not (step_dir / rel).is_file()]
    if missing:
        return Verdict("incomplete", f"{len(missing)} file(s) missing, e.g. {missing[0]}")
    try:
        for rel, size, _ in entries:
            if (actual := (step_dir / rel).stat().st_size) != size:
                return Verdict("truncated", f"{rel} has {actual:,} bytes, {size:,} were written")
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            digests = list(pool.map(_sha256, [step_dir / rel for rel, _, _ in entries]))
    except OSError as e:  # an I/O error reading it back
        return Verdict("corrupt", f"cannot be read ({type(e).__name__}: {e})")
    for (rel, _, expected), (_, actual) in zip(entries, digests, strict=True):
        if actual != expected:
            return Verdict("corrupt", f"{rel}: sha256 {actual[:12]}... differs from the {expected[:12]}... written")
    return Verdict(None)


def _sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _durable_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename: after a crash the file is either absent or whole, never torn."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SetAside:
    """A checkpoint moved out of `checkpoints/`: why, the error that said so, and where it is now."""

    step: int
    reason: str
    error: str
    moved_to: Path


@dataclass(frozen=True)
class Restored:
    """The outcome of `restore_latest`: the state and record of checkpoint `step`, and what was set aside first."""

    state: TrainState
    meta: dict[str, Any]
    step: int
    set_aside: tuple[SetAside, ...] = ()
    verified: bool = True  # False: the checkpoint had no manifest (restored because Orbax could restore it)
    notes: tuple[str, ...] = ()

    @property
    def skipped(self) -> list[int]:
        return [a.step for a in self.set_aside]


class _Unusable(Exception):
    def __init__(self, reason: str, error: str):
        super().__init__(f"{reason}: {error}")
        self.reason, self.error = reason, error


@dataclass
class _PendingSave:
    """A save whose background part is running: a watcher thread waits for Orbax's commit, then writes the
    manifest (on process 0). The training thread reads the outcome after `thread` has ended."""

    step: int
    blocking_end: float
    thread: threading.Thread | None = None
    error: BaseException | None = None
    background_s: float = 0.0
    manifest: ManifestSummary | None = None

    def ended(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()


# ---------------------------------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Orbax's CheckpointManager with checksums, failure reporting and fallback (see the module docstring).

    `every`: the cadence of `maybe_save`; `events`: where checkpoint events go (None: nowhere); `read_only`: for
    readers of a run (export, generate): nothing is created, probed or moved."""

    def __init__(self, directory: Path, keep: int, async_save: bool = True, every: int = 0,
                 events: EventLog | None = None, *, read_only: bool = False):
        self.directory = directory.resolve()
        self.aside_directory = self.directory.parent / ASIDE_DIR
        self.every = every
        self.events = events
        self.read_only = read_only
        self._pending: _PendingSave | None = None
        if not read_only:
            _agree_writable(self.directory)
        _condense_orbax_noise()
        absl = logging.getLogger("absl")
        level = absl.level
        if read_only:  # Orbax warns three times that a read-only manager will not save: it is meant to be so
            absl.setLevel(logging.ERROR)
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=None if read_only else keep, enable_async_checkpointing=async_save,
                    read_only=read_only,
                    async_options=ocp.AsyncOptions(create_directories_asynchronously=False)),
            )
        finally:
            absl.setLevel(level)

    # -- listing

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def uncommitted(self) -> list[Path]:
        """The temporary directories of saves that never committed (none while no save is in flight)."""
        if not self.directory.is_dir():
            return []
        return sorted((p for p in self.directory.iterdir() if UNCOMMITTED.match(p.name)), key=lambda p: p.name)

    def has_any(self) -> bool:
        """Whether there is anything to restore or to set aside: a committed checkpoint or an uncommitted save."""
        return self.latest_step() is not None or bool(self.uncommitted())

    # -- saving

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def maybe_save(self, step: int, state: TrainState, meta: dict[str, Any], force: bool = False) -> None:
        """Report the previous save's outcome if it is known (`poll`), then save if `step` is due (or `force`)."""
        self.poll()
        if force or self.due(step):
            self.save(step, state, meta)

    def poll(self) -> None:
        """Without waiting: if the previous save's background part has ended, its `checkpoint_commit` event, or
        its `checkpoint_failure` event and CheckpointError. With several processes every process calls it at the
        same step, and a save that failed on one stops them all there."""
        pending = self._pending
        failed = pending is not None and pending.ended() and pending.error is not None
        if not _all_processes(not failed) and not failed:  # another process's save failed: stop here too
            self._pending = None
            raise CheckpointError(f"the checkpoint of step {pending.step if pending else '?'} failed to save on "
                                  f"another process (its events say why); earlier checkpoints are untouched")
        self._settle(block=False)

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Returns once the state is copied off the device; the write finishes in the background. A previous save
        still in flight is waited for first (a `checkpoint_wait` span; Orbax would wait for its commit anyway)."""
        if self._pending is not None:
            self.wait()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state.as_dict()), meta=ocp.args.JsonSave(meta))
        with self._span("checkpoint_save", step=step):
            try:
                started = self.manager.save(step, args=args)
            except Exception as e:
                raise self._failed(step, e) from e
            if started:
                self._watch(_PendingSave(step, time.monotonic()))

    def wait(self) -> None:
        """Block until the last save is committed and checksummed (the `checkpoint_wait` event)."""
        with self._span("checkpoint_wait"):
            self._settle(block=True)

    def _watch(self, pending: _PendingSave) -> None:
        writes_manifest = jax.process_index() == 0

        def run() -> None:
            try:
                self.manager.wait_until_finished()
                pending.background_s = time.monotonic() - pending.blocking_end
                if writes_manifest:
                    pending.manifest = write_manifest(self.directory / str(pending.step))
            except BaseException as e:  # reported by the training thread (`_settle`)
                pending.error = e

        pending.thread = threading.Thread(target=run, name=f"keel-checkpoint-{pending.step}", daemon=True)
        self._pending = pending
        pending.thread.start()

    def _settle(self, block: bool) -> None:
        pending = self._pending
        if pending is None or pending.thread is None or (not block and not pending.ended()):
            return
        pending.thread.join()
        self._pending = None
        if pending.error is not None:
            raise self._failed(pending.step, pending.error) from pending.error
        fields: dict[str, Any] = {"step": pending.step, "background_s": pending.background_s}
        if pending.manifest is not None:
            fields |= {"manifest_s": pending.manifest.seconds, "files": pending.manifest.files,
                       "bytes": pending.manifest.bytes}
        self._emit("checkpoint_commit", **fields)

    def _failed(self, step: int, error: BaseException) -> CheckpointError:
        """The `checkpoint_failure` event and the error the run stops with."""
        with contextlib.suppress(Exception):
            self.manager.reload()  # Orbax dropped the step it meant to delete after this save from its listing
        line = one_line(error)
        self._emit("checkpoint_failure", step=step, error=line,
                   traceback="".join(traceback.format_exception(error)))
        intact = self.all_steps()
        kept = "no earlier checkpoint exists"
        if intact:
            kept = (f"earlier checkpoints are intact: step{'s' if len(intact) > 1 else ''} "
                    f"{', '.join(map(str, intact))} in {self.directory}; once the cause is fixed (space, quota, "
                    f"permissions), the same command resumes from step {intact[-1]}")
        return CheckpointError(
            f"saving the checkpoint of step {step} to {self.directory / str(step)} failed: {line}\n{kept} (the "
            f"incomplete save, if any, is set aside when the run resumes; nothing was deleted)")

    # -- restoring

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """The state at `step` restored onto `target`'s shapes, dtypes and shardings, and the saved record; its
        checksums are verified first. No fallback: an unusable checkpoint is a CheckpointError."""
        self._settle(block=True)
        try:
            state, meta, _ = self._try(step, target)
        except _Unusable as u:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} is {u.reason}: {u.error}\n(`keel train` would set it "
                f"aside and resume from an earlier one)") from None
        return state, meta

    def restore_latest(self, target: TrainState) -> Restored | None:
        """The latest usable checkpoint restored onto `target`, after setting aside the remains of uncommitted
        saves (`set_aside_uncommitted`) and every later checkpoint that is unusable (`checkpoint_fallback`
        events). None when there is no committed checkpoint at all; a CheckpointError when there were some and
        none is usable.

        A checkpoint whose checksums fail is set aside at once. One that Orbax cannot restore is set aside only
        once an earlier one restores onto the same `target`: when none does, the cause is the run (a changed
        model, too little memory, another Orbax version), not the checkpoints, and they are left in place."""
        aside = self.set_aside_uncommitted()
        unrestorable: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                state, meta, verdict = self._try(step, target)
            except _Unusable as u:
                if u.reason == "unrestorable":
                    unrestorable.append((step, u.error))
                else:
                    aside.append(self._move_aside(step, u.reason, u.error))
                continue
            aside += [self._move_aside(s, "unrestorable", error) for s, error in unrestorable]
            notes = () if verdict.verified else (f"checkpoint {step}: {verdict.detail}",)
            return Restored(state, meta, step, tuple(aside), verdict.verified, notes)
        moved = [a for a in aside if a.reason != "uncommitted"]
        lines = [f"step {a.step}: {a.reason} ({a.error}); moved to {a.moved_to}" for a in moved]
        lines += [f"step {s}: cannot be restored onto this run ({error}); left in place" for s, error in unrestorable]
        if unrestorable:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored onto this run:\n  " + "\n  ".join(lines)
                + "\nwhen no checkpoint restores, the run differs from the one that wrote them (model or optimizer "
                  "configuration, memory, Orbax version); nothing was deleted")
        if moved:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}; each was set aside (nothing was deleted):\n  "
                + "\n  ".join(lines) + f"\nto resume from one anyway, move it back to {self.directory}/<step>; to "
                  f"start over, use a new run_dir")
        return None

    def _try(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any], Verdict]:
        """Verify, then restore, checkpoint `step`, agreed by every process; _Unusable says why not."""
        verdict = _verdict_of_process0(self.directory / str(step))
        if verdict.reason is not None:
            raise _Unusable(verdict.reason, verdict.detail)
        error = None
        try:
            with _quiet_library_noise():
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target.as_dict()), meta=ocp.args.JsonRestore()))
        except Exception as e:
            error = one_line(e)
        if not _all_processes(error is None):
            raise _Unusable("unrestorable", error or "the restore failed on another process")
        return TrainState.from_dict(out["state"]), dict(out["meta"]), verdict

    # -- setting aside

    def set_aside(self, step: int, reason: str) -> Path:
        """Move checkpoint `step` to checkpoints_aside/<step>-<reason> after any save in flight has committed
        (for a rewind: the checkpoints after a loss spike); Orbax forgets it and nothing is deleted. Every process
        calls it; a `checkpoint_set_aside` event. Returns where it went."""
        self._settle(block=True)
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory} to set aside")
        moved = self._move_aside(step, reason, "", event="checkpoint_set_aside")
        return moved.moved_to

    def set_aside_uncommitted(self) -> list[SetAside]:
        """Move the remains of saves that never committed (a crash or a failure while writing) to
        checkpoints_aside/<step>-uncommitted, with `checkpoint_fallback` events. Every process calls it."""
        self._settle(block=True)
        found = self.uncommitted()
        _barrier("keel-checkpoint-uncommitted")  # every process has listed before process 0 moves any
        return [self._move_aside(int(UNCOMMITTED.match(p.name).group(1)), "uncommitted",
                                 "the save never committed", path=p) for p in found]

    def _move_aside(self, step: int, reason: str, error: str, path: Path | None = None,
                    event: str = "checkpoint_fallback") -> SetAside:
        source = path or self.directory / str(step)
        target = _unique(self.aside_directory / f"{step}-{_slug(reason)}")
        _barrier(f"keel-checkpoint-aside-{source.name}")
        error_moving = None
        if jax.process_index() == 0:
            try:
                self.aside_directory.mkdir(parents=True, exist_ok=True)
                os.rename(source, target)  # the same filesystem: atomic, nothing copied
            except OSError as e:
                error_moving = f"{type(e).__name__}: {e}"
        if not _all_processes(error_moving is None):  # also the barrier after the move
            raise CheckpointError(
                f"checkpoint {source} is {reason} ({error}) but could not be moved to {target} "
                f"({error_moving or 'on process 0'}); move it out of {self.directory} yourself and run again")
        self.manager.reload()
        fields = {"step": step, "reason": reason, "moved_to": str(target)}
        self._emit(event, **(fields | ({"error": error} if event == "checkpoint_fallback" else {})))
        return SetAside(step, reason, error, target)

    # -- events, closing

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(kind, **fields)

    def _span(self, kind: str, **fields: Any) -> contextlib.AbstractContextManager:
        return self.events.span(kind, **fields) if self.events is not None else contextlib.nullcontext()

    def close(self) -> None:
        """Wait for any save in flight, then release the manager. Never raises on account of a failed save (the
        error path that closes has its own error; the normal path calls `wait` first, which raises): a failure
        not reported yet is recorded as a `checkpoint_failure` event."""
        with contextlib.suppress(CheckpointError):
            self._settle(block=True)
        with contextlib.suppress(Exception):
            self.manager.wait_until_finished()  # re-raises, once per thread, a failure already reported
        with contextlib.suppress(Exception):
            self.manager.close()


def load_params(run_dir: str | Path, cfg: Config, step: int | None = None) -> tuple[Any, int]:
    """The parameters of a run's checkpoint (latest by default), on the default device, as numpy arrays; the
    checkpoint's checksums are verified."""
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", keep=cfg.checkpoint.keep, async_save=False, read_only=True)
    try:
        steps = ckpt.all_steps()
        if step is not None and step not in steps:
            raise CheckpointError(f"{run_dir} has no checkpoint of step {step}; it has "
                                  f"{', '.join(map(str, steps)) or 'none'}")
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{run_dir} has no checkpoint")
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract_state(cfg))
        state, _ = ckpt.restore(step, target)
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, state.params), step


# ---------------------------------------------------------------------------------------------------- helpers


def one_line(e: BaseException, limit: int = 400) -> str:
    """The innermost cause of a library error, on one line and without TensorStore's spec: what a person reads."""
    chain = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain and len(chain) < 8:
        chain.append(nxt)
    inner = next((x for x in reversed(chain) if str(x).strip()), e)
    text = (str(inner).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
    if len(text) > limit:  # the cause is usually at the end ("... Failed to write 1024 bytes: File too large")
        text = f"{text[:limit // 3]} ... {text[-(limit - limit // 3 - 5):]}"
    return f"{type(inner).__name__}: {text}"


def _agree_writable(directory: Path) -> None:
    """Create the directory and write, fsync and delete a small file in it, on every process: a directory that
    cannot take a checkpoint is a CheckpointError before training starts, not at the first save."""
    probe = directory / f".keel-write-probe-{jax.process_index()}-{os.getpid()}"
    error = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"keel checks that checkpoints can be written here\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        error = f"{type(e).__name__}: {e.strerror or e}"
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    if not _all_processes(error is None):
        raise CheckpointError(
            f"checkpoint directory {directory} cannot be written ({error or 'on another process'}); make it "
            f"writable (permissions, free space, quota) or choose another run_dir, then run again")


def _unique(path: Path) -> Path:
    n = 1
    candidate = path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _slug(reason: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", reason.lower()).strip("-") or "aside"


# Multi-process agreement. Single-process runs never touch the collectives.

def _all_processes(ok: bool) -> bool:
    """Whether `ok` holds on every process (an all-gather); every process must call it."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([int(ok)], np.int32))))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


VERDICT_CODES = (None, "incomplete", "truncated", "corrupt")


def _verdict_of_process0(step_dir: Path) -> Verdict:
    """Process 0 reads the manifest and hashes the files; every process gets its verdict."""
    if jax.process_count() == 1:
        return verify_manifest(step_dir)
    from jax.experimental import multihost_utils

    mine = verify_manifest(step_dir) if jax.process_index() == 0 else Verdict(None)
    code = VERDICT_CODES.index(mine.reason) * 2 + int(mine.verified)
    code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
    reason, verified = VERDICT_CODES[code // 2], bool(code % 2)
    return mine if jax.process_index() == 0 else Verdict(reason, "found by process 0 (see its events)", verified)


@contextlib.contextmanager
def _quiet_library_noise() -> Iterator[None]:
    """A restore that fails leaves Orbax's asyncio tasks to be collected later, each printing a traceback
    ("Event loop is closed", "exception never retrieved") or a RuntimeWarning ("coroutine ... was never
    awaited"); the error itself is reported once, by keel."""
    hook, level = sys.unraisablehook, logging.getLogger("asyncio").level
    sys.unraisablehook = lambda unraisable: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
            gc.collect()
        sys.unraisablehook = hook
        logging.getLogger("asyncio").setLevel(level)


class _OneLineOrbaxErrors(logging.Filter):
    """Orbax logs a failing save from each of its threads with a full traceback (hundreds of lines), and asyncio
    reports each of its tasks that failed with it; keel reports the failure itself, once, with the full
    traceback in the `checkpoint_failure` event. Orbax's records keep their first line; asyncio's about Orbax's
    tasks are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio":
            return not _from_orbax(record)
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            record.msg, record.args = (record.getMessage().splitlines() or [""])[0], None
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


# What marks an asyncio record as one of Orbax's: its code in the traceback or the message, or, for a future whose
# exception TensorStore set from C++ (no Python frames), the save's temporary directory or TensorStore's own words.
_ORBAX_MARKS = (f"{os.sep}orbax{os.sep}", ".orbax-checkpoint-tmp", "OCDBT database", "tensorstore")


def _from_orbax(record: logging.LogRecord) -> bool:
    """Whether an asyncio record is about one of Orbax's tasks or futures (keel itself runs no asyncio)."""
    tb = record.exc_info[2] if record.exc_info else None
    message = record.getMessage()
    return any(mark in message for mark in _ORBAX_MARKS) or any(
        f"{os.sep}orbax{os.sep}" in frame.filename for frame in traceback.extract_tb(tb))


class _WithoutOrbaxLeftovers:
    """An unraisable-exception hook that drops what a failed save leaves behind: TensorStore's callbacks landing
    on Orbax's closed event loop ("Event loop is closed") and Orbax's coroutines collected unfinished (at the
    latest at exit), dozens of tracebacks that say nothing about the failure."""

    def __init__(self, hook: Any):
        self.hook = hook

    def __call__(self, unraisable: Any) -> None:
        e, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        closed_loop = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
        if not (closed_loop or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename)):
            self.hook(unraisable)


_ONE_LINE = _OneLineOrbaxErrors()


def _condense_orbax_noise() -> None:
    """Process-wide and idempotent: Orbax's error records on one line, its leftovers dropped."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_ONE_LINE)  # the same filter object is added once
    if not isinstance(sys.unraisablehook, _WithoutOrbaxLeftovers):
        sys.unraisablehook = _WithoutOrbaxLeftovers(sys.unraisablehook)
