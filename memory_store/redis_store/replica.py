"""This replica's copy of a namespace's memories: a local FAISS index that follows the Redis logs.

Every replica, the writer included, updates its index only from the ``log`` streams, one per slot group
(``groups``), each in stream order (XREAD from its last-applied id, no consumer group: every replica
needs every entry). A user's writes are all in one group, so they apply in the order they were made.
With several groups each is tailed by its own blocking read (on a cluster they live on different
masters). Adds and removes are idempotent, so replaying an entry the index already reflects changes
nothing.

Start-up (and ``restore``): load the local snapshot (index + metadata + the stream id it covers) when it
exists, was taken of this very dataset (its epoch token matches the namespace's: memory ids restart at 1
in an emptied namespace, and a stale snapshot would shadow the new memories under the same ids) and the
stream still holds every entry after it; otherwise rebuild from the ``mem:{id}`` hashes. Then replay the
streams to their ends and start tailing. A log that went back behind what the index applied (a
failover that lost writes the old master had acknowledged without WAIT) is rebuilt from, as an emptied
one is.

The replica's catalogue (unavailable items, registered new items: ``memory_store.catalogue``) follows
the same log: read whole from Redis at a restore or rebuild (after the position the replay starts
from), then changed by the ``avail`` and ``items`` entries.
"""

from __future__ import annotations

