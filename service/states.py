"""The users' encoder states the service keeps beside their stored histories (memory_store.states), so that
a /recommend without a request history runs no encoder pass.

A state is the encoder's state of the history's last ``history_len`` items (:func:`encode_states`), the
very one ``Predictor.prepare`` computes for that user. The service writes one

* at /interactions: the ingestor encodes each user's history after the batch in the same encoder pass
  as the memory keys, and the store keeps it in the write that appends the items (service.ingest);
* at start-up, for the users of the model's bank: their stored histories encoded in batches, where the
  store holds no state that fits (:func:`fill_states`; a restart finds them kept);
* on the request path, for a stored history whose state was missing or stale: ``prepare`` encodes it,
  and :class:`WriteBack` keeps the state (one conditional write per micro-batch that had any).

The store keeps a state only while it encodes the history's last items, so none of these can leave a
stale one behind: a state that does not fit is not read, and the history is encoded again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np

from memory_store import MemoryStore
from memory_store.states import UserStates
from model.predictor import FloatArray, Predictor
from service.errors import store_errors

log = logging.getLogger(__name__)

FILL_CHUNK = 1024  # users read, encoded and written per step of the start-up fill


async def encode_states(
    predictor: Predictor, histories: Sequence[Sequence[int]], inline: bool = True
) -> list[FloatArray | None]:
    """The state (D,) ``Predictor.prepare`` computes for each history (the encoder over its
    ``window``), None where it holds no item the encoder knows (a cold user's), in one encoder pass: in
    the event-loop thread when ``inline``, else in a worker thread."""
    windows = [predictor.window(h) for h in histories]
    rows = [i for i, w in enumerate(windows) if len(w)]
    out: list[FloatArray | None] = [None] * len(histories)
    if rows:
        inputs = [windows[i] for i in rows]
        encoded = predictor.encode(inputs) if inline else await asyncio.to_thread(predictor.encode, inputs)
        for j, i in enumerate(rows):
            out[i] = encoded[j]
    return out


def user_states(
    users: Sequence[str], windows: Sequence[Sequence[int]], states: Sequence[FloatArray | None]
) -> UserStates | None:
    """The store's value of the users that have a state (None: a history without any known item), or
    None when none has. ``windows[i]``: the history items ``states[i]`` encodes, oldest first."""
    kept = [(i, state) for i, state in enumerate(states) if state is not None and len(windows[i])]
    if not kept:
        return None
    vectors = np.stack([state for _, state in kept]).astype(np.float32, copy=False)  # (u, D)
    return UserStates(tuple(users[i] for i, _ in kept), vectors, tuple(tuple(windows[i]) for i, _ in kept))


async def fill_states(store: MemoryStore, predictor: Predictor, users: Sequence[str], window: int) -> int:
    """Encode and keep the states of ``users``' stored histories for which the store holds none that
    fits; returns how many were written. The encoder runs in a worker thread (start-up: the event loop
    keeps applying the replication log meanwhile)."""
    written = 0
    for start in range(0, len(users), FILL_CHUNK):
        part = list(users[start : start + FILL_CHUNK])
        read = await store.histories_with_states(part, window)
        missing = zip(read.histories, read.states, strict=True)
        todo = [i for i, (history, state) in enumerate(missing) if history and state is None]
        if not todo:
            continue
        histories = [read.histories[i] for i in todo]
        states = await encode_states(predictor, histories, inline=False)
        put = user_states([part[i] for i in todo], histories, states)
        written += await store.put_states(put) if put is not None else 0
    return written


class WriteBack:
    """Keeps, in the background, the states the request path encoded for stored histories: the next
    request of those users reads them. A failed write is only logged (the state is encoded again)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self._pending: set[asyncio.Task[None]] = set()

    def submit(self, states: UserStates) -> None:
        task = asyncio.get_running_loop().create_task(self._put(states), name="state-write-back")
        self._pending.add(task)  # a reference until it is done: the loop keeps only weak ones
        task.add_done_callback(self._pending.discard)

    async def _put(self, states: UserStates) -> None:
        failures: tuple[type[Exception], ...] = (*store_errors(), ValueError)
        try:
            await self.store.put_states(states)
        except failures as exc:
            log.debug("could not keep %d encoder states: %s", len(states), exc)

    async def drain(self) -> None:
        """Wait for the writes submitted so far."""
        await asyncio.gather(*self._pending, return_exceptions=True)
