"""Retention by age (``StoreConfig.max_age_s``, memory_store.retention) on both backends: memories older
than the limit leave at write time, from every replica's index, with their item transitions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from memory_store import MemoryBatch, MemoryStore, open_store
from memory_store.retention import AgeSweep

DIM = 8


def aged_batch(ages_s: list[float], first_item: int = 1) -> MemoryBatch:
    """One memory per age (seconds before now): items first_item, first_item + 1, ..., each with item 100
    just before it (one transition 100 → item per memory)."""
    n = len(ages_s)
    rng = np.random.default_rng(first_item)
    return MemoryBatch.create(
        rng.standard_normal((n, DIM)).astype(np.float32),
        np.arange(first_item, first_item + n),
        ["u"] * n,
        time.time() - np.asarray(ages_s),
        [3] * n,
        DIM,
        np.full((n, 1), 100),
        5,
    )


async def held(store: MemoryStore) -> set[int]:
    """The items of every memory the store's index holds."""
    stats = await store.stats()
    res = await store.search(np.ones((1, DIM), np.float32), max(stats.index_size, 1))
    return {int(i) for i, m in zip(res.items[0], res.ids[0], strict=True) if m >= 0}


async def test_memories_older_than_the_limit_go_at_the_next_write(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    store = await open_store(store_config(store_backend, max_age_s=3_600.0))
    try:
        ids = (await store.add_memories(aged_batch([7_200, 10, 7_201, 0]))).memory_ids
        assert await held(store) == {2, 4}  # the write's own sweep: items 1 and 3 were two hours old
        stats = await store.stats()
        assert stats.memories == stats.index_size == 2
        [row] = await store.followers([100])
        assert sorted(row.items.tolist()) == [2, 4]  # their transitions went with them
        with pytest.raises(ValueError):
            await store.remove_memories(ids[:1])  # gone, as any removed memory
        await store.snapshot()
        await store.restore()
        assert await held(store) == {2, 4}
    finally:
        await store.close()


async def test_memories_age_out_while_the_store_runs(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    """A limit of 0.4 s is swept every 0.1 s: what was young at its write is gone a write later."""
    store = await open_store(store_config(store_backend, max_age_s=0.4))
    try:
        await store.add_memories(aged_batch([0, 0, 0]))
        assert await held(store) == {1, 2, 3}
        await asyncio.sleep(0.6)
        await store.add_memories(aged_batch([0], first_item=10))
        assert await held(store) == {10}
    finally:
        await store.close()


async def test_no_limit_keeps_every_age(store_backend: str, store_config: Callable[..., Any]) -> None:
    store = await open_store(store_config(store_backend))
    try:
        await store.add_memories(aged_batch([1e9, 0]))
        assert await held(store) == {1, 2}
    finally:
        await store.close()


async def test_redis_replicas_sweeping_at_once_remove_each_memory_once(
    store_config: Callable[..., Any],
) -> None:
    """Each replica sweeps from its own index; Redis re-checks every memory, so a memory another replica
    removed first is skipped, and the count stays right."""
    config = store_config("redis", max_age_s=3_600.0)
    a, b = await open_store(config), await open_store(config)
    try:
        await a.add_memories(aged_batch([0, 0]))  # both replicas' first sweeps find nothing old
        await b.add_memories(aged_batch([0], first_item=5))
        old = aged_batch([7_200, 7_200, 7_200], first_item=10)
        stats = await a.stats()
        assert stats.memories == 3
        a._age_sweep = AgeSweep(3_600.0)  # both due at the next write
        b._age_sweep = AgeSweep(3_600.0)
        await b.add_memories(old)  # b's sweep removes them at once
        await a.wait_applied((await a.replication()).last, 5.0)
        assert await held(a) == await held(b) == {1, 2, 5}
        await a.add_memories(aged_batch([0], first_item=20))  # a's sweep finds nothing left to remove
        await b.wait_applied((await b.replication()).last, 5.0)
        assert await held(a) == await held(b) == {1, 2, 5, 20}
        assert (await a.stats()).memories == 4
    finally:
        await a.close()
        await b.close()


def test_a_sweep_is_due_once_per_interval() -> None:
    sweep = AgeSweep(100.0)
    assert sweep.every_s == 1.0 and sweep.due(1_000.0) == 900.0
    assert sweep.due(1_000.5) is None and sweep.due(1_001.0) == 901.0
    assert AgeSweep(0.4).every_s == 0.1 and AgeSweep(None).due(5.0) is None
