"""Where a run's wall time went, from its events alone (docs/design.md, invariant 6).

The run's wall time is from the first attempt's `start` to the last event of the last attempt. Every second of
it lands in exactly one bucket, so the buckets sum to the wall time:

- `productive`: step time of steps whose result survived (the final model descends from them), less the
  data stalls and the degraded excess inside those steps;
- `data_stall`: time the steps waited for the host's data (`data_wait_s`);
- `degraded`: time by which steps exceeded the attempt's ideal step time (its median), for steps more than
  `DEGRADED_MADS` robust deviations above it;
- `wasted`: steps computed after the last checkpoint of an attempt that did not end cleanly, which the next
  attempt recomputed (it restored an earlier step);
- `startup_data`, `startup_init`, `startup_restore`, `startup_compile`: the start-up spans of each attempt;
- `checkpoint`: the blocking part of saves and the wait for the last one;
- `eval`: held-out evaluation;
- `recovery`: the gap between an attempt's last event and the next attempt's start;
- `other`: the rest (process start before the first event, the sample and summary, the host's own work
  between steps).

Goodput is `productive` over the wall time. Attempts are told apart by their `attempt` number; identical
lines (a log written twice) count once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keel.train.events import read_events

DEGRADED_MADS = 3.0
SPANS = {"data_prepare": "startup_data", "init": "startup_init", "checkpoint_restore": "startup_restore",
         "compile": "startup_compile", "checkpoint_save": "checkpoint", "checkpoint_wait": "checkpoint",
         "eval": "eval"}
BUCKETS = ("productive", "data_stall", "degraded", "wasted", "startup_data", "startup_init", "startup_restore",
           "startup_compile", "checkpoint", "eval", "recovery", "other")


@dataclass
class Attempt:
    number: int
    events: list[dict[str, Any]]

    @property
    def t0(self) -> float:
        return self.events[0]["t_wall"]

    @property
    def t1(self) -> float:
        return self.events[-1]["t_wall"]

    @property
    def steps(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == "step"]

    @property
    def restored(self) -> int | None:
        return next((e["step"] for e in self.events if e["kind"] == "checkpoint_restore"), None)

    @property
    def ending(self) -> str:
        last = self.events[-1]["kind"]
        return {"end": "end", "preempted": "signal", "failure": "failure"}.get(last, "killed")


@dataclass
class Breakdown:
    wall_s: float
    buckets: dict[str, float]
    attempts: int
    steps: int
    notes: list[str] = field(default_factory=list)

    @property
    def goodput(self) -> float:
        return self.buckets["productive"] / self.wall_s if self.wall_s > 0 else math.nan

    def to_json(self) -> dict[str, Any]:
        return {"wall_s": self.wall_s, "goodput": self.goodput, "attempts": self.attempts, "steps": self.steps,
                "buckets": self.buckets, "notes": self.notes}

    def table(self) -> str:
        lines = [f"goodput {100 * self.goodput:.2f} % of {self.wall_s:,.1f} s wall time "
                 f"({self.attempts} attempt(s), {self.steps:,} steps kept)", f"{'bucket':<16} {'seconds':>12} {'%':>7}"]
        for k in BUCKETS:
            v = self.buckets[k]
            lines.append(f"{k:<16} {v:>12,.2f} {100 * v / self.wall_s if self.wall_s else 0:>6.2f}%")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def attempts_of(events: list[dict[str, Any]]) -> list[Attempt]:
    """Events grouped by attempt, in time order, each line once."""
    seen, unique = set(), []
    for e in events:
        key = json.dumps(e, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(e)
    by: dict[int, list[dict[str, Any]]] = {}
    for e in sorted(unique, key=lambda e: e["t_wall"]):
        by.setdefault(int(e.get("attempt", 1)), []).append(e)
    return [Attempt(n, ev) for n, ev in sorted(by.items())]


def account(events: list[dict[str, Any]]) -> Breakdown:
    """The breakdown of one host's events (see the module docstring)."""
    attempts = attempts_of(events)
    if not attempts:
        raise ValueError("no events")
    b = dict.fromkeys(BUCKETS, 0.0)
    kept_steps = 0
    for i, a in enumerate(attempts):
        if i:
            b["recovery"] += max(0.0, a.t0 - attempts[i - 1].t1)
        for e in a.events:
            if e["kind"] in SPANS:
                b[SPANS[e["kind"]]] += float(e.get("duration_s", 0.0))
        survived = _survivors(a, attempts[i + 1] if i + 1 < len(attempts) else None)
        durations = np.array([s["duration_s"] for s in a.steps], dtype=np.float64)
        waits = np.array([s.get("data_wait_s", 0.0) for s in a.steps], dtype=np.float64)
        excess = _degraded_excess(durations - waits)
        for s, d, w, x in zip(a.steps, durations, waits, excess, strict=True):
            if s["step"] in survived:
                b["data_stall"] += w
                b["degraded"] += x
                b["productive"] += d - w - x
                kept_steps += 1
            else:
                b["wasted"] += d
    wall = attempts[-1].t1 - attempts[0].t0
    b["other"] = wall - sum(v for k, v in b.items() if k != "other")
    notes = []
    if b["other"] < -1e-6 * max(1.0, wall):
        notes.append("the spans overlap the wall time (clock steps between hosts or attempts?)")
    return Breakdown(wall, b, len(attempts), kept_steps, notes)


def _survivors(a: Attempt, following: Attempt | None) -> set[int]:
    """The step counts of `a` whose result the run kept: all of them if it ended cleanly or nothing followed;
    else those up to the step the next attempt restored (later ones were recomputed)."""
    steps = {s["step"] for s in a.steps}
    if following is None or a.ending == "end":
        return steps
    restored = following.restored or 0
    return {s for s in steps if s <= restored}


def _degraded_excess(work: np.ndarray) -> np.ndarray:
    """Per step, the time above the attempt's median step for steps beyond DEGRADED_MADS robust deviations."""
    if work.size < 3:
        return np.zeros_like(work)
    median = float(np.median(work))
    mad = 1.4826 * float(np.median(np.abs(work - median)))
    slow = work > median + DEGRADED_MADS * max(mad, 1e-3 * median)
    return np.where(slow, work - median, 0.0)


def young_daly(checkpoint_s: float, mtbf_s: float) -> tuple[float, float]:
    """(optimal checkpoint interval, its overhead fraction) for a blocking save of `checkpoint_s` seconds and a
    mean time between failures: tau = sqrt(2 C M); overhead = C / tau + tau / (2 M) (save plus expected lost
    work; restart time not included)."""
    tau = math.sqrt(2 * checkpoint_s * mtbf_s)
    return tau, checkpoint_overhead(checkpoint_s, tau, mtbf_s)


def checkpoint_overhead(checkpoint_s: float, interval_s: float, mtbf_s: float) -> float:
    """The fraction of time a checkpoint every `interval_s` costs: its saves, and the work a failure loses
    (half an interval on average)."""
    return checkpoint_s / interval_s + interval_s / (2 * mtbf_s)


def host_events(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """Per host, the events of `run_dir/events/hostNNNN.jsonl`."""
    files = sorted((Path(run_dir) / "events").glob("host*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{run_dir}/events has no host*.jsonl: is it a keel run directory?")
    return {int(f.stem[4:]): read_events(f) for f in files}
