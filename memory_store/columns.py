"""The metadata columns beside the FAISS index: per memory its item, user, timestamp, prefix length and
the prefix's last items, in NumPy arrays indexed by ``id - base``.

A search returns the metadata of a whole batch with fancy indexing, never a round trip per hit. ``base``
moves up as the oldest memories leave, so the columns stay about as long as the ids held span. Not
locked: the index's lock guards them.

Bytes per memory (``DTYPES``; 41 at the service's five prefix items, 65 when ids were int64): item ids
are int32 (MemoryBatch.create refuses ids above ``base.MAX_ITEM_ID``), and ``lists``, the IVF list that
holds the memory (memory_store.ivf), is the index's: never part of a snapshot (rebuilt from the FAISS
index when one is read). Snapshots written with int64 columns are read into these types.
"""

from __future__ import annotations

import numpy as np

from memory_store.base import MemoryBatch, SnapshotError, fit_recent

# Every column grows and shifts together; their state (plus ``base``), all but ``lists``, is what a
# snapshot stores.
COLUMNS = ("alive", "item", "user", "ts", "plen", "recent", "lists")
DTYPES = {
    "alive": np.dtype(bool),
    "item": np.dtype(np.int32),
    "user": np.dtype(np.int32),  # code into user_names
    "ts": np.dtype(np.float64),
    "plen": np.dtype(np.int32),
    "recent": np.dtype(np.int32),
    "lists": np.dtype(np.int32),
}
# Columns a snapshot must hold: ``recent`` may be missing (written before memories kept their prefix's
# last items: none known).
REQUIRED = ("base", "alive", "item", "user", "ts", "plen")


class MemoryColumns:
    """Per-memory columns indexed by ``id - base``; ``recent`` is (size, recent_width)."""

    def __init__(self, recent_width: int) -> None:
        self.base = 1
        size = 1024  # never empty: padding rows of a search gather row 0
        self.alive: np.ndarray = np.zeros(size, DTYPES["alive"])
        self.item: np.ndarray = np.zeros(size, DTYPES["item"])
        self.user: np.ndarray = np.zeros(size, DTYPES["user"])
        self.ts: np.ndarray = np.zeros(size, DTYPES["ts"])
        self.plen: np.ndarray = np.zeros(size, DTYPES["plen"])
        # the prefix's last items (MemoryBatch.recent)
        self.recent: np.ndarray = np.zeros((size, recent_width), DTYPES["recent"])
        self.lists: np.ndarray = np.zeros(size, DTYPES["lists"])  # the IVF list of each memory (the index's)
        self.user_names: list[str] = []
        self._user_code: dict[str, int] = {}
        self._names_arr = np.array([""], dtype=object)  # user_names + [""] (padding), for fancy indexing
        self.count = 0
        self._low = 0  # no alive row below this one

    def in_range(self, ids: np.ndarray) -> np.ndarray:
        rows = ids - self.base
        inside: np.ndarray = (rows >= 0) & (rows < self.alive.shape[0])
        return inside

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
        for name in COLUMNS:
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

    def _grow_down(self, min_id: int) -> None:
        """Move ``base`` down to ``min_id``: ids of a namespace's slot groups are ``seq * G + g``, so a
        group that wrote little since the oldest memories left can add ids below the base."""
        shift = self.base - min_id
        for name in COLUMNS:
            old = getattr(self, name)
            grown = np.zeros((old.shape[0] + shift, *old.shape[1:]), old.dtype)
            grown[shift:] = old
            setattr(self, name, grown)
        self.base = min_id
        self._low += shift

    def put(self, ids: np.ndarray, batch: MemoryBatch) -> None:
        """Set the rows of ``ids``; ``batch.recent`` must have this table's width (MemoryBatch.fitted)."""
        if ids.min() < self.base:
            self._grow_down(int(ids.min()))
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
        """Mark ``ids`` dead and clear their values: a snapshot taken afterwards holds nothing of them."""
        rows = ids - self.base
        self.alive[rows] = False
        for name in COLUMNS[1:]:
            getattr(self, name)[rows] = 0
        self.count -= int(ids.size)
        self._compact_if_sparse()

    def ids_of_user(self, user: str) -> np.ndarray:
        """(m,) int64 ascending: the alive ids whose memory is ``user``'s."""
        code = self._user_code.get(user)
        if code is None:
            return np.zeros(0, np.int64)
        return (np.flatnonzero(self.alive & (self.user == code)) + self.base).astype(np.int64)

    def names_held(self) -> list[str]:
        """``user_names`` with "" for every user no alive memory belongs to (an erased user's name never
        reaches a snapshot); the codes stay where they are."""
        held = np.zeros(len(self.user_names), bool)
        held[np.unique(self.user[self.alive])] = True
        return [name if keep else "" for name, keep in zip(self.user_names, held.tolist(), strict=True)]

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
        for name in COLUMNS:
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

    def nbytes(self) -> int:
        """Bytes of the columns (their whole length, grown ahead of the ids held)."""
        return sum(getattr(self, name).nbytes for name in COLUMNS)

    def older_than(self, cutoff: float) -> np.ndarray:
        """(m,) int64 ascending: the alive ids whose timestamp is before ``cutoff`` (one vectorised scan)."""
        return (np.flatnonzero(self.alive & (self.ts < cutoff)) + self.base).astype(np.int64)

    def state(self) -> dict[str, np.ndarray]:
        """The stored columns up to the last alive row (the rows grown ahead stay out of snapshots)."""
        alive = np.flatnonzero(self.alive)
        end = int(alive[-1]) + 1 if alive.size else 1
        return {
            "base": np.array([self.base], np.int64),
            "alive": self.alive[:end],
            "item": self.item[:end],
            "user": self.user[:end],
            "ts": self.ts[:end],
            "plen": self.plen[:end],
            "recent": self.recent[:end],
        }

    @classmethod
    def from_state(
        cls, arrays: dict[str, np.ndarray], user_names: list[str], recent_width: int
    ) -> MemoryColumns:
        """Columns from :meth:`state`; stored prefix items of another width are fitted to ``recent_width``."""
        cols = cls(recent_width)
        cols.base = int(arrays["base"][0])
        size = arrays["alive"].shape[0]
        stored = arrays.get("recent", np.zeros((size, 0), np.int64))  # absent: none known
        loaded = {**arrays, "recent": fit_recent(stored, recent_width), "lists": np.zeros(size, np.int32)}
        for name in COLUMNS:  # int64 in snapshots written before the columns were narrowed
            setattr(cols, name, _as_dtype(loaded[name], DTYPES[name], name))
        cols.user_names = user_names
        cols._user_code = {name: i for i, name in enumerate(user_names)}
        cols._names_arr = np.array(user_names + [""], dtype=object)
        cols.count = int(cols.alive.sum())
        return cols


def _as_dtype(a: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """``a`` in ``dtype``; SnapshotError if an integer value does not fit (not a snapshot of ours)."""
    if a.dtype == dtype:
        return a
    if dtype.kind == "i" and a.size:
        info = np.iinfo(dtype)
        if int(a.min()) < info.min or int(a.max()) > info.max:
            raise SnapshotError(f"snapshot column {name} holds values outside {dtype}")
    return a.astype(dtype)
