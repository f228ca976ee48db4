"""A model fine-tuned with ``--user-memories``, served: the store's per-user memories on the request path.

Parity: after the start-up load, each known user's stored memories are the replay's snapshot of their
test sample (model.user_memory), and /recommend ranks the user as the offline evaluator ranks that
sample, on the embedded store and on Redis. Behaviour: POST /interactions merges the new item at the
user's interaction count, /recommend accesses the entries nearest its state and ranks with the memories
held now, a request history is answered with the stored memories, and DELETE /users erases them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_service_support import running_app, service_redis, toy_root, train_toy_model  # noqa: F401

from model import artifact, offline
from model.data import Split, leave_one_out, load_dataset
from model.finetune import FinetuneConfig
from model.memory import encode_samples
from model.predictor import Predictor, from_artifact
from model.user_memory import UserMemoryConfig, build_table
from service.memory_rules import store_rules
from service.user_memories import accesses, snapshot

SLOTS = 8  # C: fewer than the toy sequences' 8–20 items, so the replay evicts
USERS = 25  # known users checked for parity
TOL = 1e-5
LOUD = 16.0  # gain of the fusion's second attention (see um_model_dir)


@pytest.fixture(scope="session")
def um_model_dir(toy_root: Path) -> Path:  # noqa: F811
    """A toy model fused with user memories, its second attention's projections scaled by ``LOUD``:
    the toy fine-tuning leaves the fusion near its initialisation, where the user memories move a score
    by 1e-4 at most; scaled, they change the top 10 of nearly every test user, so that a service that
    read other memories than the replay's could not pass."""
    src = train_toy_model(toy_root, "user-memories", "--user-memories", "--user-memory-slots", str(SLOTS))
    dst = toy_root / "user-memories-loud"
    if not dst.is_dir():
        shutil.copytree(src, dst)
        weights = load_file(dst / "fusion.safetensors")
        for name in ("q", "k", "v", "proj"):
            weights[f"seq_tar.attn2.{name}.weight"] *= LOUD
        save_file(weights, dst / "fusion.safetensors")
    return dst


def toy_split(art: artifact.Artifact, toy_root: Path) -> Split:  # noqa: F811
    return leave_one_out(
        load_dataset(str(toy_root / "toy.txt")).with_vocab(art.vocab), art.encoder.cfg.max_len
    )


def memory_config(art: artifact.Artifact) -> UserMemoryConfig:
    return FinetuneConfig.from_json(art.finetune_config).user_memory()


def offline_test_scores(art: artifact.Artifact, split: Split, user_items: np.ndarray) -> torch.Tensor:
    """The offline evaluator's scores (N, n_ids) of the test samples with ``user_items`` (N, C), seen
    items masked."""
    assert art.bank is not None
    predictor = from_artifact(art)
    queries = offline.prepare(predictor, art.bank, split.test, user_items=user_items)
    with torch.inference_mode():
        scores = offline.scores(predictor, queries, None, np.arange(len(split.test)))
    scores = scores.clone()  # outside inference mode: a tensor to mask in place
    indptr, seen = split.test_seen
    for row in range(len(split.test)):
        scores[row, torch.from_numpy(seen[indptr[row] : indptr[row + 1]])] = -torch.inf
    return scores


def clear_cut(art: artifact.Artifact, split: Split) -> np.ndarray:
    """The test rows whose K-th nearest memory is more similar than the next one. The toy data's repeated
    prefixes give memories of equal similarity, and the store and the bank's index may keep different
    ones of a tie at the cut (tests/test_service_parity.py): a difference in retrieval, which the loud
    fusion would turn into one in the scores, and no concern of this test."""
    k = from_artifact(art).cfg.k
    assert art.bank is not None
    _, sims = art.bank.candidates(encode_samples(art.encoder, split.test), k + 1)
    rows: np.ndarray = np.flatnonzero(sims[:, k - 1] - sims[:, k] > 1e-4)
    return rows


def assert_ranked_as(got: list[dict[str, Any]], scores: torch.Tensor, external: Any) -> None:
    """The service's items are the top of ``scores`` (n_ids,) in order, their scores equal to ``TOL``;
    two items whose scores are within ``TOL`` may come in either order."""
    top = torch.topk(scores, len(got))
    want_items = [external(int(i)) for i in top.indices]
    want = top.values.numpy()
    np.testing.assert_allclose([it["score"] for it in got], want, rtol=TOL, atol=TOL)
    by_item = {external(i): float(s) for i, s in enumerate(scores.tolist()) if i}
    for rank, it in enumerate(got):
        assert it["item_id"] == want_items[rank] or abs(by_item[it["item_id"]] - want[rank]) <= TOL, rank


