"""The memory store contract: value types, input validation and the ``MemoryStore`` protocol.

A *collaborative memory* (RaSeRec) is one (prefix → next item) event: a key vector (the encoder output
of the prefix), the next item, the user, a timestamp and the prefix length. The store L2-normalises
every key and every query itself, so scores are cosine similarities; callers may pass raw vectors.
Memory ids are positive int64 allocated by the store, increasing in write order. A memory also keeps
the last items of its prefix (as many as the store's ``recent_width``), from which the store counts item
transitions (``memory_store.transitions``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from memory_store.transitions import Followers
from memory_store.user_memory import UserMemories

if TYPE_CHECKING:  # memory_store.states reads this module's checks
    from memory_store.states import StoredHistories, UserStates


# Item ids a memory can hold (value and prefix items): the index keeps them in int32 columns
# (memory_store.columns); internal ids are the model's vocabulary and then register_items' next ids.
MAX_ITEM_ID = 2**31 - 1


class SnapshotError(ValueError):
    """A snapshot that cannot be read back; the message names the file."""


class StoreInUse(RuntimeError):
    """An embedded store's directory that another process holds open (one process owns it)."""


@dataclass(frozen=True, slots=True)
class Interaction:
    """One accepted user interaction; ``event_id`` makes ingestion idempotent (None: never deduplicated)."""

    user_id: str
    item_id: int
    timestamp: float
    event_id: str | None = None


@dataclass(frozen=True, slots=True)
class MemoryBatch:
    """n collaborative memories. Build with :meth:`create`, which validates and normalises."""

    keys: np.ndarray  # (n, dim) float32, unit L2 norm
    items: np.ndarray  # (n,) int64, >= 1
    users: tuple[str, ...]  # (n,)
    timestamps: np.ndarray  # (n,) float64, unix seconds
    prefix_lens: np.ndarray  # (n,) int32, >= 0
    # (n, w) int64: the prefix's last w items, most recent first (recent[:, 0] is the item just before
    # the memory's next item), 0 where the prefix is shorter or the items are not known. A store keeps
    # w = its config's recent_width (see :meth:`create`, :meth:`fitted`).
    recent: np.ndarray

    @classmethod
    def create(
        cls,
        keys: np.ndarray,
        items: Sequence[int] | np.ndarray,
        users: Sequence[str],
        timestamps: Sequence[float] | np.ndarray,
        prefix_lens: Sequence[int] | np.ndarray,
        dim: int,
        recent: np.ndarray | None = None,
        recent_width: int | None = None,
    ) -> MemoryBatch:
        """``recent``: (n, m) ints ≥ 0, most recent first; None: unknown (no columns). With a store's
        ``recent_width``, m must be at most that and the columns are padded with 0 to it."""
        unit = normalise_rows(keys, dim, "keys")
        n = unit.shape[0]
        items_a = _int_column(items, n, "items", minimum=1)
        if n and int(items_a.max()) > MAX_ITEM_ID:
            raise ValueError(f"item ids must be <= {MAX_ITEM_ID}")
        users_t = tuple(users)
        if len(users_t) != n:
            raise ValueError(f"users has {len(users_t)} entries, expected {n}")
        for user in users_t:
            check_user_id(user)
        ts = np.asarray(timestamps, dtype=np.float64)
        if ts.shape != (n,) or not np.isfinite(ts).all():
            raise ValueError(f"timestamps must be {n} finite numbers, got shape {ts.shape}")
        lens = _int_column(prefix_lens, n, "prefix_lens", minimum=0).astype(np.int32)
        return cls(
            keys=unit,
            items=items_a,
            users=users_t,
            timestamps=ts,
            prefix_lens=lens,
            recent=_recent(recent, n, recent_width),
        )

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def validated(self, dim: int, recent_width: int | None = None) -> MemoryBatch:
        """The batch checked and normalised again (it may have been built without :meth:`create`)."""
        return MemoryBatch.create(
            self.keys,
            self.items,
            self.users,
            self.timestamps,
            self.prefix_lens,
            dim,
            self.recent,
            recent_width,
        )

    def fitted(self, recent_width: int) -> MemoryBatch:
        """The batch with ``recent`` at ``recent_width`` columns (see :func:`fit_recent`)."""
        if self.recent.shape[1] == recent_width:
            return self
        return replace(self, recent=fit_recent(self.recent, recent_width))

    def take(self, rows: np.ndarray) -> MemoryBatch:
        """The sub-batch at ``rows`` (an int index array)."""
        return MemoryBatch(
            keys=self.keys[rows],
            items=self.items[rows],
            users=tuple(self.users[int(r)] for r in rows),
            timestamps=self.timestamps[rows],
            prefix_lens=self.prefix_lens[rows],
            recent=self.recent[rows],
        )


