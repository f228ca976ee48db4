"""The memory bank behind one small interface (``MemoryStore``), with a Redis and an embedded backend.

Open a store with :func:`open_store`; a config without ``redis_url`` selects the embedded backend.
"""

from __future__ import annotations

from memory_store.base import (
    IngestResult,
    Interaction,
    MemoryBatch,
    MemoryStore,
    ReplicationStatus,
    SearchResult,
    SnapshotError,
    SnapshotInfo,
    StoreStats,
)
from memory_store.config import IndexParams, StoreConfig
from memory_store.user_memory import (
    QualityFn,
    UserMemories,
    fewest_accesses_quality,
    recency_frequency_quality,
)

__all__ = [
    "IndexParams",
    "IngestResult",
    "Interaction",
    "MemoryBatch",
    "MemoryStore",
    "QualityFn",
    "ReplicationStatus",
    "SearchResult",
    "SnapshotError",
    "SnapshotInfo",
    "StoreConfig",
    "StoreStats",
    "UserMemories",
    "fewest_accesses_quality",
    "open_store",
    "recency_frequency_quality",
]


async def open_store(config: StoreConfig) -> MemoryStore:
    """The Redis backend when ``config.redis_url`` is set, else the embedded one in ``config.data_dir``."""
    if config.redis_url is not None:
        from memory_store.redis_store import RedisMemoryStore

        return await RedisMemoryStore.open(config)
    from memory_store.embedded import EmbeddedMemoryStore

    return await EmbeddedMemoryStore.open(config)
