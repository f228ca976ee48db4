"""The HTTP API in process (httpx over ASGI) against the embedded store: answers, errors, freshness;
and, against a private Redis that is then killed, the degraded answers."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RedisServer
from test_service_support import model_dir, running_app, toy_root, train_toy_model  # noqa: F401  (fixtures)


@pytest.fixture
async def api(model_dir: Path, tmp_path: Path) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:  # noqa: F811
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "store") as pair:
        yield pair


async def test_recommend_known_user(api: tuple[Any, httpx.AsyncClient]) -> None:
    _, client = api
    r = await client.post("/recommend", json={"user_id": "u0", "n": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_id"] == "u0"
    assert len(body["items"]) == 5
    assert body["strategy"] == "retrieval"
    assert 1 <= body["k_used"] <= 5
    assert body["model_version"].startswith("toy-")
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert "memories" not in body


async def _history(app: Any, user: str) -> list[int]:
    out: list[list[int]] = await app.state.runtime.store.histories([user], 200)
    return out[0]


async def test_known_user_history_is_seeded_from_the_bank_and_masked(
    api: tuple[Any, httpx.AsyncClient],
    toy_root: Path,  # noqa: F811
) -> None:
    app, client = api
    vocab = app.state.runtime.vocab
    history = [vocab.external_item(i) for i in await _history(app, "u1")]
    line = (toy_root / "toy.txt").read_text().splitlines()[1].split()
    assert line[0] == "u1" and history == line[1:-1]  # every item but the test target, in order
    seen = set(history)
    body = (await client.post("/recommend", json={"user_id": "u1", "n": 30})).json()
    assert not seen & {it["item_id"] for it in body["items"]}
    body = (await client.post("/recommend", json={"user_id": "u1", "n": 40, "exclude_seen": False})).json()
    assert len(body["items"]) == 40 and seen <= {it["item_id"] for it in body["items"]}


async def test_cold_start_gets_popular_items(api: tuple[Any, httpx.AsyncClient]) -> None:
    _, client = api
    body = (await client.post("/recommend", json={"user_id": "new-user", "n": 7})).json()
    assert body["strategy"] == "popular" and body["k_used"] == 0 and len(body["items"]) == 7
    again = (await client.post("/recommend", json={"user_id": "other-new", "n": 7})).json()
    assert [it["item_id"] for it in again["items"]] == [it["item_id"] for it in body["items"]]


async def test_request_history_and_exclusions(api: tuple[Any, httpx.AsyncClient]) -> None:
    _, client = api
    req = {"user_id": "fresh", "n": 10, "history": ["i3", "i4", "i5"], "exclude_items": ["i6", "i7"]}
    body = (await client.post("/recommend", json=req)).json()
    got = {it["item_id"] for it in body["items"]}
    assert body["strategy"] == "retrieval" and len(got) == 10
    assert not got & {"i3", "i4", "i5", "i6", "i7"}


async def assert_exclusion_removes_only_that_item(
    client: httpx.AsyncClient, req: dict[str, Any], strategy: str, degraded: bool = False
) -> None:
    """Exclude an item that the same request without exclusions ranks third: it is gone, the items
    before it keep their places, those after it move up one, and every score stays the same."""
    n = 8
    control = (await client.post("/recommend", json={**req, "n": n + 1})).json()
    assert (control["strategy"], control["degraded"]) == (strategy, degraded)
    ranked = [(it["item_id"], it["score"]) for it in control["items"]]
    assert len(ranked) == n + 1
    gone = ranked[2][0]
    body = (await client.post("/recommend", json={**req, "n": n, "exclude_items": [gone]})).json()
    assert (body["strategy"], body["degraded"]) == (strategy, degraded)
    expected = ranked[:2] + ranked[3:]
    assert [it["item_id"] for it in body["items"]] == [item for item, _ in expected]
    assert [it["score"] for it in body["items"]] == pytest.approx([score for _, score in expected])


@pytest.mark.parametrize(
    ("req", "strategy"),
    [
        ({"user_id": "fresh", "history": ["i3", "i4", "i5"]}, "retrieval"),  # the request's history
        ({"user_id": "u0"}, "retrieval"),  # the stored history
        ({"user_id": "never-seen"}, "popular"),  # cold start
    ],
)
async def test_exclude_items_removes_a_ranked_item(
    api: tuple[Any, httpx.AsyncClient], req: dict[str, Any], strategy: str
) -> None:
    await assert_exclusion_removes_only_that_item(api[1], req, strategy)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"user_id": "u0", "n": 0}, "greater than or equal to 1"),
        ({"user_id": "u0", "n": 1001}, "less than or equal to 1000"),
        ({"user_id": "u0", "history": "i1"}, "valid list"),  # unknown ids: tests/test_service_new_items.py
        ({"user_id": ""}, "at least 1 character"),
        ({"n": 3}, "Field required"),
        ({"user_id": "u0", "bogus": 1}, "Extra inputs"),
    ],
)
async def test_recommend_rejects_bad_requests(
    api: tuple[Any, httpx.AsyncClient], payload: dict[str, Any], needle: str
) -> None:
    _, client = api
    r = await client.post("/recommend", json=payload)
    assert r.status_code == 422
    assert needle in r.text


def assert_explained_memories(memories: list[dict[str, Any]]) -> None:
    """Explanation memories come nearest first, and each has a real time: finite, not in the future
    (bank memories carry 0.0, the bank has no times; live ones the time of their event)."""
    sims = [m["similarity"] for m in memories]
    assert sims == sorted(sims, reverse=True), sims
    for m in memories:
        assert math.isfinite(m["timestamp"]) and 0.0 <= m["timestamp"] <= time.time(), m


async def test_explanations_of_bank_memories(api: tuple[Any, httpx.AsyncClient]) -> None:
    _, client = api
    for user in ("u0", "u5", "u17"):
        body = (await client.post("/recommend", json={"user_id": user, "n": 5, "explain": True})).json()
        assert body["strategy"] == "retrieval" and len(body["memories"]) == body["k_used"] >= 2
        assert all(m["user_id"] != user for m in body["memories"])  # other users' memories only
        assert_explained_memories(body["memories"])
        assert {m["timestamp"] for m in body["memories"]} == {0.0}  # all from the bank (service.bank)


async def test_interaction_is_retrievable_by_the_next_request(api: tuple[Any, httpx.AsyncClient]) -> None:
    app, client = api
    before = (await app.state.runtime.store.stats()).memories
    events = [{"user_id": "writer", "item_id": i, "event_id": f"e{i}"} for i in ("i30", "i11", "i22")]
    t0 = time.time()
    r = await client.post("/interactions", json={"events": events})
    t1 = time.time()
    assert r.json() == {"accepted": 3, "duplicates": 0}
    # The first event starts the history (no memory); the next two each add one memory.
    assert (await app.state.runtime.store.stats()).memories == before + 2
    assert [app.state.runtime.vocab.external_item(i) for i in await _history(app, "writer")] == [
        "i30",
        "i11",
        "i22",
    ]
    # Another user whose history equals the writer's prefix retrieves the new memory first (cosine 1).
    req = {"user_id": "reader", "history": ["i30", "i11"], "explain": True, "n": 3}
    body = (await client.post("/recommend", json=req)).json()
    top = body["memories"][0]
    assert top["user_id"] == "writer" and top["item_id"] == "i22" and top["prefix_len"] == 2
    assert top["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert t0 <= top["timestamp"] <= t1  # the events carried none: the time the API received them
    assert len(body["memories"]) == body["k_used"] >= 2
    assert_explained_memories(body["memories"])
    r = await client.post("/interactions", json={"events": events})
    assert r.json() == {"accepted": 0, "duplicates": 3}


async def test_rejected_batches_store_nothing(api: tuple[Any, httpx.AsyncClient]) -> None:
    app, client = api
    before = (await app.state.runtime.store.stats()).memories
    ok = {"user_id": "w", "item_id": "i1"}
    cases = [
        ([ok, {"user_id": "w", "item_id": ""}], 422, "item_id"),  # unknown ids: test_service_new_items.py
        ([ok, {"user_id": "w"}], 422, "item_id"),
        ([ok, {"user_id": "w", "item_id": "i2", "timestamp": "soon"}], 422, "timestamp"),
        ([ok, {"user_id": "w", "item_id": "i2", "timestamp": "inf"}], 422, "finite"),
        ([ok] * 1001, 413, "limit is 1000"),
        ([], 422, "at least 1"),
    ]
    for events, status, needle in cases:
        r = await client.post("/interactions", json={"events": events})
        assert r.status_code == status, r.text
        assert needle in r.text
    assert await _history(app, "w") == []
    assert (await app.state.runtime.store.stats()).memories == before


async def test_oversized_body_is_413(api: tuple[Any, httpx.AsyncClient]) -> None:
    _, client = api
    r = await client.post("/recommend", content=b"{" + b" " * 2_000_000 + b"}")
    assert r.status_code == 413 and "limit" in r.json()["detail"]


async def test_health_and_metrics(api: tuple[Any, httpx.AsyncClient]) -> None:
    _, client = api
    assert (await client.get("/livez")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    await client.post("/recommend", json={"user_id": "u2"})
    await client.post("/recommend", json={"user_id": "u2", "n": 0})
    await client.post("/recommend", json={"user_id": "u2", "history": "nope"})
    text = (await client.get("/metrics")).text
    for name in (
        'memrec_http_request_duration_seconds_bucket{le="0.001",method="POST",route="/recommend",status="2xx"}',
        "memrec_http_requests_in_flight",
        'memrec_stage_duration_seconds_count{stage="encode"}',
        'memrec_stage_duration_seconds_count{stage="retrieve"}',
        'memrec_stage_duration_seconds_count{stage="history"}',
        'memrec_stage_duration_seconds_count{stage="score"}',
        "memrec_k_used_bucket",
        "memrec_memory_bank_size",
        "memrec_index_size",
        "memrec_ingest_lag_seconds",
        'memrec_errors_total{kind="validation"} 2.0',
    ):
        assert name in text, name
    assert "u2" not in text
    assert (await client.get("/docs")).status_code == 200
    assert "/recommend" in (await client.get("/openapi.json")).json()["paths"]


async def test_frozen_memory_writes_histories_only(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s", frozen_memory=True) as (
        app,
        client,
    ):
        before = (await app.state.runtime.store.stats()).memories
        events = [{"user_id": "u0", "item_id": "i1"}, {"user_id": "u0", "item_id": "i2"}]
        assert (await client.post("/interactions", json={"events": events})).json()["accepted"] == 2
        assert (await app.state.runtime.store.stats()).memories == before
        assert (await _history(app, "u0"))[-2:] == [app.state.runtime.vocab.item_id(i) for i in ("i1", "i2")]


async def test_restart_does_not_reload_the_bank(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s") as (app, _):
        first = (await app.state.runtime.store.stats()).memories
        history = await _history(app, "u3")
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s") as (app, _):
        assert (await app.state.runtime.store.stats()).memories == first
        assert await _history(app, "u3") == history


async def test_encoder_only_model_serves_without_retrieval(toy_root: Path, tmp_path: Path) -> None:  # noqa: F811
    encoder_only = train_toy_model(toy_root, "encoder-only", "--stage", "pretrain")
    async with running_app(model_dir=encoder_only, store_dir=tmp_path / "s") as (app, client):
        assert (await app.state.runtime.store.stats()).memories == 0  # no bank to load
        req = {"user_id": "x", "history": ["i3", "i4"], "n": 5, "explain": True}
        body = (await client.post("/recommend", json=req)).json()
        assert body["strategy"] == "encoder" and body["k_used"] == 0 and len(body["items"]) == 5
        assert body["memories"] == []
        events = [{"user_id": "x", "item_id": "i3"}, {"user_id": "x", "item_id": "i4"}]
        assert (await client.post("/interactions", json={"events": events})).json()["accepted"] == 2
        cold = (await client.post("/recommend", json={"user_id": "nobody", "n": 3})).json()
        assert cold["strategy"] == "popular" and len(cold["items"]) == 3
        await assert_exclusion_removes_only_that_item(
            client, {"user_id": "y", "history": ["i3", "i4"]}, "encoder"
        )
        await assert_exclusion_removes_only_that_item(client, {"user_id": "x"}, "encoder")  # stored history


async def test_degraded_answers_honour_exclude_items(
    model_dir: Path,  # noqa: F811
    redis_server: Callable[..., RedisServer],
    tmp_path: Path,
) -> None:
    # A private Redis, killed: the store is unreachable, answers come from the request's own history
    # and this replica's index (or the popular list), marked degraded, and still honour exclusions.
    redis = redis_server()
    settings = {"model_dir": model_dir, "store_dir": tmp_path / "s", "redis_url": redis.url}
    async with running_app(**settings) as (app, client):
        assert (await app.state.runtime.store.stats()).memories > 0
        redis.kill()
        req = {"user_id": "u0", "history": ["i3", "i4", "i5"]}
        await assert_exclusion_removes_only_that_item(client, req, "retrieval", degraded=True)
        await assert_exclusion_removes_only_that_item(client, {"user_id": "u0"}, "popular", degraded=True)
        body = (await client.post("/recommend", json={**req, "n": 5, "explain": True})).json()
        assert body["degraded"] is True and len(body["memories"]) == body["k_used"] >= 2
        assert_explained_memories(body["memories"])


async def test_loop_lag_probe_sees_a_blocked_event_loop(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    import asyncio
    import time

    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s", loop_lag_interval_s=0.01) as (
        app,
        client,
    ):
        await asyncio.sleep(0.05)  # a few on-time ticks
        time.sleep(0.08)  # the loop is blocked: the pending tick fires ~70 ms late
        await asyncio.sleep(0.05)
        hist = app.state.metrics.loop_lag
        buckets = {
            s.labels["le"]: s.value for s in next(iter(hist.collect())).samples if s.name.endswith("_bucket")
        }
        total = buckets["+Inf"]
        assert total >= 3
        assert buckets["0.05"] <= total - 1  # the blocked tick was later than 50 ms
        assert buckets["0.01"] >= 1  # and an unblocked one was (nearly) on time
        assert "memrec_event_loop_lag_seconds_bucket" in (await client.get("/metrics")).text
