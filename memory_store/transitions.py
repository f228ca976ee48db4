"""Item transitions of the memories held: how often item b was a memory's next item with item a at lag k
before it (lag 1 is the item just before b in the prefix, up to ``RECENT``).

The table is a view of the memory bank, not state of its own: it lives beside the FAISS index and changes
with it (adds, evictions, removals, log replay, snapshot loads), so it always describes exactly the
memories the index holds. Counts are integers, so adding and removing a memory cancel exactly; how the
lags weigh is the model's choice (``model.transitions``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RECENT = 5  # prefix items kept with each memory (its lags)


@dataclass(frozen=True, slots=True)
class Followers:
    """The items that followed one item, one entry per (next item, lag): ``counts[j]`` memories had it
    at lag ``lags[j]`` (1 = just before) before ``items[j]``. Sorted by item, then lag."""

    items: np.ndarray  # (m,) int64
    lags: np.ndarray  # (m,) int64, 1..RECENT
    counts: np.ndarray  # (m,) int64, ≥ 1

    @classmethod
    def empty(cls) -> Followers:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))


class TransitionTable:
    """Per predecessor item: {next item · RECENT + lag − 1: count}. Not locked: its owner's lock guards it."""

    def __init__(self) -> None:
        self._rows: dict[int, dict[int, int]] = {}
        self._cache: dict[int, Followers] = {}  # built on first read, dropped when the row changes

    def __len__(self) -> int:
        """Distinct (item, next item, lag) triples counted."""
        return sum(len(r) for r in self._rows.values())

    def add(self, items: np.ndarray, recent: np.ndarray) -> None:
        """Count memories with next items ``items`` (n,) and prefixes ending in ``recent`` (n, RECENT)."""
        self._update(items, recent, +1)

    def remove(self, items: np.ndarray, recent: np.ndarray) -> None:
        """Uncount memories counted by :meth:`add` (the same rows)."""
        self._update(items, recent, -1)

    def _update(self, items: np.ndarray, recent: np.ndarray, sign: int) -> None:
        n = items.shape[0]
        if not n:
            return
        lag = np.broadcast_to(np.arange(RECENT, dtype=np.int64), (n, RECENT))
        code = items.astype(np.int64)[:, None] * RECENT + lag  # (n, RECENT)
        present = recent > 0
        prev, code = recent[present].astype(np.int64), code[present]
        if not prev.size:
            return
        # One dictionary update per distinct (prev, code) pair: a bulk load repeats pairs a lot.
        width = int(code.max()) + 1
        pairs, counts = np.unique(prev * width + code, return_counts=True)  # ≤ 5·n² < 2^63 below 10^9 items
        for a, c, m in zip(
            (pairs // width).tolist(), (pairs % width).tolist(), (sign * counts).tolist(), strict=True
        ):
            row = self._rows.setdefault(a, {})
            left = row.get(c, 0) + m
            if left > 0:
                row[c] = left
            elif left == 0:
                row.pop(c, None)
                if not row:
                    del self._rows[a]
            else:
                raise ValueError(f"transition count of item {a} went negative: removed a memory never added")
            self._cache.pop(a, None)

    def clear(self) -> None:
        self._rows.clear()
        self._cache.clear()

    def followers(self, item: int) -> Followers:
        cached = self._cache.get(item)
        if cached is not None:
            return cached
        row = self._rows.get(item)
        if not row:
            return Followers.empty()
        codes = np.fromiter(row.keys(), np.int64, len(row))
        counts = np.fromiter(row.values(), np.int64, len(row))
        order = np.argsort(codes)
        codes, counts = codes[order], counts[order]
        out = Followers(codes // RECENT, codes % RECENT + 1, counts)
        self._cache[item] = out
        return out
