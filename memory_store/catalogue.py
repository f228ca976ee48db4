"""The living catalogue as one replica holds it: the items made unavailable, and the registry of items
first seen after the model was trained (their internal ids ``first_new_item``, ``first_new_item + 1``, …).

Both backends keep the authoritative copy in their own way (Redis: a set and a hash, changed by Lua
scripts that also append a log entry; embedded: log records and the snapshot) and apply every change
to a :class:`Catalogue` here, so reading it on the request path costs no round trip.

Readers run in the event-loop thread while a change may be applied in a worker thread: every change
builds new objects and swaps the references, so a reader always sees one consistent version (never a
set or dict being resized). The objects handed out must not be mutated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

_NO_ITEMS = np.zeros(0, np.int64)


class Catalogue:
    """Unavailable item ids and registered new items (external id → internal id)."""

    def __init__(self) -> None:
        self._unavailable: frozenset[int] = frozenset()
        self._unavailable_ids = _NO_ITEMS  # (m,) int64, sorted: the request path's mask
        self._new: dict[str, int] = {}  # replaced, never changed in place

    # ---------------------------------------------------------------------------------- availability

    def set_available(self, items: Iterable[int], available: bool) -> list[int]:
        """Mark ``items`` available (True) or unavailable (False); returns the ids whose state changed."""
        current = self._unavailable
        wanted = dict.fromkeys(int(i) for i in items)
        changed = [i for i in wanted if (i in current) == available]
        if changed:
            updated = current - set(changed) if available else current | set(changed)
            self._unavailable = frozenset(updated)
            self._unavailable_ids = np.asarray(sorted(updated), np.int64)
        return changed

    def unavailable(self) -> np.ndarray:
        """(m,) int64 sorted ids of the unavailable items; read-only."""
        return self._unavailable_ids

    def is_unavailable(self, item: int) -> bool:
        return item in self._unavailable

    # --------------------------------------------------------------------------------------- registry

    def register(self, pairs: Mapping[str, int]) -> None:
        """Record registered items (idempotent: a name keeps the id it was first given)."""
        fresh = {name: int(i) for name, i in pairs.items() if name not in self._new}
        if fresh:
            self._new = {**self._new, **fresh}

    def new_items(self) -> Mapping[str, int]:
        """External id → internal id of every registered new item; the same object until the next
        registration, so callers may cache what they derive from it by identity."""
        return self._new

    def next_new_item(self, first_new_item: int) -> int:
        """The id the next registration gets: past ``first_new_item - 1`` and every id given."""
        return max(first_new_item, max(self._new.values(), default=0) + 1)

    # ---------------------------------------------------------------------------------- persistence

    def state(self) -> dict[str, Any]:
        """JSON-ready state (the embedded backend's snapshot)."""
        return {"unavailable": self._unavailable_ids.tolist(), "new_items": dict(self._new)}

    @classmethod
    def from_state(cls, unavailable: Iterable[int], new_items: Mapping[str, int]) -> Catalogue:
        out = cls()
        out.set_available(unavailable, False)
        out.register(new_items)
        return out
