"""Errors a user can act on. Each carries the exit code `keel` ends with; `keel.cli.main` catches them once.

Exit codes (docs/training.md): 0 done, 2 config, 3 checkpoint, 4 data, 143 stopped by a signal (restart the
job to resume). Anything else is a bug or a crash and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_CHECKPOINT = 3
EXIT_DATA = 4
EXIT_PREEMPTED = 143  # 128 + SIGTERM: the launcher should restart the job, which then resumes


class KeelError(Exception):
    """Base of the errors whose message says what to fix and where; `exit_code` is the process's exit code."""

    exit_code = 1
    kind = "error"


class ConfigError(KeelError, ValueError):
    """A configuration the user must fix; the message names the key (or flag) and what is allowed."""

    exit_code = EXIT_CONFIG
    kind = "config error"


class DataError(KeelError, ValueError):
    """Input data or a store the user must fix; the message names the file (and line)."""

    exit_code = EXIT_DATA
    kind = "data error"


class CheckpointError(KeelError, RuntimeError):
    """A checkpoint that cannot be used; the message names it and what to do. Nothing is deleted."""

    exit_code = EXIT_CHECKPOINT
    kind = "checkpoint error"


class Preempted(KeelError):
    """SIGTERM/SIGINT before the first step (data preparation, restore, compilation): nothing new to save, so
    stop with the preemption code at the next phase boundary; the launcher restarts the job, which resumes."""

    exit_code = EXIT_PREEMPTED
    kind = "preempted"
