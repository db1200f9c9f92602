"""What happened to a run besides its time: failures by reason, hangs, loss spikes and rewinds, silent data
corruption, checkpoint fallbacks and failed saves, the background part of asynchronous saves, the supervisor's
records of its children. Counted from the events; an event several hosts wrote about the same thing (a spike,
a fallback) counts once."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

from keel.goodput.attempts import CLEAN, Attempt, Event, seconds

# Fields of an event that say where and when it was written, not what happened, and a failed save's traceback
# (it stays in the events file).
STAMP = ("t_wall", "t_mono", "host", "pid", "hostname", "kind", "traceback")


@dataclass(frozen=True)
class Incidents:
    failures: dict[str, int]
    hangs: list[dict[str, Any]]
    spikes: dict[str, int]
    rewinds: list[dict[str, Any]]
    sdc: list[dict[str, Any]]
    checkpoint_background_s: list[float]
    checkpoint_fallbacks: list[dict[str, Any]]
    checkpoint_failures: list[dict[str, Any]]
    restore_skipped: int
    child_exits: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        bg = self.checkpoint_background_s
        return {"failures": self.failures, "hangs": self.hangs, "spikes": self.spikes, "rewinds": self.rewinds,
                "sdc": self.sdc,
                "checkpoint_background": {"saves": len(bg), "total_s": sum(bg),
                                          "median_s": statistics.median(bg) if bg else None},
                "checkpoint_fallbacks": self.checkpoint_fallbacks, "checkpoint_failures": self.checkpoint_failures,
                "restore_skipped": self.restore_skipped, "child_exits": self.child_exits}

    def lines(self) -> list[str]:
        """One line per kind of incident that happened."""
        out = []
        if self.failures:
            out.append("failures: " + ", ".join(f"{k} {n}" for k, n in sorted(self.failures.items())))
        out.extend(f"hang: host {h.get('host')} attempt {h.get('attempt')} after step {h.get('step')}: "
                   f"{_num(h.get('since_s'))} s without progress (timeout {_num(h.get('timeout_s'))} s); "
                   f"stacks in {h.get('stacks')}" for h in self.hangs)
        if self.spikes:
            out.append("loss spikes: " + ", ".join(f"{k} {n}" for k, n in sorted(self.spikes.items())))
        out.extend(f"rewind: attempt {r.get('attempt')}, spike at step {r.get('spike_step')}, back to step "
                   f"{r.get('to_step')}, skipping steps {r.get('skip')}" for r in self.rewinds)
        out.extend(f"silent data corruption: attempt {s.get('attempt')} step {s.get('step')}" for s in self.sdc)
        bg = self.checkpoint_background_s
        if bg:
            out.append(f"checkpoint background (overlaps steps): {sum(bg):,.2f} s in {len(bg)} save(s), median "
                       f"{statistics.median(bg):,.3g} s")
        out.extend(f"checkpoint fallback: step {f.get('step')} set aside ({f.get('reason')}) to {f.get('moved_to')}"
                   for f in self.checkpoint_fallbacks)
        if self.restore_skipped and not self.checkpoint_fallbacks:
            out.append(f"checkpoints skipped as unusable at restore: {self.restore_skipped}")
        out.extend(f"checkpoint save failed: step {f.get('step')}: {f.get('error')}" for f in self.checkpoint_failures)
        return out


def incidents(attempts: list[Attempt]) -> Incidents:
    """The incidents of a run's attempts (see the module docstring)."""
    events = [e for a in attempts for e in a.events]
    commits: dict[tuple[int, str], float] = {}
    for e in _of(events, "checkpoint_commit"):
        key = (e["attempt"], str(e.get("step")))
        commits[key] = max(commits.get(key, 0.0), seconds(e, "background_s"))
    return Incidents(
        failures=failures(attempts), hangs=[_fields(e, keep_host=True) for e in _of(events, "hang")],
        spikes=dict(Counter(str(e.get("action", "unknown")) for e in _once(events, "spike", "step"))),
        rewinds=_once(events, "rewind", "spike_step"), sdc=_once(events, "sdc", "step"),
        checkpoint_background_s=list(commits.values()),
        checkpoint_fallbacks=_once(events, "checkpoint_fallback", "step"),
        checkpoint_failures=_once(events, "checkpoint_failure", "step"),
        restore_skipped=sum(len(e["skipped"]) for e in _once(events, "checkpoint_restore", "step")
                            if isinstance(e.get("skipped"), list)),
        child_exits=[_fields(e, keep_host=True) for e in _of(events, "child_exit")])


def failures(attempts: list[Attempt]) -> dict[str, int]:
    """How many attempts ended other than cleanly, by how: a failure's reason, "signal", "rewind", or "killed"
    (no closing event, but a later attempt or the supervisor's record shows that it ended). The last attempt
    without an ending may still be running and is not counted."""
    out: Counter[str] = Counter()
    for i, a in enumerate(attempts):
        ending = a.ending
        if ending is None and (i + 1 < len(attempts) or a.of_kind("child_exit")):
            ending = "killed"
        if ending is not None and ending not in CLEAN:
            out[ending] += 1
    return dict(out)


def _of(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e["kind"] == kind]


def _once(events: list[Event], kind: str, key: str) -> list[dict[str, Any]]:
    """The `kind` events, one per (attempt, `key`) however many hosts wrote it, with the hosts that did."""
    first: dict[tuple[int, str], dict[str, Any]] = {}
    for e in _of(events, kind):
        rec = first.setdefault((e["attempt"], str(e.get(key))), {**_fields(e), "hosts": []})
        rec["hosts"].append(e["host"])
    return list(first.values())


def _fields(e: Event, keep_host: bool = False) -> dict[str, Any]:
    """What an event says, without its stamps (but with its attempt, and its host if `keep_host`)."""
    return {k: v for k, v in e.items() if k not in STAMP or (keep_host and k == "host")}


def _num(x: Any) -> str:
    return f"{x:,.1f}" if isinstance(x, int | float) else str(x)
