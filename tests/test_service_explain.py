"""``explain``: each recommended item's sources (model, memory vote, transition channel) recombine to its
score and to the ranking, its memories are among the answer's and lead to it, the items it follows are
the user's recent ones; without ``explain`` the answer carries none of it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_service_support import (  # noqa: F401
    model_dir,
    running_app,
    toy_root,
    with_transitions,
    with_vote,
)

HISTORY = ["i3", "i4", "i5", "i6"]


@pytest.fixture(scope="module")
def vote_transitions_dir(model_dir: Path, toy_root: Path) -> Path:  # noqa: F811
    return with_transitions(with_vote(model_dir, toy_root / "explain-vote", 16), toy_root / "explain-both")


async def test_sources_recombine_to_each_score_and_the_ranking(
    vote_transitions_dir: Path, tmp_path: Path
) -> None:
    async with running_app(model_dir=vote_transitions_dir, store_dir=tmp_path / "s") as (_, client):
        req = {"user_id": "explained", "history": HISTORY, "n": 10, "explain": True}
        body = (await client.post("/recommend", json=req)).json()
    items = body["items"]
    assert len(items) == 10 and body["strategy"] == "retrieval"
    memory_items = {m["memory_id"]: m["item_id"] for m in body["memories"]}
    totals = []
    for it in items:
        why = it["why"]
        total = why["model"] + why["vote"] + why["transitions"]
        assert math.exp(it["score"]) == pytest.approx(total, rel=1e-4)  # log-probabilities
        totals.append(total)
        assert why["encoder_rank"] >= 1
        for m in why["memories"]:  # the fused memories that led to this very item
            assert memory_items[m] == it["item_id"]
        if why["follows"]:  # shares of the item's transition mass, from the user's recent items
            assert {f["item_id"] for f in why["follows"]} <= set(HISTORY)
            assert sum(f["weight"] for f in why["follows"]) == pytest.approx(1.0)
            assert why["transitions"] > 0
        else:
            assert why["transitions"] == 0.0
    assert totals == sorted(totals, reverse=True)  # the sources rank the items as the scores do
    assert any(it["why"]["vote"] > 0 for it in items) and any(it["why"]["follows"] for it in items)


async def test_with_both_channels_off_the_model_is_the_softmax_probability(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s") as (_, client):
        req = {"user_id": "plain", "history": HISTORY, "n": 5, "explain": True, "exclude_seen": False}
        items = (await client.post("/recommend", json=req)).json()["items"]
    probs = [it["why"]["model"] for it in items]
    assert all(0 < p < 1 for p in probs) and probs == sorted(probs, reverse=True)
    assert all(it["why"]["vote"] == it["why"]["transitions"] == 0.0 for it in items)
    # softmax of the logits: the ratio of two items' probabilities is exp of their score difference
    ratio = probs[0] / probs[1]
    assert ratio == pytest.approx(math.exp(items[0]["score"] - items[1]["score"]), rel=1e-4)


async def test_an_answer_without_explain_carries_no_explanation(
    vote_transitions_dir: Path, tmp_path: Path
) -> None:
    async with running_app(model_dir=vote_transitions_dir, store_dir=tmp_path / "s") as (_, client):
        body = (await client.post("/recommend", json={"user_id": "u", "history": HISTORY})).json()
    assert "memories" not in body and all("why" not in it for it in body["items"])
