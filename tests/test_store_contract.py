"""One contract suite for every ``MemoryStore`` backend (Redis on db 9 and embedded), on known answers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from memory_store import (
    Interaction,
    MemoryBatch,
    MemoryStore,
    UserMemories,
    fewest_accesses_quality,
    open_store,
)
from memory_store.base import parse_position
from memory_store.user_memory import merge_observations, merge_weight, record_access

DIM = 8


def unit(i: int) -> np.ndarray:
    """The i-th basis vector of R^DIM: known nearest neighbours and scores."""
    v = np.zeros(DIM, np.float32)
    v[i] = 1.0
    return v


def random_batch(n: int, seed: int, user: str = "u", start_item: int = 1) -> MemoryBatch:
    rng = np.random.default_rng(seed)
    return MemoryBatch.create(
        rng.standard_normal((n, DIM)).astype(np.float32),
        np.arange(start_item, start_item + n),
        [user] * n,
        np.arange(n, dtype=np.float64),
        np.arange(n) % 50,
        DIM,
    )


async def all_ids(store: MemoryStore, queries: int = 1) -> set[int]:
    """Every id the index holds, found by an exhaustive search (k above the store size)."""
    stats = await store.stats()
    k = max(stats.index_size, 1)
    res = await store.search(np.ones((queries, DIM), np.float32), k)
    return {int(i) for i in res.ids[0] if i >= 0}


async def test_search_returns_exact_neighbour_with_metadata(store: MemoryStore) -> None:
    keys = np.stack([unit(i) for i in range(4)])
    batch = MemoryBatch.create(
        keys, [11, 12, 13, 14], ["a", "b", "c", "d"], [1.0, 2.0, 3.0, 4.0], [0, 1, 2, 3], DIM
    )
    res = await store.add_memories(batch)
    ids = res.memory_ids.tolist()  # distinct and positive (1..4 with one slot group)
    assert res.accepted == 4 and len(set(ids)) == 4 and min(ids) >= 1
    query = unit(2) * 0.9 + unit(0) * 0.1
    out = await store.search(query[None, :], 2)
    assert out.ids.tolist() == [[ids[2], ids[0]]]
    expected = query / np.linalg.norm(query)
    np.testing.assert_allclose(out.scores[0], [expected[2], expected[0]], rtol=1e-5)
    assert out.items.tolist() == [[13, 11]]
    assert out.users.tolist() == [["c", "a"]]
    assert out.prefix_lens.tolist() == [[2, 0]]
    assert out.timestamps.tolist() == [[3.0, 1.0]]


async def test_store_normalises_keys_and_queries(store: MemoryStore) -> None:
    raw = np.array([[3.0, 4.0] + [0.0] * (DIM - 2)], np.float32)
    (mid,) = (await store.add_memories(MemoryBatch.create(raw, [5], ["u"], [0.0], [1], DIM))).memory_ids
    out = await store.search(raw * 10.0, 1)
    assert out.ids.tolist() == [[mid]]
    assert out.scores[0, 0] == pytest.approx(1.0, abs=1e-6)


async def test_search_pads_when_fewer_memories_than_k(store: MemoryStore) -> None:
    empty = await store.search(unit(0)[None], 2)
    assert empty.ids.tolist() == [[-1, -1]] and empty.users.tolist() == [["", ""]]
    added = await store.add_memories(MemoryBatch.create(unit(0)[None], [7], ["u"], [0.0], [0], DIM))
    out = await store.search(np.stack([unit(0), unit(1)]), 3)
    assert out.ids.shape == (2, 3)
    assert out.ids[:, 0].tolist() == [added.memory_ids[0]] * 2
    assert (out.ids[:, 1:] == -1).all() and np.isneginf(out.scores[:, 1:]).all()
    assert (out.items[:, 1:] == 0).all() and (out.users[:, 1:] == "").all()
    assert (out.prefix_lens[:, 1:] == -1).all()


async def test_removed_ids_never_come_back(store: MemoryStore) -> None:
    res = await store.add_memories(random_batch(200, seed=1))
    ids = res.memory_ids
    removed = ids[::3]
    assert await store.remove_memories(removed) == removed.size
    remaining = await all_ids(store)
    assert remaining == set(ids.tolist()) - set(removed.tolist())
    stats = await store.stats()
    assert stats.memories == stats.index_size == 200 - removed.size


async def test_remove_unknown_id_raises_and_removes_nothing(store: MemoryStore) -> None:
    ids = (await store.add_memories(random_batch(5, seed=2))).memory_ids
    with pytest.raises(ValueError, match="unknown memory id"):
        await store.remove_memories([int(ids[0]), 999])
    assert await all_ids(store) == set(ids.tolist())
    with pytest.raises(ValueError):
        await store.remove_memories([0])


@pytest.mark.parametrize(
    ("keys", "items", "match"),
    [
        (np.ones((1, DIM + 1), np.float32), [1], "shape"),
        (np.full((1, DIM), np.nan, np.float32), [1], "NaN"),
        (np.zeros((1, DIM), np.float32), [1], "zero"),
        (np.ones((1, DIM), np.float32), [0], "items"),
    ],
)
async def test_bad_memories_raise_and_leave_store_unchanged(
    store: MemoryStore, keys: np.ndarray, items: list[int], match: str
) -> None:
    await store.add_memories(random_batch(3, seed=3))
    with pytest.raises(ValueError, match=match):
        await store.add_memories(MemoryBatch.create(keys, items, ["u"], [0.0], [0], DIM))
    with pytest.raises(ValueError, match=match.replace("items", "item")):
        events = [Interaction("u", items[0], 1.0, "bad")]
        await store.ingest(events, keys, [0])
    stats = await store.stats()
    assert stats.memories == stats.index_size == 3
    assert await store.histories(["u"], 10) == [[]]


async def test_bad_queries_raise(store: MemoryStore) -> None:
    with pytest.raises(ValueError, match="shape"):
        await store.search(np.ones((2, DIM - 1), np.float32), 3)
    with pytest.raises(ValueError, match="NaN"):
        await store.search(np.full((1, DIM), np.inf, np.float32), 3)
    with pytest.raises(ValueError, match="k must be"):
        await store.search(np.ones((1, DIM), np.float32), 0)


async def test_append_interactions_is_idempotent_by_event_id(store: MemoryStore) -> None:
    events = [Interaction("alice", i, float(i), f"e{i}") for i in range(1, 6)]
    first = await store.append_interactions(events)
    assert (first.accepted, first.duplicates) == (5, 0)
    again = await store.append_interactions(events[2:] + [Interaction("alice", 6, 6.0, "e6")])
    assert (again.accepted, again.duplicates) == (1, 3)
    within = await store.append_interactions(
        [Interaction("bob", 1, 0.0, "x"), Interaction("bob", 2, 0.0, "x")]
    )
    assert (within.accepted, within.duplicates) == (1, 1)
    no_id = await store.append_interactions([Interaction("bob", 3, 1.0), Interaction("bob", 3, 1.0)])
    assert no_id.accepted == 2
    assert await store.histories(["alice", "bob", "nobody"], 4) == [[3, 4, 5, 6], [1, 3, 3], []]
    assert (await store.stats()).memories == 0


async def test_histories_are_trimmed_to_history_len(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    store = await open_store(store_config(store_backend, history_len=3))
    try:
        await store.append_interactions([Interaction("u", i, float(i)) for i in range(1, 8)])
        assert await store.histories(["u"], 10) == [[5, 6, 7]]
    finally:
        await store.close()


async def test_ingest_writes_interaction_and_memory_together(store: MemoryStore) -> None:
    events = [Interaction("u1", 10, 100.0, "a"), Interaction("u2", 20, 200.0, "b")]
    keys = np.stack([unit(0), unit(1)])
    res = await store.ingest(events, keys, [4, 7])
    first = res.memory_ids.tolist()
    assert res.accepted == 2 and len(set(first)) == 2 and min(first) >= 1 and res.position
    dup = await store.ingest(
        [events[0], Interaction("u1", 11, 101.0, "c")], np.stack([unit(2), unit(3)]), [5, 5]
    )
    assert (dup.accepted, dup.duplicates) == (1, 1)
    new = int(dup.memory_ids[1])
    assert dup.memory_ids[0] == -1 and new >= 1 and new not in first
    assert await store.histories(["u1", "u2"], 5) == [[10, 11], [20]]
    out = await store.search(np.stack([unit(0), unit(2), unit(3)]), 1)
    assert out.ids[[0, 2], 0].tolist() == [first[0], new]
    assert out.scores[1, 0] < 0.5  # the duplicate's key (unit 2) was never stored
    assert out.items[0, 0] == 10 and out.users[0, 0] == "u1" and out.prefix_lens[0, 0] == 4
    assert out.timestamps[0, 0] == 100.0


async def test_global_capacity_evicts_oldest_and_leaves_the_index(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    # one slot group: the whole namespace's oldest go (several groups: each group's, see the next test)
    store = await open_store(store_config(store_backend, capacity=50, slot_groups=1))
    try:
        first = (await store.add_memories(random_batch(40, seed=4))).memory_ids
        assert await store.remove_memories([int(first[25])]) == 1
        second = (await store.add_memories(random_batch(30, seed=5))).memory_ids
        held = await all_ids(store)
        kept = sorted(set(first.tolist() + second.tolist()) - {int(first[25])})[-50:]
        assert held == set(kept)
        stats = await store.stats()
        assert stats.memories == stats.index_size == 50
    finally:
        await store.close()


async def test_per_user_capacity_evicts_that_users_oldest(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    store = await open_store(store_config(store_backend, user_capacity=3))
    try:
        a = (await store.add_memories(random_batch(5, seed=6, user="a"))).memory_ids
        b = (await store.add_memories(random_batch(2, seed=7, user="b"))).memory_ids
        a2 = (await store.add_memories(random_batch(1, seed=8, user="a"))).memory_ids
        assert await all_ids(store) == set(a[-2:].tolist() + b.tolist() + a2.tolist())
    finally:
        await store.close()


async def test_user_memories_merge_by_moving_average(store: MemoryStore) -> None:
    e1, e2, e3 = unit(0) * 2, unit(1) * 2, unit(2)
    assert await store.update_user_memories("u", [5, 6], np.stack([e1, e2]), [1.0, 2.0]) == []
    assert await store.update_user_memories("u", [5], e3[None], [3.0]) == []
    [mem] = await store.user_memories(["u"])
    assert mem.items.tolist() == [5, 6] and mem.freq.tolist() == [2, 1]
    a = merge_weight(1)  # min(0.9, 0.7 + 0.05 ln 2)
    np.testing.assert_allclose(mem.vectors[0], a * e1 + (1 - a) * e3, rtol=1e-6)
    np.testing.assert_allclose(mem.vectors[1], e2)
    assert mem.last_access.tolist() == [3.0, 2.0] and mem.first_seen.tolist() == [1.0, 2.0]
    [empty] = await store.user_memories(["nobody"])
    assert len(empty) == 0 and empty.vectors.shape == (0, DIM)


async def test_user_memories_are_put_only_where_none_are_held(store: MemoryStore) -> None:
    held, _ = merge_observations(
        UserMemories.empty("a", DIM), [3, 4, 3], np.stack([unit(0), unit(1), unit(2)]), [0.0, 1.0, 2.0], 8,
        fewest_accesses_quality,
    )  # fmt: skip
    held, _ = record_access(held, [4], 2.0)
    await store.update_user_memories("b", [9], unit(3)[None], [5.0])
    other = replace(held, user_id="b")
    assert await store.put_user_memories([held, other, UserMemories.empty("c", DIM)]) == 1  # b holds some
    [a, b, c] = await store.user_memories(["a", "b", "c"])
    order = np.argsort(a.items)  # a backend may give the rows in another order
    np.testing.assert_array_equal(a.items[order], held.items[np.argsort(held.items)])
    np.testing.assert_array_equal(a.vectors[order], held.vectors[np.argsort(held.items)])
    assert a.freq[order].tolist() == [2, 1] and a.access_count[order].tolist() == [0, 1]
    assert a.last_access[order].tolist() == [2.0, 2.0] and a.first_seen[order].tolist() == [0.0, 1.0]
    assert b.items.tolist() == [9] and len(c) == 0
    assert await store.put_user_memories([held]) == 0  # a repeated load writes nothing
    with pytest.raises(ValueError):
        await store.put_user_memories([replace(held, user_id="d", vectors=held.vectors[:, :2])])
    assert (await store.erase_user("a")).user_memories == 2


async def test_user_memories_evict_lowest_quality(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    store = await open_store(
        store_config(store_backend, user_memory_capacity=2, quality=fewest_accesses_quality)
    )
    try:
        await store.update_user_memories("u", [1, 2], np.stack([unit(0), unit(1)]), [1.0, 2.0])
        assert await store.record_user_memory_access("u", [1, 99], 5.0) == 1
        assert await store.update_user_memories("u", [3], unit(2)[None], [6.0]) == [2]
        [mem] = await store.user_memories(["u"])
        assert mem.items.tolist() == [1, 3] and mem.access_count.tolist() == [1, 0]
        with pytest.raises(ValueError):
            await store.update_user_memories("u", [4], np.ones((1, DIM + 1)), [1.0])
    finally:
        await store.close()


async def test_snapshot_restore_gives_the_same_ids_and_answers(store: MemoryStore) -> None:
    ids = (await store.add_memories(random_batch(300, seed=9))).memory_ids
    await store.remove_memories(ids[:10])
    await store.append_interactions([Interaction("h", 1, 1.0, "e1")])
    snap = await store.snapshot()
    assert snap.memories == 290
    more = (await store.add_memories(random_batch(20, seed=10, start_item=1000))).memory_ids
    await store.remove_memories(more[:5])
    queries = np.random.default_rng(11).standard_normal((5, DIM)).astype(np.float32)
    before_ids, before = await all_ids(store), await store.search(queries, 10)
    info = await store.restore()
    assert info.memories == 305
    after = await store.search(queries, 10)
    assert await all_ids(store) == before_ids
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_allclose(after.scores, before.scores)
    assert await store.histories(["h"], 5) == [[1]]
    assert (await store.append_interactions([Interaction("h", 1, 1.0, "e1")])).duplicates == 1


async def test_reopen_after_close_loses_and_doubles_nothing(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    config = store_config(store_backend)
    store = await open_store(config)
    ids = (await store.add_memories(random_batch(100, seed=12))).memory_ids
    await store.snapshot()
    events = [Interaction("r", i, float(i), f"r{i}") for i in range(1, 21)]
    keys = np.random.default_rng(13).standard_normal((20, DIM)).astype(np.float32)
    new_ids = (await store.ingest(events, keys, [1] * 20)).memory_ids
    await store.remove_memories(ids[:7])
    expected = await all_ids(store)
    await store.close()

    reopened = await open_store(config)
    try:
        assert await all_ids(reopened) == expected == set(ids[7:].tolist()) | set(new_ids.tolist())
        stats = await reopened.stats()
        assert stats.index_size == stats.memories == len(expected)
        again = await reopened.ingest(events, keys, [1] * 20)
        assert (again.accepted, again.duplicates) == (0, 20)
        assert await reopened.histories(["r"], 50) == [list(range(1, 21))]
        nxt = (await reopened.add_memories(random_batch(1, seed=14))).memory_ids
        assert int(nxt[0]) > max(expected)
    finally:
        await reopened.close()


async def test_exact_and_ivf_search_agree(store_backend: str, store_config: Callable[..., Any]) -> None:
    """Past the exact threshold the index becomes IVF; with enough probes it matches exact search."""
    from memory_store import IndexParams

    params = IndexParams(exact_threshold=2_000, min_nlist=16, nprobe=16)
    store = await open_store(store_config(store_backend, index=params))
    try:
        rng = np.random.default_rng(15)
        centres = rng.standard_normal((32, DIM))
        keys = (centres[rng.integers(0, 32, 4_000)] + 0.3 * rng.standard_normal((4_000, DIM))).astype(
            np.float32
        )
        batch = MemoryBatch.create(
            keys, np.arange(1, 4_001), ["u"] * 4_000, np.zeros(4_000), [0] * 4_000, DIM
        )
        ids = (await store.add_memories(batch)).memory_ids
        assert (await store.stats()).index_kind.startswith("ivf")
        queries = (centres[rng.integers(0, 32, 50)] + 0.3 * rng.standard_normal((50, DIM))).astype(np.float32)
        out = await store.search(queries, 10)
        unit_q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        exact = ids[np.argsort(-(unit_q @ batch.keys.T), axis=1)[:, :10]]
        recall = np.mean(
            [len(set(o) & set(e)) / 10 for o, e in zip(out.ids.tolist(), exact.tolist(), strict=True)]
        )
        assert recall >= 0.95
        await store.remove_memories(out.ids[:, 0])
        assert not set(out.ids[:, 0].tolist()) & set((await store.search(queries, 10)).ids.ravel().tolist())
    finally:
        await store.close()


async def test_stats_and_replication_status(store: MemoryStore) -> None:
    res = await store.add_memories(random_batch(10, seed=16))
    assert await store.wait_applied(res.position, 5.0)
    stats = await store.stats()
    assert (stats.memories, stats.index_size, stats.index_kind, stats.namespace) == (10, 10, "flat", "test")
    rep = stats.replication
    assert rep.applied == rep.last == res.position and rep.pending == 0 and rep.lag_s == 0.0


def followed(f: Any) -> dict[int, list[int]]:
    """A Followers row as {next item: counts per lag 1..5}."""
    out: dict[int, list[int]] = {}
    for i, lag, c in zip(f.items.tolist(), f.lags.tolist(), f.counts.tolist(), strict=True):
        out.setdefault(i, [0] * 5)[lag - 1] += c
    return out


async def test_transitions_count_each_memorys_prefix_by_lag(store: MemoryStore) -> None:
    # user a: 1 → 2 → 3 → 2, user b: 1 → 2 (the prefix's last items, most recent first)
    events = [Interaction("a", 2, 1.0, "a2"), Interaction("a", 3, 2.0, "a3"), Interaction("a", 2, 3.0, "a2b")]
    keys = np.stack([unit(0), unit(1), unit(2)])
    await store.ingest(events, keys, [1, 2, 3], np.array([[1, 0, 0], [2, 1, 0], [3, 2, 1]]))
    await store.ingest([Interaction("b", 2, 4.0, "b2")], unit(3)[None], [1], np.array([[1]]))
    one, two, three, unseen = await store.followers([1, 2, 3, 99])
    # 1 → 2 at lag 1 (a and b) and at lag 3 (a's 1 2 3 → 2); 1 → 3 at lag 2
    assert followed(one) == {2: [2, 0, 1, 0, 0], 3: [0, 1, 0, 0, 0]}
    assert followed(two) == {3: [1, 0, 0, 0, 0], 2: [0, 1, 0, 0, 0]}
    assert followed(three) == {2: [1, 0, 0, 0, 0]}
    assert followed(unseen) == {}


async def test_transitions_follow_removal_eviction_and_duplicates(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    store = await open_store(store_config(store_backend, capacity=3, slot_groups=1))
    try:

        def ev(i: int) -> Interaction:
            return Interaction("u", i + 10, float(i), f"e{i}")

        rec = np.array([[7, 8]])
        ids = [int((await store.ingest([ev(i)], unit(i)[None], [2], rec)).memory_ids[0]) for i in range(3)]
        (f,) = await store.followers([7])
        assert followed(f) == {10: [1, 0, 0, 0, 0], 11: [1, 0, 0, 0, 0], 12: [1, 0, 0, 0, 0]}
        dup = await store.ingest([ev(2)], unit(2)[None], [2], rec)  # same event id: nothing counted twice
        assert dup.duplicates == 1
        await store.ingest([ev(3)], unit(3)[None], [2], rec)  # capacity 3: the oldest (item 10) leaves
        (f,) = await store.followers([7])
        assert sorted(followed(f)) == [11, 12, 13]
        await store.remove_memories([ids[1]])
        seven, eight = await store.followers([7, 8])
        assert sorted(followed(seven)) == [12, 13] and followed(eight) == {
            12: [0, 1, 0, 0, 0],
            13: [0, 1, 0, 0, 0],
        }
    finally:
        await store.close()


async def test_transitions_survive_snapshot_and_reopen(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    config = store_config(store_backend)
    store = await open_store(config)
    rng = np.random.default_rng(21)
    batch = MemoryBatch.create(
        rng.standard_normal((50, DIM)).astype(np.float32),
        rng.integers(1, 20, 50),
        ["u"] * 50,
        np.zeros(50),
        [5] * 50,
        DIM,
        rng.integers(0, 20, (50, 5)),
    )
    await store.add_memories(batch)
    await store.snapshot()
    await store.ingest([Interaction("v", 3, 1.0, "v3")], unit(0)[None], [1], np.array([[4]]))
    items = list(range(1, 20))
    before = [followed(f) for f in await store.followers(items)]
    await store.close()
    reopened = await open_store(config)
    try:
        assert [followed(f) for f in await reopened.followers(items)] == before
        # item 4 → 3: the batch's count per lag (counted independently here) plus the ingested one at lag 1
        expected = ((batch.recent == 4) & (batch.items[:, None] == 3)).sum(0) + np.eye(5, dtype=int)[0]
        assert followed((await reopened.followers([4]))[0])[3] == expected.tolist()
    finally:
        await reopened.close()


@pytest.mark.parametrize(
    "recent", [np.array([[1, 2, 3, 4, 5, 6]]), np.array([[-1]]), np.array([[1.5]]), np.ones((2, 1))]
)
async def test_bad_recent_items_raise_and_store_nothing(store: MemoryStore, recent: np.ndarray) -> None:
    with pytest.raises(ValueError, match="recent"):
        await store.ingest([Interaction("u", 1, 1.0, "x")], unit(0)[None], [1], recent)
    assert await store.histories(["u"], 5) == [[]]
    assert (await store.stats()).memories == 0


def log_order(position: str) -> tuple[int, int, int]:
    """A row position's place in the log: its stream id and slot group ("ms-seq" or "ms-seq@g")."""
    head, _, group = position.partition("@")
    return (*parse_position(head), int(group or 0))


