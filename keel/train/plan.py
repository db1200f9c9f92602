"""Which steps a run trains: [start, stop) less the skip list. The one owner of `data.skip_steps`.

The data order never sees the skip list: a skipped step's batch is simply not trained on, and every other
step's batch is unchanged. Skipped steps get no update; the step counter (and so the schedule) moves past them.

The skip list is the config's `data.skip_steps` plus the run's own decisions (a loss-spike rewind's skipped
steps), persisted in `run_dir/skip_decisions.jsonl` before the rewind acts: a resumed or replayed run reads
them back and makes the same choices, and `keel data inspect` shows them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.config import Config


class SkipList:
    """Steps whose batches are not trained on: entries "N" or "A-B" (inclusive)."""

    def __init__(self, entries: Sequence[str | int] = ()):
        ranges = []
        for e in entries:
            text = str(e).strip()
            try:
                lo, _, hi = text.partition("-")
                a, b = int(lo), int(hi) if hi else int(lo)
            except ValueError:
                raise ValueError(f"skip entry {e!r} is not a step N or a range A-B") from None
            if a < 0 or b < a:
                raise ValueError(f"skip entry {e!r}: need 0 <= A <= B")
            ranges.append((a, b))
        ranges.sort()
        merged: list[tuple[int, int]] = []
        for a, b in ranges:
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.ranges = merged

    def __contains__(self, step: int) -> bool:
        return any(a <= step <= b for a, b in self.ranges)

    def before(self, step: int) -> list[tuple[int, int]]:
        """The part of the list that covers steps < step (what a checkpoint at `step` has already applied)."""
        return [(a, min(b, step - 1)) for a, b in self.ranges if a < step]

    def count(self, start: int, stop: int) -> int:
        return sum(max(0, min(b, stop - 1) - max(a, start) + 1) for a, b in self.ranges)

    def applied_before(self, step: int) -> list[list[int]]:
        return [list(r) for r in self.before(step)]


@dataclass(frozen=True)
class StepPlan:
    """The steps of a run from a checkpoint at `start`: those in [start, stop) not in the skip list get an
    update; `steps` is the schedule's length (`train.steps`), `stop` where this process ends (`train.stop_at`)."""

    steps: int
    stop: int
    skip: SkipList

    @classmethod
    def from_config(cls, cfg: Config) -> StepPlan:
        """The config's steps and skip list, with the decisions recorded in its run directory."""
        return cls(cfg.train.steps, cfg.train.stop_at or cfg.train.steps, run_skip_list(cfg))

    def train_steps(self, start: int) -> list[int]:
        return [s for s in range(start, self.stop) if s not in self.skip]

    def resume_differences(self, saved_ranges: Sequence[Sequence[int]], step: int) -> list[str]:
        """A checkpoint at `step` was trained with skip list `saved_ranges`: the part of it before `step` must be
        the part of this plan's list before `step` (those steps are already trained, or already passed over)."""
        saved = SkipList([f"{a}-{b}" for a, b in saved_ranges]).applied_before(step)
        now = self.skip.applied_before(step)
        if saved == now:
            return []
        return [f"data.skip_steps before step {step}: {saved} -> {now} (steps already trained)"]


DECISIONS = "skip_decisions.jsonl"


def read_decisions(run_dir: str | Path) -> list[dict[str, Any]]:
    """The skip decisions a run made (each {"steps": "A-B", "reason", ...}), oldest first."""
    path = Path(run_dir) / DECISIONS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_decision(run_dir: str | Path, steps: str, reason: str, **fields: Any) -> dict[str, Any]:
    """Append a decision to skip `steps` ("A-B") to the run directory (flushed and synced before it acts)."""
    SkipList([steps])  # raises on a malformed range before anything is written
    rec = {"steps": steps, "reason": reason, "t_wall": time.time(), **fields}
    path = Path(run_dir) / DECISIONS
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return rec


def run_skip_list(cfg: Config) -> SkipList:
    """`data.skip_steps` plus the decisions recorded in `cfg.run_dir`."""
    return SkipList([*cfg.data.skip_steps, *(d["steps"] for d in read_decisions(cfg.run_dir))])
