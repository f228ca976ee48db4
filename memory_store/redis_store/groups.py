"""A namespace split into hash-tag groups, so that it spreads over the masters of a Redis Cluster.

Redis Cluster runs a script only when every key it touches sits in one hash slot. A namespace's keys
therefore carry one of G hash tags (``StoreConfig.groups``). With one group (a single Redis) the prefix
is ``memrec:{ns}:``, the layout of ``layout`` unchanged. With G > 1, group g's tag is ``ns/g.k`` ("/"
cannot occur in a namespace), k the first number that puts the tag's slot in the g-th of G equal slot
ranges: a cluster gives each master a contiguous share of the slots, so the groups spread over the
masters as evenly as G allows, whatever the namespace. Everything one write touches lives in one group:

* a user's keys (history, encoder state, memories' ``byuser`` list, dedup markers, interaction log
  rows, per-user memories) are in ``of_user(user)``, a CRC-32 of the user id, the same in every
  process; so the writes of one user are ordered in one group's streams;
* a memory's hash is in its writer's group, and its id says which: ``id = seq * G + g``, where seq
  counts the group's memories (``mem:seq`` of the group). Ids stay unique and about dense (groups
  grow at about the same rate), which the index's columns rely on;
* each group has its own replication ``log`` and ``interactions`` streams, its own count and eviction
  cursor: the global ``capacity`` is enforced per group, ``ceil(capacity / G)`` each;
* the catalogue (unavailable and registered items), the epoch and the holder keys are group 0's.

Positions name places in the G replication logs: the stream ids, one per group, joined by commas
(``"ms-seq"`` alone with one group: the one-group format unchanged). A write's position names only the
groups it wrote ("0-0" elsewhere); a replica has applied a position once it has, group by group.
An interaction-log row is named by its stream id and group, ``"ms-seq@g"`` (``"ms-seq"`` in group 0);
rows are read in (stream id, group) order, which a row's name continues exactly.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from memory_store.base import parse_position
from memory_store.redis_store.layout import key_prefix

ZERO = "0-0"
StreamId = tuple[int, int]


def _tag(namespace: str, group: int, count: int) -> str:
    """The hash tag of ``group`` of ``count``: one whose slot is in the group's share of the slots."""
    if count == 1:
        return namespace
    low, high = group * REDIS_CLUSTER_HASH_SLOTS // count, (group + 1) * REDIS_CLUSTER_HASH_SLOTS // count
    for k in itertools.count():  # about ``count`` tries
        tag = f"{namespace}/{group}.{k}"
        if low <= key_slot(tag.encode()) < high:
            return tag
    raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class SlotGroups:
    """The G hash-tag groups of ``namespace`` and their key prefixes."""

    namespace: str
    count: int
    prefixes: tuple[str, ...]

    @classmethod
    def of(cls, namespace: str, count: int) -> SlotGroups:
        return cls(namespace, count, tuple(key_prefix(_tag(namespace, g, count)) for g in range(count)))

    def prefix(self, group: int) -> str:
        """The key prefix of ``group``: its braces hold the Redis Cluster hash tag."""
        return self.prefixes[group]

    @property
    def patterns(self) -> list[str]:
        """SCAN patterns that match every key of the namespace and no other ("/" ends a namespace)."""
        if self.count == 1:
            return [self.prefixes[0] + "*"]
        return [key_prefix(f"{self.namespace}/")[:-2] + "*"]

    def of_user(self, user: str) -> int:
        return zlib.crc32(user.encode()) % self.count if self.count > 1 else 0

    def of_users(self, users: Sequence[str]) -> np.ndarray:
        """(n,) int64 group of each user."""
        return np.fromiter((self.of_user(u) for u in users), np.int64, len(users))

    def of_memories(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 group of each memory id (``id = seq * G + g``)."""
        return np.asarray(ids, np.int64) % self.count

    # -------------------------------------------------------------------------------- replication

    def position(self, ids: dict[int, str]) -> str:
        """The position of stream ids by group (groups not named: "0-0")."""
        if self.count == 1:
            return ids.get(0, "")
        if not ids:
            return ""
        return ",".join(ids.get(g, ZERO) for g in range(self.count))

    def parse(self, position: str) -> list[StreamId]:
        """(ms, seq) per group of a position ("" is the start). ValueError when it is not one."""
        if not position:
            return [(0, 0)] * self.count
        parts = position.split(",")
        if len(parts) != self.count:
            raise ValueError(f"not a log position of {self.count} groups: {position!r}")
        return [parse_position(part) for part in parts]

    def reached(self, applied: Sequence[str], position: str) -> bool:
        """Whether per-group ``applied`` stream ids are at or past ``position`` in every group."""
        target = self.parse(position)
        return all(parse_position(a) >= t for a, t in zip(applied, target, strict=True))

    # --------------------------------------------------------------------------- interaction log

    def row_position(self, stream_id: str, group: int) -> str:
        return stream_id if group == 0 else f"{stream_id}@{group}"

    def parse_row(self, position: str) -> tuple[StreamId, int]:
        """(stream id, group) of a row's position; ValueError when it is not one."""
        head, _, group = position.partition("@")
        g = int(group) if group.isdigit() else (-1 if group else 0)
        if not 0 <= g < self.count:
            raise ValueError(f"not an interaction log position: {position!r}")
        return parse_position(head), g

    def starts_after(self, position: str) -> list[str]:
        """Per group, the XRANGE start of the rows after ``position`` in (stream id, group) order: the
        groups up to the row's own continue after its id, the later ones from it (inclusive)."""
        if not position:
            return ["-"] * self.count
        (ms, seq), g = self.parse_row(position)
        sid = f"{ms}-{seq}"
        return [f"({sid}" if h <= g else sid for h in range(self.count)]


def merged(
    pages: Iterable[tuple[int, list[tuple[bytes, dict[bytes, bytes]]]]], count: int
) -> list[tuple[int, tuple[bytes, dict[bytes, bytes]]]]:
    """The first ``count`` entries of several groups' stream pages in (stream id, group) order."""
    rows = [(parse_position(entry[0].decode()), g, entry) for g, page in pages for entry in page]
    rows.sort(key=lambda r: (r[0], r[1]))
    return [(g, entry) for _, g, entry in rows[:count]]
