"""The readers-writer lock that guards a memory index (FAISS is not safe for concurrent add and search).

Searches share it; adds, removes and rebuilds hold it alone. Writers are preferred: a waiting writer
blocks new readers, so a storm of searches cannot starve the replication log. :meth:`try_read` never
waits, so an event-loop thread can fall back to a worker thread instead of blocking behind a writer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


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
