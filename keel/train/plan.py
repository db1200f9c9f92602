"""Which steps a run trains: [start, stop) less the skip list. The one owner of `data.skip_steps`.

The data order never sees the skip list: a skipped step's batch is simply not trained on, and every other
step's batch is unchanged. Skipped steps get no update; the step counter (and so the schedule) moves past them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
        return cls(cfg.train.steps, cfg.train.stop_at or cfg.train.steps, SkipList(cfg.data.skip_steps))

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
