"""Whole sample sets through the predictor: the offline side of memrec's one scoring path.

A sample set (training, validation or test queries) is encoded and searched once, over the whole set,
by the bank's exact index; the predictor's selection (model.predictor.select) keeps each query's
survivors, the leakage rule included. Each evaluation batch then goes through ``Predictor.score``
exactly as a request batch does in the service, with the bank's follower rows for the transition
channel (model.transitions.follower_rows) where the service reads the store's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model import transitions as tr
from model.data import IntArray, Samples
from model.evaluate import Metrics, evaluate
from model.memory import BankHits, FloatArray, MemoryBank, encode_samples
from model.predictor import Plan, Predictor, select, take


@dataclass(frozen=True)
class Queries:
    """A sample set ready to score: its plan and each query's memories, over the whole set."""

    plan: Plan  # (N,) states, depths, last items, users and positions (the leakage rule)
    hits: BankHits | None  # (N, K) the fusion's memories, survivors best first; None: no fusion
    voters: BankHits | None  # (N, V) the vote's nearest memories; None: no vote
    user_items: IntArray | None = None  # (N, C) the user's own memories (RAMRec); None: off

    def batch(self, idx: IntArray) -> Queries:
        return Queries(
            self.plan.subset(idx),
            None if self.hits is None else self.hits.subset(idx),
            None if self.voters is None else self.voters.subset(idx),
            None if self.user_items is None else self.user_items[idx],
        )


# How a sample set's memories are retrieved: (predictor, bank, plan, width) → survivors (N, width).
# The product retrieves by similarity (:func:`nearest`); benchmarks substitute controls.
Retrieve = Callable[[Predictor, MemoryBank, Plan, int], BankHits]


def nearest(predictor: Predictor, bank: MemoryBank, plan: Plan, width: int) -> BankHits:
    """Each query's ``width`` most similar memories that survive the selection rules, searched among
    ``width · fetch_factor`` candidates."""
    ids, scores = bank.candidates(plan.states, max(width * predictor.cfg.fetch_factor, width))
    cols, kept = select(bank.hits(ids, scores), width, plan.users, plan.prefix_lens, predictor.cfg.cross_user)
    kept_scores = np.where(kept, take(scores, cols), -np.inf).astype(np.float32)
    return bank.hits(np.where(kept, take(ids, cols), -1), kept_scores)


def windows(samples: Samples) -> list[IntArray]:
    """Each sample's input window (its last ≤ max_len items, oldest first)."""
    return [row[:n] for row, n in zip(samples.inputs, samples.lengths, strict=True)]


def prepare(
    predictor: Predictor,
    bank: MemoryBank,
    samples: Samples,
    device: str = "cpu",
    states: FloatArray | None = None,
    vote_depth: int | None = None,
    user_items: IntArray | None = None,
    retrieve: Retrieve = nearest,
) -> Queries:
    """Encode (unless ``states`` are given) and retrieve for every sample; the voters are searched when
    the predictor's vote is on, or to ``vote_depth`` when given (tuning)."""
    if states is None:
        states = encode_samples(predictor.encoder, samples, device)
    plan = predictor.plan(states, windows(samples), samples.users, prefix_lens=samples.prefix_lens)
    hits = retrieve(predictor, bank, plan, predictor.cfg.k) if predictor.retrieval else None
    depth = (
        vote_depth if vote_depth is not None else (predictor.cfg.vote.depth if predictor.cfg.vote.on else 0)
    )
    voters = nearest(predictor, bank, plan, depth) if depth > 0 and predictor.retrieval else None
    return Queries(plan, hits, voters, user_items)


_NO_FOLLOWERS: tr.Row = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))


def wanted_rows(table: Mapping[int, tr.Row], plan: Plan) -> dict[int, tr.Row]:
    """The follower rows a batch reads, as the store returns them: an empty row for an item that no
    memory's prefix holds."""
    return {a: table.get(a, _NO_FOLLOWERS) for a in plan.wanted}


def scores(
    predictor: Predictor, queries: Queries, rows: Mapping[int, tr.Row] | None, idx: IntArray
) -> Tensor:
    """Ranking scores (B, n_ids) of the samples ``idx``."""
    q = queries.batch(idx)
    batch_rows = wanted_rows(rows, q.plan) if rows is not None else None
    return predictor.score(q.plan, q.hits, batch_rows, q.voters, q.user_items).scores


def evaluate_predictor(
    predictor: Predictor,
    queries: Queries,
    samples: Samples,
    seen: tuple[IntArray, IntArray],
    rows: Mapping[int, tr.Row] | None = None,
    device: str = "cpu",
    head: np.ndarray | None = None,
) -> Metrics:
    """Full-ranking metrics of the predictor on ``samples`` (model.evaluate), ``rows`` being the follower
    rows of the bank the transition channel counts."""
    if predictor.fusion is not None:
        predictor.fusion.eval()

    def score_fn(_x: Tensor, _lengths: Tensor, idx: IntArray) -> Tensor:
        return scores(predictor, queries, rows, idx)

    with torch.inference_mode():
        return evaluate(score_fn, samples, seen, device=device, head=head)


def bank_rows(bank: MemoryBank, order: int = tr.MAX_ORDER) -> dict[int, tr.Row]:
    """The follower rows of a bank's memories (the transitions the channel counts)."""
    if bank.recent is None:
        raise ValueError("this memory bank has no prefix items: the transition channel needs them")
    return tr.follower_rows(bank.items, bank.recent, order)
