"""The collaborative memory bank of RaSeRec (Zhao et al. 2024; METHODS §2).

One memory per (prefix → next item) event: key = the frozen encoder's state of the prefix (D), value =
the next item's id, plus the user and the prefix length. Search is cosine similarity: inner product on
L2-normalised keys in an exact FAISS index. The fusion attends over the same normalised keys (the published
code used raw states; cosine-space keys let a live store that keeps only normalised vectors serve the
very same model).

The bank answers a search as the live store does (:class:`BankHits`): the nearest memories, best first.
The leakage rule (a query of user u with prefix length p may not see u's memories with prefix length
≥ p: its own event and its future) is applied by the predictor's selection (model.predictor.select),
over ``fetch_factor · K`` candidates; a row with fewer survivors is padded and masked, never an error.
"""

from __future__ import annotations

import logging

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

    def candidates(self, queries: FloatArray, fetch: int) -> tuple[IntArray, FloatArray]:
        """The ``fetch`` most similar memories of each query (B, D) raw states, best first: ids (B, F),
        -1 past the bank's size, and cosine similarities (B, F), -inf there. The rules that drop some
        (the leakage rule, the cross-user rule) are the predictor's (model.predictor.select)."""
        fetch = min(fetch, len(self))
        scores, ids = self.index.search(l2_normalise(np.asarray(queries, dtype=np.float32)), fetch)
        return ids.astype(np.int64), np.where(ids >= 0, scores, -np.inf).astype(np.float32)

    def hits(self, ids: IntArray, scores: FloatArray) -> BankHits:
        """Search results ``ids``, ``scores`` (B, S) as the predictor reads a store's."""
        return BankHits(self, ids, scores)


class BankHits:
    """Memories of the bank as a search answer (model.predictor.Candidates): the arrays a store returns
    with a search, read from the bank for the rows' memory ids, and only when asked for."""

    def __init__(self, bank: MemoryBank, ids: IntArray, scores: FloatArray) -> None:
        self.bank = bank
        self.ids = ids  # (B, S), -1 = no memory
        self.scores = scores  # (B, S)

    def _at(self, a: np.ndarray, empty: int) -> np.ndarray:
        out: np.ndarray = np.where(self.ids >= 0, a[np.maximum(self.ids, 0)], empty)
        return out

    @property
    def items(self) -> IntArray:
        return self._at(self.bank.items, 0)

    @property
    def users(self) -> IntArray:
        return self._at(self.bank.users, -1)

    @property
    def prefix_lens(self) -> IntArray:
        return self._at(self.bank.prefix_lens, -1)

    @property
    def keys(self) -> FloatArray:
        """(B, S, D) unit keys; an empty slot reads memory 0's (the fusion masks it)."""
        out: FloatArray = self.bank.unit_keys[np.maximum(self.ids, 0)]
        return out

    def subset(self, idx: IntArray) -> BankHits:
        return BankHits(self.bank, self.ids[idx], self.scores[idx])
