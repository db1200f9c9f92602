"""Small file helpers shared by every writer of run-directory files."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from keel.errors import ConfigError


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write-then-rename: a reader never sees a half-written file, and processes writing the same file at
    once each use their own temporary name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)


@contextmanager
def exclusive(path: Path, holder: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if absent, our pid written in it) for the block; the OS drops
    it when the process ends, however it ends. If another process holds it: ConfigError naming that process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            other = f.read().strip() or "another process"
            raise ConfigError(f"{holder} is in use by {other} (lock {path}); two processes must not train one "
                              f"run directory: wait for it to end, or use another run_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
