"""The hang watchdog: a thread that notices when the loop stops making progress, and ends the process.

Progress is a step's metrics becoming readable (`beat`) or the end of work between steps (evaluation, a
checkpoint). A hang is no progress for max(`train.hang_factor` x the median of the recent step times,
`train.hang_floor_s`). Then the watchdog writes every thread's Python stack (`faulthandler`) to
`run_dir/hang-hostNNNN-attemptA.txt`, records a `hang` event and a `failure` (reason "hang"), and ends the
process with exit code 6 (`os._exit`: the main thread is stuck, possibly inside XLA, and cannot be unwound).
The supervisor (or the cluster's restart policy) restarts it from the last checkpoint.

The watchdog is armed only while the loop runs: compilation and restore have their own, unbounded, durations.
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

from keel.errors import EXIT_HANG
from keel.train.events import EventLog


class Watchdog:
    """`with Watchdog(...) as w:` runs the watching thread; `w.beat(step, seconds)` after each step,
    `w.touch()` after other work. `floor_s` <= 0: never fires."""

    def __init__(self, events: EventLog, run_dir: Path, factor: float, floor_s: float, poll_s: float = 0.5):
        self.events, self.run_dir = events, run_dir
        self.factor, self.floor_s, self.poll_s = factor, floor_s, poll_s
        self._steps: deque[float] = deque(maxlen=100)
        self._last = time.monotonic()
        self._step = 0
        self._suspended = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="keel-hang-watchdog", daemon=True)

    def timeout(self) -> float:
        """Seconds without progress that count as a hang."""
        ideal = statistics.median(self._steps) if self._steps else 0.0
        return max(self.factor * ideal, self.floor_s)

    def beat(self, step: int, seconds: float) -> None:
        self._steps.append(seconds)
        self._step = step
        self._last = time.monotonic()

    def touch(self) -> None:
        self._last = time.monotonic()

    def suspend(self) -> _Suspended:
        """A block the watchdog does not time (compilation)."""
        return _Suspended(self)

    def __enter__(self) -> Watchdog:
        self._last = time.monotonic()
        if self.floor_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(min(self.poll_s, self.floor_s / 4)):
            since = time.monotonic() - self._last
            if not self._suspended and since > self.timeout():
                self._fire(since)

    def _fire(self, since: float) -> None:
        path = self.run_dir / f"hang-host{self.events.host:04d}-attempt{self.events.attempt}.txt"
        with open(path, "w") as f:
            f.write(f"no progress for {since:.1f} s after step {self._step} (timeout {self.timeout():.1f} s); "
                    f"the stack of every thread:\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        self.events.emit("hang", step=self._step, timeout_s=self.timeout(), since_s=since, stacks=str(path))
        self.events.emit("failure", reason="hang", error=f"no step completed for {since:.1f} s; stacks in {path}")
        print(f"keel: hang: no progress for {since:.1f} s after step {self._step}; every thread's stack is in "
              f"{path}; exiting with code {EXIT_HANG} for a restart", file=sys.stderr, flush=True)
        self.events.close()
        os._exit(EXIT_HANG)


class _Suspended:
    def __init__(self, dog: Watchdog):
        self.dog = dog

    def __enter__(self) -> None:
        self.dog._suspended += 1

    def __exit__(self, *exc: object) -> None:
        self.dog._suspended -= 1
        self.dog.touch()
