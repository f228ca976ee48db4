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
training, validation and test samples (or any subset) look theirs up by key. The service replays the
users of a model's memory bank through :func:`replay_users` too, to start them with the memories their
test samples read (service.bank).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
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


@dataclass(frozen=True)
class Steps:
    """What a replay reads of each (prefix → target) step, row by row: the user, the prefix length p
    (the clock), the target merged after it and the query state h_p that accesses before."""

    users: IntArray  # (N,)
    prefix_lens: IntArray  # (N,)
    targets: IntArray  # (N,)
    states: FloatArray  # (N, D) raw encoder states (the bank's keys), normalised here


def replay(
    item_emb: FloatArray, samples: Samples, states: FloatArray, cfg: UserMemoryConfig, rules: MemoryRules
) -> UserMemoryTable:
    """Replay every user's sequence through the store's merge and eviction code.

    item_emb (N_items + 1, D) the frozen item table; samples: every (prefix → target) sample of the
    split with its query state in ``states`` (len(samples), D). Each user's samples must cover prefix
    lengths 1 … n-1 (leave-one-out does).
    """
    firsts = _first_items(samples)
    out = np.zeros((len(samples), cfg.capacity), dtype=np.int64)
    stats = ReplayStats()
    steps = Steps(samples.users, samples.prefix_lens, samples.targets, states)
    users = replay_users(item_emb, steps, firsts, cfg, rules, out, stats)
    for _ in tqdm(users, total=len(firsts), desc="user memories", leave=False, mininterval=2.0):
        pass
    return UserMemoryTable(samples.users, samples.prefix_lens, out, stats)


def accessed(vectors: FloatArray, unit_state: FloatArray, top: int) -> IntArray:
    """The rows of the ``top`` entries (vectors (n, D)) most similar to a query's unit state (D,) by
    cosine, most similar first, ties in entry order: what a live retrieval touches."""
    unit = l2_normalise(vectors)
    out: IntArray = np.argsort(-(unit @ unit_state), kind="stable")[:top]
    return out


def replay_users(
    item_emb: FloatArray,
    steps: Steps,
    firsts: Mapping[int, int],
    cfg: UserMemoryConfig,
    rules: MemoryRules,
    snapshots: IntArray | None = None,
    stats: ReplayStats | None = None,
) -> Iterator[tuple[int, Any]]:
    """Each user of ``firsts`` (user → item at position 0), in id order, with the entries held after
    every step of theirs: the first item merged at clock 0, then per step p, by p, ``access_top``
    entries accessed by h_p and the target merged at clock p. ``snapshots`` (len(steps), C), when
    given, gets what each step sees (items in entry order, 0 = empty); a user without steps holds their
    first item alone. The offline tables (:func:`replay`) and the service's start-up load (the memories
    of the users of a model's bank) both replay through this."""
    quality = rules.quality(cfg.quality, cfg.half_life)
    unit_states = l2_normalise(steps.states)
    order = np.lexsort((steps.prefix_lens, steps.users))  # by user, then position
    users_sorted = steps.users[order]
    stats = stats if stats is not None else ReplayStats()
    dim = item_emb.shape[1]
    for user in sorted(firsts):
        rows = order[np.searchsorted(users_sorted, user) : np.searchsorted(users_sorted, user, "right")]
        mem = rules.empty(str(user), dim)
        first = firsts[user]
        mem, _ = rules.merge(mem, [first], item_emb[[first]], [0.0], cfg.capacity, quality)
        for i in rows:
            p = float(steps.prefix_lens[i])
            if cfg.access_top and len(mem):
                top = accessed(mem.vectors, unit_states[i], cfg.access_top)
                mem, touched = rules.access(mem, mem.items[top].tolist(), p)
                stats.accesses += touched
            if snapshots is not None:
                snapshots[i, : len(mem)] = mem.items
            target = int(steps.targets[i])
            before = len(mem)
            mem, evicted = rules.merge(mem, [target], item_emb[[target]], [p], cfg.capacity, quality)
            stats.evictions += len(evicted)
            stats.merges += int(len(mem) == before and not evicted)
        yield user, mem


def item_table(encoder: SASRec) -> FloatArray:
    """The frozen item embeddings (N_items + 1, D) float32: what a user memory merges, per item."""
    with torch.no_grad():
        out: FloatArray = encoder.item_emb.weight.detach().float().cpu().numpy()
    return out


def build_table(
    encoder: SASRec, split: Split, cfg: UserMemoryConfig, rules: MemoryRules, device: str = "cpu"
) -> UserMemoryTable:
    """Encode every sample of the split with the frozen encoder and replay the users' memories."""
    samples = split_samples(split)
    states = encode_samples(encoder, samples, device)
    table = replay(item_table(encoder), samples, states, cfg, rules)
    log.info(
        "user memories (C=%d, %s): %d evictions, %d merges, %d accesses",
        cfg.capacity,
        cfg.quality,
        table.stats.evictions,
        table.stats.merges,
        table.stats.accesses,
    )
    return table
