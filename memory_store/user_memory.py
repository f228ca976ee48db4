"""Per-user memories (RAMRec / AutoMR): up to C entries per user, merged by moving average, pruned by quality.

Pure NumPy, no I/O: both backends load a user's entries, call :func:`merge_observations` or
:func:`record_access`, and write the result back atomically.

Merging a repeated item (RAMRec): ``e ← a·e + (1−a)·e_new`` with ``a = min(0.9, 0.7 + 0.05·ln(freq+1))``,
where ``freq`` counts the observations merged into ``e`` so far, so a well-established memory moves less.
When a new item arrives and the user already holds C entries, the entry with the lowest quality goes
(ties: the one touched longest ago). The quality function is pluggable: ``(entries, now) -> (n,) scores``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

HALF_LIFE_S = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class UserMemories:
    """The user memories of one user, one row per item."""

    user_id: str
    items: np.ndarray  # (n,) int64 item ids
    vectors: np.ndarray  # (n, dim) float32 merged embeddings
    freq: np.ndarray  # (n,) int64 observations merged into the vector
    access_count: np.ndarray  # (n,) int64 times the entry was retrieved (see record_access)
    last_access: np.ndarray  # (n,) float64 last observation or retrieval, unix seconds
    first_seen: np.ndarray  # (n,) float64 first observation, unix seconds

    @classmethod
    def empty(cls, user_id: str, dim: int) -> UserMemories:
        return cls(
            user_id=user_id,
            items=np.zeros(0, np.int64),
            vectors=np.zeros((0, dim), np.float32),
            freq=np.zeros(0, np.int64),
            access_count=np.zeros(0, np.int64),
            last_access=np.zeros(0, np.float64),
            first_seen=np.zeros(0, np.float64),
        )

    def __len__(self) -> int:
        return int(self.items.shape[0])


QualityFn = Callable[[UserMemories, float], np.ndarray]


@dataclass(frozen=True, slots=True)
class RecencyFrequency:
    """Quality = log-frequency of use (observations and retrievals), halved for every ``half_life``
    since the entry was last touched; ``half_life`` is in the clock's unit (seconds in the store, a
    user's interaction count in the offline replay of ``model.user_memory``). A class, not a closure,
    so that a store config holding it pickles into worker processes."""

    half_life: float

    def __call__(self, entries: UserMemories, now: float) -> np.ndarray:
        use = 1.0 + np.log1p(entries.freq.astype(np.float64))
        use = use + np.log1p(entries.access_count.astype(np.float64))
        age = np.maximum(now - entries.last_access, 0.0)
        return use * np.exp2(-age / self.half_life)  # (n,)


def recency_frequency(half_life: float) -> QualityFn:
    return RecencyFrequency(half_life)


# The store's default: a week's half-life on the wall clock.
recency_frequency_quality = RecencyFrequency(HALF_LIFE_S)


def fewest_accesses_quality(entries: UserMemories, now: float) -> np.ndarray:
    """Simple quality: the entry retrieved the fewest times goes first."""
    return entries.access_count.astype(np.float64)


def merge_weight(freq: int) -> float:
    """Weight ``a`` kept by the old vector when an item is seen again after ``freq`` observations."""
    return min(0.9, 0.7 + 0.05 * math.log(freq + 1))


def _lowest_quality(entries: UserMemories, now: float, quality: QualityFn) -> int:
    scores = np.asarray(quality(entries, now), dtype=np.float64)
    if scores.shape != (len(entries),):
        raise ValueError(f"quality function returned shape {scores.shape}, expected ({len(entries)},)")
    # lexsort: last key is primary; ties broken by the oldest last access.
    return int(np.lexsort((entries.last_access, scores))[0])


def _drop_row(entries: UserMemories, row: int) -> UserMemories:
    keep = np.arange(len(entries)) != row
    return replace(
        entries,
        items=entries.items[keep],
        vectors=entries.vectors[keep],
        freq=entries.freq[keep],
        access_count=entries.access_count[keep],
        last_access=entries.last_access[keep],
        first_seen=entries.first_seen[keep],
    )


def _append_row(entries: UserMemories, item: int, vector: np.ndarray, ts: float) -> UserMemories:
    return replace(
        entries,
        items=np.append(entries.items, np.int64(item)),
        vectors=np.concatenate([entries.vectors, vector[None, :].astype(np.float32)]),
        freq=np.append(entries.freq, np.int64(1)),
        access_count=np.append(entries.access_count, np.int64(0)),
        last_access=np.append(entries.last_access, np.float64(ts)),
        first_seen=np.append(entries.first_seen, np.float64(ts)),
    )


def merge_observations(
    entries: UserMemories,
    items: Sequence[int] | np.ndarray,
    vectors: np.ndarray,
    timestamps: Sequence[float] | np.ndarray,
    capacity: int,
    quality: QualityFn,
) -> tuple[UserMemories, list[int]]:
    """Fold observations (in order) into ``entries``; returns the new entries and the evicted item ids.

    Shapes: items (k,), vectors (k, dim), timestamps (k,). Inputs are validated by the caller.
    """
    evicted: list[int] = []
    out = replace(
        entries,
        vectors=entries.vectors.copy(),
        freq=entries.freq.copy(),
        last_access=entries.last_access.copy(),
    )
    for item, vector, ts in zip(items, vectors, timestamps, strict=True):
        rows = np.flatnonzero(out.items == item)
        if rows.size:
            row = int(rows[0])
            a = merge_weight(int(out.freq[row]))
            out.vectors[row] = a * out.vectors[row] + (1.0 - a) * vector
            out.freq[row] += 1
            out.last_access[row] = max(float(out.last_access[row]), float(ts))
            continue
        if len(out) >= capacity:
            row = _lowest_quality(out, float(ts), quality)
            evicted.append(int(out.items[row]))
            out = _drop_row(out, row)
        out = _append_row(out, int(item), vector, float(ts))
    return out, evicted


def record_access(entries: UserMemories, items: Sequence[int], ts: float) -> tuple[UserMemories, int]:
    """Count one retrieval of each listed item the user holds; returns new entries and rows touched."""
    hit = np.isin(entries.items, np.asarray(items, dtype=np.int64))
    access = entries.access_count + hit.astype(np.int64)
    last = np.where(hit, np.maximum(entries.last_access, ts), entries.last_access)
    return replace(entries, access_count=access, last_access=last), int(hit.sum())


def record_dtype(dim: int) -> np.dtype:
    """Packed layout of one entry (Redis hash field value, embedded snapshot row)."""
    return np.dtype(
        [("vec", "<f4", (dim,)), ("freq", "<i8"), ("access", "<i8"), ("last", "<f8"), ("first", "<f8")]
    )


def pack(entries: UserMemories) -> list[bytes]:
    """One bytes value per entry, in row order."""
    rec = np.zeros(len(entries), dtype=record_dtype(entries.vectors.shape[1]))
    rec["vec"], rec["freq"], rec["access"] = entries.vectors, entries.freq, entries.access_count
    rec["last"], rec["first"] = entries.last_access, entries.first_seen
    return [r.tobytes() for r in rec]


def unpack(user_id: str, dim: int, items: Sequence[int], values: Sequence[bytes]) -> UserMemories:
    """Inverse of :func:`pack`: ``items[i]`` owns ``values[i]``; rows come out sorted by item id."""
    if not items:
        return UserMemories.empty(user_id, dim)
    order = np.argsort(np.asarray(items, dtype=np.int64), kind="stable")
    rec = np.frombuffer(b"".join(values[i] for i in order), dtype=record_dtype(dim))
    return UserMemories(
        user_id=user_id,
        items=np.asarray(items, dtype=np.int64)[order],
        vectors=rec["vec"].astype(np.float32),
        freq=rec["freq"].astype(np.int64),
        access_count=rec["access"].astype(np.int64),
        last_access=rec["last"].astype(np.float64),
        first_seen=rec["first"].astype(np.float64),
    )
