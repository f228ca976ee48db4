"""The memory store's per-user memory rules as the model's offline replay reads them
(model.user_memory.MemoryRules): the command line, the benchmarks and the tests hand them to the model,
so that the replay runs the store's very code without model/ importing the store."""

from __future__ import annotations

from memory_store import user_memory as um
from model.user_memory import MemoryRules


def _quality(name: str, half_life: float) -> um.QualityFn:
    """RAMRec's eviction order ("fewest_accesses") or ours (recency and frequency, ``half_life``)."""
    return um.fewest_accesses_quality if name == "fewest_accesses" else um.recency_frequency(half_life)


def store_rules() -> MemoryRules:
    return MemoryRules(um.UserMemories.empty, um.merge_observations, um.record_access, _quality)
