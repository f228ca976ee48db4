"""The Redis backend: shared state in Redis, a local FAISS index per replica that tails the log stream.

Writes go through one Lua script per batch (see ``redis_layout``), so an interaction, its memory, the
log entry, the dedup marker and any eviction commit atomically. Every replica, the writer included,
updates its index only from the stream, in stream order (XREAD from its last-applied id, no consumer
group: every replica needs every entry). With ``read_your_writes`` a write returns once this replica's
index has applied it.

Start-up (and ``restore``): load the local snapshot (index + metadata + the stream id it covers) when it
exists, was taken of this very dataset (its epoch token matches the namespace's: memory ids restart at 1
in an emptied namespace, and a stale snapshot would shadow the new memories under the same ids) and the
stream still holds every entry after it; otherwise rebuild from the ``mem:{id}`` hashes.
Then replay the stream to its end and start tailing. Adds and removes are idempotent, so replaying an
entry the snapshot or the rebuild already reflects changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError, WatchError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from memory_store import redis_layout as layout
from memory_store import user_memory as um
from memory_store.base import (
    IngestResult,
    Interaction,
    MemoryBatch,
    ReplicationStatus,
    SearchResult,
    SnapshotError,
    SnapshotInfo,
    StoreStats,
    check_events,
    check_ids,
    check_k,
    check_observations,
    check_user_id,
    memory_batch_for_events,
    normalise_rows,
    parse_position,
    snapshot_file,
)
from memory_store.config import StoreConfig
from memory_store.index import IndexImage, MemoryIndex, followers_now, search_now
from memory_store.transitions import RECENT, Followers

log = logging.getLogger(__name__)

WRITE_CHUNK = 1000  # rows per script call: bounds the time Redis is blocked by one call
PIPELINE_DEPTH = 8  # script calls in flight per round trip for bulk writes
READ_COUNT = 1000  # log entries per XREAD
BLOCK_MS = 1000
# Log batches up to this many entries are applied in the event-loop thread (well under a millisecond);
# larger ones in a worker thread.
INLINE_APPLY_MAX = 16
REBUILD_CHUNK = 5000
TAIL_MAX_BACKOFF_S = 1.0  # while Redis is down the tail retries this often, so it resumes soon after
WATCH_ATTEMPTS = 20
EPOCH_CHECK_S = 1.0  # how often the tail checks that the namespace was not emptied under it
_ZERO = "0-0"


def _client(config: StoreConfig) -> aioredis.Redis:
    """A client for ``config.redis_url`` with the config's password and, for ``rediss://``, CA file."""
    assert config.redis_url is not None
    options: dict[str, Any] = {"decode_responses": False}
    if config.redis_password is not None:
        options["password"] = config.redis_password
    if config.redis_tls_ca_file is not None:  # StoreConfig checked that the URL is rediss://
        options["ssl_ca_certs"] = str(config.redis_tls_ca_file)
    client: aioredis.Redis = aioredis.from_url(config.redis_url, **options)
    return client


def _redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


async def connect(config: StoreConfig) -> aioredis.Redis:
    """A client that answered PING; retries with exponential backoff, then raises ConnectionError."""
    url = _redacted(config.redis_url or "")
    attempts, backoff_s = config.connect_attempts, config.connect_backoff_s
    client = _client(config)
    for attempt in range(1, attempts + 1):
        try:
            await client.ping()
            return client
        except AuthenticationError as exc:  # a wrong password does not get better by retrying
            await client.aclose()
            raise ConnectionError(f"Redis at {url} refused the credentials: {exc}") from exc
        except ResponseError as exc:  # e.g. NOAUTH: a password is required and none was given
            await client.aclose()
            raise ConnectionError(f"Redis at {url} refused the connection: {exc}") from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if attempt == attempts:
                await client.aclose()
                raise ConnectionError(f"Redis at {url} did not answer after {attempts} attempts") from exc
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "Redis at %s not reachable (%s); retry %d/%d in %.1fs", url, exc, attempt, attempts, delay
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def _decode_add(fields: dict[bytes, bytes], dim: int) -> tuple[np.ndarray, MemoryBatch]:
    """(ids (n,), batch) of an ``op=add`` log entry."""
    n, id0 = int(fields[b"n"]), int(fields[b"id0"])
    batch = MemoryBatch(
        keys=np.frombuffer(fields[b"vec"], "<f4").reshape(n, dim),
        items=np.frombuffer(fields[b"item"], "<i8"),
        users=tuple(json.loads(fields[b"user"])),
        timestamps=np.frombuffer(fields[b"ts"], "<f8"),
        prefix_lens=np.frombuffer(fields[b"len"], "<i4"),
        recent=_decode_recent(fields.get(b"rec"), n),
    )
    return np.arange(id0, id0 + n, dtype=np.int64), batch


