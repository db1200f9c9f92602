"""Errors a user can act on. Each carries the exit code `keel` ends with; `keel.cli.main` catches them once.

Exit codes (docs/training.md, docs/goodput.md): 0 done, 2 config, 3 checkpoint, 4 data, 5 non-finite loss,
6 hang, 7 silent data corruption, 8 loss spikes the policy could not absorb, 143 stopped by a signal (restart
the job to resume). 1 is a crash (a bug or a lost device) and keeps its traceback. `RESTARTABLE` is which of
them a restart from the last checkpoint can cure: the supervisor (keel/train/supervise.py) and a cluster's
restart policy act on it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_CHECKPOINT = 3
EXIT_DATA = 4
EXIT_NON_FINITE = 5
EXIT_HANG = 6
EXIT_SDC = 7
EXIT_SPIKES = 8
EXIT_PREEMPTED = 143  # 128 + SIGTERM: the launcher should restart the job, which then resumes

# Exit codes worth a restart from the latest checkpoint: a crash (1), a non-finite loss (5, the state before it
# is intact and the hardware may have been at fault), a hang (6); and death by a signal other than SIGTERM/SIGINT
# (SIGKILL, the OOM killer, SIGSEGV: a negative return code in Python, 128 + N in a shell). Not: a config, data
# or checkpoint error (a person must act), SDC (burn the node in first), spikes that persist (deterministic),
# a signal (the launcher's preemption: it restarts the job itself).
RESTARTABLE = frozenset({1, EXIT_NON_FINITE, EXIT_HANG})


def restartable(returncode: int) -> bool:
    """Whether a training process that ended with `returncode` (as subprocess reports it) should be restarted."""
    if returncode < 0:
        return -returncode not in (2, 15)  # SIGINT, SIGTERM: a person or the launcher stopped it
    if returncode > 128:
        return returncode - 128 not in (2, 15)
    return returncode in RESTARTABLE


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


class NonFiniteLoss(KeelError, FloatingPointError):
    """A non-finite loss or gradient norm; the state of the last checkpoint is intact."""

    exit_code = EXIT_NON_FINITE
    kind = "non-finite loss"


class SilentDataCorruption(KeelError):
    """The same step computed twice gave different bits: a device computes wrong; run `keel burnin`."""

    exit_code = EXIT_SDC
    kind = "silent data corruption"


class LossSpikes(KeelError):
    """Loss spikes the spike policy could not absorb (too many in a row, or too many rewinds)."""

    exit_code = EXIT_SPIKES
    kind = "loss spikes"
