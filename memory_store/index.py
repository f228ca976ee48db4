"""The in-process FAISS index of collaborative memories, with the metadata the retriever needs beside it.

* Ids are the store's memory ids, so memories can be removed: an ``IndexIDMap2`` over a flat index while
  the bank is small (exact search), an ``IndexIVFFlat`` with a hashtable direct map once it is large
  (approximate; the direct map makes removal O(1) per id and allows reconstruction for rebuilds).
* Metadata (item, user, timestamp, prefix length, the prefix's last items) live in NumPy arrays indexed
  by ``id - base``, so a search returns them for the whole batch with fancy indexing, never a round trip
  per hit. The item transitions of the memories held (``memory_store.transitions``) change with them.
* FAISS is not safe for concurrent add and search: every call takes a readers-writer lock (searches
  share it, adds, removes and rebuilds hold it alone; writers are preferred so a storm of searches
  cannot starve the replication log). FAISS releases the GIL, so searches run in parallel threads.
* The stores search in the event-loop thread itself while no writer holds the lock (:func:`search_now`):
  a micro-batch search takes well under a millisecond, less than a hop to a worker thread costs under
  load. Only while a writer holds it (a log batch, a rebuild) does the search wait in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np

from memory_store.base import MemoryBatch, SearchResult, SnapshotError, snapshot_file
from memory_store.config import IndexParams
from memory_store.transitions import RECENT, Followers, TransitionTable

log = logging.getLogger(__name__)

_RECONSTRUCT_CHUNK = 262_144
R = TypeVar("R")


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            self._release_read()

    @contextmanager
    def try_read(self) -> Iterator[bool]:
        """Like :meth:`read`, but never waits: yields False (holding nothing) while a writer holds or
        awaits the lock, so an event-loop thread can fall back to a worker thread instead of blocking."""
        with self._cond:
            if self._writer or self._writers_waiting:
                acquired = False
            else:
                self._readers += 1
                acquired = True
        if not acquired:
            yield False
            return
        try:
            yield True
        finally:
            self._release_read()

    def _release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


_COLUMNS = ("alive", "item", "user", "ts", "plen", "recent")


class _Metadata:
    """Per-memory columns indexed by ``id - base``; ``base`` moves up as the oldest memories leave."""

    def __init__(self) -> None:
        self.base = 1
        size = 1024  # never empty: padding rows of a search gather row 0
        self.alive = np.zeros(size, bool)
        self.item = np.zeros(size, np.int64)
        self.user = np.zeros(size, np.int32)  # code into user_names
        self.ts = np.zeros(size, np.float64)
        self.plen = np.zeros(size, np.int32)
        self.recent = np.zeros((size, RECENT), np.int64)  # the prefix's last items (MemoryBatch.recent)
        self.user_names: list[str] = []
        self._user_code: dict[str, int] = {}
        self._names_arr = np.array([""], dtype=object)  # user_names + [""] (padding), for fancy indexing
        self.count = 0
        self._low = 0  # no alive row below this one

    def in_range(self, ids: np.ndarray) -> np.ndarray:
        rows = ids - self.base
        return (rows >= 0) & (rows < self.alive.shape[0])

    def is_alive(self, ids: np.ndarray) -> np.ndarray:
        ok = self.in_range(ids)
        out = np.zeros(ids.shape, bool)
        out[ok] = self.alive[ids[ok] - self.base]
        return out

    def _grow(self, max_id: int) -> None:
        need = max_id - self.base + 1
        size = self.alive.shape[0]
        if need <= size:
            return
        new = max(need, 2 * size, 1024)
        for name in _COLUMNS:
            old = getattr(self, name)
            grown = np.zeros((new, *old.shape[1:]), old.dtype)
            grown[:size] = old
            setattr(self, name, grown)

    def codes_for(self, users: tuple[str, ...]) -> np.ndarray:
        codes = np.empty(len(users), np.int32)
        for i, user in enumerate(users):
            code = self._user_code.get(user)
            if code is None:
                code = self._user_code[user] = len(self.user_names)
                self.user_names.append(user)
            codes[i] = code
        if len(self.user_names) + 1 != self._names_arr.shape[0]:
            self._names_arr = np.array(self.user_names + [""], dtype=object)
        return codes

    def put(self, ids: np.ndarray, batch: MemoryBatch) -> None:
        if ids.min() < self.base:
            raise ValueError(f"memory id {int(ids.min())} is below the index base {self.base}")
        self._grow(int(ids.max()))
        rows = ids - self.base
        self.alive[rows] = True
        self.item[rows] = batch.items
        self.user[rows] = self.codes_for(batch.users)
        self.ts[rows] = batch.timestamps
        self.plen[rows] = batch.prefix_lens
        self.recent[rows] = batch.recent
        self.count += int(ids.size)
        self._low = min(self._low, int(rows.min()))

    def drop(self, ids: np.ndarray) -> None:
        self.alive[ids - self.base] = False
        self.count -= int(ids.size)
        self._compact_if_sparse()

    def alive_ids(self) -> np.ndarray:
        return (np.flatnonzero(self.alive) + self.base).astype(np.int64)

    def oldest(self, n: int) -> np.ndarray:
        """The ``n`` smallest alive ids (fewer if fewer exist)."""
        while self._low < self.alive.shape[0] and not self.alive[self._low]:
            self._low += 1
        rows = np.flatnonzero(self.alive[self._low : self._low + max(4 * n, 1024)])[:n] + self._low
        if rows.size < n:  # sparse region: fall back to a full scan
            rows = np.flatnonzero(self.alive[self._low :])[:n] + self._low
        return (rows + self.base).astype(np.int64)

    def _compact_if_sparse(self) -> None:
        """Shift the columns down once more than half of them sit below the oldest alive memory."""
        size = self.alive.shape[0]
        first = self.oldest(1)
        shift = int(first[0] - self.base) if first.size else size
        if size < 4096 or shift < size // 2:
            return
        for name in _COLUMNS:
            old = getattr(self, name)
            moved = np.zeros_like(old)
            moved[: size - shift] = old[shift:]
            setattr(self, name, moved)
        self.base += shift
        self._low = 0

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(items, users, prefix_lens, timestamps) for an id array of any shape; -1 ids give padding."""
        valid = ids >= 0
        rows = np.where(valid, ids - self.base, 0)
        items = np.where(valid, self.item[rows], 0)
        pad_code = len(self.user_names)  # the trailing "" in _names_arr
        users = self._names_arr[np.where(valid, self.user[rows], pad_code)]
        plens = np.where(valid, self.plen[rows], -1).astype(np.int32)
        ts = np.where(valid, self.ts[rows], np.nan)
        return items, users, plens, ts

    def state(self) -> dict[str, np.ndarray]:
        return {
            "base": np.array([self.base], np.int64),
            "alive": self.alive,
            "item": self.item,
            "user": self.user,
            "ts": self.ts,
            "plen": self.plen,
            "recent": self.recent,
        }

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], user_names: list[str]) -> _Metadata:
        meta = cls()
        meta.base = int(arrays["base"][0])
        meta.alive, meta.item, meta.user = arrays["alive"], arrays["item"], arrays["user"]
        meta.ts, meta.plen = arrays["ts"], arrays["plen"]
        # a snapshot written before memories kept their prefix's last items: none known
        meta.recent = arrays.get("recent", np.zeros((meta.alive.shape[0], RECENT), np.int64))
        meta.user_names = user_names
        meta._user_code = {name: i for i, name in enumerate(user_names)}
        meta._names_arr = np.array(user_names + [""], dtype=object)
        meta.count = int(meta.alive.sum())
        return meta