def _decode_recent(blob: bytes | None, n: int) -> np.ndarray:
    """(n, RECENT) of a log entry's or hash's ``rec`` bytes; zeros when absent (written before memories
    kept their prefix's last items)."""
    if not blob:
        return np.zeros((n, RECENT), np.int64)
    return np.frombuffer(blob, "<i8").reshape(n, RECENT).astype(np.int64)


def _concat(parts: list[tuple[np.ndarray, MemoryBatch]]) -> tuple[np.ndarray, MemoryBatch]:
    if len(parts) == 1:
        return parts[0]
    ids = np.concatenate([p[0] for p in parts])
    batch = MemoryBatch(
        keys=np.concatenate([p[1].keys for p in parts]),
        items=np.concatenate([p[1].items for p in parts]),
        users=tuple(u for p in parts for u in p[1].users),
        timestamps=np.concatenate([p[1].timestamps for p in parts]),
        prefix_lens=np.concatenate([p[1].prefix_lens for p in parts]),
        recent=np.concatenate([p[1].recent for p in parts]),
    )
    return ids, batch


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
        self._tail_r = tail_client  # its own connection: the blocking XREAD never waits for the pool
        self._p = layout.key_prefix(config.namespace)
        self._log_key = self._p + layout.LOG
        self._index = MemoryIndex(config.dim, config.index)
        self._applied = _ZERO
        self._epoch = ""  # the namespace's epoch token the index was built against (set by restore)
        self._applied_cond = asyncio.Condition()
        self._apply_lock = asyncio.Lock()  # held while log entries are applied or a snapshot is taken
        self._tail_task: asyncio.Task[None] | None = None
        self._stopping = False
        # Script objects re-load themselves after a NOSCRIPT (e.g. a Redis restart emptied the cache).
        self._write_script = client.register_script(layout.WRITE_SCRIPT)
        self._remove_script = client.register_script(layout.REMOVE_SCRIPT)

    @classmethod
    async def open(cls, config: StoreConfig) -> RedisMemoryStore:
        assert config.redis_url is not None
        client = await connect(config)
        tail_client = await connect(config)
        store = cls(config, client, tail_client)
        await store.restore()
        return store

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def applied(self) -> str:
        """Log position this replica's index reflects."""
        return self._applied

    # ------------------------------------------------------------------------------------ write path

    def _script_args(self, mode: str, events: Sequence[Interaction], batch: MemoryBatch | None) -> list[Any]:
        n = len(batch) if batch is not None else len(events)
        cfg = self.config
        head: list[Any] = [
            self._p,
            n,
            cfg.dim * 4,
            cfg.dedup_ttl_s,
            cfg.history_len,
            cfg.capacity or 0,
            cfg.user_capacity or 0,
            cfg.stream_maxlen,
            mode,
        ]
        if batch is not None:
            head += [
                batch.keys.astype("<f4").tobytes(),
                batch.items.astype("<i8").tobytes(),
                batch.timestamps.astype("<f8").tobytes(),
                batch.prefix_lens.astype("<i4").tobytes(),
                batch.recent.astype("<i8").tobytes(),
            ]
        else:
            head += [b"", b"", b"", b"", b""]
        rows: list[Any] = []
        for i in range(n):
            ev = events[i] if events else None
            if batch is not None:
                user, item = batch.users[i], int(batch.items[i])
                ts, plen = repr(float(batch.timestamps[i])), int(batch.prefix_lens[i])
            else:
                assert ev is not None
                user, item, ts, plen = ev.user_id, int(ev.item_id), repr(float(ev.timestamp)), 0
            event_id = ev.event_id if ev is not None and ev.event_id is not None else ""
            rows += [event_id, user, item, ts, plen]
        return head + rows

    async def _run_writes(
        self, mode: str, events: Sequence[Interaction], batch: MemoryBatch | None
    ) -> IngestResult:
        """Chunked script calls (each atomic), pipelined ``PIPELINE_DEPTH`` at a time."""
        n = len(batch) if batch is not None else len(events)
        memory_ids = np.full(n, -1, np.int64)
        accepted, position = 0, ""
        starts = list(range(0, n, WRITE_CHUNK))
        for group in range(0, len(starts), PIPELINE_DEPTH):
            chunk_starts = starts[group : group + PIPELINE_DEPTH]
            calls = [
                self._script_args(
                    mode,
                    events[s : s + WRITE_CHUNK],
                    batch.take(np.arange(s, min(s + WRITE_CHUNK, n))) if batch is not None else None,
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
        return IngestResult(accepted, n - accepted, memory_ids, position)

    async def append_interactions(self, events: Sequence[Interaction]) -> IngestResult:
        check_events(events)
        return await self._run_writes("i", list(events), None)

    async def ingest(
        self,
        events: Sequence[Interaction],
        keys: np.ndarray,
        prefix_lens: Sequence[int] | np.ndarray,
        recent: np.ndarray | None = None,
    ) -> IngestResult:
        batch = memory_batch_for_events(events, keys, prefix_lens, self.dim, recent)
        return await self._run_writes("im", list(events), batch)

    async def add_memories(self, batch: MemoryBatch) -> IngestResult:
        return await self._run_writes("m", [], batch.validated(self.dim))

    async def remove_memories(self, ids: Sequence[int] | np.ndarray) -> int:
        unique = np.unique(check_ids(ids))
        if not unique.size:
            return 0
        args = [self._p, self.config.stream_maxlen, self.config.user_capacity or 0, *unique.tolist()]
        reply = await self._remove_script(args=args)
        status, value = reply[0].decode(), reply[1].decode()
        if status == "missing":
            raise ValueError(f"unknown memory id {value}; nothing was removed")
        if self.config.read_your_writes:
            await self.wait_applied(value, self.config.visibility_timeout_s)
        return int(unique.size)

    # ------------------------------------------------------------------------------------- read path

    async def histories(self, user_ids: Sequence[str], max_len: int) -> list[list[int]]:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        pipe = self._r.pipeline(transaction=False)
        for user in user_ids:
            check_user_id(user)
            pipe.lrange(self._p + layout.HIST + user, -max_len, -1)
        return [[int(x) for x in items] for items in await pipe.execute()]

    async def search(self, queries: np.ndarray, k: int, with_keys: bool = False) -> SearchResult:
        check_k(k)
        unit = normalise_rows(queries, self.dim, "queries")
        return await search_now(self._index, unit, k, with_keys)

    async def followers(self, items: Sequence[int]) -> list[Followers]:
        return await followers_now(self._index, items)

    # --------------------------------------------------------------------------------- user memories

    async def _read_user_memories(self, client: Any, user_id: str) -> um.UserMemories:
        raw: dict[bytes, bytes] = await client.hgetall(self._p + layout.USER_MEM + user_id)
        return um.unpack(user_id, self.dim, [int(i) for i in raw], list(raw.values()))

    async def _rewrite_user_memories(self, user_id: str, change: Any) -> Any:
        """Optimistic read-modify-write of one user's hash: WATCH, compute, MULTI/EXEC; bounded retries.
        ``change(entries) -> (new_entries or None, result)``; None writes nothing."""
        key = self._p + layout.USER_MEM + user_id
        async with self._r.pipeline(transaction=True) as pipe:
            for _ in range(WATCH_ATTEMPTS):
                try:
                    await pipe.watch(key)
                    new, result = change(await self._read_user_memories(pipe, user_id))
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

    async def update_user_memories(
        self,
        user_id: str,
        items: Sequence[int] | np.ndarray,
        vectors: np.ndarray,
        timestamps: Sequence[float] | np.ndarray,
    ) -> list[int]:
        it, vec, ts = check_observations(user_id, items, vectors, timestamps, self.dim)
        cap, quality = self.config.user_memory_capacity, self.config.quality
        evicted: list[int] = await self._rewrite_user_memories(
            user_id, lambda cur: um.merge_observations(cur, it, vec, ts, cap, quality)
        )
        return evicted

    async def user_memories(self, user_ids: Sequence[str]) -> list[um.UserMemories]:
        pipe = self._r.pipeline(transaction=False)
        for user in user_ids:
            check_user_id(user)
            pipe.hgetall(self._p + layout.USER_MEM + user)
        return [
            um.unpack(user, self.dim, [int(i) for i in raw], list(raw.values()))
            for user, raw in zip(user_ids, await pipe.execute(), strict=True)
        ]

    async def record_user_memory_access(self, user_id: str, items: Sequence[int], ts: float) -> int:
        check_user_id(user_id)

        def change(cur: um.UserMemories) -> tuple[um.UserMemories | None, int]:
            new, hits = um.record_access(cur, list(items), float(ts))
            return (new if hits else None), hits

        hits: int = await self._rewrite_user_memories(user_id, change)
        return hits

    # ------------------------------------------------------------------------------- log application

    def _apply_entries(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Apply log entries in order (in a worker thread); consecutive adds go to FAISS as one batch."""
        adds: list[tuple[np.ndarray, MemoryBatch]] = []
        for _, fields in entries:
            if fields[b"op"] == b"add":
                adds.append(_decode_add(fields, self.dim))
                continue
            if adds:
                self._index.add(*_concat(adds))
                adds = []
            self._index.remove(np.asarray(fields[b"ids"].split(b","), dtype=np.int64))
        if adds:
            self._index.add(*_concat(adds))

    async def _set_applied(self, position: str) -> None:
        async with self._applied_cond:
            self._applied = position
            self._applied_cond.notify_all()

    async def _pump(self, block_ms: int | None) -> int:
        """Read and apply one batch of log entries after ``applied``; returns how many."""
        reply: Any = await self._tail_r.xread(
            {self._log_key: self._applied}, count=READ_COUNT, block=block_ms
        )
        if not reply:
            return 0
        entries = reply[0][1]
        async with self._apply_lock:
            if len(entries) <= INLINE_APPLY_MAX:  # the live trickle: cheaper here than a thread hop
                self._apply_entries(entries)
            else:  # a catch-up or bulk load: keep the event loop free meanwhile
                await asyncio.to_thread(self._apply_entries, entries)
            await self._set_applied(entries[-1][0].decode())
        return len(entries)

    async def _tail(self) -> None:
        backoff = 0.1
        checked = time.monotonic()
        while not self._stopping:
            try:
                if await self._pump(BLOCK_MS) == READ_COUNT and await self._log_gap():
                    log.error("replica fell behind the trimmed log; rebuilding from Redis")
                    await self._rebuild_from_hashes()
                if time.monotonic() - checked >= EPOCH_CHECK_S:
                    checked = time.monotonic()
                    await self._check_epoch()
                backoff = 0.1
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if self._stopping:
                    return
                log.warning("log tail lost Redis (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, TAIL_MAX_BACKOFF_S)
            except Exception:  # a bad entry: stay on it (the lag metric shows it) rather than skip it
                log.exception(
                    "could not apply log entries after %s; retrying in %.1fs", self._applied, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, TAIL_MAX_BACKOFF_S)

    async def _catch_up(self) -> int:
        applied = 0
        while n := await self._pump(None):
            applied += n
        return applied

    async def wait_applied(self, position: str, timeout_s: float | None = None) -> bool:
        target = parse_position(position)
        async with self._applied_cond:
            try:
                await asyncio.wait_for(
                    self._applied_cond.wait_for(lambda: parse_position(self._applied) >= target), timeout_s
                )
            except TimeoutError:
                log.warning(
                    "log position %s not applied within %ss (applied %s)", position, timeout_s, self._applied
                )
                return False
        return True

    async def _last_log_id(self) -> str:
        last: Any = await self._r.xrevrange(self._log_key, count=1)
        return str(last[0][0].decode()) if last else _ZERO

    async def _log_gap(self) -> bool:
        """True when entries after ``applied`` may have been trimmed from the stream: something was
        trimmed and the oldest entry kept is newer than ``applied``. (Conservative: if exactly the entry at
        ``applied`` went and nothing after it, this still says True and costs a rebuild, never a loss.)"""
        try:
            info: Any = await self._r.xinfo_stream(self._log_key)
        except ResponseError:  # no stream yet
            return False
        if info.get("entries-added") == info["length"]:
            return False  # nothing was ever trimmed
        first = info["first-entry"][0] if info.get("first-entry") else info["last-generated-id"]
        first = first.decode() if isinstance(first, bytes) else str(first)
        return parse_position(first) > parse_position(self._applied)

    async def replication(self) -> ReplicationStatus:
        last = await self._last_log_id()
        if parse_position(self._applied) >= parse_position(last):
            return ReplicationStatus(self._applied, last, 0, 0.0)
        pending: Any = await self._r.xrange(self._log_key, min="(" + self._applied, count=1000)
        oldest_ms = parse_position(pending[0][0].decode())[0] if pending else int(time.time() * 1000)
        lag = max(0.0, time.time() - oldest_ms / 1000.0)
        return ReplicationStatus(self._applied, last, len(pending), lag)

    async def stats(self) -> StoreStats:
        count = await self._r.get(self._p + layout.MEM_COUNT)
        return StoreStats(
            backend="redis",
            namespace=self.config.namespace,
            memories=int(count or 0),
            index_size=len(self._index),
            index_kind=self._index.kind,
            capacity=self.config.capacity,
            replication=await self.replication(),
        )

    # ------------------------------------------------------------------------- snapshots and restart

    def _default_snapshot_dir(self) -> Path:
        if self.config.data_dir is None:
            raise ValueError("snapshots need a path or a data_dir in the store config")
        return Path(self.config.data_dir) / self.config.namespace / "snapshot"

    async def snapshot(self, path: Path | None = None) -> SnapshotInfo:
        """Write this replica's index and the log position it reflects. The tail pauses only while the
        index is copied in memory; the files are written afterwards."""
        target = path or self._default_snapshot_dir()
        # Unique per writer: replicas that share a folder never write into each other's files.
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        async with self._apply_lock:
            position, size = self._applied, len(self._index)
            image = await asyncio.to_thread(self._index.capture)
        await asyncio.to_thread(self._write_snapshot, image, tmp, target, position)
        log.info("snapshot at %s: %d memories -> %s", position, size, target)
        return SnapshotInfo(target, position, size)

    def _write_snapshot(self, image: IndexImage, tmp: Path, target: Path, position: str) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        image.write(tmp)
        marker = {"position": position, "namespace": self.config.namespace, "epoch": self._epoch}
        (tmp / "position.json").write_text(json.dumps(marker))
        shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another writer's snapshot landed first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    async def restore(self, path: Path | None = None) -> SnapshotInfo:
        """Snapshot (when usable) + log replay, or a rebuild from the memory hashes; then tail."""
        await self._stop_tail()
        self._epoch = await self._namespace_epoch()
        source = path or (self._default_snapshot_dir() if self.config.data_dir is not None else None)
        loaded = source is not None and await self._load_snapshot(source)
        if not loaded:
            await self._rebuild_from_hashes()
        replayed = await self._catch_up()
        log.info(
            "replica ready at %s: %d memories (%d log entries replayed)",
            self._applied,
            len(self._index),
            replayed,
        )
        self._tail_task = asyncio.create_task(self._tail(), name=f"memrec-log-tail-{self.config.namespace}")
        return SnapshotInfo(source or Path(), self._applied, len(self._index))

    async def _load_snapshot(self, source: Path) -> bool:
        marker = source / "position.json"
        if not marker.exists():
            return False
        try:
            with snapshot_file(marker):
                meta = json.loads(marker.read_text())
                position = meta["position"]
            if meta.get("epoch") != self._epoch:
                raise SnapshotError(f"{source} was taken before the namespace was emptied or recreated")
            index = await asyncio.to_thread(MemoryIndex.load, source, self.config.index)
        except SnapshotError as exc:  # only a cache of Redis: rebuild from the source of truth
            log.warning("ignoring the index snapshot (%s); rebuilding from Redis", exc)
            return False
        if index.dim != self.dim:
            raise ValueError(f"snapshot {source} has dim {index.dim}, store dim is {self.dim}")
        self._index = index
        await self._set_applied(position)
        if await self._log_gap():
            log.warning("snapshot %s at %s is older than the trimmed log; rebuilding", source, position)
            return False
        return True

    async def _check_epoch(self) -> None:
        """Rebuild when the namespace was emptied while this replica ran (FLUSHDB, a Redis restart
        without persistence): memory ids restart at 1 there, and the log's new adds would be skipped as
        ids the index already holds."""
        epoch = await self._namespace_epoch()
        if epoch != self._epoch:
            log.error("the namespace was emptied or recreated in Redis; rebuilding the index from it")
            self._epoch = epoch
            await self._rebuild_from_hashes()

    async def _namespace_epoch(self) -> str:
        """The namespace's epoch token, created by the first replica to ask (SET NX: one wins)."""
        key = self._p + layout.EPOCH
        await self._r.set(key, secrets.token_hex(8), nx=True)
        token = await self._r.get(key)
        return token.decode() if isinstance(token, bytes) else str(token)

    async def _rebuild_from_hashes(self) -> None:
        """Read every ``mem:{id}`` hash between the eviction cursor and the id sequence; the log position
        is taken first so the replay afterwards covers every write that raced with the scan."""
        position = await self._last_log_id()
        low = int(await self._r.get(self._p + layout.MEM_LOW) or 1)
        seq = int(await self._r.get(self._p + layout.MEM_SEQ) or 0)
        index = MemoryIndex(self.dim, self.config.index)
        parts: list[tuple[np.ndarray, MemoryBatch]] = []
        for start in range(low, seq + 1, REBUILD_CHUNK):
            ids = np.arange(start, min(start + REBUILD_CHUNK, seq + 1), dtype=np.int64)
            pipe = self._r.pipeline(transaction=False)
            for mem_id in ids.tolist():
                pipe.hmget(self._p + layout.MEM + str(mem_id), *layout.MEM_FIELDS)
            rows = [(i, r) for i, r in zip(ids.tolist(), await pipe.execute(), strict=True) if r[0]]
            if rows:
                parts.append(self._rows_to_batch(rows))
        if parts:
            await asyncio.to_thread(index.add, *_concat(parts))
        async with self._apply_lock:
            self._index = index
            await self._set_applied(position)
        log.info("rebuilt %d memories from Redis hashes (ids %d..%d)", len(index), low, seq)

    def _rows_to_batch(self, rows: list[tuple[int, list[bytes]]]) -> tuple[np.ndarray, MemoryBatch]:
        batch = MemoryBatch(
            keys=np.frombuffer(b"".join(r[0] for _, r in rows), "<f4").reshape(len(rows), self.dim),
            items=np.asarray([int(r[1]) for _, r in rows], np.int64),
            users=tuple(r[2].decode() for _, r in rows),
            timestamps=np.asarray([float(r[3]) for _, r in rows], np.float64),
            prefix_lens=np.asarray([int(r[4]) for _, r in rows], np.int32),
            recent=np.concatenate([_decode_recent(r[5], 1) for _, r in rows]),
        )
        return np.asarray([i for i, _ in rows], np.int64), batch

    async def _stop_tail(self) -> None:
        task, self._tail_task = self._tail_task, None
        if task is None:
            return
        self._stopping = True
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done:  # a blocked read can miss the cancellation; closing its socket ends it
            await self._tail_r.connection_pool.disconnect()
            done, _ = await asyncio.wait({task}, timeout=5.0)
        if not done:
            log.error("log tail did not stop")
        with contextlib.suppress(asyncio.CancelledError):
            if done:
                task.result()
        self._stopping = False

    async def close(self) -> None:
        await self._stop_tail()
        await self._r.aclose()
        await self._tail_r.aclose()
