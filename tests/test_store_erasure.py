"""Erasing a user from the store, on both backends (contract) and across replicas of one Redis: their
history, memories (and the transition counts those made), per-user memories, dedup markers and
interaction log rows go;
nobody else's do; snapshots taken afterwards hold nothing of them and a restart from an older one
replays the erasure; a repeat erases nothing and is no error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from memory_store import Interaction, MemoryStore, open_store
from memory_store.base import Erasure

DIM = 8
GONE, KEPT = "gone/user", "kept"  # an id may hold a '/'


def keys(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


async def populate(store: MemoryStore) -> None:
    """GONE: history 7 → 20 → 21 → 22 (3 memories after 7, whose prefixes end in 7, 20, 21), per-user
    memories; KEPT: 7 → 10 → 11 (2 memories). Both users' memories follow item 7."""
    await store.append_interactions([Interaction(GONE, 7, 1.0, "g0"), Interaction(KEPT, 7, 1.0, "k0")])
    gone = [Interaction(GONE, item, 2.0 + i, f"g{i + 1}") for i, item in enumerate((20, 21, 22))]
    await store.ingest(gone, keys(3, 1), [1, 2, 3], np.array([[7, 0], [20, 7], [21, 20]]))
    kept = [Interaction(KEPT, 10, 2.0, "k1"), Interaction(KEPT, 11, 3.0, "k2")]
    await store.ingest(kept, keys(2, 2), [1, 2], np.array([[7, 0], [10, 7]]))
    await store.update_user_memories(GONE, [20, 21], keys(2, 3), [2.0, 3.0])


async def held_users(store: MemoryStore) -> list[str]:
    """The user of every memory the index holds (an exhaustive search)."""
    n = (await store.stats()).index_size
    res = await store.search(np.ones((1, DIM), np.float32), max(n, 1))
    return sorted(str(u) for u, i in zip(res.users[0], res.ids[0], strict=True) if i >= 0)


def next_items(row: Any) -> set[int]:
    return {int(i) for i in row.items}


async def logged_users(store: MemoryStore) -> list[str]:
    """The user of every row of the interaction log, in order."""
    return list((await store.interactions()).users)


async def assert_erased(store: MemoryStore) -> None:
    """Nothing of GONE is readable; KEPT is whole."""
    assert await store.histories([GONE, KEPT], 10) == [[], [7, 10, 11]]
    assert await logged_users(store) == [KEPT, KEPT, KEPT]
    assert await held_users(store) == [KEPT, KEPT]
    seven, twenty = await store.followers([7, 20])
    assert next_items(seven) == {10, 11} and next_items(twenty) == set()
    [umem] = await store.user_memories([GONE])
    assert len(umem) == 0
    assert (await store.stats()).memories == 2


async def test_erasing_a_user_removes_all_of_theirs_and_nothing_else(store: MemoryStore) -> None:
    await populate(store)
    (seven,) = await store.followers([7])
    assert next_items(seven) == {10, 11, 20, 21}  # GONE's transitions lift 20 and 21 before
    erased = await store.erase_user(GONE)
    assert (erased.history, erased.memories, erased.user_memories, erased.event_ids) == (4, 3, 2, 4)
    assert erased.interactions == 4 and erased.position
    await assert_erased(store)
    # their dedup markers are gone: the same event ids are new events now
    again = await store.append_interactions([Interaction(GONE, 30, 9.0, "g1")])
    assert (again.accepted, again.duplicates) == (1, 0)
    assert await logged_users(store) == [KEPT, KEPT, KEPT, GONE]  # a new interaction of theirs is logged
    # KEPT's markers are not
    assert (await store.append_interactions([Interaction(KEPT, 12, 9.0, "k1")])).duplicates == 1


async def test_a_repeated_erasure_erases_nothing_and_is_no_error(store: MemoryStore) -> None:
    await populate(store)
    await store.erase_user(GONE)
    assert await store.erase_user(GONE) == Erasure(0, 0, 0, 0, "")
    assert await store.erase_user("never-seen") == Erasure(0, 0, 0, 0, "")
    await assert_erased(store)
    with pytest.raises(ValueError, match="user id"):
        await store.erase_user("")


async def test_a_snapshot_after_the_erasure_holds_nothing_of_them(
    store_backend: str, store_config: Callable[..., Any], tmp_path: Path
) -> None:
    config = store_config(store_backend)
    store = await open_store(config)
    try:
        await populate(store)
        await store.erase_user(GONE)
        info = await store.snapshot(tmp_path / "after")
        for path in info.path.iterdir():  # users.json, state.json, meta.npz, ...: no trace of the name
            assert b"gone/user" not in path.read_bytes(), path.name
        with np.load(info.path / "meta.npz") as columns:  # their memories' items are not kept either
            assert not np.isin(columns["item"], [20, 21, 22]).any()
    finally:
        await store.close()


async def test_a_restart_from_an_older_snapshot_replays_the_erasure(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    config = store_config(store_backend)
    store = await open_store(config)
    await populate(store)
    await store.snapshot()  # taken before the erasure; the log after it holds the erasure
    await store.erase_user(GONE)
    await store.close()
    reopened = await open_store(config)
    try:
        await assert_erased(reopened)
        await reopened.restore()  # again, in a running store
        await assert_erased(reopened)
    finally:
        await reopened.close()


async def test_erasure_under_capacities_keeps_the_other_users_bounds(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    store = await open_store(store_config(store_backend, user_capacity=2, capacity=4, slot_groups=1))
    try:
        await populate(store)  # GONE's first memory was evicted by the per-user capacity
        assert (await store.erase_user(GONE)).memories == 2
        kept = [Interaction(KEPT, 12 + i, 5.0 + i, f"k{3 + i}") for i in range(3)]
        await store.ingest(kept, keys(3, 4), [3, 4, 5], np.array([[11, 10], [12, 11], [13, 12]]))
        assert await held_users(store) == [KEPT, KEPT]  # KEPT's two newest, per-user capacity 2
    finally:
        await store.close()


# --------------------------------------------------------------------------------- Redis replicas


async def wait_until(check: Callable[[], Any], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "not applied in time"
        await asyncio.sleep(0.02)


async def test_every_replica_drops_the_erased_memories(store_config: Callable[..., Any]) -> None:
    config = store_config("redis")
    a, b = await open_store(config), await open_store(config)
    try:
        await populate(a)
        await wait_until(lambda: users_are(b, [GONE, GONE, GONE, KEPT, KEPT]))
        await b.erase_user(GONE)
        await wait_until(lambda: users_are(a, [KEPT, KEPT]))
        (seven,) = await a.followers([7])
        assert next_items(seven) == {10, 11}
    finally:
        await a.close()
        await b.close()


async def users_are(store: MemoryStore, expected: list[str]) -> bool:
    return await held_users(store) == expected


async def test_memories_without_a_user_list_are_found_through_the_index(
    store_config: Callable[..., Any], store_redis_url: str
) -> None:
    """Memories written before ``byuser`` was kept for every capacity: the erasure finds them in the
    replica's index (and Redis confirms each one's user before it goes)."""
    store = await open_store(store_config("redis"))
    try:
        await populate(store)
        raw = redis.Redis.from_url(store_redis_url)
        raw.delete("memrec:{test}:byuser:" + GONE)  # as the older write script left it
        raw.close()
        assert (await store.erase_user(GONE)).memories == 3
        await assert_erased(store)
    finally:
        await store.close()
