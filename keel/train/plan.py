"""Which steps a run trains: [start, stop) less the skip list. The one owner of `data.skip_steps`.

The data order never sees the skip list: a skipped step's batch is simply not trained on, and every other
step's batch is unchanged. Skipped steps get no update; the step counter (and so the schedule) moves past them.
"""

from __future__ import annotations

from collections.abc import Sequence


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