def _recent(recent: np.ndarray | None, n: int, width: int | None) -> np.ndarray:
    """(n, m) int64 from ``recent``, padded to (n, width) when a width is given (see MemoryBatch.create)."""
    if recent is None:
        return np.zeros((n, width or 0), np.int64)
    a = np.asarray(recent)
    if (
        a.ndim != 2
        or a.shape[0] != n
        or (width is not None and a.shape[1] > width)
        or (a.size and not np.issubdtype(a.dtype, np.integer))
    ):
        cols = "m" if width is None else f"≤ recent_width = {width}"
        raise ValueError(f"recent must be ints of shape ({n}, {cols}), got {a.dtype} of shape {a.shape}")
    if (a < 0).any() or (a > MAX_ITEM_ID).any():
        raise ValueError(f"recent item ids must be in 0..{MAX_ITEM_ID} (0: none)")
    return fit_recent(a.astype(np.int64), a.shape[1] if width is None else width)


def fit_recent(recent: np.ndarray, width: int) -> np.ndarray:
    """(n, width) int64 of stored prefix items (n, m) of another width: padded with 0 (not known) or cut
    to the ``width`` most recent. Data written under another ``recent_width`` (or before memories kept
    their prefix's items: m = 0) stays readable."""
    if recent.shape[1] == width:
        return recent.astype(np.int64, copy=False)
    out = np.zeros((recent.shape[0], width), np.int64)
    m = min(width, recent.shape[1])
    out[:, :m] = recent[:, :m]
    return out


@dataclass(frozen=True, slots=True)
class IngestResult:
    """Outcome of a write. ``memory_ids[i]`` is the id created for input row i, -1 if none was created
    (a duplicate event, or an interaction without a memory). ``position`` is the replication-log
    position of the write ("" if nothing was written), usable with ``wait_applied``."""

    accepted: int
    duplicates: int
    memory_ids: np.ndarray  # (n,) int64
    position: str


@dataclass(frozen=True, slots=True)
class SearchResult:
    """Top-k per query, best first. Padding where fewer than k memories exist: id -1, score -inf,
    item 0, user "", prefix_len -1, timestamp nan."""

    ids: np.ndarray  # (B, k) int64
    scores: np.ndarray  # (B, k) float32 cosine similarity
    items: np.ndarray  # (B, k) int64
    users: np.ndarray  # (B, k) object (str)
    prefix_lens: np.ndarray  # (B, k) int32
    timestamps: np.ndarray  # (B, k) float64
    keys: np.ndarray | None = None  # (B, k, dim) float32 stored unit keys (zeros at padding), if asked


@dataclass(frozen=True, slots=True)
class ReplicationStatus:
    """Where this process's index stands against the log: ``applied`` and ``last`` are log positions,
    ``lag_s`` the age of the oldest write not applied yet (0 when caught up)."""

    applied: str
    last: str
    pending: int
    lag_s: float


@dataclass(frozen=True, slots=True)
class StoreStats:
    backend: str
    namespace: str
    memories: int  # collaborative memories held by the store (authoritative count)
    index_size: int  # vectors in this process's FAISS index
    index_kind: str  # "flat", or "ivf{nlist}" plus the codec of a compressed kind ("ivf4096-sq8")
    capacity: int | None
    replication: ReplicationStatus
    unavailable_items: int = 0  # items marked unavailable (this replica's copy)
    new_items: int = 0  # items registered after training (this replica's copy)


@dataclass(frozen=True, slots=True)
class Erasure:
    """What ``erase_user`` removed; all 0 for a user the store holds nothing of (a repeated erasure).
    ``position`` is the log position of the erasure ("" when nothing was removed)."""

    history: int  # items of the user's history
    memories: int  # collaborative memories built from the user's history (their ``user``)
    user_memories: int  # per-user (RAMRec) memories
    event_ids: int  # dedup markers of the user's events still held
    position: str = ""
    interactions: int = 0  # rows of the interaction log


