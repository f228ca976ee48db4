"""This replica's copy of a namespace's memories: a local FAISS index that follows the Redis log.

Every replica, the writer included, updates its index only from the ``log`` stream, in stream order
(XREAD from its last-applied id, no consumer group: every replica needs every entry). Adds and removes
are idempotent, so replaying an entry the index already reflects changes nothing.

Start-up (and ``restore``): load the local snapshot (index + metadata + the stream id it covers) when it
exists, was taken of this very dataset (its epoch token matches the namespace's: memory ids restart at 1
in an emptied namespace, and a stale snapshot would shadow the new memories under the same ids) and the
stream still holds every entry after it; otherwise rebuild from the ``mem:{id}`` hashes. Then replay the
stream to its end and start tailing.

The replica's catalogue (unavailable items, registered new items: ``memory_store.catalogue``) follows
the same log: read whole from Redis at a restore or rebuild (after the position the replay starts
from), then changed by the ``avail`` and ``items`` entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from memory_store.base import ReplicationStatus, SnapshotError, SnapshotInfo, parse_position
from memory_store.catalogue import Catalogue
from memory_store.config import StoreConfig
from memory_store.index import MemoryIndex
from memory_store.redis_store import codec, layout
from memory_store.snapshot import IndexImage, snapshot_file

log = logging.getLogger(__name__)

READ_COUNT = 1000  # log entries per XREAD
BLOCK_MS = 1000
# Log batches up to this many entries are applied in the event-loop thread (well under a millisecond);
# larger ones in a worker thread.
INLINE_APPLY_MAX = 16
REBUILD_CHUNK = 5000
TAIL_MAX_BACKOFF_S = 1.0  # while Redis is down the tail retries this often, so it resumes soon after
EPOCH_CHECK_S = 1.0  # how often the tail checks that the namespace was not emptied under it
ZERO = "0-0"
POSITION_FILE = "position.json"  # beside the index files: the log position, namespace and epoch

Entry = tuple[bytes, dict[bytes, bytes]]  # (stream id, fields) of one log entry


class Replica:
    """The index and the log position it reflects. ``index`` is replaced by a restore or a rebuild, so
    read it anew for every use."""

    def __init__(self, config: StoreConfig, client: aioredis.Redis, tail_client: aioredis.Redis) -> None:
        self.config = config
        self._r = client
        self._tail_r = tail_client  # its own connection: the blocking XREAD never waits for the pool
        self._p = layout.key_prefix(config.namespace)
        self._log_key = self._p + layout.LOG
        self.index = self._new_index()
        self.catalogue = Catalogue()  # replaced by a restore or a rebuild, as the index
        self.applied = ZERO  # the log position the index reflects
        self._epoch = ""  # the namespace's epoch token the index was built against (set by restore)
        self._applied_cond = asyncio.Condition()
        self._apply_lock = asyncio.Lock()  # held while log entries are applied or a snapshot is taken
        self._tail_task: asyncio.Task[None] | None = None
        self._stopping = False

    def _new_index(self) -> MemoryIndex:
        return MemoryIndex(self.config.dim, self.config.index, self.config.recent_width)

    # ------------------------------------------------------------------------------- log application

    def _apply_entries(self, entries: list[Entry]) -> None:
        """Apply log entries in order (in a worker thread); consecutive adds go to FAISS as one batch."""
        dim, width = self.config.dim, self.config.recent_width
        adds: list[codec.Rows] = []
        for stream_id, fields in entries:
            op = fields[b"op"]
            if op == b"add":
                adds.append(codec.decode_add(fields, dim, width))
                continue
            if adds:
                self.index.add(*codec.concat(adds))
                adds = []
            if op == b"del":
                self.index.remove(np.asarray(fields[b"ids"].split(b","), dtype=np.int64))
            elif op == b"avail":
                self.catalogue.set_available(*codec.decode_availability(fields))
            elif op == b"items":
                self.catalogue.register(codec.decode_registered(fields))
            else:  # written by a newer version: stay on it (the tail retries) rather than skip it
                raise ValueError(f"unknown log entry op {op!r} at {stream_id!r}")
        if adds:
            self.index.add(*codec.concat(adds))

    async def _set_applied(self, position: str) -> None:
        async with self._applied_cond:
            self.applied = position
            self._applied_cond.notify_all()

    async def _pump(self, block_ms: int | None) -> int:
        """Read and apply one batch of log entries after ``applied``; returns how many."""
        reply: Any = await self._tail_r.xread({self._log_key: self.applied}, count=READ_COUNT, block=block_ms)
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
                    "could not apply log entries after %s; retrying in %.1fs", self.applied, backoff
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
                    self._applied_cond.wait_for(lambda: parse_position(self.applied) >= target), timeout_s
                )
            except TimeoutError:
                log.warning(
                    "log position %s not applied within %ss (applied %s)", position, timeout_s, self.applied
                )
                return False
        return True

    # ---------------------------------------------------------------------------------- log position

    async def last_log_id(self) -> str:
        last: Any = await self._r.xrevrange(self._log_key, count=1)
        return str(last[0][0].decode()) if last else ZERO

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
        return parse_position(first) > parse_position(self.applied)

    async def replication(self) -> ReplicationStatus:
        last = await self.last_log_id()
        if parse_position(self.applied) >= parse_position(last):
            return ReplicationStatus(self.applied, last, 0, 0.0)
        pending: Any = await self._r.xrange(self._log_key, min="(" + self.applied, count=1000)
        oldest_ms = parse_position(pending[0][0].decode())[0] if pending else int(time.time() * 1000)
        lag = max(0.0, time.time() - oldest_ms / 1000.0)
        return ReplicationStatus(self.applied, last, len(pending), lag)

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
            position, size = self.applied, len(self.index)
            image = await asyncio.to_thread(self.index.capture)
        await asyncio.to_thread(self._write_snapshot, image, tmp, target, position)
        log.info("snapshot at %s: %d memories -> %s", position, size, target)
        return SnapshotInfo(target, position, size)

    def _write_snapshot(self, image: IndexImage, tmp: Path, target: Path, position: str) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        image.write(tmp)
        marker = {"position": position, "namespace": self.config.namespace, "epoch": self._epoch}
        (tmp / POSITION_FILE).write_text(json.dumps(marker))
        shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another writer's snapshot landed first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    async def restore(self, path: Path | None = None) -> SnapshotInfo:
        """Snapshot (when usable) + log replay, or a rebuild from the memory hashes; then tail."""
        await self.stop_tail()
        self._epoch = await self._namespace_epoch()
        source = path or (self._default_snapshot_dir() if self.config.data_dir is not None else None)
        loaded = source is not None and await self._load_snapshot(source)
        if loaded:
            await self._load_catalogue()
        else:
            await self._rebuild_from_hashes()
        replayed = await self._catch_up()
        log.info(
            "replica ready at %s: %d memories (%d log entries replayed)",
            self.applied,
            len(self.index),
            replayed,
        )
        self._tail_task = asyncio.create_task(self._tail(), name=f"memrec-log-tail-{self.config.namespace}")
        return SnapshotInfo(source or Path(), self.applied, len(self.index))

    async def _load_snapshot(self, source: Path) -> bool:
        marker = source / POSITION_FILE
        if not marker.exists():
            return False
        try:
            with snapshot_file(marker):
                meta = json.loads(marker.read_text())
                position = meta["position"]
            if meta.get("epoch") != self._epoch:
                raise SnapshotError(f"{source} was taken before the namespace was emptied or recreated")
            index = await asyncio.to_thread(
                MemoryIndex.load, source, self.config.index, self.config.recent_width
            )
        except SnapshotError as exc:  # only a cache of Redis: rebuild from the source of truth
            log.warning("ignoring the index snapshot (%s); rebuilding from Redis", exc)
            return False
        if index.dim != self.config.dim:
            raise ValueError(f"snapshot {source} has dim {index.dim}, store dim is {self.config.dim}")
        if not index.conforms:  # the hashes hold the full keys: no code is converted
            log.warning(
                "snapshot %s holds a %s index, not %s; rebuilding", source, index.kind, self.config.index.kind
            )
            return False
        self.index = index
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
        position = await self.last_log_id()
        low = int(await self._r.get(self._p + layout.MEM_LOW) or 1)
        seq = int(await self._r.get(self._p + layout.MEM_SEQ) or 0)
        index = self._new_index()
        parts: list[codec.Rows] = []
        for start in range(low, seq + 1, REBUILD_CHUNK):
            ids = np.arange(start, min(start + REBUILD_CHUNK, seq + 1), dtype=np.int64)
            pipe = self._r.pipeline(transaction=False)
            for mem_id in ids.tolist():
                pipe.hmget(self._p + layout.MEM + str(mem_id), *layout.MEM_FIELDS)
            rows = [(i, r) for i, r in zip(ids.tolist(), await pipe.execute(), strict=True) if r[0]]
            if rows:
                parts.append(codec.decode_hashes(rows, self.config.dim, self.config.recent_width))
        if parts:
            await asyncio.to_thread(index.add, *codec.concat(parts))
        async with self._apply_lock:
            self.index = index
            await self._set_applied(position)
        log.info("rebuilt %d memories from Redis hashes (ids %d..%d)", len(index), low, seq)
        await self._load_catalogue()

    async def _load_catalogue(self) -> None:
        """Read the whole catalogue from Redis; called once ``applied`` is set, so the log replay after
        it re-applies (idempotently) whatever changed since that position."""
        pipe = self._r.pipeline(transaction=False)
        pipe.smembers(self._p + layout.UNAVAILABLE)
        pipe.hgetall(self._p + layout.NEW_ITEMS)
        unavailable, registered = await pipe.execute()
        catalogue = Catalogue.from_state(
            (int(i) for i in unavailable), {k.decode(): int(v) for k, v in registered.items()}
        )
        async with self._apply_lock:
            self.catalogue = catalogue

    async def stop_tail(self) -> None:
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
