"""The interaction log on both backends, beyond the contract suite's known answers: it survives restarts,
snapshots and replays with each accepted interaction once, its retention drops old rows from reads at
once and from storage on write, and the embedded backend's files recover from a torn or orphaned tail
and keep no trace of an erased user."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster

from memory_store import Interaction, MemoryStore, StoreConfig, open_store
from memory_store.redis_store import layout
from memory_store.redis_store.groups import SlotGroups


def events(user: str, items: list[int], tag: str) -> list[Interaction]:
    return [Interaction(user, item, 1000.0 + i, f"{tag}{i}") for i, item in enumerate(items)]


async def logged(store: MemoryStore) -> list[tuple[str, int, str | None]]:
    """(user, item, event id) of every row, read in pages of two."""
    rows: list[tuple[str, int, str | None]] = []
    after = ""
    while len(page := await store.interactions(after, 2)):
        rows += zip(page.users, page.items.tolist(), page.event_ids, strict=True)
        after = page.position
    return rows


def log_files(config: StoreConfig) -> list[Path]:
    assert config.data_dir is not None
    return sorted((config.data_dir / config.namespace / "interactions").glob("*.jsonl"))


async def test_the_log_survives_restarts_snapshots_and_replays(
    store_backend: str, store_config: Callable[..., StoreConfig]
) -> None:
    config = store_config(store_backend)
    store = await open_store(config)
    await store.append_interactions(events("a", [1, 2, 3], "a"))
    await store.snapshot()  # embedded: drops the WAL it covers; the interaction log stays
    await store.append_interactions(events("b", [4, 5], "b"))
    await store.close()
    want = [("a", 1, "a0"), ("a", 2, "a1"), ("a", 3, "a2"), ("b", 4, "b0"), ("b", 5, "b1")]
    reopened = await open_store(config)  # embedded: replays the WAL after the snapshot
    try:
        assert await logged(reopened) == want
        await reopened.restore()  # again, in a running store: nothing is logged twice
        assert await logged(reopened) == want
        retry = Interaction("a", 2, 1001.0, "a1")  # acknowledged before the restart: not logged again
        res = await reopened.append_interactions([Interaction("a", 6, 1003.0, "c0"), retry])
        assert (res.accepted, res.duplicates) == (1, 1)
        assert await logged(reopened) == [*want, ("a", 6, "c0")]
    finally:
        await reopened.close()


async def test_rows_past_the_retention_are_never_read_and_dropped_on_write(
    store_backend: str, store_config: Callable[..., StoreConfig]
) -> None:
    config = store_config(store_backend, log_retention_s=1.0)
    store = await open_store(config)
    try:
        await store.append_interactions(events("x", [1, 2], "x") + events("y", [3], "y"))
        assert len(await logged(store)) == 3
        await asyncio.sleep(1.2)
        assert await logged(store) == []  # past the retention: gone from reads before any write
        await store.append_interactions(events("x", [4], "new"))
        assert await logged(store) == [("x", 4, "new0")]
        assert (await store.erase_user("y")).interactions == 0  # theirs went with the retention
        if config.redis_url is not None:  # trimmed from Redis by the write, the users' lists with it
            client: Any = (RedisCluster if config.redis_cluster else redis.Redis).from_url(config.redis_url)
            groups = SlotGroups.of(config.namespace, config.groups)
            assert sum(client.xlen(p + layout.INTERACTIONS) for p in groups.prefixes) == 1
            x, y = (groups.prefix(groups.of_user(u)) + layout.USER_INTERACTIONS + u for u in "xy")
            assert client.llen(x) == 1
            assert not client.exists(y)  # expired with the retention
            client.close()
    finally:
        await store.close()


async def test_embedded_segments_past_the_retention_are_deleted(
    store_config: Callable[..., StoreConfig],
) -> None:
    config = store_config("embedded", log_retention_s=0.4)  # a segment closes at 0.1 s of age
    store = await open_store(config)
    try:
        await store.append_interactions(events("x", [1], "a"))
        await asyncio.sleep(0.15)
        await store.append_interactions(events("x", [2], "b"))  # a new segment; the first is recent
        assert len(log_files(config)) == 2
        await asyncio.sleep(0.5)
        await store.append_interactions(events("x", [3], "c"))  # a new segment; both others expired
        assert len(log_files(config)) == 1
        assert await logged(store) == [("x", 3, "c0")]
    finally:
        await store.close()


async def test_embedded_log_drops_a_torn_tail_and_rows_the_wal_never_held(
    store_config: Callable[..., StoreConfig],
) -> None:
    config = store_config("embedded")
    store = await open_store(config)
    await store.append_interactions(events("a", [1, 2], "a"))
    await store.close()
    (segment,) = log_files(config)
    with segment.open("ab") as f:  # a record the WAL lost in a power cut, then a torn line
        f.write(b'[99,0,1.0,"ghost",3,1.0,null]\n[100,0,1.0,"to')
    reopened = await open_store(config)
    try:
        assert await logged(reopened) == [("a", 1, "a0"), ("a", 2, "a1")]
        await reopened.append_interactions(events("b", [3], "b"))
        assert await logged(reopened) == [("a", 1, "a0"), ("a", 2, "a1"), ("b", 3, "b0")]
        assert not any(b"ghost" in p.read_bytes() or b'"to' in p.read_bytes() for p in log_files(config))
    finally:
        await reopened.close()


async def test_embedded_erasure_leaves_no_trace_in_the_log_files(
    store_config: Callable[..., Any],
) -> None:
    config = store_config("embedded")
    store = await open_store(config)
    try:
        await store.append_interactions(events("gone/user", [1, 2], "g") + events("kept", [3], "k"))
        await store.append_interactions(events("gone/user", [4], "h"))
        assert (await store.erase_user("gone/user")).interactions == 3
        assert await logged(store) == [("kept", 3, "k0")]
        assert all(b"gone/user" not in p.read_bytes() for p in log_files(config))
        await store.append_interactions(events("kept", [5], "l"))  # the open segment is still written
        assert await logged(store) == [("kept", 3, "k0"), ("kept", 5, "l0")]
    finally:
        await store.close()
