"""``RedisMemoryStore``: the ``MemoryStore`` API on Redis, and its write path.

Writes go through one Lua script per chunk (see ``layout``), so an interaction, its interaction log row,
its memory, the log entry, the dedup marker, the user's encoder state and any eviction commit atomically.
A namespace is split into slot groups (``groups``: one on a single Redis, several on a cluster); a write
is split by its users' groups, one script call per group and chunk, each in one hash slot. The calls into
one group run in order; the groups run at once. With ``redis_wait_replicas`` each group's calls are
followed, on their connection, by WAIT: the write is acknowledged only once that many Redis replicas
hold it, so a failover cannot lose it (``ReplicationTimeout`` otherwise: retry with the same event ids).
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
from redis.exceptions import AskError, MovedError, NoScriptError, RedisError

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
from memory_store.redis_store.connect import connect, node_client
from memory_store.redis_store.groups import SlotGroups, merged
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

Script = Any  # redis-py's registered (async) script: await script(keys=..., args=..., client=...)


class ReplicationTimeout(ConnectionError):
    """A write reached the master but not ``redis_wait_replicas`` replicas in time: a failover could
    still lose it. The service answers 503; a retry with the same event ids stores it once."""


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
        self._groups = SlotGroups.of(config.namespace, config.groups)
        self._p = self._groups.prefix(0)  # the catalogue's, epoch's and holders' group
        self._replica = Replica(config, self._groups, client, tail_client)
        self._user_memories = UserMemoryHashes(config, self._groups, client)
        self._nodes: dict[tuple[str, int], aioredis.Redis] = {}  # plain clients of cluster masters (WAIT)
        self._nodes_stale = False  # the slot map must be learnt again before the next WAIT write
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
        await store._check_groups()
        await store.restore()
        store._holding = asyncio.create_task(store._hold(), name="namespace-holder")
        return store

    async def _check_groups(self) -> None:
        """The namespace's slot groups are fixed when it is first opened: keys and memory ids depend on
        them. A store configured with another number refuses to open it."""
        key = self._p + layout.GROUPS
        await self._r.set(key, str(self._groups.count), nx=True)
        held = int(await self._r.get(key) or self._groups.count)
        if held != self._groups.count:
            await self.close()
            raise ValueError(
                f"namespace {self.config.namespace!r} is laid out in {held} slot groups, this store in "
                f"{self._groups.count} (slot_groups / redis_cluster): reindex it into a new namespace"
            )

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

    # ------------------------------------------------------------------------- script calls by group

    def _by_group(self, groups: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(group, the rows in it, in their order) for every group present in ``groups`` (n,)."""
        if self._groups.count == 1:
            return [(0, np.arange(groups.size))] if groups.size else []
        return [(int(g), np.flatnonzero(groups == g)) for g in np.unique(groups)]

    async def _calls(
        self, script: Script, calls: dict[int, list[list[Any]]], wait: bool = True
    ) -> dict[int, list[Any]]:
        """Each group's script calls (each atomic, in one slot), in order within the group; the groups at
        once (one group: no gather). Returns each group's replies. ``wait=False`` for reads."""
        groups = list(calls)
        if self.config.redis_cluster and not (wait and self.config.redis_wait_replicas):
            return await self._cluster_calls(script, calls)
        if len(groups) == 1:
            return {groups[0]: await self._group_calls(script, groups[0], calls[groups[0]], wait)}
        replies = await asyncio.gather(*(self._group_calls(script, g, calls[g], wait) for g in groups))
        return dict(zip(groups, replies, strict=True))

    async def _cluster_calls(self, script: Script, calls: dict[int, list[list[Any]]]) -> dict[int, list[Any]]:
        """Every group's calls in one cluster pipeline: the client sends each master the calls of its
        groups in order on one connection, all masters at once, and follows MOVED/ASK. A master without
        the script (restarted, or a promoted replica) fails all of its calls with NOSCRIPT and ran none of
        them: those are sent again, in order, once the script is loaded on every master."""
        order = [(g, args) for g, group_calls in calls.items() for args in group_calls]
        replies: list[Any] = [None] * len(order)
        todo = list(range(len(order)))
        for attempt in range(2):
            pipe: Any = self._r.pipeline(transaction=False)
            for i in todo:
                g, args = order[i]
                pipe.evalsha(script.sha, 1, self._groups.prefix(g) + layout.LOG, *args)
            results = await pipe.execute(raise_on_error=False)
            missing = []
            for i, result in zip(todo, results, strict=True):
                if isinstance(result, NoScriptError) and attempt == 0:
                    missing.append(i)
                elif isinstance(result, Exception):
                    raise result
                else:
                    replies[i] = result
            if not missing:
                break
            await self._r.script_load(script.script)  # on every master
            todo = missing
        out: dict[int, list[Any]] = {g: [] for g in calls}
        for (g, _), reply in zip(order, replies, strict=True):
            out[g].append(reply)
        return out

    async def _group_calls(
        self, script: Script, group: int, calls: list[list[Any]], wait_replicas: bool = True
    ) -> list[Any]:
        """One group's calls in order, ``PIPELINE_DEPTH`` per round trip; then WAIT on that connection
        when the config asks replicas to acknowledge writes. KEYS[1], the group's log, routes the call
        to the master of the group's slot (a script's shebang makes Redis refuse any key outside it)."""
        keys = [self._groups.prefix(group) + layout.LOG]
        wait = self.config.redis_wait_replicas if wait_replicas else 0
        if len(calls) == 1 and not wait:  # one round trip, no pipeline
            return [await script(keys=keys, args=calls[0])]
        client = await self._node_of(keys[0]) if self.config.redis_cluster else self._r
        out: list[Any] = []
        try:
            for s in range(0, len(calls), PIPELINE_DEPTH):
                async with client.pipeline(transaction=False) as pipe:  # released on every path
                    for args in calls[s : s + PIPELINE_DEPTH]:
                        await script(keys=keys, args=args, client=pipe)
                    if wait:
                        pipe.wait(wait, self.config.redis_wait_timeout_ms)
                    replies = await pipe.execute()
                if wait and (acked := int(replies.pop())) < wait:
                    raise ReplicationTimeout(
                        f"a write reached {acked} of {wait} Redis replicas within "
                        f"{self.config.redis_wait_timeout_ms} ms; retry it with the same event ids"
                    )
                out += replies
        except (RedisError, OSError) as exc:
            if self.config.redis_cluster:  # a failover or a moved slot: learn the map again
                self._forget_nodes()
                if isinstance(exc, (MovedError, AskError)):
                    raise ConnectionError(f"the cluster's slots moved during a write: {exc}") from exc
            raise
        return out

    async def _node_of(self, key: str) -> aioredis.Redis:
        """A plain client of the master that serves ``key`` (the cluster client's slot map)."""
        cluster: Any = self._r
        if self._nodes_stale:
            self._nodes_stale = False
            await cluster.nodes_manager.initialize()
        node = cluster.get_node_from_key(key)
        where = (node.host, int(node.port))
        if where not in self._nodes:
            self._nodes[where] = node_client(self.config, *where)
        return self._nodes[where]

    def _forget_nodes(self) -> None:
        self._nodes_stale = True

    # ------------------------------------------------------------------------------------ write path

    async def _run_writes(
        self,
        mode: str,
        events: Sequence[Interaction],
        batch: MemoryBatch | None,
        states: UserStates | None = None,
    ) -> IngestResult:
        """Chunked script calls (each atomic) per slot group. A group's users' states go with its last
        chunk: its script checks each one against the history all chunks made."""
        n = len(batch) if batch is not None else len(events)
        users = batch.users if batch is not None else tuple(ev.user_id for ev in events)
        state_groups = self._groups.of_users(states.users) if states is not None else np.zeros(0, np.int64)
        calls: dict[int, list[list[Any]]] = {}
        rows_of: dict[int, list[np.ndarray]] = {}
        for group, rows in self._by_group(self._groups.of_users(users)):
            starts = range(0, rows.size, WRITE_CHUNK)
            for s in starts:
                part = rows[s : s + WRITE_CHUNK]
                last = s == starts[-1]
                in_group = np.flatnonzero(state_groups == group)
                group_states = states.select(in_group) if states is not None and last else None
                args = codec.write_args(
                    self._groups.prefix(group),
                    self.config,
                    mode,
                    [events[i] for i in part.tolist()] if events else [],
                    batch.take(part) if batch is not None else None,
                    group_states,
                    group,
                )
                calls.setdefault(group, []).append(args)
                rows_of.setdefault(group, []).append(part)
        memory_ids = np.full(n, -1, np.int64)
        accepted, ends = 0, dict[int, str]()
        for group, replies in (await self._calls(self._write_script, calls)).items():
            for part, reply in zip(rows_of[group], replies, strict=True):
                add_id, del_id, first, acc = reply
                acc_rows = part[np.asarray(acc, np.int64) - 1]  # Lua indices are 1-based per chunk
                accepted += int(acc_rows.size)
                if "m" in mode and acc_rows.size:
                    memory_ids[acc_rows] = int(first) + np.arange(acc_rows.size) * self._groups.count
                ends[group] = _latest(ends.get(group, ""), _latest(add_id.decode(), del_id.decode()))
        position = self._position(ends)
        await self._see(position)
        await self._expire()
        return IngestResult(accepted, n - accepted, memory_ids, position)

    def _position(self, ends: dict[int, str]) -> str:
        """The position of the groups' last log entries written ("" when none was)."""
        written = {g: end for g, end in ends.items() if end}
        return self._groups.position(written) if written else ""

    async def _expire(self) -> None:
        """Retention by age (memory_store.retention): when a sweep is due, the memories this replica's
        index holds with a timestamp before the cutoff go, through ``EXPIRE_SCRIPT``."""
        cutoff = self._age_sweep.due()
        if cutoff is None:
            return
        ids = self._replica.index.older_than(cutoff)
        calls = {
            group: [
                [self._groups.prefix(group), self.config.stream_maxlen, repr(cutoff), *part]
                for part in _chunks(ids[rows].tolist(), EXPIRE_CHUNK)
            ]
            for group, rows in self._by_group(self._groups.of_memories(ids))
        }
        replies = await self._calls(self._expire_script, calls)
        await self._see(self._position({g: _last_entry(r, 1) for g, r in replies.items()}))

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
        calls: dict[int, list[list[Any]]] = {}
        for group, rows in self._by_group(self._groups.of_users(checked.users)):
            prefix = self._groups.prefix(group)
            calls[group] = [
                codec.put_states_args(prefix, self.config, checked.select(rows[s : s + STATES_CHUNK]))
                for s in range(0, rows.size, STATES_CHUNK)
            ]
        replies = await self._calls(self._put_states_script, calls)
        return sum(int(kept) for group in replies.values() for kept in group)

    async def add_memories(self, batch: MemoryBatch) -> IngestResult:
        return await self._run_writes("m", [], batch.validated(self.dim, self.config.recent_width))

    async def remove_memories(self, ids: Sequence[int] | np.ndarray) -> int:
        unique = np.unique(check_ids(ids))
        if not unique.size:
            return 0
        by_group = self._by_group(self._groups.of_memories(unique))
        if len(by_group) > 1:  # each group's script checks its own ids: check all before any goes
            pipe = self._r.pipeline(transaction=False)
            for mem_id in unique.tolist():
                pipe.exists(self._groups.prefix(mem_id % self._groups.count) + layout.MEM + str(mem_id))
            missing = [m for m, held in zip(unique.tolist(), await pipe.execute(), strict=True) if not held]
            if missing:
                raise ValueError(f"unknown memory id {missing[0]}; nothing was removed")
        calls = {
            group: [[self._groups.prefix(group), self.config.stream_maxlen, *unique[rows].tolist()]]
            for group, rows in by_group
        }
        ends = {}
        for group, (reply,) in (await self._calls(self._remove_script, calls)).items():
            status, value = reply[0].decode(), reply[1].decode()
            if status == "missing":
                raise ValueError(f"unknown memory id {value}; nothing was removed")
            ends[group] = value
        await self._see(self._position(ends))
        return int(unique.size)

    async def _see(self, position: str) -> None:
        """With ``read_your_writes``, wait until this replica has applied the log up to ``position``."""
        if position and self.config.read_your_writes:
            await self.wait_applied(position, self.config.visibility_timeout_s)

    # ------------------------------------------------------------------------------------- catalogue

    async def set_available(self, items: Sequence[int] | np.ndarray, available: bool) -> int:
        unique = np.unique(check_items(items)).tolist()
        head = [self._p, self.config.stream_maxlen, "1" if available else "0"]
        calls = [head + part for part in _chunks(unique, CATALOGUE_CHUNK)]
        replies = (await self._calls(self._availability_script, {0: calls}))[0] if calls else []
        await self._see(self._position({0: _last_entry(replies, 1)}))
        return sum(int(count) for count, _ in replies)

    async def unavailable_items(self) -> np.ndarray:
        return self._replica.catalogue.unavailable()

    async def register_items(self, external_ids: Sequence[str]) -> list[int]:
        names = check_external_items(external_ids)
        known = self._replica.catalogue.new_items()
        if all(name in known for name in names):  # the common case: no round trip
            return [known[name] for name in names]
        head = [self._p, str(self.config.stream_maxlen), str(self.config.first_new_item)]
        calls = [head + part for part in _chunks(names, CATALOGUE_CHUNK)]
        replies = (await self._calls(self._register_script, {0: calls}))[0]
        await self._see(self._position({0: _last_entry(replies, 0)}))
        return [int(i) for _, chunk_ids in replies for i in chunk_ids]

    async def new_items(self) -> Mapping[str, int]:
        return self._replica.catalogue.new_items()

    async def erase_user(self, user_id: str) -> Erasure:
        check_user_id(user_id)
        # Memories written before ``byuser`` was kept for every capacity are found in this replica's
        # index, once it has applied the log as it stands now (the script checks each one's user).
        now = await self._replica.last_position()
        await self._replica.wait_applied(now, self.config.visibility_timeout_s)
        group = self._groups.of_user(user_id)
        legacy = await asyncio.to_thread(self._replica.index.ids_of_user, user_id)
        legacy = legacy[self._groups.of_memories(legacy) == group]  # a user's memories are in their group
        prefix, retention = self._groups.prefix(group), codec.retention_ms(self.config)
        head = [prefix, self.config.stream_maxlen, retention, user_id]
        replies = await self._calls(self._erase_script, {group: [[*head, *legacy.tolist()]]})
        history, memories, umem, markers, entry, logged = replies[group][0]
        position = self._position({group: entry.decode()})
        await self._see(position)
        return Erasure(int(history), int(memories), int(umem), int(markers), position, int(logged))

    async def interactions(self, after: str = "", count: int = 10_000) -> LoggedInteractions:
        check_log_page(after, count, self._groups.parse_row)
        starts = self._groups.starts_after(after)  # per group, in (stream id, group) order
        if self.config.log_retention_s is not None:  # rows past the retention that no write trimmed yet
            oldest = (await self._server_ms() - codec.retention_ms(self.config), 0)
            starts = [
                f"{oldest[0]}-0" if s == "-" or parse_position(s.lstrip("(")) < oldest else s for s in starts
            ]
        pipe = self._r.pipeline(transaction=False)
        for prefix, start in zip(self._groups.prefixes, starts, strict=True):
            pipe.xrange(prefix + layout.INTERACTIONS, start, "+", count)
        rows = merged(enumerate(await pipe.execute()), count)
        positions = [self._groups.row_position(entry[0].decode(), g) for g, entry in rows]
        return codec.decode_interactions([entry for _, entry in rows], positions)

    async def _server_ms(self) -> int:
        """Redis's clock in ms (the clock the log's entry ids and its trim use): group 0's master's."""
        if self.config.redis_cluster:
            node: Any = await self._node_of(self._p + layout.LOG)
            seconds, micros = await node.time()
        else:
            seconds, micros = await self._r.time()
        return int(seconds) * 1000 + int(micros) // 1000

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
            pipe.lrange(self._user_prefix(user) + layout.HIST + user, -max_len, -1)
        return [[int(x) for x in items] for items in await pipe.execute()]

    def _user_prefix(self, user: str) -> str:
        return self._groups.prefix(self._groups.of_user(user))

    async def histories_with_states(self, user_ids: Sequence[str], max_len: int) -> StoredHistories:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        window = self.config.state_window
        for user in user_ids:
            check_user_id(user)
        if not user_ids:
            return StoredHistories([], [])
        # one script call per group (atomic too, but the fingerprint check below would catch a state of
        # another history anyway: a state is returned only where it encodes the items read)
        width = max(max_len, window)
        groups = self._by_group(self._groups.of_users(user_ids))
        calls = {
            g: [[self._groups.prefix(g), width, *(user_ids[i] for i in rows.tolist())]] for g, rows in groups
        }
        read = await self._calls(self._read_script, calls, wait=False)
        replies: list[Any] = [None] * (2 * len(user_ids))
        for group, rows in groups:
            for j, i in enumerate(rows.tolist()):
                replies[2 * i : 2 * i + 2] = read[group][0][2 * j : 2 * j + 2]
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

    async def put_user_memories(self, memories: Sequence[um.UserMemories]) -> int:
        return await self._user_memories.put(memories)

    async def record_user_memory_access(self, user_id: str, items: Sequence[int], ts: float) -> int:
        return await self._user_memories.record_access(user_id, items, ts)

    # ---------------------------------------------------------------------------- replica (the index)

    async def wait_applied(self, position: str, timeout_s: float | None = None) -> bool:
        return await self._replica.wait_applied(position, timeout_s)

    async def replication(self) -> ReplicationStatus:
        return await self._replica.replication()

    async def stats(self) -> StoreStats:
        pipe = self._r.pipeline(transaction=False)
        for prefix in self._groups.prefixes:
            pipe.get(prefix + layout.MEM_COUNT)
        counts = await pipe.execute()
        index = self._replica.index
        return StoreStats(
            backend="redis-cluster" if self.config.redis_cluster else "redis",
            namespace=self.config.namespace,
            memories=sum(int(c or 0) for c in counts),
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
        for node in self._nodes.values():
            await node.aclose()
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
        for pattern in self._groups.patterns:
            batch: list[bytes] = []
            async for key in self._r.scan_iter(match=pattern, count=1000):
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


def _chunks(values: list[Any], size: int) -> list[list[Any]]:
    return [values[s : s + size] for s in range(0, len(values), size)]


def _last_entry(replies: list[Any], field: int) -> str:
    """The latest log entry id among script replies whose ``field`` is one ("" for none)."""
    position = ""
    for reply in replies:
        position = _latest(position, reply[field].decode())
    return position
