"""Fault injection for burn-in tests: make healthy (fake CPU) devices look slow, wrong, flaky or throttled.

Burn-in measures durations and reads results back to the host; every check passes them through a `Faults`
object at exactly those two points. `Faults()` (the default, and the only thing `keel burnin` uses) changes
nothing. Tests build one with faults on chosen devices and check that burn-in blames exactly those devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def flip_bit(a: np.ndarray, index: int = 0, bit: int = 3) -> np.ndarray:
    """A copy of `a` with one bit of one element flipped (a silent data corruption)."""
    out = np.array(a, copy=True)
    raw = out.reshape(-1).view(np.uint8)
    raw[(index * out.dtype.itemsize) % raw.size] ^= np.uint8(1 << bit)
    return out


@dataclass
class Faults:
    slow: dict[int, float] = field(default_factory=dict)  # device id -> factor its compute and copies take longer
    bitflip: set[int] = field(default_factory=set)  # device id -> every result read back has a flipped bit
    flaky: set[int] = field(default_factory=set)  # device id -> every second read-back has a flipped bit
    bad_collective: set[int] = field(default_factory=set)  # device id -> its share of collective results corrupt
    throttle: dict[int, float] = field(default_factory=dict)  # device id -> throughput factor reached at the end
    slow_link: dict[tuple[int, int], float] = field(default_factory=dict)  # (src, dst) -> transfer time factor

    def duration(self, device: int, seconds: float, progress: float = 0.0) -> float:
        """A measured duration on `device`; `progress` in [0, 1] is how far into a sustained run it was taken."""
        seconds *= self.slow.get(device, 1.0)
        if device in self.throttle:
            seconds /= 1.0 + (self.throttle[device] - 1.0) * progress
        return seconds

    def link(self, src: int, dst: int, seconds: float) -> float:
        return seconds * self.slow_link.get((src, dst), 1.0)

    def result(self, device: int, value: np.ndarray, repeat: int = 0) -> np.ndarray:
        """A result computed on `device` (the `repeat`-th time), as the host reads it."""
        if device in self.bitflip or (device in self.flaky and repeat % 2 == 1):
            return flip_bit(value, index=repeat + 1)
        return value

    def collective(self, device: int, value: np.ndarray) -> np.ndarray:
        return flip_bit(value, index=7, bit=6) if device in self.bad_collective else value

    def __bool__(self) -> bool:
        return any((self.slow, self.bitflip, self.flaky, self.bad_collective, self.throttle, self.slow_link))
