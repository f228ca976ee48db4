"""Memory vote: the retrieved memories' next items vote on the ranking, next to the model's own scores.

The fusion module (``model.fusion``) uses the memories only through a learned attention that ends in one
refined state; the items the nearest neighbours went on to choose reach the score only as far as that
state points at their embeddings. The vote uses them directly, as kNN-LM does for language models
(Khandelwal et al. 2020): the K nearest memories give a distribution over their next items, weighted by
a softmax of their cosine similarity to the query, and it is mixed with the model's distribution::

    p_vote(i) = Σ_k softmax_k(sim_k / τ) · [item_k = i]
    score(i)  = log((1 − λ) · softmax(logits)(i) + λ · p_vote(i))

Scores are log-probabilities; items no memory names keep the model's order. λ = 0 is the model alone.
Nothing is trained: λ, τ and the number of voters are chosen on the validation split (:func:`tune`):
the best NDCG@10 among the candidates whose HR@10 is not below the model's alone, λ = 0 among them, so
a vote that does not help there stays off. The guard matters: a heavy vote fills the top of the list
with the neighbours' items, which lifts NDCG@10 and loses HR@10 (on Beauty seed 0, NDCG@10 alone
chose λ = 0.5: test NDCG@10 0.0516 but HR@10 0.0856 against 0.0871 without the vote; with the
guard, λ = 0.1: 0.0497 and 0.0911).

A memory written a moment ago votes at once, without any retraining: this is what makes a live memory
bank move the ranking.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.evaluate import KS, metrics_from_ranks, target_ranks


@dataclass(frozen=True)
class Vote:
    weight: float = 0.0  # λ: the vote's share of the probability; 0 = off
    temperature: float = 0.05  # τ of the similarity softmax
    depth: int = 0  # voting memories per query (the nearest ones)

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight < 1.0:
            raise ValueError(f"vote weight must be in [0, 1), got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"vote temperature must be > 0, got {self.temperature}")
        if self.depth < 0:
            raise ValueError(f"vote depth must be ≥ 0, got {self.depth}")

    @property
    def on(self) -> bool:
        return self.weight > 0 and self.depth > 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VoteGrid:
    """Candidates of :func:`tune`; the off state (λ = 0) is always one of them."""

    weights: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.1)
    depths: tuple[int, ...] = (20, 50, 100)

    def votes(self) -> list[Vote]:
        on = [Vote(w, t, d) for w, t, d in itertools.product(self.weights, self.temperatures, self.depths)]
        return [Vote(), *on]

    @property
    def max_depth(self) -> int:
        return max(self.depths, default=0)


def slot_weights(items: Tensor, sims: Tensor, temperature: float) -> Tensor:
    """items (B, K) next-item ids of the voters (0 = empty slot), sims (B, K) their cosine similarity
    (any value, −inf included, at empty slots) → each voter's weight (B, K), a softmax of sim / τ over
    the present voters; 0 at empty slots and in a row without any voter."""
    present = items > 0
    logits = torch.where(present, sims / temperature, -math.inf)
    return torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0) * present  # NaN rows: no voter


def distribution(items: Tensor, sims: Tensor, temperature: float, n_ids: int) -> Tensor:
    """p_vote (B, n_ids): the voters' weights summed per item; a row without voters is all zero."""
    weights = slot_weights(items, sims, temperature)
    out = torch.zeros(items.shape[0], n_ids, dtype=weights.dtype, device=items.device)
    return out.scatter_add_(1, items, weights)


