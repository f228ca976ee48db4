"""Memories as bytes, both ways: the write script's arguments (see ``layout.WRITE_SCRIPT``, with the
users' encoder states), and the ``op=add`` log entries and ``mem:{id}`` hashes read back into (ids,
MemoryBatch); the catalogue's ``op=avail`` and ``op=items`` entries; the interaction log's entries.

All binary little-endian. The prefix items (``rec``) are read at the writer's width (the bytes say it:
``len(rec) / (8 n)``) and fitted to the reader's ``recent_width`` (base.fit_recent), so entries and
hashes written under another width, or before ``rec`` existed, stay readable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from memory_store.base import Interaction, LoggedInteractions, MemoryBatch, fit_recent
from memory_store.config import StoreConfig
from memory_store.states import FINGERPRINT_BYTES, UserStates

Rows = tuple[np.ndarray, MemoryBatch]  # memory ids (n,) and their memories


def write_args(
    prefix: str,
    config: StoreConfig,
    mode: str,
    events: Sequence[Interaction],
    batch: MemoryBatch | None,
    states: UserStates | None = None,
    group: int = 0,
) -> list[Any]:
    """ARGV of one write-script call into ``group`` (every row's user is of that group): the header,
    the packed columns of ``batch`` (empty without memories) and of ``states`` (checked), then per
    record its event id ('' for none), user, item, timestamp and prefix length, then the states' users.
    The global capacity is the group's share of it (``groups``)."""
    n = len(batch) if batch is not None else len(events)
    groups = config.groups
    head: list[Any] = [
        prefix,
        n,
        config.dim * 4,
        config.dedup_ttl_s,
        config.history_len,
        -(-config.capacity // groups) if config.capacity else 0,
        config.user_capacity or 0,
        config.stream_maxlen,
        mode,
    ]
    if batch is not None:
        head += [
            batch.keys.astype("<f4").tobytes(),
            batch.items.astype("<i8").tobytes(),
            batch.timestamps.astype("<f8").tobytes(),
            batch.prefix_lens.astype("<i4").tobytes(),
            batch.recent.astype("<i8").tobytes(),
        ]
    else:
        head += [b"", b"", b"", b"", b""]
    packed = states.packed() if states is not None else []
    head += [config.state_window, len(packed), b"".join(packed), FINGERPRINT_BYTES + 4 * config.dim]
    head += [retention_ms(config), groups, group]
    rows: list[Any] = []
    for i in range(n):
        ev = events[i] if events else None
        if batch is not None:
            user, item = batch.users[i], int(batch.items[i])
            ts, plen = repr(float(batch.timestamps[i])), int(batch.prefix_lens[i])
        else:
            assert ev is not None
            user, item, ts, plen = ev.user_id, int(ev.item_id), repr(float(ev.timestamp)), 0
        event_id = ev.event_id if ev is not None and ev.event_id is not None else ""
        rows += [event_id, user, item, ts, plen]
    return head + rows + list(states.users if states is not None else ())


def retention_ms(config: StoreConfig) -> int:
    """The interaction log's retention as the scripts take it: milliseconds, at least 1; 0 for ever."""
    if config.log_retention_s is None:
        return 0
    return max(1, round(config.log_retention_s * 1000))


def put_states_args(prefix: str, config: StoreConfig, states: UserStates) -> list[Any]:
    """ARGV of one ``PUT_STATES_SCRIPT`` call for ``states`` (checked)."""
    stride = FINGERPRINT_BYTES + 4 * config.dim
    return [prefix, config.state_window, stride, b"".join(states.packed()), *states.users]


def decode_add(fields: dict[bytes, bytes], dim: int, recent_width: int) -> Rows:
    """(ids (n,), batch) of an ``op=add`` log entry: ids ``id0, id0 + step, ...`` (``step`` the
    namespace's groups, absent with one)."""
    n, id0, step = int(fields[b"n"]), int(fields[b"id0"]), int(fields.get(b"step", 1))
    batch = MemoryBatch(
        keys=np.frombuffer(fields[b"vec"], "<f4").reshape(n, dim),
        items=np.frombuffer(fields[b"item"], "<i8"),
        users=tuple(json.loads(fields[b"user"])),
        timestamps=np.frombuffer(fields[b"ts"], "<f8"),
        prefix_lens=np.frombuffer(fields[b"len"], "<i4"),
        recent=decode_recent(fields.get(b"rec"), n, recent_width),
    )
    return np.arange(id0, id0 + n * step, step, dtype=np.int64), batch


def decode_recent(blob: bytes | None, n: int, recent_width: int) -> np.ndarray:
    """(n, recent_width) of a log entry's or hash's ``rec`` bytes; zeros when absent (written before
    memories kept their prefix's last items)."""
    if not blob:
        return np.zeros((n, recent_width), np.int64)
    stored = np.frombuffer(blob, "<i8").reshape(n, -1)  # (n, the writer's width)
    return fit_recent(stored, recent_width)


def decode_hashes(rows: list[tuple[int, list[bytes]]], dim: int, recent_width: int) -> Rows:
    """(ids, batch) of ``mem:{id}`` hashes: per memory its id and its ``layout.MEM_FIELDS`` values."""
    batch = MemoryBatch(
        keys=np.frombuffer(b"".join(r[0] for _, r in rows), "<f4").reshape(len(rows), dim),
        items=np.asarray([int(r[1]) for _, r in rows], np.int64),
        users=tuple(r[2].decode() for _, r in rows),
        timestamps=np.asarray([float(r[3]) for _, r in rows], np.float64),
        prefix_lens=np.asarray([int(r[4]) for _, r in rows], np.int32),
        recent=np.concatenate([decode_recent(r[5], 1, recent_width) for _, r in rows]),
    )
    return np.asarray([i for i, _ in rows], np.int64), batch


def concat(parts: list[Rows]) -> Rows:
    """One (ids, batch) of several, in order (their ``recent`` of one width)."""
    if len(parts) == 1:
        return parts[0]
    ids = np.concatenate([p[0] for p in parts])
    batch = MemoryBatch(
        keys=np.concatenate([p[1].keys for p in parts]),
        items=np.concatenate([p[1].items for p in parts]),
        users=tuple(u for p in parts for u in p[1].users),
        timestamps=np.concatenate([p[1].timestamps for p in parts]),
        prefix_lens=np.concatenate([p[1].prefix_lens for p in parts]),
        recent=np.concatenate([p[1].recent for p in parts]),
    )
    return ids, batch


def decode_availability(fields: dict[bytes, bytes]) -> tuple[list[int], bool]:
    """(item ids, available) of an ``op=avail`` log entry."""
    return [int(i) for i in fields[b"items"].split(b",")], fields[b"on"] == b"1"


def decode_registered(fields: dict[bytes, bytes]) -> dict[str, int]:
    """External id → internal id of an ``op=items`` log entry."""
    names: list[str] = json.loads(fields[b"names"])
    return dict(zip(names, (int(i) for i in fields[b"ids"].split(b",")), strict=True))


def decode_interactions(
    entries: list[tuple[bytes, dict[bytes, bytes]]], positions: list[str] | None = None
) -> LoggedInteractions:
    """The rows of ``interactions`` stream entries (XRANGE's (id, fields) pairs), in their order;
    ``positions`` names each row (default: its stream id)."""
    if not entries:
        return LoggedInteractions.empty()
    ids = [entry_id.decode() for entry_id, _ in entries]
    rows = [fields for _, fields in entries]
    return LoggedInteractions(
        users=tuple(r[b"u"].decode() for r in rows),
        items=np.asarray([int(r[b"i"]) for r in rows], np.int64),
        timestamps=np.asarray([float(r[b"t"]) for r in rows], np.float64),
        event_ids=tuple(r[b"e"].decode() or None for r in rows),
        accepted_at=np.asarray([int(i.partition("-")[0]) / 1000.0 for i in ids], np.float64),
        positions=tuple(positions if positions is not None else ids),
    )
