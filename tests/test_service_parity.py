"""Parity: the service's ranking equals the offline evaluator's for the same history and memory bank, with
an exact index, for a new user's request history and for a known user's stored history (their test
sample); and a micro-batched answer equals the answer served alone. Both sides score through the same
function, ``Predictor.score`` (model.predictor): offline through ``model.offline.scores`` over the bank,
online through the service's pipeline over the store."""

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
    with_hybrid,
    with_transitions,
    with_vote,
)

from memory_store import SearchResult
from model import artifact, offline
from model.artifact import ArtifactError
from model.data import Samples, leave_one_out, load_dataset
from model.predictor import Predictor, from_artifact, select
from service.recommender import serving_predictor

HISTORIES = [
    ["i3", "i4", "i5"],
    ["i10"],
    ["i39", "i0", "i1", "i2", "i17", "i18"],
    [f"i{i}" for i in range(30)],
]


def offline_scores(predictor: Predictor, art: artifact.Artifact, samples: Samples) -> torch.Tensor:
    """The offline evaluator's scores of ``samples`` (N, n_ids): the bank searched, the predictor scoring."""
    assert art.bank is not None
    queries = offline.prepare(predictor, art.bank, samples)
    rows = offline.bank_rows(art.bank) if predictor.cfg.reads_transitions else None
    with torch.inference_mode():
        scores = offline.scores(predictor, queries, rows, np.arange(len(samples)))
    return scores.clone()  # outside inference mode: a tensor the caller may mask in place


def offline_ranking(model_path: Path, history: list[str], n: int) -> tuple[list[str], np.ndarray, int]:
    art = artifact.load(model_path)
    predictor = from_artifact(art)
    ids = np.array([art.vocab.item_id(i) for i in history], dtype=np.int64)
    window = ids[-art.encoder.cfg.max_len :]
    inputs = np.zeros((1, art.encoder.cfg.max_len), dtype=np.int64)
    inputs[0, : len(window)] = window
    # A user the bank does not know (-1): the leakage rule removes nothing.
    one = Samples(inputs, np.array([len(window)]), np.array([0]), np.array([-1]), np.array([len(ids)]))
    scores = offline_scores(predictor, art, one)[0]
    scores[torch.from_numpy(ids)] = -torch.inf  # exclude_seen
    top = torch.topk(scores, min(n, scores.numel()))
    items = [art.vocab.external_item(int(i)) for i in top.indices]
    assert art.bank is not None
    queries = offline.prepare(predictor, art.bank, one)
    assert queries.hits is not None
    k_used = int(predictor.memories(queries.plan, queries.hits).present.sum())  # adaptive K applied
    return items, top.values.numpy(), k_used


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


@pytest.mark.parametrize(
    "which", ["fixed-k", "adaptive-k", "vote", "transitions", "vote-transitions", "vote-hybrid"]
)
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
        "vote-hybrid": lambda: with_hybrid(all_vote_model_dir, toy_root / "vote-hybrid"),
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
    split = leave_one_out(load_dataset(str(data)).with_vocab(art.vocab), art.encoder.cfg.max_len)
    scores = offline_scores(from_artifact(art), art, split.test)
    indptr, seen = split.test_seen
    out = {}
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


@pytest.mark.parametrize(
    "which", ["own-and-others", "cross-user", "cross-user-vote", "transitions", "hybrid"]
)
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
        "hybrid": lambda: with_hybrid(model_dir, toy_root / "hybrid"),
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


def test_the_cross_user_rule_keeps_the_best_memories_of_other_users() -> None:
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
    cols, kept = select(hits, 2, np.array(["a", "x"], dtype=object), cross_user=True)
    assert kept.tolist() == [[True, False], [False, False]]  # user a keeps b's memory; x has no other's
    assert ids[0, cols[0, 0]] == 3
    cols, kept = select(hits, 2, np.array(["a", "x"], dtype=object))  # online, no rule: the nearest
    assert kept.all() and ids[0, cols[0]].tolist() == [7, 3] and ids[1, cols[1]].tolist() == [4, 5]


def test_the_leakage_rule_drops_a_users_memories_from_its_position_on() -> None:
    hits = SearchResult(
        ids=np.array([[1, 2, 3]]),
        scores=np.array([[0.9, 0.8, 0.7]], dtype=np.float32),
        items=np.array([[5, 6, 7]]),
        users=np.array([[4, 4, 9]]),
        prefix_lens=np.array([[3, 2, 8]]),
        timestamps=np.zeros((1, 3)),
    )
    cols, kept = select(hits, 3, np.array([4]), prefix_lens=np.array([3]))
    # user 4 at position 3 may see its own memory of prefix 2, not the one of prefix 3
    assert hits.ids[0, cols[0][kept[0]]].tolist() == [2, 3]


def test_a_random_retrieval_control_is_not_served(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    art = artifact.load(model_dir)
    art.inference = {}  # a model directory from before inference.json: its fine-tune config says it
    art.finetune_config = {**art.finetune_config, "retrieval": "random"}
    with pytest.raises(ArtifactError, match="--retrieval random"):
        serving_predictor(art, frozen=False)


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
