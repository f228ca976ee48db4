"""HR@K and NDCG@K on rankings computed by hand, both protocols, pessimistic ties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.data import Samples
from model.evaluate import evaluate, head_items, mask_seen, metrics_from_ranks, target_ranks


def test_metrics_on_known_ranks() -> None:
    ranks = np.array([0, 1, 4, 9, 30])
    m = metrics_from_ranks(ranks, ks=(5, 10))
    assert m["hr@5"] == pytest.approx(3 / 5)
    assert m["hr@10"] == pytest.approx(4 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 5)


def test_ranks_count_other_items_scoring_at_least_the_target() -> None:
    scores = torch.tensor([[-math.inf, 0.9, 0.5, 0.7, 0.5], [-math.inf, 1.0, 1.0, 1.0, 1.0]])
    # row 0: target item 2 (0.5) is beaten by 0.9, 0.7 and tied with item 4 → rank 3
    # row 1: all equal → the target ranks last among the 4 real items
    assert target_ranks(scores, torch.tensor([2, 3])).tolist() == [3, 3]
    assert target_ranks(scores, torch.tensor([1, 1])).tolist() == [0, 3]


def test_mask_seen_removes_each_rows_history() -> None:
    scores = torch.zeros(2, 5)
    seen = (np.array([0, 2, 3]), np.array([1, 3, 4]))
    mask_seen(scores, np.array([1, 0]), seen)  # batch row 0 is sample 1, row 1 is sample 0
    assert torch.isinf(scores).nonzero().tolist() == [[0, 4], [1, 1], [1, 3]]


def test_evaluate_both_protocols_from_fixed_scores() -> None:
    # Two samples over 4 items. A fixed score table stands in for the model.
    table = torch.tensor([[-math.inf, 0.9, 0.8, 0.1, 0.0], [-math.inf, 0.1, 0.2, 0.3, 0.9]])
    samples = Samples(
        inputs=np.array([[1, 0], [4, 3]]),
        lengths=np.array([1, 2]),
        targets=np.array([2, 3]),
        users=np.array([0, 1]),
        prefix_lens=np.array([1, 2]),
    )
    seen = (np.array([0, 1, 3]), np.array([1, 4, 3]))  # sample 0 saw item 1; sample 1 saw 4 and 3

    def score_fn(x: torch.Tensor, lengths: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        return table[torch.from_numpy(idx)].clone()

    m = evaluate(score_fn, samples, seen, ks=(1, 2))
    # unmasked: sample 0 target 2 rank 1 (item 1 above); sample 1 target 3 rank 1 (item 4 above)
    assert m["unmasked"]["hr@1"] == 0.0 and m["unmasked"]["hr@2"] == 1.0
    # masked: sample 0 loses item 1 → rank 0; sample 1's target was seen → masked away, a miss
    assert m["masked"]["hr@1"] == pytest.approx(0.5) and m["masked"]["hr@2"] == pytest.approx(0.5)
    assert m["masked"]["ndcg@2"] == pytest.approx(0.5)


def test_head_items_are_the_most_frequent_fifth() -> None:
    targets = np.array([3, 3, 3, 7, 7, 1, 2, 4, 5, 6, 8, 9, 10])  # 10 items; 3 and 7 are the most frequent
    assert np.flatnonzero(head_items(targets, n_items=10)).tolist() == [3, 7]


def test_evaluate_splits_metrics_by_target_popularity() -> None:
    table = torch.tensor([[-math.inf, 0.9, 0.1, 0.0], [-math.inf, 0.9, 0.1, 0.0]])
    samples = Samples(
        inputs=np.array([[3], [3]]),
        lengths=np.array([1, 1]),
        targets=np.array([1, 2]),
        users=np.array([0, 1]),
        prefix_lens=np.array([1, 1]),
    )
    seen = (np.array([0, 1, 2]), np.array([3, 3]))

    def score_fn(x: torch.Tensor, lengths: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        return table[torch.from_numpy(idx)].clone()

    head = np.array([False, True, False, False])  # item 1 is the head
    m = evaluate(score_fn, samples, seen, ks=(1,), head=head)
    assert m["unmasked"]["hr@1"] == 0.5
    assert m["unmasked_head"]["hr@1"] == 1.0 and m["unmasked_tail"]["hr@1"] == 0.0
    assert m["masked_head"]["hr@1"] == 1.0