def per_user(rows: list[tuple[str, int, float, str | None]]) -> list[tuple[str, int, float, str | None]]:
    """The rows grouped by user, each user's in log order: the order the log keeps (across users it is
    the order of acceptance with one slot group, not between groups)."""
    return sorted(rows, key=lambda row: row[0])


async def read_log(store: MemoryStore, page: int = 10_000) -> list[tuple[str, int, float, str | None]]:
    """Every row of the interaction log, page by page: (user, item, timestamp, event id)."""
    rows: list[tuple[str, int, float, str | None]] = []
    after = ""
    while len(chunk := await store.interactions(after, page)):
        rows += zip(
            chunk.users, chunk.items.tolist(), chunk.timestamps.tolist(), chunk.event_ids, strict=True
        )
        assert not after or log_order(chunk.position) > log_order(after)
        assert np.all(np.diff(chunk.accepted_at) >= 0)
        after = chunk.position
    return rows


async def test_the_interaction_log_holds_each_accepted_interaction_once(store: MemoryStore) -> None:
    t0 = 1_700_000_000.0
    first = [Interaction("a", 5, t0, "e1"), Interaction("b", 6, t0 + 1, None), Interaction("a", 5, t0, "e1")]
    assert (await store.append_interactions(first)).accepted == 2  # a duplicate within the batch
    keyed = [Interaction("a", 7, t0 + 2, "e2"), Interaction("a", 8, t0 + 3, "e1")]  # e1: a retry
    res = await store.ingest(keyed, np.stack([unit(0), unit(1)]), [1, 1])
    assert (res.accepted, res.duplicates) == (1, 1)
    # rows that are no traffic (the memory bank's) are not logged; memories alone are no interactions
    await store.ingest([Interaction("c", 9, 0.0, "bank:0")], unit(2)[None, :], [3], logged=False)
    await store.append_interactions([Interaction("c", 4, 0.0, "bank:first:0")], logged=False)
    await store.add_memories(random_batch(3, seed=1))
    expected = [("a", 5, t0, "e1"), ("b", 6, t0 + 1, None), ("a", 7, t0 + 2, "e2")]
    assert per_user(await read_log(store)) == per_user(expected)
    # pages of one row: each position once, in order
    assert per_user(await read_log(store, page=1)) == per_user(expected)
    page = await store.interactions()
    assert (await store.interactions(page.position)).position == ""  # the end: an empty page
    assert page.accepted_at.shape == (3,) and abs(page.accepted_at[-1] - time.time()) < 60
    with pytest.raises(ValueError, match="count"):
        await store.interactions("", 0)
    with pytest.raises(ValueError, match="position"):
        await store.interactions("not-a-position")
