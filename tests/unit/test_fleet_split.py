"""Work split across fleet members keeps order and balances sizes."""

from cluster.fleet import split_evenly


def test_split_evenly_preserves_order_and_balances():
    parts = split_evenly(list(range(10)), 3)
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert split_evenly([1], 3) == [[1], [], []]
