"""The in-process FAISS index of collaborative memories, with the metadata the retriever needs beside it.

* Ids are the store's memory ids, so memories can be removed: an ``IndexIDMap2`` over a flat index while
  the bank is small (exact search), an IVF index of ``IndexParams.kind`` once it is large (approximate:
  float32, half-float or 8-bit codes; ``memory_store.ivf``). The IVF list of each memory is kept in a
  column, which makes a removal touch only its lists, and a regrow moves the codes as they are (never
  quantised twice).
* Metadata (item, user, timestamp, prefix length, the prefix's last ``recent_width`` items) live in
  NumPy columns (``memory_store.columns``). The item transitions of the memories held
  (``memory_store.transitions``) change with them.
* ``search(..., with_keys=True)`` returns the keys as the index stores them: decoded codes of a
  compressed kind (SQ8: off by 0.0008 per dimension on average on the Beauty encoder's unit states),
  never the vectors written. The fusion reads them; reports/index_scale.md measures what it costs.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np

from memory_store import ivf
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
        self._ivf: faiss.IndexIVF | None = None  # self._index once it is an IVF index (None: exact)
        self._trained_for = 0

    # ---------------------------------------------------------------------------------------- queries

    def __len__(self) -> int:
        return self._meta.count

    @property
    def _nlist(self) -> int:
        return int(self._ivf.nlist) if self._ivf is not None else 0

    @property
    def kind(self) -> str:
        """``flat`` (exact) or the IVF index: ``ivf4096``, ``ivf4096-sq8``, ``ivf4096-fp16``."""
        return ivf.label(self._ivf) if self._ivf is not None else "flat"

    @property
    def conforms(self) -> bool:
        """Whether the index is still exact or of a kind ``params`` builds (False after reading a
        snapshot written under another kind)."""
        return self._ivf is None or self.params.builds(ivf.kind_of(self._ivf))

    def footprint(self) -> dict[str, int]:
        """Bytes held, by part: ``index`` (codes and ids in the lists, or the flat vectors, and the
        coarse centroids), ``columns`` (memory_store.columns), ``transitions`` (the rows' arrays)."""
        with self.lock.read():
            n, dim = int(self._index.ntotal), self.dim
            if self._ivf is not None:
                index = n * (self._ivf.code_size + 8) + self._nlist * dim * 4
            else:
                index = n * (4 * dim + 8)  # IndexIDMap2: vectors, ids and the id → row map
            return {"index": index, "columns": self._meta.nbytes(), "transitions": self._transitions.nbytes()}

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
        """Stored vectors (n, dim) of present ids (decoded codes for a compressed kind)."""
        with self.lock.read():
            return self._reconstruct(np.asarray(ids, np.int64))

    def older_than(self, cutoff: float) -> np.ndarray:
        """(m,) int64 ascending: the ids of the memories whose timestamp is before ``cutoff``."""
        with self.lock.read():
            return self._meta.older_than(cutoff)

    # ----------------------------------------------------------------------------------------- writes

    def add(self, ids: np.ndarray, batch: MemoryBatch) -> int:
        """Add memories; ids already present are skipped (replay is idempotent). Returns the number added."""
        ids, batch = np.asarray(ids, np.int64), batch.fitted(self.recent_width)
        with self.lock.write():
            fresh = ~self._meta.is_alive(ids)
            if not fresh.all():
                rows = np.flatnonzero(fresh)
                ids, batch = ids[rows], batch.take(rows)
            if not ids.size:
                return 0
            if self._needs_rebuild(self._meta.count + int(ids.size)):
                lists = self._rebuild(extra_ids=ids, extra_keys=batch.keys)
            elif self._ivf is not None:
                lists = ivf.add(self._ivf, ids, batch.keys)
            else:
                self._index.add_with_ids(batch.keys, ids)
                lists = None
            self._meta.put(ids, batch)
            if lists is not None:
                self._meta.lists[ids - self._meta.base] = lists
            self._transitions.add(batch.items, batch.recent)
            return int(ids.size)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids; absent ids are ignored (replay is idempotent). Returns the number removed."""
        ids = np.asarray(ids, np.int64)
        with self.lock.write():
            ids = np.unique(ids[self._meta.is_alive(ids)])
            if not ids.size:
                return 0
            rows = ids - self._meta.base
            if self._ivf is not None:  # only the lists that hold them
                removed = ivf.remove(self._ivf, ids, self._meta.lists[rows])
            else:
                removed = self._index.remove_ids(faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)))
            if removed != ids.size:
                raise RuntimeError(f"FAISS removed {removed} of {ids.size} ids: index and metadata disagree")
            self._transitions.remove(self._meta.item[rows], self._meta.recent[rows])
            self._meta.drop(ids)
            return int(ids.size)

    def conform(self) -> MemoryIndex:
        """Rebuild the index in the configured kind if it holds another (see :attr:`conforms`), its
        codes decoded and encoded anew; returns self."""
        with self.lock.write():
            if not self.conforms:
                log.info("index %s is rebuilt as %s (the configured kind)", self.kind, self.params.kind)
                self._rebuild(np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32))
        return self

    def set_nprobe(self, nprobe: int) -> None:
        with self.lock.write():
            self.params = replace(self.params, nprobe=nprobe)
            if self._ivf is not None:
                self._ivf.nprobe = nprobe

    # --------------------------------------------------------------------------------------- rebuilds

    def _needs_rebuild(self, n_after: int) -> bool:
        if not self._nlist:
            return n_after >= self.params.exact_threshold
        grown = n_after >= self.params.regrow_factor * self._trained_for
        return grown and choose_nlist(n_after, self.params) > self._nlist

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        if self._ivf is not None:
            return ivf.reconstruct(self._ivf, ids, self._meta.lists[ids - self._meta.base])
        parts = [
            self._index.reconstruct_batch(ids[i : i + _RECONSTRUCT_CHUNK])
            for i in range(0, ids.size, _RECONSTRUCT_CHUNK)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def _stored(self, fraction: float = 1.0) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
        """(ids, codes or None for the flat index, vectors) of the memories held, a chunk at a time;
        ``fraction`` < 1: a random share of them (seeded), for a training sample."""
        if self._ivf is not None:
            for ids, codes in ivf.entries(self._ivf, fraction, self.params.seed):
                yield ids, codes, ivf.decode(self._ivf, codes)
            return
        ids = self._meta.alive_ids()
        if fraction < 1.0:
            ids = ids[np.random.default_rng(self.params.seed).random(ids.size) < fraction]
        for s in range(0, ids.size, _RECONSTRUCT_CHUNK):
            part = ids[s : s + _RECONSTRUCT_CHUNK]
            yield part, None, self._index.reconstruct_batch(part)

    def _rebuild(self, extra_ids: np.ndarray, extra_keys: np.ndarray) -> np.ndarray | None:
        """Re-create the index for the new size from the stored codes plus ``extra`` (write lock held);
        returns the IVF list of each extra memory (None: the index is exact). The held memories' lists
        are updated here; the extra memories' metadata is the caller's."""
        n = self._meta.count + int(extra_ids.size)
        if n < self.params.exact_threshold:
            old_ids = self._meta.alive_ids()
            index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            index.add_with_ids(
                np.concatenate([self._reconstruct(old_ids), extra_keys]), np.concatenate([old_ids, extra_ids])
            )
            self._index, self._ivf, self._trained_for = index, None, n
            return None
        nlist, kind = choose_nlist(n, self.params), self.params.kind_for(n)
        log.info("building %s IVF index: %d memories, nlist=%d", kind, n, nlist)
        new = ivf.create(kind, self.dim, nlist, self.params)
        keep_codec = self._ivf is not None and ivf.kind_of(self._ivf) == kind
        ivf.train(new, self._training_sample(extra_keys, nlist), codec_of=self._ivf if keep_codec else None)
        for ids, codes, vectors in self._stored():
            lists = ivf.assign(new, vectors)
            ivf.add_codes(
                new, ids, codes if keep_codec and codes is not None else ivf.encode(new, vectors), lists
            )
            self._meta.lists[ids - self._meta.base] = lists
        extra_lists = ivf.add(new, extra_ids, extra_keys)
        self._index, self._ivf, self._trained_for = new, new, n
        ivf.release_freed_memory()  # the old index's lists
        log.info("index is now %s with %d memories", self.kind, n)
        return extra_lists

    def _training_sample(self, extra_keys: np.ndarray, nlist: int) -> np.ndarray:
        """About ``train_points_per_list · nlist`` vectors drawn evenly from those held and ``extra``."""
        n = self._meta.count + extra_keys.shape[0]
        fraction = min(1.0, self.params.train_points_per_list * nlist / n)
        rng = np.random.default_rng(self.params.seed)
        held = [vectors for _, _, vectors in self._stored(fraction)]
        if not extra_keys.shape[0]:
            return np.ascontiguousarray(np.concatenate(held), np.float32)
        extra = extra_keys[
            np.sort(rng.choice(extra_keys.shape[0], round(fraction * extra_keys.shape[0]), replace=False))
        ]
        return np.ascontiguousarray(np.concatenate([*held, extra]), np.float32)

    # ------------------------------------------------------------------------------------ persistence

    def capture(self) -> IndexImage:
        """An in-memory copy of the index and its metadata (read lock held only for the copy)."""
        with self.lock.read():
            return IndexImage(
                index=faiss.clone_index(self._index),
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
        self._index, self._trained_for = files.index, files.info["trained_for"]
        if self._index.ntotal != self._meta.count:
            raise SnapshotError(
                f"snapshot in {directory} is inconsistent: {self._index.ntotal} vectors, "
                f"{self._meta.count} metadata rows"
            )
        if files.info["nlist"]:
            self._ivf = _held_ivf(self._index, directory)
            self._ivf.nprobe = params.nprobe
            ids, lists = ivf.list_numbers(self._ivf)
            if not self._meta.is_alive(ids).all():
                raise SnapshotError(f"snapshot in {directory} is inconsistent: vectors without metadata")
            self._meta.lists[ids - self._meta.base] = lists
        alive = self._meta.alive
        self._transitions.add(self._meta.item[alive], self._meta.recent[alive])
        ivf.release_freed_memory()  # the reading's and the counting's transient arrays
        return self


def _held_ivf(index: faiss.Index, directory: Path) -> faiss.IndexIVF:
    """The IVF index of a snapshot, of a kind this program reads (SnapshotError otherwise), without the
    direct map snapshots written before the ``lists`` column carried."""
    try:
        ivf.kind_of(index)
    except ValueError as exc:
        raise SnapshotError(f"snapshot in {directory}: {exc}") from exc
    assert isinstance(index, faiss.IndexIVF)  # kind_of knows IVF indexes only
    ivf.drop_direct_map(index)
    return index


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
