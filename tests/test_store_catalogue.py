"""The living catalogue in the store, on both backends (contract) and across replicas of one Redis:
items marked unavailable and available again, the registry of items first seen after training, and
the flag of a completed bank load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from memory_store import MemoryStore, open_store

FIRST_NEW = 101  # the first id past a 100-item vocabulary


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    """Poll ``check`` until it holds (another replica applies the log within its lag)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "not applied in time"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------ availability


async def test_items_are_marked_unavailable_and_available_again(store: MemoryStore) -> None:
    assert (await store.unavailable_items()).tolist() == []
    assert await store.set_available([5, 3, 5], False) == 2
    assert (await store.unavailable_items()).tolist() == [3, 5]
    assert await store.set_available([3, 5, 8], False) == 1  # only 8 changes
    assert await store.set_available([5, 9], True) == 1  # 9 was never unavailable
    assert (await store.unavailable_items()).tolist() == [3, 8]
    assert (await store.stats()).unavailable_items == 2
    assert await store.set_available([], False) == 0


@pytest.mark.parametrize("bad", [[0], [-3], [1.5], [[1, 2]]])
async def test_bad_item_ids_change_no_availability(store: MemoryStore, bad: list[Any]) -> None:
    await store.set_available([4], False)
    with pytest.raises(ValueError, match="item"):
        await store.set_available(bad, False)
    assert (await store.unavailable_items()).tolist() == [4]


async def test_a_catalogue_sync_of_thousands_at_once(store: MemoryStore) -> None:
    items = np.arange(1, 12_001)
    assert await store.set_available(items, False) == 12_000
    assert await store.set_available(items[::2], True) == 6_000
    np.testing.assert_array_equal(await store.unavailable_items(), items[1::2])


