"""A run's events as attempts: every process start on a host is one, and hosts number them alike (a restart
restarts every host), so attempt n of the run is attempt n on every host.

An attempt's events are its process's own plus the supervisor's `child_exit` written under its number after
it ended (so the time until the process exited is the attempt's, and the backoff after it is recovery).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from keel.train.events import ending, read_events

Event = dict[str, Any]

# Events that end an attempt deliberately, and the ending each one names (as EventLog.previous_ending does).
CLOSING = ("end", "preempted", "failure", "rewind")
# Endings after which nothing is lost: the final checkpoint holds the last step.
CLEAN = ("done", "stop_at")


def unique(events: list[Event]) -> list[Event]:
    """Each distinct line once (a log written twice is the same run), in order."""
    seen: set[str] = set()
    out = []
    for e in events:
        key = json.dumps(e, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def seconds(e: Event, key: str) -> float:
    """A time field of an event (`duration_s`, `data_wait_s`, ...), 0 where it is missing or not a number."""
    v = e.get(key)
    return float(v) if _is_number(v) else 0.0


@dataclass(frozen=True)
class Attempt:
    """Attempt `number` of the run: every host's events with that number, in time order."""

    number: int
    events: list[Event]

    @property
    def t0(self) -> float:
        return self.events[0]["t_wall"]

    @property
    def t1(self) -> float:
        return self.events[-1]["t_wall"]

    @cached_property
    def by_host(self) -> dict[int, list[Event]]:
        out: dict[int, list[Event]] = {}
        for e in self.events:
            out.setdefault(e["host"], []).append(e)
        return dict(sorted(out.items()))

    def of_kind(self, *kinds: str) -> list[Event]:
        return [e for e in self.events if e["kind"] in kinds]

    @property
    def restored(self) -> int | None:
        """The step this attempt restored (the lowest over hosts), or None if it restored nothing."""
        steps = [e["step"] for e in self.of_kind("checkpoint_restore") if isinstance(e.get("step"), int)]
        return min(steps) if steps else None

    @property
    def started_from(self) -> int | None:
        """The step this attempt's training began from: the one it restored, 0 if it initialised a fresh state or
        stepped without restoring, None if it did neither (it ended during start-up)."""
        if self.restored is not None:
            return self.restored
        return 0 if self.of_kind("init", "step") else None

    @cached_property
    def ending(self) -> str | None:
        """How the attempt ended: the first host's ending that is not clean (its closing event's label, else the
        supervisor's `child_exit` ending); else the clean ending if every host has one; None if some host has
        no ending at all (killed without a supervisor, or still running)."""
        ends = [_host_ending(evs) for evs in self.by_host.values()]
        bad = sorted(e for e in ends if e is not None and e[1] not in CLEAN)
        if bad:
            return bad[0][1]
        return ends[0][1] if all(e is not None for e in ends) else None


def _host_ending(events: list[Event]) -> tuple[float, str] | None:
    """(when, how) one host's attempt ended, or None without a closing event or a supervisor's record."""
    closing = [e for e in events if e["kind"] in CLOSING] or [e for e in events if e["kind"] == "child_exit"]
    return (closing[-1]["t_wall"], ending(closing[-1])) if closing else None


def attempts_of(events: list[Event]) -> list[Attempt]:
    """Events grouped by attempt number, each in time order, each line once, each with an integer `host` and
    `attempt` (0 and 1 where missing); lines without a kind or a time are left out."""
    by: dict[int, list[Event]] = {}
    timed = [e for e in unique(events) if isinstance(e.get("kind"), str) and _is_number(e.get("t_wall"))]
    for e in sorted(timed, key=lambda e: e["t_wall"]):
        e = {**e, "host": _whole(e.get("host"), 0), "attempt": _whole(e.get("attempt"), 1)}
        by.setdefault(e["attempt"], []).append(e)
    return [Attempt(n, ev) for n, ev in sorted(by.items())]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _whole(v: Any, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def host_events(run_dir: Path) -> dict[int, list[Event]]:
    """Per host, the events of `run_dir/events/hostNNNN.jsonl`, each stamped with its host (from the file name
    where a line lacks it)."""
    files = sorted((Path(run_dir) / "events").glob("host*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{run_dir}/events has no host*.jsonl: is it a keel run directory?")
    out = {}
    for f in files:
        host = int(f.stem[4:])
        out[host] = [{"host": host, **e} for e in read_events(f)]
    return out
