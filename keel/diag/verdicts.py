"""Burn-in verdicts, exit codes and the fleet-relative rule: plain Python, importable without JAX."""

from __future__ import annotations

import statistics
import typing
from typing import Any, Literal

SCHEMA = "keel.burnin/1"
PASS, SLOW, WRONG, NOT_RUN, SKIPPED = "pass", "slow", "wrong", "could_not_run", "skipped"
EXIT_CODES = {PASS: 0, SLOW: 10, WRONG: 11, NOT_RUN: 12}
SEVERITY = {SKIPPED: -1, PASS: 0, SLOW: 1, NOT_RUN: 2, WRONG: 3}
# The burn-in checks, in the order they run: the one list of their names. It lives here, free of JAX, so that
# the CLI can list the checks without importing JAX; `keel.diag.burnin.CHECKS` is checked against it at import.
CheckName = Literal["matmul", "known_answer", "sdc", "memory", "collectives", "sustained", "model"]
CHECK_NAMES: tuple[str, ...] = typing.get_args(CheckName)


def robust_low(values: dict[Any, float], tolerance: float, z: float) -> dict[Any, str]:
    """Fleet-relative verdict for throughput-like values (higher is better): the keys whose value is below
    median x (1 - tolerance) and more than z robust sigmas (1.4826 MAD) under the median, with the reason.
    Needs 3 values at least."""
    if len(values) < 3:
        return {}
    med = statistics.median(values.values())
    mad = statistics.median(abs(v - med) for v in values.values())
    sigma = max(1.4826 * mad, 1e-12 * abs(med))
    return {k: f"{v / med:.2f}x the median, {(med - v) / sigma:.1f} robust sigma below"
            for k, v in values.items() if v < med * (1 - tolerance) and (med - v) / sigma > z}
