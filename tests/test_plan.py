"""The step plan: which steps train, and the skip list it owns."""

import pytest

from keel.train.plan import SkipList


def test_skip_list_parsing_and_membership():
    skip = SkipList(["10-12", 3, "11-15", "20"])
    assert skip.ranges == [(3, 3), (10, 15), (20, 20)]
    assert [s for s in range(25) if s in skip] == [3, 10, 11, 12, 13, 14, 15, 20]
    assert skip.before(12) == [(3, 3), (10, 11)]
    assert skip.count(0, 25) == 8
    for bad in ("x", "5-2", "-3"):
        with pytest.raises(ValueError, match="skip entry"):
            SkipList([bad])
