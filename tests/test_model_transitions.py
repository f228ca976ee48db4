"""The transition channel (model.transitions) on tiny known cases: counts, shares, the mix, tuning,
and the follower rows built offline agreeing with the rows the store keeps, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import transitions as tr
from model.data import Interactions, Vocab, leave_one_out


def test_recent_items_are_the_last_items_most_recent_first() -> None:
    inputs = np.array([[4, 5, 6, 0], [7, 0, 0, 0], [0, 0, 0, 0]])
    out = tr.recent_items(inputs, np.array([3, 1, 0]), width=3)
    assert out.tolist() == [[6, 5, 4], [7, 0, 0], [0, 0, 0]]


def test_lag_weights_are_one_over_k_in_integers() -> None:
    assert tr.lag_weights(5).tolist() == [60, 30, 20, 15, 12]
    assert tr.lag_weights(1).tolist() == [1]


def weighted(rows: dict[int, tr.Row], n_ids: int, order: int = 5) -> torch.Tensor:
    """The follower rows as a dense matrix: row a, column b = Σ over lags of w(lag) · count."""
    w = tr.lag_weights(order)
    out = np.zeros((n_ids, n_ids))
    for a, (nxt, lags, counts) in rows.items():
        np.add.at(out[a], nxt, w[lags - 1] * counts)
    return torch.from_numpy(out)


def test_follower_rows_weigh_each_predecessor_by_its_lag() -> None:
    # memories 1 → 2, (1 2) → 3, (3) → 2: row a, column b = Σ w(lag)
    items = np.array([2, 3, 2])
    recent = np.array([[1, 0, 0, 0, 0], [2, 1, 0, 0, 0], [3, 0, 0, 0, 0]])
    rows = tr.follower_rows(items, recent)
    assert rows[1][0].tolist() == [2, 3] and rows[1][1].tolist() == [1, 2] and rows[1][2].tolist() == [1, 1]
    f = weighted(rows, n_ids=5)
    assert f[1, 2] == 60 and f[2, 3] == 60 and f[1, 3] == 30 and f[3, 2] == 60
    assert float(f.sum()) == 210


def test_shares_weigh_the_querys_recent_items() -> None:
    items = np.array([4, 2])
    recent = np.array([[3, 0, 0, 0, 0], [1, 0, 0, 0, 0]])  # 3 → 4 and 1 → 2, each at lag 1
    table = tr.follower_rows(items, recent)
    query = np.array([[3, 1, 0, 0, 0], [5, 0, 0, 0, 0], [0, 0, 0, 0, 0]])  # last item 3, then 1
    empty = (np.zeros(0, np.int64),) * 3
    rows = {a: table.get(a, empty) for a in (1, 3, 5)}  # 5 has no row: the store answers an empty one
    shares = tr.shares_from_rows(query, rows, 6).dense(6)
    assert shares[0, 4] == 60 * 60 and shares[0, 2] == 30 * 60  # item 1 is the second most recent
    assert float(shares[1:].abs().sum()) == 0.0  # 5 was never followed; an empty history reads nothing


def test_offline_follower_rows_equal_the_store_rows_and_give_the_same_shares() -> None:
    rng = np.random.default_rng(0)
    n_ids, order = 30, 5
    items = rng.integers(1, n_ids, 400)
    recent = rng.integers(0, n_ids, (400, order))
    table = tr.follower_rows(items, recent, order)
    query = rng.integers(0, n_ids, (7, order))
    # the rows the store would return: per item, its followers and their counts per lag
    counts = np.zeros((n_ids, n_ids, order), np.int64)
    for b, rec in zip(items, recent, strict=True):
        for k, a in enumerate(rec):
            if a:
                counts[a, b, k] += 1
    rows = {}  # per item: one entry per (next item, lag), as the store gives them
    for a in np.unique(query[query > 0]).tolist():
        nxt, lag = np.nonzero(counts[a])
        rows[a] = (nxt, lag + 1, counts[a][nxt, lag])
    for a, (nxt, lags, cnt) in rows.items():  # the same entries, in the same order
        got = table[a]
        assert got[0].tolist() == nxt.tolist() and got[1].tolist() == lags.tolist()
        assert got[2].tolist() == cnt.tolist()
    from_rows = tr.shares_from_rows(query, rows, n_ids, order)
    offline = tr.shares_from_rows(query, {a: table[a] for a in rows}, n_ids, order)
    assert torch.equal(from_rows.items, offline.items) and torch.equal(from_rows.values, offline.values)
    assert float(from_rows.values.sum()) > 0
    # the same as counting here, densely
    dense = np.zeros((len(query), n_ids))
    w = tr.lag_weights(order)
    for i, q in enumerate(query):
        for j, a in enumerate(q):
            if a:
                dense[i] += w[j] * (counts[a] @ w)
    np.testing.assert_array_equal(from_rows.dense(n_ids).numpy(), dense)


def test_mix_is_the_log_of_the_mixed_distribution() -> None:
    scores = torch.tensor([[-torch.inf, 2.0, 1.0, 0.0], [-torch.inf, 0.0, 1.0, 2.0]])
    # row 0: all of the share on item 3; row 1: none (padding only)
    shares = tr.Shares(torch.tensor([[3], [0]]), torch.tensor([[3.0], [0.0]], dtype=torch.float64))
    off = tr.mix(scores, shares, tr.TransitionMix(0.0))
    assert off is scores
    out = tr.mix(scores, shares, tr.TransitionMix(0.5))
    p = torch.softmax(scores, dim=1)
    expected = torch.log(0.5 * p[0] + 0.5 * torch.tensor([0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[1], torch.log(0.5 * p[1]))
    assert torch.exp(out).sum(1).tolist() == pytest.approx([1.0, 0.5])  # a row without shares: (1 − λ)p
    assert out[1].argsort().tolist() == scores[1].argsort().tolist()  # ... in the model's order
    assert out[0, 0] == -torch.inf  # padding stays out


def test_mix_rejects_weights_outside_the_unit_interval() -> None:
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="transition weight"):
            tr.TransitionMix(bad)
    with pytest.raises(ValueError, match="transition order"):
        tr.TransitionMix(0.5, order=6)


def _batches(n: int, informative: bool, seed: int) -> list[tr.Batch]:
    """Model scores that rank the target 10th; shares that point at the target (or at random items)."""
    rng = np.random.default_rng(seed)
    n_ids = 50
    targets = torch.from_numpy(rng.integers(1, n_ids, n))
    scores = torch.from_numpy(rng.standard_normal((n, n_ids)).astype(np.float32))
    scores[:, 0] = -torch.inf
    dense = np.zeros((n, n_ids))
    hot = targets.numpy() if informative else rng.integers(1, n_ids, n)
    dense[np.arange(n), hot] = 5.0
    dense[:, 1:] += rng.integers(0, 2, (n, n_ids - 1))
    rows, cols = np.nonzero(dense)
    shares = tr._pack(rows, cols, dense[rows, cols][:, None], n).combined()  # one position
    return [(scores, dict.fromkeys(tr.ORDERS, shares), targets)]


def test_tune_keeps_a_channel_that_wins_and_refuses_one_that_does_not() -> None:
    won = tr.tune(_batches(400, informative=True, seed=1))
    assert won.best.on and won.z >= 2.0 and won.candidate == won.best
    assert won.table[0]["weight"] == 0.0 and len(won.table) == 1 + len(tr.WEIGHTS) * len(tr.ORDERS)
    lost = tr.tune(_batches(400, informative=False, seed=2))
    assert not lost.best.on


def test_tune_chooses_the_order_whose_shares_point_at_the_targets() -> None:
    [(scores, _, targets)] = _batches(400, informative=True, seed=3)
    [(_, noise, _)] = _batches(400, informative=False, seed=4)
    informative = _batches(400, informative=True, seed=3)[0][1][1]
    for good in (2, 4):  # the shares at one order point at the targets, at every other order at noise
        shares = {o: informative if o == good else noise[o] for o in tr.ORDERS}
        result = tr.tune([(scores, shares, targets)])
        assert result.best.on and result.best.order == good
        by_order = {r["order"]: r["ndcg@10"] for r in result.table[1:] if r["weight"] == result.best.weight}
        assert by_order[good] > max(v for o, v in by_order.items() if o != good)
    only = tr.tune([(scores, {5: informative}, targets)], orders=(5,))  # one order: λ alone is tuned
    assert only.best.order == 5 and len(only.table) == 1 + len(tr.WEIGHTS)


def test_follower_rows_of_the_split_count_every_transition_but_the_evaluation_targets() -> None:
    seqs = [np.array([1, 2, 3, 4, 5]), np.array([2, 3, 6, 1]), np.array([4, 1, 2])]
    users = [f"u{i}" for i in range(len(seqs))]
    data = Interactions("toy", Vocab(users, [f"i{i}" for i in range(1, 7)]), seqs)
    split = leave_one_out(data, max_len=50)
    n_ids = 7
    for pairs, drop in (([split.train], 2), ([split.train, split.valid], 1)):
        items = np.concatenate([p.targets for p in pairs])
        recent = np.concatenate([tr.recent_items(p.inputs, p.lengths) for p in pairs])
        got = weighted(tr.follower_rows(items, recent), n_ids)
        want = torch.zeros(n_ids, n_ids, dtype=torch.float64)  # counted here from the sequences
        w = tr.lag_weights(5)
        for s in seqs:
            s = s[: len(s) - drop]
            for j in range(len(s)):
                for k in range(1, min(5, j) + 1):
                    want[s[j - k], s[j]] += float(w[k - 1])
        assert torch.equal(got, want), drop


def test_a_winner_that_is_not_significant_gives_way_to_the_best_that_is() -> None:
    table = [
        {"ndcg@10": 0.050, "hr@10": 0.10},  # off
        {"ndcg@10": 0.060, "hr@10": 0.11},  # significant
        {"ndcg@10": 0.062, "hr@10": 0.12},  # the validation winner, but noisy
        {"ndcg@10": 0.070, "hr@10": 0.09},  # best NDCG, but below off's HR@10: the guard drops it
    ]
    assert tr.choose(table, [0.0, 2.5, 0.8, 9.0], "ndcg@10", "hr@10", 2.0) == (1, 2)
    assert tr.choose(table, [0.0, 1.9, 0.8, 9.0], "ndcg@10", "hr@10", 2.0) == (0, 2)  # none significant
    assert tr.choose(table, [0.0, 2.5, 3.0, 9.0], "ndcg@10", None, 2.0) == (3, 3)  # no guard
    worse = [{"ndcg@10": 0.05, "hr@10": 0.1}, {"ndcg@10": 0.04, "hr@10": 0.1}]
    assert tr.choose(worse, [0.0, -3.0], "ndcg@10", "hr@10", 2.0) == (0, 0)
