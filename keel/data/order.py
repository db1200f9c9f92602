"""Sample order: which sequence of which source sits in row r of the global batch at step N.

Everything here is a pure function of (data config, seed, step) and costs O(batch) time and O(1) memory in the
number of sequences:

- `KeyedPermutation` / `permute`: a bijection of [0, n) from an unbalanced Feistel network of FEISTEL_ROUNDS = 6
  rounds on b = bit_length(n - 1) bits (a high half of ceil(b/2) bits, a low half of floor(b/2) bits; splitmix64
  as the round function), with cycle walking for the values >= n. A fresh key per (source, epoch) gives a fresh
  shuffle per epoch without materialising anything.
- `Mixture`: how many rows of each batch belong to each source. Per batch, source s gets floor(w_s B) rows plus
  0 or 1 "extra" row; the extras follow a Pfair (PD^2) schedule of the fractional parts, so the cumulative count
  stays strictly within 1 of w_s x sequences seen at every batch boundary. The schedule is periodic (period =
  the common denominator of the fractional parts); one period is tabulated, any step is a table lookup.
- `MixturePlan`: weights that change at given steps (segments); counts before a change never depend on it.
(Skipped steps are not part of the order: `keel.train.plan` owns the skip list, and every batch stays put.)
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
FEISTEL_ROUNDS = 6
MAX_MIXTURE_PERIOD = 1 << 18


def derive_key(*parts: object) -> int:
    """A 64-bit key from any printable parts (seed, source name, epoch, ...)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective avalanche of uint64 values (wrapping arithmetic)."""
    x = np.array(x, dtype=np.uint64, copy=True)
    if x.ndim == 0:  # numpy warns about the (intended) wrapping multiply on scalars only
        return mix64(x[None])[0]
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _bit_length(n: np.ndarray) -> np.ndarray:
    """bit_length(n) for n >= 1, elementwise (exact below 2^53)."""
    return np.frexp(n.astype(np.float64))[1].astype(np.uint64)


def permute(i: np.ndarray, n: np.ndarray | int, key: np.ndarray | int) -> np.ndarray:
    """perm_{n,key}(i) elementwise: a keyed pseudo-random bijection of [0, n) for each element's (n, key).

    An unbalanced Feistel network on b = bit_length(max(n - 1, 1)) bits (the fewest that hold n values; 1 for
    n = 1), split into a high part of ceil(b/2) bits and a low part of floor(b/2) bits. FEISTEL_ROUNDS = 6 rounds
    alternate, high first, `high ^= F(low ^ k_r)` and `low ^= F(high ^ k_r)`, with F the splitmix64 finaliser
    cut to the updated part's width and k_r = mix64(key + r); each round is invertible. For n <= 2 (b = 1) the
    low part is empty and only the high rounds act. Values >= n are put through the whole network again (cycle
    walking) until they land in [0, n): walking follows i's cycle of the 2^b-permutation, so the result is a
    bijection of [0, n) for every n, and since 2^b < 2n (n >= 2) a walk takes fewer than 2 passes on average.
    """
    i, n, key = np.broadcast_arrays(np.asarray(i, np.int64), np.asarray(n, np.int64),
                                    np.asarray(key, np.uint64))
    shape = i.shape
    i, n, key = i.ravel(), n.ravel(), key.ravel()
    if i.size and ((i < 0).any() or (i >= n).any()):
        raise IndexError("permute: index outside [0, n)")
    bits = _bit_length(np.maximum(n - 1, 1))
    low_bits = bits // np.uint64(2)
    one = np.uint64(1)
    high_mask, low_mask = (one << (bits - low_bits)) - one, (one << low_bits) - one
    round_keys = [mix64(key + np.uint64(r)) for r in range(FEISTEL_ROUNDS)]
    n_u = n.astype(np.uint64)

    def rounds(x, low_bits, high_mask, low_mask, keys):
        high, low = x >> low_bits, x & low_mask
        for r, k in enumerate(keys):
            if r % 2 == 0:
                high = high ^ (mix64(low ^ k) & high_mask)
            else:
                low = low ^ (mix64(high ^ k) & low_mask)
        return (high << low_bits) | low

    x = rounds(i.astype(np.uint64), low_bits, high_mask, low_mask, round_keys)
    walk = np.flatnonzero(x >= n_u)
    while walk.size:  # cycle walking on the elements still outside [0, n)
        x[walk] = rounds(x[walk], low_bits[walk], high_mask[walk], low_mask[walk], [k[walk] for k in round_keys])
        walk = walk[x[walk] >= n_u[walk]]
    return x.astype(np.int64).reshape(shape)


class KeyedPermutation:
    """One permutation of [0, n): `perm(i)` for arrays of indices."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n, self.key = n, key & (2**64 - 1)

    def __call__(self, i: np.ndarray | int) -> np.ndarray:
        return permute(i, self.n, self.key)


