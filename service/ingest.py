"""POST /interactions behind HTTP: validated events → histories → one memory per event → the store.

Every event's memory key is the encoding of the user's history *before* the item, where the history
includes the earlier events of the same batch; the memory also keeps that history's last items, from
which the store counts item transitions. A user's first ever event has no history, so it only
starts the history (no memory); so do the events whose history holds no item the encoder knows yet
(only items registered after training: there is nothing to encode a key from). Items registered after
training are stored in histories and as a memory's next item like any other, but not among a
memory's prefix items: those are the last items of the encoder's window, the very items a query's
transition channel reads (Predictor.prepare), so that the counts at each lag mean the same on both
sides. In frozen-memory mode no memory is written at all.

A model that fuses per-user (RAMRec) memories has each accepted event's item merged into its user's
memories, after the write, at the event's position in the user's sequence: the clock of the offline
replay (service.user_memories).

Each user's history after the batch is encoded too, in the same encoder pass as the memory keys, and
its state goes into the store's write that appends the user's last event (service.states): the user's
next /recommend reads it with the history and runs no encoder pass. The key of a user's first event
of the batch needs no pass either where the store holds the state of the history before it: that state
is the key (the very encoding of that prefix).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from memory_store import Interaction, MemoryStore
from memory_store.states import UserStates
from model.predictor import Predictor
from model.transitions import last_items
from service.metrics import Metrics
from service.states import encode_states, user_states
from service.user_memories import UserMemorySetup, merge_events

log = logging.getLogger(__name__)

INLINE_ENCODE_MAX = 64  # events per batch encoded in the event-loop thread (about 5 ms of CPU)


@dataclass(frozen=True)
class Prefixes:
    """What a batch of events extends: per event the history before it (its last ``history_len`` items)
    and the stored state that encodes exactly that (or None), per user the history after the batch."""

    before: list[list[int]]
    states: list[np.ndarray | None]  # (D,) the stored state: a user's first event of the batch only
    after: dict[str, list[int]]
    positions: list[int]  # per event, the items held of its user before it: its user-memory clock


class Ingestor:
    def __init__(
        self,
        predictor: Predictor,
        store: MemoryStore,
        metrics: Metrics,
        history_len: int = 50,
        frozen_memory: bool = False,
        user_memories: UserMemorySetup | None = None,
        held_len: int = 0,
    ) -> None:
        self.predictor = predictor
        self.store = store
        self.metrics = metrics
        self.history_len = history_len
        self.frozen_memory = frozen_memory
        self.user_memories = user_memories  # the model's per-user memories (service.user_memories)
        # history items read per user: the encoder's, or all the store keeps (``held_len``, its
        # history_len) where the user-memory clock counts them
        self.read_len = max(history_len, held_len if user_memories is not None else 0)

    async def prefixes(self, events: Sequence[Interaction]) -> Prefixes:
        """The history before each event, earlier events of the batch included (oldest first), with the
        stored state that encodes it (a user's first event of the batch only), and each user's last
        ``history_len`` items after the batch (what their new state encodes)."""
        users = sorted({ev.user_id for ev in events})
        stored = await self.store.histories_with_states(users, self.read_len)
        running = dict(zip(users, stored.histories, strict=True))
        unused = dict(zip(users, stored.states, strict=True))  # each encodes its user's stored window
        before: list[list[int]] = []
        states: list[np.ndarray | None] = []
        positions: list[int] = []
        for ev in events:
            h = running[ev.user_id]
            before.append(list(h[-self.history_len :]))
            states.append(unused.pop(ev.user_id, None))
            positions.append(len(h))
            h.append(ev.item_id)
        after = {u: h[-self.history_len :] for u, h in running.items()}
        return Prefixes(before, states, after, positions)

    async def ingest(self, events: Sequence[Interaction], logged: bool = True) -> tuple[int, int]:
        """Store the events (and their memories, and the users' states); returns (accepted, duplicates).
        ``logged``: into the interaction log too (False: rows the model's training data holds)."""
        pre = await self.prefixes(events)
        users, windows = list(pre.after), list(pre.after.values())
        if self.frozen_memory:
            states = await self._encode(events, windows)
            res = await self.store.append_interactions(events, user_states(users, windows, states), logged)
            return self._count(res.accepted, res.duplicates)
        keyed = [len(self.predictor.known(p)) > 0 for p in pre.before]  # a key can be encoded
        with_memory = [i for i, k in enumerate(keyed) if k]
        first = [i for i, k in enumerate(keyed) if not k]
        # One encoder pass: the keys no stored state gives, and every user's state after the batch.
        todo = [i for i in with_memory if pre.states[i] is None]
        encoded = await self._encode(events, [*(pre.before[i] for i in todo), *windows])
        keys = dict(zip(todo, encoded[: len(todo)], strict=True))
        states = encoded[len(todo) :]
        # A user's state goes with the write of their last event: the keyed one when they have one.
        last_keyed = {events[i].user_id for i in with_memory}
        accepted = duplicates = 0
        taken: list[int] = []  # the events known accepted
        # A user's unkeyed events come before their keyed ones (a prefix only grows): they go first, so
        # every history keeps the batch order.
        if first:
            put = _pick(users, windows, states, lambda u: u not in last_keyed)
            res = await self.store.append_interactions([events[i] for i in first], put, logged)
            accepted, duplicates = res.accepted, res.duplicates
            taken += first if not res.duplicates else []  # the store does not say which were duplicates
        if with_memory:
            put = _pick(users, windows, states, lambda u: u in last_keyed)
            lens = np.array([len(pre.before[i]) for i in with_memory], dtype=np.int32)
            # the prefix items counted are the ones a query reads (its window's last items): a new
            # item keeps no trained item from its lag, here as there (Predictor.prepare)
            recent = last_items([self.predictor.window(pre.before[i]) for i in with_memory])
            key_rows = np.stack([_key(pre.states[i], keys.get(i)) for i in with_memory])  # (n, D)
            res = await self.store.ingest(
                [events[i] for i in with_memory], key_rows, lens, recent, put, logged
            )
            accepted, duplicates = accepted + res.accepted, duplicates + res.duplicates
            taken += [i for i, mem_id in zip(with_memory, res.memory_ids, strict=True) if mem_id >= 0]
        if self.user_memories is not None and taken:
            await self._merge_user_memories(events, pre.positions, sorted(taken))
        return self._count(accepted, duplicates)

    async def _merge_user_memories(
        self, events: Sequence[Interaction], positions: list[int], rows: list[int]
    ) -> None:
        """Merge the accepted events ``rows`` into their users' memories at their positions (the
        user-memory clock). An event whose write held any duplicate without saying which is not merged:
        a retried event is never merged twice."""
        assert self.user_memories is not None
        await merge_events(
            self.store,
            self.user_memories,
            [events[i].user_id for i in rows],
            [events[i].item_id for i in rows],
            [positions[i] for i in rows],
        )

    async def _encode(
        self, events: Sequence[Interaction], histories: list[list[int]]
    ) -> list[np.ndarray | None]:
        """The states of ``histories`` (memory keys' prefixes, users' state windows) in one encoder
        pass: a few events are encoded in the event-loop thread, as /recommend batches are; a large batch
        in a worker thread, so it does not hold up every other request meanwhile."""
        return await encode_states(self.predictor, histories, inline=len(events) <= INLINE_ENCODE_MAX)

    def _count(self, accepted: int, duplicates: int) -> tuple[int, int]:
        self.metrics.events.labels("accepted").inc(accepted)
        self.metrics.events.labels("duplicate").inc(duplicates)
        return accepted, duplicates


def _pick(
    users: list[str], windows: list[list[int]], states: list[np.ndarray | None], keep: Callable[[str], bool]
) -> UserStates | None:
    """The states of the users ``keep`` selects, as the store takes them (service.states.user_states)."""
    rows = [j for j, u in enumerate(users) if keep(u)]
    return user_states([users[j] for j in rows], [windows[j] for j in rows], [states[j] for j in rows])


def _key(stored: np.ndarray | None, encoded: np.ndarray | None) -> np.ndarray:
    """A memory's key: the stored state of its prefix, else the one just encoded."""
    key = stored if stored is not None else encoded
    assert key is not None  # each prefix of a keyed event holds a known item
    return key
