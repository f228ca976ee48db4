"""Append-only log of the embedded backend: framed, checksummed records in numbered segment files.

One record is one write (op name, a small JSON header, NumPy arrays). Layout on disk::

    segment  log-{first_lsn:016d}.wal
    record   magic u32 | payload_len u32 | lsn u64 | payload | crc32(payload) u32
    payload  header_len u32 | header JSON {"op", "meta", "arrays": [[name, dtype, shape], ...]} | array bytes

A crash can leave a torn record at the end of the newest segment; opening the log truncates it, so a
write either fully exists after a restart or not at all. Snapshots rotate to a new segment and delete
the segments they cover.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

log = logging.getLogger(__name__)

_MAGIC = 0x4D454D31  # "MEM1"
_HEAD = struct.Struct("<IIQ")
_CRC = struct.Struct("<I")
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Record:
    lsn: int
    op: str
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


def _segment_name(first_lsn: int) -> str:
    return f"log-{first_lsn:016d}.wal"


def _encode(op: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    blobs = [np.ascontiguousarray(a) for a in arrays.values()]
    spec = [[name, a.dtype.str, list(a.shape)] for name, a in zip(arrays, blobs, strict=True)]
    header = json.dumps({"op": op, "meta": meta, "arrays": spec}).encode()
    return b"".join([_U32.pack(len(header)), header, *(a.tobytes() for a in blobs)])


def _decode(lsn: int, payload: bytes) -> Record:
    (header_len,) = _U32.unpack_from(payload, 0)
    header = json.loads(payload[4 : 4 + header_len])
    arrays: dict[str, np.ndarray] = {}
    offset = 4 + header_len
    for name, dtype, shape in header["arrays"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(payload, dt, count, offset).reshape(shape)
        offset += count * dt.itemsize
    return Record(lsn=lsn, op=header["op"], meta=header["meta"], arrays=arrays)


def _read_records(path: Path) -> Iterator[tuple[Record, int]]:
    """Valid records of one segment with the file offset after each; stops at the first torn one."""
    with path.open("rb") as f:
        end = 0
        while True:
            head = f.read(_HEAD.size)
            if len(head) < _HEAD.size:
                return
            magic, size, lsn = _HEAD.unpack(head)
            payload = f.read(size)
            crc = f.read(_CRC.size)
            if magic != _MAGIC or len(payload) < size or len(crc) < _CRC.size:
                return
            if _CRC.unpack(crc)[0] != zlib.crc32(payload):
                return
            end += _HEAD.size + size + _CRC.size
            yield _decode(lsn, payload), end


class AppendLog:
    """The log in ``directory``; ``last_lsn`` is the sequence number of the newest record (0: none)."""

    def __init__(self, directory: Path, fsync: bool) -> None:
        self.directory = directory
        self.fsync = fsync
        directory.mkdir(parents=True, exist_ok=True)
        self.last_lsn = self._recover()
        self._file: BinaryIO = self._open_segment()

    def _segments(self) -> list[tuple[int, Path]]:
        found = [(int(p.name[4:20]), p) for p in self.directory.glob("log-*.wal")]
        return sorted(found)

    def _recover(self) -> int:
        """Last valid lsn; truncates a torn tail of the newest segment."""
        segments = self._segments()
        if not segments:
            return 0
        first, path = segments[-1]
        last, end = first - 1, 0
        for record, offset in _read_records(path):
            last, end = record.lsn, offset
        if end < path.stat().st_size:
            log.warning("truncating torn tail of %s at byte %d", path.name, end)
            with path.open("r+b") as f:
                f.truncate(end)
        return last

    def _open_segment(self) -> BinaryIO:
        segments = self._segments()
        path = segments[-1][1] if segments else self.directory / _segment_name(self.last_lsn + 1)
        return path.open("ab")

    def append(self, op: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> int:
        payload = _encode(op, meta, arrays)
        lsn = self.last_lsn + 1
        self._file.write(
            b"".join([_HEAD.pack(_MAGIC, len(payload), lsn), payload, _CRC.pack(zlib.crc32(payload))])
        )
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self.last_lsn = lsn
        return lsn

    def first_lsn(self) -> int | None:
        """Sequence number of the oldest record kept (None: the log is empty)."""
        for record in self.replay(0):
            return record.lsn
        return None

    def replay(self, after_lsn: int) -> Iterator[Record]:
        """Records with lsn > ``after_lsn``, oldest first."""
        for _, path in self._segments():
            for record, _ in _read_records(path):
                if record.lsn > after_lsn:
                    yield record

    def rotate(self) -> None:
        """Start a new segment; the next record opens it."""
        self._file.close()
        self._file = (self.directory / _segment_name(self.last_lsn + 1)).open("ab")

    def drop_through(self, lsn: int) -> None:
        """Delete segments whose records all have lsn <= ``lsn`` (covered by a snapshot)."""
        segments = self._segments()
        for (_, path), (next_first, _) in zip(segments, segments[1:], strict=False):
            if next_first - 1 <= lsn:
                path.unlink()

    def close(self) -> None:
        self._file.close()
