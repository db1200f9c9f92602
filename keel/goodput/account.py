"""Where a run's wall time went, from its events alone (docs/design.md, invariant 6).

The run's wall time is from the first event on any host (the first attempt's `start`) to the last event on any
host. Every second of it lands in exactly one bucket, so the buckets sum to the wall time:

- `productive`: step time of steps whose result survived (the final model descends from them), less the
  data stalls and the degraded excess inside those steps;
- `data_stall`: time the steps waited for data (`data_wait_s`);
- `degraded`: time by which steps exceeded the attempt's ideal step time (its median), for steps more than
  `DEGRADED_MADS` robust deviations above it;
- `spike`: steps whose update a loss spike had skipped (`spike` events with action "skip_update");
- `wasted`: steps that a later attempt recomputed: those after the step it restored (a lost checkpoint, a
  rewind);
- `startup_data`, `startup_init`, `startup_restore`, `startup_compile`: the start-up spans of each attempt;
- `checkpoint`: the blocking part of saves and the wait for the last one;
- `eval`: held-out evaluation;
- `custom`: `badput` spans, by their label (e.g. "sdc_check");
- `hang`: from an attempt's last progress (a step, a span's end) to its `hang` event;
- `recovery`: the gap between an attempt's last event (with a supervisor: its `child_exit`) and the next
  attempt's first;
- `other`: the rest (process start before the first event, the sample and summary, a hung process's stack dump
  and exit).

Several hosts: attempt n is attempt n on every host. A step of the run lasts from the moment its last host
began it to the moment its last host finished it (a straggler sets the run's pace), and takes the longest data
wait of any host; a span (compile, a save, an evaluation) is its slowest host's. Goodput is `productive` over
the wall time. Identical lines (a log written twice) count once.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from keel.goodput.attempts import CLEAN, Attempt, Event, attempts_of, seconds
from keel.goodput.incidents import Incidents, incidents

DEGRADED_MADS = 3.0
SPANS = {"data_prepare": "startup_data", "init": "startup_init", "checkpoint_restore": "startup_restore",
         "compile": "startup_compile", "checkpoint_save": "checkpoint", "checkpoint_wait": "checkpoint",
         "eval": "eval", "badput": "custom"}
# Events that end a counted interval (a step, a span) or begin an attempt: a hang runs from the last of them.
PROGRESS = ("start", "restart", "step", *SPANS)
BUCKETS = ("productive", "data_stall", "degraded", "spike", "wasted", "startup_data", "startup_init",
           "startup_restore", "startup_compile", "checkpoint", "eval", "custom", "hang", "recovery", "other")


@dataclass(frozen=True)
class StepTime:
    """One step of the run. `kind`: "productive" (its time is split into productive, `data_wait_s` and the
    degraded `excess_s`), "spike" (its update was skipped) or "wasted" (a later attempt recomputed it)."""

    attempt: int
    step: int
    t_end: float
    duration_s: float
    data_wait_s: float
    excess_s: float
    kind: str


@dataclass(frozen=True)
class Restart:
    """Attempt `attempt` after the previous one ended `after`: `gap_s` from its last event to this attempt's
    first, `to_step_s` from that last event to the next step of the run (None if none followed)."""

    attempt: int
    after: str
    gap_s: float
    to_step_s: float | None


@dataclass(frozen=True)
class Straggler:
    """One host against the others over the `steps` every host of its attempt ran: how often it was the slowest
    (above the median host) and its total time above the median host."""

    steps: int
    slowest: int
    excess_s: float


@dataclass
class Breakdown:
    wall_s: float
    buckets: dict[str, float]
    attempts: int
    steps: int
    hosts: list[int]
    custom: dict[str, float]
    restarts: list[Restart]
    stragglers: dict[int, Straggler]
    incidents: Incidents
    median_step_s: float | None
    median_save_s: float | None
    step_times: list[StepTime] = field(repr=False, default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def goodput(self) -> float:
        return self.buckets["productive"] / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def median_recovery_s(self) -> float | None:
        """The median time from a failure (an attempt's last event) to the run's next step."""
        times = [r.to_step_s for r in self.restarts if r.after not in CLEAN and r.to_step_s is not None]
        return statistics.median(times) if times else None

    def to_json(self) -> dict[str, Any]:
        return {"wall_s": self.wall_s, "goodput": self.goodput, "attempts": self.attempts, "steps": self.steps,
                "hosts": self.hosts, "buckets": self.buckets, "custom": self.custom,
                "median_step_s": self.median_step_s, "median_checkpoint_save_s": self.median_save_s,
                "restarts": [asdict(r) for r in self.restarts], "median_recovery_s": self.median_recovery_s,
                "stragglers": {h: asdict(s) for h, s in self.stragglers.items()},
                "incidents": self.incidents.to_json(), "notes": self.notes}

    def table(self) -> str:
        """The breakdown as a human-readable table, then restarts, stragglers and incidents."""

        def pct(v: float) -> float:
            return 100 * v / self.wall_s if self.wall_s else 0.0

        lines = [f"goodput {100 * self.goodput:.2f} % of {self.wall_s:,.1f} s wall time ({self.attempts} "
                 f"attempt(s), {self.steps:,} steps kept, {len(self.hosts)} host(s))",
                 f"{'bucket':<18} {'seconds':>12} {'%':>7}"]
        for k in BUCKETS:
            lines.append(f"{k:<18} {self.buckets[k]:>12,.2f} {pct(self.buckets[k]):>6.2f}%")
            if k == "custom":
                lines.extend(f"  {label:<16} {v:>12,.2f} {pct(v):>6.2f}%" for label, v in self.custom.items())
        for r in self.restarts:
            lines.append(f"restart: attempt {r.attempt} after {r.after}: {r.gap_s:,.1f} s gap"
                         + (f", a step {r.to_step_s:,.1f} s after the last event of attempt {r.attempt - 1}"
                            if r.to_step_s is not None else ", no step since"))
        if self.median_recovery_s is not None:
            lines.append(f"median time from a failure to the next step: {self.median_recovery_s:,.1f} s")
        if self.stragglers:
            lines.append(f"{'host':>6} {'steps':>8} {'slowest':>8} {'excess s':>10}  (against the median host)")
            lines.extend(f"{h:>6} {s.steps:>8,} {s.slowest:>8,} {s.excess_s:>10,.2f}"
                         for h, s in self.stragglers.items())
        lines.extend(self.incidents.lines())
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def account(events: list[Event]) -> Breakdown:
    """The breakdown of a run's events: one host's, or every host's (see the module docstring)."""
    attempts = attempts_of(events)
    if not attempts:
        raise ValueError("no events")
    b = dict.fromkeys(BUCKETS, 0.0)
    custom: dict[str, float] = {}
    saves: list[float] = []
    times: list[StepTime] = []
    for i, a in enumerate(attempts):
        if i:
            b["recovery"] += max(0.0, a.t0 - attempts[i - 1].t1)
        for (kind, label), durations in span_times(a).items():
            b[SPANS[kind]] += sum(durations)
            if kind == "badput":
                custom[label] = custom.get(label, 0.0) + sum(durations)
            if kind == "checkpoint_save":
                saves += durations
        window = hang_window(a.events)
        if window:
            b["hang"] += window[1] - window[0]
        times += step_times(a, restart_point(attempts[i + 1:]))
    for t in times:
        if t.kind == "productive":
            b["data_stall"] += t.data_wait_s
            b["degraded"] += t.excess_s
            b["productive"] += t.duration_s - t.data_wait_s - t.excess_s
        else:
            b[t.kind] += t.duration_s
    t0, t1 = min(a.t0 for a in attempts), max(a.t1 for a in attempts)
    wall = t1 - t0
    b["other"] = wall - sum(v for k, v in b.items() if k != "other")
    notes = []
    if b["other"] < -1e-6 * max(1.0, wall):
        notes.append("the spans overlap the wall time (clock steps between hosts or attempts?)")
    if attempts[-1].ending is None and not attempts[-1].of_kind("child_exit"):
        notes.append("the last attempt has no ending: still running, or killed (its last event ends the run)")
    return Breakdown(
        wall_s=wall, buckets=b, attempts=len(attempts), steps=sum(t.kind != "wasted" for t in times),
        hosts=sorted({h for a in attempts for h in a.by_host}), custom=custom, restarts=restarts(attempts, times),
        stragglers=stragglers(attempts), incidents=incidents(attempts),
        median_step_s=statistics.median(t.duration_s for t in times) if times else None,
        median_save_s=statistics.median(saves) if saves else None, step_times=times, notes=notes)


def steps_by_count(a: Attempt) -> dict[int, list[Event]]:
    """Per step count, every host's `step` event for it in attempt `a` (events without a count or a duration
    are left out)."""
    out: dict[int, list[Event]] = {}
    for e in a.of_kind("step"):
        if isinstance(e.get("step"), int) and not isinstance(e["step"], bool) and "duration_s" in e:
            out.setdefault(e["step"], []).append(e)
    return dict(sorted(out.items()))


def step_times(a: Attempt, restart: int | None) -> list[StepTime]:
    """The run's steps in attempt `a`: each from its last host's start (completion less duration) to its last
    host's completion, with the longest data wait; steps after `restart` (the step a later attempt started from)
    are wasted, steps whose update was skipped are spikes; the rest may carry a degraded excess."""
    skipped = {e.get("step") for e in a.of_kind("spike") if e.get("action") == "skip_update"}
    rows = []
    for step, evs in steps_by_count(a).items():
        last_end = max(evs, key=lambda e: e["t_wall"])
        last_start = max(evs, key=lambda e: e["t_wall"] - seconds(e, "duration_s"))
        # (end - end) + duration, not end - (end - duration): epoch seconds would swallow a step's last digits
        duration = (last_end["t_wall"] - last_start["t_wall"]) + seconds(last_start, "duration_s")
        wait = min(duration, max(seconds(e, "data_wait_s") for e in evs))
        rows.append((step, last_end["t_wall"], duration, wait))
    excess = degraded_excess(np.array([d - w for _, _, d, w in rows], dtype=np.float64))
    out = []
    for (step, t_end, d, w), x in zip(rows, excess, strict=True):
        kind = "wasted" if restart is not None and step > restart else "spike" if step in skipped else "productive"
        out.append(StepTime(a.number, step, t_end, d, w, float(x) if kind == "productive" else 0.0, kind))
    return out


def restart_point(later: list[Attempt]) -> int | None:
    """The step the first of the `later` attempts that trained (or restored) began from, or None if none did:
    steps beyond it were computed again."""
    return next((p for a in later if (p := a.started_from) is not None), None)


def span_times(a: Attempt) -> dict[tuple[str, str], list[float]]:
    """Per span kind (and label, for `badput`), the durations of attempt `a`'s spans: the k-th span of a kind
    is the slowest host's k-th."""
    per: dict[tuple[str, str], dict[int, list[float]]] = {}
    for e in a.events:
        if e["kind"] in SPANS:
            key = (e["kind"], str(e.get("label", "unlabelled")) if e["kind"] == "badput" else "")
            per.setdefault(key, {}).setdefault(e["host"], []).append(seconds(e, "duration_s"))
    return {k: [max(d) for d in itertools.zip_longest(*hosts.values(), fillvalue=0.0)] for k, hosts in per.items()}


def hang_window(events: list[Event]) -> tuple[float, float] | None:
    """(last progress, hang) for the last `hang` event among one attempt's time-ordered `events`: progress is the
    last step, span end or start before it, on any of the hosts given. None without a hang."""
    hangs = [e["t_wall"] for e in events if e["kind"] == "hang"]
    if not hangs:
        return None
    before = [e["t_wall"] for e in events if e["kind"] in PROGRESS and e["t_wall"] <= hangs[-1]]
    return (before[-1] if before else events[0]["t_wall"]), hangs[-1]


def degraded_excess(work: np.ndarray) -> np.ndarray:
    """Per step, the time above the attempt's median step for steps beyond DEGRADED_MADS robust deviations."""
    if work.size < 3:
        return np.zeros_like(work)
    median = float(np.median(work))
    mad = 1.4826 * float(np.median(np.abs(work - median)))
    slow = work > median + DEGRADED_MADS * max(mad, 1e-3 * median)
    return np.where(slow, work - median, 0.0)


def restarts(attempts: list[Attempt], times: list[StepTime]) -> list[Restart]:
    """Each attempt after the first: how the one before ended, the gap, and the time to the run's next step."""
    first_step: dict[int, float] = {}
    for t in times:
        first_step[t.attempt] = min(first_step.get(t.attempt, math.inf), t.t_end)
    out = []
    for prev, a in itertools.pairwise(attempts):
        nxt = next((first_step[x.number] for x in attempts if x.number >= a.number and x.number in first_step), None)
        out.append(Restart(a.number, prev.ending or "killed", max(0.0, a.t0 - prev.t1),
                           None if nxt is None else nxt - prev.t1))
    return out


def stragglers(attempts: list[Attempt]) -> dict[int, Straggler]:
    """Per host, over the steps two or more hosts ran: how often it was the slowest (above the median host) and
    its time above the median host, summed. Empty for one host."""
    hosts = sorted({h for a in attempts for h in a.by_host})
    if len(hosts) < 2:
        return {}
    compared, slowest, excess = Counter[int](), Counter[int](), dict.fromkeys(hosts, 0.0)
    for a in attempts:
        for evs in steps_by_count(a).values():
            d: dict[int, float] = {}
            for e in evs:
                h = e["host"]
                d[h] = max(d.get(h, 0.0), seconds(e, "duration_s"))
            if len(d) < 2:
                continue
            median = statistics.median(d.values())
            top = max(d, key=lambda h: d[h])
            slowest[top] += d[top] > median
            for h, x in d.items():
                compared[h] += 1
                excess[h] += max(0.0, x - median)
    return {h: Straggler(compared[h], slowest[h], excess[h]) for h in hosts}


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