def mix(logits: Tensor, items: Tensor, sims: Tensor, vote: Vote) -> Tensor:
    """Model logits (B, n_ids), column 0 = -inf, and the voters (B, ≥ depth) → scores (B, n_ids), the
    log of the mixed distribution. Only the first ``vote.depth`` columns vote; with the vote off the
    logits come back as they are (the same ranking as their log-softmax).

    Only the voted items' scores change beyond the shift every item gets, so they are computed on the
    (B, depth) voter slots and scattered in: two passes over the catalogue instead of seven, which
    matters on the request path (12k items × a micro-batch)."""
    if not vote.on:
        return logits
    items, sims = items[:, : vote.depth], sims[:, : vote.depth].float()
    logits = logits.float()
    # log((1−λ)·softmax(logits)) for every item: the unvoted items' final score, in the model's order
    base = logits - (torch.logsumexp(logits, dim=-1, keepdim=True) - math.log1p(-vote.weight))
    w = slot_weights(items, sims, vote.temperature)  # (B, K)
    q = ((items[:, :, None] == items[:, None, :]) * w[:, None, :]).sum(-1)  # (B, K) each slot's item's vote
    # log((1−λ)p + λq) at the voted items; an empty slot (item 0, q = 0) rewrites the padding column's
    # −inf with −inf. A repeated item writes the same value from each of its slots.
    voted = torch.logaddexp(base.gather(1, items), torch.log(vote.weight * q))
    return base.scatter_(1, items, voted)  # base is this call's own tensor


@dataclass
class TuneResult:
    best: Vote
    metric: str
    guard: str | None
    table: list[dict[str, Any]] = field(default_factory=list)  # every candidate's validation metrics
    z: float = 0.0  # the best vote's paired gain over off in standard errors (0: no vote beat off); the
    # vote stays off when it is below min_z
    candidate: Vote | None = None  # the validation winner z belongs to, kept or refused (None: off won)


Batch = tuple[Tensor, Tensor, Tensor, Tensor]  # logits (B, n_ids), items (B, K), sims (B, K), targets (B,)


@torch.inference_mode()
def tune(
    batches: Iterable[Batch],
    grid: VoteGrid,
    metric: str = "ndcg@10",
    guard: str | None = "hr@10",
    ks: tuple[int, ...] = KS,
    min_z: float = 2.0,
) -> TuneResult:
    """Every candidate of ``grid`` on the same validation batches (unmasked protocol); the best by
    ``metric`` among those whose ``guard`` metric is at least the vote-off state's, ties to the earlier
    candidate, so λ = 0 wins unless a vote does better. The winner must also beat off by ``min_z``
    standard errors of its paired per-sample gain: on a small validation set (ml-100k's 943 users) the
    best of 45 candidates can win by noise alone, and then loses on test."""
    votes = grid.votes()
    ranks: list[list[np.ndarray]] = [[] for _ in votes]
    for logits, items, sims, targets in batches:
        for j, v in enumerate(votes):
            ranks[j].append(target_ranks(mix(logits, items, sims, v), targets).cpu().numpy())
    table = []
    for v, r in zip(votes, ranks, strict=True):
        table.append({**v.to_json(), **metrics_from_ranks(np.concatenate(r) if r else np.zeros(0), ks)})
    allowed = [j for j in range(len(votes)) if guard is None or table[j][guard] >= table[0][guard]]
    best = max(allowed, key=lambda j: (table[j][metric], -j))  # 0 (off) is always allowed
    z = paired_z(np.concatenate(ranks[best]), np.concatenate(ranks[0]), metric) if best else 0.0
    candidate = votes[best] if best else None
    if z < min_z:
        best = 0
    return TuneResult(votes[best], metric, guard, table, z, candidate)


def paired_z(ranks: np.ndarray, base: np.ndarray, metric: str) -> float:
    """Mean per-sample gain of ``metric`` ("hr@K" or "ndcg@K") from ranks ``base`` (n,) to ``ranks``
    (n,), over its standard error; ±inf for a gain without spread, 0 for none at all."""
    name, k = metric.split("@")

    def per_sample(r: np.ndarray) -> np.ndarray:
        hit = r < int(k)
        return hit / np.log2(r + 2.0) if name == "ndcg" else hit.astype(float)

    d = per_sample(ranks) - per_sample(base)
    mean = float(d.mean()) if len(d) else 0.0
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    if se == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / se
