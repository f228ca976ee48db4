"""Snapshot files: an index's image on disk, written and read back, and the helpers every snapshot file
of the backends goes through.

An index snapshot is four files in one directory::

    index.faiss   the FAISS index (faiss.write_index)
    meta.npz      the metadata columns (memory_store.columns) and their ``base``
    users.json    the user names the ``user`` column codes into
    meta.json     {"dim", "nlist", "trained_for"}

The backends add their own files beside them (the Redis replica's ``position.json``, the embedded
store's ``state.json`` and ``umem.npz``). Whatever cannot be read back raises SnapshotError naming the
file, so a caller can tell a damaged snapshot from a bug.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from memory_store.base import SnapshotError

INDEX_FILE = "index.faiss"
COLUMNS_FILE = "meta.npz"
USERS_FILE = "users.json"
INFO_FILE = "meta.json"
INFO_KEYS = ("dim", "nlist", "trained_for")


@contextmanager
def snapshot_file(path: Path) -> Iterator[Path]:
    """Read ``path`` inside the block; any failure becomes a SnapshotError naming the file."""
    try:
        yield path
    except SnapshotError:
        raise
    except Exception as exc:  # truncated, garbled or missing: faiss, numpy, json each raise their own
        raise SnapshotError(f"{path}: unreadable snapshot file ({type(exc).__name__}: {exc})") from exc


def savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` with named arrays (its stub types ``**kwds`` as bool)."""
    save: Any = np.savez
    save(path, **arrays)


@dataclass(frozen=True, slots=True)
class IndexImage:
    """A point-in-time copy of a MemoryIndex, written to disk without holding the index lock."""

    # A copy of the index (faiss.clone_index): one index size beside it while written, where serialised
    # bytes took two (the serialiser's buffer grows by doubling, then is copied into an array)
    index: faiss.Index
    columns: dict[str, np.ndarray]
    users: list[str]
    info: dict[str, int]  # INFO_KEYS

    def write(self, directory: Path) -> None:
        """The four files of an index snapshot in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        savez(directory / COLUMNS_FILE, self.columns)
        (directory / USERS_FILE).write_text(json.dumps(self.users))
        (directory / INFO_FILE).write_text(json.dumps(self.info))


@dataclass(frozen=True, slots=True)
class IndexFiles:
    """An index snapshot read back: the FAISS index itself, and the rest as :class:`IndexImage` has it."""

    index: faiss.Index
    columns: dict[str, np.ndarray]
    users: list[str]
    info: dict[str, int]


def read_index_files(directory: Path, required_columns: Sequence[str]) -> IndexFiles:
    """The files :meth:`IndexImage.write` wrote; SnapshotError names one that cannot be read or lacks a
    field (an info key, one of ``required_columns``)."""
    with snapshot_file(directory / INFO_FILE) as path:
        raw = json.loads(path.read_text())
        info = {key: int(raw[key]) for key in INFO_KEYS}
    with snapshot_file(directory / COLUMNS_FILE) as path, np.load(path) as arrays:
        columns = {name: arrays[name] for name in arrays.files}
        missing = [name for name in required_columns if name not in columns]
        if missing:
            raise SnapshotError(f"{path}: snapshot file lacks the columns {missing}")
    with snapshot_file(directory / USERS_FILE) as path:
        users: list[str] = json.loads(path.read_text())
    with snapshot_file(directory / INDEX_FILE) as path:
        index = faiss.read_index(str(path))
    return IndexFiles(index=index, columns=columns, users=users, info=info)
