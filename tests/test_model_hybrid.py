"""The learned hybrid (model.hybrid): the position shares it reads, its sparse scores against the dense
features it is fitted on, the fit, the cross-fitted choice against the channel, and its config."""

from __future__ import annotations

import math

import numpy as np
import torch

from model import hybrid as hy
from model import transitions as tr
from model.inference import InferenceConfig

RNG_ITEMS = 40


def _bank(seed: int, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Memories (next items (n,), prefixes' last items (n, 5)) that mostly go i → i + 1."""
    rng = np.random.default_rng(seed)
    first = rng.integers(1, RNG_ITEMS - 6, n)
    recent = np.stack([first + 4 - k for k in range(tr.MAX_ORDER)], axis=1)  # most recent first
    nxt = np.where(rng.random(n) < 0.8, recent[:, 0] + 1, rng.integers(1, RNG_ITEMS, n))
    recent[rng.random((n, tr.MAX_ORDER)) < 0.1] = 0
    return nxt, recent


def _rows(nxt: np.ndarray, recent: np.ndarray, query: np.ndarray) -> dict[int, tr.Row]:
    table = tr.follower_rows(nxt, recent)
    empty = (np.zeros(0, np.int64),) * 3
    return {a: table.get(a, empty) for a in np.unique(query[query > 0]).tolist()}


def test_position_shares_split_the_channels_shares_by_query_position() -> None:
    nxt, recent = _bank(0)
    query = np.array([[7, 6, 5, 4, 3], [12, 30, 0, 0, 0], [0, 0, 0, 0, 0]])
    rows = _rows(nxt, recent, query)
    for order in tr.ORDERS:
        by_position = tr.position_shares(query, rows, RNG_ITEMS, order)
        assert by_position.values.shape[2] == order
        combined = by_position.combined().dense(RNG_ITEMS)
        np.testing.assert_array_equal(
            combined.numpy(), tr.shares_from_rows(query, rows, RNG_ITEMS, order).dense(RNG_ITEMS).numpy()
        )
    # position j alone: the query with only its j-th item, every lag counted by w(k)
    full = tr.position_shares(query, rows, RNG_ITEMS)
    dense = torch.zeros(3, RNG_ITEMS, tr.MAX_ORDER, dtype=torch.float64)
    dense.scatter_add_(1, full.items[..., None].expand(-1, -1, tr.MAX_ORDER), full.values)
    for j in range(tr.MAX_ORDER):
        alone = np.zeros_like(query)
        alone[:, 0] = query[:, j]
        one = tr.position_shares(alone, rows, RNG_ITEMS).combined().dense(RNG_ITEMS)
        np.testing.assert_array_equal((dense[..., j] * tr.lag_weights(tr.MAX_ORDER)[0]).numpy(), one.numpy())
    assert float(dense[2].abs().sum()) == 0.0  # an empty history reads nothing


def _hybrid(seed: int) -> hy.Hybrid:
    rng = np.random.default_rng(seed)
    f, q = len(hy.FEATURES), len(hy.QUERY_FEATURES)
    mean = rng.normal(size=q)
    return hy.Hybrid(
        tuple(rng.normal(size=f).tolist()),
        tuple(tuple(r) for r in rng.normal(scale=0.3, size=(q, f)).tolist()),
        tuple(mean.tolist()),
        tuple((1 + rng.random(q)).tolist()),
        tuple((mean - 4).tolist()),
        tuple((mean + 4).tolist()),
    )


def _query_batch(seed: int, b: int = 6) -> tuple[torch.Tensor, tr.PositionShares, torch.Tensor]:
    nxt, recent = _bank(seed)
    rng = np.random.default_rng(seed + 100)
    windows = [rng.integers(1, RNG_ITEMS, rng.integers(1, 12)) for _ in range(b)]
    window = tr.last_items(windows, 12)
    rows = _rows(nxt, recent, window[:, : tr.MAX_ORDER])
    shares = tr.position_shares(window[:, : tr.MAX_ORDER], rows, RNG_ITEMS)
    scores = torch.from_numpy(rng.normal(size=(b, RNG_ITEMS)).astype(np.float32))
    scores[:, 0] = -math.inf
    return scores, shares, torch.from_numpy(window)


def test_the_sparse_scores_equal_the_dense_features_weighed_by_the_querys_coefficients() -> None:
    h = _hybrid(1)
    scores, shares, window = _query_batch(2)
    with_share = shares.items[0][shares.values[0].sum(-1) > 0]
    new, unknown = int(with_share[0]), int(with_share[1])
    scores[0, new] = -math.inf  # items without an embedding: one with transitions, one without
    has = torch.zeros(scores.shape, dtype=torch.bool).scatter_(1, shares.items, shares.values.sum(-1) > 0)
    has[0, unknown] = False
    shares.values[0, shares.items[0] == unknown] = 0.0
    scores[0, unknown] = -math.inf
    got = hy.score(h, scores, shares, window)
    x, query = hy.dense_features(scores, shares, window)
    want = (x * h.coefficients(query)[:, None, :]).sum(-1)
    scorable = (torch.isfinite(scores) | has) & (torch.arange(scores.shape[1]) > 0)
    torch.testing.assert_close(got[scorable], want[scorable], rtol=1e-5, atol=1e-4)
    assert torch.isneginf(got[~scorable]).all()  # padding, and no embedding without transitions
    assert torch.isfinite(got[0, new]) and torch.isneginf(got[0, unknown])
    # the model's term of an item it cannot score is the row's lowest: its transitions lift it
    assert x[0, new, 0] == x[0, torch.isfinite(scores[0]), 0].min()
    # the features say what they claim: the window's items are seen, its first one the last item
    assert x[0, window[0, 0], -1] == 1 and x[0, window[0, 0], -2] == 1
    assert float(x[:, 0, 1:].abs().sum()) == 0.0


def test_a_hybrid_that_only_trusts_the_model_keeps_the_models_order() -> None:
    f, q = len(hy.FEATURES), len(hy.QUERY_FEATURES)
    model_only = hy.Hybrid(
        (1.0,) + (0.0,) * (f - 1), ((0.0,) * f,) * q, (0.0,) * q, (1.0,) * q, (-1.0,) * q, (1.0,) * q
    )
    scores, shares, window = _query_batch(3)
    got = hy.score(model_only, scores, shares, window)
    finite = torch.isfinite(scores)
    torch.testing.assert_close(got[finite], torch.log_softmax(scores, -1)[finite])


def _planted(n: int, seed: int, informative: bool) -> list[hy.Batch]:
    """Queries whose target is the last item's usual follower (informative) or a random unseen item,
    never an item of the window; the model's scores are noise with a small pull to the target."""
    nxt, recent = _bank(seed, 2000)
    rng = np.random.default_rng(seed)
    windows = [rng.integers(1, RNG_ITEMS - 2, rng.integers(2, 8)) for _ in range(n)]
    window = tr.last_items(windows, 8)
    rows = _rows(nxt, recent, window[:, : tr.MAX_ORDER])
    shares = tr.position_shares(window[:, : tr.MAX_ORDER], rows, RNG_ITEMS)
    targets = window[:, 0] + 1 if informative else rng.integers(1, RNG_ITEMS, n)
    scores = rng.normal(size=(n, RNG_ITEMS)).astype(np.float32)
    scores[np.arange(n), targets] += 0.5
    scores[np.arange(n), window[:, 1]] += 2.0  # the model likes an item the user has already seen
    s = torch.from_numpy(scores)
    s[:, 0] = -math.inf
    return [(s, shares, torch.from_numpy(window), torch.from_numpy(targets))]


def test_the_fit_learns_to_trust_the_followers_and_to_push_seen_items_down() -> None:
    batches = _planted(800, 4, informative=True)
    h = hy.fit(hy.candidates(batches))
    assert dict(zip(hy.FEATURES, h.weights, strict=True))["channel"] > 0
    scores, shares, window, targets = batches[0]
    fitted = hy.score(h, scores, shares, window)

    def hits(s: torch.Tensor, items: torch.Tensor) -> float:
        return float((tr.target_ranks(s, items) < 10).float().mean())

    assert hits(fitted, targets) > hits(scores, targets) + 0.3
    # the seen item the model favours leaves the top 10 far more often
    assert hits(fitted, window[:, 1]) < hits(scores, window[:, 1]) - 0.3


def test_a_query_outside_the_fitted_range_reads_the_coefficients_of_the_ranges_edge() -> None:
    h = _hybrid(8)
    low, high = torch.tensor(h.query_low), torch.tensor(h.query_high)
    inside = (low + high)[None] / 2
    w, gates = torch.tensor(h.weights), torch.tensor(h.gates)
    mean, std = torch.tensor(h.query_mean), torch.tensor(h.query_std)
    torch.testing.assert_close(h.coefficients(inside), w + ((inside - mean) / std) @ gates)
    # a history far shorter, a last item with far more followers: the gates stop at the edges
    far = torch.stack([low - 50, high + 50, torch.stack([low[0] - 1, high[1] + 1, inside[0, 2]])])
    edge = torch.stack([low, high, torch.stack([low[0], high[1], inside[0, 2]])])
    torch.testing.assert_close(h.coefficients(far), h.coefficients(edge))
    assert not torch.allclose(h.coefficients(low[None]), h.coefficients(high[None]))


def test_the_fit_records_the_range_of_query_features_it_was_fitted_on() -> None:
    cands = hy.candidates(_planted(400, 6, informative=True))
    h = hy.fit(cands)
    fitted_on = cands.query[cands.target.any(1)]
    assert h.query_low == tuple(fitted_on.amin(0).tolist())
    assert h.query_high == tuple(fitted_on.amax(0).tolist())
    # a hybrid saved before the range was recorded reads its gates as it did: unclipped
    old = {k: v for k, v in h.to_json().items() if k not in ("query_low", "query_high")}
    unclipped = hy.Hybrid.from_json(old)
    far = torch.tensor([h.query_high]) + 10
    assert hy.Hybrid.from_json(h.to_json()) == h
    assert not torch.allclose(unclipped.coefficients(far), h.coefficients(far))
    torch.testing.assert_close(unclipped.coefficients(fitted_on), h.coefficients(fitted_on))  # inside: one


def test_tune_keeps_a_hybrid_that_beats_the_channel_out_of_sample_and_refuses_one_that_does_not() -> None:
    won_batches = _planted(800, 5, informative=True)
    scores, _, _, targets = won_batches[0]
    won = hy.tune(lambda: won_batches, tr.target_ranks(scores, targets).numpy())
    assert won.best is not None and won.z >= 2.0 and won.best == won.fitted
    assert [r["source"] for r in won.table] == ["channel", *hy.FORMS.values()]
    assert won.table[1]["ndcg@10"] > won.table[0]["ndcg@10"]
    # against a channel that ranks every target first, no hybrid wins
    lost = hy.tune(lambda: won_batches, np.zeros(len(targets), np.int64))
    assert lost.best is None and lost.fitted is not None


def _regimes(n: int, seed: int, told_apart: bool = True) -> list[hy.Batch]:
    """Two kinds of query: in one the target is the last item's usual follower and the model is nearly
    blind; in the other the target is one the model is sure of, and the follower is a decoy. No single
    weighting serves both. ``told_apart``: the first kind has short histories, the second long ones, so
    a gate on the length (or on the model's entropy) can tell them apart; else the kinds are drawn at
    random, with one length and the model's pull alike: the query features say next to nothing of the
    kind (on this seed the gates' cross-fitted gain is 1.2 standard errors; 12 when told apart)."""
    nxt, recent = _bank(seed, 2000)
    rng = np.random.default_rng(seed)
    short = np.arange(n) % 2 == 0 if told_apart else rng.random(n) < 0.5
    lengths = np.where(short, 2, 7) if told_apart else np.full(n, 7)
    windows = [rng.integers(1, RNG_ITEMS - 2, length) for length in lengths]
    window = tr.last_items(windows, 8)
    rows = _rows(nxt, recent, window[:, : tr.MAX_ORDER])
    shares = tr.position_shares(window[:, : tr.MAX_ORDER], rows, RNG_ITEMS)
    targets = np.where(short, window[:, 0] + 1, rng.integers(1, RNG_ITEMS, n))
    scores = rng.normal(size=(n, RNG_ITEMS)).astype(np.float32)
    scores[np.arange(n), targets] += np.where(short, 0.3, 2.5) if told_apart else 1.0
    s = torch.from_numpy(scores)
    s[:, 0] = -math.inf
    return [(s, shares, torch.from_numpy(window), torch.from_numpy(targets))]


def test_gates_are_kept_only_when_they_beat_the_same_hybrid_without_them_out_of_sample() -> None:
    batches = _regimes(1200, 9)
    scores, _, _, targets = batches[0]
    tuned = hy.tune(lambda: batches, tr.target_ranks(scores, targets).numpy())
    _, flat, gated = tuned.table
    assert tuned.gated and tuned.z_gates >= 2.0 and gated["ndcg@10"] > flat["ndcg@10"] + 0.05
    assert tuned.best is not None and tuned.best == tuned.fitted
    length = hy.QUERY_FEATURES.index("length")
    # the model's weight grows with the length, the channel's shrinks
    gates = dict(zip(hy.FEATURES, zip(*tuned.best.gates, strict=True), strict=True))
    assert gates["model"][length] > 0 and gates["channel"][length] < gates["model"][length]
    # the same two kinds, nothing of the query telling them apart: the gates do not earn their place
    blind = _regimes(1200, 9, told_apart=False)
    scores, _, _, targets = blind[0]
    refused = hy.tune(lambda: blind, tr.target_ranks(scores, targets).numpy())
    assert not refused.gated and refused.z_gates < 2.0 and refused.fitted is not None
    assert not refused.fitted.gated and all(g == 0.0 for row in refused.fitted.gates for g in row)
    # without gates the sparse scores skip the query features and still equal the dense ones
    x, query = hy.dense_features(scores, blind[0][1], blind[0][2])
    want = (x * torch.tensor(refused.fitted.weights)).sum(-1)
    got = hy.score(refused.fitted, scores, blind[0][1], blind[0][2])
    finite = torch.isfinite(got)
    assert finite[:, 1:].all()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-4)


def test_the_hybrid_is_saved_in_the_inference_config() -> None:
    cfg = InferenceConfig(transitions=tr.TransitionMix(0.0, 2), hybrid=_hybrid(7))
    back = InferenceConfig.from_json(cfg.to_json())
    assert back == cfg and back.reads_transitions and back.transition_order == tr.MAX_ORDER
    plain = InferenceConfig.from_json(InferenceConfig(transitions=tr.TransitionMix(0.5, 2)).to_json())
    assert plain.hybrid is None and plain.transition_order == 2
    assert not InferenceConfig().reads_transitions
