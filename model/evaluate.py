"""Full-ranking evaluation: HR@K and NDCG@K over the whole catalogue (METHODS §5).

Two protocols from the same scores:

* ``unmasked`` (the paper protocol of RaSeRec/DuoRec): every item competes, seen items included.
* ``masked`` (the service protocol, and the FMLP/ICLRec family's): every item the user interacted with
  before the target is removed from the ranking. A target the user had already seen is then a miss.

With ``head_items`` the metrics are also split by target popularity: ``unmasked_head`` and
``unmasked_tail`` (and the masked pair) cover the targets among the head items and the rest.

Ranks are *pessimistic* on ties: the target's rank is the number of other items scoring at least as
high. A model that gives every item the same score therefore ranks every target last, not first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from model.data import IntArray, Samples, bucket_batches

KS = (5, 10, 20)
# (inputs (B, T), lengths (B,), sample indexes (B,)) → scores over all ids (B, n_items + 1)
ScoreFn = Callable[[Tensor, Tensor, IntArray], Tensor]
Metrics = dict[str, dict[str, float]]


def target_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """0-based rank of each target: the number of *other* items scoring ≥ the target. (B,) int64."""
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    return (scores >= target_scores).sum(dim=1) - 1


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """HR@K = share of targets ranked in the top K; NDCG@K = mean 1/log2(rank+2) over those."""
    out: dict[str, float] = {}
    n = max(len(ranks), 1)
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.sum() / n)
        out[f"ndcg@{k}"] = float((hit / np.log2(ranks + 2.0)).sum() / n)
    return out


def mask_seen(scores: Tensor, idx: IntArray, seen: tuple[IntArray, IntArray]) -> None:
    """Set the scores of items seen before each sample's target to -inf, in place."""
    indptr, indices = seen
    counts = indptr[idx + 1] - indptr[idx]
    rows = np.repeat(np.arange(len(idx)), counts)
    cols = np.concatenate([indices[indptr[i] : indptr[i + 1]] for i in idx]) if len(rows) else rows
    scores[torch.from_numpy(rows).to(scores.device), torch.from_numpy(cols).to(scores.device)] = -math.inf


def head_items(train_targets: IntArray, n_items: int, share: float = 0.2) -> np.ndarray:
    """(n_items + 1,) bool: the ``share`` most frequent training targets (ties by lower id)."""
    counts = np.bincount(train_targets, minlength=n_items + 1)[1:]
    order = np.argsort(-counts, kind="stable")[: int(round(share * n_items))]
    head = np.zeros(n_items + 1, dtype=bool)
    head[order + 1] = True
    return head


@torch.inference_mode()
def evaluate(
    score_fn: ScoreFn,
    samples: Samples,
    seen: tuple[IntArray, IntArray],
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
    ks: tuple[int, ...] = KS,
    head: np.ndarray | None = None,
) -> Metrics:
    """Rank every sample's target among all items, unmasked and masked; return both metric sets
    (and their head/tail split when ``head`` marks the popular items)."""
    device = torch.device(device)
    ranks = {"unmasked": np.zeros(len(samples), np.int64), "masked": np.zeros(len(samples), np.int64)}
    for idx in bucket_batches(samples.lengths, batch_size, rng=None):
        t = int(samples.lengths[idx].max())
        x = torch.from_numpy(samples.inputs[idx, :t]).to(device)
        lengths = torch.from_numpy(samples.lengths[idx]).to(device)
        y = torch.from_numpy(samples.targets[idx]).to(device)
        scores = score_fn(x, lengths, idx).float()
        ranks["unmasked"][idx] = target_ranks(scores, y).cpu().numpy()
        mask_seen(scores, idx, seen)
        ranks["masked"][idx] = target_ranks(scores, y).cpu().numpy()
    out = {name: metrics_from_ranks(r, ks) for name, r in ranks.items()}
    if head is not None:
        in_head = head[samples.targets]
        for name, r in ranks.items():
            out[f"{name}_head"] = metrics_from_ranks(r[in_head], ks)
            out[f"{name}_tail"] = metrics_from_ranks(r[~in_head], ks)
    return out
