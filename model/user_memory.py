"""User memories offline (RAMRec, METHODS §3): each user's own bank, replayed in interaction order.

The store keeps, per user, up to C memories of item embeddings, merges a repeated item by moving
average and, when full, evicts the entry of lowest quality (``memory_store.user_memory``). To train and
evaluate a fusion that reads those memories, and to compare quality functions, this module replays
every user's sequence through that very code:

* the clock is the user's interaction count (position p in the sequence), so recency is measured in
  interactions and the half-life is a number of interactions;
* before the target at position p the user's query state h_p (the frozen encoder's output of the
  prefix) *accesses* the ``access_top`` entries most similar to it (cosine), as a live retrieval would;
  ``fewest_accesses`` counts those;
* the snapshot the sample (u, p) sees is the memory after the accesses and before item p is merged:
  only items at positions < p, so never the target or the future.

A :class:`UserMemoryTable` holds one snapshot per (user, prefix length) of the whole split, so the
training, validation and test samples (or any subset) look theirs up by key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.data import IntArray, Samples, Split
from model.memory import FloatArray, encode_samples, l2_normalise
from model.sasrec import SASRec

log = logging.getLogger(__name__)

QUALITIES = ("recency_frequency", "fewest_accesses")


@dataclass(frozen=True)
class MemoryRules:
    """The memory store's per-user memory rules (its ``UserMemories`` entries, merge and eviction, the
    record of accesses), handed in by the caller: the offline replay runs the store's very code, and
    model/ does not import the store. ``service.memory_rules.store_rules()`` builds it."""

    empty: Callable[[str, int], Any]  # (user id, dim) → entries with ``items`` and ``vectors``
    # (entries, items, vectors, timestamps, capacity, quality) → (entries, evicted items)
    merge: Callable[[Any, Sequence[int], np.ndarray, Sequence[float], int, Any], tuple[Any, Sequence[int]]]
    access: Callable[[Any, Sequence[int], float], tuple[Any, int]]  # (entries, items, ts) → (entries, n)
    quality: Callable[[str, float], Any]  # (quality name, half-life) → the eviction order


@dataclass
class UserMemoryConfig:
    capacity: int = 75  # C: memories kept per user
    quality: str = "recency_frequency"  # eviction order; "fewest_accesses" is RAMRec's original
    access_top: int = 5  # entries a query accesses: the most similar to its state
    half_life: float = 10.0  # interactions, for recency_frequency (bench.user_memory: 10 beats 50)

    def __post_init__(self) -> None:
        if self.quality not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, got {self.quality!r}")
        if self.capacity < 1 or self.access_top < 0 or self.half_life <= 0:
            raise ValueError("capacity ≥ 1, access_top ≥ 0 and half_life > 0 are required")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReplayStats:
    evictions: int = 0
    merges: int = 0
    accesses: int = 0


class UserMemoryTable:
    """Snapshots (M, C) of item ids (0 = empty slot) keyed by (user, prefix length)."""

    def __init__(self, users: IntArray, prefix_lens: IntArray, items: IntArray, stats: ReplayStats) -> None:
        self.stride = int(prefix_lens.max()) + 1
        keys = users.astype(np.int64) * self.stride + prefix_lens.astype(np.int64)
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]  # (M,) sorted
        self.items = items[order]  # (M, C)
        self.stats = stats

    @property
    def capacity(self) -> int:
        return int(self.items.shape[1])

    def lookup(self, samples: Samples) -> IntArray:
        """The snapshot each sample sees, (N, C); a sample the table does not know is an error."""
        keys = samples.users.astype(np.int64) * self.stride + samples.prefix_lens.astype(np.int64)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        if not np.array_equal(self.keys[pos], keys) or (samples.prefix_lens >= self.stride).any():
            raise KeyError("samples outside the split the user-memory table was built from")
        out: IntArray = self.items[pos]
        return out


def _first_items(all_samples: Samples) -> dict[int, int]:
    """Item at position 0 of each user: the first input of the user's prefix-1 sample."""
    first = np.flatnonzero(all_samples.prefix_lens == 1)
    return {int(all_samples.users[i]): int(all_samples.inputs[i, 0]) for i in first}


def split_samples(split: Split) -> Samples:
    """Training, validation and test samples of a split as one set: every prefix of every user."""
    parts = (split.train, split.valid, split.test)
    return Samples(*(np.concatenate([getattr(p, f) for p in parts]) for f in Samples.__dataclass_fields__))


def replay(
    item_emb: FloatArray, samples: Samples, states: FloatArray, cfg: UserMemoryConfig, rules: MemoryRules
) -> UserMemoryTable:
    """Replay every user's sequence through the store's merge and eviction code.

    item_emb (N_items + 1, D) the frozen item table; samples: every (prefix → target) sample of the
    split with its query state in ``states`` (len(samples), D). Each user's samples must cover prefix
    lengths 1 … n-1 (leave-one-out does).
    """
    quality = rules.quality(cfg.quality, cfg.half_life)
    unit_states = l2_normalise(states)
    firsts = _first_items(samples)
    order = np.lexsort((samples.prefix_lens, samples.users))  # by user, then position
    users_sorted = samples.users[order]
    bounds = np.flatnonzero(np.diff(users_sorted)) + 1
    out = np.zeros((len(samples), cfg.capacity), dtype=np.int64)
    stats = ReplayStats()
    dim = item_emb.shape[1]
    for rows in tqdm(np.split(order, bounds), desc="user memories", leave=False, mininterval=2.0):
        user = int(samples.users[rows[0]])
        mem = rules.empty(str(user), dim)
        first = firsts[user]
        mem, _ = rules.merge(mem, [first], item_emb[[first]], [0.0], cfg.capacity, quality)
        for i in rows:
            p = float(samples.prefix_lens[i])
            if cfg.access_top and len(mem):
                unit = l2_normalise(mem.vectors)
                top = np.argsort(-(unit @ unit_states[i]), kind="stable")[: cfg.access_top]
                mem, touched = rules.access(mem, mem.items[top].tolist(), p)
                stats.accesses += touched
            out[i, : len(mem)] = mem.items
            target = int(samples.targets[i])
            before = len(mem)
            mem, evicted = rules.merge(mem, [target], item_emb[[target]], [p], cfg.capacity, quality)
            stats.evictions += len(evicted)
            stats.merges += int(len(mem) == before and not evicted)
    return UserMemoryTable(samples.users, samples.prefix_lens, out, stats)


def build_table(
    encoder: SASRec, split: Split, cfg: UserMemoryConfig, rules: MemoryRules, device: str = "cpu"
) -> UserMemoryTable:
    """Encode every sample of the split with the frozen encoder and replay the users' memories."""
    samples = split_samples(split)
    states = encode_samples(encoder, samples, device)
    with torch.no_grad():
        item_emb = encoder.item_emb.weight.detach().float().cpu().numpy()
    table = replay(item_emb, samples, states, cfg, rules)
    log.info(
        "user memories (C=%d, %s): %d evictions, %d merges, %d accesses",
        cfg.capacity,
        cfg.quality,
        table.stats.evictions,
        table.stats.merges,
        table.stats.accesses,
    )
    return table
