"""Run events: one JSONL file per host, every line stamped with wall and monotonic time (docs/design.md, invariant 6).

Everything that costs wall time is an event (start, compile, step, checkpoint save/restore, eval, data wait,
failure, end); goodput is computed from these files, never estimated.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class EventLog:
    """Appends events to one host's file. Every process start is an attempt, numbered per host (1, 2, ...) and
    stamped on each of its lines; `previous` is how the attempt before it ended, read from the file's last
    line (None for a first attempt), so a restart is recorded as such and never inferred from repeated steps."""

    def __init__(self, path: Path, host: int = 0, attempt: int | None = None):
        """`attempt`: write under this attempt number instead of starting a new attempt (the supervisor's
        record of how its child ended)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.host = host
        self.previous = last_event(path)
        self.attempt = attempt if attempt is not None else int((self.previous or {}).get("attempt", 0)) + 1
        # Held open for the run, line-buffered: a crash loses at most the line being written; a line a crash cut
        # is ended first, so that it does not swallow this attempt's first event.
        self._f = open(path, "a", buffering=1)  # noqa: SIM115
        if self._f.tell() and not _ends_with_newline(path):
            self._f.write("\n")
        self._lock = threading.Lock()  # the hang watchdog writes from its own thread
        self._base = {"host": host, "pid": os.getpid(), "hostname": socket.gethostname(), "attempt": self.attempt}

    def previous_ending(self) -> str:
        """How the previous attempt ended, from its last event (see `ending`)."""
        return ending(self.previous or {})

    def emit(self, kind: str, **fields: Any) -> None:
        rec = {"kind": kind, "t_wall": time.time(), "t_mono": time.monotonic(), **self._base, **fields}
        line = json.dumps(rec, default=str) + "\n"
        with self._lock:
            if not self._f.closed:
                self._f.write(line)

    @contextmanager
    def span(self, kind: str, **fields: Any) -> Iterator[dict[str, Any]]:
        """Emits `kind` when the block ends, with `duration_s`; the block may add fields to the yielded dict."""
        extra: dict[str, Any] = {}
        t0 = time.monotonic()
        try:
            yield extra
        finally:
            self.emit(kind, duration_s=time.monotonic() - t0, **fields, **extra)

    def close(self) -> None:
        with self._lock:
            self._f.close()


def ending(last: dict[str, Any]) -> str:
    """How an attempt ended, from its last event: "done" or "stop_at" (`end`), "signal" (`preempted`), a failure's
    reason, "rewind", the ending a supervisor's `child_exit` recorded, or "killed" (an ordinary last line: SIGKILL,
    OOM, a machine lost, a hang killed from outside)."""
    kind = last.get("kind")
    if kind == "end":
        return str(last.get("reason", "done"))
    if kind == "preempted":
        return "signal"
    if kind == "failure":
        return str(last.get("reason", "crash"))
    if kind == "rewind":
        return "rewind"
    if kind == "child_exit":  # the supervisor's record of how its child ended (keel/train/supervise.py)
        return str(last.get("ending", "killed"))
    return "killed"


def json_number(x: float) -> float | str:
    """Strict JSON has no NaN or infinity: those become their names ("nan", "inf")."""
    return x if math.isfinite(x) else str(x)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def last_event(path: Path, tail: int = 1 << 16) -> dict[str, Any] | None:
    """The last complete event of a file (reading only its tail), or None if it has none."""
    if not path.exists():
        return None
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - tail))
        lines = f.read().splitlines()
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by a crash, or the middle of a line where the tail starts
            continue
        if isinstance(rec, dict):
            return rec
    return None


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every complete event of a file, in order; a line that a crash cut short is left out."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out
