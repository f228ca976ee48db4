"""Parity: the service's ranking equals the offline evaluator's (``RetrievalModel``) for the same history
and memory bank, with an exact index, for a new user's request history and for a known user's stored
history (their test sample); and a micro-batched answer equals the answer served alone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_service_support import (  # noqa: F401
    model_dir,
    running_app,
    toy_root,
    train_toy_model,
    with_transitions,
    with_vote,
)

from memory_store import SearchResult
from model import artifact
from model.adaptive import adaptive_k
from model.artifact import ArtifactError
from model.data import leave_one_out, load_dataset
from model.finetune import FinetuneConfig, RetrievalModel, limit_depth
from model.transitions import recent_items
from service.pipeline import others_only
from service.recommender import Recommender

HISTORIES = [
    ["i3", "i4", "i5"],
    ["i10"],
    ["i39", "i0", "i1", "i2", "i17", "i18"],
    [f"i{i}" for i in range(30)],
]


def offline_ranking(model_path: Path, history: list[str], n: int) -> tuple[list[str], np.ndarray, int]:
    art = artifact.load(model_path)
    assert art.fusion is not None and art.bank is not None
    cfg = FinetuneConfig(**art.finetune_config)
    model = RetrievalModel(art.encoder, art.fusion, art.bank, cfg)
    ids = np.array([art.vocab.item_id(i) for i in history], dtype=np.int64)
    with torch.inference_mode():
        state = art.encoder.encode(torch.from_numpy(ids[None, :]), torch.tensor([len(ids)]))
        # A user the bank does not know: the leakage rule removes nothing.
        retrieved = art.bank.search(
            state.numpy(), np.array([-1]), np.array([len(ids)]), cfg.k, cfg.fetch_factor
        )
        adaptive = cfg.adaptive()
        if adaptive is not None:
            retrieved = limit_depth(retrieved, adaptive_k(art.encoder.item_emb.weight, [ids], adaptive))
        voters = None
        if cfg.vote().on:  # the nearest memories vote, more of them than the fusion reads
            voters = art.bank.search(state.numpy(), np.array([-1]), np.array([len(ids)]), cfg.vote_depth)
        recent = recent_items(
            ids[None, -art.encoder.cfg.max_len :], np.array([min(len(ids), art.encoder.cfg.max_len)])
        )
        scores = model.scores(state, retrieved, None, voters, recent)[0].clone()
        scores[torch.from_numpy(ids)] = -torch.inf  # exclude_seen
        top = torch.topk(scores, min(n, scores.numel()))
    items = [art.vocab.external_item(int(i)) for i in top.indices]
    return items, top.values.numpy(), int(retrieved.mask.sum())


def assert_same_ranking(
    got: list[dict[str, Any]], want_items: list[str], want_scores: np.ndarray, n: int
) -> None:
    """The service's top ``n`` is the offline top ``n``: the same scores rank by rank, and at each rank
    the same item or one whose offline score ties it. The frozen graphs and eager torch differ in the
    last float bits, which may swap two near-equal items and nothing else. ``want_*`` go deeper than
    ``n``, so that an item tied with the n-th may come in."""
    tol = 1e-4
    got_items, got_scores = [it["item_id"] for it in got], [it["score"] for it in got]
    assert len(got_items) == len(set(got_items)) == n
    np.testing.assert_allclose(got_scores, want_scores[:n], rtol=tol, atol=tol)
    offline = dict(zip(want_items, want_scores.tolist(), strict=True))
    for rank, item in enumerate(got_items):
        tie = item in offline and abs(offline[item] - want_scores[rank]) <= tol * (1 + abs(want_scores[rank]))
        assert item == want_items[rank] or tie, (rank, got_items, want_items[:n])


@pytest.fixture(scope="session")
def adaptive_model_dir(toy_root: Path) -> Path:  # noqa: F811
    return train_toy_model(toy_root, "adaptive", "--adaptive-k", "--k", "8")


# Every memory of the toy bank (about 1,400) votes. The toy data's repeated prefixes give memories of
# equal similarity, which the store and the offline index may order differently; a cut among the
# voters could then fall across such a tie and take different memories on each side.
ALL_VOTE = 4096


@pytest.fixture(scope="session")
def all_vote_model_dir(model_dir: Path, toy_root: Path) -> Path:  # noqa: F811
    return with_vote(model_dir, toy_root / "all-vote", ALL_VOTE)


@pytest.mark.parametrize("which", ["fixed-k", "adaptive-k", "vote", "transitions", "vote-transitions"])
async def test_service_ranking_equals_offline(
    which: str,
    model_dir: Path,  # noqa: F811
    adaptive_model_dir: Path,
    all_vote_model_dir: Path,
    toy_root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    path = {
        "fixed-k": lambda: model_dir,
        "adaptive-k": lambda: adaptive_model_dir,
        "vote": lambda: all_vote_model_dir,
        "transitions": lambda: with_transitions(model_dir, toy_root / "transitions"),
        "vote-transitions": lambda: with_transitions(all_vote_model_dir, toy_root / "vote-transitions", 0.7),
    }[which]()
    async with running_app(model_dir=path, store_dir=tmp_path / "s", exact_threshold=1_000_000) as (
        _,
        client,
    ):
        for k, history in enumerate(HISTORIES):
            want_items, want_scores, want_k = offline_ranking(path, history, 15)
            req = {"user_id": f"parity-{k}", "history": history, "n": 10}
            body = (await client.post("/recommend", json=req)).json()
            assert_same_ranking(body["items"], want_items, want_scores, 10)
            assert body["k_used"] == want_k


def offline_test_rankings(model_path: Path, data: Path, n: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """Each user's test-sample top n as the offline evaluator ranks it, seen items masked."""
    art = artifact.load(model_path)
    assert art.fusion is not None and art.bank is not None
    split = leave_one_out(load_dataset(str(data)).with_vocab(art.vocab), art.encoder.cfg.max_len)
    model = RetrievalModel(art.encoder, art.fusion, art.bank, FinetuneConfig(**art.finetune_config))
    queries = model.queries(split.test)
    indptr, seen = split.test_seen
    out = {}
    with torch.inference_mode():
        scores = model.scores(
            torch.from_numpy(queries.states), queries.retrieved, None, queries.voters, queries.recent
        )
        for row, user in enumerate(split.test.users):
            s = scores[row].clone()
            s[torch.from_numpy(seen[indptr[row] : indptr[row + 1]])] = -torch.inf
            top = torch.topk(s, min(n, s.numel()))
            items = [art.vocab.external_item(int(i)) for i in top.indices]
            out[art.vocab.users[int(user)]] = (items, top.values.numpy())
    return out


