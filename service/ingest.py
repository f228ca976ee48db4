"""POST /interactions behind HTTP: validated events → histories → one memory per event → the store.

Every event's memory key is the encoding of the user's history *before* the item, where the history
includes the earlier events of the same batch; the memory also keeps that history's last items, from
which the store counts item transitions. A user's first ever event has no history, so it only
starts the history (no memory); so do the events whose history holds no item the encoder knows yet
(only items registered after training: there is nothing to encode a key from). Items registered after
training are stored like any other: as a memory's next item and among its prefix items. In
frozen-memory mode no memory is written at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np

from memory_store import Interaction, MemoryStore
from model.predictor import Predictor
from model.transitions import last_items
from service.metrics import Metrics

log = logging.getLogger(__name__)

INLINE_ENCODE_MAX = 64  # events per batch encoded in the event-loop thread (about 5 ms of CPU)


class Ingestor:
    def __init__(
        self,
        predictor: Predictor,
        store: MemoryStore,
        metrics: Metrics,
        history_len: int = 50,
        frozen_memory: bool = False,
    ) -> None:
        self.predictor = predictor
        self.store = store
        self.metrics = metrics
        self.history_len = history_len
        self.frozen_memory = frozen_memory

    async def prefixes(self, events: Sequence[Interaction]) -> list[list[int]]:
        """The history before each event, earlier events of the batch included (oldest first)."""
        users = sorted({ev.user_id for ev in events})
        stored = await self.store.histories(users, self.history_len)
        running = dict(zip(users, stored, strict=True))
        out = []
        for ev in events:
            h = running[ev.user_id]
            out.append(list(h[-self.history_len :]))
            h.append(ev.item_id)
        return out

    async def ingest(self, events: Sequence[Interaction]) -> tuple[int, int]:
        """Store the events (and their memories); returns (accepted, duplicates)."""
        if self.frozen_memory:
            res = await self.store.append_interactions(events)
            return self._count(res.accepted, res.duplicates)
        prefixes = await self.prefixes(events)
        keyed = [len(self.predictor.known(p)) > 0 for p in prefixes]  # a key can be encoded
        with_memory = [i for i, k in enumerate(keyed) if k]
        first = [events[i] for i, k in enumerate(keyed) if not k]
        accepted = duplicates = 0
        # A user's unkeyed events come before their keyed ones (a prefix only grows): they go first, so
        # every history keeps the batch order.
        if first:
            res = await self.store.append_interactions(first)
            accepted, duplicates = res.accepted, res.duplicates
        if with_memory:
            keys = await self._encode([prefixes[i] for i in with_memory])
            lens = np.array([len(prefixes[i]) for i in with_memory], dtype=np.int32)
            recent = last_items([prefixes[i] for i in with_memory])
            res = await self.store.ingest([events[i] for i in with_memory], keys, lens, recent)
            accepted, duplicates = accepted + res.accepted, duplicates + res.duplicates
        return self._count(accepted, duplicates)

    async def _encode(self, prefixes: list[list[int]]) -> np.ndarray:
        """Memory keys (n, D): a few events are encoded in the event-loop thread, as /recommend batches
        are; a large batch in a worker thread, so it does not hold up every other request meanwhile."""
        if len(prefixes) <= INLINE_ENCODE_MAX:
            return self.predictor.encode(prefixes)
        return await asyncio.to_thread(self.predictor.encode, prefixes)

    def _count(self, accepted: int, duplicates: int) -> tuple[int, int]:
        self.metrics.events.labels("accepted").inc(accepted)
        self.metrics.events.labels("duplicate").inc(duplicates)
        return accepted, duplicates