@pytest.mark.parametrize("backend", ["embedded", "redis"])
async def test_known_users_are_ranked_with_the_memories_their_test_sample_reads(
    backend: str,
    um_model_dir: Path,
    toy_root: Path,  # noqa: F811
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    art = artifact.load(um_model_dir)
    split = toy_split(art, toy_root)
    table = build_table(art.encoder, split, memory_config(art), store_rules())
    user_items = table.lookup(split.test)  # (N, C) what each test sample reads offline
    assert table.stats.evictions > 0  # the memories are the replay's choice, not the whole history
    scores = offline_test_scores(art, split, user_items)
    without = offline_test_scores(art, split, np.zeros_like(user_items))
    checked = clear_cut(art, split)[:USERS]
    assert len(checked) == USERS
    moved = [not torch.equal(scores[r].topk(10).indices, without[r].topk(10).indices) for r in checked]
    assert sum(moved) > USERS // 2  # the user memories move the rankings checked
    redis_url = request.getfixturevalue("service_redis") if backend == "redis" else None
    settings = {"model_dir": um_model_dir, "store_dir": tmp_path / "s", "exact_threshold": 1_000_000}
    async with running_app(**settings, redis_url=redis_url) as (app, client):
        rt = app.state.runtime
        users = [art.vocab.users[int(u)] for u in split.test.users]
        stored = await rt.store.user_memories(users)
        for row, mem in enumerate(stored):
            assert sorted(mem.items.tolist()) == sorted(user_items[row][user_items[row] > 0].tolist())
        for row in checked:
            body = (await client.post("/recommend", json={"user_id": users[row], "n": 10})).json()
            assert body["strategy"] == "retrieval"
            assert_ranked_as(body["items"], scores[row], art.vocab.external_item)


async def expected_scores(rt: Any, history: list[int], user: str, user_items: np.ndarray) -> torch.Tensor:
    """What the predictor scores for ``history`` over the store's memories with ``user_items`` (C,),
    the history masked."""
    predictor: Predictor = rt.pipeline.predictor
    plan = predictor.prepare([history], [user])
    hits = await rt.store.search(plan.states, plan.fetch, with_keys=True)
    with torch.inference_mode():
        scores = predictor.score(plan, hits, None, user_items=user_items[None, :]).scores
    out = scores[0].clone()
    out[torch.tensor(history)] = -torch.inf
    return out


async def test_interactions_update_the_memories_the_ranking_reads(
    um_model_dir: Path,
    tmp_path: Path,
) -> None:
    art = artifact.load(um_model_dir)
    cfg = memory_config(art)
    async with running_app(model_dir=um_model_dir, store_dir=tmp_path / "s") as (app, client):
        rt = app.state.runtime
        user = art.vocab.users[0]
        [history] = await rt.store.histories([user], 1_000)
        [before] = await rt.store.user_memories([user])
        assert len(before) == cfg.capacity  # the toy users hold more items than C
        new = next(i for i in range(1, art.vocab.n_items + 1) if i not in history)
        event = {"user_id": user, "item_id": art.vocab.external_item(new), "event_id": "um-1"}
        assert (await client.post("/interactions", json={"events": [event]})).json()["accepted"] == 1
        [after] = await rt.store.user_memories([user])
        row = after.items.tolist().index(new)  # merged, at the user's count as the clock
        assert after.first_seen[row] == after.last_access[row] == len(history)
        assert len(after) == cfg.capacity and len(set(before.items) - set(after.items)) == 1  # one evicted
        # A retried event (a duplicate) is not merged again.
        await client.post("/interactions", json={"events": [event]})
        [again] = await rt.store.user_memories([user])
        assert again.freq.tolist() == after.freq.tolist()

        body = (await client.post("/recommend", json={"user_id": user, "n": 10})).json()
        held = snapshot([after], cfg.capacity)[0]
        want = await expected_scores(rt, [*history, new], user, held)
        assert_ranked_as(body["items"], want, art.vocab.external_item)
        stale = await expected_scores(rt, [*history, new], user, snapshot([before], cfg.capacity)[0])
        unmasked = torch.isfinite(want)
        assert (want - stale)[unmasked].abs().max() > 1e-4  # the memories held now are what it ranked with
        # The query accessed the access_top entries nearest its state, at the user's count.
        await rt.pipeline.accesses.drain()
        [read] = await rt.store.user_memories([user])
        touched = read.access_count - after.access_count
        assert touched.sum() == cfg.access_top and set(read.last_access[touched > 0]) == {len(history) + 1}
        state = rt.pipeline.predictor.prepare([[*history, new]], [user]).states
        [(_, nearest)] = accesses([after], state, cfg.access_top)
        assert set(read.items[touched > 0].tolist()) == set(nearest.tolist())

        # A request history is scored with it, and with the user's stored memories.
        extra = [art.vocab.external_item(new % art.vocab.n_items + 1)]
        body = (await client.post("/recommend", json={"user_id": user, "history": extra})).json()
        seen = [*history, new, art.vocab.item_id(extra[0])]
        assert_ranked_as(body["items"], await expected_scores(rt, seen, user, held), art.vocab.external_item)

        erased = (await client.delete(f"/users/{user}")).json()
        assert erased["user_memories"] == cfg.capacity
        assert len((await rt.store.user_memories([user]))[0]) == 0
