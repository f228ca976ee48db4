"""Items registered after training: their derived embeddings on a hand-computed case, and the predictor
reading histories that hold them, widening the catalogue, and recommending them through the transition
channel, the vote and the derived embedding. Items the model knows score exactly as without them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memory_store import SearchResult
from model import transitions as tr
from model.catalogue import derived_embeddings
from model.fusion import FusionConfig, RetrievalFusion
from model.inference import InferenceConfig
from model.predictor import Predictor
from model.sasrec import EncoderConfig, SASRec
from model.vote import Vote

N_ITEMS, D = 9, 8


def predictor(vote: float = 0.0, transitions: float = 0.0, new_item_weight: float = 1.0) -> Predictor:
    torch.manual_seed(0)
    encoder = SASRec(EncoderConfig(n_items=N_ITEMS, max_len=6, dim=D, n_heads=2, inner_dim=16))
    fusion = RetrievalFusion(FusionConfig(dim=D, n_heads=2, inner_dim=16))
    cfg = InferenceConfig(k=2, vote=Vote(vote, 0.1, 3), transitions=tr.TransitionMix(transitions))
    return Predictor(encoder, fusion, cfg, new_item_weight=new_item_weight)


def hits(items: list[int]) -> SearchResult:
    """One query's search answer naming ``items`` as the memories' next items."""
    k = len(items)
    keys = np.eye(k, D, dtype=np.float32)[None]
    return SearchResult(
        ids=np.arange(k)[None],
        scores=np.linspace(0.9, 0.5, k, dtype=np.float32)[None],
        items=np.array([items]),
        users=np.full((1, k), "other", dtype=object),
        prefix_lens=np.ones((1, k), np.int32),
        timestamps=np.zeros((1, k)),
        keys=keys,
    )


def test_a_derived_embedding_is_the_lag_weighted_mean_of_the_known_items_before_it() -> None:
    emb = torch.arange(4 * 2, dtype=torch.float32).reshape(4, 2)  # items 1..3 known
    rows = [
        (np.array([1, 2, 7]), np.array([1, 2, 1]), np.array([3, 1, 5])),  # 7 is new: not read
        (np.array([12]), np.array([1]), np.array([4])),  # only a new item before it
    ]
    out = derived_embeddings(emb, rows)
    w = tr.lag_weights(5)
    want = (3 * w[0] * emb[1] + 1 * w[1] * emb[2]) / (3 * w[0] + w[1])
    torch.testing.assert_close(out[0], want)
    assert torch.isnan(out[1]).all()


def test_a_history_with_new_items_is_encoded_from_its_known_items() -> None:
    p = predictor()
    new = N_ITEMS + 2
    plan = p.prepare([[1, new, 2, 3], [new], [1, 2, 3]])
    assert plan.warm.tolist() == [0, 2]  # only new items: answered as a cold user
    np.testing.assert_array_equal(plan.states[0], plan.states[1])  # the new item is skipped
    assert plan.recent[0, :4].tolist() == [3, 2, 1, 0]  # the channel reads the known items alone
    ranked = p.finish(plan, None, None, [np.zeros(0, np.int64)] * 3, [3] * 3)
    assert ranked[1].strategy == "popular"


def test_new_items_come_through_the_channel_the_vote_and_their_embedding() -> None:
    new = N_ITEMS + 1
    plan_of = lambda p: p.prepare([[1, 2]], ["me"])  # noqa: E731
    none = [np.zeros(0, np.int64)]
    # the transition channel: the new item follows item 2, the query's last item
    p = predictor(transitions=0.9)
    rows = {2: (np.array([new]), np.array([1]), np.array([3])), 1: (np.zeros(0, np.int64),) * 3}
    ranked = p.finish(plan_of(p), hits([3, 4]), rows, none, [1], new_items=torch.zeros(0, D))
    assert ranked[0].items.tolist() == [new]
    # the vote: the nearest memories name it
    p = predictor(vote=0.9)
    ranked = p.finish(plan_of(p), hits([new, new, 4]), None, none, [1], new_items=torch.zeros(0, D))
    assert ranked[0].items.tolist() == [new]
    # its derived embedding: a copy of the best known item's scores it just as high
    p = predictor()
    plan = plan_of(p)
    base = p.finish(plan, hits([3, 4]), None, none, [2])[0]
    best = int(base.items[0])
    emb = p.encoder.item_emb.weight[best : best + 1].detach()
    grown = p.finish(plan, hits([3, 4]), None, none, [2], new_items=emb)[0]
    assert set(grown.items.tolist()) == {best, new} and grown.scores[0] == pytest.approx(grown.scores[1])
    # the items the model knows score exactly as before
    known = p.finish(plan, hits([3, 4]), None, [np.array([new])], [2], new_items=emb)[0]
    np.testing.assert_array_equal(known.items, base.items)
    np.testing.assert_array_equal(known.scores, base.scores)


def test_the_fusion_passes_over_a_memory_of_a_new_item_to_the_next_one() -> None:
    """The fusion reads a memory's value embedding, which a new item lacks: its slot goes to the next
    memory, so a query still fuses k memories (the vote keeps counting the new item's)."""
    new = N_ITEMS + 1
    p = predictor(vote=0.9)
    plan = p.prepare([[1, 2]], ["me"])
    mem = p.memories(plan, hits([new, 3, 4]))
    assert mem.cols.tolist() == [[1, 2]] and mem.items.tolist() == [[3, 4]] and mem.present.all()
    items, _ = p.voters(plan, hits([new, 3, 4]))
    assert items.tolist() == [[new, 3, 4]]


def test_a_new_items_transition_counts_weigh_new_item_weight_times_and_known_ones_are_untouched() -> None:
    new = N_ITEMS + 1
    # after item 2 came item 3 four times and the new item twice: weighted 3, the new item's share is 6
    rows = {2: (np.array([3, new]), np.array([1, 1]), np.array([4, 2])), 1: (np.zeros(0, np.int64),) * 3}
    recent = tr.last_items([[1, 2]])
    plain, weighed = predictor(transitions=0.9), predictor(transitions=0.9, new_item_weight=3.0)
    width, unit = new + 1, 60 * 60  # the last query item and lag 1 each weigh lcm(1..5) = 60 at order 5
    np.testing.assert_array_equal(
        plain.shares(recent, rows, width).dense(width)[0, [3, new]], [4 * unit, 2 * unit]
    )
    np.testing.assert_array_equal(
        weighed.shares(recent, rows, width).dense(width)[0, [3, new]], [4 * unit, 6 * unit]
    )
    # the ranking follows: weighted, the new item overtakes item 3; unweighted it does not
    none = [np.zeros(0, np.int64)]

    def top(p: Predictor) -> list[int]:
        plan = p.prepare([[1, 2]], ["me"])
        ranked = p.finish(plan, hits([4, 5]), rows, none, [1], new_items=torch.zeros(0, D))
        out: list[int] = ranked[0].items.tolist()
        return out

    assert top(plain) == [3]
    assert top(weighed) == [new]
    # without new items in the rows the weight changes nothing, to the bit
    known = {2: (np.array([3, 4]), np.array([1, 2]), np.array([4, 2])), 1: rows[1]}
    a = plain.finish(plain.prepare([[1, 2]], ["me"]), hits([4, 5]), known, none, [5])[0]
    b = weighed.finish(weighed.prepare([[1, 2]], ["me"]), hits([4, 5]), known, none, [5])[0]
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.scores, b.scores)
