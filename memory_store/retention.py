"""Retention by age: memories whose timestamp is more than ``StoreConfig.max_age_s`` old are evicted.

Count-based retention (``capacity``, ``user_capacity``) evicts inside each write. Age is a property of
the memories already held, so both backends sweep instead, at write time and at most once per
:attr:`AgeSweep.every_s`: this replica's index finds the memories older than the cutoff (one vectorised
scan of its timestamp column, about 10 ms at 10M memories) and the backend removes them the way it
removes any memory, through its log, so every replica drops them and their item transitions with them
(the embedded store: one ``remove`` record; Redis: ``layout.EXPIRE_SCRIPT``, which re-checks each
memory's timestamp in Redis, since replicas sweep concurrently and each sees its own applied log).

The age is the memory's own timestamp: its interaction's. The artifact's memory bank is loaded with
timestamp 0 (its time is not known), so with an age limit the bank goes at the first sweep; a store
that must keep it while it is useful bounds its memories by count instead. A memory outlives its limit
by at most ``every_s`` plus the time to the next write: without writes nothing changes, neither in
the bank nor in what a search can find.
"""

from __future__ import annotations

import time

SWEEP_EVERY_S = 1.0


class AgeSweep:
    """When the next sweep is due, and the cutoff it applies. Not locked: its store calls it from its
    write path (the embedded store under its write lock; Redis from the event loop)."""

    def __init__(self, max_age_s: float | None) -> None:
        self.max_age_s = max_age_s
        # a quarter of the limit at most: a short limit (tests, a store of recent taste only) still
        # holds within a quarter of itself
        self.every_s = SWEEP_EVERY_S if max_age_s is None else min(SWEEP_EVERY_S, max_age_s / 4)
        self._next = 0.0  # the first write sweeps

    def due(self, now: float | None = None) -> float | None:
        """The cutoff (unix seconds: memories with a timestamp before it go) if a sweep is due at
        ``now``, which it then records as done; None if there is no limit or it is not time yet."""
        if self.max_age_s is None:
            return None
        now = time.time() if now is None else now
        if now < self._next:
            return None
        self._next = now + self.every_s
        return now - self.max_age_s
