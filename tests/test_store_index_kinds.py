"""The compressed index kinds behind both stores: search, removal, snapshots and restarts, the Redis
replica's rebuild from the memory hashes (which hold the full keys), and a change of kind."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from memory_store import IndexParams, MemoryBatch, MemoryStore, open_store

DIM = 8
SQ8 = IndexParams(kind="ivf_sq8", exact_threshold=1_000, min_nlist=8, nprobe=16)


def clustered_batch(n: int, seed: int, first_item: int = 1) -> MemoryBatch:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((40, DIM))
    keys = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, DIM))
    return MemoryBatch.create(
        keys.astype(np.float32), np.arange(first_item, first_item + n), ["u"] * n, np.zeros(n), [1] * n, DIM
    )


async def recall(store: MemoryStore, batch: MemoryBatch, ids: np.ndarray, k: int = 10) -> float:
    """Recall@k of the store's search against exact search over ``batch`` (held under ``ids``), for 100
    of its own keys as queries."""
    queries = batch.keys[:: max(1, len(batch) // 100)][:100]
    found = (await store.search(queries, k)).ids
    exact = ids[np.argsort(-(queries @ batch.keys.T), axis=1)[:, :k]]
    return float(
        np.mean([len(set(f) & set(e)) / k for f, e in zip(found.tolist(), exact.tolist(), strict=True)])
    )


async def test_a_compressed_store_searches_removes_snapshots_and_reopens(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    config = store_config(store_backend, index=SQ8)
    store = await open_store(config)
    try:
        batch = clustered_batch(4_000, seed=1)
        ids = (await store.add_memories(batch)).memory_ids
        assert (await store.stats()).index_kind.endswith("-sq8")
        assert await recall(store, batch, ids) >= 0.9
        out = await store.search(batch.keys[:5], 3, with_keys=True)
        assert out.keys is not None and np.abs(out.keys[:, 0] - batch.keys[:5]).max() < 0.02  # SQ8 steps
        await store.remove_memories(ids[:100])
        queries = batch.keys[100:150]
        assert not set((await store.search(batch.keys[:100], 5)).ids.ravel().tolist()) & set(
            ids[:100].tolist()
        )
        await store.snapshot()
        more = (await store.add_memories(clustered_batch(50, seed=2, first_item=5_000))).memory_ids
        before = await store.search(queries, 10)
        await store.restore()  # the snapshot, then the log after it
        after = await store.search(queries, 10)
        np.testing.assert_array_equal(after.ids, before.ids)
        assert (await store.stats()).index_size == 3_950
    finally:
        await store.close()
    reopened = await open_store(config)
    try:
        np.testing.assert_array_equal((await reopened.search(queries, 10)).ids, before.ids)
        assert int(more[0]) in (await reopened.search(clustered_batch(50, seed=2).keys[:1], 1)).ids
    finally:
        await reopened.close()


async def test_a_redis_replica_rebuilds_a_compressed_index_from_the_full_keys(
    store_config: Callable[..., Any],
) -> None:
    """A replica without a snapshot encodes the hashes' float32 keys once: its codes are within one step
    of the keys written, never a code of a decoded code."""
    writer = await open_store(store_config("redis", index=SQ8))
    try:
        batch = clustered_batch(3_000, seed=3)
        ids = (await writer.add_memories(batch)).memory_ids
        replica = await open_store(store_config("redis", index=SQ8, data_dir=None))
        try:
            assert (await replica.stats()).index_kind == "ivf64-sq8"  # one build at 3,000: 64 lists
            assert await recall(replica, batch, ids) >= 0.9
            out = await replica.search(batch.keys[:20], 1, with_keys=True)
            assert out.keys is not None and np.abs(out.keys[:, 0] - batch.keys[:20]).max() < 0.02
        finally:
            await replica.close()
    finally:
        await writer.close()


async def test_a_change_of_kind_takes_effect_at_the_next_start(
    store_backend: str, store_config: Callable[..., Any]
) -> None:
    """A snapshot written as ivf_flat under a store now set to ivf_sq8: Redis rebuilds from the hashes,
    the embedded store converts the snapshot's codes; either way the index is SQ8 and answers."""
    flat = store_config(store_backend, index=IndexParams(exact_threshold=1_000, min_nlist=8, nprobe=16))
    store = await open_store(flat)
    batch = clustered_batch(3_000, seed=4)
    try:
        ids = (await store.add_memories(batch)).memory_ids
        assert not (await store.stats()).index_kind.endswith("-sq8")
        await store.snapshot()
    finally:
        await store.close()
    store = await open_store(store_config(store_backend, index=SQ8))
    try:
        assert (await store.stats()).index_kind.endswith("-sq8")
        assert await recall(store, batch, ids) >= 0.9
    finally:
        await store.close()
