"""Item transitions of the memories held: how often item b was a memory's next item with item a at lag k
before it (lag 1 is the item just before b in the prefix, up to the width of the prefix items a memory
keeps: the store config's ``recent_width``, which the model owns as its transition order).

The table is a view of the memory bank, not state of its own: it lives beside the FAISS index and changes
with it (adds, evictions, removals, log replay, snapshot loads), so it always describes exactly the
memories the index holds. Counts are integers, so adding and removing a memory cancel exactly; how the
lags weigh is the model's choice (``model.transitions``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Followers:
    """The items that followed one item, one entry per (next item, lag): ``counts[j]`` memories had it
    at lag ``lags[j]`` (1 = just before) before ``items[j]``. Sorted by item, then lag. Integer arrays:
    the store's rows are int32 items, int16 lags, int32 counts, read-only (shared with every reader)."""

    items: np.ndarray  # (m,)
    lags: np.ndarray  # (m,) 1..width
    counts: np.ndarray  # (m,) ≥ 1

    @classmethod
    def empty(cls) -> Followers:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))


_EMPTY = Followers.empty()
_ADD_CHUNK = 1_000_000  # memories counted at a time: bounds the transient arrays of a bulk add
# The row dtypes: 10 bytes per (item, next item, lag) counted. Item ids fit int32 (base.MAX_ITEM_ID); a
# count is at most the number of memories.
_ITEM, _LAG, _COUNT = np.int32, np.int16, np.int32


class TransitionTable:
    """Per predecessor item, its :class:`Followers` row, kept in the form reads want: the request path only
    looks rows up, and a write rebuilds the rows it touches (about what the next read of them would
    cost). Built lazily on first read instead, the first requests after a start or a bulk load paid for
    thousands of rows (4.7 ms of a 37 ms batch on Sports).

    Rows are NumPy arrays, 10 bytes per entry: a table of Python dicts took about 60 bytes per entry (176
    bytes per memory at 1M memories of walks over Beauty's item transitions, more than an SQ8 index).
    Not locked: its owner's lock guards it."""

    def __init__(self, width: int | None = None) -> None:
        # Lags per memory: the columns of the ``recent`` rows counted (None: those of the first rows
        # added). Fixed for the table's life, since it is part of every code.
        self.width = width
        self._rows: dict[int, Followers] = {}

    def __len__(self) -> int:
        """Distinct (item, next item, lag) triples counted."""
        return sum(r.items.size for r in self._rows.values())

    def nbytes(self) -> int:
        """Bytes of the rows' arrays."""
        return sum(r.items.nbytes + r.lags.nbytes + r.counts.nbytes for r in self._rows.values())

    def add(self, items: np.ndarray, recent: np.ndarray) -> None:
        """Count memories with next items ``items`` (n,) and prefixes ending in ``recent`` (n, width)."""
        for s in range(0, max(items.shape[0], 1), _ADD_CHUNK):
            self._update(items[s : s + _ADD_CHUNK], recent[s : s + _ADD_CHUNK], +1)

    def remove(self, items: np.ndarray, recent: np.ndarray) -> None:
        """Uncount memories counted by :meth:`add` (the same rows). Nothing changes if one was never
        counted (ValueError)."""
        self._update(items, recent, -1)

    def _update(self, items: np.ndarray, recent: np.ndarray, sign: int) -> None:
        width = self._width_of(recent)
        n = items.shape[0]
        if not n:
            return
        lag = np.broadcast_to(np.arange(width, dtype=np.int64), (n, width))
        code = items.astype(np.int64)[:, None] * width + lag  # (n, width): next item, then lag - 1
        present = recent > 0
        prev, code = recent[present].astype(np.int64), code[present]
        if not prev.size:
            return
        # One merge per touched row, with each distinct (prev, code) pair once: a bulk load repeats pairs
        span = int(code.max()) + 1
        # codes ≤ w·n² for n items: below 2^63 up to 10^9 items at w ≤ 9
        pairs, counts = np.unique(prev * span + code, return_counts=True)
        prevs, codes = pairs // span, pairs % span
        bounds = np.flatnonzero(np.r_[True, prevs[1:] != prevs[:-1], True]).tolist()
        merged = {
            int(prevs[s]): self._merged(int(prevs[s]), codes[s:e], sign * counts[s:e])
            for s, e in zip(bounds[:-1], bounds[1:], strict=True)
        }
        for a, row in merged.items():  # all rows checked first: a failed update changes nothing
            if row is None:
                self._rows.pop(a, None)
            else:
                self._rows[a] = row

    def _merged(self, item: int, codes: np.ndarray, deltas: np.ndarray) -> Followers | None:
        """Row ``item`` with ``deltas`` (m,) added at ``codes`` (m,) ascending (None once empty)."""
        width = self.width or 1  # a row exists only after an add fixed the width (≥ 1 lag counted)
        old = self._rows.get(item, _EMPTY)
        old_codes = old.items.astype(np.int64) * width + old.lags - 1  # ascending, as the row is sorted
        at = np.searchsorted(old_codes, codes)
        found = at < old_codes.size
        found[found] = old_codes[at[found]] == codes[found]
        counts = old.counts.astype(np.int64)
        counts[at[found]] += deltas[found]
        fresh = ~found
        if (counts < 0).any() or (deltas[fresh] < 0).any():
            raise ValueError(f"transition count of item {item} went negative: removed a memory never added")
        all_codes = np.insert(old_codes, at[fresh], codes[fresh])
        all_counts = np.insert(counts, at[fresh], deltas[fresh])
        keep = all_counts > 0
        if not keep.any():
            return None
        all_codes, all_counts = all_codes[keep], all_counts[keep]
        row = Followers(
            (all_codes // width).astype(_ITEM),
            (all_codes % width + 1).astype(_LAG),
            all_counts.astype(_COUNT),
        )
        for a in (row.items, row.lags, row.counts):
            a.flags.writeable = False
        return row

    def _width_of(self, recent: np.ndarray) -> int:
        """The table's width, fixed by the first rows when not given; other widths raise ValueError."""
        if self.width is None:
            self.width = int(recent.shape[1])
        elif recent.shape[1] != self.width:
            raise ValueError(
                f"recent must have {self.width} columns (the table's width), got {recent.shape[1]}"
            )
        return self.width

    def clear(self) -> None:
        self._rows.clear()

    def followers(self, item: int) -> Followers:
        return self._rows.get(item, _EMPTY)