# ------------------------------------------------------------------------------------------------- mixtures


def exact_weights(weights: Sequence[float]) -> tuple[Fraction, ...]:
    """Weights as exact fractions of their sum, read from their decimal text (0.3 is 3/10, not a float)."""
    fr = [Fraction(repr(float(w))) for w in weights]
    total = sum(fr)
    if any(w < 0 for w in fr) or total <= 0:
        raise ValueError(f"mixture weights {list(weights)} must be >= 0 with a positive sum")
    return tuple(w / total for w in fr)


@dataclass(frozen=True)
class _Task:
    """One source's extras as a Pfair task of weight a / p: subtask i (1-based) has window [r(i), d(i))."""

    a: int
    p: int

    def release(self, i: int) -> int:
        return ((i - 1) * self.p) // self.a

    def deadline(self, i: int) -> int:
        return -((-i * self.p) // self.a)

    def b(self, i: int) -> int:
        return int((i * self.p) % self.a != 0)

    def group_deadlines(self) -> list[int]:
        """PD^2 group deadline of subtasks 1..a (0 for light tasks, weight < 1/2); period a in i, p in time."""
        if 2 * self.a < self.p:
            return [0] * self.a
        out = [0] * (self.a + 1)
        best = None
        for i in range(self.a, 0, -1):
            d = self.deadline(i)
            cands = [d] if self.b(i) == 0 else []
            if i < self.a and self.deadline(i + 1) - self.release(i + 1) == 3:
                cands.append(self.deadline(i + 1) - 1)
            if best is not None:
                cands.append(best)
            best = min(cands) if cands else None
            out[i] = best if best is not None else d
        return out[1:]


@functools.lru_cache(maxsize=64)
def _extras_table(numerators: tuple[int, ...], period: int, k: int) -> np.ndarray:
    """X[t, s] = extras source s has received in batches [0, t), t in [0, period], by PD^2 scheduling."""
    m = len(numerators)
    tasks = [_Task(a, period) if a else None for a in numerators]
    groups = [t.group_deadlines() if t else [] for t in tasks]
    done = [0] * m
    table = np.zeros((period + 1, m), dtype=np.int64)
    for t in range(period):
        ready = []
        for s, task in enumerate(tasks):
            if task is None or done[s] >= task.a:
                continue
            i = done[s] + 1
            if task.release(i) <= t:
                # PD^2 priority: earlier deadline, then b-bit 1 first, then later group deadline.
                ready.append((task.deadline(i), -task.b(i), -groups[s][i - 1], s))
        ready.sort()
        if len(ready) < k:
            raise AssertionError(f"Pfair schedule infeasible at batch {t}: {len(ready)} ready < {k}")
        for *_, s in ready[:k]:
            done[s] += 1
        table[t + 1] = done
    return table


class Mixture:
    """Rows per source for every batch of size `batch_size` with fixed weights."""

    def __init__(self, weights: Sequence[float], batch_size: int):
        self.weights = exact_weights(weights)
        self.batch_size = batch_size
        share = [w * batch_size for w in self.weights]
        self.base = np.array([math.floor(x) for x in share], dtype=np.int64)
        frac = [x - math.floor(x) for x in share]
        self.extras = int(sum(frac))  # an integer: sum(share) = batch_size
        self.period = math.lcm(*(f.denominator for f in frac))
        if self.period > MAX_MIXTURE_PERIOD:
            raise ValueError(
                f"mixture weights {[float(w) for w in self.weights]} with batch size {batch_size} repeat only every "
                f"{self.period:,} batches (limit {MAX_MIXTURE_PERIOD:,}); use weights with fewer decimal places"
            )
        self.numerators = tuple(int(f * self.period) for f in frac)
        self._table = _extras_table(self.numerators, self.period, self.extras)

    def cumulative(self, steps: np.ndarray | int) -> np.ndarray:
        """Rows each source has received in batches [0, step): shape steps.shape + (sources,)."""
        steps = np.asarray(steps, dtype=np.int64)
        q, r = np.divmod(steps, self.period)
        return self.base * steps[..., None] + q[..., None] * np.array(self.numerators) + self._table[r]

    def counts(self, steps: np.ndarray | int) -> np.ndarray:
        steps = np.asarray(steps, dtype=np.int64)
        return self.cumulative(steps + 1) - self.cumulative(steps)


class MixturePlan:
    """Weights per segment: `changes` = [(step, weights), ...] after the initial weights that start at step 0."""

    def __init__(self, weights: Sequence[float], batch_size: int,
                 changes: Sequence[tuple[int, Sequence[float]]] = ()):
        self.starts = [0] + [s for s, _ in changes]
        if any(b <= a for a, b in zip(self.starts, self.starts[1:], strict=False)):
            raise ValueError(f"mixture changes must be at increasing steps > 0, got {self.starts[1:]}")
        self.segments = [Mixture(weights, batch_size)] + [Mixture(w, batch_size) for _, w in changes]
        self.n_sources = len(weights)
        ends = self.starts[1:]
        # rows per source before each segment starts
        self._before = [np.zeros(self.n_sources, dtype=np.int64)]
        for seg, start, end in zip(self.segments, self.starts, ends, strict=False):
            self._before.append(self._before[-1] + seg.cumulative(end - start))

    def cumulative(self, steps: np.ndarray | int) -> np.ndarray:
        """Rows each source has received in batches [0, step): shape steps.shape + (sources,)."""
        steps = np.asarray(steps, dtype=np.int64)
        seg = np.searchsorted(self.starts, steps, side="right") - 1
        out = np.empty(steps.shape + (self.n_sources,), dtype=np.int64)
        for i in np.unique(seg):
            at = seg == i
            out[at] = self._before[i] + self.segments[i].cumulative(steps[at] - self.starts[i])
        return out

    def counts(self, steps: np.ndarray | int) -> np.ndarray:
        steps = np.asarray(steps, dtype=np.int64)
        return self.cumulative(steps + 1) - self.cumulative(steps)


# ------------------------------------------------------------------------------------------------ batches


@dataclass(frozen=True)
class Rows:
    """Global batches at some steps, (K, B) arrays: per row its source, the source's sample number j (the j-th
    sequence drawn from that source since step 0), the epoch j // n_sequences and the sequence (window) index."""

    source: np.ndarray
    sample: np.ndarray
    epoch: np.ndarray
    sequence: np.ndarray


class SampleOrder:
    """Rows of the global batch at step N = f(mixture plan, sequences per source, seed, N); vectorised over N."""

    def __init__(self, plan: MixturePlan, n_sequences: Sequence[int], seed: int, names: Sequence[str]):
        if len(n_sequences) != plan.n_sources or len(names) != plan.n_sources:
            raise ValueError("one sequence count and one name per source")
        if min(n_sequences) < 1:
            raise ValueError(f"every source needs at least one sequence, got {list(n_sequences)}")
        self.plan = plan
        self.n_sequences = np.array(n_sequences, dtype=np.int64)
        self.seed = seed
        self.names = list(names)
        self.batch_size = plan.segments[0].batch_size
        self._epoch_keys: dict[tuple[int, int], int] = {}
        self._rows_key = derive_key("rows", seed)

    def _epoch_key(self, source: int, epoch: int) -> int:
        k = self._epoch_keys.get((source, epoch))
        if k is None:
            k = self._epoch_keys[(source, epoch)] = derive_key("epoch", self.seed, self.names[source], epoch)
        return k

    def rows(self, steps: np.ndarray | Sequence[int] | int) -> Rows:
        steps = np.atleast_1d(np.asarray(steps, dtype=np.int64))
        b = self.batch_size
        before = self.plan.cumulative(steps)  # (K, m)
        ends = np.cumsum(self.plan.cumulative(steps + 1) - before, axis=1)  # (K, m): end of each source's block
        starts = ends - (ends - np.concatenate([np.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1))
        # Sorted layout: slots [starts[s], ends[s]) of a batch belong to source s. Row j takes slot perm_step(j),
        # a keyed shuffle of [0, B): the order of B hashed values (B is small; this is cheaper than a Feistel).
        step_keys = mix64(steps.astype(np.uint64) ^ np.uint64(self._rows_key))
        slot = np.argsort(mix64(step_keys[:, None] + np.arange(b, dtype=np.uint64)[None, :]), axis=1, kind="stable")
        source = (slot[:, :, None] >= ends[:, None, :]).sum(-1)  # (K, B)
        k_idx = np.arange(len(steps))[:, None]
        sample = before[k_idx, source] + slot - starts[k_idx, source]
        n = self.n_sequences[source]
        epoch, offset = np.divmod(sample, n)
        keys = np.empty(source.shape, dtype=np.uint64)
        pairs = source * (2**40) + epoch
        for pair in np.unique(pairs):
            keys[pairs == pair] = self._epoch_key(int(pair >> 40), int(pair & (2**40 - 1)))
        return Rows(source, sample, epoch, permute(offset, n, keys))

    def epochs(self, step: int) -> np.ndarray:
        """Epochs of each source consumed by the batches before `step` (fractional)."""
        return self.plan.cumulative(np.array([step]))[0] / self.n_sequences
