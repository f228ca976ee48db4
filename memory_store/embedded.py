"""The embedded backend: the whole store in this process, persisted to ``data_dir/{namespace}/``.

Every write is decided first (dedup, id allocation, evictions), written to the append-only log as one
record, then applied to memory by the same function that replays the log at start-up, so a restart
reproduces exactly the state that was acknowledged. ``snapshot()`` writes the full state and drops the
log segments it covers; opening loads the snapshot, then replays the log after the snapshot's position.

Directory layout::

    {data_dir}/{namespace}/LOCK          flock held by the one process that owns the directory
    {data_dir}/{namespace}/log/          AppendLog segments (memory_store.wal)
    {data_dir}/{namespace}/interactions/ the interaction log (memory_store.interaction_log), written as
                                         ``write`` records are applied; snapshots leave it alone
    {data_dir}/{namespace}/snapshot/     index.faiss, meta.npz, users.json, meta.json, state.json, umem.npz,
                                         states.npz (+ states.json: their users)

Log records: ``write`` (events, memories, the users' encoder states and, for logged events, what the
interaction log keeps of them), ``states`` (encoder states of histories already stored), ``remove``
(memories), ``umem`` (a user's per-user memories), ``avail`` (items made (un)available), ``items`` (new
items registered), ``erase`` (a user erased), ``bank`` (the bank's bulk load completed). ``state.json``
holds histories, dedup markers and their users, the catalogue (``memory_store.catalogue``) and the bank
flag.

Internally synchronous under one lock; the async methods run it in a worker thread. Searches only take
the index's read lock, so they proceed while a write waits for its turn.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import shutil
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
    StoreInUse,
    StoreStats,
    check_events,
    check_external_items,
    check_ids,
    check_items,
    check_k,
    check_log_page,
    check_observations,
    check_user_id,
    check_user_memories,
    memory_batch_for_events,
    normalise_rows,
)
from memory_store.catalogue import Catalogue
from memory_store.config import StoreConfig
from memory_store.index import MemoryIndex, followers_now, search_now
from memory_store.interaction_log import InteractionLog
from memory_store.retention import AgeSweep
from memory_store.snapshot import savez, snapshot_file
from memory_store.states import (
    FINGERPRINT_BYTES,
    StoredHistories,
    UserStates,
    checked_states,
    fingerprint,
    unpack_valid,
)
from memory_store.transitions import Followers
from memory_store.wal import AppendLog, Record

log = logging.getLogger(__name__)

_SEEN_PRUNE_EVERY = 10_000


def _position(lsn: int) -> str:
    return f"0-{lsn}"


class EmbeddedMemoryStore:
    """``MemoryStore`` without a server. Open with :meth:`open` (one process per directory)."""

    def __init__(self, config: StoreConfig, root: Path) -> None:
        self.config = config
        self._root = root
        self._lock_file = (root / "LOCK").open("a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock_file.close()
            raise StoreInUse(f"{root} is in use by another process") from exc
        self._log = AppendLog(root / "log", fsync=config.fsync)
        self._interactions = InteractionLog(
            root / "interactions", config.fsync, config.log_retention_s, self._log.last_lsn
        )
        self._write_lock = threading.RLock()
        self._age_sweep = AgeSweep(config.max_age_s)
        self._reset_state()

    def _reset_state(self) -> None:
        self._index = MemoryIndex(self.config.dim, self.config.index, self.config.recent_width)
        self._hist: dict[str, deque[int]] = {}
        self._states: dict[str, bytes] = {}  # user -> packed encoder state (memory_store.states.pack)
        self._seen: dict[str, float] = {}  # event id -> expiry (unix seconds)
        self._user_events: dict[str, set[str]] = {}  # user -> their event ids in _seen (for erasure)
        self._umem: dict[str, um.UserMemories] = {}
        self._by_user: dict[str, deque[int]] = {}  # kept only with a per-user capacity
        self._catalogue = Catalogue()
        self._bank_loaded = False
        self._next_id = 1
        self._applied = 0
        self._writes_since_prune = 0

    @classmethod
    async def open(cls, config: StoreConfig) -> EmbeddedMemoryStore:
        assert config.data_dir is not None  # StoreConfig guarantees it without a redis_url
        root = Path(config.data_dir) / config.namespace
        root.mkdir(parents=True, exist_ok=True)
        store = cls(config, root)
        await store.restore()
        return store

    @property
    def dim(self) -> int:
        return self.config.dim

    # ------------------------------------------------------------------------------------ apply (log)

    def _apply(self, record: Record) -> None:
        """Apply one log record; used for live writes and for replay alike."""
        if record.op == "write":
            self._apply_write(record.meta, record.arrays, record.lsn)
        elif record.op == "states":
            self._apply_states(record.meta, record.arrays)
        elif record.op == "remove":
            self._drop_memories(record.arrays["ids"])
        elif record.op == "umem":
            self._apply_umem(record.meta, record.arrays)
        elif record.op == "avail":
            self._catalogue.set_available(record.arrays["items"].tolist(), bool(record.meta["available"]))
        elif record.op == "items":
            self._catalogue.register(dict(zip(record.meta["names"], record.meta["ids"], strict=True)))
        elif record.op == "erase":
            self._apply_erase(record.meta["user"], record.arrays["ids"], record.lsn)
        elif record.op == "bank":
            self._bank_loaded = True
        else:
            raise ValueError(f"unknown log record op {record.op!r} at lsn {record.lsn}")
        self._applied = record.lsn

    def _apply_write(self, meta: dict[str, Any], arrays: dict[str, np.ndarray], lsn: int) -> None:
        expiry = float(meta["seen_expiry"])
        for event_id in meta["event_ids"]:
            self._seen[event_id] = expiry
        # whose each event id is (absent from logs written before erasure existed: none known)
        for event_id, user in zip(meta["event_ids"], meta.get("event_users", ()), strict=False):
            self._user_events.setdefault(user, set()).add(event_id)
        for user, item in zip(meta["hist_users"], arrays["hist_items"].tolist(), strict=True):
            self._hist.setdefault(user, deque(maxlen=self.config.history_len)).append(int(item))
        for user in meta["hist_users"]:  # appended to: a state is kept only if the write brings one
            self._states.pop(user, None)
        self._apply_states(meta, arrays)  # absent from logs written before states existed: none
        ids = arrays["mem_ids"]
        if ids.size:
            batch = MemoryBatch(
                keys=arrays["keys"],
                items=arrays["items"],
                users=tuple(meta["mem_users"]),
                timestamps=arrays["ts"],
                prefix_lens=arrays["plens"],
                # a log written before memories kept their prefix's last items: none known (the index
                # fits the prefix items of any width to the store's)
                recent=arrays.get("recent", np.zeros((ids.size, 0), np.int64)),
            )
            self._index.add(ids, batch)
            self._next_id = max(self._next_id, int(ids.max()) + 1)
            if self.config.user_capacity is not None:
                for mem_id, user in zip(ids.tolist(), batch.users, strict=True):
                    self._by_user.setdefault(user, deque()).append(mem_id)
        self._drop_memories(arrays["evicted"])
        if meta.get("logged"):  # absent from logs written before the interaction log existed
            self._interactions.append(
                lsn,
                meta["accepted_at"],
                meta["hist_users"],
                arrays["hist_items"],
                arrays["hist_ts"],
                meta["hist_events"],
            )

    def _apply_states(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Keep each given state whose window is its user's history's last items now."""
        for user, blob in zip(meta.get("state_users", ()), arrays.get("state_blobs", ()), strict=True):
            if self._state_fits(user, blob.tobytes()):
                self._states[user] = blob.tobytes()

    def _state_fits(self, user: str, blob: bytes) -> bool:
        window = self._window(user)
        return bool(window) and blob[:FINGERPRINT_BYTES] == fingerprint(window)

    def _window(self, user: str) -> list[int]:
        """The user's last ``state_window`` history items (what a kept state encodes)."""
        held = self._hist.get(user, ())
        return list(held)[-self.config.state_window :] if self.config.state_window else []

    def _drop_memories(self, ids: np.ndarray) -> None:
        if not ids.size:
            return
        if self.config.user_capacity is not None:
            for mem_id, user in zip(ids.tolist(), self._index.users_of(ids), strict=True):
                held = self._by_user.get(user)
                if held is not None and mem_id in held:
                    held.remove(mem_id)
        self._index.remove(ids)

    def _apply_erase(self, user: str, ids: np.ndarray, lsn: int) -> int:
        """Everything of ``user`` goes: history, the memories ``ids`` (with their transition counts),
        per-user memories, dedup markers and the interaction log rows written before the erasure
        (``lsn``); returns how many of those there were."""
        self._hist.pop(user, None)
        self._states.pop(user, None)
        self._drop_memories(ids)
        self._by_user.pop(user, None)
        self._umem.pop(user, None)
        for event_id in self._user_events.pop(user, ()):
            self._seen.pop(event_id, None)
        return self._interactions.erase(user, lsn)

    def _apply_umem(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._umem[meta["user"]] = um.UserMemories(
            user_id=meta["user"],
            items=arrays["items"],
            vectors=arrays["vectors"],
            freq=arrays["freq"],
            access_count=arrays["access"],
            last_access=arrays["last"],
            first_seen=arrays["first"],
        )

    def _commit(self, op: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> int:
        lsn = self._log.append(op, meta, arrays)
        self._apply(Record(lsn=lsn, op=op, meta=meta, arrays=arrays))
        return lsn

    # ------------------------------------------------------------------------------------ write path

    def _dedup(self, events: Sequence[Interaction]) -> np.ndarray:
        """Bool (n,) of events accepted: not seen before, and not repeated earlier in this batch."""
        now = time.time()
        self._writes_since_prune += len(events)
        if self._writes_since_prune >= _SEEN_PRUNE_EVERY:
            self._seen = {e: t for e, t in self._seen.items() if t > now}
            self._user_events = {
                u: held for u, evs in self._user_events.items() if (held := evs & self._seen.keys())
            }
            self._writes_since_prune = 0
        accepted = np.ones(len(events), bool)
        batch_ids: set[str] = set()
        for i, ev in enumerate(events):
            if ev.event_id is None:
                continue
            if self._seen.get(ev.event_id, 0.0) > now or ev.event_id in batch_ids:
                accepted[i] = False
            batch_ids.add(ev.event_id)
        return accepted

    def _evictions(self, new_ids: np.ndarray, users: tuple[str, ...]) -> np.ndarray:
        """Ids to evict so both capacities hold after adding ``new_ids`` (oldest first)."""
        evicted: list[int] = []
        if self.config.user_capacity is not None:
            cap = self.config.user_capacity
            pending: dict[str, list[int]] = {}
            for mem_id, user in zip(new_ids.tolist(), users, strict=True):
                pending.setdefault(user, []).append(mem_id)
            for user, fresh in pending.items():
                held = list(self._by_user.get(user, ())) + fresh
                evicted.extend(held[: max(0, len(held) - cap)])
        if self.config.capacity is not None:
            excess = len(self._index) + int(new_ids.size) - len(evicted) - self.config.capacity
            if excess > 0:
                chosen = set(evicted)
                old = [i for i in self._index.oldest(excess + len(chosen)).tolist() if i not in chosen]
                old += [i for i in new_ids.tolist() if i not in chosen]
                evicted.extend(old[:excess])
        return np.asarray(evicted, np.int64)

    def _write(
        self,
        events: Sequence[Interaction],
        batch: MemoryBatch | None,
        states: UserStates | None = None,
        logged: bool = False,
    ) -> IngestResult:
        """One logged write: accepted events go to histories (and with ``logged`` to the interaction
        log), their rows of ``batch`` become memories, and ``states`` are kept where they fit the
        histories then (``_apply_states``)."""
        accepted = self._dedup(events) if events else np.ones(len(batch or ()), bool)
        rows = np.flatnonzero(accepted)
        n_mem = int(rows.size) if batch is not None else 0
        mem_ids = np.arange(self._next_id, self._next_id + n_mem, dtype=np.int64)
        mem = batch.take(rows) if batch is not None else None
        out_ids = np.full(accepted.shape[0], -1, np.int64)
        if mem is not None:
            out_ids[rows] = mem_ids
        accepted_events = [events[int(i)] for i in rows] if events else []
        meta = {
            "event_ids": [ev.event_id for ev in accepted_events if ev.event_id is not None],
            "event_users": [ev.user_id for ev in accepted_events if ev.event_id is not None],
            "seen_expiry": time.time() + self.config.dedup_ttl_s,
            "hist_users": [ev.user_id for ev in accepted_events],
            "mem_users": list(mem.users) if mem is not None else [],
            "state_users": list(states.users) if states is not None else [],
        }
        arrays = {
            "hist_items": np.asarray([ev.item_id for ev in accepted_events], np.int64),
            "mem_ids": mem_ids,
            "keys": mem.keys if mem is not None else np.zeros((0, self.dim), np.float32),
            "items": mem.items if mem is not None else np.zeros(0, np.int64),
            "ts": mem.timestamps if mem is not None else np.zeros(0, np.float64),
            "plens": mem.prefix_lens if mem is not None else np.zeros(0, np.int32),
            "recent": mem.recent if mem is not None else np.zeros((0, self.config.recent_width), np.int64),
            "evicted": self._evictions(mem_ids, mem.users if mem is not None else ()),
            "state_blobs": _packed(states, self.dim),
        }
        if logged:  # what the interaction log needs besides the histories' users and items
            meta.update(logged=True, accepted_at=time.time())
            meta["hist_events"] = [ev.event_id for ev in accepted_events]
            arrays["hist_ts"] = np.asarray([ev.timestamp for ev in accepted_events], np.float64)
        n_acc = int(rows.size)
        if not n_acc:
            return IngestResult(0, len(events), out_ids, "")
        lsn = self._commit("write", meta, arrays)
        self._expire()
        return IngestResult(n_acc, accepted.shape[0] - n_acc, out_ids, _position(lsn))

    def _expire(self) -> None:
        """Retention by age (memory_store.retention): when a sweep is due, the memories older than
        ``max_age_s`` go as one ``remove`` record."""
        cutoff = self._age_sweep.due()
        if cutoff is None:
            return
        ids = self._index.older_than(cutoff)
        if ids.size:
            self._commit("remove", {}, {"ids": ids})

    def _put_states(self, states: UserStates) -> int:
        """Log and keep the states that fit their users' histories now."""
        blobs = _packed(states, self.dim)
        fits = [i for i, u in enumerate(states.users) if self._state_fits(u, blobs[i].tobytes())]
        if fits:
            meta = {"state_users": [states.users[i] for i in fits]}
            self._commit("states", meta, {"state_blobs": blobs[fits]})
        return len(fits)

    def _remove(self, ids: np.ndarray) -> int:
        ids = np.unique(ids)
        unknown = ids[~self._index.contains(ids)]
        if unknown.size:
            raise ValueError(f"unknown memory ids: {unknown[:10].tolist()}")
        if ids.size:
            self._commit("remove", {}, {"ids": ids})
        return int(ids.size)

    def _set_available(self, items: np.ndarray, available: bool) -> int:
        unique = dict.fromkeys(items.tolist())
        changed = [i for i in unique if self._catalogue.is_unavailable(i) == available]
        if changed:
            self._commit("avail", {"available": available}, {"items": np.asarray(changed, np.int64)})
        return len(changed)

    def _register(self, names: list[str]) -> list[int]:
        known = self._catalogue.new_items()
        fresh: dict[str, int] = {}
        next_id = self._catalogue.next_new_item(self.config.first_new_item)
        for name in names:
            if name not in known and name not in fresh:
                fresh[name] = next_id
                next_id += 1
        if fresh:
            self._commit("items", {"names": list(fresh), "ids": list(fresh.values())}, {})
        known = self._catalogue.new_items()
        return [known[name] for name in names]

    def _erase(self, user: str) -> Erasure:
        ids = self._index.ids_of_user(user)
        history = len(self._hist.get(user, ()))
        umem = self._umem.get(user)
        events = self._user_events.get(user, set())
        n_umem = len(umem) if umem is not None else 0
        if not (ids.size or history or umem is not None or events):
            return Erasure(0, 0, 0, 0)
        now = time.time()
        live = sum(self._seen.get(e, 0.0) > now for e in events)  # markers not expired (as Redis counts)
        lsn = self._log.append("erase", {"user": user}, {"ids": ids})  # _commit, with the apply's count
        logged = self._apply_erase(user, ids, lsn)
        self._applied = lsn
        return Erasure(history, int(ids.size), n_umem, live, _position(lsn), logged)

    def _mark_bank_loaded(self) -> None:
        if not self._bank_loaded:
            self._commit("bank", {}, {})

    def _user_memory_commit(self, entries: um.UserMemories) -> None:
        arrays = {
            "items": entries.items,
            "vectors": entries.vectors,
            "freq": entries.freq,
            "access": entries.access_count,
            "last": entries.last_access,
            "first": entries.first_seen,
        }
        self._commit("umem", {"user": entries.user_id}, arrays)

    def _update_user_memories(
        self, user_id: str, items: np.ndarray, vectors: np.ndarray, ts: np.ndarray
    ) -> list[int]:
        current = self._umem.get(user_id) or um.UserMemories.empty(user_id, self.dim)
        merged, evicted = um.merge_observations(
            current, items, vectors, ts, self.config.user_memory_capacity, self.config.quality
        )
        self._user_memory_commit(merged)
        return evicted

    def _put_user_memories(self, memories: Sequence[um.UserMemories]) -> int:
        fresh = [m for m in memories if len(m) and not len(self._umem.get(m.user_id, ()))]
        for entries in fresh:
            self._user_memory_commit(entries)
        return len(fresh)

    def _record_access(self, user_id: str, items: Sequence[int], ts: float) -> int:
        current = self._umem.get(user_id)
        if current is None:
            return 0
        touched, hits = um.record_access(current, items, ts)
        if hits:
            self._user_memory_commit(touched)
        return hits

    # ------------------------------------------------------------------------------------- async API

    async def _locked(self, fn: Any, *args: Any) -> Any:
        def run() -> Any:
            with self._write_lock:
                return fn(*args)

        return await asyncio.to_thread(run)

    async def append_interactions(
        self, events: Sequence[Interaction], states: UserStates | None = None, logged: bool = True
    ) -> IngestResult:
        check_events(events)
        result: IngestResult = await self._locked(
            self._write, list(events), None, self._checked(states), logged
        )
        return result

    async def ingest(
        self,
        events: Sequence[Interaction],
        keys: np.ndarray,
        prefix_lens: Sequence[int] | np.ndarray,
        recent: np.ndarray | None = None,
        states: UserStates | None = None,
        logged: bool = True,
    ) -> IngestResult:
        batch = memory_batch_for_events(events, keys, prefix_lens, self.dim, self.config.recent_width, recent)
        result: IngestResult = await self._locked(
            self._write, list(events), batch, self._checked(states), logged
        )
        return result

    def _checked(self, states: UserStates | None) -> UserStates | None:
        return checked_states(states, self.dim, self.config.state_window)

    async def put_states(self, states: UserStates) -> int:
        checked = self._checked(states)
        if checked is None:
            return 0
        kept: int = await self._locked(self._put_states, checked)
        return kept

    async def add_memories(self, batch: MemoryBatch) -> IngestResult:
        batch = batch.validated(self.dim, self.config.recent_width)
        result: IngestResult = await self._locked(self._write, [], batch)
        return result

    async def remove_memories(self, ids: Sequence[int] | np.ndarray) -> int:
        removed: int = await self._locked(self._remove, check_ids(ids))
        return removed

    async def histories(self, user_ids: Sequence[str], max_len: int) -> list[list[int]]:
        users = _checked_reads(user_ids, max_len)
        out: list[list[int]] = await self._locked(
            lambda: [list(self._hist.get(u, ()))[-max_len:] for u in users]
        )
        return out

    async def histories_with_states(self, user_ids: Sequence[str], max_len: int) -> StoredHistories:
        users = _checked_reads(user_ids, max_len)
        out: StoredHistories = await self._locked(self._read_with_states, users, max_len)
        return out

    def _read_with_states(self, users: list[str], max_len: int) -> StoredHistories:
        """The histories of ``users`` and the kept states that encode their last items (under the lock:
        one consistent read)."""
        histories = [list(self._hist.get(u, ()))[-max_len:] for u in users]
        states = [unpack_valid(self._states.get(u), self._window(u), self.dim) for u in users]
        return StoredHistories(histories, states)

    async def search(self, queries: np.ndarray, k: int, with_keys: bool = False) -> SearchResult:
        check_k(k)
        unit = normalise_rows(queries, self.dim, "queries")
        return await search_now(self._index, unit, k, with_keys)

    async def followers(self, items: Sequence[int]) -> list[Followers]:
        return await followers_now(self._index, items)

    async def predecessors(self, first: int) -> dict[int, Followers]:
        return self._index.predecessors(first)

    async def update_user_memories(
        self,
        user_id: str,
        items: Sequence[int] | np.ndarray,
        vectors: np.ndarray,
        timestamps: Sequence[float] | np.ndarray,
    ) -> list[int]:
        it, vec, ts = check_observations(user_id, items, vectors, timestamps, self.dim)
        evicted: list[int] = await self._locked(self._update_user_memories, user_id, it, vec, ts)
        return evicted

    async def user_memories(self, user_ids: Sequence[str]) -> list[um.UserMemories]:
        users = list(user_ids)
        for user in users:
            check_user_id(user)
        out: list[um.UserMemories] = await self._locked(
            lambda: [self._umem.get(u) or um.UserMemories.empty(u, self.dim) for u in users]
        )
        return out

    async def put_user_memories(self, memories: Sequence[um.UserMemories]) -> int:
        for entries in memories:
            check_user_memories(entries, self.dim)
        written: int = await self._locked(self._put_user_memories, list(memories))
        return written

    async def record_user_memory_access(self, user_id: str, items: Sequence[int], ts: float) -> int:
        check_user_id(user_id)
        hits: int = await self._locked(self._record_access, user_id, list(items), float(ts))
        return hits

    async def set_available(self, items: Sequence[int] | np.ndarray, available: bool) -> int:
        changed: int = await self._locked(self._set_available, check_items(items), bool(available))
        return changed

    async def unavailable_items(self) -> np.ndarray:
        return self._catalogue.unavailable()

    async def register_items(self, external_ids: Sequence[str]) -> list[int]:
        names = check_external_items(external_ids)
        known = self._catalogue.new_items()
        if all(name in known for name in names):  # the common case: no lock, no thread hop
            return [known[name] for name in names]
        ids: list[int] = await self._locked(self._register, names)
        return ids

    async def new_items(self) -> Mapping[str, int]:
        return self._catalogue.new_items()

    async def erase_user(self, user_id: str) -> Erasure:
        check_user_id(user_id)
        erased: Erasure = await self._locked(self._erase, user_id)
        return erased

    async def interactions(self, after: str = "", count: int = 10_000) -> LoggedInteractions:
        check_log_page(after, count)
        page: LoggedInteractions = await self._locked(self._interactions.read, after, count, time.time())
        return page

    async def bank_loaded(self) -> bool:
        return self._bank_loaded

    async def mark_bank_loaded(self) -> None:
        await self._locked(self._mark_bank_loaded)

    async def wait_applied(self, position: str, timeout_s: float | None = None) -> bool:
        return True  # writes are applied before they return

    async def replication(self) -> ReplicationStatus:
        return ReplicationStatus(_position(self._applied), _position(self._log.last_lsn), 0, 0.0)

    async def stats(self) -> StoreStats:
        return StoreStats(
            backend="embedded",
            namespace=self.config.namespace,
            memories=len(self._index),
            index_size=len(self._index),
            index_kind=self._index.kind,
            capacity=self.config.capacity,
            replication=await self.replication(),
            unavailable_items=int(self._catalogue.unavailable().size),
            new_items=len(self._catalogue.new_items()),
        )

    # --------------------------------------------------------------------------------- persistence

    async def snapshot(self, path: Path | None = None) -> SnapshotInfo:
        info: SnapshotInfo = await self._locked(self._snapshot, path)
        return info

    async def restore(self, path: Path | None = None) -> SnapshotInfo:
        info: SnapshotInfo = await self._locked(self._restore, path)
        return info

    def _snapshot(self, path: Path | None) -> SnapshotInfo:
        target = path or self._root / "snapshot"
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self._index.save(tmp)
        state = {
            "lsn": self._applied,
            "next_id": self._next_id,
            "dim": self.dim,
            "histories": {u: list(h) for u, h in self._hist.items()},
            "seen": self._seen,
            "by_user": {u: list(ids) for u, ids in self._by_user.items()},
            "user_events": {u: sorted(evs) for u, evs in self._user_events.items()},
            "bank_loaded": self._bank_loaded,
            **self._catalogue.state(),
        }
        (tmp / "state.json").write_text(json.dumps(state))
        _save_user_memories(tmp / "umem.npz", self._umem, self.dim)
        _save_states(tmp / "states.npz", self._states, self.dim)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        if path is None:  # the default snapshot covers the log up to here
            self._log.rotate()
            self._log.drop_through(self._applied)
        log.info("snapshot at lsn %d: %d memories -> %s", self._applied, len(self._index), target)
        return SnapshotInfo(target, _position(self._applied), len(self._index))

    def _restore(self, path: Path | None) -> SnapshotInfo:
        source = path or self._root / "snapshot"
        self._reset_state()
        if (source / "state.json").exists():
            with snapshot_file(source / "state.json") as state_path:
                state = json.loads(state_path.read_text())
            if int(state["dim"]) != self.dim:
                raise ValueError(f"snapshot {source} has dim {state['dim']}, store dim is {self.dim}")
            # a snapshot written under another index kind is converted (the log replay below adds to it)
            self._index = MemoryIndex.load(source, self.config.index, self.config.recent_width).conform()
            self._hist = {u: deque(h, maxlen=self.config.history_len) for u, h in state["histories"].items()}
            self._seen = {str(e): float(t) for e, t in state["seen"].items()}
            self._by_user = {u: deque(ids) for u, ids in state["by_user"].items()}
            # absent from snapshots written before erasure and the catalogue existed
            self._user_events = {u: set(evs) for u, evs in state.get("user_events", {}).items()}
            self._bank_loaded = bool(state.get("bank_loaded", False))
            self._catalogue = Catalogue.from_state(state.get("unavailable", ()), state.get("new_items", {}))
            self._next_id, self._applied = int(state["next_id"]), int(state["lsn"])
            with snapshot_file(source / "umem.npz") as umem_path:
                self._umem = _load_user_memories(umem_path, self.dim)
            with snapshot_file(source / "states.npz") as states_path:
                self._states = _load_states(states_path)
        first = self._log.first_lsn()
        if first is not None and first > self._applied + 1:
            raise ValueError(f"snapshot {source} is at lsn {self._applied} but the log starts at {first}")
        replayed = 0
        for record in self._log.replay(self._applied):
            self._apply(record)
            replayed += 1
        log.info("restored %d memories (%d log records replayed)", len(self._index), replayed)
        return SnapshotInfo(source, _position(self._applied), len(self._index))

    async def close(self) -> None:
        with self._write_lock:
            self._log.close()
            self._interactions.close()
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    async def drop(self) -> bool:
        """Close and delete the namespace's folder: no other process can have it open (its lock)."""
        await self.close()
        shutil.rmtree(self._root, ignore_errors=True)
        log.info("namespace %s dropped", self.config.namespace)
        return True


def _checked_reads(user_ids: Sequence[str], max_len: int) -> list[str]:
    for user in user_ids:
        check_user_id(user)
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return list(user_ids)


def _packed(states: UserStates | None, dim: int) -> np.ndarray:
    """(s, stride) uint8: the packed states (memory_store.states.pack), one row each, for a log record."""
    stride = FINGERPRINT_BYTES + 4 * dim
    if states is None or not len(states):
        return np.zeros((0, stride), np.uint8)
    return np.frombuffer(b"".join(states.packed()), np.uint8).reshape(len(states), stride)


def _save_states(path: Path, states: dict[str, bytes], dim: int) -> None:
    """The kept encoder states: one packed row per user, the users in a JSON beside."""
    users = sorted(states)
    stride = FINGERPRINT_BYTES + 4 * dim
    blobs = np.frombuffer(b"".join(states[u] for u in users), np.uint8).reshape(len(users), stride)
    savez(path, {"blobs": blobs})
    path.with_suffix(".json").write_text(json.dumps(users))


def _load_states(path: Path) -> dict[str, bytes]:
    """The states of a snapshot (none in one written before states were kept)."""
    if not path.exists():
        return {}
    users: list[str] = json.loads(path.with_suffix(".json").read_text())
    with np.load(path) as a:
        return {u: a["blobs"][i].tobytes() for i, u in enumerate(users)}


def _save_user_memories(path: Path, umem: dict[str, um.UserMemories], dim: int) -> None:
    """All users' entries concatenated, with per-user row counts; user ids in a JSON beside."""
    users = sorted(umem)
    parts = [umem[u] for u in users] or [um.UserMemories.empty("", dim)]
    arrays = {
        "counts": np.asarray([len(umem[u]) for u in users], np.int64),
        "items": np.concatenate([p.items for p in parts]),
        "vectors": np.concatenate([p.vectors for p in parts]),
        "freq": np.concatenate([p.freq for p in parts]),
        "access": np.concatenate([p.access_count for p in parts]),
        "last": np.concatenate([p.last_access for p in parts]),
        "first": np.concatenate([p.first_seen for p in parts]),
    }
    savez(path, arrays)
    path.with_suffix(".json").write_text(json.dumps(users))


def _load_user_memories(path: Path, dim: int) -> dict[str, um.UserMemories]:
    users: list[str] = json.loads(path.with_suffix(".json").read_text())
    out: dict[str, um.UserMemories] = {}
    with np.load(path) as a:
        bounds = np.concatenate([[0], np.cumsum(a["counts"])])
        for i, user in enumerate(users):
            s = slice(int(bounds[i]), int(bounds[i + 1]))
            cols = (a["items"], a["vectors"], a["freq"], a["access"], a["last"], a["first"])
            out[user] = um.UserMemories(user, *(c[s] for c in cols))
    return out
