"""Per-user (RAMRec) memories on the request path, for a model fine-tuned with ``--user-memories``.

The store keeps each user's memories (memory_store.user_memory) under the model's own rules: the
capacity C, the eviction order and its half-life come from the model's fine-tune config
(model.finetune), and the accesses per query too. As in the offline replay (model.user_memory), the
clock is the user's interaction count, i.e. the position of an item in the user's sequence:

* start-up (service.bank): each user of the model's bank gets the memories the replay leaves after
  their training and validation sequence, the very memories their test sample reads offline;
* POST /interactions (service.ingest): each accepted event's item embedding is merged at the event's
  position (the items the store holds of the user before it);
* /recommend (service.pipeline): the batch's users' memories are read in one store call; each query
  accesses the ``access_top`` entries most similar to its state at the user's count (recorded in the
  background), and the held items (B, C) join the fusion as extra slots.

The count is read from the stored history, which the store caps at its ``history_len`` (200 at least):
a user with more interactions gets that cap as the clock, where the replay counts on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from memory_store import MemoryStore, QualityFn, UserMemories
from model.artifact import Artifact
from model.finetune import FinetuneConfig
from model.inference import inference_config
from model.memory import l2_normalise
from model.predictor import FloatArray, IntArray
from model.user_memory import MemoryRules, UserMemoryConfig, accessed, item_table
from service.errors import store_errors
from service.memory_rules import store_rules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UserMemorySetup:
    """A model's user memories: its replay config, its frozen item table (what a memory merges) and
    the store's rules it was replayed with."""

    cfg: UserMemoryConfig
    item_emb: FloatArray  # (n_ids, D)
    rules: MemoryRules

    @property
    def quality(self) -> QualityFn:
        """The store's eviction order for this model (a picklable quality function)."""
        out: QualityFn = self.rules.quality(self.cfg.quality, self.cfg.half_life)
        return out

    @property
    def n_ids(self) -> int:
        """Item ids below this have an embedding; a newer item is never merged."""
        return int(self.item_emb.shape[0])


def user_memory_setup(art: Artifact) -> UserMemorySetup | None:
    """The user memories a model fuses (its fine-tune config owns their settings), None without."""
    if not inference_config(art).user_memories:
        return None
    cfg = FinetuneConfig.from_json(art.finetune_config).user_memory()
    return UserMemorySetup(cfg, item_table(art.encoder), store_rules())


def snapshot(entries: Sequence[UserMemories], capacity: int) -> IntArray:
    """The items each user holds, in entry order, as the fusion reads them: (B, C), 0 = empty slot."""
    out = np.zeros((len(entries), capacity), dtype=np.int64)
    for row, mem in enumerate(entries):
        held = mem.items[:capacity]
        out[row, : len(held)] = held
    return out


def accesses(entries: Sequence[UserMemories], states: FloatArray, top: int) -> list[tuple[int, IntArray]]:
    """Per query (row of ``states`` (B, D), with its user's ``entries``) that holds any memory: the
    row and the items its state accesses, the ``top`` most similar (model.user_memory.accessed)."""
    if not top:
        return []
    units = l2_normalise(states)
    return [
        (row, mem.items[accessed(mem.vectors, units[row], top)])
        for row, mem in enumerate(entries)
        if len(mem)
    ]


class AccessRecorder:
    """Records the queries' accesses in the background, off the request path; a failed write is only
    logged (an access moves only a later eviction)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self._pending: set[asyncio.Task[None]] = set()

    def submit(self, touched: Sequence[tuple[str, IntArray, float]]) -> None:
        """(user, items, clock) per query."""
        if not touched:
            return
        task = asyncio.get_running_loop().create_task(self._record(list(touched)), name="memory-access")
        self._pending.add(task)  # a reference until it is done: the loop keeps only weak ones
        task.add_done_callback(self._pending.discard)

    async def _record(self, touched: list[tuple[str, IntArray, float]]) -> None:
        failures: tuple[type[Exception], ...] = (*store_errors(), ValueError, RuntimeError)
        for user, items, clock in touched:  # in order: one user's accesses of one batch stay ordered
            try:
                await self.store.record_user_memory_access(user, items.tolist(), clock)
            except failures as exc:
                log.debug("could not record the memory accesses of %s: %s", user, exc)

    async def drain(self) -> None:
        """Wait for the accesses submitted so far."""
        await asyncio.gather(*self._pending, return_exceptions=True)


async def merge_events(
    store: MemoryStore,
    setup: UserMemorySetup,
    users: Sequence[str],
    items: Sequence[int],
    positions: Sequence[int],
) -> int:
    """Merge accepted events (``users[i]`` saw ``items[i]`` at position ``positions[i]``, in order)
    into their users' memories, one store write per user; items without an embedding (registered after
    training) are skipped. Returns how many observations were merged."""
    per_user: dict[str, list[tuple[int, int]]] = {}
    for user, item, pos in zip(users, items, positions, strict=True):
        if item < setup.n_ids:
            per_user.setdefault(user, []).append((item, pos))
    writes = []
    for user, seen in per_user.items():
        ids = np.asarray([item for item, _ in seen], dtype=np.int64)
        clocks = np.asarray([pos for _, pos in seen], dtype=np.float64)
        writes.append(store.update_user_memories(user, ids, setup.item_emb[ids], clocks))
    await asyncio.gather(*writes)
    return sum(len(seen) for seen in per_user.values())
