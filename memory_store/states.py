"""Encoder states kept beside the histories: a user's state is valid exactly while it encodes the last
``state_window`` items of their history as stored.

The service encodes a user's history when it changes (``/interactions``, the bank's load) and keeps the
state beside it, so a ``/recommend`` without a request history needs no encoder pass. A state carries the
fingerprint of the history window it encodes: a write keeps it only when that window is the history's
last items once the write's own appends are in (a concurrent write, a duplicate event or an erasure in
between leaves none), and a read returns it only when its fingerprint is that of the window just read.
A stale state is therefore never served: it is missing, and the caller encodes the history again.

What a state encodes is the caller's business (the service: the model's encoder over the window); the
store compares windows, never vectors. States belong to one model: they live in its namespace.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from memory_store.base import check_user_id

FINGERPRINT_BYTES = 40  # sha1 in hex: Redis's Lua computes the same (redis.sha1hex)


def fingerprint(window: Sequence[int] | Sequence[bytes]) -> bytes:
    """The fingerprint of a history window (item ids, oldest first): sha1 of the ids in decimal joined
    by commas, in hex. Redis keeps ids as decimal strings, so its scripts hash the very same bytes."""
    parts = [x if isinstance(x, bytes) else str(int(x)).encode() for x in window]
    return hashlib.sha1(b",".join(parts)).hexdigest().encode()


@dataclass(frozen=True, slots=True)
class UserStates:
    """States to keep: per user, the state (D,) of ``windows[i]``, the last ≤ ``state_window`` items of
    their history (oldest first) as the caller expects it to stand after its write."""

    users: tuple[str, ...]  # (u,)
    states: np.ndarray  # (u, D) float32
    windows: tuple[tuple[int, ...], ...]  # (u,) the items each state encodes

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def empty(cls, dim: int) -> UserStates:
        return cls((), np.zeros((0, dim), np.float32), ())

    def checked(self, dim: int, window: int) -> UserStates:
        """The states validated against a store's ``dim`` and ``state_window`` (ValueError otherwise),
        as float32, one row per user (a user named twice keeps the last)."""
        if window < 1:
            raise ValueError("this store keeps no encoder states (state_window is 0)")
        a = np.asarray(self.states, dtype=np.float32)
        n = len(self.users)
        if a.shape != (n, dim) or len(self.windows) != n:
            raise ValueError(f"states must be {n} rows of dim {dim}, got {a.shape} and {len(self.windows)}")
        if not np.isfinite(a).all():
            raise ValueError("states contain NaN or infinite values")
        for user, items in zip(self.users, self.windows, strict=True):
            check_user_id(user)
            if not 0 < len(items) <= window or min(items) < 1:
                raise ValueError(f"a state's window must be 1..{window} item ids >= 1, got {len(items)}")
        last = {u: i for i, u in enumerate(self.users)}
        if len(last) == n:
            return UserStates(self.users, a, self.windows)
        rows = sorted(last.values())
        return UserStates(tuple(self.users[i] for i in rows), a[rows], tuple(self.windows[i] for i in rows))

    def select(self, rows: np.ndarray) -> UserStates:
        """The users at ``rows`` (an int index array), in that order."""
        picked = rows.tolist()
        return UserStates(
            tuple(self.users[i] for i in picked), self.states[rows], tuple(self.windows[i] for i in picked)
        )

    def take(self, start: int, stop: int) -> UserStates:
        """The users ``start:stop``."""
        return UserStates(self.users[start:stop], self.states[start:stop], self.windows[start:stop])

    def packed(self) -> list[bytes]:
        """Each user's state as stored (:func:`pack`)."""
        return [pack(fingerprint(w), v) for w, v in zip(self.windows, self.states, strict=True)]


@dataclass(frozen=True, slots=True)
class StoredHistories:
    """A read of histories with their states: ``states[i]`` (D,) float32 encodes the last
    ``state_window`` items of ``histories[i]``, or is None (none kept, or stale)."""

    histories: list[list[int]]
    states: list[np.ndarray | None]


def pack(fp: bytes, state: np.ndarray) -> bytes:
    """A stored state: its window's fingerprint, then the state as float32 little-endian."""
    return fp + np.asarray(state, dtype="<f4").tobytes()


def unpack_valid(blob: bytes | None, window: Sequence[bytes] | Sequence[int], dim: int) -> np.ndarray | None:
    """The state (D,) of a stored ``blob`` if it encodes ``window`` (the history's last items as just
    read), else None."""
    if not blob or len(blob) != FINGERPRINT_BYTES + 4 * dim or not window:
        return None
    if blob[:FINGERPRINT_BYTES] != fingerprint(window):
        return None
    out: np.ndarray = np.frombuffer(blob, "<f4", dim, FINGERPRINT_BYTES)
    return out


def checked_states(states: UserStates | None, dim: int, window: int) -> UserStates | None:
    """A write's states validated for a store (:meth:`UserStates.checked`); None when there are none."""
    if states is None or not len(states):
        return None
    return states.checked(dim, window)
