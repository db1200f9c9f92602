"""The fault-injection harness: a real, supervised `keel train` under random SIGKILLs, a hang, a corrupted
latest checkpoint and a loss spike; then the checks that recovery needed no person and lost nothing.

`run_chaos` launches `keel train` (the supervisor) and, while it trains, kills the training process (never
the supervisor) with SIGKILL at random moments of three kinds: during start-up (data, restore, compilation),
between steps, and right after a checkpoint save began (its background write in flight). Once, right after a
kill, it corrupts the latest committed checkpoint (truncates its largest file) before the supervisor's restart.
`KEEL_INJECT` adds a hang and a loss spike (keel/train/faults.py). Then `check_chaos` verifies:

- the job ended with exit 0 and reached `train.steps`;
- no committed checkpoint was lost: every restart restored the latest checkpoint committed before its kill,
  except after the deliberate corruption, where it fell back and the bad one is kept aside;
- the final parameters are bitwise those of an uninterrupted run given the same skip decisions (the spike's
  rewind skips its batch; everything else must replay exactly);
- `keel goodput`'s buckets sum to the wall time within 0.1 %.

Used by tests/test_chaos.py (a small model, in the full suite) and benchmarks/fault_injection.py (any config).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.train.events import read_events

KILL_KINDS = ("startup", "step", "save")


@dataclass
class ChaosReport:
    returncode: int
    wall_s: float
    kills: list[dict[str, Any]] = field(default_factory=list)  # {"kind", "t", "step", "committed", "pid"}
    corrupted: int | None = None  # the checkpoint step that was corrupted
    log: str = ""


def committed_steps(run_dir: Path) -> list[int]:
    """Checkpoint steps committed on disk (Orbax writes a save under a temporary name and renames it at commit)."""
    root = run_dir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def _child_pid(run_dir: Path, supervisor: int) -> int | None:
    """The live training process's pid, from the run directory's lock (the child holds it)."""
    try:
        text = (run_dir / ".lock-host0000").read_text().split()
        pid = int(text[1])
    except (OSError, IndexError, ValueError):
        return None
    if pid == supervisor:
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    try:  # a zombie is dead already
        if (Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]) == "Z":
            return None
    except OSError:
        pass
    return pid


def _events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events" / "host0000.jsonl"
    return read_events(path) if path.exists() else []


def _last_step(events: Sequence[dict[str, Any]]) -> int:
    """The highest step any attempt has reported (0: none yet)."""
    return max([e["step"] for e in events if e["kind"] == "step"], default=0)


def _corrupt_latest(run_dir: Path) -> int | None:
    """Truncate the largest file of the latest committed checkpoint to half its size (the training process is
    dead and the supervisor in its backoff); its step, or None while there are fewer than two (with one, there
    is nothing to fall back to: keel stops with exit 3, rightly)."""
    steps = committed_steps(run_dir)
    for step in reversed(steps if len(steps) >= 2 else []):
        files = [p for p in (run_dir / "checkpoints" / str(step)).rglob("*") if p.is_file()]
        if files:
            victim = max(files, key=lambda p: p.stat().st_size)
            with open(victim, "r+b") as f:
                f.truncate(victim.stat().st_size // 2)
            return step
    return None


def run_chaos(train_args: Sequence[str], run_dir: Path, *, kills: int, steps: int, seed: int = 0,
              hang_at: int | None = None, spike_at: int | None = None, corrupt_at_kill: int | None = None,
              max_gap_steps: int = 12, timeout_s: float = 1800, say: Callable[[str], None] = lambda s: None
              ) -> ChaosReport:
    """Train `train_args` (which must set run_dir=`run_dir`, `train.steps`=`steps`) under the faults above.
    `corrupt_at_kill`: the index of the kill after which the latest checkpoint is corrupted (None: never);
    `max_gap_steps`: a kill between steps comes 1 to this many steps into a process's training."""
    rng = random.Random(seed)
    inject = ",".join([f"hang@{hang_at}"] * (hang_at is not None) + [f"spike@{spike_at}"] * (spike_at is not None))
    env = {**os.environ, "KEEL_INJECT": inject}
    log_path = run_dir.parent / f"{run_dir.name}.chaos.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    report = ChaosReport(returncode=-1, wall_s=0.0)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "keel", "train", "--no-progress", *train_args,
                                 f"train.max_restarts={kills + 10}", "train.restart_backoff_s=1"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while len(report.kills) < kills and proc.poll() is None and time.monotonic() - t0 < timeout_s:
                kind = rng.choice(KILL_KINDS)
                kill = _kill_once(run_dir, proc.pid, kind, rng, steps, max_gap_steps, hang_at)
                if kill is None:
                    continue
                report.kills.append(kill)
                say(f"kill {len(report.kills)}/{kills}: {kind} at step {kill['step']} (committed {kill['committed']})")
                if corrupt_at_kill is not None and len(report.kills) > corrupt_at_kill and report.corrupted is None:
                    report.corrupted = _corrupt_latest(run_dir)
                    if report.corrupted is not None:
                        kill["committed"] = committed_steps(run_dir)  # what the next restore must fall back from
                        say(f"corrupted checkpoint {report.corrupted}")
            report.returncode = proc.wait(timeout=max(1.0, timeout_s - (time.monotonic() - t0)))
        finally:
            if proc.poll() is None:
                proc.kill()
    report.wall_s = time.monotonic() - t0
    report.log = log_path.read_text()
    return report


