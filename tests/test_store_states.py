"""The encoder states kept beside the histories (memory_store.states), on both backends: written in the
same atomic write as the history append and kept only where they encode the history's last items
(a concurrent write, a duplicate event, a later append without a state leave none); read with the
histories in one call; conditional puts; erasure removes them; a snapshot, a restart and a log replay
keep them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import redis

from memory_store import Interaction, MemoryStore, open_store
from memory_store.states import UserStates

DIM = 8
WINDOW = 3  # the store's state_window: a state encodes the last 3 items


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def states(*rows: tuple[str, tuple[int, ...], int]) -> UserStates:
    """UserStates of (user, window, seed of its vector) rows."""
    return UserStates(
        tuple(u for u, _, _ in rows), np.stack([vec(s) for _, _, s in rows]), tuple(w for _, w, _ in rows)
    )


def events(user: str, items: list[int], tag: str) -> list[Interaction]:
    return [Interaction(user, item, float(i), f"{tag}{i}") for i, item in enumerate(items)]


@pytest.fixture
async def kept(store_backend: str, store_config: Callable[..., Any]) -> AsyncIterator[MemoryStore]:
    store = await open_store(store_config(store_backend, state_window=WINDOW))
    yield store
    await store.close()


async def read(store: MemoryStore, *users: str) -> list[np.ndarray | None]:
    return (await store.histories_with_states(list(users), 10)).states


async def test_a_state_is_written_with_its_history_and_read_with_it(kept: MemoryStore) -> None:
    # alice 1 2 3 4: the state of her last 3 items comes with the write that appends them
    res = await kept.append_interactions(events("alice", [1, 2, 3, 4], "a"), states(("alice", (2, 3, 4), 1)))
    assert res.accepted == 4
    got = await kept.histories_with_states(["alice", "nobody"], 10)
    assert got.histories == [[1, 2, 3, 4], []]
    assert got.states[1] is None
    np.testing.assert_array_equal(got.states[0], vec(1))  # bit for bit
    # with a memory too (ingest): bob's first item alone, then one keyed event and his new state
    await kept.append_interactions(events("bob", [7], "b"), states(("bob", (7,), 2)))
    key = vec(3)[None]
    await kept.ingest(
        [Interaction("bob", 8, 1.0, "b1")], key, [1], np.array([[7]]), states(("bob", (7, 8), 4))
    )
    [bob] = await read(kept, "bob")
    np.testing.assert_array_equal(bob, vec(4))


async def test_an_append_without_a_state_drops_the_one_kept(kept: MemoryStore) -> None:
    await kept.append_interactions(events("u", [1, 2], "u"), states(("u", (1, 2), 1)))
    await kept.append_interactions(events("v", [5], "v"), states(("v", (5,), 2)))
    await kept.ingest([Interaction("u", 3, 1.0, "u9")], vec(3)[None], [2], np.array([[2, 1]]))
    u, v = await read(kept, "u", "v")
    assert u is None  # it encoded 1 2, the history is 1 2 3 now
    np.testing.assert_array_equal(v, vec(2))  # another user's state stays


async def test_a_state_that_does_not_encode_the_history_after_the_write_is_not_kept(
    kept: MemoryStore,
) -> None:
    # A concurrent write landed between the writer's read and its write: the writer encoded 1 2 + 3,
    # the history is 1 2 9 3 now.
    await kept.append_interactions(events("u", [1, 2], "u"))
    await kept.append_interactions([Interaction("u", 9, 0.0, "other")])
    await kept.append_interactions([Interaction("u", 3, 0.0, "mine")], states(("u", (1, 2, 3), 1)))
    assert await read(kept, "u") == [None]
    # a duplicate event: the history did not grow as the writer expected
    await kept.append_interactions([Interaction("w", 4, 0.0, "w4")], states(("w", (4,), 2)))
    dup = [Interaction("w", 4, 0.0, "w4"), Interaction("w", 5, 0.0, "w5")]
    await kept.append_interactions(dup, states(("w", (4, 4, 5), 3)))
    assert await kept.histories(["w"], 10) == [[4, 5]]
    assert await read(kept, "w") == [None]


async def test_put_keeps_only_states_of_the_current_history(kept: MemoryStore) -> None:
    await kept.append_interactions(events("u", [1, 2, 3, 4, 5], "u"))
    await kept.append_interactions(events("v", [6], "v"))
    put = states(("u", (3, 4, 5), 1), ("v", (5, 6), 2), ("nobody", (1,), 3))
    assert await kept.put_states(put) == 1  # v's window is not v's history; nobody has none
    u, v, nobody = await read(kept, "u", "v", "nobody")
    np.testing.assert_array_equal(u, vec(1))
    assert v is None and nobody is None
    assert await kept.histories(["nobody"], 10) == [[]]  # a put never creates a history


async def test_erasure_removes_the_state_and_an_older_put_never_brings_it_back(kept: MemoryStore) -> None:
    await kept.append_interactions(events("gone", [1, 2], "g"), states(("gone", (1, 2), 1)))
    await kept.append_interactions(events("kept", [3], "k"), states(("kept", (3,), 2)))
    erased = await kept.erase_user("gone")
    assert erased.history == 2
    assert await kept.put_states(states(("gone", (1, 2), 1))) == 0  # encoded before the erasure
    gone, other = await read(kept, "gone", "kept")
    assert gone is None
    np.testing.assert_array_equal(other, vec(2))
    await kept.append_interactions(events("gone", [1, 2], "again"))  # the same items again: no state
    assert await read(kept, "gone") == [None]


async def test_states_survive_a_snapshot_a_restart_and_a_replay(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    config = store_config(store_backend, state_window=WINDOW)
    store = await open_store(config)
    await store.append_interactions(events("a", [1, 2], "a"), states(("a", (1, 2), 1)))
    await store.snapshot()
    await store.append_interactions(events("b", [3, 4], "b"), states(("b", (3, 4), 2)))  # after it
    await store.append_interactions(events("c", [5], "c"))
    await store.put_states(states(("c", (5,), 3)))
    await store.close()
    reopened = await open_store(config)
    try:
        a, b, c = await read(reopened, "a", "b", "c")
        for got, seed in ((a, 1), (b, 2), (c, 3)):
            np.testing.assert_array_equal(got, vec(seed))
    finally:
        await reopened.close()


async def test_a_store_without_a_state_window_keeps_none(store: MemoryStore) -> None:
    with pytest.raises(ValueError, match="state_window"):
        await store.append_interactions(events("u", [1], "u"), states(("u", (1,), 1)))
    assert await store.histories(["u"], 5) == [[]]  # refused before anything was written
    await store.append_interactions(events("u", [1], "u"))
    got = await store.histories_with_states(["u"], 5)
    assert got.histories == [[1]] and got.states == [None]


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ((("u", (1, 2, 3, 4), 1),), "window"),  # longer than the store's window
        ((("u", (), 1),), "window"),
        ((("u", (0,), 1),), "window"),
        ((("", (1,), 1),), "user id"),
    ],
)
async def test_bad_states_are_refused_and_nothing_is_written(
    kept: MemoryStore, rows: tuple[tuple[str, tuple[int, ...], int], ...], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        await kept.append_interactions(events("u", [1], "u"), states(*rows))
    nan = UserStates(("u",), np.full((1, DIM), np.nan, np.float32), ((1,),))
    with pytest.raises(ValueError, match="NaN"):
        await kept.put_states(nan)
    assert await kept.histories(["u"], 5) == [[]]


async def test_a_stale_state_left_by_another_writer_is_never_read(
    store_config: Callable[..., Any], store_redis_url: str
) -> None:
    # A replica of an older version appends to the history without dropping the state: the read
    # compares the state's window with the history it reads and returns none.
    store = await open_store(store_config("redis", state_window=WINDOW))
    try:
        await store.append_interactions(events("u", [1, 2], "u"), states(("u", (1, 2), 1)))
        client = redis.Redis.from_url(store_redis_url)
        client.rpush("memrec:{test}:hist:u", 3)
        client.close()
        got = await store.histories_with_states(["u"], 10)
        assert got.histories == [[1, 2, 3]] and got.states == [None]
    finally:
        await store.close()
