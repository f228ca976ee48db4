"""Dropping a namespace (``MemoryStore.drop``, what a hot swap does to the version it left): everything of
it goes, on both backends, but never while another process has it open."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import redis

from memory_store import Interaction, open_store


async def fill(store: Any) -> None:
    events = [Interaction("alice", i, float(i), f"e{i}") for i in range(1, 4)]
    keys = np.eye(8, dtype=np.float32)[:3]
    await store.ingest(events, keys, [1, 2, 3])
    await store.set_available([2], False)
    await store.register_items(["sku-1"])
    await store.snapshot()


async def test_drop_deletes_everything_of_the_namespace(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    config = store_config(store_backend)
    other = store_config(store_backend, namespace="other")
    store, neighbour = await open_store(config), await open_store(other)
    try:
        await fill(store)
        await fill(neighbour)
        assert await store.drop() is True
        assert not (config.data_dir / config.namespace).exists()  # snapshots and logs too
        again = await open_store(config)  # the namespace opens empty
        try:
            assert await again.histories(["alice"], 10) == [[]]
            stats = await again.stats()
            assert stats.memories == 0 and stats.unavailable_items == 0 and stats.new_items == 0
            assert len(await again.interactions()) == 0 and not await again.bank_loaded()
        finally:
            await again.close()
        # another namespace is untouched
        assert await neighbour.histories(["alice"], 10) == [[1, 2, 3]]
        assert (await neighbour.stats()).memories == 3
    finally:
        await neighbour.close()


async def test_redis_keeps_a_namespace_another_process_holds(store_config: Callable[..., Any]) -> None:
    config = store_config("redis")
    first, second = await open_store(config), await open_store(config)
    await fill(first)
    assert await first.drop() is False  # closed, and the data stays for the other holder
    assert await second.histories(["alice"], 10) == [[1, 2, 3]]
    assert await second.drop() is True  # the last holder deletes it
    client = redis.Redis.from_url(config.redis_url)
    assert client.keys(f"memrec:{{{config.namespace}}}:*") == []
