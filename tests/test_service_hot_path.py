"""The request path's performance properties: the frozen graphs give exactly the eager modules' numbers
(and a module whose trace would not is served eager); length-chunked encoding gives the same states as
encoding each history alone; on the Redis backend a steady-state /recommend or /interactions never leaves the
event-loop thread (no thread-pool dependency, no worker-thread stage) while a large /interactions
batch is encoded in a worker thread; start-up objects are frozen out of the garbage collector's full
passes."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_service_support import model_dir, running_app, service_redis, toy_root  # noqa: F401
from torch import Tensor, nn

from memory_store import SearchResult
from model import artifact
from model.frozen import freeze
from model.predictor import ENCODE_CHUNK, Memories
from service.ingest import INLINE_ENCODE_MAX
from service.recommender import serving_predictor


def test_frozen_graphs_rank_exactly_as_the_eager_modules(model_dir: Path) -> None:  # noqa: F811
    art = artifact.load(model_dir)
    frozen, eager = serving_predictor(art), serving_predictor(art, frozen=False)
    assert frozen.frozen and not eager.frozen
    rng = np.random.default_rng(1)
    n_items, k = eager.n_ids - 1, eager.cfg.k
    for rows in (1, 7, ENCODE_CHUNK + 3):  # other batch sizes and lengths than the traced ones
        histories = [
            rng.integers(1, n_items + 1, size=int(rng.integers(1, 60))).tolist() for _ in range(rows)
        ]
        states = eager.encode(histories)
        np.testing.assert_array_equal(frozen.encode(histories), states)
        keys = rng.standard_normal((rows, k, states.shape[1])).astype(np.float32)
        keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
        items = rng.integers(0, n_items + 1, size=(rows, k))  # 0: empty slots
        items[0] = 0  # a row without any memory keeps its state
        sims = np.where(items > 0, rng.random((rows, k)), 0.0).astype(np.float32)
        mem = Memories(np.tile(np.arange(k), (rows, 1)), items > 0, items, sims, keys)
        with torch.inference_mode():
            fused = eager.fused(torch.from_numpy(states), mem)
            assert torch.equal(frozen.fused(torch.from_numpy(states), mem), fused)
        np.testing.assert_array_equal(fused[0].numpy(), states[0])
        # the whole scoring path, search answer in, ranking out
        hits = SearchResult(
            ids=np.where(items > 0, np.arange(rows * k).reshape(rows, k), -1),
            scores=np.where(items > 0, sims, -np.inf).astype(np.float32),
            items=items,
            users=np.full((rows, k), "someone", dtype=object),
            prefix_lens=np.ones((rows, k), np.int32),
            timestamps=np.zeros((rows, k)),
            keys=keys,
        )
        masks = [np.asarray(h, dtype=np.int64) for h in histories]
        ranked = [
            p.finish(p.prepare(histories, ["me"] * rows), hits, None, masks, [10] * rows)
            for p in (frozen, eager)
        ]
        for f, e in zip(*ranked, strict=True):
            np.testing.assert_array_equal(f.items, e.items)
            np.testing.assert_array_equal(f.scores, e.scores)


class _ShapeBound(nn.Module):
    """Python control flow on a value: a trace records only the branch its example took."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 2 if bool(x.sum() > 0) else x - 1


def test_a_graph_that_does_not_reproduce_its_module_is_not_used() -> None:
    positive, negative = torch.ones(2, 3), -2 * torch.ones(4, 3)  # 2x: -4, the module: -3
    assert freeze(_ShapeBound(), (positive,), [(positive,), (negative,)], "toy") is None
    graph = freeze(_ShapeBound(), (positive,), [(2 * positive,)], "toy")
    assert graph is not None and torch.equal(graph(positive), 2 * positive)


def test_chunked_encoding_equals_encoding_each_history_alone(model_dir: Path) -> None:  # noqa: F811
    rec = serving_predictor(artifact.load(model_dir))
    rng = np.random.default_rng(0)
    n = 3 * ENCODE_CHUNK + 5  # several chunks, the last one partial
    histories = [rng.integers(1, rec.n_ids, size=int(rng.integers(1, 70))).tolist() for _ in range(n)]
    together = rec.encode(histories)
    alone = np.concatenate([rec.encode([h]) for h in histories])
    assert together.shape == (n, rec.encoder.cfg.dim)
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)  # in the input order


async def test_steady_state_requests_stay_on_the_event_loop_thread(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    service_redis: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = {"model_dir": model_dir, "store_dir": tmp_path / "s", "redis_url": service_redis}
    async with running_app(**settings) as (app, client):
        store = app.state.runtime.store
        stats = await store.stats()
        assert stats.index_size == stats.memories  # the bank load is applied in full
        assert gc.get_freeze_count() > 0  # start-up objects are out of the collector's passes

        def no_thread(*_: Any, **__: Any) -> Any:
            raise AssertionError("a steady-state request left the event-loop thread")

        monkeypatch.setattr(asyncio, "to_thread", no_thread)
        monkeypatch.setattr("fastapi.dependencies.utils.run_in_threadpool", no_thread)
        monkeypatch.setattr("fastapi.routing.run_in_threadpool", no_thread)
        events = {"events": [{"user_id": "hot", "item_id": f"i{i}"} for i in (3, 4, 5)]}
        r = await client.post("/interactions", json=events)
        assert r.status_code == 200 and r.json()["accepted"] == 3, r.text
        req = {"user_id": "reader", "history": ["i3", "i4"], "explain": True, "n": 3}
        body = (await client.post("/recommend", json=req)).json()
        assert body["strategy"] == "retrieval"
        assert any(m["user_id"] == "hot" for m in body["memories"])  # the new memory, applied inline
        many = await asyncio.gather(
            *(client.post("/recommend", json={"user_id": f"u{i}", "n": 5}) for i in range(20))
        )
        assert all(m.status_code == 200 for m in many)
        monkeypatch.undo()  # the shutdown snapshot is written in a worker thread, as it should be
    assert gc.get_freeze_count() == 0  # unfrozen at shutdown


async def test_a_large_interactions_batch_is_encoded_off_the_event_loop(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s") as (app, client):
        encode = app.state.runtime.ingestor.predictor.encode
        offloaded: list[int] = []
        real_to_thread = asyncio.to_thread

        async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
            if fn == encode:
                offloaded.append(len(args[0]))
            return await real_to_thread(fn, *args, **kwargs)

        monkeypatch.setattr(asyncio, "to_thread", counting)
        small = [{"user_id": "u0", "item_id": f"i{i % 40}"} for i in range(INLINE_ENCODE_MAX)]
        assert (await client.post("/interactions", json={"events": small})).json()["accepted"] == len(small)
        assert offloaded == []
        large = [{"user_id": f"u{i % 7}", "item_id": f"i{i % 40}"} for i in range(INLINE_ENCODE_MAX + 1)]
        assert (await client.post("/interactions", json={"events": large})).json()["accepted"] == len(large)
        # one encoder pass: its memory keys but each user's first (their stored state is that key), and
        # the 7 users' states after the batch
        assert offloaded == [len(large) - 7 + 7]
