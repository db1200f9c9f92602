"""The supervisor: `keel train` runs the training in a child process and restarts it when a restart can help.

    keel train ...                      # this process: supervise (no JAX imported here)
      └─ python -m keel train --supervised ...   # the child: one attempt, resumes from the latest checkpoint

The child's exit code says what happened (keel/errors.py): a crash (1), a non-finite loss (5), a hang (6) or death
by a signal other than SIGTERM/SIGINT (SIGKILL, the OOM killer, SIGSEGV) is restarted from the latest good
checkpoint, at most `train.max_restarts` times, after `train.restart_backoff_s` seconds, doubled for each further
restart in a row whose process trained no step (at most 60 s). Everything else ends the job with the child's code:
done (0), a config, data or checkpoint error a person must fix (2, 3, 4), silent data corruption (7: burn the node
in first), persistent loss spikes (8), and a preemption (143). SIGTERM or SIGINT to the supervisor is forwarded to
the child (checkpoint, exit 143, no restart). The child runs in its own session, so a terminal's Ctrl-C reaches it
once, through the supervisor.

After each child the supervisor appends a `child_exit` event (under the child's attempt number) to the host's event
file: the exit code, how the attempt ended, and the backoff that follows, for `keel goodput`.

Multi-process runs are not supervised here: a restart must restart every host together, which is the cluster's job
(docs/goodput.md shows the JobSet policy that acts on the same exit codes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from keel.errors import EXIT_PREEMPTED, restartable
from keel.train.events import EventLog, last_event

MAX_BACKOFF_S = 60.0
EXIT_NAMES = {0: "done", 1: "a crash", 2: "a config error", 3: "a checkpoint error", 4: "a data error",
              5: "a non-finite loss", 6: "a hang", 7: "silent data corruption", 8: "loss spikes",
              EXIT_PREEMPTED: "a preemption signal"}


def describe(returncode: int) -> str:
    """`returncode` in words: 'exit 6 (a hang)', 'signal 9 (SIGKILL)'."""
    if returncode < 0:
        try:
            return f"signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:  # a real-time signal has no name
            return f"signal {-returncode}"
    return f"exit {returncode}" + (f" ({EXIT_NAMES[returncode]})" if returncode in EXIT_NAMES else "")


def shell_code(returncode: int) -> int:
    """A subprocess return code as a process exit code (death by signal N: 128 + N, as a shell reports it)."""
    return 128 - returncode if returncode < 0 else returncode


def supervise(argv: Sequence[str], run_dir: Path, max_restarts: int, backoff_s: float,
              log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
              command: Sequence[str] | None = None) -> int:
    """Run `keel train --supervised argv` until it ends for good; returns the exit code for the job.
    `command`: the child's command line instead (tests)."""
    cmd = list(command) if command is not None else [sys.executable, "-m", "keel", "train", "--supervised", *argv]
    state: dict[str, Any] = {"child": None, "signal": None}

    def forward(signum: int, frame: object) -> None:
        state["signal"] = signum
        child = state["child"]
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        restarts = fruitless = 0
        while True:
            state["child"] = child = subprocess.Popen(cmd, start_new_session=True)
            if state["signal"] is not None:  # a signal while the child was being started: it is the child's too
                child.send_signal(state["signal"])
            rc = child.wait()
            if rc == 0 or state["signal"] is not None:
                return shell_code(rc)
            last = _last_event_of(run_dir, child.pid)  # None: the child died before its first event
            fruitless = 0 if last is not None and _trained(run_dir, last) else fruitless + 1
            again = restartable(rc) and restarts < max_restarts
            wait = min(backoff_s * 2 ** max(0, fruitless - 1), MAX_BACKOFF_S) if again else None
            if last is not None:
                _record(run_dir, last, rc, again, wait, restarts)
            if restarts == 0 and "--restart-from-scratch" in cmd:  # once: a restart resumes what it trained
                cmd.remove("--restart-from-scratch")
            if not again:
                if restartable(rc):
                    log(f"keel: the training process ended with {describe(rc)}; no restarts left "
                        f"(train.max_restarts={max_restarts})")
                return shell_code(rc)
            restarts += 1
            log(f"keel: the training process ended with {describe(rc)}; restart {restarts} of {max_restarts} "
                f"from the latest checkpoint in {wait:g} s")
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and state["signal"] is None:
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            if state["signal"] is not None:
                return 128 + state["signal"]
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _last_event_of(run_dir: Path, pid: int) -> dict[str, Any] | None:
    """The host file's last event if process `pid` wrote it (else the child wrote nothing: it was refused or
    died first, and the last line belongs to an earlier attempt or to another process)."""
    last = last_event(run_dir / "events" / "host0000.jsonl")
    return last if last is not None and last.get("pid") == pid else None


def _trained(run_dir: Path, last: dict[str, Any]) -> bool:
    """Whether the attempt that wrote `last` trained at least one step (then the next restart waits the base
    backoff again)."""
    path = run_dir / "events" / "host0000.jsonl"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - (1 << 18)))
        tail = f.read().decode(errors="replace")
    for line in tail.splitlines():
        if '"kind": "step"' in line:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("attempt") == last.get("attempt") and e.get("pid") == last.get("pid"):
                return True
    return False


def _record(run_dir: Path, last: dict[str, Any], rc: int, again: bool, backoff_s: float | None,
            restarts: int) -> None:
    """The `child_exit` event, under the ended child's attempt number (host 0: supervised runs are
    single-process)."""
    events = EventLog(run_dir / "events" / "host0000.jsonl", 0, attempt=int(last.get("attempt", 1)))
    try:
        events.emit("child_exit", returncode=rc, ending=events.previous_ending(), restartable=again,
                    backoff_s=backoff_s, restarts=restarts, supervisor_pid=os.getpid())
    finally:
        events.close()
