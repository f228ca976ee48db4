"""User memories (RAMRec): merge weights, quality functions, eviction order, packing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from memory_store.user_memory import (
    UserMemories,
    fewest_accesses_quality,
    merge_observations,
    merge_weight,
    pack,
    recency_frequency_quality,
    record_access,
    unpack,
)

DIM = 4


def entries(**cols: list[float]) -> UserMemories:
    n = len(cols["items"])
    return UserMemories(
        user_id="u",
        items=np.asarray(cols["items"], np.int64),
        vectors=np.arange(n * DIM, dtype=np.float32).reshape(n, DIM),
        freq=np.asarray(cols.get("freq", [1] * n), np.int64),
        access_count=np.asarray(cols.get("access", [0] * n), np.int64),
        last_access=np.asarray(cols.get("last", [0.0] * n), np.float64),
        first_seen=np.zeros(n, np.float64),
    )


def test_merge_weight_grows_with_frequency_and_caps_at_0_9() -> None:
    assert merge_weight(0) == pytest.approx(0.7)
    assert merge_weight(3) == pytest.approx(0.7 + 0.05 * math.log(4))
    assert merge_weight(10_000) == pytest.approx(0.9)


def test_repeated_item_moves_less_as_frequency_grows() -> None:
    cur = UserMemories.empty("u", DIM)
    e = np.zeros((1, DIM), np.float32)
    new = np.ones((1, DIM), np.float32)
    cur, _ = merge_observations(cur, [7], e, [0.0], 4, recency_frequency_quality)
    vals = []
    for t in range(1, 4):
        cur, _ = merge_observations(cur, [7], new, [float(t)], 4, recency_frequency_quality)
        vals.append(float(cur.vectors[0, 0]))
    # e_t = 1 - prod(a_f): a = merge_weight(1), merge_weight(2), merge_weight(3)
    expected = [
        1 - merge_weight(1),
        1 - merge_weight(1) * merge_weight(2),
        1 - merge_weight(1) * merge_weight(2) * merge_weight(3),
    ]
    np.testing.assert_allclose(vals, expected, rtol=1e-6)
    assert cur.freq.tolist() == [4] and cur.last_access.tolist() == [3.0]


def test_default_quality_prefers_recent_and_frequent() -> None:
    week = 7 * 24 * 3600.0
    e = entries(items=[1, 2, 3], freq=[1, 10, 1], last=[0.0, 0.0, week])
    q = recency_frequency_quality(e, now=week)
    assert q[1] > q[0] and q[2] > q[0]
    assert q[2] == pytest.approx(2 * q[0])  # one half-life apart, same use


def test_eviction_uses_the_quality_function_and_breaks_ties_by_age() -> None:
    cur = entries(items=[1, 2, 3], access=[2, 0, 0], last=[5.0, 3.0, 1.0])
    out, evicted = merge_observations(cur, [9], np.ones((1, DIM)), [10.0], 3, fewest_accesses_quality)
    assert evicted == [3]  # items 2 and 3 tie on accesses; 3 was touched longest ago
    assert out.items.tolist() == [1, 2, 9]
    with pytest.raises(ValueError, match="shape"):
        merge_observations(cur, [9], np.ones((1, DIM)), [1.0], 3, lambda e, now: np.zeros(1))


def test_record_access_counts_only_held_items() -> None:
    cur = entries(items=[1, 2], last=[1.0, 1.0])
    out, hits = record_access(cur, [2, 5], 9.0)
    assert hits == 1 and out.access_count.tolist() == [0, 1] and out.last_access.tolist() == [1.0, 9.0]


def test_pack_unpack_round_trip() -> None:
    cur = entries(items=[5, 3], freq=[2, 1], access=[1, 4], last=[3.5, 1.25])
    back = unpack("u", DIM, cur.items.tolist(), pack(cur))
    order = np.argsort(cur.items)
    for name in ("items", "vectors", "freq", "access_count", "last_access", "first_seen"):
        np.testing.assert_array_equal(getattr(back, name), getattr(cur, name)[order])


def test_quality_functions_pickle_into_worker_processes() -> None:
    import pickle

    from memory_store.user_memory import recency_frequency

    e = entries(items=[1, 2], freq=[3, 1], last=[0.0, 5.0])
    for quality in (recency_frequency_quality, recency_frequency(10.0), fewest_accesses_quality):
        clone = pickle.loads(pickle.dumps(quality))
        np.testing.assert_array_equal(clone(e, 6.0), quality(e, 6.0))
