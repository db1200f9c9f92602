"""Start or continue a run: every check that keeps a resumed run the same run lives here.

Running `keel train` twice on one run directory continues the run: the saved config must agree (up to the keys
in `RESUMABLE_KEYS`), the data that trained the checkpoint must be the data that continues it, and the part of
the skip list before the checkpoint must be unchanged. The data order is a function of the step, so a resumed
run computes bitwise what an uninterrupted run computes (on CPU).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from keel.config import Config, ConfigError, dump_yaml, flatten, load_saved_config, resume_differences
from keel.errors import CheckpointError
from keel.io import atomic_write
from keel.train.checkpoint import Checkpointer
from keel.train.events import EventLog
from keel.train.plan import StepPlan
from keel.train.run import Run
from keel.train.state import TrainState

RETRY = "\nuse a new run_dir, or pass --allow-config-change to resume anyway"


def check_run_dir(cfg: Config, run_dir: Path, allow_config_change: bool) -> None:
    """A run directory holds one run: refuse a config that would change it, then record the config."""
    saved_path = run_dir / "config.yaml"
    if saved_path.exists():
        diffs = resume_differences(load_saved_config(saved_path), cfg)
        if diffs and imported_untrained(run_dir):  # only the model, its tokenizer and the optimizer are fixed yet
            diffs = [d for d in diffs if d.startswith(IMPORT_FIXED) and not d.startswith(IMPORT_FREE)]
        if diffs and not allow_config_change:
            raise ConfigError(f"{run_dir} holds a run with a different configuration; resuming would change it:\n  "
                              + "\n  ".join(diffs) + RETRY)
    if jax.process_index() == 0:
        atomic_write(saved_path, dump_yaml(cfg))


# Before an imported run's first trained checkpoint: the model and the token ids are the checkpoint's, and the
# optimizer is the one whose state the step-0 checkpoint holds (another would not restore); how the model runs
# (remat, compute dtype, attention kernel) and every training setting may still change.
IMPORT_FIXED = ("model.", "data.tokenizer:", "optim.name:")
IMPORT_FREE = ("model.remat:", "model.compute_dtype:", "model.attention:")


def imported_untrained(run_dir: Path) -> bool:
    """A run directory `keel import` made that has not trained yet: step 0 is its only checkpoint, and its events
    record no committed checkpoint (a trained one whose later checkpoints were deleted is not untrained)."""
    if not (run_dir / "imported.json").exists():
        return False
    steps = {p.name for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()}
    # the events are read last: on a long run they are large, and only an imported run at step 0 needs them
    return steps <= {"0"} and not any(committed_before(p) for p in sorted((run_dir / "events").glob("host*.jsonl")))


def checkpoint_meta(cfg_fingerprint: str, data_fingerprint: str, data_description: dict, plan: StepPlan) -> dict:
    """The record saved with every checkpoint: what a resume compares against."""
    return {"run_fingerprint": cfg_fingerprint, "data_fingerprint": data_fingerprint, "data": data_description,
            "skip_steps": [list(r) for r in plan.skip.ranges]}


def data_differences(saved_meta: dict[str, Any], meta: dict[str, Any], plan: StepPlan, step: int) -> list[str]:
    """What differs between the data that trained a checkpoint at `step` and the data that would continue it."""
    saved, now = flatten(saved_meta.get("data", {})), flatten(meta["data"])
    diffs = [f"data {k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
    if not saved_meta.get("data") and saved_meta.get("data_fingerprint") != meta["data_fingerprint"]:
        diffs.append(f"data fingerprint {saved_meta.get('data_fingerprint')} -> {meta['data_fingerprint']}")
    return diffs + plan.resume_differences(saved_meta.get("skip_steps", []), step)


def restore_or_init(run: Run, ckpt: Checkpointer, meta: dict[str, Any], plan: StepPlan, events: EventLog,
                    allow_config_change: bool, log: Callable[[str], None], restart_from_scratch: bool = False
                    ) -> TrainState:
    """The latest usable checkpoint's state if there is one (after the data checks), else a fresh state.

    A checkpoint that is incomplete, corrupt or cannot be restored is set aside (checkpoints_aside/, never
    deleted) and the one before it is tried (keel/train/checkpoint.py); the `checkpoint_restore` span names the
    step restored and the steps `skipped`. A run directory whose events say it committed checkpoints that are
    no longer there is not silently started over (`restart_from_scratch` says to)."""
    if not ckpt.has_any():
        check_history(events, restart_from_scratch)
        with events.span("init"):
            return run.init()
    with events.span("checkpoint_restore") as span:
        aside = ckpt.set_aside_uncommitted()
        restored = ckpt.restore_latest(run.restore_target())
        aside += restored.set_aside if restored else ()
        span.update(step=restored.step if restored else None, skipped=[a.step for a in aside],
                    verified=restored.verified if restored else None)
    for a in aside:
        log(f"checkpoint {a.step} is {a.reason} ({a.error}); moved it to {a.moved_to}")
    if restored is None:  # only the remains of saves that never committed
        check_history(events, restart_from_scratch)
        with events.span("init"):
            return run.init()
    for note in restored.notes:
        log(note)
    if restored.step == 0:  # `keel import`'s: refuse it if the events say later checkpoints were committed
        check_history(events, restart_from_scratch)
    # a step-0 checkpoint has seen no data: any data may start it
    diffs = data_differences(restored.meta, meta, plan, restored.step) if restored.step > 0 else []
    if diffs:
        message = (f"checkpoint {restored.step} in {ckpt.directory.parent} was trained on other data; resuming "
                   f"would change what the model saw:\n  " + "\n  ".join(diffs))
        if not allow_config_change:
            raise ConfigError(message + RETRY)
        log(message + "\n(--allow-config-change: continuing with the new data order)")
    log(f"resumed from checkpoint at step {restored.step}"
        + (f" (set aside: {', '.join(str(a.step) for a in aside)})" if aside else ""))
    return restored.state


def check_history(events: EventLog, restart_from_scratch: bool) -> None:
    """Before a run directory without a checkpoint starts from step 0: if its events show a committed checkpoint
    that is neither here nor set aside (deleted, moved by hand), refuse unless `restart_from_scratch`. A run that
    crashed before its first commit, or whose checkpoints were all set aside, starts over without asking."""
    last = committed_before(events.path)
    aside = events.path.parent.parent / "checkpoints_aside"
    if last is None or (aside.is_dir() and any(p.name.split("-")[0] == str(last) for p in aside.iterdir())):
        return  # nothing committed, or the last checkpoint was set aside (corrupt, or a rewind before it)
    if not restart_from_scratch:
        raise CheckpointError(
            f"{events.path.parent.parent} holds a run that committed checkpoints (the last at step {last}), but none "
            f"is in {events.path.parent.parent / 'checkpoints'} now; starting over would train from step 0 and "
            f"replace its history. Restore the checkpoints, or pass --restart-from-scratch to start again")
    events.emit("restart_from_scratch", last_committed=last)


def committed_before(path: Path) -> int | None:
    """The last step a run's event file says was committed (`checkpoint_commit`); None if none was."""
    if not path.exists():
        return None
    last = None
    with open(path) as f:
        for line in f:
            if '"restart_from_scratch"' in line:  # commits before a deliberate fresh start do not count
                last = None
            elif '"checkpoint_commit"' in line:
                try:
                    last = int(json.loads(line)["step"])
                except (ValueError, KeyError, TypeError):
                    continue
    return last
