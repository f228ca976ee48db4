"""The embedded backend's interaction log: every accepted interaction, in append-only files of its own
beside the write-ahead log, so that a snapshot (which deletes the WAL segments it covers) never
touches it.

Layout::

    {data_dir}/{namespace}/interactions/{first_lsn:016d}.jsonl    segments, oldest first
    one JSON line per row: [lsn, k, accepted_at, user, item, timestamp, event_id or null]

``lsn`` is the WAL record that accepted the row and ``k`` its place in that record; "lsn-k" is the
row's position. Rows are written when their WAL record is applied, live or replayed at start-up: a
record whose lsn the files already hold is skipped, so every accepted row is here exactly once, however
often the WAL is replayed. Opening drops a torn last line, and the rows of records the WAL does not
hold (a power cut without fsync may keep this file's tail and lose the WAL's).

Retention, by the time a row was accepted (``accepted_at``; an interaction's own timestamp is the
client's and may be years old in a replay): a segment is closed at ``SEGMENT_BYTES`` or, with a
retention, at a quarter of it in age; each time one is closed, the closed segments whose newest row
(their modification time) is past the retention are deleted. Reads skip older rows in any case.

Erasure rewrites the segments that hold the user's rows: O(log size), for a rare request to a store
that belongs to one process. Reads are paged by position, and the position after the last page read
is remembered with its byte offset, so reading the whole log page by page is one pass.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from memory_store.base import LoggedInteractions, parse_position

log = logging.getLogger(__name__)

SEGMENT_BYTES = 16 << 20  # ~200k rows
SUFFIX = ".jsonl"

Row = list[Any]  # [lsn, k, accepted_at, user, item, timestamp, event_id or None]


def _encode(row: Row) -> bytes:
    """One line: ASCII JSON, so any str (a lone surrogate too) encodes, and no id can hold a line break."""
    return (json.dumps(row, separators=(",", ":")) + "\n").encode()


def _good_lines(path: Path, durable_lsn: int) -> tuple[int, int]:
    """(byte length of the segment's valid prefix, lsn of its last row or 0): the prefix ends at a torn
    or unreadable line, or at the first row of a record past ``durable_lsn``."""
    end, last = 0, 0
    with path.open("rb") as f:
        for line in f:
            try:
                row = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                row = None
            if row is None or row[0] > durable_lsn:
                break
            end, last = end + len(line), int(row[0])
    return end, last


class InteractionLog:
    """The log in ``directory``; rows of WAL records up to ``durable_lsn`` (the WAL's last) are kept."""

    def __init__(self, directory: Path, fsync: bool, retention_s: float | None, durable_lsn: int) -> None:
        self.directory = directory
        self.fsync = fsync
        self.retention_s = retention_s
        directory.mkdir(parents=True, exist_ok=True)
        self.last_lsn = self._recover(durable_lsn)
        self._file: BinaryIO | None = None
        self._opened_at = 0.0  # accepted_at of the open segment's first row
        self._cursor: tuple[str, Path, int] | None = None  # (position, segment, byte offset after it)

    def _segments(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{SUFFIX}"))

    def _recover(self, durable_lsn: int) -> int:
        """Cut what the WAL does not hold and a torn tail; the last lsn kept (0: none)."""
        last = 0
        for path in reversed(self._segments()):
            if int(path.stem) > durable_lsn:
                path.unlink()
                continue
            end, last = _good_lines(path, durable_lsn)
            if end < path.stat().st_size:
                log.warning("truncating the interaction log %s at byte %d", path.name, end)
                with path.open("r+b") as f:
                    f.truncate(end)
            if last:
                break
        return last

    # ------------------------------------------------------------------------------------------ write

    def append(
        self,
        lsn: int,
        accepted_at: float,
        users: Sequence[str],
        items: np.ndarray,
        timestamps: np.ndarray,
        event_ids: Sequence[str | None],
    ) -> None:
        """The rows of WAL record ``lsn``; nothing when the log holds that record already."""
        if lsn <= self.last_lsn or not users:
            return
        f = self._segment_for(lsn, accepted_at)
        rows = zip(users, items.tolist(), timestamps.tolist(), event_ids, strict=True)
        f.write(b"".join(_encode([lsn, k, accepted_at, u, i, t, e]) for k, (u, i, t, e) in enumerate(rows)))
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
        self.last_lsn = lsn

    def _segment_for(self, lsn: int, accepted_at: float) -> BinaryIO:
        """The open segment, or a new one (named by ``lsn``) when it is full or old enough."""
        if self._file is not None:
            age_limit = self.retention_s / 4 if self.retention_s is not None else None
            old = age_limit is not None and accepted_at - self._opened_at >= age_limit
            if self._file.tell() < SEGMENT_BYTES and not old:
                return self._file
            self._file.close()
        self._file = (self.directory / f"{lsn:016d}{SUFFIX}").open("ab")
        self._opened_at = accepted_at
        if self.retention_s is not None:
            self._drop_expired(accepted_at - self.retention_s)
        return self._file

    def _drop_expired(self, cutoff: float) -> None:
        """Delete the closed segments whose newest row was accepted before ``cutoff``."""
        for path in self._segments()[:-1]:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                log.info("interaction log segment %s is past the retention: deleted", path.name)

    def erase(self, user: str, before_lsn: int) -> int:
        """Remove the rows of ``user`` written by records before ``before_lsn``; how many were removed."""
        needle = json.dumps(user).encode()  # how the user appears in a line
        removed = 0
        for path in self._segments():
            data = path.read_bytes()
            if needle not in data:
                continue
            kept, gone = [], 0
            for line in data.splitlines(keepends=True):
                row = json.loads(line)
                if row[3] == user and row[0] < before_lsn:
                    gone += 1
                else:
                    kept.append(line)
            if gone:
                self._rewrite(path, b"".join(kept))
                removed += gone
        return removed

    def _rewrite(self, path: Path, data: bytes) -> None:
        """Replace a segment's content, keeping its modification time (its newest row's, for retention)."""
        stat = path.stat()
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        reopen = self._file is not None and Path(self._file.name) == path
        if reopen and self._file is not None:
            self._file.close()
        tmp.replace(path)
        if reopen:
            self._file = path.open("ab")
        self._cursor = None

    # ------------------------------------------------------------------------------------------- read

    def read(self, after: str, count: int, now: float) -> LoggedInteractions:
        """Up to ``count`` rows after position ``after`` accepted within the retention, oldest first."""
        cutoff = now - self.retention_s if self.retention_s is not None else -np.inf
        start = parse_position(after) if after else (-1, -1)
        rows: list[Row] = []
        end: tuple[Path, int] | None = None
        for path, offset in self._start(after):
            with path.open("rb") as f:
                f.seek(offset)
                while len(rows) < count and (line := f.readline()).endswith(b"\n"):
                    offset += len(line)
                    row = json.loads(line)
                    if (row[0], row[1]) > start and row[2] >= cutoff:
                        rows.append(row)
                end = (path, offset)
            if len(rows) >= count:
                break
        if not rows:
            return LoggedInteractions.empty()
        position = f"{rows[-1][0]}-{rows[-1][1]}"
        if end is not None:
            self._cursor = (position, *end)
        return LoggedInteractions(
            users=tuple(r[3] for r in rows),
            items=np.asarray([r[4] for r in rows], np.int64),
            timestamps=np.asarray([r[5] for r in rows], np.float64),
            event_ids=tuple(r[6] for r in rows),
            accepted_at=np.asarray([r[2] for r in rows], np.float64),
            positions=tuple(f"{r[0]}-{r[1]}" for r in rows),
        )

    def _start(self, after: str) -> list[tuple[Path, int]]:
        """The segments to read from ``after`` on, each with the byte offset to start at."""
        segments = self._segments()
        if self._cursor is not None and self._cursor[0] == after and self._cursor[1] in segments:
            _, path, offset = self._cursor
            return [(path, offset)] + [(p, 0) for p in segments if p > path]
        if not after:
            return [(p, 0) for p in segments]
        lsn = parse_position(after)[0]
        first = max([i for i, p in enumerate(segments) if int(p.stem) <= lsn], default=0)
        return [(p, 0) for p in segments[first:]]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
