"""The memory vote (model.vote) on tiny known cases: the voters' distribution, its mix with the model's,
and the choice on validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.vote import Vote, VoteGrid, distribution, mix, paired_z, tune


def test_distribution_is_a_similarity_softmax_summed_per_item() -> None:
    items = torch.tensor([[3, 3, 5, 0], [0, 0, 0, 0]])  # 0 = empty slot
    sims = torch.tensor([[0.9, 0.8, 0.7, 0.99], [0.5, 0.5, 0.5, 0.5]])
    p = distribution(items, sims, temperature=0.1, n_ids=6)
    w = np.exp(np.array([9.0, 8.0, 7.0]))
    w /= w.sum()  # the empty slot's 0.99 takes no share
    np.testing.assert_allclose(p[0].numpy(), [0, 0, 0, w[0] + w[1], 0, w[2]], rtol=1e-6)
    assert p[1].sum() == 0  # no voter at all: no vote, no NaN


def test_mix_is_the_log_of_the_mixed_distribution() -> None:
    logits = torch.tensor([[-math.inf, 2.0, 1.0, 0.0, -1.0]])
    items, sims = torch.tensor([[3, 3, 0]]), torch.tensor([[0.5, 0.5, 0.0]])
    vote = Vote(weight=0.5, temperature=0.1, depth=3)
    scores = mix(logits, items, sims, vote)
    p = torch.softmax(logits, dim=-1)
    want = torch.log(0.5 * p + 0.5 * torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(scores, want)
    assert scores[0, 0] == -math.inf  # padding stays out
    assert torch.logsumexp(scores, dim=-1).item() == pytest.approx(0.0, abs=1e-6)
    # the voted item jumps from third to first; the others keep the model's order
    assert scores[0].argsort(descending=True)[:4].tolist() == [3, 1, 2, 4]


def test_only_the_nearest_depth_vote_and_off_leaves_the_logits() -> None:
    logits = torch.tensor([[-math.inf, 1.0, 0.0, 0.0]])
    items, sims = torch.tensor([[2, 3]]), torch.tensor([[0.9, 0.8]])
    scores = mix(logits, items, sims, Vote(weight=0.5, temperature=1.0, depth=1))
    assert scores[0, 2] > scores[0, 1] > scores[0, 3]  # only item 2 voted
    assert mix(logits, items, sims, Vote()) is logits  # weight 0: untouched


@pytest.mark.parametrize("kwargs", [{"weight": 1.0}, {"weight": -0.1}, {"temperature": 0.0}, {"depth": -1}])
def test_bad_vote_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Vote(**{"weight": 0.1, "temperature": 0.1, "depth": 5, **kwargs})  # type: ignore[arg-type]


def _batch(targets: list[int], voted: list[int]) -> tuple[torch.Tensor, ...]:
    """Logits that put item 1 first for every row; each row's two voters both name ``voted``."""
    n = len(targets)
    logits = torch.zeros(n, 6)
    logits[:, 0] = -math.inf
    logits[:, 1] = 3.0
    items = torch.tensor([[v, v] for v in voted])
    return logits, items, torch.full((n, 2), 0.9), torch.tensor(targets)


def test_tune_turns_the_vote_on_where_the_neighbours_are_right() -> None:
    grid = VoteGrid(weights=(0.1, 0.5), temperatures=(0.1,), depths=(1, 2))
    result = tune([_batch([4, 5, 4], voted=[4, 5, 4])], grid, metric="ndcg@10", ks=(1, 10))
    assert result.best.on and result.best.weight == 0.5  # λ = 0.5 lifts the voted item above item 1
    assert len(result.table) == 1 + 4
    off = result.table[0]
    assert off["weight"] == 0.0 and off["hr@1"] == 0.0
    assert max(row["hr@1"] for row in result.table) == 1.0


def test_tune_keeps_the_vote_off_where_the_neighbours_are_wrong() -> None:
    grid = VoteGrid(weights=(0.1, 0.5), temperatures=(0.1,), depths=(2,))
    result = tune([_batch([1, 1], voted=[4, 5])], grid, metric="ndcg@10", ks=(1, 10))
    assert not result.best.on  # the model's first item is the answer: no vote ranks it better
    assert result.table[0]["ndcg@1"] == 1.0


def test_tune_refuses_a_vote_that_buys_ndcg_with_hit_rate() -> None:
    # Row 0: the voters name its target, which the vote lifts from 2nd to 1st (NDCG@10 up). Row 1: its
    # target is the model's 10th item; any vote pushes the voted item above it, out of the top 10.
    logits = torch.tensor(
        [[-math.inf, 3.0, 2.0, *[0.0] * 10], [-math.inf, *[5.0 - 0.1 * j for j in range(12)]]]
    )
    items = torch.tensor([[2, 2], [12, 12]])
    batch = (logits, items, torch.full((2, 2), 0.9), torch.tensor([2, 10]))
    grid = VoteGrid(weights=(0.5,), temperatures=(0.1,), depths=(2,))
    unguarded = tune([batch], grid, metric="ndcg@10", guard=None, ks=(10,), min_z=0.0)
    assert unguarded.best.on  # NDCG@10 alone: 0.500 against 0.460
    guarded = tune([batch], grid, metric="ndcg@10", guard="hr@10", ks=(10,))
    assert not guarded.best.on and guarded.table[1]["hr@10"] < guarded.table[0]["hr@10"]


def test_paired_z_is_the_mean_gain_over_its_standard_error() -> None:
    base = np.array([0, 5, 20, 1])  # ranks; NDCG@10 per sample: 1, 1/log2(7), 0, 1/log2(3)
    assert paired_z(base, base, "ndcg@10") == 0.0
    assert paired_z(np.array([0, 5, 0, 1]), base, "hr@10") == pytest.approx(1.0)  # d 0, 0, 1, 0: 0.25 / 0.25
    assert paired_z(np.array([3, 3]), np.array([20, 30]), "hr@10") == math.inf  # the same gain everywhere
    better = np.array([0, 0, 0, 0])
    d = np.array([0.0, 1 - 1 / math.log2(7), 1.0, 1 - 1 / math.log2(3)])
    assert paired_z(better, base, "ndcg@10") == pytest.approx(d.mean() / (d.std(ddof=1) / 2))
    assert paired_z(base, better, "ndcg@10") == pytest.approx(-d.mean() / (d.std(ddof=1) / 2))


def test_tune_keeps_the_vote_off_when_its_gain_is_within_noise() -> None:
    # Four samples: the vote lifts two targets to the top and drops one out of the top 10 — a gain on
    # average, but not by two standard errors of the per-sample differences.
    n_items = 14
    logits = torch.tensor([[-math.inf, *[5.0 - 0.1 * j for j in range(n_items)]]] * 4)
    items = torch.tensor([[3, 3], [3, 3], [12, 12], [4, 4]])
    batch = (logits, items, torch.full((4, 2), 0.9), torch.tensor([3, 3, 10, 1]))
    grid = VoteGrid(weights=(0.5,), temperatures=(0.1,), depths=(2,))
    loose = tune([batch], grid, metric="ndcg@10", guard=None, ks=(10,), min_z=0.0)
    assert loose.best.on and 0.0 < loose.z < 2.0
    strict = tune([batch], grid, metric="ndcg@10", guard=None, ks=(10,))
    assert not strict.best.on and strict.z == loose.z and strict.table == loose.table
    # Both name the candidate the z belongs to, so a refused vote is visible in the model's record.
    assert strict.candidate == loose.candidate == loose.best