def _kill_once(run_dir: Path, supervisor: int, kind: str, rng: random.Random, steps: int, max_gap: int,
               hang_at: int | None = None) -> dict[str, Any] | None:
    """Wait for a moment of `kind` in the current training process and SIGKILL it; None if the run ended, or
    if the process met (or was about to meet) the injected hang before step `hang_at`."""
    deadline = time.monotonic() + 300
    pid = None
    while pid is None and time.monotonic() < deadline:
        pid = _child_pid(run_dir, supervisor)
        if pid is None:
            if _finished(run_dir, steps):
                return None
            time.sleep(0.05)
    if pid is None:
        return None
    seen = len(_events(run_dir))
    if kind == "startup":
        time.sleep(rng.uniform(0.0, 2.0))
    else:
        want = rng.randint(1, max_gap) if kind == "step" else 1
        got = 0
        while got < want and time.monotonic() < deadline:
            time.sleep(0.02)
            events = _events(run_dir)
            got = sum(e["kind"] == ("step" if kind == "step" else "checkpoint_save") for e in events[seen:])
            if _last_step(events) >= steps - 2:  # leave the end of the run alone: it must finish
                return None
    if hang_at is not None and hang_at - 3 <= _last_step(_events(run_dir)) <= hang_at and not _hung(run_dir):
        time.sleep(1.0)  # it records the hang the moment it reaches the step: a kill then would lose the hang
    if _hung(run_dir, pid):  # the injected hang is the watchdog's to end: let it, and kill the next process
        while _alive(pid):
            time.sleep(0.05)
        return None
    committed = committed_steps(run_dir)
    last = _last_step(_events(run_dir))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    while _alive(pid):
        time.sleep(0.01)
    return {"kind": kind, "t": time.time(), "step": last, "committed": committed, "pid": pid}


def _hung(run_dir: Path, pid: int | None = None) -> bool:
    """Whether process `pid` (None: any) met the injected hang (keel/train/faults.py records it before it acts)."""
    path = run_dir / "injected_faults.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return any(r["kind"] == "hang" and pid in (None, r["pid"]) for r in records)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _finished(run_dir: Path, steps: int) -> bool:
    return any(e["kind"] == "end" and e.get("step") == steps for e in _events(run_dir))


@dataclass
class ChaosCheck:
    restores: list[tuple[int, int | None]]  # (latest committed at the kill, step the next attempt restored)
    lost: list[str]
    recovery_s: list[float]  # kill -> the next attempt's first step event
    attempts: int
    set_aside: list[str]
    decisions: list[dict[str, Any]]


def check_chaos(run_dir: Path, report: ChaosReport) -> ChaosCheck:
    """Pair each kill with the restore that followed it: a restore below the latest committed checkpoint is a
    lost checkpoint, unless that checkpoint was the deliberately corrupted one (then it must be set aside). (A
    rewind restores in the same process, never after a kill, and sets aside only checkpoints after the spike.)"""
    from keel.train.plan import read_decisions

    events = _events(run_dir)
    restores = [e for e in events if e["kind"] == "checkpoint_restore"]
    first_steps = {}
    for e in events:
        if e["kind"] == "step":
            first_steps.setdefault(e["attempt"], e)
    pairs, lost, recovery = [], [], []
    aside = sorted(p.name for p in (run_dir / "checkpoints_aside").iterdir()) \
        if (run_dir / "checkpoints_aside").exists() else []
    for kill in report.kills:
        nxt = next((e for e in restores if e["t_wall"] > kill["t"]), None)
        starts = [e for e in events if e["kind"] == "start" and e["t_wall"] > kill["t"]]
        latest = kill["committed"][-1] if kill["committed"] else None
        got = nxt["step"] if nxt is not None else None  # a process killed before its restore: the next one's
        pairs.append((latest, got))
        if latest is not None and (got is None or got < latest) and latest != report.corrupted:
            lost.append(f"kill at step {kill['step']}: checkpoint {latest} was committed, restored {got}")
        if starts and starts[0]["attempt"] in first_steps:
            recovery.append(first_steps[starts[0]["attempt"]]["t_wall"] - kill["t"])
    if report.corrupted is not None and not any(n.startswith(f"{report.corrupted}-") for n in aside):
        lost.append(f"the corrupted checkpoint {report.corrupted} is not in checkpoints_aside ({aside})")
    attempts = max((e["attempt"] for e in events), default=0)
    return ChaosCheck(pairs, lost, recovery, attempts, aside, read_decisions(run_dir))


def reference_args(train_args: Sequence[str], run_dir: Path, decisions: list[dict[str, Any]]) -> list[str]:
    """The same run, uninterrupted, in `run_dir`, told to skip what the chaos run decided to skip."""
    args = [a for a in train_args if not a.startswith("run_dir=")] + [f"run_dir={run_dir}", "train.max_restarts=0"]
    if decisions:
        args.append("data.skip_steps=" + json.dumps([d["steps"] for d in decisions]))
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return args
