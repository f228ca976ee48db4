"""``RedisMemoryStore``: the ``MemoryStore`` API on Redis, and its write path.

Writes go through one Lua script per chunk (see ``layout``), so an interaction, its interaction log row,
its memory, the log entry, the dedup marker, the user's encoder state and any eviction commit atomically.
Reads of the memories go to this replica's index (``replica``), which applies every write from the log; with
``read_your_writes`` a write returns once that index has applied it. Histories (with the encoder states,
in the same round trip) and per-user memories are read from Redis itself; the catalogue (unavailable
items, registered new items) from the replica's copy, which the log keeps current.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from memory_store import user_memory as um
from memory_store.base import (
    Erasure,
    IngestResult,
    Interaction,
    LoggedInteractions,
    MemoryBatch,
    ReplicationStatus,
    SearchResult,
    SnapshotInfo,
    StoreStats,
    check_events,
    check_external_items,
    check_ids,
    check_items,
    check_k,
    check_log_page,
    check_user_id,
    memory_batch_for_events,
    normalise_rows,
    parse_position,
)
from memory_store.config import StoreConfig
from memory_store.index import followers_now, search_now
from memory_store.redis_store import codec, layout
from memory_store.redis_store.connect import connect
from memory_store.redis_store.replica import Replica
from memory_store.redis_store.user_memories import UserMemoryHashes
from memory_store.retention import AgeSweep
from memory_store.states import StoredHistories, UserStates, checked_states, unpack_valid
from memory_store.transitions import Followers

WRITE_CHUNK = 1000  # rows per script call: bounds the time Redis is blocked by one call
CATALOGUE_CHUNK = 5000  # item ids per availability or registration script call, for the same reason
PIPELINE_DEPTH = 8  # script calls in flight per round trip for bulk writes
STATES_CHUNK = 1000  # encoder states per put-states script call
EXPIRE_CHUNK = 5000  # memories per age-retention script call


log = logging.getLogger(__name__)


def _latest(a: str, b: str) -> str:
    if not a:
        return b
    if not b:
        return a
    return max(a, b, key=parse_position)


class RedisMemoryStore:
    """``MemoryStore`` on Redis. Open with :meth:`open`; ``close`` stops the tail task."""

    def __init__(self, config: StoreConfig, client: aioredis.Redis, tail_client: aioredis.Redis) -> None:
        self.config = config
        self._r = client
        self._tail_r = tail_client
        self._p = layout.key_prefix(config.namespace)
        self._replica = Replica(config, client, tail_client)
        self._user_memories = UserMemoryHashes(config, client)
        # Script objects re-load themselves after a NOSCRIPT (e.g. a Redis restart emptied the cache).
        self._write_script = client.register_script(layout.WRITE_SCRIPT)
        self._remove_script = client.register_script(layout.REMOVE_SCRIPT)
        self._availability_script = client.register_script(layout.AVAILABILITY_SCRIPT)
        self._register_script = client.register_script(layout.REGISTER_SCRIPT)
        self._erase_script = client.register_script(layout.ERASE_SCRIPT)
        self._put_states_script = client.register_script(layout.PUT_STATES_SCRIPT)
        self._read_script = client.register_script(layout.READ_SCRIPT)
        self._expire_script = client.register_script(layout.EXPIRE_SCRIPT)
        self._age_sweep = AgeSweep(config.max_age_s)
        self._holder = self._p + layout.HOLDER + uuid.uuid4().hex
        self._holding: asyncio.Task[None] | None = None
        self._released = asyncio.Event()

    @classmethod
    async def open(cls, config: StoreConfig) -> RedisMemoryStore:
        assert config.redis_url is not None
        client = await connect(config)
        tail_client = await connect(config)
        store = cls(config, client, tail_client)
        await store.restore()
        store._holding = asyncio.create_task(store._hold(), name="namespace-holder")
        return store

    async def _hold(self) -> None:
        """Say, for as long as this store is open, that a process has the namespace open (``drop``).
        Stopped by an event, not by cancellation: a cancel that lands inside a redis-py command can be
        swallowed there."""
        while not self._released.is_set():
            try:
                await self._r.set(self._holder, b"1", ex=layout.HOLD_S)
            except (ConnectionError, TimeoutError, RedisError) as exc:
                log.debug("namespace holder key not refreshed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), layout.HOLD_S / 3)

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def applied(self) -> str:
        """Log position this replica's index reflects."""
        return self._replica.applied

    # ------------------------------------------------------------------------------------ write path

    async def _run_writes(
        self,
        mode: str,
        events: Sequence[Interaction],
        batch: MemoryBatch | None,
        states: UserStates | None = None,
    ) -> IngestResult:
        """Chunked script calls (each atomic), pipelined ``PIPELINE_DEPTH`` at a time. The users' states
        go with the last chunk: its script checks each one against the history all chunks made."""
        n = len(batch) if batch is not None else len(events)
        memory_ids = np.full(n, -1, np.int64)
        accepted, position = 0, ""
        starts = list(range(0, n, WRITE_CHUNK))
        for group in range(0, len(starts), PIPELINE_DEPTH):
            chunk_starts = starts[group : group + PIPELINE_DEPTH]
            calls = [
                codec.write_args(
                    self._p,
                    self.config,
                    mode,
                    events[s : s + WRITE_CHUNK],
                    batch.take(np.arange(s, min(s + WRITE_CHUNK, n))) if batch is not None else None,
                    states if s == starts[-1] else None,
                )
                for s in chunk_starts
            ]
            if len(calls) == 1:  # one round trip, no pipeline
                replies = [await self._write_script(args=calls[0])]
            else:
                pipe = self._r.pipeline(transaction=False)
                for args in calls:
                    await self._write_script(args=args, client=pipe)
                replies = await pipe.execute()
            for s, reply in zip(chunk_starts, replies, strict=True):
                add_id, del_id, first, acc = reply
                acc_rows = np.asarray(acc, np.int64) - 1 + s  # Lua indices are 1-based per chunk
                accepted += int(acc_rows.size)
                if "m" in mode and acc_rows.size:
                    memory_ids[acc_rows] = int(first) + np.arange(acc_rows.size)
                position = _latest(position, _latest(add_id.decode(), del_id.decode()))
        if position and self.config.read_your_writes:
            await self.wait_applied(position, self.config.visibility_timeout_s)
        await self._expire()
        return IngestResult(accepted, n - accepted, memory_ids, position)

    async def _expire(self) -> None:
        """Retention by age (memory_store.retention): when a sweep is due, the memories this replica's
        index holds with a timestamp before the cutoff go, through ``EXPIRE_SCRIPT``."""
        cutoff = self._age_sweep.due()
        if cutoff is None:
            return
        ids = self._replica.index.older_than(cutoff).tolist()
        position = ""
        for s in range(0, len(ids), EXPIRE_CHUNK):
            args = [self._p, self.config.stream_maxlen, repr(cutoff), *ids[s : s + EXPIRE_CHUNK]]
            _, entry = await self._expire_script(args=args)
            position = _latest(position, entry.decode())
        await self._see(position)

    async def append_interactions(
        self, events: Sequence[Interaction], states: UserStates | None = None, logged: bool = True
    ) -> IngestResult:
        check_events(events)
        return await self._run_writes("il" if logged else "i", list(events), None, self._checked(states))

    async def ingest(
        self,
        events: Sequence[Interaction],
        keys: np.ndarray,
        prefix_lens: Sequence[int] | np.ndarray,
        recent: np.ndarray | None = None,
        states: UserStates | None = None,
        logged: bool = True,
    ) -> IngestResult:
        width = self.config.recent_width
        batch = memory_batch_for_events(events, keys, prefix_lens, self.dim, width, recent)
        mode = "iml" if logged else "im"
        return await self._run_writes(mode, list(events), batch, self._checked(states))

    def _checked(self, states: UserStates | None) -> UserStates | None:
        return checked_states(states, self.dim, self.config.state_window)

    async def put_states(self, states: UserStates) -> int:
        checked = self._checked(states)
        if checked is None:
            return 0
        kept = 0
        for s in range(0, len(checked), STATES_CHUNK):
            part = checked.take(s, s + STATES_CHUNK)
            kept += int(await self._put_states_script(args=codec.put_states_args(self._p, self.config, part)))
        return kept

    async def add_memories(self, batch: MemoryBatch) -> IngestResult:
        return await self._run_writes("m", [], batch.validated(self.dim, self.config.recent_width))

    async def remove_memories(self, ids: Sequence[int] | np.ndarray) -> int:
        unique = np.unique(check_ids(ids))
        if not unique.size:
            return 0
        args = [self._p, self.config.stream_maxlen, *unique.tolist()]
        reply = await self._remove_script(args=args)
        status, value = reply[0].decode(), reply[1].decode()
        if status == "missing":
            raise ValueError(f"unknown memory id {value}; nothing was removed")
        await self._see(value)
        return int(unique.size)

    async def _see(self, position: str) -> None:
        """With ``read_your_writes``, wait until this replica has applied the log up to ``position``."""
        if position and self.config.read_your_writes:
            await self.wait_applied(position, self.config.visibility_timeout_s)

    # ------------------------------------------------------------------------------------- catalogue

    async def set_available(self, items: Sequence[int] | np.ndarray, available: bool) -> int:
        unique = np.unique(check_items(items)).tolist()
        changed, position = 0, ""
        for s in range(0, len(unique), CATALOGUE_CHUNK):
            args = [self._p, self.config.stream_maxlen, "1" if available else "0"]
            count, entry = await self._availability_script(args=args + unique[s : s + CATALOGUE_CHUNK])
            changed += int(count)
            position = _latest(position, entry.decode())
        await self._see(position)
        return changed

    async def unavailable_items(self) -> np.ndarray:
        return self._replica.catalogue.unavailable()

    async def register_items(self, external_ids: Sequence[str]) -> list[int]:
        names = check_external_items(external_ids)
        known = self._replica.catalogue.new_items()
        if all(name in known for name in names):  # the common case: no round trip
            return [known[name] for name in names]
        ids: list[int] = []
        position = ""
        for s in range(0, len(names), CATALOGUE_CHUNK):
            head = [self._p, str(self.config.stream_maxlen), str(self.config.first_new_item)]
            entry, chunk_ids = await self._register_script(args=head + names[s : s + CATALOGUE_CHUNK])
            ids += [int(i) for i in chunk_ids]
            position = _latest(position, entry.decode())
        await self._see(position)
        return ids

    async def new_items(self) -> Mapping[str, int]:
        return self._replica.catalogue.new_items()

    async def erase_user(self, user_id: str) -> Erasure:
        check_user_id(user_id)
        # Memories written before ``byuser`` was kept for every capacity are found in this replica's
        # index, once it has applied the log as it stands now (the script checks each one's user).
        await self._replica.wait_applied(await self._replica.last_log_id(), self.config.visibility_timeout_s)
        legacy = await asyncio.to_thread(self._replica.index.ids_of_user, user_id)
        head = [self._p, self.config.stream_maxlen, codec.retention_ms(self.config), user_id]
        args = [*head, *legacy.tolist()]
        history, memories, umem, markers, entry, logged = await self._erase_script(args=args)
        position = entry.decode()
        await self._see(position)
        return Erasure(int(history), int(memories), int(umem), int(markers), position, int(logged))

    async def interactions(self, after: str = "", count: int = 10_000) -> LoggedInteractions:
        check_log_page(after, count)
        start = f"({after}" if after else "-"
        if self.config.log_retention_s is not None:  # rows past the retention that no write trimmed yet
            seconds, micros = await self._r.time()
            oldest = (seconds * 1000 + micros // 1000 - codec.retention_ms(self.config), 0)
            if not after or parse_position(after) < oldest:
                start = f"{oldest[0]}-0"
        entries: Any = await self._r.xrange(self._p + layout.INTERACTIONS, start, "+", count)
        return codec.decode_interactions(entries)

    async def bank_loaded(self) -> bool:
        return bool(await self._r.exists(self._p + layout.BANK_LOADED))

    async def mark_bank_loaded(self) -> None:
        await self._r.set(self._p + layout.BANK_LOADED, b"1")

    # ------------------------------------------------------------------------------------- read path

    async def histories(self, user_ids: Sequence[str], max_len: int) -> list[list[int]]:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        pipe = self._r.pipeline(transaction=False)
        for user in user_ids:
            check_user_id(user)
            pipe.lrange(self._p + layout.HIST + user, -max_len, -1)
        return [[int(x) for x in items] for items in await pipe.execute()]

    async def histories_with_states(self, user_ids: Sequence[str], max_len: int) -> StoredHistories:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        window = self.config.state_window
        for user in user_ids:
            check_user_id(user)
        if not user_ids:
            return StoredHistories([], [])
        # one script call (atomic too, but the fingerprint check below would catch a state of another
        # history anyway: a state is returned only where it encodes the items read)
        replies = await self._read_script(args=[self._p, max(max_len, window), *user_ids])
        histories, states = [], []
        for items, blob in zip(replies[::2], replies[1::2], strict=True):
            histories.append([int(x) for x in items[-max_len:]])
            states.append(unpack_valid(blob, items[-window:], self.dim) if window else None)
        return StoredHistories(histories, states)

    async def search(self, queries: np.ndarray, k: int, with_keys: bool = False) -> SearchResult:
        check_k(k)
        unit = normalise_rows(queries, self.dim, "queries")
        return await search_now(self._replica.index, unit, k, with_keys)

    async def followers(self, items: Sequence[int]) -> list[Followers]:
        return await followers_now(self._replica.index, items)

    async def predecessors(self, first: int) -> dict[int, Followers]:
        return self._replica.index.predecessors(first)

    # --------------------------------------------------------------------------------- user memories

    async def update_user_memories(
        self,
        user_id: str,
        items: Sequence[int] | np.ndarray,
        vectors: np.ndarray,
        timestamps: Sequence[float] | np.ndarray,
    ) -> list[int]:
        return await self._user_memories.update(user_id, items, vectors, timestamps)

    async def user_memories(self, user_ids: Sequence[str]) -> list[um.UserMemories]:
        return await self._user_memories.read(user_ids)

    async def record_user_memory_access(self, user_id: str, items: Sequence[int], ts: float) -> int:
        return await self._user_memories.record_access(user_id, items, ts)

    # ---------------------------------------------------------------------------- replica (the index)

    async def wait_applied(self, position: str, timeout_s: float | None = None) -> bool:
        return await self._replica.wait_applied(position, timeout_s)

    async def replication(self) -> ReplicationStatus:
        return await self._replica.replication()

    async def stats(self) -> StoreStats:
        count = await self._r.get(self._p + layout.MEM_COUNT)
        index = self._replica.index
        return StoreStats(
            backend="redis",
            namespace=self.config.namespace,
            memories=int(count or 0),
            index_size=len(index),
            index_kind=index.kind,
            capacity=self.config.capacity,
            replication=await self.replication(),
            unavailable_items=int(self._replica.catalogue.unavailable().size),
            new_items=len(self._replica.catalogue.new_items()),
        )

    async def snapshot(self, path: Path | None = None) -> SnapshotInfo:
        return await self._replica.snapshot(path)

    async def restore(self, path: Path | None = None) -> SnapshotInfo:
        return await self._replica.restore(path)

    async def _stop_tail(self) -> None:
        """Stop applying the log (close does it; tests stop it to make a replica fall behind)."""
        await self._replica.stop_tail()

    async def close(self) -> None:
        await self._release()
        await self._replica.stop_tail()
        await self._r.aclose()
        await self._tail_r.aclose()

    async def _release(self) -> None:
        """Stop saying that this process holds the namespace."""
        if self._holding is not None:
            self._released.set()
            await asyncio.gather(self._holding, return_exceptions=True)
            self._holding = None
            with contextlib.suppress(ConnectionError, TimeoutError, RedisError):
                await self._r.delete(self._holder)

    async def drop(self) -> bool:
        await self._release()
        others = [key async for key in self._r.scan_iter(match=self._p + layout.HOLDER + "*", count=1000)]
        if others:
            log.info(
                "namespace %s kept: %d other process(es) have it open", self.config.namespace, len(others)
            )
            await self.close()
            return False
        deleted = 0
        batch: list[bytes] = []
        async for key in self._r.scan_iter(match=self._p + "*", count=1000):
            batch.append(key)
            if len(batch) == 1000:
                deleted += await self._r.unlink(*batch)
                batch = []
        if batch:
            deleted += await self._r.unlink(*batch)
        await self.close()
        if self.config.data_dir is not None:  # this replica's index snapshots
            shutil.rmtree(self.config.data_dir / self.config.namespace, ignore_errors=True)
        log.info("namespace %s dropped: %d keys", self.config.namespace, deleted)
        return True
