"""The sample-order math, property-tested: bijection, exact mixtures, schedules."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.data.order import KeyedPermutation, Mixture, MixturePlan, SampleOrder, permute

SIZES = [1, 2, 3, 4, 5, 7, 8, 9] + [2**k + 1 for k in range(2, 17)] + [2**k for k in range(4, 15)]


@pytest.mark.parametrize("n", SIZES)
def test_permutation_is_a_bijection_including_2k_plus_1(n):
    for key in (0, 1, 2**63 + 5):
        out = KeyedPermutation(n, key)(np.arange(n))
        assert np.array_equal(np.sort(out), np.arange(n))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), key=st.integers(0, 2**64 - 1))
def test_permutation_bijection_property(n, key):
    out = permute(np.arange(n), n, key)
    assert np.array_equal(np.sort(out), np.arange(n))


def test_vectorised_permute_matches_scalar_and_keys_differ():
    n = np.array([10, 1000, 2**20 + 1])
    i = np.array([3, 999, 2**20])
    one_by_one = [int(KeyedPermutation(int(a), 7)(b)) for a, b in zip(n, i, strict=True)]
    assert [int(x) for x in permute(i, n, 7)] == one_by_one
    a, b = KeyedPermutation(1000, 1)(np.arange(1000)), KeyedPermutation(1000, 2)(np.arange(1000))
    assert (a != b).mean() > 0.9  # a fresh key is a fresh order
    assert abs(np.corrcoef(np.arange(1000), a)[0, 1]) < 0.15  # and not close to the identity


weights_st = st.lists(st.integers(0, 1000), min_size=1, max_size=6).filter(lambda w: sum(w) > 0)


@settings(max_examples=150, deadline=None)
@given(w=weights_st, batch=st.integers(1, 96))
def test_mixture_exact_per_batch_and_cumulative(w, batch):
    weights = [x / 1000 for x in w]
    mix = Mixture(weights, batch)
    steps = np.arange(min(2 * mix.period + 3, 4000))
    cum = mix.cumulative(steps)
    share = np.array([float(x) for x in mix.weights])
    target = steps[:, None] * batch * share
    assert np.abs(cum - target).max() < 1  # never drifts by 1 from weight x sequences seen
    counts = mix.counts(steps)
    assert (counts.sum(1) == batch).all()
    assert (np.abs(counts - batch * share) <= 1 + 1e-9).all()  # every batch within +-1 of weight x batch


@settings(max_examples=40, deadline=None)
@given(w1=weights_st, w2=weights_st, change=st.integers(1, 50), batch=st.integers(1, 64))
def test_schedule_keeps_earlier_batches_and_exactness(w1, w2, change, batch):
    m = min(len(w1), len(w2))
    w1, w2 = w1[:m], w2[:m]
    if not sum(w1) or not sum(w2):
        return
    plain = MixturePlan(w1, batch)
    sched = MixturePlan(w1, batch, [(change, w2)])
    before = np.arange(change + 1)
    assert np.array_equal(plain.cumulative(before), sched.cumulative(before))
    after = np.arange(change, change + 60)
    seg = Mixture(w2, batch)
    share = np.array([float(x) for x in seg.weights])
    rel = sched.cumulative(after) - sched.cumulative(change)
    assert np.abs(rel - (after - change)[:, None] * batch * share).max() < 1
    assert (np.abs(sched.counts(after) - batch * share) <= 1 + 1e-9).all()


def _order(batch=16, n=(1000, 37, 5000), w=(0.5, 0.25, 0.25), seed=0):
    return SampleOrder(MixturePlan(list(w), batch), list(n), seed, ["a", "b", "c"][: len(n)])


def test_each_epoch_of_each_source_visits_every_sequence_once():
    order = _order(n=(100, 37, 5000))
    rows = order.rows(np.arange(60))
    for s, n in enumerate(order.n_sequences):
        at = rows.source == s
        for e in np.unique(rows.epoch[at]):
            seqs = rows.sequence[at & (rows.epoch == e)]
            assert len(np.unique(seqs)) == len(seqs)
            if (rows.epoch[at] > e).any():  # a finished epoch is a full permutation
                assert np.array_equal(np.sort(seqs), np.arange(n))
        e0, e1 = (rows.sequence[at & (rows.epoch == e)] for e in (0, 1))
        if s == 1:
            assert not np.array_equal(e0, e1)  # a fresh order each epoch


def test_rows_are_replayable_and_blocking_free():
    order = _order()
    block = order.rows(np.arange(50, 70))
    again = _order()
    for k, step in enumerate(range(50, 70)):
        one = again.rows(step)
        for f in ("source", "sample", "epoch", "sequence"):
            assert np.array_equal(getattr(block, f)[k], getattr(one, f)[0])


def test_sources_are_shuffled_inside_the_batch():
    """The rows of each source sit at a fresh uniform random set of positions per step (a keyed permutation of
    [0, B) per step): each source reaches both halves of every batch, every (source, position) cell is filled at
    its share's rate, and consecutive layouts agree only as often as independent ones would. Replay is exact."""
    steps = np.arange(400)
    source = _order(batch=64).rows(steps).source  # (400, 64): exactly 32, 16, 16 rows of a, b, c per batch
    share = np.array([32, 16, 16]) / 64
    for s in range(3):
        assert ((source[:, :32] == s).any(1) & (source[:, 32:] == s).any(1)).all()
    counts = np.stack([(source == s).sum(0) for s in range(3)])  # (3, 64): steps with source s at row r
    binomial_sd = np.sqrt(len(steps) * share * (1 - share))[:, None]
    assert (np.abs(counts - len(steps) * share[:, None]) < 4.5 * binomial_sd).all()
    assert abs((source[1:] == source[:-1]).mean() - (share**2).sum()) < 0.02  # 0.375 for independent layouts
    np.testing.assert_array_equal(_order(batch=64).rows(steps[::-1]).source[::-1], source)


def test_weights_that_never_repeat_are_refused():
    with pytest.raises(ValueError, match="fewer decimal places"):
        Mixture([0.1234567891, 0.3, 0.5765432109], 64)
