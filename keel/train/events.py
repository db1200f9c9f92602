"""Run events: one JSONL file per host, every line stamped with wall and monotonic time (docs/design.md, invariant 6).

Everything that costs wall time is an event (start, compile, step, checkpoint save/restore, eval, data wait,
failure, end); goodput is computed from these files, never estimated.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class EventLog:
    def __init__(self, path: Path, host: int = 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.host = host
        # Held open for the run, line-buffered: a crash loses at most the line being written.
        self._f = open(path, "a", buffering=1)  # noqa: SIM115
        self._base = {"host": host, "pid": os.getpid(), "hostname": socket.gethostname()}

    def emit(self, kind: str, **fields: Any) -> None:
        rec = {"kind": kind, "t_wall": time.time(), "t_mono": time.monotonic(), **self._base, **fields}
        self._f.write(json.dumps(rec, default=str) + "\n")

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
        self._f.close()


def read_events(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
