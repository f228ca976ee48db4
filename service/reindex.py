"""``memrec reindex``: put a model's memory bank into the store and write an index snapshot.

Run it once after training a model (the compose stack and the Kubernetes Job do) so that API replicas
find the bank already in Redis instead of racing to load it, and restart from the snapshot plus the
log tail instead of a full rebuild. It is idempotent: bank rows carry event ids, so a second run (or a
run racing a replica's start-up load) writes nothing twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from memory_store import open_store
from model import artifact
from service.app import store_config
from service.bank import load_bank
from service.settings import Settings
from service.user_memories import user_memory_setup

log = logging.getLogger(__name__)


async def reindex(settings: Settings) -> dict[str, Any]:
    """Load ``settings.model_dir``'s bank into its store namespace and snapshot the index."""
    t0 = time.perf_counter()
    art = artifact.load(settings.model_dir, "cpu")
    umem = user_memory_setup(art)
    config = store_config(settings, art.encoder.cfg.dim, art.model_version, art.vocab.n_items, False, umem)
    out: dict[str, Any] = {"model_version": art.model_version, "namespace": config.namespace}
    store = await open_store(config)
    try:
        written = 0
        if art.bank is not None:
            written = await load_bank(store, art.bank, art.vocab, art.first_items, user_memories=umem)
        out["written"] = written
        out["bank_rows"] = len(art.bank) if art.bank is not None else 0
        snap = await store.snapshot()
        stats = await store.stats()
    finally:
        await store.close()
    out.update(memories=stats.memories, snapshot=str(snap.path), position=snap.position)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("reindexed %s: %d memories in namespace %s", art.model_version, stats.memories, config.namespace)
    return out
