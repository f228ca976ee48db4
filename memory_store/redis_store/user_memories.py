"""Per-user (RAMRec) memories on Redis: one ``umem:{user}`` hash per user (item id -> packed record,
``user_memory.pack``). A change is an optimistic read-modify-write (WATCH, compute, MULTI/EXEC) with
bounded retries, so concurrent replicas never lose each other's updates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import WatchError

from memory_store import user_memory as um
from memory_store.base import check_observations, check_user_id, check_user_memories
from memory_store.config import StoreConfig
from memory_store.redis_store import layout
from memory_store.redis_store.groups import SlotGroups

WATCH_ATTEMPTS = 20
R = TypeVar("R")
# entries -> (new entries, or None to write nothing; the caller's result)
Change = Callable[[um.UserMemories], tuple[um.UserMemories | None, R]]


class UserMemoryHashes:
    """The user-memory part of the Redis ``MemoryStore`` API."""

    def __init__(self, config: StoreConfig, groups: SlotGroups, client: aioredis.Redis) -> None:
        self.config = config
        self._r = client
        self._groups = groups

    def _key(self, user_id: str) -> str:
        """The user's hash, in the user's slot group (with their other keys)."""
        return self._groups.prefix(self._groups.of_user(user_id)) + layout.USER_MEM + user_id

    async def _read(self, client: Any, user_id: str) -> um.UserMemories:
        raw: dict[bytes, bytes] = await client.hgetall(self._key(user_id))
        return um.unpack(user_id, self.config.dim, [int(i) for i in raw], list(raw.values()))

    async def _rewrite(self, user_id: str, change: Change[R]) -> R:
        """Optimistic read-modify-write of one user's hash: WATCH, compute, MULTI/EXEC; bounded retries."""
        key = self._key(user_id)
        async with self._r.pipeline(transaction=True) as pipe:
            for _ in range(WATCH_ATTEMPTS):
                try:
                    await pipe.watch(key)
                    new, result = change(await self._read(pipe, user_id))
                    if new is None:
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        return result
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.delete(key)
                    pipe.hset(
                        key,
                        mapping=dict(zip([str(i) for i in new.items.tolist()], um.pack(new), strict=True)),
                    )
                    await pipe.execute()
                    return result
                except WatchError:
                    continue
        raise RuntimeError(f"user memories of {user_id!r} changed {WATCH_ATTEMPTS} times while updating")

    async def update(
        self,
        user_id: str,
        items: Sequence[int] | np.ndarray,
        vectors: np.ndarray,
        timestamps: Sequence[float] | np.ndarray,
    ) -> list[int]:
        """Merge observations into the user's memories; returns the item ids evicted."""
        it, vec, ts = check_observations(user_id, items, vectors, timestamps, self.config.dim)
        cap, quality = self.config.user_memory_capacity, self.config.quality

        def change(cur: um.UserMemories) -> tuple[um.UserMemories | None, list[int]]:
            return um.merge_observations(cur, it, vec, ts, cap, quality)

        return await self._rewrite(user_id, change)

    async def put(self, memories: Sequence[um.UserMemories]) -> int:
        """Write each user's memories where the user holds none yet; returns how many were written."""
        for entries in memories:
            check_user_memories(entries, self.config.dim)
        written = 0
        for entries in memories:
            if len(entries):
                written += await self._rewrite(entries.user_id, _unless_held(entries))
        return written

    async def read(self, user_ids: Sequence[str]) -> list[um.UserMemories]:
        pipe = self._r.pipeline(transaction=False)
        for user in user_ids:
            check_user_id(user)
            pipe.hgetall(self._key(user))
        return [
            um.unpack(user, self.config.dim, [int(i) for i in raw], list(raw.values()))
            for user, raw in zip(user_ids, await pipe.execute(), strict=True)
        ]

    async def record_access(self, user_id: str, items: Sequence[int], ts: float) -> int:
        check_user_id(user_id)

        def change(cur: um.UserMemories) -> tuple[um.UserMemories | None, int]:
            new, hits = um.record_access(cur, list(items), float(ts))
            return (new if hits else None), hits

        return await self._rewrite(user_id, change)


def _unless_held(entries: um.UserMemories) -> Change[int]:
    """The change that writes ``entries`` over none (1) and leaves memories already held alone (0)."""

    def change(cur: um.UserMemories) -> tuple[um.UserMemories | None, int]:
        return (None, 0) if len(cur) else (entries, 1)

    return change
