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
    at lag ``lags[j]`` (1 = just before) before ``items[j]``. Sorted by item, then lag."""

    items: np.ndarray  # (m,) int64
    lags: np.ndarray  # (m,) int64, 1..width
    counts: np.ndarray  # (m,) int64, ≥ 1

    @classmethod
    def empty(cls) -> Followers:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))


_EMPTY = Followers.empty()


class TransitionTable:
    """Per predecessor item: {next item · width + lag − 1: count}. Not locked: its owner's lock guards it."""

    def __init__(self, width: int | None = None) -> None:
        # Lags per memory: the columns of the ``recent`` rows counted (None: those of the first rows
        # added). Fixed for the table's life, since it is part of every code.
        self.width = width
        self._rows: dict[int, dict[int, int]] = {}
        # Every row also in the form reads want, rebuilt whenever it changes: the request path only
        # looks rows up. Built lazily on first read instead, the first requests after a start or a bulk
        # load paid for thousands of rows (4.7 ms of a 37 ms batch on Sports), while rebuilding the rows a
        # write touches costs that write about what the next read of them would have.
        self._built: dict[int, Followers] = {}

    def __len__(self) -> int:
        """Distinct (item, next item, lag) triples counted."""
        return sum(len(r) for r in self._rows.values())

    def add(self, items: np.ndarray, recent: np.ndarray) -> None:
        """Count memories with next items ``items`` (n,) and prefixes ending in ``recent`` (n, width)."""
        self._update(items, recent, +1)

    def remove(self, items: np.ndarray, recent: np.ndarray) -> None:
        """Uncount memories counted by :meth:`add` (the same rows)."""
        self._update(items, recent, -1)

    def _update(self, items: np.ndarray, recent: np.ndarray, sign: int) -> None:
        width = self._width_of(recent)
        n = items.shape[0]
        if not n:
            return
        lag = np.broadcast_to(np.arange(width, dtype=np.int64), (n, width))
        code = items.astype(np.int64)[:, None] * width + lag  # (n, width)
        present = recent > 0
        prev, code = recent[present].astype(np.int64), code[present]
        if not prev.size:
            return
        # One dictionary update per distinct (prev, code) pair: a bulk load repeats pairs a lot.
        span = int(code.max()) + 1
        # codes ≤ w·n² for n items: below 2^63 up to 10^9 items at w ≤ 9
        pairs, counts = np.unique(prev * span + code, return_counts=True)
        prevs = pairs // span
        touched = np.unique(prevs).tolist()
        try:
            changes = zip(prevs.tolist(), (pairs % span).tolist(), (sign * counts).tolist(), strict=True)
            for a, c, m in changes:
                row = self._rows.setdefault(a, {})
                left = row.get(c, 0) + m
                if left > 0:
                    row[c] = left
                elif left == 0:
                    row.pop(c, None)
                    if not row:
                        del self._rows[a]
                else:
                    msg = f"transition count of item {a} went negative: removed a memory never added"
                    raise ValueError(msg)
        finally:  # rows changed before a failure are rebuilt too
            for a in touched:
                self._build(a)

    def _width_of(self, recent: np.ndarray) -> int:
        """The table's width, fixed by the first rows when not given; other widths raise ValueError."""
        if self.width is None:
            self.width = int(recent.shape[1])
        elif recent.shape[1] != self.width:
            raise ValueError(
                f"recent must have {self.width} columns (the table's width), got {recent.shape[1]}"
            )
        return self.width

    def _build(self, item: int) -> None:
        row = self._rows.get(item)
        if not row:
            self._rows.pop(item, None)
            self._built.pop(item, None)
            return
        codes = np.fromiter(row.keys(), np.int64, len(row))
        counts = np.fromiter(row.values(), np.int64, len(row))
        order = np.argsort(codes)
        codes, counts = codes[order], counts[order]
        width = self.width or 1  # a row exists only after an add fixed the width (≥ 1 lag counted)
        self._built[item] = Followers(codes // width, codes % width + 1, counts)

    def clear(self) -> None:
        self._rows.clear()
        self._built.clear()

    def followers(self, item: int) -> Followers:
        return self._built.get(item, _EMPTY)
