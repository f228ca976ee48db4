"""The collaborative memory bank of RaSeRec (Zhao et al. 2024; METHODS §2).

One memory per (prefix → next item) event: key = the frozen encoder's state of the prefix (D), value =
the next item's id, plus the user and the prefix length. Search is cosine similarity: inner product on
L2-normalised keys in an exact FAISS index. The fusion attends over the same normalised keys (the published
code used raw states; cosine-space keys let a live store that keeps only normalised vectors serve the
very same model).

The leakage rule: a query of user u with prefix length p may not see u's memories with prefix length ≥ p
(its own event and its future). The bank fetches ``fetch_factor · K`` candidates, drops those, and
keeps the best K; a row with fewer survivors is padded with -1 and masked, never an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np
import numpy.typing as npt
import torch

from model.data import IntArray, Samples, bucket_batches
from model.sasrec import SASRec
from model.transitions import MAX_ORDER, recent_items

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


def l2_normalise(x: FloatArray) -> FloatArray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: FloatArray = (x / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


@torch.inference_mode()
def encode_samples(
    encoder: SASRec, samples: Samples, device: str = "cpu", batch_size: int = 1024
) -> FloatArray:
    """The frozen encoder's state for every sample, in sample order: (N, D) float32."""
    encoder.eval()
    out = np.zeros((len(samples), encoder.cfg.dim), dtype=np.float32)
    for idx in bucket_batches(samples.lengths, batch_size, rng=None):
        t = int(samples.lengths[idx].max())
        x = torch.from_numpy(samples.inputs[idx, :t]).to(device)
        lengths = torch.from_numpy(samples.lengths[idx]).to(device)
        out[idx] = encoder.encode(x, lengths).float().cpu().numpy()
    return out


@dataclass
class Retrieved:
    """Top-K memories per query. ``ids`` is -1 where fewer than K memories survived the leakage rule."""

    ids: IntArray  # (B, K) memory ids, -1 = empty slot
    scores: FloatArray  # (B, K) cosine similarity, -inf at empty slots

    @property
    def mask(self) -> npt.NDArray[np.bool_]:
        """(B, K) True where a slot holds a memory."""
        valid: npt.NDArray[np.bool_] = self.ids >= 0
        return valid


class MemoryBank:
    """Memories as parallel arrays plus an exact inner-product FAISS index over normalised keys."""

    def __init__(
        self,
        keys: FloatArray,
        items: IntArray,
        users: IntArray,
        prefix_lens: IntArray,
        recent: IntArray | None = None,
    ) -> None:
        n = len(keys)
        if not (len(items) == len(users) == len(prefix_lens) == n):
            raise ValueError("keys, items, users and prefix_lens must have the same length")
        if recent is not None and recent.shape != (n, MAX_ORDER):
            raise ValueError(f"recent must have shape ({n}, {MAX_ORDER}), got {recent.shape}")
        if not np.isfinite(keys).all():
            raise ValueError("memory keys must be finite")
        self.keys = np.ascontiguousarray(keys, dtype=np.float32)  # (N, D) raw encoder states
        self.unit_keys = l2_normalise(self.keys)  # (N, D) what search and attention use
        self.items = items.astype(np.int64)  # (N,) value item ids
        self.users = users.astype(np.int64)  # (N,)
        self.prefix_lens = prefix_lens.astype(np.int64)  # (N,)
        # (N, MAX_ORDER) each prefix's last items, most recent first, 0 = none (model.transitions);
        # None in model directories written before they were kept
        self.recent = None if recent is None else recent.astype(np.int64)
        self.index = faiss.IndexFlatIP(self.keys.shape[1])
        self.index.add(self.unit_keys)

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def from_samples(cls, keys: FloatArray, samples: Samples) -> MemoryBank:
        recent = recent_items(samples.inputs, samples.lengths)
        return cls(keys, samples.targets, samples.users, samples.prefix_lens, recent)

    def concat(self, other: MemoryBank) -> MemoryBank:
        """A new bank holding both sets of memories (e.g. training + validation pairs at test time)."""
        both = self.recent is not None and other.recent is not None
        return MemoryBank(
            np.concatenate([self.keys, other.keys]),
            np.concatenate([self.items, other.items]),
            np.concatenate([self.users, other.users]),
            np.concatenate([self.prefix_lens, other.prefix_lens]),
            np.concatenate([self.recent, other.recent]) if both else None,
        )

    def search(
        self,
        queries: FloatArray,
        users: IntArray,
        prefix_lens: IntArray,
        k: int,
        fetch_factor: int = 4,
        own: bool = True,
    ) -> Retrieved:
        """Top-k memories by cosine similarity for each query, after the leakage rule.

        queries: (B, D) raw encoder states; users, prefix_lens: (B,) of the querying samples. With
        ``own=False`` a query sees other users' memories only.
        """
        fetch = min(max(k * fetch_factor, k), len(self))
        scores, ids = self.index.search(l2_normalise(np.asarray(queries, dtype=np.float32)), fetch)  # (B, F)
        safe = np.maximum(ids, 0)
        same_user = self.users[safe] == users[:, None]
        leak = same_user if not own else same_user & (self.prefix_lens[safe] >= prefix_lens[:, None])
        keep = (ids >= 0) & ~leak
        # Stable sort moves survivors to the front in similarity order; the first k columns are the answer.
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        out_ids = np.take_along_axis(np.where(keep, ids, -1), order, axis=1)
        out_scores = np.take_along_axis(np.where(keep, scores, -np.inf), order, axis=1).astype(np.float32)
        if out_ids.shape[1] < k:  # a bank smaller than k
            pad = k - out_ids.shape[1]
            out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
            out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return Retrieved(out_ids.astype(np.int64), out_scores)

    def random(
        self, queries: FloatArray, users: IntArray, prefix_lens: IntArray, k: int, rng: np.random.Generator
    ) -> Retrieved:
        """k memories drawn uniformly at random per query, leakage rule applied: the control that shows
        whether similarity matters. Scores are the true cosine similarities of the drawn memories."""
        draw = rng.integers(0, len(self), size=(len(users), 2 * k))  # (B, 2k): spare draws for leaks
        leak = (self.users[draw] == users[:, None]) & (self.prefix_lens[draw] >= prefix_lens[:, None])
        order = np.argsort(leak, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(np.where(leak, -1, draw), order, axis=1)
        q = l2_normalise(np.asarray(queries, dtype=np.float32))
        keys = self.unit_keys[np.maximum(ids, 0)]  # (B, k, D)
        scores = np.where(ids >= 0, np.einsum("bd,bkd->bk", q, keys), -np.inf).astype(np.float32)
        return Retrieved(ids.astype(np.int64), scores)
