"""Start-up bulk load of the artifact's memory bank (training + validation memories) into the store.

Each bank row is ingested as an interaction of its user with an event id derived from its row
(``bank:{row}``), so the store's atomic dedup accepts every row once per namespace: a restart, or two
replicas loading at the same time against one Redis, never double-load (rows already written come back
as duplicates), and a load interrupted half-way resumes where it stopped. A store that already holds at
least as many memories as the bank is taken as loaded and skipped without a write. Rows go in user
order, by prefix length, so each known user's stored history is their training sequence (first item
excepted: it is never a target), with timestamps 0.0.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from memory_store import Interaction, MemoryStore
from model.data import Vocab
from model.memory import MemoryBank

log = logging.getLogger(__name__)

CHUNK = 5_000


def bank_event_id(row: int) -> str:
    return f"bank:{row}"


async def load_bank(store: MemoryStore, bank: MemoryBank, vocab: Vocab, chunk: int = CHUNK) -> int:
    """Write the bank's rows not in the store yet; returns how many were written by this call."""
    held = (await store.stats()).memories
    if held >= len(bank):
        log.info("memory bank already loaded (%d memories held, bank has %d)", held, len(bank))
        return 0
    t0 = time.perf_counter()
    order = np.lexsort((bank.prefix_lens, bank.users))  # by user, then prefix length
    written = 0
    for s in range(0, len(order), chunk):
        rows = order[s : s + chunk]
        events = [
            Interaction(vocab.users[int(bank.users[r])], int(bank.items[r]), 0.0, bank_event_id(int(r)))
            for r in rows
        ]
        res = await store.ingest(events, bank.keys[rows], bank.prefix_lens[rows])
        written += res.accepted
    log.info(
        "loaded %d of %d bank memories in %.1f s (%d were already there)",
        written,
        len(bank),
        time.perf_counter() - t0,
        len(bank) - written,
    )
    return written