def choose_nlist(n: int, params: IndexParams) -> int:
    """A power of two near ``nlist_per_sqrt · sqrt(n)``, clamped to the configured range and to the
    number of lists ``n`` vectors can train (``train_points_per_list`` each)."""
    target = max(1.0, params.nlist_per_sqrt * math.sqrt(max(n, 1)))
    nlist = min(max(2 ** round(math.log2(target)), params.min_nlist), params.max_nlist)
    trainable = max(1, n // params.train_points_per_list)
    return int(min(nlist, 2 ** int(math.log2(trainable))))


@dataclass(frozen=True, slots=True)
class IndexImage:
    """A point-in-time copy of a MemoryIndex, written to disk without holding the index lock."""

    index: np.ndarray
    columns: dict[str, np.ndarray]
    users: list[str]
    info: dict[str, int]

    def write(self, directory: Path) -> None:
        """``index.faiss``, ``meta.npz`` (columns), ``users.json`` and ``meta.json`` in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        self.index.tofile(directory / "index.faiss")
        _savez(directory / "meta.npz", self.columns)
        (directory / "users.json").write_text(json.dumps(self.users))
        (directory / "meta.json").write_text(json.dumps(self.info))


class MemoryIndex:
    """FAISS index + metadata columns, guarded by a readers-writer lock. Keys must be unit-norm."""

    def __init__(self, dim: int, params: IndexParams) -> None:
        self.dim = dim
        self.params = params
        self.lock = ReadWriteLock()
        self._meta = _Metadata()
        self._transitions = TransitionTable()  # of the memories in _meta, changed with it
        self._index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._nlist = 0  # 0: exact
        self._trained_for = 0

    # ---------------------------------------------------------------------------------------- queries

    def __len__(self) -> int:
        return self._meta.count

    @property
    def kind(self) -> str:
        return f"ivf{self._nlist}" if self._nlist else "flat"

    def contains(self, ids: np.ndarray) -> np.ndarray:
        with self.lock.read():
            return self._meta.is_alive(np.asarray(ids, np.int64))

    def ids(self) -> np.ndarray:
        """All ids held, ascending."""
        with self.lock.read():
            return self._meta.alive_ids()

    def oldest(self, n: int) -> np.ndarray:
        with self.lock.read():
            return self._meta.oldest(n)

    def users_of(self, ids: np.ndarray) -> list[str]:
        with self.lock.read():
            _, users, _, _ = self._meta.gather(np.asarray(ids, np.int64))
            return [str(u) for u in users]

    def search(self, queries: np.ndarray, k: int, with_keys: bool = False) -> SearchResult:
        """Top-k by inner product for unit-norm queries (B, dim) float32; ``with_keys`` adds the stored
        vectors of the hits (B, k, dim), zeros at padding, read under the same lock as the hits."""
        self._set_threads()
        with self.lock.read():
            return self._search(queries, k, with_keys)

    def try_search(self, queries: np.ndarray, k: int, with_keys: bool = False) -> SearchResult | None:
        """:meth:`search` if no writer holds or awaits the lock, else None at once (never blocks)."""
        self._set_threads()
        with self.lock.try_read() as acquired:
            return self._search(queries, k, with_keys) if acquired else None

    def _set_threads(self) -> None:
        if self.params.threads is not None:
            faiss.omp_set_num_threads(self.params.threads)  # this thread's setting (see IndexParams)

    def _search(self, queries: np.ndarray, k: int, with_keys: bool) -> SearchResult:
        """The search itself; the caller holds the read lock."""
        keys = None
        scores, ids = self._index.search(queries, k)  # (B, k) each
        items, users, plens, ts = self._meta.gather(ids)
        if with_keys:
            keys = np.zeros((*ids.shape, self.dim), np.float32)
            present = ids >= 0
            keys[present] = self._reconstruct(ids[present])
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return SearchResult(
            ids=ids, scores=scores, items=items, users=users, prefix_lens=plens, timestamps=ts, keys=keys
        )

    def followers(self, items: Sequence[int]) -> list[Followers]:
        """The transition table's row of each item (memory_store.transitions)."""
        with self.lock.read():
            return self._followers(items)

    def try_followers(self, items: Sequence[int]) -> list[Followers] | None:
        """:meth:`followers` if no writer holds or awaits the lock, else None at once (never blocks)."""
        with self.lock.try_read() as acquired:
            return self._followers(items) if acquired else None

    def _followers(self, items: Sequence[int]) -> list[Followers]:
        """The rows themselves; the caller holds the read lock."""
        return [self._transitions.followers(int(i)) for i in items]

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors (n, dim) of present ids."""
        with self.lock.read():
            return self._reconstruct(np.asarray(ids, np.int64))

    # ----------------------------------------------------------------------------------------- writes

    def add(self, ids: np.ndarray, batch: MemoryBatch) -> int:
        """Add memories; ids already present are skipped (replay is idempotent). Returns the number added."""
        ids = np.asarray(ids, np.int64)
        with self.lock.write():
            fresh = ~self._meta.is_alive(ids) & (ids >= self._meta.base)
            if not fresh.all():
                rows = np.flatnonzero(fresh)
                ids, batch = ids[rows], batch.take(rows)
            if not ids.size:
                return 0
            if self._needs_rebuild(self._meta.count + int(ids.size)):
                self._rebuild(extra_ids=ids, extra_keys=batch.keys)
            else:
                self._index.add_with_ids(batch.keys, ids)
            self._meta.put(ids, batch)
            self._transitions.add(batch.items, batch.recent)
            return int(ids.size)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids; absent ids are ignored (replay is idempotent). Returns the number removed."""
        ids = np.asarray(ids, np.int64)
        with self.lock.write():
            ids = np.unique(ids[self._meta.is_alive(ids)])
            if not ids.size:
                return 0
            if self._nlist:  # the hashtable direct map removes by IDSelectorArray only
                removed = self._index.remove_ids(faiss.IDSelectorArray(ids.size, faiss.swig_ptr(ids)))
            else:
                removed = self._index.remove_ids(faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)))
            if removed != ids.size:
                raise RuntimeError(f"FAISS removed {removed} of {ids.size} ids: index and metadata disagree")
            rows = ids - self._meta.base
            self._transitions.remove(self._meta.item[rows], self._meta.recent[rows])
            self._meta.drop(ids)
            return int(ids.size)

    def set_nprobe(self, nprobe: int) -> None:
        with self.lock.write():
            self.params = replace(self.params, nprobe=nprobe)
            if self._nlist:
                faiss.extract_index_ivf(self._index).nprobe = nprobe

    # --------------------------------------------------------------------------------------- rebuilds

    def _needs_rebuild(self, n_after: int) -> bool:
        if not self._nlist:
            return n_after >= self.params.exact_threshold
        grown = n_after >= self.params.regrow_factor * self._trained_for
        return grown and choose_nlist(n_after, self.params) > self._nlist

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        parts = [
            self._index.reconstruct_batch(ids[i : i + _RECONSTRUCT_CHUNK])
            for i in range(0, ids.size, _RECONSTRUCT_CHUNK)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def _rebuild(self, extra_ids: np.ndarray, extra_keys: np.ndarray) -> None:
        """Re-create the index for the new size from the stored vectors plus ``extra`` (write lock held)."""
        old_ids = self._meta.alive_ids()
        ids = np.concatenate([old_ids, extra_ids])
        keys = np.concatenate([self._reconstruct(old_ids), extra_keys])
        n = int(ids.size)
        if n < self.params.exact_threshold:
            index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            nlist = 0
        else:
            nlist = choose_nlist(n, self.params)
            log.info("building IVF index: %d memories, nlist=%d", n, nlist)
            index = self._train_ivf(keys, nlist)
        index.add_with_ids(keys, ids)
        self._index, self._nlist, self._trained_for = index, nlist, n
        log.info("index is now %s with %d memories", self.kind, n)

    def _train_ivf(self, keys: np.ndarray, nlist: int) -> faiss.Index:
        rng = np.random.default_rng(self.params.seed)
        n_train = min(keys.shape[0], self.params.train_points_per_list * nlist)
        sample = keys[np.sort(rng.choice(keys.shape[0], n_train, replace=False))]
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.params.seed
        index.cp.max_points_per_centroid = self.params.train_points_per_list
        index.train(sample)  # the Python wrapper keeps `quantizer` alive as long as `index`
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        index.nprobe = self.params.nprobe
        return index

    # ------------------------------------------------------------------------------------ persistence

    def capture(self) -> IndexImage:
        """An in-memory copy of the index and its metadata (read lock held only for the copy)."""
        with self.lock.read():
            return IndexImage(
                index=faiss.serialize_index(self._index),  # (bytes,) uint8
                columns={name: col.copy() for name, col in self._meta.state().items()},
                users=list(self._meta.user_names),
                info={"dim": self.dim, "nlist": self._nlist, "trained_for": self._trained_for},
            )

    def save(self, directory: Path) -> None:
        self.capture().write(directory)

    @classmethod
    def load(cls, directory: Path, params: IndexParams) -> MemoryIndex:
        """Read a snapshot written by :meth:`save`; SnapshotError names a file that cannot be read."""
        with snapshot_file(directory / "meta.json") as path:
            info = json.loads(path.read_text())
            self = cls(int(info["dim"]), params)
        with snapshot_file(directory / "meta.npz") as path, np.load(path) as arrays:
            state = {name: arrays[name] for name in arrays.files}
        with snapshot_file(directory / "users.json") as path:
            self._meta = _Metadata.from_state(state, json.loads(path.read_text()))
        alive = self._meta.alive
        self._transitions.add(self._meta.item[alive], self._meta.recent[alive])
        with snapshot_file(directory / "index.faiss") as path:
            self._index = faiss.read_index(str(path))
        self._nlist, self._trained_for = int(info["nlist"]), int(info["trained_for"])
        if self._nlist:
            faiss.extract_index_ivf(self._index).nprobe = params.nprobe
        if self._index.ntotal != self._meta.count:
            raise SnapshotError(
                f"snapshot in {directory} is inconsistent: {self._index.ntotal} vectors, "
                f"{self._meta.count} metadata rows"
            )
        return self


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` with named arrays (its stub types ``**kwds`` as bool)."""
    savez: Any = np.savez
    savez(path, **arrays)


async def followers_now(index: MemoryIndex, items: Sequence[int]) -> list[Followers]:
    """:meth:`MemoryIndex.followers` from a coroutine, as :func:`search_now` searches."""
    return await _read_now(index.try_followers, index.followers, items)


async def search_now(
    index: MemoryIndex, queries: np.ndarray, k: int, with_keys: bool = False
) -> SearchResult:
    """:meth:`MemoryIndex.search` from a coroutine: in the calling thread when the lock is free, else in a
    worker thread, so the event loop never blocks behind a writer."""
    return await _read_now(index.try_search, index.search, queries, k, with_keys)


async def _read_now(attempt: Callable[..., R | None], read: Callable[..., R], *args: Any) -> R:
    """``attempt(*args)`` (a non-blocking read: None while a writer holds or awaits the lock), else
    ``read(*args)`` in a worker thread."""
    result = attempt(*args)
    if result is None:
        result = await asyncio.to_thread(read, *args)
    return result