import asyncio
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
from memory_store.redis_store.connect import drop_connections
from memory_store.redis_store.groups import SlotGroups
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

    def __init__(
        self, config: StoreConfig, groups: SlotGroups, client: aioredis.Redis, tail_client: aioredis.Redis
    ) -> None:
        self.config = config
        self._r = client
        self._tail_r = tail_client  # its own connections: the blocking XREADs never wait for the pool
        self._groups = groups
        self._p = groups.prefix(0)  # the catalogue's and the epoch's group
        self._log_keys = [prefix + layout.LOG for prefix in groups.prefixes]
        self.index = self._new_index()
        self.catalogue = Catalogue()  # replaced by a restore or a rebuild, as the index
        self._applied = [ZERO] * groups.count  # per group, the stream id the index reflects
        self._generation = 0  # counts rebuilds: a batch read before one is not applied after it
        self._seq = [0] * groups.count  # per group, the ``seq`` of the last entry applied (0: not known)
        self._epoch = ""  # the namespace's epoch token the index was built against (set by restore)
        self._applied_cond = asyncio.Condition()
        self._apply_lock = asyncio.Lock()  # held while log entries are applied or a snapshot is taken
        self._tail_tasks: list[asyncio.Task[None]] = []  # one per group
        self._stop = asyncio.Event()  # the running tail's: set by stop_tail, a fresh one per tail

    @property
    def applied(self) -> str:
        """The log position the index reflects."""
        return self._groups.position(dict(enumerate(self._applied)))

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

    async def _set_applied(self, group: int, stream_id: str) -> None:
        async with self._applied_cond:
            self._applied[group] = stream_id
            self._applied_cond.notify_all()

    async def _set_position(self, position: str) -> None:
        """Every group's applied id at once (a snapshot's or a rebuild's position). The entries' numbers
        there are not known: the next entry read of each group is taken as it comes."""
        ids = [f"{ms}-{seq}" for ms, seq in self._groups.parse(position)]
        async with self._applied_cond:
            self._applied = ids
            self._seq = [0] * self._groups.count
            self._applied_cond.notify_all()

    async def _pump(self, group: int, block_ms: int | None) -> int:
        """Read and apply one batch of ``group``'s log entries after its applied id; returns how many."""
        generation = self._generation
        key = self._log_keys[group]
        reply: Any = await self._tail_r.xread({key: self._applied[group]}, count=READ_COUNT, block=block_ms)
        if not reply:
            return 0
        entries = reply[0][1]
        async with self._apply_lock:
            if generation != self._generation:  # rebuilt meanwhile: read again from the new position
                return 0
            last = _continued(self._seq[group], entries)
            if last is None:
                raise LogDiscontinuity(f"group {group}'s log does not continue from {self._applied[group]}")
            if len(entries) <= INLINE_APPLY_MAX:  # the live trickle: cheaper here than a thread hop
                self._apply_entries(entries)
            else:  # a catch-up or bulk load: keep the event loop free meanwhile
                await asyncio.to_thread(self._apply_entries, entries)
            self._seq[group] = last
            await self._set_applied(group, entries[-1][0].decode())
        return len(entries)

    async def _tail_group(self, group: int, stop: asyncio.Event) -> None:
        """Apply ``group``'s log as it grows; group 0's loop also watches the namespace's epoch and the
        logs going back (both rebuild the whole index). Ends once ``stop`` is set (also where redis-py
        swallowed the task's cancellation: checked at least every ``BLOCK_MS``)."""
        backoff = 0.1
        checked = time.monotonic()
        discontinued = False  # a rebuild is due (retried until it succeeds)
        while not stop.is_set():
            try:
                if discontinued:
                    if not await self._check_epoch():  # an emptied namespace numbers from 1 again
                        await self._rebuild_from_hashes()
                    discontinued = False
                if await self._pump(group, BLOCK_MS) == READ_COUNT and await self._log_gap(group):
                    log.error("replica fell behind the trimmed log; rebuilding from Redis")
                    await self._rebuild_from_hashes()
                if group == 0 and time.monotonic() - checked >= EPOCH_CHECK_S:
                    checked = time.monotonic()
                    await self._check_epoch()
                backoff = 0.1
            except LogDiscontinuity as exc:
                log.error("%s (emptied, entries lost in a failover, or trimmed); rebuilding", exc)
                discontinued = True
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if stop.is_set():
                    return
                log.warning("log tail lost Redis (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, TAIL_MAX_BACKOFF_S)
            except Exception:  # a bad entry: stay on it (the lag metric shows it) rather than skip it
                log.exception(
                    "could not apply log entries after %s; retrying in %.1fs", self._applied[group], backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, TAIL_MAX_BACKOFF_S)

    async def _catch_up(self) -> int:
        applied = 0
        for group in range(self._groups.count):
            try:
                while n := await self._pump(group, None):
                    applied += n
            except LogDiscontinuity as exc:  # the snapshot's log lost entries: start from the hashes
                log.error("%s; rebuilding from Redis", exc)
                await self._rebuild_from_hashes()
                return await self._catch_up()
        return applied

    async def wait_applied(self, position: str, timeout_s: float | None = None) -> bool:
        self._groups.parse(position)  # a ValueError here, not inside the wait
        async with self._applied_cond:
            try:
                await asyncio.wait_for(
                    self._applied_cond.wait_for(lambda: self._groups.reached(self._applied, position)),
                    timeout_s,
                )
            except TimeoutError:
                log.warning(
                    "log position %s not applied within %ss (applied %s)", position, timeout_s, self.applied
                )
                return False
        return True

    # ---------------------------------------------------------------------------------- log position

    async def _last_ids(self) -> list[str]:
        """Per group, the id of its log's last entry ("0-0" for none)."""
        pipe = self._r.pipeline(transaction=False)
        for key in self._log_keys:
            pipe.xrevrange(key, count=1)
        return [str(last[0][0].decode()) if last else ZERO for last in await pipe.execute()]

    async def last_position(self) -> str:
        """The position of every group's last log entry."""
        return self._groups.position(dict(enumerate(await self._last_ids())))

    async def _stream_info(self, group: int) -> dict[str, Any] | None:
        try:
            info: Any = await self._r.xinfo_stream(self._log_keys[group])
        except ResponseError:  # no stream yet
            return None
        return dict(info)

    async def _log_gap(self, group: int) -> bool:
        """True when entries after the group's applied id may have been trimmed from its stream:
        something was trimmed and the oldest entry kept is newer. (Conservative: if exactly the entry at
        the applied id went and nothing after it, this still says True and costs a rebuild, never a
        loss.)"""
        info = await self._stream_info(group)
        if info is None or info.get("entries-added") == info["length"]:
            return False  # no stream, or nothing was ever trimmed
        first = info["first-entry"][0] if info.get("first-entry") else info["last-generated-id"]
        return _stream_id(first) > parse_position(self._applied[group])

    async def _log_went_back(self) -> bool:
        """True when a group's log ends before what this index applied from it: the entries after its
        end were lost (a failover to a replica that had not received them: asynchronous replication)."""
        applied = list(self._applied)  # before the reads: other groups' tails apply meanwhile
        for group in range(self._groups.count):
            info = await self._stream_info(group)
            end = _stream_id(info["last-generated-id"]) if info is not None else (0, 0)
            if end < parse_position(applied[group]):
                return True
        return False

    async def replication(self) -> ReplicationStatus:
        lasts = await self._last_ids()
        applied = list(self._applied)
        pending, oldest_ms = 0, None
        for key, done, last in zip(self._log_keys, applied, lasts, strict=True):
            if parse_position(done) >= parse_position(last):
                continue
            behind: Any = await self._r.xrange(key, min="(" + done, count=1000)
            pending += len(behind)
            first_ms = parse_position(behind[0][0].decode())[0] if behind else int(time.time() * 1000)
            oldest_ms = first_ms if oldest_ms is None else min(oldest_ms, first_ms)
        lag = 0.0 if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000.0)
        position = self._groups.position(dict(enumerate(applied)))
        return ReplicationStatus(position, self._groups.position(dict(enumerate(lasts))), pending, lag)

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
        marker = {
            "position": position,
            "namespace": self.config.namespace,
            "epoch": self._epoch,
            "groups": self._groups.count,
        }
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
        self._stop = asyncio.Event()
        self._tail_tasks = [  # every group's tail at once, until stop_tail
            asyncio.create_task(
                self._tail_group(g, self._stop), name=f"memrec-log-tail-{self.config.namespace}-{g}"
            )
            for g in range(self._groups.count)
        ]
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
            if meta.get("groups", 1) != self._groups.count:
                raise SnapshotError(f"{source} was taken of {meta.get('groups', 1)} slot groups")
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
        await self._set_position(position)
        if any([await self._log_gap(g) for g in range(self._groups.count)]):
            log.warning("snapshot %s at %s is older than the trimmed log; rebuilding", source, position)
            return False
        if await self._log_went_back():
            log.warning("snapshot %s at %s is ahead of the log (entries lost); rebuilding", source, position)
            return False
        return True

    async def _check_epoch(self) -> bool:
        """Rebuild when the namespace was emptied while this replica ran (FLUSHDB, a Redis restart
        without persistence): memory ids restart at 1 there, and the log's new adds would be skipped as
        ids the index already holds. Also when a log ends before what this index applied. Returns
        whether it rebuilt."""
        epoch = await self._namespace_epoch()
        if epoch != self._epoch:
            log.error("the namespace was emptied or recreated in Redis; rebuilding the index from it")
            self._epoch = epoch
        elif await self._log_went_back():
            log.error("the log lost entries this replica applied (a failover); rebuilding from Redis")
        else:
            return False
        await self._rebuild_from_hashes()
        return True

    async def _namespace_epoch(self) -> str:
        """The namespace's epoch token, created by the first replica to ask (SET NX: one wins)."""
        key = self._p + layout.EPOCH
        await self._r.set(key, secrets.token_hex(8), nx=True)
        token = await self._r.get(key)
        return token.decode() if isinstance(token, bytes) else str(token)

    async def _rebuild_from_hashes(self) -> None:
        """Read every ``mem:{id}`` hash of each group between its eviction cursor and its id sequence;
        the log position is taken first so the replay afterwards covers every write that raced with the
        scan."""
        position = await self.last_position()
        index = self._new_index()
        parts: list[codec.Rows] = []
        for group, prefix in enumerate(self._groups.prefixes):
            low = int(await self._r.get(prefix + layout.MEM_LOW) or 1)
            seq = int(await self._r.get(prefix + layout.MEM_SEQ) or 0)
            for start in range(low, seq + 1, REBUILD_CHUNK):
                seqs = np.arange(start, min(start + REBUILD_CHUNK, seq + 1), dtype=np.int64)
                ids = (seqs * self._groups.count + group).tolist()  # groups.SlotGroups: id = seq * G + g
                pipe = self._r.pipeline(transaction=False)
                for mem_id in ids:
                    pipe.hmget(prefix + layout.MEM + str(mem_id), *layout.MEM_FIELDS)
                rows = [(i, r) for i, r in zip(ids, await pipe.execute(), strict=True) if r[0]]
                if rows:
                    parts.append(codec.decode_hashes(rows, self.config.dim, self.config.recent_width))
        if parts:
            await asyncio.to_thread(index.add, *codec.concat(parts))
        async with self._apply_lock:
            self.index = index
            self._generation += 1
            await self._set_position(position)
        log.info("rebuilt %d memories from Redis hashes (%d groups)", len(index), self._groups.count)
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
        """Stop every group's tail and wait until each has ended (none may use the clients after)."""
        tasks, self._tail_tasks = self._tail_tasks, []
        if not tasks:
            return
        self._stop.set()
        if self.config.redis_cluster:
            # The cluster client answers a read cancelled inside it by learning the slot map again, and
            # the node objects it replaces keep their sockets open: close them before cancelling.
            await drop_connections(self._tail_r)
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=0.5)
        if pending:  # a blocked read can miss the cancellation; closing its socket ends it
            await drop_connections(self._tail_r)
            _, pending = await asyncio.wait(pending, timeout=5.0)
        if pending:
            log.error("log tail did not stop")
        for task in tasks:
            if task.done() and not task.cancelled():
                task.result()


class LogDiscontinuity(Exception):
    """A group's log entries do not number on from the last one applied."""


def _continued(last: int, entries: list[Entry]) -> int | None:
    """The ``seq`` of the last of ``entries`` when they number on from ``last`` (0: not known; entries
    without one are not checked), else None."""
    for _, fields in entries:
        seq = fields.get(b"seq")
        if seq is None:
            continue
        if last and int(seq) != last + 1:
            return None
        last = int(seq)
    return last


def _stream_id(value: Any) -> tuple[int, int]:
    """An XINFO stream id (bytes or str) as a comparable (ms, seq)."""
    return parse_position(value.decode() if isinstance(value, bytes) else str(value))