async def test_catalogue_survives_snapshot_and_reopen(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    config = store_config(store_backend, first_new_item=FIRST_NEW)
    store = await open_store(config)
    await store.set_available([1, 2, 3], False)
    assert await store.register_items(["a", "b"]) == [101, 102]
    await store.snapshot()
    await store.set_available([2], True)  # after the snapshot: replayed from the log
    assert await store.register_items(["c"]) == [103]
    await store.close()
    reopened = await open_store(config)
    try:
        assert (await reopened.unavailable_items()).tolist() == [1, 3]
        assert dict(await reopened.new_items()) == {"a": 101, "b": 102, "c": 103}
        assert await reopened.register_items(["d", "a"]) == [104, 101]
    finally:
        await reopened.close()


async def test_availability_reaches_every_replica(store_config: Callable[..., Any]) -> None:
    config = store_config("redis")
    a, b = await open_store(config), await open_store(config)
    try:
        await a.set_available([7, 9], False)
        assert (await a.unavailable_items()).tolist() == [7, 9]  # the writer's own copy at once
        await eventually(lambda: unavailable_are(b, [7, 9]))
        await b.set_available([7], True)
        await eventually(lambda: unavailable_are(a, [9]))
    finally:
        await a.close()
        await b.close()


async def unavailable_are(store: MemoryStore, expected: list[int]) -> bool:
    return bool((await store.unavailable_items()).tolist() == expected)


async def test_a_replica_started_later_reads_the_catalogue_from_redis(
    store_config: Callable[..., Any],
) -> None:
    """A replica without a snapshot (rebuilt from Redis) and one restored from an old snapshot both get
    the whole catalogue, however far back the log was trimmed."""
    config = store_config("redis", first_new_item=FIRST_NEW)
    a = await open_store(config)
    try:
        await a.set_available([4], False)
        await a.register_items(["x"])
        await a.snapshot()
        await a.set_available([5], False)
        await a.set_available([4], True)
        await a.register_items(["y"])
        late = await open_store(config)  # loads a's snapshot and replays the rest
        fresh = await open_store(store_config("redis", first_new_item=FIRST_NEW, data_dir=None))
        try:
            for replica in (late, fresh):
                assert (await replica.unavailable_items()).tolist() == [5]
                assert dict(await replica.new_items()) == {"x": 101, "y": 102}
        finally:
            await late.close()
            await fresh.close()
    finally:
        await a.close()


# --------------------------------------------------------------------------------------- registry


async def test_new_items_get_the_next_ids_once(store_backend: str, store_config: Callable[..., Any]) -> None:
    store = await open_store(store_config(store_backend, first_new_item=FIRST_NEW))
    try:
        assert dict(await store.new_items()) == {}
        assert await store.register_items(["sku-a", "sku-b", "sku-a"]) == [101, 102, 101]
        assert await store.register_items(["sku-b", "sku-c"]) == [102, 103]
        assert dict(await store.new_items()) == {"sku-a": 101, "sku-b": 102, "sku-c": 103}
        assert (await store.stats()).new_items == 3
        assert await store.register_items([]) == []
        for bad in ("", "x" * 257):
            with pytest.raises(ValueError, match="external item id"):
                await store.register_items(["sku-d", bad])
        assert len(await store.new_items()) == 3  # nothing of the bad call registered
    finally:
        await store.close()


async def test_the_registry_is_read_without_copying(store: MemoryStore) -> None:
    """The mapping is the same object until the next registration (callers cache what they derive)."""
    first = await store.new_items()
    assert await store.new_items() is first
    await store.register_items(["n1"])
    second = await store.new_items()
    assert second is not first and await store.new_items() is second
    assert dict(first) == {}  # what a reader held is never changed under it


async def test_concurrent_registration_from_two_replicas_gives_one_id_per_item(
    store_config: Callable[..., Any],
) -> None:
    config = store_config("redis", first_new_item=FIRST_NEW)
    a, b = await open_store(config), await open_store(config)
    try:
        names = [f"item-{i}" for i in range(60)]
        rng = np.random.default_rng(0)
        calls = []
        for _ in range(20):  # overlapping, shuffled batches from both replicas at once
            for store in (a, b):
                batch = [names[int(i)] for i in rng.choice(60, 15, replace=False)]
                calls.append((store, batch))
        answers = await asyncio.gather(*(store.register_items(batch) for store, batch in calls))
        given: dict[str, set[int]] = {}
        for (_, batch), ids in zip(calls, answers, strict=True):
            for name, i in zip(batch, ids, strict=True):
                given.setdefault(name, set()).add(i)
        assert all(len(ids) == 1 for ids in given.values())  # one id per item, whoever asked
        ids = sorted(next(iter(v)) for v in given.values())
        assert ids == list(range(FIRST_NEW, FIRST_NEW + len(given)))  # contiguous, none lost
        registry = {name: next(iter(v)) for name, v in given.items()}
        await eventually(lambda: same_registry(a, registry))
        await eventually(lambda: same_registry(b, registry))
    finally:
        await a.close()
        await b.close()


async def same_registry(store: MemoryStore, expected: dict[str, int]) -> bool:
    return dict(await store.new_items()) == expected


async def test_registration_never_gives_a_model_id(store_config: Callable[..., Any]) -> None:
    """A replica with a larger vocabulary on the same namespace moves the counter past it."""
    a = await open_store(store_config("redis", first_new_item=11))
    b = await open_store(store_config("redis", first_new_item=51))
    try:
        assert await a.register_items(["p"]) == [11]
        assert await b.register_items(["q", "p"]) == [51, 11]
        assert await a.register_items(["r"]) == [52]
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------------------------------ bank flag


async def test_a_completed_bank_load_is_recorded(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    config = store_config(store_backend)
    store = await open_store(config)
    assert not await store.bank_loaded()
    await store.mark_bank_loaded()
    await store.mark_bank_loaded()  # idempotent
    assert await store.bank_loaded()
    await store.close()
    reopened = await open_store(config)
    try:
        assert await reopened.bank_loaded()
    finally:
        await reopened.close()
