"""Memories of real encoder states at any scale: random walks over a dataset's item transitions.

A real bank holds one memory per (prefix → next item) event of its users; a large one is out of reach
of a public dataset (Beauty's bank has about 154k). To measure an index at 1M–10M memories on vectors
that look like the encoder's, each walk starts at a real user's prefix (a random cut of their training
sequence, its last ``PREFIX_MAX`` items) and continues for ``max_len`` positions in all by stepping
along the training sequences' item transitions (next item drawn in proportion to how often it followed
the current one; an item nothing followed jumps to a random item). The model's own encoder encodes each
walk in one causal pass, so every position after the real prefix gives a memory: the state of the walk
so far (key), the item that came next (value), the prefix's last items, a synthetic user per walk.

Only the training part of each sequence (all but its last two items) feeds the transitions, so no walk
carries a validation or test target's transition.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from model.data import Interactions
from model.sasrec import SASRec
from model.transitions import MAX_ORDER

PREFIX_MAX = 10  # real items a walk starts with, at most
ENCODE_BATCH = 512  # walks per encoder pass


@dataclass(frozen=True, slots=True)
class WalkMemories:
    """n memories of walks: keys (n, D) float32 raw states; items, prefix_lens (n,) int64; recent
    (n, MAX_ORDER) int64 most recent first; walk (n,) int64 the walk's number (its synthetic user)."""

    keys: np.ndarray
    items: np.ndarray
    prefix_lens: np.ndarray
    recent: np.ndarray
    walk: np.ndarray

    def __len__(self) -> int:
        return int(self.items.shape[0])


class TransitionWalker:
    """Walks over the item transitions of the training part of ``data``'s sequences."""

    def __init__(self, data: Interactions, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.train = [seq[:-2] for seq in data.sequences if len(seq) > 2]  # the leave-one-out training part
        a = np.concatenate([t[:-1] for t in self.train])
        b = np.concatenate([t[1:] for t in self.train])
        order = np.argsort(a, kind="stable")
        n_ids = data.vocab.n_items + 1
        self.indptr = np.zeros(n_ids + 1, np.int64)
        np.add.at(self.indptr, a + 1, 1)
        self.indptr = np.cumsum(self.indptr)
        self.followers = b[order]  # every observed (a -> b), grouped by a: drawing one is count-weighted
        self.pool = np.concatenate(self.train)  # a jump lands on an item in proportion to its frequency

    def sequences(self, n: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``n`` walks: items (n, length) int64, the real prefix's length in it (n,) and the full
        prefix's length before the window (n,): the user's items cut away in front of it."""
        users = self.rng.integers(0, len(self.train), n)
        out = np.zeros((n, length), np.int64)
        start = np.zeros(n, np.int64)
        cut_before = np.zeros(n, np.int64)
        for j, u in enumerate(users.tolist()):
            seq = self.train[u]
            end = int(self.rng.integers(1, len(seq) + 1))
            prefix = seq[max(0, end - PREFIX_MAX) : end]
            out[j, : len(prefix)] = prefix
            start[j], cut_before[j] = len(prefix), max(0, end - PREFIX_MAX)
        for t in range(1, length):
            cur = out[:, t - 1]
            lo, hi = self.indptr[cur], self.indptr[cur + 1]
            deg = hi - lo
            pick = lo + (self.rng.random(n) * np.maximum(deg, 1)).astype(np.int64)
            nxt = np.where(deg > 0, self.followers[np.minimum(pick, self.followers.size - 1)], 0)
            jump = self.pool[self.rng.integers(0, self.pool.size, n)]
            step = np.where(deg > 0, nxt, jump)
            walking = t >= start
            out[walking, t] = step[walking]
        return out, start, cut_before


@torch.inference_mode()
def walk_memories(
    encoder: SASRec, walker: TransitionWalker, n: int, first_walk: int = 0
) -> Iterator[WalkMemories]:
    """At least ``n`` memories of fresh walks, in chunks of one encoder pass (``ENCODE_BATCH`` walks of
    the encoder's ``max_len``); walks are numbered from ``first_walk``."""
    encoder.eval()
    length = encoder.cfg.max_len
    made, walk = 0, first_walk
    while made < n:
        seqs, start, cut = walker.sequences(ENCODE_BATCH, length)
        states = (
            encoder(torch.from_numpy(seqs)).float().numpy()
        )  # (B, T, D): position t encodes seqs[:, :t+1]
        rows, cols = np.nonzero(np.arange(length)[None, :] >= start[:, None])  # memory targets, t >= 1
        recent = np.zeros((rows.size, MAX_ORDER), np.int64)
        for lag in range(1, MAX_ORDER + 1):
            ok = cols - lag >= 0
            recent[ok, lag - 1] = seqs[rows[ok], cols[ok] - lag]
        chunk = WalkMemories(
            keys=np.ascontiguousarray(states[rows, cols - 1]),
            items=seqs[rows, cols],
            prefix_lens=cut[rows] + cols,
            recent=recent,
            walk=walk + rows.astype(np.int64),
        )
        made += len(chunk)
        walk += ENCODE_BATCH
        yield chunk
