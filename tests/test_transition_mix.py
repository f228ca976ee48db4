"""The transition channel's counts and shares on tiny known sequences."""

from __future__ import annotations

import numpy as np
import pytest

from bench.transition_mix import transition_share, transitions


def test_transitions_count_each_follower_by_its_distance() -> None:
    seqs = [np.array([1, 2, 3, 7]), np.array([1, 3, 9])]  # each loses its last item (drop_last=1)
    t = transitions(seqs, drop_last=1, n_items=10).to_dense()
    assert t[1, 2] == 1.0 and t[2, 3] == 1.0
    assert t[1, 3] == pytest.approx(0.5 + 1.0)  # two steps after 1 in the first, one in the second
    assert t[3, 7] == 0.0 and t[3, 9] == 0.0  # a dropped item (an evaluation target) never counts
    assert float(t.sum()) == pytest.approx(3.5)


def test_share_weights_recent_items_and_sums_to_one() -> None:
    t = transitions([np.array([1, 2]), np.array([3, 4])], drop_last=0, n_items=6)
    inputs = np.array([[1, 3, 0], [5, 0, 0], [0, 0, 0]])  # last item 3 (k=1), then 1 (k=2); 5: no transitions
    share = transition_share(inputs, np.array([2, 1, 0]), t)
    assert share[0, 4] == pytest.approx(1.0 / 1.5) and share[0, 2] == pytest.approx(0.5 / 1.5)
    assert float(share[0].sum()) == pytest.approx(1.0)
    assert float(share[1].abs().sum()) == 0.0 and float(share[2].abs().sum()) == 0.0  # nothing to read: zeros


def test_share_of_a_batch_without_history_is_all_zeros() -> None:
    t = transitions([np.array([1, 2])], drop_last=0, n_items=3)
    share = transition_share(np.zeros((2, 1), np.int64), np.array([0, 0]), t)
    assert share.shape == (2, 3) and float(share.abs().sum()) == 0.0