@dataclass(frozen=True, slots=True)
class LoggedInteractions:
    """A page of the interaction log, oldest first: accepted interactions as the store took them, items
    as internal ids (the model's, or those ``register_items`` gave: the caller maps them back).
    ``position`` is the last row's place in the log, the ``after`` of the next page ("" on an empty
    page, the end); positions compare with :func:`parse_position`."""

    users: tuple[str, ...]  # (n,)
    items: np.ndarray  # (n,) int64
    timestamps: np.ndarray  # (n,) float64 unix seconds: the interaction's own time
    event_ids: tuple[str | None, ...]  # (n,)
    accepted_at: np.ndarray  # (n,) float64 unix seconds: when the store accepted it (what retention ages)
    positions: tuple[str, ...]  # (n,) each row's place in the log, unique in the namespace

    @property
    def position(self) -> str:
        """The last row's place in the log ("" on an empty page): the ``after`` of the next page."""
        return self.positions[-1] if self.positions else ""

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def empty(cls) -> LoggedInteractions:
        none = np.zeros(0, np.float64)
        return cls((), np.zeros(0, np.int64), none, (), none, ())


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    path: Path
    position: str
    memories: int


class MemoryStore(Protocol):
    """What the service uses; both backends implement it and pass one contract test suite."""

    @property
    def dim(self) -> int: ...

    async def append_interactions(
        self, events: Sequence[Interaction], states: UserStates | None = None, logged: bool = True
    ) -> IngestResult:
        """Interactions without memories; ``states`` and ``logged`` as in :meth:`ingest`."""
        ...

    async def ingest(
        self,
        events: Sequence[Interaction],
        keys: np.ndarray,
        prefix_lens: Sequence[int] | np.ndarray,
        recent: np.ndarray | None = None,
        states: UserStates | None = None,
        logged: bool = True,
    ) -> IngestResult:
        """Interaction + its new memory (key = encoding of the history before the item, ``recent`` that
        history's last items, most recent first; see MemoryBatch.create), atomically. ``states``: the
        users' encoder states after the write, kept in the same atomic write where their windows are the
        histories' last items then (``memory_store.states``); every other state of a user this write
        appends to is dropped. ``logged``: each accepted interaction also goes into the interaction log,
        in the same atomic write (a duplicate never does); False for rows that are no traffic (the
        artifact's memory bank, which the training data holds already)."""
        ...

    async def histories(self, user_ids: Sequence[str], max_len: int) -> list[list[int]]:
        """Recent item ids per user, oldest first, at most ``max_len`` each ([] for unknown users)."""
        ...

    async def histories_with_states(self, user_ids: Sequence[str], max_len: int) -> StoredHistories:
        """:meth:`histories` and, in the same read (one round trip), each user's encoder state where the
        one kept encodes the history's last ``state_window`` items as read (else None)."""
        ...

    async def put_states(self, states: UserStates) -> int:
        """Keep encoder states of histories already stored: each only where its window is still the
        history's last items (atomically checked); returns how many were kept."""
        ...

    async def add_memories(self, batch: MemoryBatch) -> IngestResult: ...

    async def remove_memories(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove memories by id; raises ValueError (and removes nothing) if any id is unknown."""
        ...

    async def search(self, queries: np.ndarray, k: int, with_keys: bool = False) -> SearchResult:
        """Top-k memories per query; ``with_keys`` also returns their stored (unit) key vectors."""
        ...

    async def followers(self, items: Sequence[int]) -> list[Followers]:
        """Per item: the items that followed it in the memories held, with counts per lag."""
        ...

    async def predecessors(self, first: int) -> dict[int, Followers]:
        """Every next item ≥ ``first`` (those registered after training) → the items before it in the
        memories held, per lag, counted (a :class:`Followers` row of predecessors)."""
        ...

    async def update_user_memories(
        self,
        user_id: str,
        items: Sequence[int] | np.ndarray,
        vectors: np.ndarray,
        timestamps: Sequence[float] | np.ndarray,
    ) -> list[int]:
        """Merge observations into the user's memories; returns the item ids evicted."""
        ...

    async def user_memories(self, user_ids: Sequence[str]) -> list[UserMemories]: ...

    async def put_user_memories(self, memories: Sequence[UserMemories]) -> int:
        """Write each user's memories as given (a bulk load: entries replayed elsewhere by the same
        rules), only where that user holds none yet, so that a repeated or resumed load, or one racing
        live updates, overwrites nothing; returns how many users were written."""
        ...

    async def set_available(self, items: Sequence[int] | np.ndarray, available: bool) -> int:
        """Mark items (ids >= 1) unavailable (``available=False``) or available again, for every replica;
        returns how many changed state. Once it returns, this replica's ``unavailable_items`` shows it."""
        ...

    async def unavailable_items(self) -> np.ndarray:
        """(m,) int64 sorted ids of the unavailable items, from this replica's copy (no round trip);
        read-only."""
        ...

    async def register_items(self, external_ids: Sequence[str]) -> list[int]:
        """The internal id of each external item id, registering unknown ones atomically with the next
        free ids from ``config.first_new_item`` on (one id per item, whichever replica asks first)."""
        ...

    async def new_items(self) -> Mapping[str, int]:
        """External id → internal id of every registered item, from this replica's copy; read-only, the
        same object until the next registration."""
        ...

    async def erase_user(self, user_id: str) -> Erasure:
        """Remove everything stored about a user: history, encoder state, memories (from every replica's
        index, their transition counts with them), per-user memories, dedup markers, interaction log
        rows. Idempotent."""
        ...

    async def interactions(self, after: str = "", count: int = 10_000) -> LoggedInteractions:
        """Up to ``count`` rows of the interaction log after position ``after`` ("": from the oldest),
        oldest first; an empty page at the end. Rows past ``config.log_retention_s`` are never returned,
        also before the store has dropped them."""
        ...

    async def bank_loaded(self) -> bool:
        """Whether the start-up bulk load of the memory bank was completed in this namespace."""
        ...

    async def mark_bank_loaded(self) -> None:
        """Record that the bulk load is complete: later starts skip it, so memories removed since (an
        erased user's) are never loaded again."""
        ...

    async def record_user_memory_access(self, user_id: str, items: Sequence[int], ts: float) -> int: ...

    async def wait_applied(self, position: str, timeout_s: float | None = None) -> bool:
        """Wait until this process's index has applied the log up to ``position``."""
        ...

    async def replication(self) -> ReplicationStatus: ...

    async def stats(self) -> StoreStats: ...

    async def snapshot(self, path: Path | None = None) -> SnapshotInfo: ...

    async def restore(self, path: Path | None = None) -> SnapshotInfo:
        """Load a snapshot, then catch up from the log so the result equals the durable state."""
        ...

    async def close(self) -> None: ...

    async def drop(self) -> bool:
        """Close the store and delete everything of its namespace (histories, memories, logs, snapshots),
        unless another process has it open (then only close); returns whether it was deleted."""
        ...


# ---------------------------------------------------------------------------------------------- checks


def normalise_rows(x: np.ndarray, dim: int, name: str) -> np.ndarray:
    """(n, dim) float32 rows scaled to unit L2 norm; ValueError on a wrong shape, NaN/inf or zero row."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}), got {np.shape(x)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if (norms <= 1e-12).any():
        raise ValueError(f"{name} contains an all-zero vector, which has no direction")
    return np.ascontiguousarray(a / norms, dtype=np.float32)


def check_user_id(user: str) -> None:
    if not isinstance(user, str) or not user or len(user) > 256:
        raise ValueError(f"user id must be a non-empty string of at most 256 characters, got {user!r}")


def check_events(events: Sequence[Interaction]) -> None:
    for ev in events:
        check_user_id(ev.user_id)
        if isinstance(ev.item_id, bool) or not isinstance(ev.item_id, int | np.integer) or ev.item_id < 1:
            raise ValueError(f"item id must be an int >= 1, got {ev.item_id!r}")
        if not np.isfinite(ev.timestamp):
            raise ValueError(f"timestamp must be finite, got {ev.timestamp!r}")
        if ev.event_id is not None and (not isinstance(ev.event_id, str) or not ev.event_id):
            raise ValueError(f"event id must be a non-empty string or None, got {ev.event_id!r}")


def check_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"ids must be a 1-d sequence of ints, got {a.dtype} of shape {a.shape}")
    a = a.astype(np.int64)
    if (a < 1).any():
        raise ValueError("memory ids are >= 1")
    return a


def check_items(items: Sequence[int] | np.ndarray) -> np.ndarray:
    """(n,) int64 item ids, each >= 1; ValueError otherwise."""
    a = np.asarray(items)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"items must be a 1-d sequence of ints, got {a.dtype} of shape {a.shape}")
    a = a.astype(np.int64)
    if (a < 1).any():
        raise ValueError("item ids are >= 1")
    return a


def check_external_items(names: Sequence[str]) -> list[str]:
    """External item ids: non-empty strings of at most 256 characters."""
    out = list(names)
    for name in out:
        if not isinstance(name, str) or not name or len(name) > 256:
            raise ValueError(
                f"external item id must be a non-empty string of at most 256 characters, got {name!r}"
            )
    return out


def check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def check_log_page(after: str, count: int, parse: Callable[[str], Any] | None = None) -> None:
    """A read of the interaction log: ``after`` a position ("" or what ``parse``, the backend's reader of
    its row positions, accepts; default :func:`parse_position`), ``count`` >= 1; ValueError otherwise."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if after:
        (parse or parse_position)(after)


def memory_batch_for_events(
    events: Sequence[Interaction],
    keys: np.ndarray,
    prefix_lens: Sequence[int] | np.ndarray,
    dim: int,
    recent_width: int,
    recent: np.ndarray | None = None,
) -> MemoryBatch:
    """The memories created by ``ingest``: item, user and timestamp come from the events; ``recent`` padded
    to the store's ``recent_width``."""
    check_events(events)
    return MemoryBatch.create(
        keys,
        [ev.item_id for ev in events],
        [ev.user_id for ev in events],
        [ev.timestamp for ev in events],
        prefix_lens,
        dim,
        recent,
        recent_width,
    )


def check_observations(
    user_id: str,
    items: Sequence[int] | np.ndarray,
    vectors: np.ndarray,
    timestamps: Sequence[float] | np.ndarray,
    dim: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated (items (k,) int64, vectors (k, dim) float32, timestamps (k,) float64)."""
    check_user_id(user_id)
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[1] != dim or not np.isfinite(v).all():
        raise ValueError(f"vectors must be finite with shape (k, {dim}), got {np.shape(vectors)}")
    it = _int_column(items, v.shape[0], "items", minimum=1)
    ts = np.asarray(timestamps, dtype=np.float64)
    if ts.shape != (v.shape[0],) or not np.isfinite(ts).all():
        raise ValueError(f"timestamps must be {v.shape[0]} finite numbers")
    return it, v, ts


def check_user_memories(entries: UserMemories, dim: int) -> None:
    """ValueError unless ``entries`` is one user's well-formed memories of ``dim``-vectors."""
    check_user_id(entries.user_id)
    n = len(entries)
    columns = (entries.freq, entries.access_count, entries.last_access, entries.first_seen)
    who = f"user memories of {entries.user_id!r}"
    if entries.vectors.shape != (n, dim) or any(c.shape != (n,) for c in columns):
        raise ValueError(f"{who}: columns of {n} rows and vectors of {dim} needed")
    if not np.isfinite(entries.vectors).all() or (entries.items < 1).any():
        raise ValueError(f"{who}: finite vectors and item ids >= 1 needed")


def _int_column(values: Sequence[int] | np.ndarray, n: int, name: str, minimum: int) -> np.ndarray:
    a = np.asarray(values)
    if a.shape != (n,) or (n and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be {n} ints, got {a.dtype} of shape {a.shape}")
    a = a.astype(np.int64)
    if (a < minimum).any():
        raise ValueError(f"{name} must be >= {minimum}")
    return a


def parse_position(position: str) -> tuple[int, int]:
    """Log positions are Redis stream ids "ms-seq" (the embedded log uses "0-lsn"); compare as tuples."""
    head, _, tail = position.partition("-")
    try:
        return int(head), int(tail or 0)
    except ValueError as exc:
        raise ValueError(f"not a log position: {position!r}") from exc
