"""Start-up bulk load of the artifact's memory bank (training + validation memories) into the store.

Each bank row is ingested as an interaction of its user with an event id derived from its row
(``bank:{row}``), so the store's atomic dedup accepts every row once per namespace: a restart, or two
replicas loading at the same time against one Redis, never double-load (rows already written come back
as duplicates), and a load interrupted half-way resumes where it stopped. A completed load is recorded
in the store (``mark_bank_loaded``) and never runs again in that namespace: the dedup markers expire,
and an erased user's markers go with them, so only the record keeps a restart from loading the rows
of a user erased since (or every row, once the markers expired). A store that already holds at least
as many memories as the bank (loaded before the record existed) is taken as loaded too. Rows go in user
order, by prefix length, each user's first item (no memory's value, kept beside the bank) appended to
the history just before the user's first row, so each known user's stored history is their training
+ validation sequence, the input of their offline test sample, with timestamps 0.0. A model directory
written before first items were kept gives histories without them. The rows stay out of the store's
interaction log: they are the model's training data, which ``memrec export --with-training-data`` takes
from the data set itself (test items and timestamps included). A model that fuses per-user (RAMRec)
memories has each known user's memories replayed and written in the same load
(:func:`load_user_memories`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np

from memory_store import Interaction, MemoryStore
from model.data import Vocab
from model.memory import MemoryBank
from model.user_memory import Steps, replay_users
from service.user_memories import UserMemorySetup

log = logging.getLogger(__name__)

CHUNK = 5_000
USER_CHUNK = 1_024  # users replayed (in a worker thread) and written per step of the user-memory load


def bank_event_id(row: int) -> str:
    return f"bank:{row}"


def first_item_event_id(user: int) -> str:
    return f"bank:first:{user}"


async def _append_first_items(
    store: MemoryStore, vocab: Vocab, first_items: np.ndarray, users: np.ndarray
) -> None:
    """History-only events: the first item of each of ``users`` (internal ids) that has one."""
    events = [
        Interaction(vocab.users[int(u)], int(first_items[u]), 0.0, first_item_event_id(int(u)))
        for u in users
        if first_items[u] > 0
    ]
    if events:
        await store.append_interactions(events, logged=False)


async def load_user_memories(
    store: MemoryStore,
    bank: MemoryBank,
    vocab: Vocab,
    first_items: np.ndarray,
    setup: UserMemorySetup,
    chunk: int = USER_CHUNK,
) -> int:
    """Give each user with a first item the memories the offline replay leaves after their training
    and validation sequence (model.user_memory.replay_users): each bank row is a step, its prefix
    length the clock, its item the target, its key the query state that accesses. Those are the
    memories the user's test sample reads offline. Users who hold memories already keep theirs (a
    repeated or resumed load); returns how many users were written."""
    users = np.flatnonzero(first_items > 0)
    written = 0
    for s in range(0, len(users), chunk):
        part = users[s : s + chunk]
        rows = np.flatnonzero(np.isin(bank.users, part))
        steps = Steps(bank.users[rows], bank.prefix_lens[rows], bank.items[rows], bank.keys[rows])
        firsts = {int(u): int(first_items[u]) for u in part}

        def replay(steps: Steps = steps, firsts: dict[int, int] = firsts) -> list[tuple[int, Any]]:
            return list(replay_users(setup.item_emb, steps, firsts, setup.cfg, setup.rules))

        replayed = await asyncio.to_thread(replay)  # the event loop keeps applying the log meanwhile
        written += await store.put_user_memories([replace(m, user_id=vocab.users[u]) for u, m in replayed])
    return written


async def load_bank(
    store: MemoryStore,
    bank: MemoryBank,
    vocab: Vocab,
    first_items: np.ndarray | None = None,
    chunk: int = CHUNK,
    user_memories: UserMemorySetup | None = None,
) -> int:
    """Write the bank's rows not in the store yet; returns how many were written by this call.
    ``first_items`` (n_users,): each user's first item, 0 for none (``Artifact.first_items``).
    ``user_memories``: the model fuses per-user memories, which the known users get too
    (:func:`load_user_memories`), as part of the same load."""
    if user_memories is not None and first_items is None:
        raise ValueError("user memories are replayed from each user's first item: the model has none")
    if await store.bank_loaded():
        log.info("memory bank already loaded (recorded in the store)")
        return 0
    held = (await store.stats()).memories
    if held >= len(bank):
        log.info("memory bank already loaded (%d memories held, bank has %d)", held, len(bank))
        await store.mark_bank_loaded()
        return 0
    t0 = time.perf_counter()
    order = np.lexsort((bank.prefix_lens, bank.users))  # by user, then prefix length
    users = bank.users[order]
    starts = np.r_[True, users[1:] != users[:-1]]  # (N,) True at each user's first row
    if first_items is not None:  # users with a first item but no memory (a test sample only) go first
        await _append_first_items(store, vocab, first_items, np.setdiff1d(np.arange(len(first_items)), users))
    written = 0
    for s in range(0, len(order), chunk):
        rows = order[s : s + chunk]
        if first_items is not None:
            await _append_first_items(store, vocab, first_items, users[s : s + chunk][starts[s : s + chunk]])
        events = [
            Interaction(vocab.users[int(bank.users[r])], int(bank.items[r]), 0.0, bank_event_id(int(r)))
            for r in rows
        ]
        recent = bank.recent[rows] if bank.recent is not None else None  # None: older model directories
        res = await store.ingest(events, bank.keys[rows], bank.prefix_lens[rows], recent, logged=False)
        written += res.accepted
    if user_memories is not None and first_items is not None:
        t1 = time.perf_counter()
        n_users = await load_user_memories(store, bank, vocab, first_items, user_memories)
        log.info("user memories of %d known users written in %.1f s", n_users, time.perf_counter() - t1)
    await store.mark_bank_loaded()
    log.info(
        "loaded %d of %d bank memories in %.1f s (%d were already there)",
        written,
        len(bank),
        time.perf_counter() - t0,
        len(bank) - written,
    )
    return written