@pytest.fixture(scope="session")
def cross_user_model_dir(toy_root: Path) -> Path:  # noqa: F811
    return train_toy_model(toy_root, "cross-user", "--cross-user")


@pytest.mark.parametrize("which", ["own-and-others", "cross-user", "cross-user-vote", "transitions"])
async def test_known_users_are_ranked_as_their_offline_test_sample(
    which: str,
    model_dir: Path,  # noqa: F811
    cross_user_model_dir: Path,
    toy_root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    # The stored history of a bank user (first item + every memory's value) is their test input, and
    # a --cross-user model drops the user's own memories in the service as it does offline, among
    # the voters too.
    path = {
        "own-and-others": lambda: model_dir,
        "cross-user": lambda: cross_user_model_dir,
        "cross-user-vote": lambda: with_vote(cross_user_model_dir, toy_root / "cross-user-vote", ALL_VOTE),
        "transitions": lambda: with_transitions(model_dir, toy_root / "transitions"),
    }[which]()
    want = offline_test_rankings(path, toy_root / "toy.txt", 15)
    async with running_app(model_dir=path, store_dir=tmp_path / "s", exact_threshold=1_000_000) as (
        _,
        client,
    ):
        for user in list(want)[:25]:
            body = (await client.post("/recommend", json={"user_id": user, "explain": True})).json()
            assert_same_ranking(body["items"], *want[user], 10)
            own = [m for m in body["memories"] if m["user_id"] == user]
            assert (not own) if which == "cross-user" else body["k_used"] == 5


def test_others_only_keeps_the_best_memories_of_other_users() -> None:
    ids = np.array([[7, 3, 9, -1], [4, 5, -1, -1]])
    users = np.array([["a", "b", "a", ""], ["x", "x", "", ""]], dtype=object)
    hits = SearchResult(
        ids=ids,
        scores=np.array([[0.9, 0.8, 0.7, -np.inf], [0.6, 0.5, -np.inf, -np.inf]], dtype=np.float32),
        items=np.array([[1, 2, 3, 0], [4, 5, 0, 0]]),
        users=users,
        prefix_lens=np.array([[1, 2, 3, -1], [1, 2, -1, -1]], dtype=np.int32),
        timestamps=np.zeros((2, 4)),
        keys=np.ones((2, 4, 3), dtype=np.float32),
    )
    out = others_only(hits, ["a", "x"], 2)
    assert out.ids.tolist() == [[3, -1], [-1, -1]]  # user a keeps b's memory; x has no other user's
    assert out.items.tolist() == [[2, 0], [0, 0]] and out.users.tolist() == [["b", ""], ["", ""]]
    assert out.scores[0, 0] == np.float32(0.8) and np.isinf(out.scores[0, 1])
    assert np.isinf(out.scores[1]).all()
    assert out.prefix_lens.tolist() == [[2, -1], [-1, -1]] and np.isnan(out.timestamps[0, 1])
    assert out.keys is not None and out.keys[0, 0].tolist() == [1, 1, 1] and not out.keys[0, 1].any()


def test_a_random_retrieval_control_is_not_served(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    art = artifact.load(model_dir)
    art.finetune_config = {**art.finetune_config, "retrieval": "random"}
    with pytest.raises(ArtifactError, match="--retrieval random"):
        Recommender(art, frozen=False)


async def test_micro_batched_answers_equal_single_answers(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    settings = {"model_dir": model_dir, "store_dir": tmp_path / "s", "batch_max_wait_ms": 20.0}
    async with running_app(**settings) as (app, client):
        reqs = [{"user_id": f"u{i}", "n": 10, "history": HISTORIES[i % 4]} for i in range(12)]
        alone = [(await client.post("/recommend", json=r)).json() for r in reqs]
        together = await asyncio.gather(*(client.post("/recommend", json=r) for r in reqs))
        for a, b in zip(alone, together, strict=True):
            assert [it["item_id"] for it in a["items"]] == [it["item_id"] for it in b.json()["items"]]
            np.testing.assert_allclose(
                [it["score"] for it in a["items"]], [it["score"] for it in b.json()["items"]], atol=1e-4
            )
        text = (await client.get("/metrics")).text
        sizes = [line for line in text.splitlines() if line.startswith("memrec_batch_size_sum")]
        count = [line for line in text.splitlines() if line.startswith("memrec_batch_size_count")]
        assert float(sizes[0].split()[1]) == 24.0 and float(count[0].split()[1]) < 24.0  # some were fused
