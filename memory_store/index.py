"""The in-process FAISS index of collaborative memories, with the metadata the retriever needs beside it.

* Ids are the store's memory ids, so memories can be removed: an ``IndexIDMap2`` over a flat index while
  the bank is small (exact search), an ``IndexIVFFlat`` with a hashtable direct map once it is large
  (approximate; the direct map makes removal O(1) per id and allows reconstruction for rebuilds).
* Metadata (item, user, timestamp, prefix length, the prefix's last ``recent_width`` items) live in
  NumPy columns (``memory_store.columns``). The item transitions of the memories held
  (``memory_store.transitions``) change with them.
* FAISS is not safe for concurrent add and search: every call takes a readers-writer lock
  (``memory_store.rwlock``). FAISS releases the GIL, so searches run in parallel threads.
* The stores search in the event-loop thread itself while no writer holds the lock (:func:`search_now`):
  a micro-batch search takes well under a millisecond, less than a hop to a worker thread costs under
  load. Only while a writer holds it (a log batch, a rebuild) does the search wait in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np

from memory_store.base import MemoryBatch, SearchResult, SnapshotError
from memory_store.columns import REQUIRED, MemoryColumns
from memory_store.config import IndexParams
from memory_store.rwlock import ReadWriteLock
from memory_store.snapshot import IndexImage, read_index_files
from memory_store.transitions import Followers, TransitionTable

log = logging.getLogger(__name__)

_RECONSTRUCT_CHUNK = 262_144
R = TypeVar("R")


def choose_nlist(n: int, params: IndexParams) -> int:
    """A power of two near ``nlist_per_sqrt · sqrt(n)``, clamped to the configured range and to the
    number of lists ``n`` vectors can train (``train_points_per_list`` each)."""
    target = max(1.0, params.nlist_per_sqrt * math.sqrt(max(n, 1)))
    nlist = min(max(2 ** round(math.log2(target)), params.min_nlist), params.max_nlist)
    trainable = max(1, n // params.train_points_per_list)
    return int(min(nlist, 2 ** int(math.log2(trainable))))


class MemoryIndex:
    """FAISS index + metadata columns, guarded by a readers-writer lock. Keys must be unit-norm.

    ``recent_width``: prefix items kept per memory (StoreConfig.recent_width; 0 keeps none). Batches of
    another width are fitted to it (MemoryBatch.fitted), so data stored under another width stays readable.
    """

    def __init__(self, dim: int, params: IndexParams, recent_width: int = 0) -> None:
        self.dim = dim
        self.params = params
        self.recent_width = recent_width
        self.lock = ReadWriteLock()
        self._meta = MemoryColumns(recent_width)
        self._transitions = TransitionTable(recent_width)  # of the memories in _meta, changed with it
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

    def ids_of_user(self, user: str) -> np.ndarray:
        """(m,) int64: the ids of ``user``'s memories held (a scan of the user column)."""
        with self.lock.read():
            return self._meta.ids_of_user(user)

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
        if with_keys:  # the vectors read during the search itself: no lookup by id afterwards
            scores, ids, keys = self._index.search_and_reconstruct(queries, k)  # (B, k), (B, k, dim)
            keys[ids < 0] = 0.0  # FAISS leaves NaN at padding
        else:
            scores, ids = self._index.search(queries, k)  # (B, k) each
        items, users, plens, ts = self._meta.gather(ids)
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

    def predecessors(self, first: int) -> dict[int, Followers]:
        """Every next item ≥ ``first`` (the items registered after training) → the items before it in
        the memories held, as a :class:`Followers` row of predecessors: ``items`` the items at ``lags``
        before it, ``counts`` how many memories. One vectorised pass over the metadata."""
        with self.lock.read():
            meta = self._meta
            rows = np.flatnonzero(meta.alive & (meta.item >= first))
            return predecessor_rows(meta.item[rows], meta.recent[rows])

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
        ids, batch = np.asarray(ids, np.int64), batch.fitted(self.recent_width)
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
                users=self._meta.names_held(),
                info={"dim": self.dim, "nlist": self._nlist, "trained_for": self._trained_for},
            )

    def save(self, directory: Path) -> None:
        self.capture().write(directory)

    @classmethod
    def load(cls, directory: Path, params: IndexParams, recent_width: int = 0) -> MemoryIndex:
        """Read a snapshot written by :meth:`save` (memory_store.snapshot); SnapshotError names a file
        that cannot be read. Its prefix items are fitted to ``recent_width``."""
        files = read_index_files(directory, REQUIRED)
        self = cls(files.info["dim"], params, recent_width)
        self._meta = MemoryColumns.from_state(files.columns, files.users, recent_width)
        alive = self._meta.alive
        self._transitions.add(self._meta.item[alive], self._meta.recent[alive])
        self._index = files.index
        self._nlist, self._trained_for = files.info["nlist"], files.info["trained_for"]
        if self._nlist:
            faiss.extract_index_ivf(self._index).nprobe = params.nprobe
        if self._index.ntotal != self._meta.count:
            raise SnapshotError(
                f"snapshot in {directory} is inconsistent: {self._index.ntotal} vectors, "
                f"{self._meta.count} metadata rows"
            )
        return self


def predecessor_rows(items: np.ndarray, recent: np.ndarray) -> dict[int, Followers]:
    """Memories' next items (n,) and prefix items (n, width) → per next item, the items before it by
    lag, counted; sorted by predecessor, then lag."""
    n, width = recent.shape
    if not n or not width:
        return {}
    lag = np.broadcast_to(np.arange(1, width + 1, dtype=np.int64), (n, width))
    nxt = np.broadcast_to(items.astype(np.int64)[:, None], (n, width))
    present = recent > 0
    b, a, k = nxt[present], recent[present].astype(np.int64), lag[present]
    if not b.size:
        return {}
    span = int(a.max()) + 1
    codes, counts = np.unique((b * span + a) * (width + 1) + k, return_counts=True)  # by b, a, lag
    pair, lags = codes // (width + 1), codes % (width + 1)
    of, before = pair // span, pair % span
    starts = np.flatnonzero(np.r_[True, of[1:] != of[:-1]])
    ends = np.r_[starts[1:], of.size]
    return {
        int(of[s]): Followers(before[s:e], lags[s:e], counts[s:e]) for s, e in zip(starts, ends, strict=True)
    }


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
